"""Fused noise injection: the noisy block inputs of NoProp, drawn inside the kernel.

For labels y [N] (int64), class embeddings W [m, d], and scales a, s (fp32) given per block, [B]
(NoProp-DT: a = sqrt(abar_{t-1}), s = sqrt(1 - abar_{t-1}), slices of `NoiseSchedule`), or per
example, [B, N] (NoProp-CT / FM: B = 1 and every example n has its own time t_n):

    u = W[y]                                                  [N, d]
    z[b, n, j] = a[b, n] u[n, j] + s[b, n] eps[b, n, j]       [B, N, d], W's dtype, fp32 arithmetic
    eps[b, n, j] = randn(seed, offset + (b N + n) d + j)      (int64 index, counter-based Philox)

A [B] scale is read as the [B, N] view with stride 0 over n (a[b, n] = a[b]): one kernel for both.

randn is tl.randn of triton 3.9.0 (Philox-4x32-10, Box-Muller on its first two words) except that
cos is evaluated inline (`_cos_of_angle`) instead of by libdevice's cosf, whose never-taken
large-argument path leaves 32 bytes of stack in the cubin (the AOT check counts stack as spills);
the Philox integers are identical and the values agree with tl.randn to about an ulp.

The noise is never stored. The backward computes only the gradients asked for
(ctx.needs_input_grad), given dz [B, N, d]:

    dW[k, :] = sum_{n : y[n] = k} sum_b a[b, n] dz[b, n, :]   (rows of absent labels are zero)
    da[b, n] = sum_j dz[b, n, j] W[y[n], j]                   (when a requires grad)
    ds[b, n] = sum_j dz[b, n, j] eps[b, n, j]                 (when s requires grad: eps is drawn
                                                               again from the saved seed / offset)

and for [B] scales da[b], ds[b] are those sums over n as well. NoProp-DT's scales are schedule
constants: its backward computes dW only, as before, and saves only y and a. No gradient for y
(labels), seed, offset.

dW accumulation: one program per tile of (label rows n, columns j) sums over b in registers, then
`tl.atomic_add`s the tile into an fp32 buffer at rows y[n]. Atomics keep the backward O(N d) with
no sort of the labels and no host sync; the price is that repeated labels are summed in an
unspecified order, so dW is reproducible only to fp32 rounding (a few ulps; at most N terms per
row), which is then cast once to W's dtype. A deterministic variant would sort y and reduce
segments.
da and ds: the same program sums its tile of columns for every (b, n) and stores the sum in its own
slot of an fp32 [column tiles, B, N] buffer, which torch sums over the tiles: deterministic, no
atomics, and one tile (d <= 256) leaves a sum over one slot.

Labels outside [0, m): the kernels never address W or dW with them (their loads and atomics are
masked), their rows of z are NaN (so a loss computed from them is not finite) and they add nothing
to dW or da. Checking them on the host would sync with the device in every step; instead the
forward records the first such position in a per-device int64 flag, and `check_labels()` reads it
and raises IndexError (as the C++ op does at once): call it where the run syncs anyway (the
trainers do when a loss is not finite). On CPU tensors (the interpreter) the launcher checks at
once.

Constraints: W [m, d] fp32/fp16/bf16; y [N] int64 (see above for labels outside [0, m)); a, s
fp32, both [B] or both [B, N]; seed, offset int64 tensors with one element, on the device. Inputs
are made contiguous (a no-op when they are).

CUDA graphs: safe. Seed and offset are read from device memory inside the kernel and nothing reads
a tensor's value on the host, so a captured graph draws new noise when the offset tensor is advanced
in place between replays (advance it by at least B N d per call to draw fresh, disjoint counters).
When a or s requires grad the forward saves copies of seed and offset (device copies, no sync), so
the backward draws the forward's noise even if the offset tensor has been advanced in place since.
Branches depend only on shapes and requires_grad; the buffers come from torch.empty / zeros.

`philox_randn_ref` (ops/reference.py) reimplements tl.randn of triton 3.9.0 in plain PyTorch (int64
arithmetic masked to 32 bits), so the reference and the tests reproduce the kernel's noise: the
integers bitwise, the normals to 1e-6 (fp32 log/cos implementations differ in the last ulp).
"""
import torch
import triton
import triton.language as tl
from triton.language.random import uint_to_uniform_float

from noprop_fast.kernels.aot import KernelSpec
from noprop_fast.ops.checks import check_noise_injection, first_order_only
from noprop_fast.ops.reference import noise_injection as noise_injection_ref  # noqa: F401
from noprop_fast.ops.reference import philox_4x32 as philox_4x32_ref  # noqa: F401
from noprop_fast.ops.reference import philox_randint as philox_randint_ref  # noqa: F401
from noprop_fast.ops.reference import philox_randn as philox_randn_ref  # noqa: F401


@triton.jit
def _cos_of_angle(theta):
    """cos(theta) for theta in [0, 2 pi], to about an ulp, in registers only.

    theta = k pi/2 + r with k = round(theta 2/pi) in 0..4 and pi/2 split in three parts (16, 16
    and 24 bits: k times each part is exact), then Taylor polynomials of cos r, sin r on
    |r| <= pi/4 (truncation below 3e-8) and the quadrant k mod 4. libdevice's cosf is not used: its
    Payne-Hanek path for |x| > 105615 keeps a 28-byte local array, which ptxas leaves as stack.
    """
    k = (theta * 0.6366197723675814 + 0.5).to(tl.int32)
    kf = k.to(tl.float32)
    r = theta - kf * 1.570770263671875  # pi/2 = 1.570770263671875 + 2.6063062250614166e-05
    r = r - kf * 2.6063062250614166e-05  # + 6.077094383272197e-11 (to fp64 accuracy)
    r = r - kf * 6.077094383272197e-11
    r2 = r * r
    cos_r = 1.0 + r2 * (-0.5 + r2 * (1 / 24 + r2 * (-1 / 720 + r2 * (1 / 40320))))
    sin_r = r + r * r2 * (-1 / 6 + r2 * (1 / 120 + r2 * (-1 / 5040 + r2 * (1 / 362880))))
    quadrant = k % 4  # cos(k pi/2 + r) = cos r, -sin r, -cos r, sin r
    value = tl.where(quadrant % 2 == 0, cos_r, sin_r)
    return tl.where((quadrant == 1) | (quadrant == 2), -value, value)


@triton.jit
def _randn(seed, offsets):
    """tl.randn(seed, offsets) of triton 3.9.0 with cos evaluated by `_cos_of_angle`.

    The same Philox words, uniforms, Box-Muller formula and fp32 angle; only cos differs from
    libdevice's, within an ulp or so (as torch.cos, used by `philox_randn_ref`, does).
    """
    i1, i2, _, _ = tl.randint4x(seed, offsets)
    u1 = tl.maximum(1.0e-7, uint_to_uniform_float(i1))
    theta = 6.283185307179586 * uint_to_uniform_float(i2)
    return tl.sqrt(-2.0 * tl.log(u1)) * _cos_of_angle(theta)


@triton.jit
def _noise_fwd_kernel(
    y_ptr,        # [N] int64 labels
    w_ptr,        # [m, D] class embeddings, contiguous
    a_ptr,        # [B, N] fp32 input scales, through (stride_sb, stride_sn)
    s_ptr,        # [B, N] fp32 noise scales, the same strides
    seed_ptr,     # [1] int64 Philox seed (device)
    offset_ptr,   # [1] int64 Philox counter offset (device)
    z_ptr,        # [B, N, D] output, contiguous, W's dtype
    bad_ptr,      # [1] int64: the first position n whose label is outside [0, M), atomic min
    stride_sb,    # elements between blocks of a and s
    stride_sn,    # elements between examples of a and s: 0 for [B] scales (one per block)
    num_rows,     # B * N: rows of z seen as [B N, D]
    N,            # labels per block
    M,            # classes: rows of W
    D,            # embedding dimension
    BLOCK_R: tl.constexpr,  # rows of z per program
    BLOCK_D: tl.constexpr,  # columns per program (power of two)
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # flat b N + n
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    mask = row_ok[:, None] & (cols < D)[None, :]
    block, n = rows // N, rows % N
    label = tl.load(y_ptr + n, mask=row_ok, other=0)
    bad = row_ok & ((label < 0) | (label >= M))  # never used as an address: its row of z is NaN
    tl.atomic_min(bad_ptr + tl.zeros_like(n), n, mask=bad)
    scale_at = block * stride_sb + n * stride_sn  # a[b, n] and s[b, n]
    scale = tl.load(a_ptr + scale_at, mask=row_ok, other=0.0)
    sigma = tl.load(s_ptr + scale_at, mask=row_ok, other=0.0)
    u = tl.load(w_ptr + label[:, None] * D + cols[None, :], mask=mask & ~bad[:, None],
                other=float("nan")).to(tl.float32)
    index = rows[:, None] * D + cols[None, :]  # [BLOCK_R, BLOCK_D] int64: (b N + n) D + j
    eps = _randn(tl.load(seed_ptr), tl.load(offset_ptr) + index)
    z = scale[:, None] * u + sigma[:, None] * eps
    tl.store(z_ptr + index, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _noise_bwd_kernel(
    dz_ptr,       # [B, N, D] upstream gradient, contiguous
    y_ptr,        # [N] int64 labels
    w_ptr,        # [M, D] class embeddings (read when NEED_DA)
    a_ptr,        # [B, N] fp32 input scales, through (stride_sb, stride_sn) (read when NEED_DW)
    seed_ptr,     # [1] int64 Philox seed of the forward (read when NEED_DS)
    offset_ptr,   # [1] int64 Philox offset of the forward (read when NEED_DS)
    dw_ptr,       # [M, D] fp32 gradient buffer, zero-filled, accumulated atomically (NEED_DW)
    da_ptr,       # [column tiles, B, N] fp32 out: sum_j dz W[y] over this tile's columns (NEED_DA)
    ds_ptr,       # [column tiles, B, N] fp32 out: sum_j dz eps over this tile's columns (NEED_DS)
    stride_sb,    # elements between blocks of a
    stride_sn,    # elements between examples of a: 0 for [B] scales
    B,            # blocks
    N,            # labels per block
    M,            # classes: rows of dW
    D,            # embedding dimension
    plane,        # N * D: elements of one block of dz
    NEED_DW: tl.constexpr,  # accumulate dW
    NEED_DA: tl.constexpr,  # write the partial sums of da
    NEED_DS: tl.constexpr,  # draw eps again and write the partial sums of ds
    BLOCK_R: tl.constexpr,  # labels per program
    BLOCK_D: tl.constexpr,  # columns per program (power of two)
):
    n = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_ok = n < N
    mask = n_ok[:, None] & (cols < D)[None, :]
    label = tl.load(y_ptr + n, mask=n_ok, other=0)
    good = (label >= 0) & (label < M)  # a label outside [0, M) adds nothing (forward flagged it)
    dz_tile = dz_ptr + n[:, None] * D + cols[None, :]  # block b = 0; each next block is N D further
    slot = tl.program_id(1).to(tl.int64) * B * N + n  # (column tile, b = 0, n) of da and ds
    if NEED_DA:
        u = tl.load(w_ptr + label[:, None] * D + cols[None, :], mask=mask & good[:, None],
                    other=0.0).to(tl.float32)
    if NEED_DS:
        seed = tl.load(seed_ptr)
        counter = tl.load(offset_ptr) + n[:, None] * D + cols[None, :]  # (b N + n) D + j at b = 0
    grad = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for b in range(B):
        upstream = tl.load(dz_tile, mask=mask, other=0.0).to(tl.float32)
        if NEED_DW:  # grad[n, j] = sum_b a[b, n] dz[b, n, j]
            scale = tl.load(a_ptr + b * stride_sb + n * stride_sn, mask=n_ok, other=0.0)
            grad += scale[:, None] * upstream
        if NEED_DA:
            tl.store(da_ptr + slot, tl.sum(upstream * u, axis=1), mask=n_ok)
        if NEED_DS:  # eps is finite everywhere and upstream is 0 outside the mask
            eps = _randn(seed, counter)
            tl.store(ds_ptr + slot, tl.sum(upstream * eps, axis=1), mask=n_ok)
            counter += plane
        dz_tile += plane  # advancing the pointer: no int32 product b N D that could overflow
        slot += N
    if NEED_DW:
        tl.atomic_add(dw_ptr + label[:, None] * D + cols[None, :], grad,
                      mask=mask & good[:, None])


_ELEMENTS_PER_PROGRAM = 1024
_BLOCK_D_CHOICES = (16, 32, 64, 128, 256)   # the tile width is next_pow2(D) clamped to this range
_NUM_WARPS = 4
_SCALE_GRAD_WARPS = 8  # a backward that also sums da or ds: eps and W[y] live too (w4 spills)


def _blocks(d: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D): a tile of 1024 elements whose width covers d up to 256."""
    block_d = min(max(triton.next_power_of_2(d), _BLOCK_D_CHOICES[0]), _BLOCK_D_CHOICES[-1])
    return _ELEMENTS_PER_PROGRAM // block_d, block_d


_NO_BAD_LABEL = 2**63 - 1
_bad_labels: dict[torch.device, tuple[torch.Tensor, int]] = {}  # device -> (flag, m of the launch)


def _bad_label_flag(device: torch.device, m: int) -> torch.Tensor:
    """The device's flag (int64 [1]: the first position of a label outside [0, m), or
    _NO_BAD_LABEL), allocated at its first launch, which runs before any graph capture."""
    flag = _bad_labels[device][0] if device in _bad_labels else \
        torch.full((1,), _NO_BAD_LABEL, dtype=torch.int64, device=device)
    _bad_labels[device] = (flag, m)
    return flag


def check_labels(y: torch.Tensor | None = None) -> None:
    """Raise IndexError if a forward since the last check met a label outside [0, m); reads each
    device's flag (a host sync: call it where the run syncs anyway) and resets it. y, if given, is
    the labels of that forward, to name the label in the message."""
    for flag, m in _bad_labels.values():
        position = int(flag.item())
        if position != _NO_BAD_LABEL:
            flag.fill_(_NO_BAD_LABEL)
            label = "" if y is None else f" {int(y[position])}"
            raise IndexError(f"noise_injection: label{label} at position {position} is outside "
                             f"[0, {m}) (W has {m} rows)")


def _check_inputs(y, W, a, s, seed, offset):
    check_noise_injection(y, W, a, s, seed, offset)
    for name, t in (("y", y), ("a", a), ("s", s), ("seed", seed), ("offset", offset)):
        if t.device != W.device:
            raise ValueError(f"noise_injection: {name} is on {t.device} but W is on {W.device}")


def _per_example(scale: torch.Tensor, N: int) -> torch.Tensor:
    """A [B] (per block) or [B, N] (per example) scale as a [B, N] view of contiguous memory: the
    [B] one with stride 0 over n."""
    scale = scale.contiguous()
    return scale.unsqueeze(1).expand(-1, N) if scale.dim() == 1 else scale


def _noise_forward(y, W, a, s, seed, offset):
    _check_inputs(y, W, a, s, seed, offset)
    d, B, N = W.shape[1], a.shape[0], y.shape[0]
    z = torch.empty((B, N, d), device=W.device, dtype=W.dtype)
    if z.numel() == 0:
        return z
    block_r, block_d = _blocks(d)
    grid = (triton.cdiv(B * N, block_r), triton.cdiv(d, block_d))
    a, s = _per_example(a, N), _per_example(s, N)  # the same strides: both contiguous, one shape
    _noise_fwd_kernel[grid](y.contiguous(), W.contiguous(), a, s, seed, offset, z,
                            _bad_label_flag(W.device, W.shape[0]), a.stride(0), a.stride(1),
                            B * N, N, W.shape[0], d, BLOCK_R=block_r, BLOCK_D=block_d,
                            num_warps=_NUM_WARPS)
    return z


def _noise_backward(dz, y, a, w_shape, w_dtype, W=None, seed=None, offset=None, need_dw=True):
    """(dW in w_dtype or None, da or None, ds or None) for upstream dz [B, N, d]: dW when need_dw,
    da when W (the forward's embeddings) is given, ds when seed and offset (the forward's) are
    given; da and ds in a's shape ([B] or [B, N]), fp32."""
    (m, d), B, N = w_shape, a.shape[0], y.shape[0]
    need_da, need_ds = W is not None, seed is not None
    block_r, block_d = _blocks(d)
    col_tiles = triton.cdiv(d, block_d)
    dw = torch.zeros((m, d), device=dz.device, dtype=torch.float32) if need_dw else None
    partial = torch.empty((need_da + need_ds, col_tiles, B, N), device=dz.device,
                          dtype=torch.float32) if need_da or need_ds else None
    if dz.numel() > 0:
        scales = _per_example(a, N)
        dz = dz.contiguous()
        unused = scales  # a placeholder for the pointers a variant does not read
        _noise_bwd_kernel[(triton.cdiv(N, block_r), col_tiles)](
            dz, y, W.contiguous() if need_da else dz, scales, seed if need_ds else y,
            offset if need_ds else y, dw if need_dw else unused,
            partial[0] if need_da else unused, partial[-1] if need_ds else unused,
            scales.stride(0), scales.stride(1), B, N, m, d, N * d,
            NEED_DW=need_dw, NEED_DA=need_da, NEED_DS=need_ds, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=_SCALE_GRAD_WARPS if need_da or need_ds else _NUM_WARPS)
    elif partial is not None:
        partial.zero_()
    dw = dw.to(w_dtype) if need_dw else None
    if partial is None:
        return dw, None, None
    sums = partial.sum(1)  # [need_da + need_ds, B, N]: over the column tiles
    if a.dim() == 1:
        sums = sums.sum(-1)  # a [B] scale's gradient: summed over its N examples
    return dw, (sums[0] if need_da else None), (sums[-1] if need_ds else None)


class _NoiseInjection(torch.autograd.Function):
    """Saves y and a; also, when a or s requires grad, W and copies of seed and offset (the noise
    is drawn again from them). NoProp-DT's backward (dW only) regenerates nothing.

    A backward that needs da or ds computes both (the scales of a learned schedule are learned
    together), so it runs one of the three kernel variants that AOT_SPECS compiles."""

    @staticmethod
    def forward(ctx, y, W, a, s, seed, offset):
        z = _noise_forward(y, W, a, s, seed, offset)
        if W.device.type == "cpu":  # the interpreter: reading the flag costs no device sync
            check_labels(y)
        _, _, need_da, need_ds, _, _ = ctx.needs_input_grad
        scales = (W, seed.clone(), offset.clone()) if need_da or need_ds else ()
        ctx.save_for_backward(y.contiguous(), a.contiguous(), *scales)
        ctx.w_shape, ctx.w_dtype = tuple(W.shape), W.dtype
        return z

    @staticmethod
    @first_order_only("noise_injection")
    def backward(ctx, dz):
        _, need_dw, need_da, need_ds, _, _ = ctx.needs_input_grad
        if not (need_dw or need_da or need_ds):
            return None, None, None, None, None, None
        y, a, *scales = ctx.saved_tensors
        W, seed, offset = scales if scales else (None, None, None)
        dW, da, ds = _noise_backward(dz, y, a, ctx.w_shape, ctx.w_dtype, W=W, seed=seed,
                                     offset=offset, need_dw=need_dw)
        return None, dW, (da if need_da else None), (ds if need_ds else None), None, None


def noise_injection(y, W, a, s, seed, offset):
    """z [B, N, d] = a[b, n] W[y[n]] + s[b, n] eps[b, n], eps[b, n, j] = randn(seed, offset + i),
    i = (b N + n) d + j.

    y [N] int64, W [m, d], a, s fp32 [B] (per block) or [B, N] (per example), seed and offset
    int64 [1] on W's device. Differentiable in W, a and s. See the module docstring for the maths
    and the CUDA-graph contract.
    """
    return _NoiseInjection.apply(y, W, a, s, seed, offset)


# the backward's variants (NEED_DW, NEED_DA, NEED_DS): W alone (NoProp-DT), W and the scales (a
# learned embedding under a learned schedule), the scales alone (a fixed embedding); da and ds are
# computed together (_NoiseInjection), so these are all the launches
_BWD_VARIANTS = ((True, False, False), (True, True, True), (False, True, True))


def _aot_specs() -> list[KernelSpec]:
    specs = []
    for dtype in ("fp32", "fp16", "bf16"):
        for block_d in _BLOCK_D_CHOICES:
            blocks = {"BLOCK_R": _ELEMENTS_PER_PROGRAM // block_d, "BLOCK_D": block_d}
            tile = f"{blocks['BLOCK_R']}x{block_d},w{_NUM_WARPS}"
            specs.append(KernelSpec(
                f"noise_fwd[{dtype},{tile}]", _noise_fwd_kernel,
                {"y_ptr": "*i64", "w_ptr": f"*{dtype}", "a_ptr": "*fp32", "s_ptr": "*fp32",
                 "seed_ptr": "*i64", "offset_ptr": "*i64", "z_ptr": f"*{dtype}",
                 "bad_ptr": "*i64", "stride_sb": "i32", "stride_sn": "i32", "num_rows": "i32",
                 "N": "i32", "M": "i32", "D": "i32"}, blocks, num_warps=_NUM_WARPS))
            for need_dw, need_da, need_ds in _BWD_VARIANTS:
                grads = ",".join(name for name, need in (("dw", need_dw), ("da", need_da),
                                                         ("ds", need_ds)) if need)
                warps = _SCALE_GRAD_WARPS if need_da or need_ds else _NUM_WARPS
                specs.append(KernelSpec(
                    f"noise_bwd[{dtype},{tile}]" if grads == "dw" else
                    f"noise_bwd[{dtype},{blocks['BLOCK_R']}x{block_d},w{warps},{grads}]",
                    _noise_bwd_kernel,
                    {"dz_ptr": f"*{dtype}", "y_ptr": "*i64", "w_ptr": f"*{dtype}",
                     "a_ptr": "*fp32", "seed_ptr": "*i64", "offset_ptr": "*i64",
                     "dw_ptr": "*fp32", "da_ptr": "*fp32", "ds_ptr": "*fp32",
                     "stride_sb": "i32", "stride_sn": "i32", "B": "i32", "N": "i32",
                     "M": "i32", "D": "i32", "plane": "i32"},
                    {**blocks, "NEED_DW": need_dw, "NEED_DA": need_da, "NEED_DS": need_ds},
                    num_warps=warps))
    return specs


AOT_SPECS = _aot_specs()  # every (kernel, dtype, tile, gradients) that the launchers may pick
