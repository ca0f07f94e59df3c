"""A double backward through a fused op raises a clear error instead of a wrong answer.

The fused ops' backwards are kernels whose outputs autograd cannot differentiate. With
`create_graph=True`, a first derivative that also flows through plain PyTorch (here + x^3, whose
second derivative 6x autograd knows) used to come back with a graph that silently lacked the fused
op's second-order term; now asking for that graph raises, naming the op. A plain backward still
matches the reference op's. (The C++ ops and the chunked cross-entropy: tests/test_cpu_ops.py.)
"""
import pytest
import torch

from noprop_fast.kernels.attention import causal_attention, causal_attention_ref
from noprop_fast.kernels.block_linear import block_linear, block_linear_ref
from noprop_fast.kernels.block_loss import block_loss, block_loss_ref
from noprop_fast.kernels.noise import noise_injection
from noprop_fast.kernels.softmax_head import softmax_head, softmax_head_ref
from tolerances import assert_close


def _ops(device):
    """name -> (fused op, reference, the differentiated input, a function of it that the op sees)."""
    gen = torch.Generator().manual_seed(0)

    def draw(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    h, k, c, v = draw(2, 3, 8), draw(2, 5, 8), draw(2, 5), draw(5, 4)
    x, w, b = draw(2, 3, 8), draw(2, 4, 8), draw(2, 4)
    u_hat, u, weights = draw(2, 3, 4), draw(3, 4), draw(2).abs()
    q = draw(1, 2, 5, 16)
    y = torch.tensor([0, 2, 4], device=device)
    a, s = torch.rand(2, generator=gen).to(device), torch.rand(2, generator=gen).to(device)
    W, rows = draw(5, 4), torch.rand(2, 3, generator=gen).to(device)
    seed, offset = (torch.tensor([n], dtype=torch.int64, device=device) for n in (7, 0))
    return {
        "softmax_head": (lambda t: softmax_head(t, k, c, v), lambda t: softmax_head_ref(t, k, c, v), h),
        "block_linear": (lambda t: block_linear(t, w, b), lambda t: block_linear_ref(t, w, b), x),
        "block_loss": (lambda t: block_loss(t, u, weights), lambda t: block_loss_ref(t, u, weights),
                       u_hat),
        "causal_attention": (lambda t: causal_attention(t, t, t), lambda t: causal_attention_ref(t, t, t),
                             q),
        # z = a W[y] + s eps: the noise term does not depend on W, so a W[y] has its gradient
        "noise_injection": (lambda t: noise_injection(y, t, a, s, seed, offset),
                            lambda t: a[:, None, None] * t[y], draw(5, 4)),
        # per-example scales a [B, N] and weights w [B, N] differentiated (NoProp-CT / FM)
        "noise_injection[a]": (lambda t: noise_injection(y, W, t, rows, seed, offset),
                               lambda t: t[..., None] * W[y], draw(2, 3).abs()),
        "block_loss[w]": (lambda t: block_loss(u_hat, u, t), lambda t: block_loss_ref(u_hat, u, t),
                          draw(2, 3).abs()),
    }


@pytest.mark.parametrize("name", list(_ops("cpu")))
def test_double_backward_raises(device, name):
    op, reference, x = _ops(device)[name]
    x = x.detach().requires_grad_()
    with pytest.raises(RuntimeError, match=f"{name.split('[')[0]}: no double backward"):
        torch.autograd.grad(op(x).sum() + x.pow(3).sum(), x, create_graph=True)
    (first,) = torch.autograd.grad(op(x).sum(), x)  # a plain backward is unchanged
    (expected,) = torch.autograd.grad(reference(x).sum(), x)
    assert_close(first, expected, torch.float32)
