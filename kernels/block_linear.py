"""Batched multi-block linear layer with a fused bias epilogue, forward and backward.

For every block b of B (NoProp's T blocks, or a slice of them) one linear layer:

    Y[b] = X[b] W[b]^T + bias[b]             X [B, N, K], W [B, M_out, K], bias [B, M_out] or None
                                             Y [B, N, M_out] in X's dtype

Backward, with dY given:

    dX[b]    = dY[b] W[b]                    [N, M_out] @ [M_out, K]
    dW[b]    = dY[b]^T X[b]                  [M_out, N] @ [N, K]
    dbias[b] = sum_n dY[b, n, :]

The three products are one autotuned batched matmul kernel, C[b] = A[b] B[b] + bias[b], whose
operands are addressed through strides, so the transposes above cost nothing; the bias is its
epilogue. A small column-strip kernel sums dbias in one pass over dY.

Constraints: X, W, bias share one dtype (fp32, fp16 or bf16) and one device; every size >= 1; any
strides, each row/column stride < 2^23 (offsets inside a tile are int32; tile corners are int64).
Accumulation is fp32 (fp32 inputs use IEEE products, not TF32, so the interpreter, the GPU and the
fp32 reference agree), with one cast on store. dX, dW, dbias come back in X's dtype.

CUDA graphs: the launchers neither synchronise nor branch on tensor values, so block_linear can be
captured, but the matmul is autotuned (keyed on the product's sizes, flags and dtypes): run the
forward and backward once, outside capture, with every shape and dtype the graph will use, or the
autotuner will time configurations (and synchronise) during capture.
"""
import os

import torch
import triton
import triton.language as tl

from noprop_fast.ops.checks import check_block_linear, first_order_only
from noprop_fast.ops.reference import block_linear as block_linear_ref  # noqa: F401

from .releases import for_release


# ------------------------------------------------------------------------------------------------
# Kernels

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), smallest tile last. fp16/bf16: every BLOCK_M is
# a multiple of 64, so one or two warpgroups issue Hopper's wgmma. fp32 (IEEE products on the FMA
# units) holds a [BLOCK_K] slice of A's rows and B's columns per thread, so its BLOCK_K is small.
_HALF_TILES = [(128, 128, 32, 8, 3), (128, 64, 32, 8, 4), (64, 64, 32, 4, 4), (64, 32, 32, 4, 4)]
_FP32_TILES = for_release("block_linear", "fp32_tiles",  # measured with Triton 3.9; see releases.py
                          [(128, 128, 8, 8, 3), (128, 64, 8, 4, 3), (64, 64, 8, 4, 3), (64, 32, 16, 4, 3)])
_HALF_CONFIGS, _FP32_CONFIGS = (
    [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
     for m, n, k, w, s in tiles] for tiles in (_HALF_TILES, _FP32_TILES))


# The interpreter cannot time kernels, and Triton 3.6's autotuner times even the one configuration
# left after pruning (3.9's runs it untimed), so under the interpreter the autotuner holds a single
# configuration, which it runs untimed: the smallest fp32 tile, valid for every dtype.
_AUTOTUNED = (_FP32_CONFIGS[-1:] if os.environ.get("TRITON_INTERPRET") == "1"
              else _HALF_CONFIGS + _FP32_CONFIGS)


def _configs_for(configs, named_args, **kwargs):
    """The configurations of the inputs' dtype."""
    return _FP32_CONFIGS if named_args["a_ptr"].dtype == torch.float32 else _HALF_CONFIGS


@triton.autotune(configs=_AUTOTUNED, key=["M", "N", "K", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": _configs_for})
@triton.jit
def _batched_matmul_kernel(
    a_ptr,          # A [batch, M, K], any strides: X (forward), G (dX) or G^T (dW)
    b_ptr,          # B [batch, K, N], any strides: W^T (forward), W (dX) or X (dW)
    c_ptr,          # C [batch, M, N], any strides, written in its own dtype
    bias_ptr,       # [batch, N], added to every row of C (HAS_BIAS), else None
    M, N, K,        # the product's sizes
    stride_ab, stride_am, stride_ak,  # A's strides (elements): batch, row, reduction
    stride_bb, stride_bk, stride_bn,  # B's strides: batch, reduction, column
    stride_cb, stride_cm, stride_cn,  # C's strides: batch, row, column
    stride_biasb, stride_biasn,       # bias's strides: batch, column
    HAS_BIAS: tl.constexpr,   # add bias in the epilogue
    BLOCK_M: tl.constexpr,    # rows of C per program
    BLOCK_N: tl.constexpr,    # columns of C per program
    BLOCK_K: tl.constexpr,    # reduction step
):
    # grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), batch): one [BLOCK_M, BLOCK_N] tile of C[b].
    # Each tile's corner is an int64 scalar offset; offsets inside a tile are int32 and loop
    # invariant (the corners move along K).
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    row0 = pid_m.to(tl.int64) * BLOCK_M
    col0 = pid_n.to(tl.int64) * BLOCK_N
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    in_m = rows < M - pid_m * BLOCK_M
    in_n = cols < N - pid_n * BLOCK_N
    a_corner = a_ptr + pid_b * stride_ab + row0 * stride_am  # &A[b, row0, 0]
    b_corner = b_ptr + pid_b * stride_bb + col0 * stride_bn  # &B[b, 0, col0]
    a_tile = rows[:, None] * stride_am + ks[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b_tile = ks[:, None] * stride_bk + cols[None, :] * stride_bn  # [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        in_k = ks < K - k0
        a = tl.load(a_corner + a_tile, mask=in_m[:, None] & in_k[None, :], other=0.0)
        b = tl.load(b_corner + b_tile, mask=in_k[:, None] & in_n[None, :], other=0.0)
        # fp32 inputs: IEEE products (no TF32); fp16/bf16: tensor cores, fp32 accumulation
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float32)
        a_corner += BLOCK_K * stride_ak
        b_corner += BLOCK_K * stride_bk

    if HAS_BIAS:
        bias = tl.load(bias_ptr + pid_b * stride_biasb + (col0 + cols) * stride_biasn, mask=in_n,
                       other=0.0)
        acc += bias.to(tl.float32)[None, :]
    c_corner = c_ptr + pid_b * stride_cb + row0 * stride_cm + col0 * stride_cn
    c_tile = rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_corner + c_tile, acc.to(c_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


@triton.jit
def _bias_grad_kernel(
    dy_ptr,         # dY [batch, N, C] contiguous
    dbias_ptr,      # dbias [batch, C] contiguous, written: the sum over rows of dY
    N, C,           # rows (batch of the layer) and columns (out features)
    BLOCK_N: tl.constexpr,    # rows per step
    BLOCK_C: tl.constexpr,    # columns per program
):
    # grid (cdiv(C, BLOCK_C), batch): one column strip of block b, walked down its N rows
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = tl.arange(0, BLOCK_N)
    in_c = cols < C
    strip = pid_b * N * C + cols[None, :]  # int64 offset of [b, 0, cols]
    dbias = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offsets = strip + (n0 + rows[:, None]).to(tl.int64) * C
        inside = (rows[:, None] < N - n0) & in_c[None, :]
        dy = tl.load(dy_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        dbias += tl.sum(dy, axis=0)
    tl.store(dbias_ptr + pid_b * C + cols, dbias.to(dbias_ptr.dtype.element_ty), mask=in_c)


# [32, 64] strips: coalesced rows, 16 values a thread with 4 warps (spill-free on 3.6 and 3.9)
_GRAD_BLOCK_N, _GRAD_BLOCK_C, _GRAD_WARPS = 32, 64, 4


# ------------------------------------------------------------------------------------------------
# Launchers

def _batched_matmul(a, a_strides, b, b_strides, c, M, N, K, bias=None):
    """c[b] = a[b] @ b[b] + bias[b] over c's batch; a and b are read through the strides."""
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), c.shape[0])
    _batched_matmul_kernel[grid](
        a, b, c, bias, M, N, K, *a_strides, *b_strides, *c.stride(),
        *(bias.stride() if bias is not None else (0, 0)), HAS_BIAS=bias is not None)


def _check_inputs(x, weight, bias):
    tensors = check_block_linear(x, weight, bias)
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"block_linear: x, weight and bias must share a device, got "
                         f"{[str(t.device) for t in tensors]}")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"block_linear runs on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), "
                         f"got {x.device}")
    # a tile spans < 256 rows + columns, so int32 offsets inside it need strides (and M_out, dY's
    # row stride) below 2^23
    if max([weight.shape[1]] + [s for t in tensors for s in t.stride()[1:]]) >= 2**23:
        raise ValueError("block_linear: a row or column stride (or M_out) is over 2^23, too large "
                         "for the kernels' int32 offsets inside a tile")


def block_linear_forward(x, weight, bias):
    """Y [B, N, M_out] = X W^T + bias, contiguous, in x's dtype."""
    blocks, n, k = x.shape
    m_out = weight.shape[1]
    y = torch.empty((blocks, n, m_out), device=x.device, dtype=x.dtype)
    # A = X [N, K]; B = W^T [K, M_out], read from W [M_out, K] by swapping its strides
    _batched_matmul(x, x.stride(), weight, (weight.stride(0), weight.stride(2), weight.stride(1)),
                    y, n, m_out, k, bias=bias)
    return y


def block_linear_backward(dy, x, weight, need_dx, need_dw, need_dbias):
    """(dX, dW, dbias) from dY; each None unless asked for."""
    blocks, n, k = x.shape
    m_out = weight.shape[1]
    dbias = None
    if need_dbias:
        dy = dy.contiguous()  # the layout of the strip kernel (and of the products below)
        dbias = torch.empty((blocks, m_out), device=x.device, dtype=x.dtype)
        grid = (triton.cdiv(m_out, _GRAD_BLOCK_C), blocks)
        _bias_grad_kernel[grid](dy, dbias, n, m_out, BLOCK_N=_GRAD_BLOCK_N, BLOCK_C=_GRAD_BLOCK_C,
                                num_warps=_GRAD_WARPS)
    dx = dw = None
    if need_dx:  # dX = dY [N, M_out] @ W [M_out, K]
        dx = torch.empty((blocks, n, k), device=x.device, dtype=x.dtype)
        _batched_matmul(dy, dy.stride(), weight, weight.stride(), dx, n, k, m_out)
    if need_dw:  # dW = dY^T [M_out, N] (dY's strides swapped) @ X [N, K]
        dw = torch.empty((blocks, m_out, k), device=x.device, dtype=x.dtype)
        _batched_matmul(dy, (dy.stride(0), dy.stride(2), dy.stride(1)), x, x.stride(), dw,
                        m_out, k, n)
    return dx, dw, dbias


# ------------------------------------------------------------------------------------------------
# Autograd

class BlockLinearFunction(torch.autograd.Function):
    """Saves X and W; nothing else."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        y = block_linear_forward(x, weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @first_order_only("block_linear")
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        return block_linear_backward(dy, x, weight, need_x, need_w, need_b and ctx.has_bias)


def block_linear(x, weight, bias=None):
    """x[b] @ weight[b]^T + bias[b] for every block b, differentiable in x, weight and bias.

    x [B, N, K], weight [B, M_out, K], bias [B, M_out] or None; returns [B, N, M_out] in x's
    dtype. See the module docstring for the constraints.
    """
    _check_inputs(x, weight, bias)
    return BlockLinearFunction.apply(x, weight, bias)


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compilation: every tile of every launch site, for each dtype

def _aot_specs():
    from .aot import KernelSpec

    # The launch sites as the runtime specialises them for contiguous tensors: a stride equal to 1
    # is a constexpr, a None pointer a constexpr None. No divisibility is assumed (odd sizes).
    sites = {
        "fwd": (dict(HAS_BIAS=True), ("stride_ak", "stride_bk", "stride_cn", "stride_biasn")),
        "dx": (dict(HAS_BIAS=False, bias_ptr=None), ("stride_ak", "stride_bn", "stride_cn")),
        "dw": (dict(HAS_BIAS=False, bias_ptr=None), ("stride_am", "stride_bn", "stride_cn")),
    }

    def signature(fn, constexprs, dtype):
        return {name: "constexpr" if name in constexprs else f"*{dtype}" if name.endswith("_ptr")
                else "i32" for name in fn.arg_names}

    matmul = _batched_matmul_kernel.fn  # the @triton.jit function under the autotuner
    specs = []
    for dtype in ("fp32", "fp16", "bf16"):
        for site, (flags, unit_strides) in sites.items():
            for m, n, k, warps, stages in _FP32_TILES if dtype == "fp32" else _HALF_TILES:
                constexprs = {**flags, **dict.fromkeys(unit_strides, 1),
                              "BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}
                specs.append(KernelSpec(
                    f"block_linear_{site}_{dtype}[{m}x{n}x{k},w{warps},s{stages}]",
                    matmul, signature(matmul, constexprs, dtype),
                    constexprs, num_warps=warps, num_stages=stages,
                    expects_wgmma=dtype != "fp32"))  # fp32 is IEEE: FMA units, not tensor cores
        constexprs = dict(BLOCK_N=_GRAD_BLOCK_N, BLOCK_C=_GRAD_BLOCK_C)
        specs.append(KernelSpec(f"block_linear_bias_grad_{dtype}", _bias_grad_kernel,
                                signature(_bias_grad_kernel, constexprs, dtype), constexprs,
                                num_warps=_GRAD_WARPS))
    return specs


AOT_SPECS = _aot_specs()
