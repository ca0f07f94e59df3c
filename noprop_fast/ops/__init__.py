"""The ops a model computes with (`Ops`): one interface, three backends, chosen once at set-up.

`REFERENCE` (`reference.py`, plain PyTorch) is the default. `--fused` picks the device's fused
backend: on CUDA the Triton kernels of `noprop_fast.kernels`, on CPU the C++ ops of `cpp.py`
(built on first use; attention stays torch's SDPA there); both compute the cross-entropy in row
chunks (`chunked_ce.py`). Where a fused backend cannot load, `resolve_ops` says so in one line and
the run uses the reference. The Triton head holds D <= 128 and d <= 256 in one tile; wider
embeddings (prototype: d = pixels) use the reference head there.

Noise: the fused ops draw eps from Philox keyed by a seed and an offset held in device tensors
(`PhiloxNoise`); each draw advances the offset in place, so no value is drawn twice and nothing is
read on the host (a captured CUDA graph draws new noise on every replay). Given a PhiloxNoise, the
reference draws the very same numbers in plain PyTorch; given None, torch.randn (the fused
backends then raise).
"""
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import DataError, UserError
from . import reference

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Ops:
    name: str                       # "reference", "triton" or "cpp"
    noise_injection: Callable       # (y, W, a, s, noise) -> z [B, N, d] in W's dtype
    block_linear: Callable          # (x, weight, bias) -> [B, N, out]
    softmax_head: Callable          # (h, k, c, v) -> [B, N, d] in h's dtype
    block_loss: Callable            # (u_hat, u, w) -> [B] fp32, weighted
    causal_attention: Callable      # (q, k, v) [Z, H, L, Dh] -> o
    linear_cross_entropy: Callable  # (z, weight, bias, target) -> fp32 scalar

    @property
    def fused(self) -> bool:
        return self.name != "reference"


REFERENCE = Ops("reference", reference.noise_injection, reference.block_linear,
                reference.softmax_head, reference.block_loss, reference.causal_attention,
                reference.linear_cross_entropy)


def _streamed(inject: Callable) -> Callable:
    """A fused noise op (y, W, a, s, seed, offset) as (y, W, a, s, noise): draws from the stream."""
    def noise_injection(y, W, a, s, noise):
        if noise is None:
            raise ValueError("the fused path draws its noise from a PhiloxNoise stream; pass one")
        return inject(y, W, a, s, noise.seed, noise.advance(a.shape[0] * y.shape[0] * W.shape[1]))
    return noise_injection


def triton_ops() -> Ops:
    from ..kernels.attention import causal_attention
    from ..kernels.block_linear import block_linear
    from ..kernels.block_loss import block_loss
    from ..kernels.noise import noise_injection
    from ..kernels.softmax_head import MAX_D, MAX_DV, softmax_head
    from .chunked_ce import linear_cross_entropy

    def head(h, k, c, v):
        if h.shape[-1] > MAX_D or v.shape[-1] > MAX_DV:
            return reference.softmax_head(h, k, c, v)  # beyond the kernel's one-tile limits
        return softmax_head(h, k, c, v.to(h.dtype))
    return Ops("triton", _streamed(noise_injection), block_linear, head, block_loss,
               causal_attention, linear_cross_entropy)


def cpp_ops() -> Ops:
    from . import cpp
    from .chunked_ce import linear_cross_entropy
    cpp.load()  # raises FusedOpsUnavailable with a one-line reason

    def head(h, k, c, v):
        return cpp.softmax_head(h, k, c, v.to(h.dtype))
    return Ops("cpp", _streamed(cpp.noise_injection), cpp.block_linear, head, cpp.block_loss,
               reference.causal_attention, linear_cross_entropy)


def fused_ops(device: torch.device, backend: str | None = None) -> Ops:
    """The fused ops for `device`: Triton on CUDA, C++ on CPU. `backend` forces one ("triton" on
    CPU tensors runs under TRITON_INTERPRET=1, which the tests use)."""
    backend = backend or ("triton" if device.type == "cuda" else "cpp")
    if backend == "triton":
        return triton_ops()
    if backend == "cpp":
        if device.type != "cpu":
            raise UserError(f"--fused: the C++ ops run on CPU tensors, not on {device}")
        return cpp_ops()
    raise ValueError(f"unknown fused backend {backend!r}")


def resolve_ops(fused: bool, device: torch.device, warn=print) -> Ops:
    """The ops a run uses: the reference unless `fused`; a fused backend that cannot be loaded is
    reported in one line through `warn` and the run falls back to the reference."""
    if not fused:
        return REFERENCE
    from .cpp import FusedOpsUnavailable
    try:
        return fused_ops(device)
    except (FusedOpsUnavailable, ImportError) as err:
        warn(f"--fused: {' '.join(str(err).split())}; using the reference ops")
        return REFERENCE


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
        count = 1
        for size in shape:
            count *= size
        start = int(self.advance(count).item())
        offsets = start + torch.arange(count, dtype=torch.int64)
        return reference.philox_randn(int(self.seed.item()), offsets).view(shape).to(device)


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
