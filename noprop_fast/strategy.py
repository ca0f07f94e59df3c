"""One process or several, set up once per run: `OneProcess`, or `ManyProcesses` launched by
torchrun, which trains this rank's share of the model and of each batch (the design, the layout
and the collectives are in distributed.py). Rank 0 alone prints and writes.
"""
import dataclasses
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from .distributed import Groups, Layout, communication_volume, describe_volume, reduce_gradients
from .errors import ConfigError, UserError
from .layers import ALL_BLOCKS, BlockBatchNorm
from .schedule import NoiseSchedule
from .tasks.base import apply_gradients

# The differentiable all-reduce (its backward all-reduces the gradient) has no public successor yet;
# its deprecation notice would print on every rank of every run.
warnings.filterwarnings(
    "ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
    category=FutureWarning)

BLOCK_PREFIX = "blocks."  # the state-dict keys of the stacked [T, ...] block tensors


class OneProcess:
    """The whole model on the whole batch."""
    transport = None          # the Eq. 3 chain runs in this process
    data_share = (0, 1)       # (this rank's data index, data ranks)
    prints = True

    def check(self, cfg, data) -> None:
        pass

    def localise(self, run, build):
        return run.model, run.schedule

    def train_step(self, run, x: torch.Tensor, y: torch.Tensor, blocks: slice):
        loss, parts = run.task.loss(run.model, run.schedule, x, y, blocks, run.noise)
        return apply_gradients(loss, run.optimizer, blocks, run.scaler), parts

    def gather(self, state: dict) -> dict:
        return state

    def slice(self, state: dict) -> dict:
        return state

    def summary_fields(self, cfg) -> dict:
        return {}


class ManyProcesses:
    """This rank's block slice and its rows of each global batch, the gradients all-reduced
    before the optimiser steps, the Eq. 3 chain passed from block rank to block rank; checkpoints
    in the single-process format, so that any world size resumes in any other
    (docs/distributed.md)."""

    def __init__(self, layout: Layout, groups: Groups):
        self.layout, self.groups = layout, groups
        self.transport = self  # the Eq. 3 chain's transport: receive, send, broadcast below
        self.span, self.num_blocks = layout.span, layout.num_blocks
        self.data_share = (layout.data_index, layout.data_ranks)
        self.prints = layout.rank == 0

    def check(self, cfg, data) -> None:
        d = self.layout.data_ranks
        if cfg.task == "lm" and cfg.batch_size % d:
            raise ConfigError(f"batch_size {cfg.batch_size} does not split into {d} equal "
                              "shares (one per data rank)")
        last = data.train_x.shape[0] % cfg.batch_size if cfg.task == "image" else 0
        if 2 <= last < d:
            raise ConfigError(f"the last batch of each epoch has {last} rows, fewer than the "
                              f"{d} data ranks: choose another batch size")

    def localise(self, run, build):
        """This rank's slice of run's single-process model and schedule (the same numbers);
        build(cfg): the run's configured model for cfg."""
        lay, full = self.layout, run.model
        devices = [run.device] if run.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # building reseeds; keep the run's streams
            local = build(dataclasses.replace(run.cfg, num_blocks=lay.local_blocks))
        local.load_state_dict(slice_state(full.state_dict(), {"state": {}, "param_groups": []},
                                          lay.span, lay.num_blocks)[0])
        for p, q in zip(full.parameters(), local.parameters()):
            q.requires_grad_(p.requires_grad)
        if lay.data_ranks > 1:  # every BlockBatchNorm over the data ranks (same state)
            for module in local.modules():
                if type(module) is BlockBatchNorm:
                    module.__class__, module.group = SyncBlockBatchNorm, self.groups.data
        print(describe_volume(communication_volume(local, lay), lay), flush=True)
        return local, local_schedule(run.schedule, lay.span)

    def train_step(self, run, x: torch.Tensor, y: torch.Tensor, blocks: slice):
        """This rank's share of the step's loss, its backward, the all-reduces, the optimiser
        step. Returns the step's loss and per-block losses over all ranks."""
        lay = self.layout
        if lay.block_ranks > 1 and blocks != ALL_BLOCKS:
            raise ValueError("a rank with a block slice trains all of its blocks on every step")
        x, y, rows, share = self._rows(run.cfg, x, y)
        noise = None if run.model.method != "noprop" else ShardedNoise(
            run.noise, lay.num_blocks if lay.block_ranks > 1 else None, lay.span, *rows,
            run.model.embedding.weight.shape[1])
        loss, parts = run.task.loss(run.model, run.schedule, x, y, blocks, noise,
                                    shared_terms=lay.holds_last_block)
        figures = torch.zeros(1 + lay.num_blocks, device=loss.device)  # [loss, T block losses]
        figures[0] = loss.detach() * share
        if "block_losses" in parts:  # at their global block positions
            index = torch.arange(lay.num_blocks, device=loss.device)[
                slice(*lay.span) if lay.block_ranks > 1 else blocks]
            figures[1 + index] += parts["block_losses"].float() * share
        apply_gradients(loss * share, run.optimizer, blocks,
                        reduce=lambda: reduce_gradients(run.model, lay, self.groups, [figures]))
        return figures[0], ({"block_losses": figures[1:][blocks]} if "block_losses" in parts
                            else {})

    def _rows(self, cfg, x: torch.Tensor, y: torch.Tensor):
        """(x, y, the noise's rows, this rank's share of the batch). Images: a contiguous chunk
        of the global batch, as torch.tensor_split; token windows: x, y [b, L] are this rank's
        already, its j-th window is window d + D j of the single-process batch."""
        lay, d = self.layout, self.layout.data_index
        if cfg.task == "lm":
            b, length = x.shape
            windows = torch.arange(b, device=x.device) * lay.data_ranks + d
            rows = (windows[:, None] * length + torch.arange(length, device=x.device)).reshape(-1)
            return x, y, (cfg.batch_size * length, rows, b * length, d * b * length), \
                1 / lay.data_ranks
        n = x.shape[0]
        base, extra = divmod(n, lay.data_ranks)  # the first `extra` ranks get one more
        first, count = d * base + min(d, extra), base + (d < extra)
        rows = slice(first, first + count)
        return x[rows], y[rows], (n, rows, count, first), count / n

    # checkpoints in the single-process format; the batch stream's position in single-process
    # windows (rank d's position p is window D p of the order)
    def gather(self, state: dict) -> dict:
        """`state` with the model and optimiser of every block rank (rank 0; a collective)."""
        lay = self.layout
        local = (_to_cpu(state["model"]), _to_cpu(state["optimizer"]))
        if lay.block_ranks > 1 and lay.data_index == 0:
            pieces = [None] * lay.block_ranks if lay.rank == 0 else None
            dist.gather_object(local, pieces, dst=0, group=self.groups.first_blocks)
            if lay.rank == 0:
                local = merge_states(pieces)
        state = {**state, "model": local[0], "optimizer": local[1]}
        if "batches" in state:
            state["batches"] = {**state["batches"], "world_size": 1,
                                "position": state["batches"]["position"] * lay.data_ranks}
        return state

    def slice(self, state: dict) -> dict:
        lay, d = self.layout, self.layout.data_ranks
        if lay.block_ranks > 1 and "model" in state and "optimizer" in state:
            model, optim = slice_state(state["model"], state["optimizer"], lay.span,
                                       lay.num_blocks)
            state = {**state, "model": model, "optimizer": optim}
        if "batches" in state:
            batches = dict(state["batches"])
            if int(batches["world_size"]) != 1 or int(batches["position"]) % d:
                raise UserError(f"checkpoint: batch stream position {batches['position']} (world "
                                f"size {batches['world_size']}) does not split into {d} data "
                                "ranks")
            batches.update(position=int(batches["position"]) // d, world_size=d)
            state = {**state, "batches": batches}
        return state

    def summary_fields(self, cfg) -> dict:
        return {"parallel": cfg.parallel, "block_ranks": self.layout.block_ranks,
                "data_ranks": self.layout.data_ranks}

    # the Eq. 3 chain's latent z [N, d] along the block ranks (noprop.chain_from_features)
    def receive(self, z: torch.Tensor) -> None:
        lay = self.layout
        if lay.block_index > 0:
            dist.recv(z, src=lay.rank_of(lay.block_index - 1, lay.data_index))

    def send(self, z: torch.Tensor) -> None:
        lay = self.layout
        if not lay.holds_last_block:
            dist.send(z.contiguous(), dst=lay.rank_of(lay.block_index + 1, lay.data_index))

    def broadcast(self, z: torch.Tensor) -> torch.Tensor:
        """z_T from the last block rank to its block peers."""
        lay = self.layout
        if lay.block_ranks > 1:
            dist.broadcast(z, src=lay.rank_of(lay.block_ranks - 1, lay.data_index),
                           group=self.groups.blocks)
        return z


# -- the maths on a rank's share ---------------------------------------------------------------
def local_schedule(schedule: NoiseSchedule, span: tuple[int, int]) -> NoiseSchedule:
    """The global schedule's numbers for blocks start+1..stop: per-block tensors sliced, alpha_bar
    kept whole (CE reads abar_T, the KL abar_0, both global)."""
    start, stop = span
    per_block = {k: v[start:stop] for k, v in schedule.__dict__.items() if k != "alpha_bar"}
    return NoiseSchedule(alpha_bar=schedule.alpha_bar, **per_block)


class ShardedNoise:
    """What `noprop.noisy_latents` draws from: the single-process noise, cut to this rank.
    noprop_loss draws twice per step: the blocks' latents [B, N, d], then z_T's [1, N, d]. The
    global shapes are [T, N_global, d] (B = T when the blocks are split, else B as asked) and
    [1, N_global, d]; this rank keeps blocks `span` and rows `rows` (a slice or an index tensor).
    `base`: None (torch.randn, the global generator) or the fused path's PhiloxNoise.
    `row_start`: where this rank's rows would start if they were contiguous (fused path)."""

    def __init__(self, base, num_blocks: int | None, span, global_rows: int, rows,
                 local_rows: int, row_start: int, dim: int):
        self.base, self.num_blocks, self.span, self.dim = base, num_blocks, span, dim
        self.global_rows, self.rows = global_rows, rows
        self.local_rows, self.row_start = local_rows, row_start
        self.calls = 0

    def _global_blocks(self, asked: int) -> tuple[int, int]:
        """(global block count, first block of this rank) of this call: latents or z_T's."""
        latents = self.calls % 2 == 0
        self.calls += 1
        if latents and self.num_blocks is not None:
            return self.num_blocks, self.span[0]
        return asked, 0

    def normals(self, shape, device) -> torch.Tensor:
        total, first = self._global_blocks(shape[0])
        full = (total, self.global_rows, shape[2])
        eps = torch.randn(full, device=device) if self.base is None else \
            self.base.normals(full, device)
        return eps[first:first + shape[0]][:, self.rows]

    def advance(self, count: int) -> torch.Tensor:
        """Fused path: move the Philox stream by the global count; return this rank's offset."""
        blocks = count // (self.local_rows * self.dim)
        total, first = self._global_blocks(blocks)
        start = self.base.advance(total * self.global_rows * self.dim)
        return start + (first * self.global_rows + self.row_start * blocks) * self.dim

    @property
    def seed(self):
        return self.base.seed


class SyncBlockBatchNorm(BlockBatchNorm):
    """BlockBatchNorm whose training statistics are those of the whole batch, all data ranks
    together (two differentiable all-reduces: the sum with the row count, then the centred sum
    of squares). Evaluation uses the running statistics, as BlockBatchNorm does."""

    group = None

    def forward(self, x: torch.Tensor, blocks=slice(None)) -> torch.Tensor:
        if not self.training:
            return super().forward(x, blocks)
        nb, n, c = x.shape
        flat = x.transpose(0, 1).reshape(n, nb * c).float()               # [n, B * C]
        count = torch.full((1,), float(n), device=x.device)
        summed = dist_fn.all_reduce(torch.cat([flat.sum(0), count]), group=self.group)
        total = summed[-1].detach()
        mean = summed[:-1] / total
        centred = flat - mean
        var = dist_fn.all_reduce(centred.square().sum(0), group=self.group) / total
        weight = self.weight[blocks].reshape(-1)
        bias = self.bias[blocks].reshape(-1)
        out = centred * torch.rsqrt(var + self.eps) * weight + bias
        with torch.no_grad():  # the running statistics use the unbiased variance, as batch_norm
            m = self.momentum
            self.running_mean[blocks].mul_(1 - m).add_(m * mean.detach().view(nb, c))
            unbiased = var.detach() * total / (total - 1).clamp_min(1)
            self.running_var[blocks].mul_(1 - m).add_(m * unbiased.view(nb, c))
        return out.to(x.dtype).view(n, nb, c).transpose(0, 1)


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
