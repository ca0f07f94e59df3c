"""The fused ops on the CPU: C++ (ATen + OpenMP) twins of the Triton kernels in kernels/, with the
same maths, shapes and gradients (kernels/README.md; `reference.py` is the specification; the C++
files' headers give each op's loops). Unlike the GPU side every op is deterministic (fixed
reduction orders, except where ATen's BLAS sums), softmax_head takes any D and d, and products run
in fp32. Inputs must be CPU tensors (ValueError otherwise).

Build: `noprop_fast.csrc` is compiled on first use by `torch.utils.cpp_extension.load` ($CXX or
c++, and ninja; no -march, so the cached library is portable: the hot loops carry AVX2 / AVX-512
clones chosen at load time), under a name hashing the sources, the flags and torch's version. When
it cannot happen, `load()` raises FusedOpsUnavailable with a one-line reason; `available()` says so.
"""
import functools
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from . import checks

SOURCES = ("noise.cpp", "block_loss.cpp", "block_linear.cpp", "softmax_head.cpp", "bindings.cpp")
HEADERS = ("common.h", "ops.h", "philox.h", "vec_math.h")
# -fno-math-errno and -fno-trapping-math: sqrt and the selects of csrc's exp / log / Box-Muller
# vectorise (no program here reads errno or traps on fp exceptions)
CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math")
LDFLAGS = ("-fopenmp",)
# logits per softmax_head tile (fp32: 4 MB); read at each call, so tests can shrink it
SOFTMAX_TILE_ELEMENTS = 1 << 20


class FusedOpsUnavailable(RuntimeError):
    """The C++ fused ops could not be built or loaded; the message is one line."""


# ------------------------------------------------------------------------------------------------
# Build and load

def _source_dir() -> Path:
    import noprop_fast.csrc
    return Path(noprop_fast.csrc.__file__).parent


def _extension_name(source_dir: Path) -> str:
    """noprop_fast_cpu_<hash of the sources' folder and contents, the flags and torch's version>.

    The folder is in the hash too: an editable checkout and an installed copy then keep a build
    each, rather than rebuilding one directory (ninja sees new source paths) at every switch.
    """
    digest = hashlib.sha256(str(source_dir.resolve()).encode())
    for name in SOURCES + HEADERS:
        digest.update(name.encode() + b"\0" + (source_dir / name).read_bytes())
    digest.update(" ".join(CFLAGS + LDFLAGS + (torch.__version__,)).encode())
    return f"noprop_fast_cpu_{digest.hexdigest()[:12]}"


def _one_line(err: BaseException) -> str:
    """The compiler's first error line if there is one, else the exception's first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = next((line for line in lines if "error:" in line), lines[0] if lines else repr(err))
    return reason if len(reason) <= 300 else reason[:297] + "..."


def _build_file(cpp_extension, name: str, file: str) -> Path | None:
    """A file of the build's cache folder; None for a torch without cpp_extension's private helper
    (which then gets neither the build message nor the stale-lock check)."""
    try:
        return Path(cpp_extension._get_build_directory(name, verbose=False)) / file
    except Exception:
        return None


STALE_LOCK_SECONDS = 600  # a build takes about a minute; a lock this old was left by a killed one


def _clear_stale_lock(cpp_extension, name: str) -> None:
    """cpp_extension serialises builds with a lock file and waits for it without a limit, so a
    build interrupted by Ctrl-C would make every later run hang; an old lock is removed."""
    lock = _build_file(cpp_extension, name, "lock")
    try:
        age = time.time() - lock.stat().st_mtime
    except (AttributeError, OSError):  # no lock (the usual case), or no private helper (None)
        return
    if age > STALE_LOCK_SECONDS:
        print(f"noprop_fast: removing {lock}, left by an interrupted build {age / 60:.0f} min ago",
              file=sys.stderr)
        lock.unlink(missing_ok=True)


def _compile_and_load():
    from torch.utils import cpp_extension  # imports setuptools: only when a build is wanted

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise FusedOpsUnavailable(f"the C++ fused ops could not be built: no C++ compiler found "
                                  f"({compiler!r}; install g++ or set CXX)")
    if not cpp_extension.is_ninja_available():
        raise FusedOpsUnavailable("the C++ fused ops could not be built: ninja is not installed "
                                  "(pip install ninja)")
    try:
        source_dir = _source_dir()
        name = _extension_name(source_dir)
        _clear_stale_lock(cpp_extension, name)
        library = _build_file(cpp_extension, name, f"{name}.so")
        if library is not None and not library.exists():
            print("noprop_fast: building the C++ fused ops (once, about a minute)...", file=sys.stderr)
        # lists of their own: cpp_extension appends to the flag lists it is given
        return cpp_extension.load(name=name, sources=[str(source_dir / s) for s in SOURCES],
                                  extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                                  verbose=False)
    except Exception as err:  # a compile or link error, an unreadable source, a failed import
        raise FusedOpsUnavailable(f"the C++ fused ops could not be built: {_one_line(err)}") from err


@functools.cache
def _build():
    """(extension module, "") or (None, one-line reason): one attempt per process."""
    try:
        return _compile_and_load(), ""
    except FusedOpsUnavailable as err:
        return None, str(err)


def load():
    """The extension module, built on the first call; raises FusedOpsUnavailable (one line)."""
    module, reason = _build()
    if module is None:
        raise FusedOpsUnavailable(reason)
    return module


def available() -> tuple[bool, str]:
    """(True, "") when the C++ ops load, else (False, the one-line reason)."""
    module, reason = _build()
    return module is not None, reason


def philox_randn(seed: int, offset: int, numel: int) -> torch.Tensor:
    """randn(seed, offset + i) for i < numel, fp32: the noise that noise_injection draws."""
    return load().philox_randn(int(seed), int(offset), int(numel))


# ------------------------------------------------------------------------------------------------
# Autograd Functions: the C++ forward and backward of each op, on contiguous inputs (`_apply`)

def _per_example(scale: torch.Tensor, N: int) -> torch.Tensor:
    """A [B] (per block) or [B, N] (per example) coefficient as a [B, N] view: the [B] one with
    stride 0 over n, which the C++ ops read through its strides."""
    return scale.unsqueeze(1).expand(-1, N) if scale.dim() == 1 else scale


class _NoiseInjection(torch.autograd.Function):
    """Saves y and a (and W's shape and dtype); also W when a requires grad, and copies of seed and
    offset when s does: ds regenerates the noise from them, which is never stored."""

    @staticmethod
    def forward(ctx, y, W, a, s, seed, offset):
        N = y.shape[0]
        z = load().noise_forward(y, W, _per_example(a, N), _per_example(s, N), seed, offset)
        _, need_dw, need_da, need_ds, _, _ = ctx.needs_input_grad
        saved = [y, a] + ([W] if need_da else [])
        ctx.save_for_backward(*saved, *((seed.clone(), offset.clone()) if need_ds else ()))
        ctx.w_shape, ctx.w_dtype = tuple(W.shape), W.dtype
        return z

    @staticmethod
    @checks.first_order_only("noise_injection")
    def backward(ctx, dz):
        _, need_dw, need_da, need_ds, _, _ = ctx.needs_input_grad
        if not (need_dw or need_da or need_ds):
            return None, None, None, None, None, None
        y, a, *rest = ctx.saved_tensors
        W = rest.pop(0) if need_da else None
        seed, offset = rest if need_ds else (None, None)
        dW, da, ds = load().noise_backward(dz.to(ctx.w_dtype).contiguous(), y,
                                           _per_example(a, y.shape[0]), ctx.w_shape[0], W, seed,
                                           offset, need_dw)
        if a.dim() == 1:  # a [B] scale's gradient: summed over its N examples
            da, ds = (None if g is None else g.sum(1) for g in (da, ds))
        return None, (dW.to(ctx.w_dtype) if need_dw else None), da, ds, None, None


class _BlockLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u_hat, u, w):
        ctx.save_for_backward(u_hat, u, w)
        return load().block_loss_forward(u_hat, u, w)

    @staticmethod
    @checks.first_order_only("block_loss")
    def backward(ctx, grad):
        u_hat, u, w = ctx.saved_tensors
        need_du_hat, need_du, need_dw = ctx.needs_input_grad
        du_hat, du, dw = load().block_loss_backward(grad, u_hat, u, w, need_du_hat, need_du,
                                                    need_dw)
        if need_dw and w.dim() == 1:
            dw = dw.sum(1)  # a [B] weight's gradient: summed over its N examples
        return du_hat, du, (dw if need_dw else None)


class _BlockLinear(torch.autograd.Function):
    """Saves X and W; nothing else."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        y = load().block_linear_forward(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @checks.first_order_only("block_linear")
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        dx, dw, dbias = load().block_linear_backward(dy, x, weight, need_x, need_w,
                                                     need_b and ctx.has_bias)
        return dx, dw, dbias


class _SoftmaxHead(torch.autograd.Function):
    """Saves h, k, c, v, o (fp32) and the log-sum-exp [B, N]; the backward recomputes the logits
    tile by tile, except when a single tile holds all B N m of them: then the forward's
    probabilities (at most SOFTMAX_TILE_ELEMENTS) are saved and the recomputation skipped."""

    @staticmethod
    def forward(ctx, h, k, c, v):
        ctx.tile_elements = SOFTMAX_TILE_ELEMENTS
        o, lse, probs = load().softmax_head_forward(h, k, c, v, ctx.tile_elements)
        ctx.save_for_backward(h, k, c, v, o, lse, probs)
        return o.to(h.dtype)  # the same tensor for fp32

    @staticmethod
    @checks.first_order_only("softmax_head")
    def backward(ctx, do):
        h, k, c, v, o, lse, probs = ctx.saved_tensors
        return tuple(load().softmax_head_backward(do, h, k, c, v, o, lse, probs,
                                                  *ctx.needs_input_grad, ctx.tile_elements))


# ------------------------------------------------------------------------------------------------
# Public functions

def _apply(op: str, check, function, **tensors):
    """`function` on the tensors, made contiguous, after checks.py's shape and dtype `check` (shared
    with the Triton launchers) and the device check of the CPU ops."""
    check(*tensors.values())
    for name, t in tensors.items():
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"{op}: the CPU fused op needs CPU tensors, got {name} on {t.device}")
    return function.apply(*(t if t is None else t.contiguous() for t in tensors.values()))


def noise_injection(y, W, a, s, seed, offset):
    """z [B, N, d] = a[b, n] W[y[n]] + s[b, n] eps[b, n], eps[b, n, j] = randn(seed, offset + i),
    i = (b N + n) d + j.

    y [N] int64, W [m, d] fp32/fp16/bf16, a, s fp32 [B] (per block) or [B, N] (per example), seed
    and offset int64 tensors with one element, all on the CPU; z in W's dtype. Differentiable in W,
    a and s (each gradient computed only when asked for); all three are deterministic.
    """
    return _apply("noise_injection", checks.check_noise_injection, _NoiseInjection,
                  y=y, W=W, a=a, s=s, seed=seed, offset=offset)


def block_loss(u_hat, u, w):
    """losses [B] fp32 = mean_n w[b, n] ||u_hat[b, n] - u[n]||^2; u_hat [B, N, d], u [N, d], w fp32
    [B] (per block: w[b, n] = w[b]) or [B, N] (per example); differentiable in all three."""
    return _apply("block_loss", checks.check_block_loss, _BlockLoss, u_hat=u_hat, u=u, w=w)


def block_linear(x, weight, bias=None):
    """x[b] @ weight[b]^T + bias[b]: x [B, N, K], weight [B, M_out, K], bias [B, M_out] or None
    -> [B, N, M_out] in x's dtype; differentiable in all three."""
    return _apply("block_linear", checks.check_block_linear, _BlockLinear,
                  x=x, weight=weight, bias=bias)


def softmax_head(h, k, c, v):
    """softmax(h k^T + c) v without the [B, N, m] logits: h [B, N, D], k [B, m, D], c [B, m] or
    None, v [m, d] -> [B, N, d] in h's dtype; differentiable in all four; any D and d."""
    return _apply("softmax_head", checks.check_softmax_head, _SoftmaxHead, h=h, k=k, c=c, v=v)
