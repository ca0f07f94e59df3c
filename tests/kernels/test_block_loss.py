"""The fused block-local loss against its plain-PyTorch reference: losses and every gradient (u_hat,
u, and w where it requires grad), with weights per block ([B]) and per example ([B, N])."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tolerances import DTYPES, assert_close

from noprop_fast.kernels import block_loss as module
from noprop_fast.kernels.block_loss import block_loss, block_loss_ref


def make_inputs(B, N, d, dtype, device, seed, per_example=False):
    gen = torch.Generator().manual_seed(seed)
    u_hat = torch.randn(B, N, d, generator=gen).to(device=device, dtype=dtype)
    u = torch.randn(N, d, generator=gen).to(device=device, dtype=dtype)
    # positive, like the SNR weights: [B] per block or [B, N] per example
    w = (torch.rand((B, N) if per_example else (B,), generator=gen) * 2 + 0.1).to(device)
    g = torch.randn(B, generator=gen).to(device)                   # a different dL for every block
    return u_hat, u, w, g


def losses_and_grads(fn, u_hat, u, w, g, w_grad=False):
    """losses and the gradients of <losses, g> for u_hat, u (and w when w_grad; else None)."""
    u_hat = u_hat.detach().clone().requires_grad_(True)
    u = u.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(w_grad)
    losses = fn(u_hat, u, w)
    (losses * g).sum().backward()
    return losses, u_hat.grad, u.grad, w.grad


def check_against_ref(B, N, d, dtype, device, seed=0, per_example=False, w_grad=False):
    u_hat, u, w, g = make_inputs(B, N, d, dtype, device, seed, per_example)
    losses, du_hat, du, dw = losses_and_grads(block_loss, u_hat, u, w, g, w_grad)
    # the reference in fp32 from the same (rounded) inputs, gradients cast to the input dtype
    ref_losses, ref_du_hat, ref_du, ref_dw = losses_and_grads(block_loss_ref, u_hat.float(),
                                                              u.float(), w, g, w_grad)
    assert losses.dtype == torch.float32 and losses.shape == (B,)
    assert du_hat.dtype == dtype and du.dtype == dtype
    assert_close(losses, ref_losses, torch.float32)  # same rounded inputs, fp32 sums in both
    assert_close(du_hat, ref_du_hat.to(dtype), dtype)
    assert_close(du, ref_du.to(dtype), dtype, scale=B)
    assert (dw is None) == (not w_grad)
    if w_grad:  # dw[b, n] = dL[b] / N ||u_hat[b, n] - u[n]||^2 (summed over n for a [B] w)
        assert dw.dtype == torch.float32 and dw.shape == w.shape
        assert_close(dw, ref_dw, torch.float32)


@settings(deadline=None, max_examples=12,  # `device` is a constant string: safe to share
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.sampled_from([1, 2, 3, 10]), N=st.sampled_from([1, 2, 7, 13]),
       d=st.sampled_from([1, 3, 10, 20, 65]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2 ** 16))
def test_matches_reference(B, N, d, dtype, seed, device):
    check_against_ref(B, N, d, dtype, device, seed)


@settings(deadline=None, max_examples=16,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.sampled_from([1, 2, 3, 10]), N=st.sampled_from([1, 2, 7, 13]),
       d=st.sampled_from([1, 3, 10, 20, 65, 257, 600]), dtype=st.sampled_from(DTYPES),
       per_example=st.booleans(), w_grad=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_weights_per_example_and_their_gradient(B, N, d, dtype, per_example, w_grad, seed, device):
    """w [B] or [B, N], with or without its gradient; d = 257 and 600 put an example's errors in
    two and three tiles of the backward (dw sums them across tiles)."""
    check_against_ref(B, N, d, dtype, device, seed, per_example, w_grad)


@pytest.mark.parametrize("per_example", [False, True], ids=["per-block", "per-example"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_block_many_examples_with_weight_gradient(per_example, dtype, device):
    """NoProp-CT's shape: B = 1, a weight per example, learned (dw); N d = 845 spans four tiles."""
    check_against_ref(1, 13, 65, dtype, device, per_example=per_example, w_grad=True)


@pytest.mark.parametrize("per_example", [False, True], ids=["per-block", "per-example"])
def test_backward_returns_none_for_weights_without_grad(per_example, device):
    """w not requiring grad (NoProp-DT): the backward returns None for it (and computes no dw)."""
    u_hat, u, w, _ = make_inputs(2, 3, 4, torch.float32, device, seed=6, per_example=per_example)
    losses = block_loss(u_hat.requires_grad_(True), u, w)
    with torch.no_grad():
        du_hat, du, dw = module.BlockLossFunction.backward(losses.grad_fn,
                                                           torch.ones(2, device=device))
    assert du_hat.shape == u_hat.shape and du is None and dw is None


def test_large_tiles_per_example(device):
    """N * d > LARGE_FROM with per-example weights and their gradient."""
    check_against_ref(1, 2, 131_073, torch.float32, device, per_example=True, w_grad=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_tiles(dtype, device):
    """N * d = 845 > SMALL_BLOCK: several programs per block in the forward and the backward."""
    assert 13 * 65 > module.SMALL_BLOCK
    check_against_ref(3, 13, 65, dtype, device)


def test_chunks_of_several_tiles(device):
    """More tiles than MAX_CHUNKS: each forward program loops over two tiles of its block."""
    n, d = 3, 50_000
    assert module.triton.cdiv(n * d, module.SMALL_BLOCK) > module.MAX_CHUNKS
    assert n * d <= module.LARGE_FROM
    check_against_ref(1, n, d, torch.float32, device)


def test_large_tiles(device):
    """N * d > LARGE_FROM: the 1024-element tile the launchers pick for large blocks."""
    n, d = 2, 131_073
    assert n * d > module.LARGE_FROM
    check_against_ref(2, n, d, torch.float16, device)


def test_unit_weights_give_the_unweighted_block_losses(device):
    u_hat, u, _, _ = make_inputs(4, 7, 20, torch.float32, device, seed=3)
    ones = torch.ones(4, device=device)
    unweighted = (u_hat - u.unsqueeze(0)).square().sum(-1).mean(-1)  # mean_n ||u_hat[b, n] - u[n]||^2
    assert_close(block_loss(u_hat, u, ones), unweighted, torch.float32)


def test_expanded_grad_and_strided_inputs(device):
    """losses.sum() hands backward a stride-0 dL; non-contiguous u_hat, u and w are accepted."""
    u_hat, u, w, _ = make_inputs(6, 5, 9, torch.float32, device, seed=4)
    u_hat_t = u_hat.transpose(1, 2).contiguous().transpose(1, 2)   # same values, other strides
    u_t = u.t().contiguous().t()
    w_strided = torch.stack([w, w], dim=1)[:, 0]                    # stride 2
    ones = torch.ones(6, device=device)
    losses, du_hat, du, _ = losses_and_grads(block_loss, u_hat_t, u_t, w_strided, ones)
    ref = losses_and_grads(block_loss_ref, u_hat, u, w, ones)[:3]
    for actual, expected in zip((losses, du_hat, du), ref):
        assert_close(actual, expected, torch.float32)
    rows = torch.rand(5, 6, device=device).t()                      # [6, 5] per example, strided
    losses, du_hat, du, dw = losses_and_grads(block_loss, u_hat_t, u_t, rows, ones, w_grad=True)
    ref = losses_and_grads(block_loss_ref, u_hat, u, rows.contiguous(), ones, w_grad=True)
    for actual, expected in zip((losses, du_hat, du, dw), ref):
        assert_close(actual, expected, torch.float32)


def test_gradient_for_u_hat_only(device):
    """A fixed embedding (one-hot) gives u without requires_grad: only d u_hat comes back."""
    u_hat, u, w, g = make_inputs(2, 3, 4, torch.float32, device, seed=5)
    u_hat.requires_grad_(True)
    (block_loss(u_hat, u, w) * g).sum().backward()
    expected = (g * w * 2 / 3).view(-1, 1, 1) * (u_hat.detach() - u)
    assert_close(u_hat.grad, expected, torch.float32)
    assert u.grad is None


@pytest.mark.parametrize("u_hat_shape, u_shape, w_shape, dtypes, message", [
    ((2, 3, 4), (3, 5), (2,), (torch.float32,) * 3, "shapes do not match"),
    ((2, 3, 4), (3, 4), (3,), (torch.float32,) * 3, "shapes do not match"),
    ((2, 3, 4), (3, 4), (2, 4), (torch.float32,) * 3,
     r"w \[B\] = \[2\] \(per block\) or \[B, N\]"),
    ((2, 3, 4), (3, 4), (3, 3), (torch.float32,) * 3, "shapes do not match"),
    ((2, 3, 4), (3, 4), (2, 3, 1), (torch.float32,) * 3, r"w \[B\] or \[B, N\]; got"),
    ((3, 4), (3, 4), (1,), (torch.float32,) * 3, r"expects u_hat \[B, N, d\]"),
    ((2, 0, 4), (0, 4), (2,), (torch.float32,) * 3, "B, N, d >= 1"),
    ((2, 3, 4), (3, 4), (2,), (torch.float32, torch.float16, torch.float32), "one dtype"),
    ((2, 3, 4), (3, 4), (2,), (torch.float64, torch.float64, torch.float32), "one dtype"),
    ((2, 3, 4), (3, 4), (2,), (torch.float16, torch.float16, torch.float16), "fp32 weights"),
])
def test_bad_inputs_raise(u_hat_shape, u_shape, w_shape, dtypes, message, device):
    u_hat = torch.zeros(u_hat_shape, dtype=dtypes[0], device=device)
    u = torch.zeros(u_shape, dtype=dtypes[1], device=device)
    w = torch.ones(w_shape, dtype=dtypes[2], device=device)
    with pytest.raises(ValueError, match=message):
        block_loss(u_hat, u, w)


def test_inputs_on_two_devices_raise(device):
    with pytest.raises(ValueError, match="one device"):
        block_loss(torch.zeros(2, 3, 4, device=device), torch.zeros(3, 4, device="meta"),
                   torch.ones(2, device=device))
