"""Softmax-embedding head, computed the way flash attention computes attention.

A DT block ends in `u_hat = softmax(h K^T + c) V`: one query h per example, the keys K are the rows
of the block's last FC weight, c is its bias, and the values V are the class embedding W_embed,
shared by every block. For a vocabulary of m ~ 50k classes the logits [B, N, m] must never exist,
so the forward walks over the classes in chunks of BLOCK_M with an online softmax:

    S_j = H K_j^T + c_j                     one chunk of logits, in registers only
    mx' = max(mx, rowmax S_j);   alpha = exp(mx - mx')
    l   = alpha l + rowsum exp(S_j - mx')
    acc = alpha acc + exp(S_j - mx') V_j
    O   = acc / l;   L = mx + log l          the log-sum-exp, kept for the backward

The backward recomputes each chunk of logits from H, K, c and L, with P = exp(S - L):

    Delta = rowsum(dO * O);   dP = dO V^T;   dS = P * (dP - Delta)
    dH = dS K;   dK_b = dS_b^T H_b;   dc_b = colsum dS_b;   dV = sum_b P_b^T dO_b

in three kernels, each recomputing S: `_bwd_dh`, one program per (block, row tile), loops over
class chunks for dH and writes Delta (with sm_90's 64-row tiles, `_bwd_delta` writes it first); `_bwd_dk`, one per (block, class chunk), loops over row tiles
for dK and dc; `_bwd_dv`, one per class chunk, loops over blocks and row tiles for dV, summed in
that program's registers in fp32: deterministic, no atomics, and no [B, m, d] buffer to sum after
(515 MB in fp32 for 10 blocks, m = 50257, d = 256). The price: cdiv(m, BLOCK_M) programs only, few
for a small m, where the whole op is small anyway. dK and dV in one kernel (flash attention's way)
would save one recomputation of S, but holding k, v, dk and dv at once spilled registers.

Shapes: h [B, N, D], k [B, m, D], c [B, m] or None, v [m, d] -> o [B, N, d] (and L [B, N] fp32).
Constraints: D <= 128 (the DT block's FUSION_HIDDEN) and d <= 256, each held whole in one tile, a
configuration per tile compiled ahead of time (AOT_SPECS); m * max(D, d) < 2**31 (class
offsets within one block are int32); h, k, c, v share one dtype among fp32, fp16, bf16 and one
device. Accumulation is in fp32 with one cast on store (gradients) or after it (o); fp32 products
use input_precision="ieee", so the interpreter, the GPU and the fp32 reference agree.
Saved for the backward: h, k, c, v, L and o in fp32, never the logits. o stays fp32 ([B, N, d], small)
because with a sharp softmax dP - Delta cancels: Delta from an fp16 o carries o's rounding, which
dK = dS^T H multiplies by |h| (a 10x larger dK error in fp16 with h scaled by 30).
Masked classes: a bias of -inf gives a class probability 0, wherever its chunk falls (a chunk
whose classes are all masked so far is shifted by 0, not by its -inf max). A row with every class
masked (c[b] all -inf) has no softmax: as torch.softmax, it gives NaN, in o[b] and in the
gradients the row reaches (dh[b], dk[b], dc[b] and all of dv); the C++ op does the same.
Safe inside a CUDA graph: no host sync and no branch on a tensor's value.
"""
import inspect

import torch
import triton
import triton.language as tl

from noprop_fast.ops.checks import check_softmax_head, first_order_only
from noprop_fast.ops.reference import softmax_head as softmax_head_ref  # noqa: F401

from .aot import KernelSpec
from .releases import for_release

MAX_D, MAX_DV = 128, 256  # D and d are each held whole in one tile
DELTA_ROWS = 16  # rows per program of _bwd_delta (4 warps): a row-sum, bound by memory
BLOCK_D, DV_TILES = 128, (32, 128, 256)  # D's tile, and the tiles `_config` picks from for d


# Every tensor's last dimension is contiguous (SoftmaxHead sees to it), so only the outer strides
# are arguments. Pointers are built from their own base at each use: an [rows, D] int64 offset tensor
# shared by a load before a loop and a store after it would stay live in registers through the loop.

@triton.jit
def _load_keys(k_ptr, c_ptr, b, offs_m, mask_m, offs_d, mask_d, stride_kb, stride_km, stride_cb):
    """Block b's chunk of keys K[b, offs_m, :] and biases c[b, offs_m] (fp32); masked entries 0."""
    k = tl.load(k_ptr + b * stride_kb + offs_m[:, None] * stride_km + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    c = tl.load(c_ptr + b * stride_cb + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    return k, c


@triton.jit
def _row_tile_probs(h_ptr, do_ptr, lse_ptr, b, offs_n, mask_n, offs_d, mask_d, offs_dv, mask_dv,
                    stride_hb, stride_hn, stride_gb, stride_gn, stride_lb, k, c, mask_m):
    """Rows offs_n of block b: H and dO tiles, and P^T [BLOCK_M, BLOCK_N] recomputed from the keys
    and the saved log-sum-exp (padded classes and rows get probability 0)."""
    h = tl.load(h_ptr + b * stride_hb + offs_n[:, None] * stride_hn + offs_d[None, :],
                mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    do = tl.load(do_ptr + b * stride_gb + offs_n[:, None] * stride_gn + offs_dv[None, :],
                 mask=mask_n[:, None] & mask_dv[None, :], other=0.0)
    lse = tl.load(lse_ptr + b * stride_lb + offs_n, mask=mask_n, other=float("inf"))
    st = tl.dot(k, tl.trans(h), input_precision="ieee") + c[:, None]  # S^T [BLOCK_M, BLOCK_N]
    pt = tl.exp(tl.where(mask_m[:, None], st, float("-inf")) - lse[None, :])
    return h, do, pt


@triton.jit
def _fwd(h_ptr, k_ptr, c_ptr, v_ptr, o_ptr, lse_ptr,
         stride_hb, stride_hn,   # h [B, N, D]
         stride_kb, stride_km,   # k [B, m, D]
         stride_cb,              # c [B, m]
         stride_vm,              # v [m, d]
         stride_ob, stride_on,   # o [B, N, d], fp32
         stride_lb,              # lse [B, N], fp32
         N, M, D, DV,            # rows per block, classes, hidden width, embedding width
         BLOCK_N: tl.constexpr,  # rows per program
         BLOCK_M: tl.constexpr,  # classes per chunk of the online softmax
         BLOCK_D: tl.constexpr,  # >= D
         BLOCK_DV: tl.constexpr):  # >= d
    pid_b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    mask_n, mask_d, mask_dv = offs_n < N, offs_d < D, offs_dv < DV
    h = tl.load(h_ptr + pid_b * stride_hb + offs_n[:, None] * stride_hn + offs_d[None, :],
                mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    row_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        k, c = _load_keys(k_ptr, c_ptr, pid_b, offs_m, mask_m, offs_d, mask_d,
                          stride_kb, stride_km, stride_cb)
        s = tl.dot(h, tl.trans(k), input_precision="ieee") + c[None, :]  # [BLOCK_N, BLOCK_M]
        s = tl.where(mask_m[None, :], s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        # -inf while every class so far is masked (a -inf bias): shift by 0 there, so that the
        # exps are exp(-inf) = 0 and not exp(-inf + inf) = NaN
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp(row_max - shift)
        p = tl.exp(s - shift[:, None])
        row_sum = row_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs_m[:, None] * stride_vm + offs_dv[None, :],
                    mask=mask_m[:, None] & mask_dv[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        row_max = new_max
    tl.store(o_ptr + pid_b * stride_ob + offs_n[:, None] * stride_on + offs_dv[None, :],
             acc * (1.0 / row_sum)[:, None], mask=mask_n[:, None] & mask_dv[None, :])
    tl.store(lse_ptr + pid_b * stride_lb + offs_n, row_max + tl.log(row_sum), mask=mask_n)


@triton.jit
def _bwd_dh(h_ptr, k_ptr, c_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dh_ptr,
            stride_hb, stride_hn,   # h [B, N, D]; dh has the same strides
            stride_kb, stride_km,   # k [B, m, D]
            stride_cb,              # c [B, m]
            stride_vm,              # v [m, d]
            stride_ob, stride_on,   # o [B, N, d], fp32
            stride_gb, stride_gn,   # do [B, N, d]
            stride_lb,              # lse and delta [B, N], fp32
            N, M, D, DV,            # rows per block, classes, hidden width, embedding width
            BLOCK_N: tl.constexpr,  # rows per program
            BLOCK_M: tl.constexpr,  # classes per chunk
            BLOCK_D: tl.constexpr,  # >= D
            BLOCK_DV: tl.constexpr,  # >= d
            DELTA_GIVEN: tl.constexpr):  # Delta is in delta_ptr (_bwd_delta), else computed here
    pid_b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    mask_n, mask_d, mask_dv = offs_n < N, offs_d < D, offs_dv < DV
    mask_hd, mask_ov = mask_n[:, None] & mask_d[None, :], mask_n[:, None] & mask_dv[None, :]
    h = tl.load(h_ptr + pid_b * stride_hb + offs_n[:, None] * stride_hn + offs_d[None, :],
                mask=mask_hd, other=0.0)
    do = tl.load(do_ptr + pid_b * stride_gb + offs_n[:, None] * stride_gn + offs_dv[None, :],
                 mask=mask_ov, other=0.0)
    if DELTA_GIVEN:  # the 64-row tiles: dO and fp32 O at once, here, would spill registers
        delta = tl.load(delta_ptr + pid_b * stride_lb + offs_n, mask=mask_n, other=0.0)
    else:
        o = tl.load(o_ptr + pid_b * stride_ob + offs_n[:, None] * stride_on + offs_dv[None, :],
                    mask=mask_ov, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o, 1)  # [BLOCK_N]
        tl.store(delta_ptr + pid_b * stride_lb + offs_n, delta, mask=mask_n)
    lse = tl.load(lse_ptr + pid_b * stride_lb + offs_n, mask=mask_n, other=float("inf"))  # P = 0
    dh = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        k, c = _load_keys(k_ptr, c_ptr, pid_b, offs_m, mask_m, offs_d, mask_d,
                          stride_kb, stride_km, stride_cb)
        s = tl.dot(h, tl.trans(k), input_precision="ieee") + c[None, :]  # [BLOCK_N, BLOCK_M]
        p = tl.exp(tl.where(mask_m[None, :], s, float("-inf")) - lse[:, None])
        v = tl.load(v_ptr + offs_m[:, None] * stride_vm + offs_dv[None, :],
                    mask=mask_m[:, None] & mask_dv[None, :], other=0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")  # [BLOCK_N, BLOCK_M]
        ds = p * (dp - delta[:, None])
        dh += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    tl.store(dh_ptr + pid_b * stride_hb + offs_n[:, None] * stride_hn + offs_d[None, :],
             dh.to(dh_ptr.dtype.element_ty), mask=mask_hd)


@triton.jit
def _bwd_delta(o_ptr, do_ptr, delta_ptr,
               stride_ob, stride_on,   # o [B, N, d], fp32
               stride_gb, stride_gn,   # do [B, N, d]
               stride_lb,              # delta [B, N], fp32
               N, DV,                  # rows per block, embedding width
               BLOCK_N: tl.constexpr,  # rows per program
               BLOCK_DV: tl.constexpr):  # >= d
    """Delta = rowsum(dO * O) [B, N] ahead of `_bwd_dh` where its tiles cannot also hold it."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_dv < DV)[None, :]
    do = tl.load(do_ptr + pid_b * stride_gb + offs_n[:, None] * stride_gn + offs_dv[None, :],
                 mask=mask, other=0.0)
    o = tl.load(o_ptr + pid_b * stride_ob + offs_n[:, None] * stride_on + offs_dv[None, :],
                mask=mask, other=0.0)
    tl.store(delta_ptr + pid_b * stride_lb + offs_n, tl.sum(do.to(tl.float32) * o, 1), mask=mask_n)


@triton.jit
def _bwd_dk(h_ptr, k_ptr, c_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dc_ptr,
            stride_hb, stride_hn,   # h [B, N, D]
            stride_kb, stride_km,   # k [B, m, D]; dk has the same strides
            stride_cb,              # c [B, m]; dc has the same strides
            stride_vm,              # v [m, d]
            stride_gb, stride_gn,   # do [B, N, d]
            stride_lb,              # lse and delta [B, N], fp32
            N, M, D, DV,            # rows per block, classes, hidden width, embedding width
            BLOCK_N: tl.constexpr,  # rows per step of the loop
            BLOCK_M: tl.constexpr,  # classes per program
            BLOCK_D: tl.constexpr,  # >= D
            BLOCK_DV: tl.constexpr):  # >= d
    pid_b = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    mask_m, mask_d, mask_dv = offs_m < M, offs_d < D, offs_dv < DV
    mask_kd = mask_m[:, None] & mask_d[None, :]
    k, c = _load_keys(k_ptr, c_ptr, pid_b, offs_m, mask_m, offs_d, mask_d,
                      stride_kb, stride_km, stride_cb)
    v = tl.load(v_ptr + offs_m[:, None] * stride_vm + offs_dv[None, :],
                mask=mask_m[:, None] & mask_dv[None, :], other=0.0)
    dk = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dc = tl.zeros([BLOCK_M], tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        h, do, pt = _row_tile_probs(h_ptr, do_ptr, lse_ptr, pid_b, offs_n, mask_n, offs_d, mask_d,
                                    offs_dv, mask_dv, stride_hb, stride_hn, stride_gb, stride_gn,
                                    stride_lb, k, c, mask_m)
        delta = tl.load(delta_ptr + pid_b * stride_lb + offs_n, mask=mask_n, other=0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision="ieee")  # dP^T
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(h.dtype), h, input_precision="ieee")
        dc += tl.sum(dst, 1)
    tl.store(dk_ptr + pid_b * stride_kb + offs_m[:, None] * stride_km + offs_d[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=mask_kd)
    tl.store(dc_ptr + pid_b * stride_cb + offs_m, dc.to(dc_ptr.dtype.element_ty), mask=mask_m)


@triton.jit
def _bwd_dv(h_ptr, k_ptr, c_ptr, do_ptr, lse_ptr, dv_ptr,
            stride_hb, stride_hn,   # h [B, N, D]
            stride_kb, stride_km,   # k [B, m, D]
            stride_cb,              # c [B, m]
            stride_vm,              # dv [m, d]
            stride_gb, stride_gn,   # do [B, N, d]
            stride_lb,              # lse [B, N], fp32
            B, N, M, D, DV,         # blocks, rows per block, classes, hidden and embedding widths
            BLOCK_N: tl.constexpr,  # rows per step of the inner loop
            BLOCK_M: tl.constexpr,  # classes per program
            BLOCK_D: tl.constexpr,  # >= D
            BLOCK_DV: tl.constexpr):  # >= d
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    mask_m, mask_d, mask_dv = offs_m < M, offs_d < D, offs_dv < DV
    dv = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)  # summed over every block and row
    for b32 in range(0, B):
        b = tl.cast(b32, tl.int64)  # int64 before it multiplies a stride
        k, c = _load_keys(k_ptr, c_ptr, b, offs_m, mask_m, offs_d, mask_d,
                          stride_kb, stride_km, stride_cb)
        for start in range(0, N, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            _, do, pt = _row_tile_probs(h_ptr, do_ptr, lse_ptr, b, offs_n, mask_n, offs_d, mask_d,
                                        offs_dv, mask_dv, stride_hb, stride_hn, stride_gb,
                                        stride_gn, stride_lb, k, c, mask_m)
            dv += tl.dot(pt.to(do.dtype), do, input_precision="ieee")
    tl.store(dv_ptr + offs_m[:, None] * stride_vm + offs_dv[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_dv[None, :])


# (kernel, fp32 inputs, d's tile) -> (BLOCK_N, BLOCK_M, num_warps, num_stages). Each entry is the
# largest tiles found to compile without register spills on sm_80 and sm_90 (tests/test_aot.py):
# ptxas's choices are not monotone in the tile sizes, so this is a table, not a rule. fp32 products
# run on FMA units (input_precision="ieee"), whose operands take many more registers than a tensor
# core's: smaller tiles there. 64-row/class tiles in fp16/bf16 are one warpgroup's wgmma on sm_90.
_CONFIGS = {
    ("fwd", False, 32): (64, 64, 4, 2), ("fwd", False, 128): (64, 32, 8, 2),
    ("fwd", False, 256): (64, 32, 8, 2), ("bwd_dh", False, 32): (32, 32, 4, 1),
    ("bwd_dh", False, 128): (32, 32, 4, 1), ("bwd_dh", False, 256): (32, 32, 8, 1),
    ("bwd_dk", False, 32): (16, 64, 4, 1), ("bwd_dk", False, 128): (16, 64, 4, 1),
    ("bwd_dk", False, 256): (16, 32, 4, 1), ("bwd_dv", False, 32): (32, 64, 4, 1),
    ("bwd_dv", False, 128): (32, 32, 4, 1), ("bwd_dv", False, 256): (16, 32, 4, 2),
    ("fwd", True, 32): (32, 16, 8, 2), ("fwd", True, 128): (32, 16, 8, 2),
    ("fwd", True, 256): (32, 16, 8, 2), ("bwd_dh", True, 32): (32, 16, 8, 2),
    ("bwd_dh", True, 128): (32, 16, 8, 2), ("bwd_dh", True, 256): (32, 16, 8, 2),
    ("bwd_dk", True, 32): (16, 16, 4, 1), ("bwd_dk", True, 128): (16, 16, 4, 1),
    ("bwd_dk", True, 256): (32, 16, 8, 1), ("bwd_dv", True, 32): (32, 16, 4, 1),
    ("bwd_dv", True, 128): (32, 16, 4, 1), ("bwd_dv", True, 256): (16, 16, 8, 1),
}
# measured with Triton 3.9; an older release takes the replacements listed in releases.py
_CONFIGS = {key: for_release("softmax_head", key, config) for key, config in _CONFIGS.items()}


# sm_90 (Hopper), fp16/bf16: the backward's tiles that lead its products with 64 rows (dH) or 64
# classes (dK, dV), one warpgroup's wgmma (HGMMA), where _CONFIGS' smaller tiles would run on
# mma.sync. At d = 256 (the FineWeb head) these kernels are compute-bound. Found to compile without
# spills for sm_90 (with and without alignment hints); dH's 64 rows spill if it also computes Delta
# (dO and fp32 O at once), so `_bwd_delta` does that first. On sm_80 these tiles spill, and sm_80
# has no wgmma: it keeps _CONFIGS. Key (kernel, d's tile); value as _CONFIGS'.
_HOPPER_CONFIGS = {
    ("bwd_dh", 256): (64, 16, 4, 1),
    ("bwd_dk", 256): (16, 64, 4, 1),
    ("bwd_dv", 256): (16, 64, 8, 1),
}
# measured with Triton 3.9; an older release takes the replacements listed in releases.py
_HOPPER_CONFIGS = {key: for_release("softmax_head", ("sm90", *key), config)
                   for key, config in _HOPPER_CONFIGS.items()}


def _target_arch(device: torch.device) -> int:
    """80 or 90 (the config tables' targets): the CUDA device's compute capability, read from the
    driver's cached properties (no sync); 80 for a CPU tensor (the interpreter)."""
    if device.type != "cuda":
        return 80
    major, minor = torch.cuda.get_device_capability(device)
    return 90 if major == 9 else 80


def _config(kernel: str, dtype: torch.dtype, d: int, arch: int = 80) -> dict:
    """Tiles, warps and stages of one kernel for inputs of `dtype`, embedding width d, and the
    target `arch` (90: Hopper's wgmma tiles where _HOPPER_CONFIGS has them)."""
    block_dv = next(t for t in DV_TILES if t >= d)
    hopper = _HOPPER_CONFIGS.get((kernel, block_dv)) if arch == 90 and dtype != torch.float32 else None
    block_n, block_m, warps, stages = hopper or _CONFIGS[kernel, dtype == torch.float32, block_dv]
    cfg = {"BLOCK_N": block_n, "BLOCK_M": block_m, "BLOCK_D": BLOCK_D, "BLOCK_DV": block_dv,
           "num_warps": warps, "num_stages": stages}
    if kernel == "bwd_dh":  # its 64-row tiles read Delta from `_bwd_delta`
        cfg["DELTA_GIVEN"] = hopper is not None
    return cfg


def _check(h, k, c, v):
    tensors = check_softmax_head(h, k, c, v)
    D, d = h.shape[2], v.shape[1]
    if D > MAX_D or d > MAX_DV:
        raise ValueError(f"softmax_head: needs D <= {MAX_D} and d <= {MAX_DV} (each is held whole "
                         f"in one tile), got D={D}, d={d}; use softmax_head_ref beyond that")
    if any(t.device != h.device for t in tensors):
        raise ValueError(f"softmax_head: h, k, c, v must be on one device; got "
                         f"{[t.device for t in tensors]}")


def _forward(h, k, c, v):
    """o [B, N, d] and lse [B, N], both fp32; c is a tensor here (zeros for no bias)."""
    (B, N, D), (m, d) = h.shape, v.shape
    o = torch.empty(B, N, d, device=h.device, dtype=torch.float32)
    lse = torch.empty(B, N, device=h.device, dtype=torch.float32)
    cfg = _config("fwd", h.dtype, d)
    _fwd[(B, triton.cdiv(N, cfg["BLOCK_N"]))](
        h, k, c, v, o, lse, h.stride(0), h.stride(1), k.stride(0), k.stride(1), c.stride(0),
        v.stride(0), o.stride(0), o.stride(1), lse.stride(0), N, m, D, d, **cfg)
    return o, lse


def _backward(h, k, c, v, o, lse, do):
    """dh, dk, dc, dv for the upstream gradient do [B, N, d]."""
    (B, N, D), (m, d) = h.shape, v.shape
    do = do if do.stride(-1) == 1 else do.contiguous()
    dh, dk, dc, dv = torch.empty_like(h), torch.empty_like(k), torch.empty_like(c), torch.empty_like(v)
    arch = _target_arch(h.device)
    delta = torch.empty_like(lse)  # rowsum(dO * O): written by _bwd_dh, read by _bwd_dk
    cfg = _config("bwd_dh", h.dtype, d, arch)
    if cfg["DELTA_GIVEN"]:
        _bwd_delta[(B, triton.cdiv(N, DELTA_ROWS))](
            o, do, delta, o.stride(0), o.stride(1), do.stride(0), do.stride(1), lse.stride(0), N, d,
            BLOCK_N=DELTA_ROWS, BLOCK_DV=cfg["BLOCK_DV"])
    _bwd_dh[(B, triton.cdiv(N, cfg["BLOCK_N"]))](
        h, k, c, v, o, do, lse, delta, dh, h.stride(0), h.stride(1), k.stride(0), k.stride(1),
        c.stride(0), v.stride(0), o.stride(0), o.stride(1), do.stride(0), do.stride(1),
        lse.stride(0), N, m, D, d, **cfg)
    cfg = _config("bwd_dk", h.dtype, d, arch)
    _bwd_dk[(B, triton.cdiv(m, cfg["BLOCK_M"]))](
        h, k, c, v, do, lse, delta, dk, dc, h.stride(0), h.stride(1), k.stride(0), k.stride(1),
        c.stride(0), v.stride(0), do.stride(0), do.stride(1), lse.stride(0), N, m, D, d, **cfg)
    cfg = _config("bwd_dv", h.dtype, d, arch)
    _bwd_dv[(triton.cdiv(m, cfg["BLOCK_M"]),)](
        h, k, c, do, lse, dv, h.stride(0), h.stride(1), k.stride(0), k.stride(1), c.stride(0),
        dv.stride(0), do.stride(0), do.stride(1), lse.stride(0), B, N, m, D, d, **cfg)
    return dh, dk, dc, dv


class SoftmaxHead(torch.autograd.Function):
    """Saves h, k, c, v, o and the log-sum-exp L [B, N]; the backward recomputes the logits."""

    @staticmethod
    def forward(ctx, h, k, c, v):
        ctx.has_bias = c is not None
        if c is None:  # a zero bias: one kernel for both cases; [B, m] is small next to k
            c = torch.zeros(k.shape[:2], device=k.device, dtype=k.dtype)
        # contiguous (a no-op for the model's tensors), so that dh, dk, dc, dv = empty_like(...)
        # have the strides the kernels address them with
        h, k, c, v = (t.contiguous() for t in (h, k, c, v))
        o, lse = _forward(h, k, c, v)
        ctx.save_for_backward(h, k, c, v, o, lse)
        return o.to(h.dtype)  # the same tensor for fp32

    @staticmethod
    @first_order_only("softmax_head")
    def backward(ctx, do):
        h, k, c, v, o, lse = ctx.saved_tensors
        dh, dk, dc, dv = _backward(h, k, c, v, o, lse, do)
        return dh, dk, (dc if ctx.has_bias else None), dv


def softmax_head(h: torch.Tensor, k: torch.Tensor, c: torch.Tensor | None,
                 v: torch.Tensor) -> torch.Tensor:
    """softmax(h k^T + c) v without the [B, N, m] logits: h [B, N, D], k [B, m, D], c [B, m] or
    None, v [m, d] -> [B, N, d]; differentiable in all four. See the module docstring."""
    _check(h, k, c, v)
    return SoftmaxHead.apply(h, k, c, v)


def _aot_specs() -> list[KernelSpec]:
    """Every configuration the launchers can pick: each kernel, dtype and tile of d."""
    specs = []
    for kernel, fn in (("fwd", _fwd), ("bwd_dh", _bwd_dh), ("bwd_dk", _bwd_dk), ("bwd_dv", _bwd_dv)):
        args = [a for a, p in inspect.signature(fn.fn).parameters.items()
                if p.annotation is not tl.constexpr]  # .fn: jitted or interpreted alike
        for dtype, name in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            signature = {a: ("*fp32" if a in ("o_ptr", "lse_ptr", "delta_ptr") else
                             f"*{name}" if a.endswith("_ptr") else "i32") for a in args}
            for block_dv in DV_TILES:
                hopper = dtype != torch.float32 and (kernel, block_dv) in _HOPPER_CONFIGS
                for arch, suffix in ((80, ""), (90, ",sm90")) if hopper else ((80, ""),):
                    cfg = _config(kernel, dtype, block_dv, arch)
                    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
                    # wgmma needs the 64 rows of one warpgroup in the tile that leads the products
                    lead = cfg["BLOCK_N"] if kernel in ("fwd", "bwd_dh") else cfg["BLOCK_M"]
                    specs.append(KernelSpec(
                        f"softmax_head_{kernel}[{name},d{block_dv}{suffix}]", fn, signature, cfg,
                        num_warps=warps, num_stages=stages,
                        expects_wgmma=dtype != torch.float32 and lead >= 64,
                        archs=(90,) if suffix else (80, 90) if not hopper else (80,)))
    args = [a for a, p in inspect.signature(_bwd_delta.fn).parameters.items()
            if p.annotation is not tl.constexpr]
    for name in ("fp16", "bf16"):
        signature = {a: ("*fp32" if a in ("o_ptr", "delta_ptr") else f"*{name}" if a.endswith("_ptr")
                         else "i32") for a in args}
        for block_dv in DV_TILES:
            if ("bwd_dh", block_dv) in _HOPPER_CONFIGS:
                specs.append(KernelSpec(f"softmax_head_bwd_delta[{name},d{block_dv}]", _bwd_delta,
                                        signature, {"BLOCK_N": DELTA_ROWS, "BLOCK_DV": block_dv},
                                        num_warps=4, archs=(90,)))
    return specs


AOT_SPECS = _aot_specs()
