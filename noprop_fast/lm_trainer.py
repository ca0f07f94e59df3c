"""The language task's run: build the model, train for `max_steps`, evaluate, checkpoint, sample.

A run is counted in optimiser steps (a language model is trained on a token budget, not epochs).
Every `eval_every` steps, and at the end: the validation loss on the first `eval_tokens` tokens of
the val split (the same tokens every time, so the curve compares like with like), a line of
progress, a checkpoint and a metrics record.

Reproducibility: the weights from `seed`; the batch stream (`TokenBatches`), the global generator
(reference-path noise) and the fused path's Philox offset are all in the checkpoint, so a run
resumed from step k replays steps k+1.. as the uninterrupted run does (a test checks).

Host syncs: a step's loss goes into a device buffer read every `LOG_EVERY` steps on CUDA (every
step on a CPU, where a read costs nothing); the validation loss is read once per evaluation, and
before it one read says whether every parameter and optimiser-state tensor is finite (finite.py).

CUDA graphs (`--cuda-graphs`, graphs.py): with --fused on CUDA the step after the batch fetch is
captured once and replayed; elsewhere one line says why not and the steps run uncaptured.
"""
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import runs
from .config import LMConfig
from .data.shards import TokenBatches, TokenData, unigram_entropy, val_batches
from .errors import UserError
from .finite import check_losses, check_restored_state, check_state
from .ops import PhiloxNoise, compute_dtype, resolve_ops
from .graphs import CapturedStep, announce_uncaptured, graph_unavailable_reason, once
from .language import lm_loss, sample, validation_loss
from .memory import cuda_peak, memory_kind, reset_peak
from .models.lm import GPT, LanguageModel
from .nvtx_ranges import phase
from .optim import make_optimizer, set_hyperparameters
from .progress import RunClock, evaluations_between, progress_bar
from .schedule import NoiseSchedule
from .trainer import LOG_EVERY, apply_gradients, load_states, resolve_device


def build_lm(cfg: LMConfig, vocab_size: int, device: torch.device):
    torch.manual_seed(cfg.seed)
    if cfg.method == "backprop":
        model = GPT(cfg.num_blocks * cfg.layers_per_block, vocab_size, cfg.seq_len, cfg.width, cfg.heads)
    else:
        model = LanguageModel(cfg.num_blocks, vocab_size, cfg.seq_len, cfg.width, cfg.heads,
                              cfg.layers_per_block, cfg.embed_dim,
                              "onehot" if cfg.embed_init == "onehot" else "learned")
    return model.to(device)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class LMProgress:
    """What a checkpoint carries besides the model, the optimiser and the random streams."""
    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    history: list = field(default_factory=list)


class LMTrainer:
    def __init__(self, cfg: LMConfig, data: TokenData, run_dir: Path, show_progress: bool = True,
                 pretrain: bool = True):
        """pretrain: run the masked-LM phase of embed_init mlm (not when a checkpoint follows)."""
        self.cfg, self.data, self.run_dir, self.show_progress = cfg, data, Path(run_dir), show_progress
        self.device = resolve_device(cfg.device)
        if cfg.method == "backprop" and cfg.embed_init != "learned":
            raise UserError("embed_init: the GPT baseline learns its own embeddings; use learned")
        self.ops = resolve_ops(cfg.fused, self.device,
                               warn=lambda line: print(line, file=sys.stderr, flush=True))
        self.model = build_lm(cfg, data.vocab_size, self.device).configure(
            self.ops, compute_dtype(cfg.precision))
        if cfg.embed_init == "mlm":
            if pretrain:
                self._pretrain_embeddings()
            self.model.embedding.weight.requires_grad_(False)  # frozen: the targets stay put
        # CUDA graphs (graphs.py): the step after the batch fetch is captured on its first batch;
        # use_graphs False runs every step uncaptured (the tests compare both)
        self.graph_warn = once()
        reason = graph_unavailable_reason(self.device, cfg, self.ops.fused)
        announce_uncaptured(self.device, cfg, reason, self.graph_warn)
        self.use_graphs, self.captured = reason is None, None
        self.optimizer = make_optimizer(self.model, cfg, capturable=self.use_graphs)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        self.schedule = NoiseSchedule.cosine(cfg.num_blocks, cfg.snr_max, cfg.eta, self.device)
        self.noise = PhiloxNoise(cfg.seed, self.device) if self.ops.fused else None
        self.batches = TokenBatches(data.train, cfg.batch_size, cfg.seq_len, self.device, seed=cfg.seed)
        self.progress = LMProgress()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed + 1)  # the reference path's training noise

    def _pretrain_embeddings(self) -> None:
        from .mlm import pretrain_embeddings
        cfg = self.cfg
        batches = TokenBatches(self.data.train, cfg.batch_size, cfg.seq_len, self.device,
                               seed=cfg.seed + 2)
        weight = pretrain_embeddings(batches, self.data.vocab_size, cfg.embed_dim, cfg.seq_len,
                                     cfg.mlm_steps,
                                     self.device, seed=cfg.seed, show_progress=self.show_progress)
        with torch.no_grad():
            self.model.embedding.weight.copy_(weight)
        self.model.matched_filter_classifier()

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "batches": self.batches.state_dict(), "rng": rng,
                "noise_offset": None if self.noise is None else self.noise.offset.cpu(),
                "progress": self.progress.__dict__, "config": self.cfg.to_dict()}

    def restore(self, state: dict) -> None:
        load_states(self.run_dir, state, model=self.model, optimizer=self.optimizer,
                    scaler=self.scaler, batches=self.batches)
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        if self.noise is not None and state.get("noise_offset") is not None:
            self.noise.offset.copy_(state["noise_offset"].to(self.device))
        check_restored_state(self.model, self.optimizer, self.run_dir / runs.CHECKPOINT)
        set_hyperparameters(self.optimizer, self.cfg)  # a resume's new values (preflight.py)
        self.progress = LMProgress(**state["progress"])
        runs.rewrite_metrics(self.run_dir, self.progress.history)

    # -- training ----------------------------------------------------------------------------
    def step(self) -> torch.Tensor:
        with phase("data"):
            x, y = self.batches.next()
        if self.use_graphs:
            if self.captured is None:
                self.captured = CapturedStep(self.train_on, (x, y), self.device,
                                             warn=self.graph_warn)
            if self.captured.fits(x, y):
                return self.captured(x, y)
        return self.train_on(x, y)

    def train_on(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimiser step on the batch x, y [N, L]; returns the detached loss (a device
        tensor). The part of a step that a CUDA graph captures."""
        loss, _ = lm_loss(self.model, self.schedule, x, y, self.noise)
        return apply_gradients(loss, self.optimizer, scaler=self.scaler)

    def val_batches(self):
        cfg = self.cfg
        return val_batches(self.data.val, cfg.batch_size, cfg.seq_len, self.device,
                           max_tokens=cfg.eval_tokens)

    def evaluate(self) -> dict:
        with phase("evaluation"):
            return validation_loss(self.model, self.schedule, self.val_batches(),
                                   stochastic=self.cfg.inference == "stochastic",
                                   seed=self.cfg.seed, chains=self.cfg.eval_chains)

    def unigram_entropy(self) -> float:
        """Entropy of the evaluated val tokens' own unigram distribution: the loss of a model that
        knew the exact token frequencies of these tokens and nothing else."""
        targets = torch.cat([y.reshape(-1).cpu() for _, y in self.val_batches()])
        return unigram_entropy(targets.numpy(), self.data.vocab_size)

    def fit(self) -> dict:
        cfg, p = self.cfg, self.progress
        reset_peak(self.device)
        tokens_per_step = cfg.batch_size * cfg.seq_len
        log_every = 1 if self.device.type == "cpu" else LOG_EVERY
        clock = RunClock(cfg.max_steps - p.step,
                         evaluations_between(p.step, cfg.max_steps, cfg.eval_every))
        bar = progress_bar(clock, total=cfg.max_steps, initial=p.step, desc="train", unit="step",
                           disable=not self.show_progress, leave=False, file=sys.stderr)
        self.model.train()
        losses = torch.zeros(cfg.eval_every, device=self.device)  # [steps since the last read]
        pending, window_start, window_loss = 0, time.perf_counter(), []
        while p.step < cfg.max_steps:
            losses[pending] = self.step()
            pending += 1
            p.step += 1
            p.tokens_seen += tokens_per_step
            at_eval = p.step % cfg.eval_every == 0 or p.step == cfg.max_steps
            if pending % log_every == 0 or at_eval:
                window_loss += self._read_losses(losses[:pending], p.step - pending, bar)
                pending = 0
            if at_eval:
                clock.pause()  # evaluation and checkpoint: not in the training-time estimate
                check_state(self.model, self.optimizer, f"at step {p.step}", self._last_checkpoint())
                now = time.perf_counter()
                p.train_seconds += now - window_start
                record = self._eval_record(window_loss, len(window_loss) * tokens_per_step,
                                           now - window_start)
                p.history.append(record)
                runs.save_checkpoint(self.run_dir, self.checkpoint_state(), cfg)
                runs.append_metrics(self.run_dir, record)
                print(f"step {p.step}/{cfg.max_steps}  train loss {record['train_loss']:.4f}  "
                      f"val loss {record['val_loss']:.4f} (ppl {record['val_perplexity']:.2f})  "
                      f"{record['tokens_per_second']:.0f} tok/s", flush=True)
                window_loss, window_start = [], time.perf_counter()
                clock.resume()
        bar.close()
        return self.summary()

    def _read_losses(self, losses: torch.Tensor, first_step: int, bar) -> list[float]:
        values = losses.tolist()  # host sync
        check_losses(values, first_step, "", self._last_checkpoint())
        bar.update(len(values))
        if values:
            bar.set_postfix(loss=f"{values[-1]:.4f}")
        return values

    def _last_checkpoint(self) -> str:
        if not self.progress.history:
            return "none (no evaluation reached)"
        return f"{self.run_dir / runs.CHECKPOINT} (step {self.progress.history[-1]['step']})"

    def _eval_record(self, window_loss: list[float], tokens: int, seconds: float) -> dict:
        start = time.perf_counter()
        val = self.evaluate()
        return {"step": self.progress.step, "tokens_seen": self.progress.tokens_seen,
                "train_loss": sum(window_loss) / max(len(window_loss), 1), **val,
                "val_perplexity": math.exp(min(val["val_loss"], 50.0)),
                "tokens_per_second": tokens / max(seconds, 1e-9),
                "eval_seconds": time.perf_counter() - start}

    def samples(self, tokenizer, prompt: str | None = None) -> list[str]:
        cfg = self.cfg
        prompt = cfg.sample if prompt is None else prompt
        ids = tokenizer.encode(prompt) if prompt else []
        ids = [tokenizer.eot] + ids  # a document starts with EOT, as in the training shards
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        return [prompt + tokenizer.decode(
                    sample(self.model, self.schedule, ids, cfg.sample_tokens, cfg.temperature,
                           cfg.top_k, cfg.inference == "stochastic", generator))
                for _ in range(cfg.num_samples)]

    def summary(self) -> dict:
        cfg, p = self.cfg, self.progress
        last = p.history[-1] if p.history else {}
        summary = {
            "task": cfg.task, "method": cfg.method, "data_source": self.data.source,
            "tokenizer": self.data.tokenizer, "vocab_size": self.data.vocab_size,
            "num_blocks": cfg.num_blocks, "layers_per_block": cfg.layers_per_block,
            "width": cfg.width, "embed_init": cfg.embed_init if cfg.method == "noprop" else None,
            "parameters": parameter_count(self.model), "inference": cfg.inference,
            "steps": p.step, "tokens_seen": p.tokens_seen,
            "val_loss": last.get("val_loss"), "val_perplexity": last.get("val_perplexity"),
            "val_loss_one_chain": last.get("val_loss_one_chain"),
            "eval_chains": cfg.eval_chains if cfg.method == "noprop" else None,
            "val_tokens": last.get("val_tokens"), "unigram_entropy": self.unigram_entropy(),
            "train_seconds": p.train_seconds,
            "tokens_per_second": p.tokens_seen / p.train_seconds if p.train_seconds else None,
            "ops": self.ops.name, "precision": cfg.precision,
            # the CUDA allocator's peak; a CPU run has no such figure (null)
            "peak_memory_bytes": cuda_peak(self.device) if self.device.type == "cuda" else None,
            "memory_kind": memory_kind(self.device) if self.device.type == "cuda" else None,
            "device": runs.device_name(self.device), "run_dir": str(self.run_dir),
            "checkpoint_bytes": runs.checkpoint_bytes(self.run_dir),
        }
        runs.write_summary(self.run_dir, summary)
        return summary
