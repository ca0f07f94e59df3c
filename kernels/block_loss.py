"""Block-local weighted denoising loss of NoProp-DT, all B blocks in one pass (docs/method.md section 2).

Forward, for predictions u_hat [B, N, d], targets u [N, d] and weights w [B] (fp32):

    losses[b] = w[b] * (1 / N) * sum_n sum_j (u_hat[b, n, j] - u[n, j])^2            -> [B] fp32

With w = snr_weights it is each block's weighted term (`block_loss_ref`: ops/reference.py).
Backward, given dL [B], with c[b] = dL[b] * w[b] * 2 / N:

    d u_hat[b, n, j] = c[b] * (u_hat[b, n, j] - u[n, j])
    d u[n, j]        = - sum_b c[b] * (u_hat[b, n, j] - u[n, j])

w is a constant (it comes from the fixed schedule): it gets no gradient.

Shapes and layout: u_hat and u are viewed as [B, M] and [M] with M = N * d (made contiguous if they
are not); fp32, fp16 or bf16, both the same dtype; arithmetic in fp32, one cast on store.
M must fit in int32; B * M may not (block offsets are int64).

Reduction strategy (forward). A 2-D grid (B, chunks), block index fastest: program (b, c) sums the
squared errors of chunk c of row b into partial[b, c] (fp32 [B, chunks]), then one program per
block sums its row of partials, times w[b] / N. No atomics, so the result is bit-for-bit
deterministic and nothing has to be zeroed first. At most MAX_CHUNKS chunks per block, so the final
sum is one tile; the B programs that read the same chunk of u run side by side and share it in L2.
Backward: one kernel whose program owns a tile of the M axis, reads its tile of u once, and loops
over the B blocks: it writes d u_hat[b, tile] and accumulates d u[tile] in registers. One pass over
u_hat, deterministic, no atomics.

CUDA graphs: safe. Block sizes and grids depend only on shapes; outputs come from torch.empty; no
.item(), .cpu() or branch on a tensor's value; dL and w are read through their strides on the
device (dL of a `.sum()` is an expanded, stride-0 tensor).
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
def _block_loss_partial_kernel(
    u_hat_ptr,    # [B, M] predictions, rows stride_ub apart, contiguous within a row
    u_ptr,        # [M] targets (u flattened), contiguous
    partial_ptr,  # [B, num_chunks] fp32 out: sum of squared errors of one chunk of one row
    stride_ub,    # elements between rows of u_hat (M when contiguous)
    M,            # N * d
    chunk_size,   # elements per program: a multiple of BLOCK
    num_chunks,   # programs along the M axis
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
        acc += diff * diff
    tl.store(partial_ptr + b * num_chunks + chunk, tl.sum(acc, axis=0))


@triton.jit
def _block_loss_finish_kernel(
    partial_ptr,  # [B, num_chunks] fp32 partial sums
    w_ptr,        # [B] fp32 block weights
    out_ptr,      # [B] fp32 out: losses
    stride_w,     # elements between consecutive weights
    num_chunks,   # partial sums per block, <= BLOCK_C
    inv_n,        # 1 / N: the mean over the batch
    BLOCK_C: tl.constexpr,  # >= num_chunks: one tile holds a block's partial sums
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    part = tl.load(partial_ptr + b * num_chunks + offs, mask=offs < num_chunks, other=0.0)
    weight = tl.load(w_ptr + b * stride_w).to(tl.float32)
    tl.store(out_ptr + b, tl.sum(part, axis=0) * weight * inv_n)


@triton.jit
def _block_loss_bwd_kernel(
    u_hat_ptr,     # [B, M] predictions, rows stride_ub apart
    u_ptr,         # [M] targets
    grad_ptr,      # [B] fp32 dL/dlosses, stride_grad apart (0 when expanded)
    w_ptr,         # [B] fp32 block weights, stride_w apart
    du_hat_ptr,    # [B, M] out, u_hat's dtype, rows stride_ub apart
    du_ptr,        # [M] out, u's dtype
    stride_ub,     # elements between rows of u_hat and of du_hat
    stride_grad,   # elements between entries of dL
    stride_w,      # elements between entries of w
    B,             # number of blocks
    M,             # N * d
    two_over_n,    # 2 / N
    BLOCK: tl.constexpr,  # elements of M owned by one program
):
    tile = tl.program_id(0).to(tl.int64)
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    target = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pred_ptrs = u_hat_ptr + offs
    out_ptrs = du_hat_ptr + offs
    du = tl.zeros([BLOCK], dtype=tl.float32)
    for b in range(0, B):
        coef = tl.load(grad_ptr + b * stride_grad) * tl.load(w_ptr + b * stride_w) * two_over_n
        diff = tl.load(pred_ptrs, mask=mask, other=0.0).to(tl.float32) - target
        tl.store(out_ptrs, (coef * diff).to(du_hat_ptr.dtype.element_ty), mask=mask)
        du -= coef * diff
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


def _block_loss_fwd(u_hat: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Losses [B] fp32 of contiguous u_hat [B, N, d], u [N, d] and fp32 w [B]."""
    B, N, d = u_hat.shape
    m = N * d
    block = _pick_block(m)
    tiles = triton.cdiv(m, block)
    tiles_per_chunk = triton.cdiv(tiles, min(tiles, MAX_CHUNKS))
    num_chunks = triton.cdiv(tiles, tiles_per_chunk)   # <= MAX_CHUNKS
    partial = torch.empty(B, num_chunks, device=u_hat.device, dtype=torch.float32)
    _block_loss_partial_kernel[(B, num_chunks)](
        u_hat, u, partial, m, m, tiles_per_chunk * block, num_chunks,
        BLOCK=block, num_warps=NUM_WARPS)
    losses = torch.empty(B, device=u_hat.device, dtype=torch.float32)
    _block_loss_finish_kernel[(B,)](
        partial, w, losses, w.stride(0), num_chunks, 1.0 / N,
        BLOCK_C=MAX_CHUNKS, num_warps=NUM_WARPS)
    return losses


def _block_loss_bwd(grad: torch.Tensor, u_hat: torch.Tensor, u: torch.Tensor, w: torch.Tensor):
    """(d u_hat [B, N, d], d u [N, d]) of contiguous inputs, given dL [B] fp32 (any stride)."""
    B, N, d = u_hat.shape
    m = N * d
    block = _pick_block(m)
    du_hat = torch.empty_like(u_hat)
    du = torch.empty_like(u)
    grad = grad.float()  # no-op for the fp32 losses' gradient
    _block_loss_bwd_kernel[(triton.cdiv(m, block),)](
        u_hat, u, grad, w, du_hat, du, m, grad.stride(0), w.stride(0), B, m, 2.0 / N,
        BLOCK=block, num_warps=NUM_WARPS)
    return du_hat, du


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
        du_hat, du = _block_loss_bwd(grad, u_hat, u, w)
        return (du_hat if ctx.needs_input_grad[0] else None,
                du if ctx.needs_input_grad[1] else None, None)


def block_loss(u_hat: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted per-block losses [B] (fp32) of u_hat [B, N, d] against u [N, d]; see the top."""
    _check_inputs(u_hat, u, w)
    return BlockLossFunction.apply(u_hat, u, w)


def _specs() -> list[KernelSpec]:
    specs = [KernelSpec(
        "block_loss_finish[fp32]", _block_loss_finish_kernel,
        {"partial_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": "*fp32", "stride_w": "i32",
         "num_chunks": "i32", "inv_n": "fp32"},
        {"BLOCK_C": MAX_CHUNKS}, num_warps=NUM_WARPS)]
    for ty in ("fp32", "fp16", "bf16"):
        for block in (SMALL_BLOCK, LARGE_BLOCK):
            specs.append(KernelSpec(
                f"block_loss_partial[{ty},{block}]", _block_loss_partial_kernel,
                {"u_hat_ptr": f"*{ty}", "u_ptr": f"*{ty}", "partial_ptr": "*fp32", "stride_ub": "i32",
                 "M": "i32", "chunk_size": "i32", "num_chunks": "i32"},
                {"BLOCK": block}, num_warps=NUM_WARPS))
            specs.append(KernelSpec(
                f"block_loss_bwd[{ty},{block}]", _block_loss_bwd_kernel,
                {"u_hat_ptr": f"*{ty}", "u_ptr": f"*{ty}", "grad_ptr": "*fp32", "w_ptr": "*fp32",
                 "du_hat_ptr": f"*{ty}", "du_ptr": f"*{ty}", "stride_ub": "i32", "stride_grad": "i32",
                 "stride_w": "i32", "B": "i32", "M": "i32", "two_over_n": "fp32"},
                {"BLOCK": block}, num_warps=NUM_WARPS))
    return specs


AOT_SPECS = _specs()  # every configuration the launchers above may run
