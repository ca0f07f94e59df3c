"""The fused ops' shape and dtype checks (each fault a ValueError naming the op) and the guard on
their backwards (`first_order_only`), shared by the Triton launchers and the C++ ops; triton-free.
"""
import functools

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_noise_injection(y, W, a, s, seed, offset) -> None:
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"noise_injection: W must be [m, d], got shape {tuple(W.shape)}")
    if W.dtype not in FLOAT_DTYPES:
        raise ValueError(f"noise_injection: W must be float32, float16 or bfloat16, got {W.dtype}")
    if y.dim() != 1 or y.dtype != torch.int64:
        raise ValueError(f"noise_injection: y must be a 1-D int64 tensor of labels, "
                         f"got {y.dtype} of shape {tuple(y.shape)}")
    N = y.shape[0]
    for name, t in (("a", a), ("s", s)):
        if (not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.dim() not in (1, 2)
                or (t.dim() == 2 and t.shape[1] != N)):
            raise ValueError(f"noise_injection: {name} must be a 1-D float32 tensor [B] (per "
                             f"block) or a 2-D one [B, N] with N = {N} labels (per example), got "
                             f"{_describe(t)}")
    if a.shape != s.shape:
        raise ValueError(f"noise_injection: a and s must have the same shape, [B] or [B, N], "
                         f"got {tuple(a.shape)} and {tuple(s.shape)}")
    for name, t in (("seed", seed), ("offset", offset)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.numel() != 1:
            raise ValueError(f"noise_injection: {name} must be an int64 tensor with one element "
                             f"(read by the op, never on the host), got {t!r:.80}")


def check_block_loss(u_hat, u, w) -> None:
    if u_hat.dim() != 3 or u.dim() != 2 or w.dim() not in (1, 2):
        raise ValueError(f"block_loss expects u_hat [B, N, d], u [N, d], w [B] or [B, N]; got "
                         f"{tuple(u_hat.shape)}, {tuple(u.shape)}, {tuple(w.shape)}")
    if u_hat.shape[1:] != u.shape or w.shape != u_hat.shape[:w.dim()]:
        raise ValueError(f"block_loss shapes do not match: u_hat {tuple(u_hat.shape)} needs "
                         f"u [N, d] = {tuple(u_hat.shape[1:])} and w [B] = [{u_hat.shape[0]}] "
                         f"(per block) or [B, N] = {list(u_hat.shape[:2])} (per example); got "
                         f"u {tuple(u.shape)}, w {tuple(w.shape)}")
    if u_hat.numel() == 0:
        raise ValueError(f"block_loss needs B, N, d >= 1; got u_hat {tuple(u_hat.shape)}")
    if u_hat.dtype not in FLOAT_DTYPES or u.dtype != u_hat.dtype:
        raise ValueError(f"block_loss needs u_hat and u of one dtype in fp32/fp16/bf16; got "
                         f"{u_hat.dtype} and {u.dtype}")
    if w.dtype != torch.float32:
        raise ValueError(f"block_loss needs fp32 weights w; got {w.dtype}")


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} of shape {tuple(t.shape)}"
    return type(t).__name__


def check_block_linear(x, weight, bias) -> list:
    """Returns the tensors given ([x, weight] and bias if any) for the backend's own checks."""
    if x.dim() != 3 or weight.dim() != 3:
        raise ValueError(f"block_linear expects x [B, N, K] and weight [B, M_out, K], got "
                         f"{list(x.shape)} and {list(weight.shape)}")
    blocks, _, in_features = x.shape
    if weight.shape[0] != blocks or weight.shape[2] != in_features:
        raise ValueError(f"block_linear: weight {list(weight.shape)} does not match x "
                         f"{list(x.shape)} (expected [{blocks}, M_out, {in_features}])")
    if bias is not None and tuple(bias.shape) != (blocks, weight.shape[1]):
        raise ValueError(f"block_linear: bias must be [{blocks}, {weight.shape[1]}], "
                         f"got {list(bias.shape)}")
    if x.numel() == 0 or weight.numel() == 0:
        raise ValueError(f"block_linear: empty input, x {list(x.shape)}, weight {list(weight.shape)}")
    tensors = [x, weight] + ([bias] if bias is not None else [])
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"block_linear supports fp32, fp16 and bf16, got {x.dtype}")
    if any(t.dtype != x.dtype for t in tensors):
        raise ValueError(f"block_linear: x, weight and bias must share a dtype, got "
                         f"{[t.dtype for t in tensors]}")
    return tensors


def check_softmax_head(h, k, c, v) -> list:
    """Returns the tensors given ([h, k, v] and c if any) for the backend's own checks."""
    if h.dim() != 3 or k.dim() != 3 or v.dim() != 2 or (c is not None and c.dim() != 2):
        raise ValueError(f"softmax_head: expected h [B, N, D], k [B, m, D], c [B, m] or None, "
                         f"v [m, d]; got {tuple(h.shape)}, {tuple(k.shape)}, "
                         f"{None if c is None else tuple(c.shape)}, {tuple(v.shape)}")
    (B, N, D), (m, d) = h.shape, v.shape
    if k.shape != (B, m, D) or (c is not None and c.shape != (B, m)):
        raise ValueError(f"softmax_head: with h {tuple(h.shape)} and v {tuple(v.shape)}, k must be "
                         f"{(B, m, D)} and c {(B, m)}; got {tuple(k.shape)}, "
                         f"{None if c is None else tuple(c.shape)}")
    if min(B, N, D, m, d) == 0:
        raise ValueError(f"softmax_head: empty input: B={B}, N={N}, D={D}, m={m}, d={d}")
    tensors = [h, k, v] + ([] if c is None else [c])
    if h.dtype not in FLOAT_DTYPES or any(t.dtype != h.dtype for t in tensors):
        raise ValueError(f"softmax_head: h, k, c, v must share one dtype among fp32, fp16, bf16; "
                         f"got {[t.dtype for t in tensors]}")
    return tensors


def check_attention(q, k, v) -> None:
    """q, k, v: [Z, H, L, Dh] each, one float dtype, one device, every size >= 1."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"causal_attention: {name} must be a 4-d tensor [Z, H, L, Dh], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"causal_attention: {name} must have q's shape {tuple(q.shape)}, "
                             f"got {tuple(t.shape)}")
    if q.numel() == 0:
        raise ValueError(f"causal_attention: empty input, q {tuple(q.shape)} (need Z, H, L, Dh >= 1)")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"causal_attention: q must be float32, float16 or bfloat16, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"causal_attention: {name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"causal_attention: {name} must be on q's device {q.device}, "
                             f"got {t.device}")


def first_order_only(op: str):
    """Decorates a fused op's backward, which autograd cannot differentiate: under create_graph=True
    (grad mode on in the backward) it raises rather than silently drop the op's second-order term
    (kernels/README.md). torch's once_differentiable misses it when the incoming gradient does not
    require grad."""
    def decorate(backward):
        @functools.wraps(backward)
        def checked(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(f"{op}: no double backward (create_graph=True): its backward is "
                                   f"not differentiable; use the plain-PyTorch reference for "
                                   f"higher-order derivatives")
            return backward(ctx, *grads)
        return checked
    return decorate
