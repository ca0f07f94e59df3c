"""The plain-PyTorch reference of every op: the default path of the engine, and what the Triton
kernels (kernels/) and the C++ ops (ops/cpp.py) are held to. The maths: docs/method.md sections
2 (noise injection, block loss), 3 (softmax head) and 7 (attention, the vocabulary's CE). Imports
torch only, so that it runs wherever torch does.
"""
import torch
import torch.nn.functional as F

_MASK32 = 0xFFFFFFFF
_PHILOX_ROUNDS = 10                            # triton.language.random.N_ROUNDS_DEFAULT
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_INT32_TO_UNIFORM = 4.6566127342e-10           # largest scale with (2^31 - 1) * scale < 1 in fp32
_TWO_PI = 6.283185307179586


def _accumulate(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# ------------------------------------------------------------------------------------------------
# Noise: z[b] = a[b] W[y] + s[b] eps[b]

def _per_row(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A [B] (per block) or [B, N] (per example) coefficient as [B, 1, 1] or [B, N, 1]."""
    return (scale.view(-1, 1, 1) if scale.dim() == 1 else scale.unsqueeze(-1)).to(dtype)


def noisy_latents(u: torch.Tensor, input_scale: torch.Tensor, noise_scale: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
    """z[b, n] = input_scale[b, n] u[n] + noise_scale[b, n] noise[b, n]: u [N, d], scales [B] (one
    per block) or [B, N] (one per example), noise [B, N, d] -> [B, N, d] in u's dtype."""
    return _per_row(input_scale, u.dtype) * u.unsqueeze(0) + _per_row(noise_scale, u.dtype) * noise


def noise_injection(y, W, a, s, noise=None):
    """z [B, N, d] = a W[y] + s eps in W's dtype (fp32 arithmetic), a and s [B] (per block) or
    [B, N] (per example); differentiable in W, and in a and s where they require it.
    eps: the next normals of the stream `noise` (a PhiloxNoise: those the fused ops draw),
    torch.randn where it is None, or `noise` itself where it is a tensor [B, N, d] (tests)."""
    accumulate = _accumulate(W.dtype)
    shape = (a.shape[0], y.shape[0], W.shape[1])
    if isinstance(noise, torch.Tensor):
        eps = noise.to(accumulate)
    elif noise is None:
        eps = torch.randn(shape, device=y.device, dtype=accumulate)
    else:
        eps = noise.normals(shape, y.device).to(accumulate)
    return noisy_latents(W[y].to(accumulate), a.to(accumulate), s.to(accumulate), eps).to(W.dtype)


def _umul32(c: int, x: torch.Tensor):
    """(high, low) 32-bit halves of c * x for a 32-bit constant c and int64 x in [0, 2^32); x is
    split into 16-bit halves so that no product exceeds 2^48 (int64 never overflows)."""
    lo_part, hi_part = c * (x & 0xFFFF), c * (x >> 16)
    high = (hi_part + (lo_part >> 16)) >> 16
    low = (((hi_part & 0xFFFF) << 16) + lo_part) & _MASK32
    return high, low


def philox_4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = _PHILOX_ROUNDS):
    """Philox-4x32 (Salmon et al. 2011) on int64 tensors holding uint32 values, as triton's philox_impl."""
    for _ in range(rounds):
        hi_b, lo_b = _umul32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _umul32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _MASK32, (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_randint(seed: int, offsets: torch.Tensor):
    """The first two words of tl.randint4x(seed, offsets) for int64 offsets, as int64 in [0, 2^32):
    counter (offset's low 32 bits, its high 32 bits, 0, 0), key (seed's low and high 32 bits)."""
    offsets = offsets.to(torch.int64)
    zero = torch.zeros_like(offsets)
    c0, c1, _, _ = philox_4x32(offsets & _MASK32, (offsets >> 32) & _MASK32, zero, zero,
                               int(seed) & _MASK32, (int(seed) >> 32) & _MASK32)
    return c0, c1


def _uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """triton's uint_to_uniform_float for 32 bits: bitcast to int32, fold negatives (~x), scale."""
    x = torch.where(x >= 2**31, x - 2**32, x)  # the int32 bitcast
    x = torch.where(x < 0, ~x, x)               # in [0, 2^31)
    return x.to(torch.float32) * torch.tensor(_INT32_TO_UNIFORM, dtype=torch.float32)


def philox_randn(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """tl.randn(seed, offsets) of triton 3.9.0 for int64 offsets (fp32, offsets' shape): Box-Muller
    on the first two Philox words, r cos(theta), r = sqrt(-2 log max(1e-7, u1)), theta = 2 pi u2.
    The integers agree bitwise with the kernels'; the fp32 log and cos differ in the last ulps."""
    i1, i2 = philox_randint(seed, offsets)
    u1 = torch.clamp_min(_uint_to_uniform(i1), 1.0e-7)
    theta = torch.tensor(_TWO_PI, dtype=torch.float32) * _uint_to_uniform(i2)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(theta)


# ------------------------------------------------------------------------------------------------
# The block layers' matmul, the softmax head, the block loss

class _BatchedLinear(torch.autograd.Function):
    """Autograd through `baddbmm(b, X, W.transpose(1, 2))` would produce dW as the transposed view
    of X^T dY and copy it into W's contiguous .grad (69 ms a step for the MNIST image FC on a CPU);
    here dW = dY^T X comes out in W's own layout."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        if bias is None:
            return torch.bmm(x, weight.transpose(1, 2))
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dx = torch.bmm(dy, weight) if ctx.needs_input_grad[0] else None
        dw = torch.bmm(dy.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        db = dy.sum(1) if ctx.needs_input_grad[2] else None
        return dx, dw, db


def block_linear(x, weight, bias=None):
    """Y[b] = X[b] W[b]^T + bias[b]: x [B, N, K], weight [B, M_out, K], bias [B, M_out] or None
    -> [B, N, M_out]."""
    return _BatchedLinear.apply(x, weight, bias)


def softmax_head(h, k, c, v):
    """softmax(h k^T + c) v: h [B, N, D], k [B, m, D] and c [B, m] (or None) in h's dtype, v [m, d]
    -> [B, N, d] in h's dtype; the logits, softmax and mixture in fp32 (for bf16 / fp16 too)."""
    accumulate = _accumulate(h.dtype)
    logits = block_linear(h, k, c).to(accumulate)                          # [B, N, m]
    return (torch.softmax(logits, dim=-1) @ v.to(accumulate)).to(h.dtype)


def block_loss(u_hat, u, w):
    """losses[b] = mean_n w[b, n] ||u_hat[b, n] - u[n]||^2 in fp32: [B, N, d], [N, d] and w [B]
    (per block) or [B, N] (per example) -> [B]; differentiable in u_hat, u and w."""
    accumulate = _accumulate(u_hat.dtype)
    diff = u_hat.to(accumulate) - u.to(accumulate).unsqueeze(0)
    if w.dim() == 1:
        return w.to(accumulate) * diff.square().sum(-1).mean(-1)
    return (w.to(accumulate) * diff.square().sum(-1)).mean(-1)


# ------------------------------------------------------------------------------------------------
# The language model's attention and the classifiers' cross-entropy

def causal_attention(q, k, v, scale=None):
    """softmax(q k^T scale + causal mask) v: [Z, H, L, Dh] x3 -> [Z, H, L, Dh] (torch's SDPA)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def linear_cross_entropy(z, weight, bias, target):
    """Mean cross-entropy of F.linear(z, weight, bias) [M, V] against target [M]."""
    return F.cross_entropy(F.linear(z, weight, bias), target)
