"""Cross-entropy of a linear classifier over a large vocabulary, without the full logits tensor.

    loss = mean_i [ logsumexp_v (z_i . W_v + b_v) - (z_i . W_{y_i} + b_{y_i}) ]

z [M, d] (M = batch x positions), W [V, d], b [V] or None, y [M]. The logits (1.6 GB in fp32 for
GPT-2's vocabulary at M = 8 x 1024) exist one chunk of rows at a time, at most about 64 MB. With
G = softmax(logits) - onehot(y) the gradient, dz = G W / M, dW = G^T z / M, db = colsum(G) / M, is
computed in the forward while each chunk's logits are at hand (a backward pass would recompute the
matmuls) and only scaled by the backward; under `torch.no_grad()` nothing is stored. Arithmetic in
fp32, gradients cast back to the inputs' dtypes. The reference: `reference.linear_cross_entropy`.
"""
import torch
import torch.nn.functional as F

from .checks import first_order_only

CHUNK_ELEMENTS = 2 ** 24  # logits per chunk: 64 MB in fp32


def _chunks(z, w32, bias, target, chunk_elements: int):
    """(rows, z's rows in fp32, their targets, their logits [rows, V] fp32) chunk by chunk."""
    b32 = None if bias is None else bias.float()
    step = max(1, chunk_elements // max(w32.shape[0], 1))
    for start in range(0, z.shape[0], step):
        rows = slice(start, start + step)
        zc = z[rows].float()
        yield rows, zc, target[rows], F.linear(zc, w32, b32)


def _check(z, weight, bias, target):
    if z.dim() != 2 or weight.dim() != 2 or z.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: z [M, d] and weight [V, d] expected, got "
                         f"{list(z.shape)} and {list(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"linear_cross_entropy: bias [V={weight.shape[0]}] expected, got {list(bias.shape)}")
    if target.shape != (z.shape[0],):
        raise ValueError(f"linear_cross_entropy: target [M={z.shape[0]}] expected, got {list(target.shape)}")


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, weight, bias, target, chunk_elements):
        m = z.shape[0]
        need_grad = any(ctx.needs_input_grad[:3])
        w32 = weight.float()
        total = torch.zeros((), dtype=torch.float32, device=z.device)
        dz = torch.empty(z.shape, dtype=torch.float32, device=z.device) if need_grad else None
        dw = torch.zeros(w32.shape, dtype=torch.float32, device=z.device) if need_grad else None
        db = torch.zeros(w32.shape[0], dtype=torch.float32, device=z.device) \
            if need_grad and bias is not None else None
        for rows, zc, yc, logits in _chunks(z, w32, bias, target, chunk_elements):
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, yc.unsqueeze(1)).squeeze(1)).sum()
            if need_grad:
                g = torch.softmax(logits, dim=-1)                     # G = softmax - onehot
                g.scatter_add_(1, yc.unsqueeze(1), torch.full_like(yc, -1, dtype=g.dtype).unsqueeze(1))
                g /= m
                dz[rows] = g @ w32
                dw.addmm_(g.t(), zc)
                if db is not None:
                    db += g.sum(0)
        ctx.dtypes = (z.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.save_for_backward(dz, dw, db)
        return total / m

    @staticmethod
    @first_order_only("linear_cross_entropy")
    def backward(ctx, grad):
        dz, dw, db = ctx.saved_tensors
        z_dtype, w_dtype, b_dtype = ctx.dtypes
        out = [None if t is None else (t * grad).to(dtype)
               for t, dtype in ((dz, z_dtype), (dw, w_dtype), (db, b_dtype))]
        return out[0], out[1], out[2], None, None


def linear_cross_entropy(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         target: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Mean cross-entropy of `F.linear(z, weight, bias)` against `target`, in row chunks of at most
    `chunk_elements` logits. Returns an fp32 scalar, differentiable in z, weight and bias."""
    _check(z, weight, bias, target)
    if z.shape[0] == 0:
        raise ValueError("linear_cross_entropy: no rows")
    return _LinearCrossEntropy.apply(z, weight, bias, target, chunk_elements)


@torch.no_grad()
def cross_entropy_rows(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       target: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS,
                       temperatures: torch.Tensor | None = None) -> torch.Tensor:
    """Every row's cross-entropy [M] (fp32), in chunks of rows; for evaluation (no gradient).
    temperatures [S]: the logits divided by each, [S, M]."""
    _check(z, weight, bias, target)
    scales = None if temperatures is None else 1.0 / temperatures.float().view(-1, 1, 1)
    out = torch.empty(z.shape[0] if scales is None else (scales.shape[0], z.shape[0]),
                      dtype=torch.float32, device=z.device)
    for rows, _, yc, logits in _chunks(z, weight.float(), bias, target, chunk_elements):
        if scales is not None:
            logits = logits * scales                                      # [S, rows, V]
        out[..., rows] = (torch.logsumexp(logits, dim=-1)
                          - logits.gather(-1, yc.expand(*logits.shape[:-1]).unsqueeze(-1))[..., 0])
    return out
