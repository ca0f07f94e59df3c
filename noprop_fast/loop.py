"""The training loop of both tasks, in one process or several: `train`, the entry the CLI calls,
and `Run`. A run is a sequence of rounds (tasks/: an image epoch, made of block passes; a
language model's `eval_every` steps), each ending in the evaluation when due, a check of the
state (finite.py), a checkpoint, a metrics record and a printed line. The strategy (strategy.py)
and the ops (`ops.resolve_ops`, `--fused`) are set up once; CUDA graphs: docs/performance.md.
"""
import sys
import time
from pathlib import Path

import torch

from . import preflight, runs, threads
from .errors import UserError
from .finite import check_losses, check_restored_state, check_state
from .ops import PhiloxNoise, compute_dtype, resolve_ops
from .graphs import CapturedStep, announce_uncaptured, graph_unavailable_reason, new_pool, once
from .layers import ALL_BLOCKS
from .memory import SavedTensorBytes, reset_peak
from .nvtx_ranges import phase, phase_iter
from .optim import make_optimizer, set_hyperparameters
from .progress import RunClock, evaluations_between, progress_bar
from .schedule import NoiseSchedule
from .strategy import ManyProcesses, OneProcess
from .tasks import TASKS

LOG_EVERY = 10  # CUDA: steps between reads of the loss buffer (each read is one host sync)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


class Run:
    """One run of `cfg.task` (tasks.TASKS) in `run_dir`. parallel: (layout, groups) of a
    multi-process run, None for one process. pretrain: embed_init mlm's masked-LM phase (not
    when a checkpoint follows)."""
    clock: RunClock | None = None  # the progress line's time estimate, set by fit

    def __init__(self, cfg, data, run_dir: Path, show_progress: bool = True, parallel=None,
                 pretrain: bool = True):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.strategy = OneProcess() if parallel is None else ManyProcesses(*parallel)
        self.show_progress = show_progress and self.strategy.prints
        self.device = resolve_device(cfg.device)
        self.strategy.check(cfg, data)
        self.task = TASKS[cfg.task](cfg, data, self.device, self.strategy.data_share)
        self.data = self.task.data
        self.ops = resolve_ops(cfg.fused, self.device,
                               warn=lambda line: print(line, file=sys.stderr, flush=True))

        def build(c):  # the task's model on the run's ops, its blocks in the compute dtype
            return self.task.build_model(c).configure(self.ops, compute_dtype(cfg.precision))
        self.model = build(cfg)
        self.task.prepare(self.model, pretrain, self.show_progress)
        # the whole model's parameter count, in every process
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.schedule = NoiseSchedule.cosine(cfg.schedule_blocks, cfg.snr_max, cfg.eta,
                                             self.device)
        self.model, self.schedule = self.strategy.localise(self, build)
        # CUDA graphs (graphs.py): one captured step per block slice, made on the slice's first
        # batch; use_graphs False runs every step uncaptured (the tests compare both)
        self.graph_warn = once()
        reason = graph_unavailable_reason(self.device, cfg, self.ops.fused)
        announce_uncaptured(self.device, cfg, reason, self.graph_warn)
        self.use_graphs, self.captured, self.graph_pool = reason is None, {}, None
        self.optimizer = make_optimizer(self.model, cfg, capturable=self.use_graphs)
        # fp16: dynamic loss scaling (a step that overflows is skipped)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        self.noise = PhiloxNoise(cfg.seed, self.device) if self.ops.fused else None
        self.progress = self.task.Progress()
        self.run_dir.mkdir(parents=True, exist_ok=True)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": None if self.scaler is None else self.scaler.state_dict()}
        if self.task.keeps_streams:  # (the image task reseeds its streams every epoch instead)
            rng = {"cpu": torch.get_rng_state()}
            if self.device.type == "cuda":
                rng["cuda"] = torch.cuda.get_rng_state(self.device)
            state.update(batches=self.task.batches.state_dict(), rng=rng,
                         noise_offset=None if self.noise is None else self.noise.offset.cpu())
        state.update(progress=self.progress.__dict__, config=self.cfg.to_dict())
        return self.strategy.gather(state)

    def restore(self, state: dict) -> None:
        state, streams = self.strategy.slice(state), self.task.keeps_streams
        targets = {"model": self.model, "optimizer": self.optimizer, "scaler": self.scaler,
                   "batches": self.task.batches if streams else None}
        try:  # a missing scaler state (a run without fp16) is not an error
            for key, target in targets.items():
                if target is not None and state.get(key) is not None:
                    target.load_state_dict(state[key])
                elif target is not None and key != "scaler":
                    raise KeyError(f"no {key!r} in the checkpoint")
        except (RuntimeError, ValueError, KeyError) as err:
            msg = " ".join(str(err).split())[:200]
            raise UserError(f"{self.run_dir}: checkpoint does not fit this config ({msg})") \
                from None
        if streams:
            torch.set_rng_state(state["rng"]["cpu"])
            if "cuda" in state["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
            if self.noise is not None and state.get("noise_offset") is not None:
                self.noise.offset.copy_(state["noise_offset"].to(self.device))
        check_restored_state(self.model, self.optimizer, self.run_dir / runs.CHECKPOINT)
        set_hyperparameters(self.optimizer, self.cfg)  # a resume's new values (preflight.py)
        self.progress = self.task.Progress(**state["progress"])
        runs.rewrite_metrics(self.run_dir, self.progress.history)

    def last_checkpoint(self) -> str:
        history, unit = self.progress.history, self.task.unit
        if not history:
            return self.task.none_yet
        return f"{self.run_dir / runs.CHECKPOINT} ({unit} {history[-1][unit]})"

    # -- steps and rounds --------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor, blocks: slice = ALL_BLOCKS):
        """One optimiser step on the blocks in `blocks`: (loss, parts) as device tensors."""
        if self.use_graphs:
            key = (blocks.start, blocks.stop)
            if key not in self.captured:
                self.graph_pool = self.graph_pool or new_pool(self.device)
                self.captured[key] = CapturedStep(
                    lambda static_x, static_y: self.train_on(static_x, static_y, blocks),
                    (x, y), self.device, pool=self.graph_pool, warn=self.graph_warn)
            if self.captured[key].fits(x, y):  # not: a last partial batch, run uncaptured
                return self.captured[key](x, y)
        return self.train_on(x, y, blocks)

    def train_on(self, x: torch.Tensor, y: torch.Tensor, blocks: slice = ALL_BLOCKS):
        """The part of a step that a CUDA graph captures."""
        return self.strategy.train_step(self, x, y, blocks)

    def train_round(self) -> dict:
        """Train the next round; returns its record (before evaluation), the progress advanced."""
        p, device, task = self.progress, self.device, self.task
        total, batches = task.round(p, self.noise)  # steps at most, the round's (x, y, blocks)
        losses = torch.zeros(total, device=device)  # [steps] device buffer
        block_sum = (torch.zeros(self.cfg.num_blocks, device=device)
                     if task.keeps_block_losses else None)
        bar = progress_bar(self.clock, **task.bar(p, total), unit="step", leave=False,
                           disable=not self.show_progress, file=sys.stderr)
        self.model.train()
        log_every = 1 if device.type == "cpu" else LOG_EVERY
        step, read, seen, values, start = 0, 0, 0, [], time.perf_counter()
        for x, y, blocks in phase_iter("data", batches):  # each fetched in a "data" range
            if step == 0 and device.type == "cpu" and task.measures_saved:
                resident = [*self.model.parameters(), *self.model.buffers()]
                with SavedTensorBytes(exclude=resident) as saved:
                    loss, parts = self.step(x, y, blocks)
                p.saved_bytes = max(p.saved_bytes, saved.bytes)
            else:
                loss, parts = self.step(x, y, blocks)
            losses[step] = loss
            if block_sum is not None:
                block_sum[blocks] += parts["block_losses"]
            step, seen = step + 1, seen + x.shape[0]
            if step % log_every == 0:
                values += self._read_losses(losses[read:step], read, bar, seen, start)
                read = step
        values += self._read_losses(losses[read:step], read, bar, seen, start)
        seconds = time.perf_counter() - start
        bar.close()
        return task.end_round(p, values, seconds, seen, block_sum)

    def _read_losses(self, losses: torch.Tensor, first: int, bar, seen: int, start: float):
        """Read the buffered losses (one host sync); stop on the first non-finite one."""
        values = losses.tolist()
        base, where = self.task.step_label(self.progress)
        check_losses(values, base + first, where, self.last_checkpoint())
        if values:
            bar.update(len(values))
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{values[-1]:.4f}", **self.task.postfix(self.progress, rate))
        return values

    # -- the run -----------------------------------------------------------------------------
    def evaluate(self):
        with phase("evaluation"):
            return self.task.evaluate(self.model, self.schedule, self.strategy.transport)

    def position(self) -> int:
        """Epochs or steps trained."""
        return getattr(self.progress, self.task.unit)

    def fit(self) -> dict:
        task, p, every = self.task, self.progress, self.cfg.eval_every
        reset_peak(self.device)
        # the time estimate of the rest (progress.py): steps and evaluations to come
        self.clock = RunClock((task.length - self.position()) * task.steps_per_unit,
                              evaluations_between(self.position(), task.length, every))
        while self.position() < task.length:
            record = self.train_round()
            self.clock.pause()  # evaluation and checkpoint: not in the training-time estimate
            done = self.position()
            check_state(self.model, self.optimizer, f"{task.state_when} {done}",
                        self.last_checkpoint())
            evaluated = done % every == 0 or done == task.length
            if evaluated:
                start = time.perf_counter()
                record.update(task.eval_fields(self.evaluate()))
                record["eval_seconds"] = time.perf_counter() - start
            p.history.append(record)
            runs.save_checkpoint(self.run_dir, self.checkpoint_state(), self.cfg)
            runs.append_metrics(self.run_dir, record)
            print(task.round_line(record), flush=True)
            self.clock.resume(evaluated=evaluated)
        summary = {**task.summary(self), **self.strategy.summary_fields(self.cfg)}
        runs.write_summary(self.run_dir, summary)
        return summary


def train(cfg, resume: str | None = None, overwrite: bool = False, show_progress: bool = True,
          thread_count: int | None = None, parallel=None) -> dict:
    """Train `cfg` and print the closing lines; returns the summary. resume: the run folder to
    go on from; parallel: (layout, groups) of a multi-process run (rank 0 alone prints and
    writes), None for one process."""
    from .distributed import rank_zero_first, same_on_every_rank
    run_dir = Path(cfg.out) if cfg.out else runs.default_run_dir(cfg)
    if parallel is not None:  # a time-stamped default folder: rank 0's on every rank
        run_dir = Path(same_on_every_rank(str(run_dir)))
    cfg.out = str(run_dir)
    if not resume:
        runs.refuse_existing_run(run_dir, overwrite)
    runs.check_writable(run_dir)
    thread_note = threads.apply(thread_count)
    task = TASKS[cfg.task]
    with rank_zero_first(parallel and parallel[0]):  # a download or cache: built once
        data = task.load_data(cfg, show_progress)
    tokenizer = task.sampler(cfg, data)  # the closing samples' (language), loaded now
    run = Run(cfg, data, run_dir, show_progress, parallel, pretrain=not resume)
    if resume:  # the checkpoint, and a length it has not passed yet
        run.restore(runs.load_checkpoint(run_dir))
        preflight.check_resume_progress(cfg, run.progress)
        print(f"resuming {run_dir} after {run.task.unit} {run.position()}")
    elif overwrite:  # the old run's files go now, the last check before the first step
        runs.clear_run(run_dir)
    # on a CPU: "cpu (2 threads: one per core, waiting threads sleep)"
    device = f"cpu ({thread_note})" if run.device.type == "cpu" else runs.device_name(run.device)
    print(f"{run.task.header(run)}, device {device}, "
          f"{run.ops.name} ops, {cfg.precision}, run {run_dir}", flush=True)
    summary = run.fit()
    size = summary.get("checkpoint_bytes")
    saved = "no checkpoint written" if size is None else (
        f"checkpoint {size / 1e6:.1f} MB ({run_dir / runs.CHECKPOINT}: weights, AdamW's two "
        f"moments, progress; resume with --resume {run_dir})")
    print("\n".join([*run.task.closing(run, summary), saved, *run.task.notes(run, summary)]),
          flush=True)
    if runs.is_writer():  # the run's curves as PNGs (plots.py); rank 0 alone writes
        from .plots import write_run_plots  # a plot that cannot be drawn: one line on stderr
        paths = write_run_plots(summary, run.progress.history, run_dir, data_dir=cfg.data_dir,
                                warn=lambda line: print(line, file=sys.stderr, flush=True))
        if paths:
            print("plots: " + ", ".join(str(path) for path in paths), flush=True)
    for text in run.task.sample_lines(run, tokenizer):
        print(text)
    return summary

