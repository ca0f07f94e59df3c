"""The fused path (`--fused`): which ops a model computes with, and the noise they draw.

The reference path is the model's own PyTorch (`layers.py`, `models/image.py`, `schedule.py`). The
fused path swaps four of its computations for fused ops with the same maths:

    noise_injection  z[b] = sqrt(abar) W_embed[y] + sqrt(1 - abar) eps, eps drawn inside the op
    block_linear     Y[b] = X[b] W[b]^T + bias[b] for every block layer's FC
    softmax_head     u_hat = softmax(h K^T + c) W_embed, the logits never materialised
    block_loss       every block's weighted squared error in one pass
    causal_attention the language model's attention, flash style (Triton only; on CPU the C++
                     set leaves it to PyTorch's own fused scaled_dot_product_attention)

and the classifier's cross-entropy is computed in row chunks (`chunked_ce.py`), never forming a
vocabulary's logits for a whole batch.

On CUDA they are the Triton kernels of `noprop_fast.kernels`; on CPU the C++ ops of
`noprop_fast.cpu_ops` (built on first use). Convolutions and BatchNorm stay in PyTorch on both.
Where the C++ ops cannot be built (no compiler), `resolve_ops` says so in one line and the run
uses the reference path. The Triton head holds D <= 128 and d <= 256 in one tile; wider embeddings
(prototype: d = pixels) use the reference head with the other three ops fused.

Noise: the fused ops draw eps from Philox keyed by a seed and an offset held in device tensors
(`PhiloxNoise`); each draw advances the offset in place by the number of values drawn, so no
value is drawn twice and nothing is read on the host (a captured CUDA graph draws new noise on
every replay). `PhiloxNoise.normals` gives the reference path the very same numbers, computed in
plain PyTorch, so that both paths can be run on identical noise (the equivalence test does).
"""
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import DataError, UserError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class FusedOps:
    name: str                 # "triton" or "cpp"
    noise_injection: Callable  # (y, W, a, s, seed, offset) -> z [B, N, d] in W's dtype
    block_linear: Callable    # (x, weight, bias) -> [B, N, out]
    softmax_head: Callable    # (h, k, c, v) -> [B, N, d] in h's dtype
    block_loss: Callable      # (u_hat, u, w) -> [B] fp32, weighted
    causal_attention: Callable | None = None  # (q, k, v) [Z, H, L, Dh] -> o; None: torch's SDPA


def _triton_ops() -> FusedOps:
    from .kernels.block_linear import block_linear
    from .kernels.block_loss import block_loss
    from .kernels.noise import noise_injection
    from .kernels.attention import causal_attention
    from .kernels.softmax_head import MAX_D, MAX_DV, softmax_head, softmax_head_ref

    def head(h, k, c, v):
        if h.shape[-1] > MAX_D or v.shape[-1] > MAX_DV:
            return softmax_head_ref(h, k, c, v.to(h.dtype))  # beyond the kernel's one-tile limits
        return softmax_head(h, k, c, v)
    return FusedOps("triton", noise_injection, block_linear, head, block_loss, causal_attention)


def _cpp_ops() -> FusedOps:
    from . import cpu_ops
    cpu_ops.load()  # raises FusedOpsUnavailable with a one-line reason
    return FusedOps("cpp", cpu_ops.noise_injection, cpu_ops.block_linear, cpu_ops.softmax_head,
                    cpu_ops.block_loss)


def fused_ops(device: torch.device, backend: str | None = None) -> FusedOps:
    """The fused ops for `device`: Triton on CUDA, C++ on CPU. `backend` forces one ("triton" on
    CPU tensors runs under TRITON_INTERPRET=1, which the tests use)."""
    backend = backend or ("triton" if device.type == "cuda" else "cpp")
    if backend == "triton":
        return _triton_ops()
    if backend == "cpp":
        if device.type != "cpu":
            raise UserError(f"--fused: the C++ ops run on CPU tensors, not on {device}")
        return _cpp_ops()
    raise ValueError(f"unknown fused backend {backend!r}")


def resolve_ops(fused: bool, device: torch.device, warn=print) -> FusedOps | None:
    """The ops a run uses: None (the reference path) unless `fused`; a fused backend that cannot be
    loaded is reported in one line through `warn` and the run falls back to the reference path."""
    if not fused:
        return None
    from .cpu_ops import FusedOpsUnavailable
    try:
        return fused_ops(device)
    except (FusedOpsUnavailable, ImportError) as err:
        warn(f"--fused: {' '.join(str(err).split())}; using the reference ops")
        return None


class PhiloxNoise:
    """A stream of standard normals: Philox keyed by `seed`, counter `offset` (int64 [1] tensors on
    the device). `advance(count)` returns the offset to draw `count` values at and moves it on."""

    def __init__(self, seed: int, device: torch.device):
        self.seed = torch.tensor([seed & (2**63 - 1)], dtype=torch.int64, device=device)
        self.offset = torch.zeros(1, dtype=torch.int64, device=device)

    def reseed(self, seed: int) -> None:
        """The stream of `seed` from its start, in the same tensors (a captured graph holds them)."""
        self.seed.fill_(seed & (2**63 - 1))
        self.offset.zero_()

    def advance(self, count: int) -> torch.Tensor:
        start = self.offset.clone()
        self.offset.add_(count)  # in place: a captured graph replays this too
        return start

    def normals(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The fp32 values the fused op would draw next, in plain PyTorch (reads seed and offset on
        the host: for tests and the reference path run on the fused path's noise)."""
        from .kernels.noise import philox_randn_ref
        count = 1
        for size in shape:
            count *= size
        start = int(self.advance(count).item())
        offsets = start + torch.arange(count, dtype=torch.int64)
        return philox_randn_ref(int(self.seed.item()), offsets).view(shape).to(device)


def check_labels() -> None:
    """Raise DataError if the Triton noise injection met a label outside [0, m) since the last call.
    It flags such labels on the device (their rows of z are NaN) instead of syncing in every step;
    the trainers call this where they sync anyway: when a loss is not finite, as such a label
    makes it. A no-op where the Triton ops never ran."""
    noise = sys.modules.get("noprop_fast.kernels.noise")
    if noise is not None:
        try:
            noise.check_labels()
        except IndexError as err:
            raise DataError(str(err)) from None


def compute_dtype(precision: str) -> torch.dtype:
    if precision not in PRECISIONS:
        raise UserError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]
