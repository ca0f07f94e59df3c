"""Block-local weighted denoising loss of NoProp, all B blocks in one pass (docs/method.md, 2).

Forward, for predictions u_hat [B, N, d], targets u [N, d] and weights w (fp32) given per block, [B]
(NoProp-DT), or per example, [B, N] (NoProp-CT / FM: B = 1 and every example has its own time):

    losses[b] = (1 / N) sum_n w[b, n] sum_j (u_hat[b, n, j] - u[n, j])^2              -> [B] fp32

where a [B] weight reads as w[b, n] = w[b]. With w = snr_weights it is each block's weighted term
(`block_loss_ref`: ops/reference.py). Backward, given dL [B], with c[b, n] = dL[b] w[b, n] 2 / N:

    d u_hat[b, n, j] = c[b, n] (u_hat[b, n, j] - u[n, j])
    d u[n, j]        = - sum_b c[b, n] (u_hat[b, n, j] - u[n, j])
    d w[b, n]        = dL[b] (1 / N) sum_j (u_hat[b, n, j] - u[n, j])^2   (when w requires grad;
                                                                          a [B] w: summed over n)

NoProp-DT's w is a schedule constant: its backward computes no dw.

Shapes and layout: u_hat and u are viewed as [B, M] and [M] with M = N * d (made contiguous if they
are not); fp32, fp16 or bf16, both the same dtype; arithmetic in fp32, one cast on store.
M must fit in int32; B * M may not (block offsets are int64). Per-example weights are read at
w[b, i // d] for the flat index i = n d + j; a [B] weight in the forward is applied once per block.

Reduction strategy (forward). A 2-D grid (B, chunks), block index fastest: program (b, c) sums the
(weighted) squared errors of chunk c of row b into partial[b, c] (fp32 [B, chunks]), then one
program per block sums its row of partials, times w[b] (a [B] weight) and 1 / N. No atomics, so the
result is bit-for-bit deterministic and nothing has to be zeroed first. At most MAX_CHUNKS chunks
per block, so the final sum is one tile; the B programs that read the same chunk of u run side by
side and share it in L2. Backward: one kernel whose program owns a tile of the M axis, reads its
tile of u once, and loops over the B blocks: it writes d u_hat[b, tile] and accumulates d u[tile]
in registers. One pass over u_hat, deterministic, no atomics. For dw it also sums the squared errors
of each example's run of d elements within the tile (a segmented scan) and adds that sum to dw[b, n]
with one atomic per (example, tile): an example spans at most two tiles when d <= BLOCK + 1, and two
fp32 additions into zero commute, so dw is deterministic there too (beyond, to fp32 rounding).

CUDA graphs: safe. Block sizes, grids and kernel variants depend only on shapes and requires_grad;
outputs come from torch.empty / zeros; no .item(), .cpu() or branch on a tensor's value; dL and w
are read through their strides on the device (dL of a `.sum()` is an expanded, stride-0 tensor).
"""
import os

import torch
import triton
import triton.language as tl

from noprop_fast.ops.checks import check_block_loss, first_order_only
from noprop_fast.ops.reference import block_loss as block_loss_ref  # noqa: F401

from .aot import KernelSpec

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
SMALL_BLOCK, LARGE_BLOCK = 256, 1024  # elements of M per tile; large once M > LARGE_FROM
LARGE_FROM = 2 ** 18                  # beyond this a 1024 tile still gives >= 256 tiles per block
MAX_CHUNKS = 512                      # forward programs per block; also the final sum's tile
NUM_WARPS = 4


@triton.jit
def _segment_sum(value, starts, next_value, next_starts):
    """The combine of a segmented sum scan: a run restarts where its start flag is set."""
    return tl.where(next_starts != 0, next_value, value + next_value), starts | next_starts


@triton.jit
def _block_loss_partial_kernel(
    u_hat_ptr,    # [B, M] predictions, rows stride_ub apart, contiguous within a row
    u_ptr,        # [M] targets (u flattened), contiguous
    w_ptr,        # [B, N] fp32 per-example weights through (stride_wb, stride_wn) (ROW_WEIGHTS)
    partial_ptr,  # [B, num_chunks] fp32 out: (weighted) sum of squared errors of one chunk of a row
    stride_ub,    # elements between rows of u_hat (M when contiguous)
    stride_wb,    # elements between blocks of w
    stride_wn,    # elements between examples of w
    M,            # N * d
    D,            # d: elements of one example
    chunk_size,   # elements per program: a multiple of BLOCK
    num_chunks,   # programs along the M axis
    ROW_WEIGHTS: tl.constexpr,  # weight each squared error by w[b, n] (else: w[b], in the finish)
    BLOCK: tl.constexpr,  # elements per loop step
):
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1).to(tl.int64)
    row = u_hat_ptr + b * stride_ub
    first = chunk * chunk_size
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, chunk_size, BLOCK):
        offs = first + start + tl.arange(0, BLOCK)
        mask = offs < M
        pred = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
        target = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        diff = pred - target
        if ROW_WEIGHTS:
            weight = tl.load(w_ptr + b * stride_wb + (offs // D) * stride_wn, mask=mask, other=0.0)
            acc += weight * diff * diff
        else:
            acc += diff * diff
    tl.store(partial_ptr + b * num_chunks + chunk, tl.sum(acc, axis=0))


@triton.jit
def _block_loss_finish_kernel(
    partial_ptr,  # [B, num_chunks] fp32 partial sums
    w_ptr,        # [B] fp32 block weights (not read with ROW_WEIGHTS: applied in the partials)
    out_ptr,      # [B] fp32 out: losses
    stride_w,     # elements between consecutive weights
    num_chunks,   # partial sums per block, <= BLOCK_C
    inv_n,        # 1 / N: the mean over the batch
    ROW_WEIGHTS: tl.constexpr,  # the partial sums are weighted already
    BLOCK_C: tl.constexpr,  # >= num_chunks: one tile holds a block's partial sums
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    part = tl.load(partial_ptr + b * num_chunks + offs, mask=offs < num_chunks, other=0.0)
    if ROW_WEIGHTS:
        tl.store(out_ptr + b, tl.sum(part, axis=0) * inv_n)
    else:
        weight = tl.load(w_ptr + b * stride_w).to(tl.float32)
        tl.store(out_ptr + b, tl.sum(part, axis=0) * weight * inv_n)


@triton.jit
def _block_loss_bwd_kernel(
    u_hat_ptr,     # [B, M] predictions, rows stride_ub apart
    u_ptr,         # [M] targets
    grad_ptr,      # [B] fp32 dL/dlosses, stride_grad apart (0 when expanded)
    w_ptr,         # [B, N] fp32 weights through (stride_wb, stride_wn); [B]: stride_wn unused
    du_hat_ptr,    # [B, M] out, u_hat's dtype, rows stride_ub apart
    du_ptr,        # [M] out, u's dtype
    dw_ptr,        # [B, N] fp32 out, zero-filled, accumulated atomically (NEED_DW)
    stride_ub,     # elements between rows of u_hat and of du_hat
    stride_grad,   # elements between entries of dL
    stride_wb,     # elements between blocks of w
    stride_wn,     # elements between examples of w
    B,             # number of blocks
    N,             # examples per block
    M,             # N * d
    D,             # d: elements of one example
    two_over_n,    # 2 / N
    ROW_WEIGHTS: tl.constexpr,  # w[b, n] read per element; else w[b] once per block
    NEED_DW: tl.constexpr,      # accumulate dw[b, n] = dL[b] / N sum_j diff^2
    BLOCK: tl.constexpr,  # elements of M owned by one program
):
    tile = tl.program_id(0).to(tl.int64)
    local = tl.arange(0, BLOCK)
    offs = tile * BLOCK + local
    mask = offs < M
    example = offs // D  # n of each element (not computed in the [B] path, which never uses it)
    target = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pred_ptrs = u_hat_ptr + offs
    out_ptrs = du_hat_ptr + offs
    if ROW_WEIGHTS:
        weight_ptrs = w_ptr + example * stride_wn  # block b = 0
    if NEED_DW:
        dw_ptrs = dw_ptr + example  # block b = 0
        column = offs - example * D
        starts = (column == 0).to(tl.int32)  # where an example's run of d elements begins
        ends = mask & ((column == D - 1) | (local == BLOCK - 1))  # where a run ends in this tile
    du = tl.zeros([BLOCK], dtype=tl.float32)
    for b in range(0, B):
        upstream = tl.load(grad_ptr + b * stride_grad)
        diff = tl.load(pred_ptrs, mask=mask, other=0.0).to(tl.float32) - target
        if ROW_WEIGHTS:
            coef = upstream * tl.load(weight_ptrs, mask=mask, other=0.0) * two_over_n
            weight_ptrs += stride_wb
        else:
            coef = upstream * tl.load(w_ptr + b * stride_wb) * two_over_n
        tl.store(out_ptrs, (coef * diff).to(du_hat_ptr.dtype.element_ty), mask=mask)
        du -= coef * diff
        if NEED_DW:  # each run's sum of squared errors sits at its last element after the scan
            runs, _ = tl.associative_scan((diff * diff, starts), 0, _segment_sum)
            tl.atomic_add(dw_ptrs, runs * (upstream * 0.5 * two_over_n), mask=ends)
            dw_ptrs += N
        pred_ptrs += stride_ub  # pointer steps keep every offset within int32
        out_ptrs += stride_ub
    tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)


def _pick_block(m: int) -> int:
    return SMALL_BLOCK if m <= LARGE_FROM else LARGE_BLOCK


def _check_inputs(u_hat: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> None:
    check_block_loss(u_hat, u, w)
    if u_hat.numel() // u_hat.shape[0] >= 2 ** 31:
        raise ValueError(f"block_loss needs N * d < 2^31; got {u_hat.shape[1]} * {u_hat.shape[2]}")
    if not (u_hat.device == u.device == w.device):
        raise ValueError(f"block_loss inputs must be on one device; got u_hat on {u_hat.device}, "
                         f"u on {u.device}, w on {w.device}")
    if u_hat.device.type != "cuda" and not INTERPRETER:
        raise ValueError(f"block_loss runs on a CUDA device (or under TRITON_INTERPRET=1); got "
                         f"{u_hat.device}; use block_loss_ref on the CPU")


def _per_example(w: torch.Tensor, N: int) -> torch.Tensor:
    """A [B] or [B, N] weight as a [B, N] view: the [B] one with stride 0 over n."""
    return w.unsqueeze(1).expand(-1, N) if w.dim() == 1 else w


def _block_loss_fwd(u_hat: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Losses [B] fp32 of contiguous u_hat [B, N, d], u [N, d] and fp32 w [B] or [B, N]."""
    B, N, d = u_hat.shape
    m = N * d
    block = _pick_block(m)
    tiles = triton.cdiv(m, block)
    tiles_per_chunk = triton.cdiv(tiles, min(tiles, MAX_CHUNKS))
    num_chunks = triton.cdiv(tiles, tiles_per_chunk)   # <= MAX_CHUNKS
    row_weights = w.dim() == 2
    rows = _per_example(w, N)
    partial = torch.empty(B, num_chunks, device=u_hat.device, dtype=torch.float32)
    _block_loss_partial_kernel[(B, num_chunks)](
        u_hat, u, rows, partial, m, rows.stride(0), rows.stride(1), m, d,
        tiles_per_chunk * block, num_chunks, ROW_WEIGHTS=row_weights, BLOCK=block,
        num_warps=NUM_WARPS)
    losses = torch.empty(B, device=u_hat.device, dtype=torch.float32)
    _block_loss_finish_kernel[(B,)](
        partial, w, losses, w.stride(0), num_chunks, 1.0 / N, ROW_WEIGHTS=row_weights,
        BLOCK_C=MAX_CHUNKS, num_warps=NUM_WARPS)
    return losses


def _block_loss_bwd(grad: torch.Tensor, u_hat: torch.Tensor, u: torch.Tensor, w: torch.Tensor,
                    need_dw: bool = False):
    """(d u_hat [B, N, d], d u [N, d], dw in w's shape or None) of contiguous inputs, given dL [B]
    fp32 (any stride); dw only when need_dw."""
    B, N, d = u_hat.shape
    m = N * d
    block = _pick_block(m)
    du_hat = torch.empty_like(u_hat)
    du = torch.empty_like(u)
    grad = grad.float()  # no-op for the fp32 losses' gradient
    rows = _per_example(w, N)
    dw = torch.zeros(B, N, device=u_hat.device, dtype=torch.float32) if need_dw else None
    _block_loss_bwd_kernel[(triton.cdiv(m, block),)](
        u_hat, u, grad, rows, du_hat, du, dw if need_dw else grad, m, grad.stride(0),
        rows.stride(0), rows.stride(1), B, N, m, d, 2.0 / N, ROW_WEIGHTS=w.dim() == 2,
        NEED_DW=need_dw, BLOCK=block, num_warps=NUM_WARPS)
    if need_dw and w.dim() == 1:
        dw = dw.sum(1)  # a [B] weight's gradient: summed over its N examples
    return du_hat, du, dw


class BlockLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u_hat, u, w):
        u_hat, u = u_hat.contiguous(), u.contiguous()
        ctx.save_for_backward(u_hat, u, w)
        return _block_loss_fwd(u_hat, u, w)

    @staticmethod
    @first_order_only("block_loss")
    def backward(ctx, grad):
        u_hat, u, w = ctx.saved_tensors
        need_du_hat, need_du, need_dw = ctx.needs_input_grad
        du_hat, du, dw = _block_loss_bwd(grad, u_hat, u, w, need_dw=need_dw)
        return (du_hat if need_du_hat else None), (du if need_du else None), dw


def block_loss(u_hat: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted per-block losses [B] (fp32) of u_hat [B, N, d] against u [N, d], w [B] (per block)
    or [B, N] (per example); differentiable in all three. See the top."""
    _check_inputs(u_hat, u, w)
    return BlockLossFunction.apply(u_hat, u, w)


def _specs() -> list[KernelSpec]:
    specs = []
    for rows in (False, True):
        specs.append(KernelSpec(
            "block_loss_finish[fp32,rows]" if rows else "block_loss_finish[fp32]",
            _block_loss_finish_kernel,
            {"partial_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": "*fp32", "stride_w": "i32",
             "num_chunks": "i32", "inv_n": "fp32"},
            {"ROW_WEIGHTS": rows, "BLOCK_C": MAX_CHUNKS}, num_warps=NUM_WARPS))
    for ty in ("fp32", "fp16", "bf16"):
        for block in (SMALL_BLOCK, LARGE_BLOCK):
            for rows in (False, True):  # weights per block, per example
                specs.append(KernelSpec(
                    f"block_loss_partial[{ty},{block}{',rows' if rows else ''}]",
                    _block_loss_partial_kernel,
                    {"u_hat_ptr": f"*{ty}", "u_ptr": f"*{ty}", "w_ptr": "*fp32",
                     "partial_ptr": "*fp32", "stride_ub": "i32", "stride_wb": "i32",
                     "stride_wn": "i32", "M": "i32", "D": "i32", "chunk_size": "i32",
                     "num_chunks": "i32"},
                    {"ROW_WEIGHTS": rows, "BLOCK": block}, num_warps=NUM_WARPS))
            # the backward's variants: w constant or learned, per block or per example
            for rows, need_dw in ((False, False), (True, False), (False, True), (True, True)):
                tags = "".join(tag for tag, on in ((",rows", rows), (",dw", need_dw)) if on)
                specs.append(KernelSpec(
                    f"block_loss_bwd[{ty},{block}{tags}]", _block_loss_bwd_kernel,
                    {"u_hat_ptr": f"*{ty}", "u_ptr": f"*{ty}", "grad_ptr": "*fp32",
                     "w_ptr": "*fp32", "du_hat_ptr": f"*{ty}", "du_ptr": f"*{ty}",
                     "dw_ptr": "*fp32", "stride_ub": "i32", "stride_grad": "i32",
                     "stride_wb": "i32", "stride_wn": "i32", "B": "i32", "N": "i32", "M": "i32",
                     "D": "i32", "two_over_n": "fp32"},
                    {"ROW_WEIGHTS": rows, "NEED_DW": need_dw, "BLOCK": block},
                    num_warps=NUM_WARPS))
    return specs


AOT_SPECS = _specs()  # every configuration the launchers above may run
