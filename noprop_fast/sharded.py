"""NoProp's maths on one rank's share of a multi-process run (the design is in distributed.py):
the schedule of a block slice, the single-process noise cut to a rank's blocks and rows,
BatchNorm with the statistics of all data ranks, and the Eq. 3 chain passed from rank to rank."""
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from .distributed import Groups, Layout
from .layers import BlockBatchNorm
from .schedule import NoiseSchedule, denoise_step

# The differentiable all-reduce (its backward all-reduces the gradient) has no public successor yet;
# its deprecation notice would print on every rank of every run.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated",
                        category=FutureWarning)


# -- the maths on a slice of the blocks ----------------------------------------------------------
def local_schedule(schedule: NoiseSchedule, span: tuple[int, int]) -> NoiseSchedule:
    """The global schedule's numbers for blocks start+1..stop: per-block tensors sliced, alpha_bar
    kept whole (CE reads abar_T, the KL abar_0, both global)."""
    start, stop = span
    per_block = {k: v[start:stop] for k, v in schedule.__dict__.items() if k != "alpha_bar"}
    return NoiseSchedule(alpha_bar=schedule.alpha_bar, **per_block)


class ShardedNoise:
    """What `methods.noisy_latents` draws from: the single-process noise, cut to this rank.

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


# -- BatchNorm over the data ranks -------------------------------------------------------------
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


def sync_batch_norm(model, group) -> None:
    """Make every BlockBatchNorm of `model` a SyncBlockBatchNorm over `group` (same state)."""
    for module in model.modules():
        if type(module) is BlockBatchNorm:
            module.__class__ = SyncBlockBatchNorm
            module.group = group


# -- the Eq. 3 chain across the block ranks ----------------------------------------------------
@torch.no_grad()
def chain_across_ranks(layout: Layout, groups: Groups, model, schedule: NoiseSchedule,
                       features: torch.Tensor, stochastic: bool = True, generator=None):
    """`methods.chain_from_features` with the blocks on K ranks: z_T [N, d] on every block peer.
    `schedule`, `features` [T_local, N, F] and `model` are this rank's."""
    w = model.embedding.weight
    z = torch.randn(features.shape[1], w.shape[1], device=w.device, dtype=w.dtype,
                    generator=generator)
    start, stop = layout.span
    b, d = layout.block_index, layout.data_index
    for t in range(1, layout.num_blocks + 1):
        noise = torch.randn(z.shape, device=z.device, dtype=z.dtype,
                            generator=generator) if stochastic else None
        if t == start + 1 and b > 0:
            dist.recv(z, src=layout.rank_of(b - 1, d))
        if start < t <= stop:
            one = slice(t - start - 1, t - start)
            u_hat = model.blocks.denoise(features[one], z.unsqueeze(0), w, one)[0].to(z.dtype)
            z = denoise_step(z, u_hat, schedule, t - start, noise)
        if t == stop and not layout.holds_last_block:
            dist.send(z.contiguous(), dst=layout.rank_of(b + 1, d))
    if layout.block_ranks > 1:
        dist.broadcast(z, src=layout.rank_of(layout.block_ranks - 1, d), group=groups.blocks)
    return z


