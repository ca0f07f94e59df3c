"""The image and language trainers of a multi-process run (the design is in distributed.py).

`ParallelTrainer` and `ParallelLMTrainer` are `Trainer` and `LMTrainer` with:
  - the model of this rank's block slice (loaded from the single-process initialisation), its
    slice of the schedule, an optimiser over its own parameters only, synchronous BatchNorm over
    the data ranks (image task);
  - a step on this rank's rows of the global minibatch, gradients all-reduced before the
    optimiser steps (`distributed.reduce_gradients`), the logged loss that of the whole step;
  - evaluation through the Eq. 3 chain across the block ranks;
  - checkpoints in the single-process format: the block slices of the model and of the optimiser
    state gathered to rank 0, the batch stream's position in single-process windows. A
    checkpoint of any world size resumes in any other (or in one process, `--parallel none`).
Rank 0 alone prints, shows progress and writes (runs.set_writer).
"""
import dataclasses
import functools

import torch

from . import runs
from .data.shards import TokenBatches
from .distributed import Groups, Layout, communication_volume, describe_volume, reduce_gradients
from .errors import ConfigError, UserError
from .ops import compute_dtype
from .language import lm_loss, sample, validation_loss
from .layers import ALL_BLOCKS
from .lm_trainer import LMTrainer, build_lm, parameter_count
from .methods import backprop_loss, noprop_loss, predict
from .optim import make_optimizer
from .sharded import ShardedNoise, chain_across_ranks, local_schedule, sync_batch_norm
from .trainer import Trainer, build_model

BLOCK_PREFIX = "blocks."  # the state-dict keys of the stacked [T, ...] block tensors


# -- checkpoints: single-process format <-> a rank's slice --------------------------------------
def _block_ids(optimizer_state: dict) -> set:
    return {i for g in optimizer_state["param_groups"] if g.get("per_block") for i in g["params"]}


def slice_state(model_state: dict, optimizer_state: dict, span: tuple[int, int], num_blocks: int):
    """A single-process (model, optimiser) state cut to blocks span = (start, stop)."""
    start, stop = span
    for key, value in model_state.items():
        if key.startswith(BLOCK_PREFIX) and value.shape[0] != num_blocks:
            raise UserError(f"checkpoint: {key} holds {value.shape[0]} blocks, this run has "
                            f"{num_blocks}")
    model = {k: v[start:stop] if k.startswith(BLOCK_PREFIX) else v for k, v in model_state.items()}
    ids = _block_ids(optimizer_state)
    state = {i: {k: v[start:stop] if i in ids and torch.is_tensor(v) and v.dim() else v
                 for k, v in s.items()}
             for i, s in optimizer_state["state"].items()}
    return model, {"state": state, "param_groups": optimizer_state["param_groups"]}


def merge_states(pieces: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """The block ranks' (model, optimiser) states, in block order -> the single-process ones."""
    models, optims = [p[0] for p in pieces], [p[1] for p in pieces]
    model = {k: torch.cat([m[k] for m in models]) if k.startswith(BLOCK_PREFIX) else v
             for k, v in models[0].items()}
    ids = _block_ids(optims[0])
    state = {i: {k: torch.cat([o["state"][i][k] for o in optims])
                 if i in ids and torch.is_tensor(v) and v.dim() else v for k, v in s.items()}
             for i, s in optims[0]["state"].items()}
    return model, {"state": state, "param_groups": optims[0]["param_groups"]}


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


class _Parallel:
    """What both parallel trainers add; mixed in before Trainer / LMTrainer."""
    layout: Layout
    groups: Groups

    def _localise(self, layout: Layout, groups: Groups, build) -> None:
        """Swap the single-process model for this rank's slice of it (same numbers)."""
        self.layout, self.groups = layout, groups
        full, cfg = self.model, self.cfg
        self.total_parameters = parameter_count(full)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # building reseeds; keep the run's streams
            local = build(dataclasses.replace(cfg, num_blocks=layout.local_blocks))
        if layout.block_ranks > 1:
            local.load_state_dict(slice_state(full.state_dict(), {"state": {}, "param_groups": []},
                                              layout.span, layout.num_blocks)[0])
        else:
            local.load_state_dict(full.state_dict())
        for p, q in zip(full.parameters(), local.parameters()):
            q.requires_grad_(p.requires_grad)
        local = local.configure(self.ops, compute_dtype(cfg.precision))
        if layout.data_ranks > 1:
            sync_batch_norm(local, groups.data)
        self.model = local
        self.optimizer = make_optimizer(local, cfg)
        self.schedule = local_schedule(self.schedule, layout.span)
        self.use_graphs = False  # collectives in every step: never captured
        self.chain = functools.partial(chain_across_ranks, layout, groups)
        print(describe_volume(communication_volume(local, layout), layout), flush=True)

    def _noise(self, global_rows: int, rows, local_rows: int, row_start: int) -> ShardedNoise:
        split = self.layout.block_ranks > 1
        return ShardedNoise(self.noise, self.layout.num_blocks if split else None,
                            self.layout.span, global_rows, rows, local_rows, row_start,
                            self.model.embedding.weight.shape[1] if hasattr(self.model, "embedding")
                            else 0)

    def _update(self, loss: torch.Tensor, share: float, blocks: slice, block_losses):
        """Backward of this rank's share of the loss, the all-reduces, the optimiser step.
        Returns the step's loss and per-block losses [T] over all ranks."""
        lay = self.layout
        figures = torch.zeros(1 + lay.num_blocks, device=loss.device)  # [loss, T block losses]
        figures[0] = loss.detach() * share
        if block_losses is not None:  # at their global block positions
            index = torch.arange(lay.num_blocks, device=loss.device)[
                slice(*lay.span) if lay.block_ranks > 1 else blocks]
            figures[1 + index] += block_losses.float() * share
        self.optimizer.zero_grad(set_to_none=True)
        (loss * share).backward()
        reduce_gradients(self.model, lay, self.groups, [figures])
        self.optimizer.step(blocks)
        return figures[0], figures[1:]

    def _gather_checkpoint(self, state: dict) -> dict:
        """`state` with the model and optimiser of every block rank (rank 0; a collective)."""
        lay = self.layout
        local = (_to_cpu(self.model.state_dict()), _to_cpu(self.optimizer.state_dict()))
        if lay.block_ranks > 1 and lay.data_index == 0:
            pieces = [None] * lay.block_ranks if lay.rank == 0 else None
            torch.distributed.gather_object(local, pieces, dst=0, group=self.groups.first_blocks)
            if lay.rank == 0:
                local = merge_states(pieces)
        return {**state, "model": local[0], "optimizer": local[1]}

    def _slice_checkpoint(self, state: dict) -> dict:
        lay = self.layout
        if lay.block_ranks == 1 or "model" not in state or "optimizer" not in state:
            return state
        model, optim = slice_state(state["model"], state["optimizer"], lay.span, lay.num_blocks)
        return {**state, "model": model, "optimizer": optim}


class ParallelTrainer(_Parallel, Trainer):
    def __init__(self, cfg, data, run_dir, show_progress: bool, layout: Layout, groups: Groups):
        super().__init__(cfg, data, run_dir, show_progress=show_progress and layout.rank == 0)
        last = data.train_x.shape[0] % cfg.batch_size
        if 2 <= last < layout.data_ranks:
            raise ConfigError(f"the last batch of each epoch has {last} rows, fewer than the "
                              f"{layout.data_ranks} data ranks: choose another batch size")
        self._localise(layout, groups, lambda c: build_model(c, self.data, self.device))

    def step(self, x: torch.Tensor, y: torch.Tensor, blocks: slice):
        lay = self.layout
        if lay.block_ranks > 1 and blocks != ALL_BLOCKS:
            raise ValueError("a rank with a block slice trains all of its blocks on every step")
        n, d = x.shape[0], lay.data_index
        base, extra = divmod(n, lay.data_ranks)  # as torch.tensor_split: the first `extra` get one more
        first, count = d * base + min(d, extra), base + (d < extra)
        rows = slice(first, first + count)
        if self.model.method == "noprop":
            noise = self._noise(n, rows, count, first)
            loss, parts = noprop_loss(self.model, self.schedule, x[rows], y[rows], blocks, noise,
                                      shared_terms=lay.holds_last_block)
        else:
            loss, parts = backprop_loss(self.model, x[rows], y[rows])
        total, per_block = self._update(loss, count / n, blocks, parts.get("block_losses"))
        return total, ({"block_losses": per_block[blocks]} if "block_losses" in parts else {})

    def evaluate(self) -> float:
        """Test accuracy as `methods.evaluate` computes it (batches of 1000, noise from `seed`),
        the chain across the block ranks."""
        model, x_all, y_all = self.model, self.data.test_x, self.data.test_y
        stochastic = self.cfg.inference == "stochastic"
        generator = torch.Generator(device=x_all.device).manual_seed(self.cfg.seed)
        model.eval()
        predictions = []
        with torch.no_grad():
            for i in range(0, x_all.shape[0], 1000):
                x = x_all[i:i + 1000]
                if model.method == "noprop":
                    z = self.chain(model, self.schedule, model.blocks.features(x), stochastic,
                                   generator)
                    logits = model.classifier(z)
                else:
                    logits = predict(model, self.schedule, x, stochastic, generator)
                predictions.append(logits.argmax(-1))
        model.train()
        return (torch.cat(predictions) == y_all).float().mean().item()

    def checkpoint_state(self) -> dict:
        return self._gather_checkpoint(super().checkpoint_state())

    def restore(self, state: dict) -> None:
        super().restore(self._slice_checkpoint(state))

    def summary(self) -> dict:
        summary = super().summary()
        summary.update(parallel=self.cfg.parallel, block_ranks=self.layout.block_ranks,
                       data_ranks=self.layout.data_ranks)
        runs.write_summary(self.run_dir, summary)
        return summary


class ParallelLMTrainer(_Parallel, LMTrainer):
    def __init__(self, cfg, data, run_dir, show_progress: bool, layout: Layout, groups: Groups,
                 pretrain: bool = True):
        if cfg.batch_size % layout.data_ranks:
            raise ConfigError(f"batch_size {cfg.batch_size} does not split into "
                              f"{layout.data_ranks} equal shares (one per data rank)")
        super().__init__(cfg, data, run_dir, show_progress=show_progress and layout.rank == 0,
                         pretrain=pretrain)
        self._localise(layout, groups, lambda c: build_lm(c, data.vocab_size, self.device))
        self.local_batch = cfg.batch_size // layout.data_ranks
        self.batches = TokenBatches(data.train, self.local_batch, cfg.seq_len, self.device,
                                    seed=cfg.seed, rank=layout.data_index,
                                    world_size=layout.data_ranks)

    def step(self) -> torch.Tensor:
        lay, length = self.layout, self.cfg.seq_len
        x, y = self.batches.next()                            # this rank's windows [b, L]
        # rank d's j-th window is window d + D j of the single-process batch: its rows
        windows = torch.arange(self.local_batch, device=x.device) * lay.data_ranks + lay.data_index
        rows = (windows[:, None] * length + torch.arange(length, device=x.device)).reshape(-1)
        if self.model.method == "noprop":
            noise = self._noise(self.cfg.batch_size * length, rows, rows.numel(),
                                lay.data_index * rows.numel())
            loss, parts = noprop_loss(self.model, self.schedule, x, y.reshape(-1), ALL_BLOCKS,
                                      noise, shared_terms=lay.holds_last_block)
        else:
            loss, parts = lm_loss(self.model, self.schedule, x, y)
        total, _ = self._update(loss, 1 / lay.data_ranks, ALL_BLOCKS, parts.get("block_losses"))
        return total

    def evaluate(self) -> dict:
        return validation_loss(self.model, self.schedule, self.val_batches(),
                               stochastic=self.cfg.inference == "stochastic", seed=self.cfg.seed,
                               chains=self.cfg.eval_chains, chain=self.chain)

    def samples(self, tokenizer, prompt: str | None = None) -> list[str]:
        cfg = self.cfg
        prompt = cfg.sample if prompt is None else prompt
        ids = [tokenizer.eot] + (tokenizer.encode(prompt) if prompt else [])
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        return [prompt + tokenizer.decode(
                    sample(self.model, self.schedule, ids, cfg.sample_tokens, cfg.temperature,
                           cfg.top_k, cfg.inference == "stochastic", generator, chain=self.chain))
                for _ in range(cfg.num_samples)]

    # the batch stream in single-process windows: rank d's position p is window D p of the order
    def checkpoint_state(self) -> dict:
        state = self._gather_checkpoint(super().checkpoint_state())
        d = self.layout.data_ranks
        state["batches"] = {**state["batches"], "position": state["batches"]["position"] * d,
                            "world_size": 1}
        return state

    def restore(self, state: dict) -> None:
        state, d = self._slice_checkpoint(state), self.layout.data_ranks
        batches = dict(state["batches"])
        if int(batches["world_size"]) != 1 or int(batches["position"]) % d:
            raise UserError(f"checkpoint: batch stream position {batches['position']} (world "
                            f"size {batches['world_size']}) does not split into {d} data ranks")
        batches.update(position=int(batches["position"]) // d, world_size=d)
        super().restore({**state, "batches": batches})

    def summary(self) -> dict:
        summary = super().summary()
        summary.update(parameters=self.total_parameters, parallel=self.cfg.parallel,
                       block_ranks=self.layout.block_ranks, data_ranks=self.layout.data_ranks)
        runs.write_summary(self.run_dir, summary)
        return summary
