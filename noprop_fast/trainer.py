"""The image task's run: build the model, train epoch by epoch, evaluate, checkpoint, summarise.

Reproducibility: the weights are drawn from `seed`; every epoch reseeds the global generator
(noise, dropout) and the shuffling generator from (seed, epoch). A run resumed from the checkpoint
of epoch k therefore replays epochs k+1.. exactly as the uninterrupted run does (a test checks).

Fused path and precision: `--fused` picks the fused ops for the device (`ops.resolve_ops`; a
one-line notice and the reference ops where they cannot be loaded), and their noise comes from a
Philox stream reseeded every epoch like the global generator. `--precision` sets the blocks'
compute dtype; fp16 adds dynamic loss scaling (a step whose gradients overflow is skipped).

Host syncs: the per-step losses go into a device buffer that is read every `LOG_EVERY` steps (to
update the progress bar and to stop on a non-finite loss, naming its step), and once per epoch;
before every checkpoint, one read says whether every parameter, buffer and optimiser-state tensor
is finite (finite.py: a run that is not stops without writing that checkpoint).

CUDA graphs (`--cuda-graphs`, graphs.py): with --fused on CUDA each block slice's step is captured
once and replayed; elsewhere one line says why not and the steps run as they always did.
"""
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import runs
from .config import ImageConfig
from .data import ImageData, batches
from .errors import UserError
from .finite import check_losses, check_restored_state, check_state
from .ops import PhiloxNoise, compute_dtype, resolve_ops
from .graphs import CapturedStep, announce_uncaptured, graph_unavailable_reason, new_pool, once
from .layers import ALL_BLOCKS
from .memory import SavedTensorBytes, cuda_peak, memory_kind, reset_peak
from .methods import backprop_loss, evaluate, noprop_loss
from .models.image import ClassEmbedding, ImageModel, prototype_embeddings
from .nvtx_ranges import phase, phase_iter
from .optim import BlockAdamW, make_optimizer, set_hyperparameters
from .progress import RunClock, evaluations_between, progress_bar
from .schedule import NoiseSchedule

LOG_EVERY = 10  # CUDA: steps between reads of the loss buffer (each read is one host sync)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def build_model(cfg: ImageConfig, data: ImageData, device: torch.device) -> ImageModel:
    torch.manual_seed(cfg.seed)
    prototypes = None
    if cfg.embedding == "prototype":
        prototypes = prototype_embeddings(data.train_x, data.train_y, data.num_classes)
    embedding = ClassEmbedding(cfg.embedding, data.num_classes, cfg.embed_dim, prototypes)
    model = ImageModel(cfg.method, cfg.num_blocks, data.image_shape, data.num_classes, embedding,
                       cfg.dropout, cfg.classifier_init)
    return model.to(device)


def train_step(model: ImageModel, optimizer: BlockAdamW, schedule: NoiseSchedule,
               x: torch.Tensor, y: torch.Tensor, blocks: slice = ALL_BLOCKS, noise=None,
               scaler=None):
    """One optimiser step on the blocks in `blocks`. Returns (loss, parts) as device tensors.

    noise: the fused path's PhiloxNoise (see methods.noisy_latents). scaler: a GradScaler (fp16).
    """
    if model.method == "noprop":
        loss, parts = noprop_loss(model, schedule, x, y, blocks, noise)
    else:
        loss, parts = backprop_loss(model, x, y)
    return apply_gradients(loss, optimizer, blocks, scaler), parts


def apply_gradients(loss: torch.Tensor, optimizer: BlockAdamW, blocks: slice = ALL_BLOCKS,
                    scaler=None) -> torch.Tensor:
    """Backward and one optimiser step on `blocks` (fp16: through the loss scaler). Returns the
    detached loss. Both tasks' steps end here."""
    with phase("backward"):
        optimizer.zero_grad(set_to_none=True)
        (loss if scaler is None else scaler.scale(loss)).backward()
    with phase("optimizer"):
        if scaler is None:
            optimizer.step(blocks)
        else:
            scaler.step(optimizer, blocks)  # skipped (one host sync) if a gradient overflowed
            scaler.update()
    return loss.detach()


def load_states(run_dir: Path, state: dict, **targets) -> None:
    """Load state[key] into each target's `load_state_dict` (a None target, or a scaler's missing
    state, is skipped); a checkpoint that does not fit is one line naming the run."""
    try:
        for key, target in targets.items():
            if target is not None and state.get(key) is not None:
                target.load_state_dict(state[key])
            elif target is not None and key != "scaler":
                raise KeyError(f"no {key!r} in the checkpoint")
    except (RuntimeError, ValueError, KeyError) as err:
        msg = " ".join(str(err).split())[:200]
        raise UserError(f"{run_dir}: checkpoint does not fit this config ({msg})") from None


@dataclass
class Progress:
    """What a checkpoint carries besides the model and the optimiser."""
    epoch: int = 0                   # last finished epoch
    train_seconds: float = 0.0       # training time so far, evaluation excluded
    saved_bytes: int = 0             # CPU: largest activation bytes saved for backward in a step
    history: list = field(default_factory=list)


class Trainer:
    clock: RunClock | None = None  # the progress line's time estimate, set by fit

    def __init__(self, cfg: ImageConfig, data: ImageData, run_dir: Path, show_progress: bool = True):
        self.cfg, self.run_dir, self.show_progress = cfg, Path(run_dir), show_progress
        self.device = resolve_device(cfg.device)
        self.data = data.to(self.device)
        self.ops = resolve_ops(cfg.fused, self.device,
                               warn=lambda line: print(line, file=sys.stderr, flush=True))
        self.model = build_model(cfg, self.data, self.device).configure(
            self.ops, compute_dtype(cfg.precision))
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        self.noise = None
        # CUDA graphs (graphs.py): one captured step per block slice, made on the slice's first
        # batch; use_graphs False runs every step uncaptured (the tests compare both)
        self.graph_warn = once()
        reason = graph_unavailable_reason(self.device, cfg, self.ops.fused)
        announce_uncaptured(self.device, cfg, reason, self.graph_warn)
        self.use_graphs, self.captured, self.graph_pool = reason is None, {}, None
        self.optimizer = make_optimizer(self.model, cfg, capturable=self.use_graphs)
        self.schedule = NoiseSchedule.cosine(cfg.num_blocks, cfg.snr_max, cfg.eta, self.device)
        self.progress = Progress()
        self.run_dir.mkdir(parents=True, exist_ok=True)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "progress": self.progress.__dict__, "config": self.cfg.to_dict()}

    def restore(self, state: dict) -> None:
        load_states(self.run_dir, state, model=self.model, optimizer=self.optimizer,
                    scaler=self.scaler)
        check_restored_state(self.model, self.optimizer, self.run_dir / runs.CHECKPOINT)
        set_hyperparameters(self.optimizer, self.cfg)  # a resume's new values (preflight.py)
        self.progress = Progress(**state["progress"])
        runs.rewrite_metrics(self.run_dir, self.progress.history)

    # -- one epoch ---------------------------------------------------------------------------
    def passes(self) -> list[slice]:
        """The block slices trained in one epoch, each for one pass over the data."""
        if self.cfg.method == "noprop" and self.cfg.block_schedule == "sequential":
            return [slice(t, t + 1) for t in range(self.cfg.num_blocks)]
        return [ALL_BLOCKS]

    def train_epoch(self, epoch: int) -> dict:
        cfg, data, device = self.cfg, self.data, self.device
        torch.manual_seed(epoch_seed(cfg.seed, epoch))
        shuffle = torch.Generator(device=device).manual_seed(epoch_seed(cfg.seed, epoch))
        if self.ops.fused:
            if self.noise is None:
                self.noise = PhiloxNoise(epoch_seed(cfg.seed, epoch), device)
            else:  # in place: a captured step holds these tensors' addresses
                self.noise.reseed(epoch_seed(cfg.seed, epoch))
        n = data.train_x.shape[0]
        per_pass = -(-n // cfg.batch_size)
        passes = self.passes()
        losses = torch.zeros(per_pass * len(passes), device=device)  # [steps] device buffer
        block_sum = torch.zeros(cfg.num_blocks, device=device)
        bar = progress_bar(self.clock, total=losses.numel(), desc=f"epoch {epoch}/{cfg.epochs}",
                           unit="step", disable=not self.show_progress, leave=False, file=sys.stderr)
        self.model.train()
        log_every = 1 if device.type == "cpu" else LOG_EVERY  # a read costs nothing on CPU
        step, read, seen, start = 0, 0, 0, time.perf_counter()
        for blocks in passes:
            for x, y in phase_iter("data", batches(data.train_x, data.train_y, cfg.batch_size,
                                                   generator=shuffle)):
                if x.shape[0] < 2:
                    continue  # BatchNorm needs two examples; a last batch of one is skipped
                if step == 0 and device.type == "cpu":
                    resident = [*self.model.parameters(), *self.model.buffers()]
                    with SavedTensorBytes(exclude=resident) as saved:
                        loss, parts = self.step(x, y, blocks)
                    self.progress.saved_bytes = max(self.progress.saved_bytes, saved.bytes)
                else:
                    loss, parts = self.step(x, y, blocks)
                losses[step] = loss
                if "block_losses" in parts:
                    block_sum[blocks] += parts["block_losses"]
                step, seen = step + 1, seen + x.shape[0]
                if step % log_every == 0:
                    read = self._check_losses(losses, read, step, epoch, bar, seen, start)
        self._check_losses(losses, read, step, epoch, bar, seen, start)
        seconds = time.perf_counter() - start
        bar.close()
        record = {"epoch": epoch, "train_loss": losses[:step].mean().item(),
                  "epoch_seconds": seconds, "images_per_second": seen / seconds}
        if cfg.method == "noprop":
            record["block_losses"] = (block_sum / per_pass).tolist()
        return record

    def step(self, x: torch.Tensor, y: torch.Tensor, blocks: slice):
        if self.use_graphs:
            key = (blocks.start, blocks.stop)
            if key not in self.captured:
                self.graph_pool = self.graph_pool or new_pool(self.device)
                self.captured[key] = CapturedStep(
                    lambda static_x, static_y: train_step(self.model, self.optimizer, self.schedule,
                                                          static_x, static_y, blocks, self.noise),
                    (x, y), self.device, pool=self.graph_pool, warn=self.graph_warn)
            if self.captured[key].fits(x, y):  # not: a last partial batch, run uncaptured
                return self.captured[key](x, y)
        return train_step(self.model, self.optimizer, self.schedule, x, y, blocks, self.noise,
                          self.scaler)

    def _check_losses(self, losses, read, step, epoch, bar, seen, start) -> int:
        """Read losses[read:step] (one host sync); stop on the first non-finite one."""
        chunk = losses[read:step].tolist()
        check_losses(chunk, read, f" of epoch {epoch}", self._last_checkpoint())
        if chunk:
            bar.update(step - read)
            bar.set_postfix(loss=f"{chunk[-1]:.4f}", img_s=f"{seen / (time.perf_counter() - start):.0f}",
                            acc=self._last_accuracy())
        return step

    def _last_checkpoint(self) -> str:
        if self.progress.epoch == 0:
            return "none (no epoch finished)"
        return f"{self.run_dir / runs.CHECKPOINT} (epoch {self.progress.epoch})"

    def _last_accuracy(self) -> str:
        accs = [r["test_accuracy"] for r in self.progress.history if r.get("test_accuracy") is not None]
        return f"{accs[-1]:.4f}" if accs else "-"

    # -- the run -----------------------------------------------------------------------------
    def evaluate(self) -> float:
        with phase("evaluation"):
            return evaluate(self.model, self.schedule, self.data.test_x, self.data.test_y,
                            stochastic=self.cfg.inference == "stochastic", seed=self.cfg.seed)

    def start_clock(self) -> RunClock:
        """The time estimate of the epochs left (progress.py): steps and evaluations to come."""
        cfg, done = self.cfg, self.progress.epoch
        steps_per_epoch = -(-self.data.train_x.shape[0] // cfg.batch_size) * len(self.passes())
        self.clock = RunClock((cfg.epochs - done) * steps_per_epoch,
                              evaluations_between(done, cfg.epochs, cfg.eval_every))
        return self.clock

    def fit(self) -> dict:
        cfg = self.cfg
        reset_peak(self.device)
        clock = self.start_clock()
        for epoch in range(self.progress.epoch + 1, cfg.epochs + 1):
            record = self.train_epoch(epoch)
            clock.pause()  # evaluation and checkpoint: not in the training-time estimate
            check_state(self.model, self.optimizer, f"after epoch {epoch}", self._last_checkpoint())
            record["test_accuracy"] = None
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                start = time.perf_counter()
                record["test_accuracy"] = self.evaluate()
                record["eval_seconds"] = time.perf_counter() - start
            self.progress.epoch = epoch
            self.progress.train_seconds += record["epoch_seconds"]
            self.progress.history.append(record)
            runs.save_checkpoint(self.run_dir, self.checkpoint_state(), cfg)
            runs.append_metrics(self.run_dir, record)
            acc = record["test_accuracy"]
            print(f"epoch {epoch}/{cfg.epochs}  loss {record['train_loss']:.4f}  "
                  f"test acc {'-' if acc is None else f'{acc:.4f}'}  "
                  f"{record['epoch_seconds']:.1f}s  {record['images_per_second']:.0f} img/s",
                  flush=True)
            clock.resume(evaluated=record["test_accuracy"] is not None)
        return self.summary()

    def summary(self) -> dict:
        cfg, p = self.cfg, self.progress
        # the last epoch of a run is always evaluated, so this is the final model's accuracy
        accs = [r["test_accuracy"] for r in p.history if r.get("test_accuracy") is not None]
        peak = cuda_peak(self.device) if self.device.type == "cuda" else p.saved_bytes
        summary = {
            "task": cfg.task, "method": cfg.method, "dataset": cfg.dataset,
            "embedding": cfg.embedding, "num_blocks": cfg.num_blocks,
            "block_schedule": cfg.block_schedule if cfg.method == "noprop" else None,
            "inference": cfg.inference, "epochs": p.epoch,
            "ops": self.ops.name, "precision": cfg.precision,
            "test_accuracy": accs[-1] if accs else None,
            "train_seconds": p.train_seconds,
            "seconds_per_epoch": p.train_seconds / max(p.epoch, 1),
            "peak_memory_bytes": peak, "memory_kind": memory_kind(self.device),
            "checkpoint_bytes": runs.checkpoint_bytes(self.run_dir),
            "device": runs.device_name(self.device), "data_source": self.data.source,
            "run_dir": str(self.run_dir),
        }
        runs.write_summary(self.run_dir, summary)
        return summary

