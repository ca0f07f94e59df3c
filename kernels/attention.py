"""Causal scaled dot-product attention, flash-attention style: forward and backward.

For every (z, h) of Z x H heads (Z = blocks x batch, flattened by the caller), with queries,
keys and values Q, K, V [L, Dh] and scale s (1/sqrt(Dh) unless given):

    S = s Q K^T,   S_ij = -inf for j > i (causal);   P = softmax_rows(S);   O = P V

The forward never forms S: one program per (z*h, tile of BLOCK_M query rows) walks the key tiles
from the first to the diagonal (tiles wholly above it are skipped) with an online softmax:

    S_j = s Q K_j^T (masked);  mx' = max(mx, rowmax S_j);  alpha = exp(mx - mx')
    l   = alpha l + rowsum exp(S_j - mx');   acc = alpha acc + exp(S_j - mx') V_j
    O   = acc / l;   LSE = mx + log l        (fp32 [Z, H, L], saved for the backward)

The backward recomputes each tile of P from Q, K and the saved LSE, P = exp(S - LSE), and with

    Delta = rowsum(dO * O);   dP = dO V^T;   dS = P * (dP - Delta)
    dQ = s dS K;   dK = s dS^T Q;   dV = P^T dO

runs three kernels, deterministic and without atomics: `_bwd_delta` writes Delta [Z, H, L];
`_bwd_dq`, one program per (z*h, query tile), loops over the key tiles up to the diagonal for dQ;
`_bwd_dkdv`, one per (z*h, key tile), loops over the query tiles from the diagonal down for dK
and dV. Each recomputes S; nothing of size L x L is stored. (Delta inside `_bwd_dq`, which reads
dO anyway, would save a launch, but holding O's tile there spilled registers at Dh = 128.)

Shapes: q, k, v [Z, H, L, Dh] -> o [Z, H, L, Dh] in q's dtype. Constraints: Dh in (16, 32, 64,
128), held whole in one tile; L >= 1, any (rows and keys past L are masked); q, k, v share one
dtype among fp32, fp16, bf16 and one device. Any strides whose last one is 1 are taken as they
are (e.g. q, k, v sliced out of one packed qkv tensor); a tensor with another last stride is
copied once with .contiguous() in the autograd Function, and so is such an upstream gradient.
Offsets within one head are int32 (L * row stride < 2**31, checked; a dO past it is copied);
head offsets are int64. Arithmetic is fp32 (fp32 products with
input_precision="ieee", so the interpreter, the GPU and the fp32 reference agree; fp16/bf16
products on tensor cores with P and dS rounded to the input dtype, as flash attention does), with
one cast on store. Saved for the backward: q, k, v, o and LSE, never P.
Safe inside a CUDA graph: no host sync and no branch on a tensor's value (no autotuning).
"""
import inspect

import torch
import triton
import triton.language as tl

from noprop_fast.ops.checks import check_attention, first_order_only
from noprop_fast.ops.reference import causal_attention as causal_attention_ref  # noqa: F401

from .aot import KernelSpec
from .releases import for_release

HEAD_DIMS = (16, 32, 64, 128)  # Dh is one tile; each has its own configuration (AOT_SPECS)
DELTA_ROWS = 64  # rows per program of _bwd_delta (num_warps=4): a row-sum, bound by memory


# Every input's last dimension is contiguous (CausalAttention sees to it), so only the outer
# strides are arguments; o, LSE, Delta, dq, dk, dv are allocated here, contiguous, and addressed
# from (z*h, L, Dh). Query tiles run last-first: a causal query tile's work grows with its index,
# so the longest programs start first and the short ones fill in behind them.

@triton.jit
def _fwd(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
         stride_qz, stride_qh, stride_ql,  # q [Z, H, L, Dh]
         stride_kz, stride_kh, stride_kl,  # k [Z, H, L, Dh]
         stride_vz, stride_vh, stride_vl,  # v [Z, H, L, Dh]
         H, L,                   # heads, sequence length
         scale,                  # fp32 factor of Q K^T
         HEAD_DIM: tl.constexpr,  # Dh, one tile
         BLOCK_M: tl.constexpr,  # query rows per program
         BLOCK_N: tl.constexpr):  # keys per step of the online softmax
    pid_zh = tl.program_id(0).to(tl.int64)
    z, h = pid_zh // H, pid_zh % H
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < L
    q = tl.load(q_ptr + z * stride_qz + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)
    k_head = k_ptr + z * stride_kz + h * stride_kh
    v_head = v_ptr + z * stride_vz + h * stride_vh
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, tl.minimum(start_m + BLOCK_M, L), BLOCK_N):  # up to the diagonal
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < L
        k = tl.load(k_head + offs_n[:, None] * stride_kl + offs_d[None, :], mask=mask_n[:, None],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_M, BLOCK_N]
        # keys past a row's own position (and so past L for rows < L) get probability 0
        s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))  # finite: key 0 is in the first tile
        alpha = tl.exp(row_max - new_max)
        p = tl.exp(s - new_max[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_head + offs_n[:, None] * stride_vl + offs_d[None, :], mask=mask_n[:, None],
                    other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        row_max = new_max
    rows = pid_zh * L + offs_m  # row index into the contiguous [Z*H, L] outputs
    tl.store(o_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :],
             (acc * (1.0 / row_sum)[:, None]).to(o_ptr.dtype.element_ty), mask=mask_m[:, None])
    tl.store(lse_ptr + rows, row_max + tl.log(row_sum), mask=mask_m)


@triton.jit
def _bwd_delta(o_ptr, do_ptr, delta_ptr,
               stride_gz, stride_gh, stride_gl,  # do [Z, H, L, Dh]
               H, L,                   # heads, sequence length
               HEAD_DIM: tl.constexpr,  # Dh, one tile
               BLOCK_M: tl.constexpr):  # rows per program
    pid_zh = tl.program_id(0).to(tl.int64)
    z, h = pid_zh // H, pid_zh % H
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < L
    rows = pid_zh * L + offs_m  # into o [Z*H, L, Dh] and Delta [Z*H, L]
    do = tl.load(do_ptr + z * stride_gz + h * stride_gh + offs_m[:, None] * stride_gl
                 + offs_d[None, :], mask=mask_m[:, None], other=0.0)
    o = tl.load(o_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_m[:, None], other=0.0)
    tl.store(delta_ptr + rows, tl.sum(do.to(tl.float32) * o.to(tl.float32), 1), mask=mask_m)


@triton.jit
def _bwd_dq(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
            stride_qz, stride_qh, stride_ql,  # q [Z, H, L, Dh]
            stride_kz, stride_kh, stride_kl,  # k [Z, H, L, Dh]
            stride_vz, stride_vh, stride_vl,  # v [Z, H, L, Dh]
            stride_gz, stride_gh, stride_gl,  # do [Z, H, L, Dh]
            H, L,                   # heads, sequence length
            scale,                  # fp32 factor of Q K^T
            HEAD_DIM: tl.constexpr,  # Dh, one tile
            BLOCK_M: tl.constexpr,  # query rows per program
            BLOCK_N: tl.constexpr):  # keys per step of the loop
    pid_zh = tl.program_id(0).to(tl.int64)
    z, h = pid_zh // H, pid_zh % H
    start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < L
    rows = pid_zh * L + offs_m  # into dq [Z*H, L, Dh] and LSE, Delta [Z*H, L]
    do = tl.load(do_ptr + z * stride_gz + h * stride_gh + offs_m[:, None] * stride_gl
                 + offs_d[None, :], mask=mask_m[:, None], other=0.0)
    lse = tl.load(lse_ptr + rows, mask=mask_m, other=float("inf"))  # rows past L: P = 0
    delta = tl.load(delta_ptr + rows, mask=mask_m, other=0.0)
    q = tl.load(q_ptr + z * stride_qz + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)
    k_head = k_ptr + z * stride_kz + h * stride_kh
    v_head = v_ptr + z * stride_vz + h * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, tl.minimum(start_m + BLOCK_M, L), BLOCK_N):  # up to the diagonal
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < L
        k = tl.load(k_head + offs_n[:, None] * stride_kl + offs_d[None, :], mask=mask_n[:, None],
                    other=0.0)
        v = tl.load(v_head + offs_n[:, None] * stride_vl + offs_d[None, :], mask=mask_n[:, None],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_M, BLOCK_N]
        p = tl.exp(tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf")) - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    tl.store(dq_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask_m[:, None])


@triton.jit
def _bwd_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
              stride_qz, stride_qh, stride_ql,  # q [Z, H, L, Dh]
              stride_kz, stride_kh, stride_kl,  # k [Z, H, L, Dh]
              stride_vz, stride_vh, stride_vl,  # v [Z, H, L, Dh]
              stride_gz, stride_gh, stride_gl,  # do [Z, H, L, Dh]
              H, L,                   # heads, sequence length
              scale,                  # fp32 factor of Q K^T
              HEAD_DIM: tl.constexpr,  # Dh, one tile
              BLOCK_M: tl.constexpr,  # query rows per step of the loop
              BLOCK_N: tl.constexpr):  # keys per program
    pid_zh = tl.program_id(0).to(tl.int64)
    z, h = pid_zh // H, pid_zh % H
    start_n = tl.program_id(1) * BLOCK_N  # key tiles in order: the first has the most work
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_n = offs_n < L
    k = tl.load(k_ptr + z * stride_kz + h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :],
                mask=mask_n[:, None], other=0.0)
    v = tl.load(v_ptr + z * stride_vz + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :],
                mask=mask_n[:, None], other=0.0)
    q_head = q_ptr + z * stride_qz + h * stride_qh
    do_head = do_ptr + z * stride_gz + h * stride_gh
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    # from the query tile holding the diagonal: earlier queries never see these keys
    for start_m in range((start_n // BLOCK_M) * BLOCK_M, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < L
        q = tl.load(q_head + offs_m[:, None] * stride_ql + offs_d[None, :], mask=mask_m[:, None],
                    other=0.0)
        do = tl.load(do_head + offs_m[:, None] * stride_gl + offs_d[None, :], mask=mask_m[:, None],
                     other=0.0)
        rows = pid_zh * L + offs_m
        lse = tl.load(lse_ptr + rows, mask=mask_m, other=float("inf"))  # rows past L: P = 0
        delta = tl.load(delta_ptr + rows, mask=mask_m, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision="ieee") * scale  # S^T [BLOCK_N, BLOCK_M]
        pt = tl.exp(tl.where(offs_m[None, :] >= offs_n[:, None], st, float("-inf")) - lse[None, :])
        dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee")
        dpt = tl.dot(v, tl.trans(do), input_precision="ieee")  # dP^T
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision="ieee")
    rows_n = pid_zh * L + offs_n
    tl.store(dk_ptr + rows_n[:, None] * HEAD_DIM + offs_d[None, :],
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=mask_n[:, None])
    tl.store(dv_ptr + rows_n[:, None] * HEAD_DIM + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=mask_n[:, None])


# (kernel, fp32 inputs, Dh) -> (BLOCK_M, BLOCK_N, num_warps, num_stages): the largest tiles found
# to compile without register spills on sm_80 and sm_90, aligned or not (tests/test_aot.py; ptxas's
# choices are not monotone in the tiles, so this is a table, not a rule). fp32 products run on the
# FMA units (input_precision="ieee"), whose operands take many more registers than a tensor core's:
# smaller tiles there. fp16/bf16: the tile that leads every product (query rows in _fwd and _bwd_dq,
# keys in _bwd_dkdv) is 64 or 128 rows, one or two warpgroups' wgmma on sm_90.
_CONFIGS = {
    ("fwd", True, 16): (64, 64, 4, 2), ("fwd", True, 32): (64, 64, 8, 2),
    ("fwd", True, 64): (64, 32, 8, 1), ("fwd", True, 128): (16, 64, 8, 2),
    ("bwd_dq", True, 16): (128, 32, 8, 2), ("bwd_dq", True, 32): (128, 32, 8, 1),
    ("bwd_dq", True, 64): (64, 32, 8, 1), ("bwd_dq", True, 128): (64, 16, 8, 2),
    ("bwd_dkdv", True, 16): (64, 64, 4, 1), ("bwd_dkdv", True, 32): (32, 64, 8, 1),
    ("bwd_dkdv", True, 64): (32, 32, 8, 2), ("bwd_dkdv", True, 128): (16, 64, 8, 2),
    ("fwd", False, 16): (128, 64, 4, 3), ("fwd", False, 32): (128, 64, 4, 3),
    ("fwd", False, 64): (128, 64, 8, 3), ("fwd", False, 128): (64, 64, 8, 3),
    ("bwd_dq", False, 16): (128, 64, 4, 3), ("bwd_dq", False, 32): (128, 64, 4, 3),
    ("bwd_dq", False, 64): (128, 64, 8, 3), ("bwd_dq", False, 128): (64, 64, 8, 3),
    ("bwd_dkdv", False, 16): (64, 128, 4, 3), ("bwd_dkdv", False, 32): (64, 128, 8, 3),
    ("bwd_dkdv", False, 64): (32, 128, 8, 1), ("bwd_dkdv", False, 128): (32, 64, 8, 3),
}
# measured with Triton 3.9; an older release takes the replacements listed in releases.py
_CONFIGS = {key: for_release("attention", key, config) for key, config in _CONFIGS.items()}


def _config(kernel: str, dtype: torch.dtype, head_dim: int) -> dict:
    """Tiles, warps and stages of one kernel for inputs of `dtype` and head width Dh."""
    block_m, block_n, warps, stages = _CONFIGS[kernel, dtype == torch.float32, head_dim]
    return {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n,
            "num_warps": warps, "num_stages": stages}


def _head_strides(t: torch.Tensor) -> tuple:
    return t.stride(0), t.stride(1), t.stride(2)


def _forward(q, k, v, scale):
    """o [Z, H, L, Dh] in q's dtype and LSE [Z, H, L] in fp32, both contiguous."""
    Z, H, L, Dh = q.shape
    o = torch.empty(Z, H, L, Dh, device=q.device, dtype=q.dtype)
    lse = torch.empty(Z, H, L, device=q.device, dtype=torch.float32)
    cfg = _config("fwd", q.dtype, Dh)
    _fwd[(Z * H, triton.cdiv(L, cfg["BLOCK_M"]))](
        q, k, v, o, lse, *_head_strides(q), *_head_strides(k), *_head_strides(v), H, L, scale, **cfg)
    return o, lse


def _backward(q, k, v, o, lse, do, scale):
    """dq, dk, dv (contiguous, in q's dtype) for the upstream gradient do [Z, H, L, Dh]."""
    Z, H, L, Dh = q.shape
    if do.stride(-1) != 1 or L * do.stride(2) >= 2 ** 31:  # the kernels' int32 in-head offsets
        do = do.contiguous()
    dq, dk, dv = (torch.empty(Z, H, L, Dh, device=q.device, dtype=q.dtype) for _ in range(3))
    delta = torch.empty_like(lse)  # rowsum(dO * O) [Z, H, L], fp32
    _bwd_delta[(Z * H, triton.cdiv(L, DELTA_ROWS))](
        o, do, delta, *_head_strides(do), H, L, HEAD_DIM=Dh, BLOCK_M=DELTA_ROWS)
    strides = (*_head_strides(q), *_head_strides(k), *_head_strides(v), *_head_strides(do))
    cfg = _config("bwd_dq", q.dtype, Dh)
    _bwd_dq[(Z * H, triton.cdiv(L, cfg["BLOCK_M"]))](
        q, k, v, do, lse, delta, dq, *strides, H, L, scale, **cfg)
    cfg = _config("bwd_dkdv", q.dtype, Dh)
    _bwd_dkdv[(Z * H, triton.cdiv(L, cfg["BLOCK_N"]))](
        q, k, v, do, lse, delta, dk, dv, *strides, H, L, scale, **cfg)
    return dq, dk, dv


class CausalAttention(torch.autograd.Function):
    """Saves q, k, v, o and LSE [Z, H, L]; the backward recomputes P tile by tile."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        # a unit last stride for the kernels; a no-op for views of a packed qkv tensor
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        o, lse = _forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    @first_order_only("causal_attention")
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        return (*_backward(q, k, v, o, lse, do, ctx.scale), None)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v without the [L, L] matrix: q, k, v [Z, H, L, Dh]
    (one dtype among fp32, fp16, bf16; Dh in 16, 32, 64, 128) -> o [Z, H, L, Dh] in q's dtype.
    scale, a Python number (never a tensor: reading one would sync), defaults to 1/sqrt(Dh).
    Differentiable in q, k, v. See the module docstring."""
    check_attention(q, k, v)
    Dh = q.shape[-1]
    if Dh not in HEAD_DIMS:
        raise ValueError(f"causal_attention: head width Dh must be one of {HEAD_DIMS} (held whole "
                         f"in one tile), got q {tuple(q.shape)}; use causal_attention_ref otherwise")
    if q.shape[2] * max(t.stride(2) for t in (q, k, v)) >= 2 ** 31:
        raise ValueError(f"causal_attention: offsets within one head must fit in int32, got L = "
                         f"{q.shape[2]} rows {max(t.stride(2) for t in (q, k, v))} elements apart")
    scale = Dh ** -0.5 if scale is None else float(scale)
    return CausalAttention.apply(q, k, v, scale)


def _aot_specs() -> list[KernelSpec]:
    """Every configuration the launchers can pick: each kernel, dtype and head width."""
    specs = []
    for kernel, fn in (("fwd", _fwd), ("bwd_delta", _bwd_delta), ("bwd_dq", _bwd_dq),
                       ("bwd_dkdv", _bwd_dkdv)):
        args = [a for a, p in inspect.signature(fn.fn).parameters.items()
                if p.annotation is not tl.constexpr]  # .fn: jitted or interpreted alike
        for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            signature = {a: ("*fp32" if a in ("lse_ptr", "delta_ptr") else f"*{name}"
                             if a.endswith("_ptr") else "fp32" if a == "scale" else "i32")
                         for a in args}
            for head_dim in HEAD_DIMS:
                if kernel == "bwd_delta":
                    specs.append(KernelSpec(f"attention_bwd_delta[{name},dh{head_dim}]", fn, signature,
                                            {"HEAD_DIM": head_dim, "BLOCK_M": DELTA_ROWS}))
                    continue
                cfg = _config(kernel, dtype, head_dim)
                warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                # wgmma needs the 64 rows of one warpgroup in the tile that leads the products
                lead = cfg["BLOCK_N"] if kernel == "bwd_dkdv" else cfg["BLOCK_M"]
                specs.append(KernelSpec(
                    f"attention_{kernel}[{name},dh{head_dim},{cfg['BLOCK_M']}x{cfg['BLOCK_N']},"
                    f"w{warps},s{stages}]", fn, signature, cfg, num_warps=warps, num_stages=stages,
                    expects_wgmma=dtype != torch.float32 and lead >= 64))
    return specs


AOT_SPECS = _aot_specs()
