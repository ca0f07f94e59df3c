"""The CPU fused ops (noprop_fast.ops.cpp, C++ in csrc/) against the references in ops/reference.py.

Every op: the output and every gradient against its `*_ref` in fp32 on the same (rounded) inputs,
over odd shapes from hypothesis, in fp32, fp16 and bf16 (C++ has no interpreter limitation); sizes
past the ops' chunks, strips and tiles; reproducibility (bitwise, for any thread count, where no
BLAS sums); bad inputs. The noise equals `philox_randn_ref`. The extension is built once per
process (about a minute with a cold cache) and shared by every test; a missing compiler skips.
"""
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from noprop_fast.ops import cpp as cpu_ops
from noprop_fast.ops.reference import block_linear as block_linear_ref
from noprop_fast.ops.reference import block_loss as block_loss_ref
from noprop_fast.ops.reference import noise_injection as noise_injection_ref
from noprop_fast.ops.reference import philox_randn as philox_randn_ref
from noprop_fast.ops.reference import softmax_head as softmax_head_ref
from helpers import TOLERANCES, CreatedTensors, assert_close, philox_noise

DTYPES = list(TOLERANCES)
SETTINGS = settings(deadline=None, max_examples=12, derandomize=True)


@pytest.fixture(scope="module", autouse=True)
def extension():
    ok, reason = cpu_ops.available()
    if not ok and ("no C++ compiler" in reason or "ninja is not installed" in reason):
        pytest.skip(reason)
    assert ok, reason  # a compile error fails


def _draw(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def _grads(fn, inputs, upstream):
    """fn(*inputs) and the gradients of <fn(*inputs), upstream> for the inputs that require them."""
    out = fn(*inputs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return out, torch.autograd.grad(out, leaves, upstream)


def _leaves(tensors, float32=False):
    return [None if t is None else (t.detach().float() if float32 else t.detach()).requires_grad_()
            for t in tensors]


# ------------------------------------------------------------------------------------------------
# Noise injection

def _with_threads(count, fn):
    """fn() with `count` intra-op threads (the work of these tests is split for two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def _one(value):
    return torch.tensor([value], dtype=torch.int64)


def _noise_inputs(B, N, d, m, dtype, labels=None, gen_seed=0, per_example=False):
    """y [N], W [m, d], and scales a, s [B] (per block) or [B, N] (per example)."""
    gen = torch.Generator().manual_seed(gen_seed)
    y = torch.randint(0, m, (N,), generator=gen) if labels is None else torch.tensor(labels)
    W = _draw(gen, m, d, dtype=dtype)
    a = torch.rand((B, N) if per_example else (B,), generator=gen)
    return y, W, a, (1 - a.square()).sqrt()


@pytest.mark.parametrize("seed,offset", [(0, 0), (123456789012, 2**32 - 20), (-1, 2**40 + 3),
                                         (2**62 + 7, 2**40 - 5), (5, 2**63 - 700)])
def test_philox_randn_equals_reference(seed, offset):
    """Offsets across 2^32, near 2^40, and past 2^63 (the int64 counter wraps); seeds past 2^32."""
    n = 10_007  # not a multiple of the 64-counter strip nor of the 1024-element chunk
    expected = philox_randn_ref(seed, offset + torch.arange(n, dtype=torch.int64))
    torch.testing.assert_close(cpu_ops.philox_randn(seed, offset, n), expected, rtol=1e-6, atol=1e-6)
    assert cpu_ops.philox_randn(seed, offset, 0).shape == (0,)


def test_noise_properties():
    """Same (seed, offset): identical; another seed or offset: different; the counter is the flat
    index of z; mean 0 and variance 1 over 10^6 draws; z = eps exactly when a = 0, s = 1."""
    base = cpu_ops.philox_randn(42, 1000, 10**6)
    assert torch.equal(base, cpu_ops.philox_randn(42, 1000, 10**6))
    for other in (cpu_ops.philox_randn(43, 1000, 10**6), cpu_ops.philox_randn(42, 2000, 10**6)):
        assert (other == base).float().mean() < 1e-3
    assert torch.equal(cpu_ops.philox_randn(42, 1007, 500), base[7:507])
    assert abs(base.mean().item()) < 0.02 and abs(base.var().item() - 1) < 0.03
    B, N, d = 3, 7, 65
    y, W, _, _ = _noise_inputs(B, N, d, 4, torch.float32)
    z = cpu_ops.noise_injection(y, W, torch.zeros(B), torch.ones(B), _one(42), _one(1000))
    assert torch.equal(z.flatten(), base[:B * N * d])


@SETTINGS
@given(B=st.sampled_from([1, 2, 3, 10]), N=st.sampled_from([1, 2, 7, 131]),
       d=st.sampled_from([1, 3, 10, 65]), m=st.sampled_from([1, 2, 10]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(-2**63, 2**63 - 1),
       offset=st.integers(0, 2**62), gen_seed=st.integers(0, 2**16), per_example=st.booleans())
def test_noise_forward_and_dw_match_reference(B, N, d, m, dtype, seed, offset, gen_seed,
                                              per_example):
    y, W, a, s = _noise_inputs(B, N, d, m, dtype, gen_seed=gen_seed, per_example=per_example)
    dz = _draw(torch.Generator().manual_seed(gen_seed + 1), B, N, d, dtype=dtype)
    (W_leaf,), (W_ref,) = _leaves([W]), _leaves([W], float32=True)
    z, (dW,) = _grads(cpu_ops.noise_injection, (y, W_leaf, a, s, _one(seed), _one(offset)), dz)
    z_ref, (dW_ref,) = _grads(noise_injection_ref, (y, W_ref, a, s, philox_noise(seed, offset, B, N, d)),
                              dz.float())
    assert z.shape == (B, N, d) and z.dtype == dtype and dW.dtype == dtype
    assert_close(z, z_ref, dtype)
    assert_close(dW, dW_ref, dtype, scale=B)


def test_noise_dw_repeated_labels_deterministic():
    """Labels repeated thousands of times: dW equals the reference, is zero on absent labels, and is
    bitwise the same on a second run and with one thread (no atomics, a fixed order)."""
    B, N, d, m = 10, 3001, 70, 6
    labels = [(3 * n) % 4 for n in range(N)]  # 0, 3, 2, 1, ... ; labels 4 and 5 never
    y, W, a, s = _noise_inputs(B, N, d, m, torch.float32, labels=labels)
    dz = torch.randn(B, N, d, generator=torch.Generator().manual_seed(1))

    def dW():
        W_leaf = W.clone().requires_grad_()
        cpu_ops.noise_injection(y, W_leaf, a, s, _one(11), _one(5)).backward(dz)
        return W_leaf.grad

    first = _with_threads(2, dW)
    W_ref = W.clone().requires_grad_()
    noise_injection_ref(y, W_ref, a, s, philox_noise(11, 5, B, N, d)).backward(dz)
    assert_close(first, W_ref.grad, torch.float32, scale=B)
    assert torch.all(first[4:] == 0) and torch.all(first[:4].abs().sum(-1) > 0)
    assert torch.equal(first, _with_threads(2, dW)) and torch.equal(first, _with_threads(1, dW))


# which of W, a, s require grad: NoProp-DT (W), a learned embedding under a learned schedule (all
# three), a fixed embedding under a learned schedule (a, s), and each scale alone
GRAD_SETS = [("W",), ("W", "a", "s"), ("a", "s"), ("a",), ("s",)]


def _noise_grads(y, W, a, s, seed, offset, dz, wanted):
    """z and the gradients named in `wanted` ({name: grad}) of the C++ op."""
    leaves = dict(zip("Was", _leaves([W, a, s])))
    for name in "Was":
        leaves[name].requires_grad_(name in wanted)
    z = cpu_ops.noise_injection(y, leaves["W"], leaves["a"], leaves["s"], _one(seed), _one(offset))
    return z, dict(zip(wanted, torch.autograd.grad(z, [leaves[n] for n in wanted], dz)))


@SETTINGS
@given(B=st.sampled_from([1, 2, 3, 10]), N=st.sampled_from([1, 2, 7, 131]),
       d=st.sampled_from([1, 3, 10, 65, 1500]), m=st.sampled_from([1, 2, 10]),
       dtype=st.sampled_from(DTYPES), per_example=st.booleans(), wanted=st.sampled_from(GRAD_SETS),
       gen_seed=st.integers(0, 2**16))
def test_noise_scale_gradients_match_reference(B, N, d, m, dtype, per_example, wanted, gen_seed):
    """da, ds (and dW beside them) for [B] and [B, N] scales; d = 1500 puts a row across two noise
    chunks of 1024."""
    y, W, a, s = _noise_inputs(B, N, d, m, dtype, gen_seed=gen_seed, per_example=per_example)
    dz = _draw(torch.Generator().manual_seed(gen_seed + 1), B, N, d, dtype=dtype)
    _, grads = _noise_grads(y, W, a, s, 11, 5, dz, wanted)
    ref = dict(zip("Was", _leaves([W, a, s], float32=True)))
    z_ref = noise_injection_ref(y, ref["W"], ref["a"], ref["s"], philox_noise(11, 5, B, N, d))
    expected = dict(zip(wanted, torch.autograd.grad(z_ref, [ref[n] for n in wanted], dz.float())))
    terms = {"W": B, "a": d * (1 if per_example else N), "s": d * (1 if per_example else N)}
    for name in wanted:
        assert grads[name].shape == ref[name].shape
        assert grads[name].dtype == (dtype if name == "W" else torch.float32)
        assert_close(grads[name], expected[name], dtype, scale=terms[name] ** 0.5)


@pytest.mark.parametrize("per_example", [False, True], ids=["per-block", "per-example"])
def test_noise_scale_gradients_are_deterministic(per_example):
    """da and ds: bitwise the same on a second run and with one thread (rows split between the
    threads and between noise chunks, d = 700)."""
    y, W, a, s = _noise_inputs(3, 41, 700, 5, torch.float32, per_example=per_example)
    dz = torch.randn(3, 41, 700, generator=torch.Generator().manual_seed(2))

    def grads():
        return _noise_grads(y, W, a, s, 4, 9, dz, ("W", "a", "s"))[1]

    first = _with_threads(2, grads)
    for other in (_with_threads(2, grads), _with_threads(1, grads)):
        assert all(torch.equal(first[name], other[name]) for name in "Was")


@pytest.mark.parametrize("per_example", [False, True], ids=["per-block", "per-example"])
def test_noise_backward_returns_none_for_scales_without_grad(per_example):
    """a and s not requiring grad (NoProp-DT): the backward returns only dW; a alone: only da."""
    y, W, a, s = _noise_inputs(2, 5, 8, 4, torch.float32, per_example=per_example)
    z = cpu_ops.noise_injection(y, W.clone().requires_grad_(), a, s, _one(1), _one(0))
    with torch.no_grad():
        grads = cpu_ops._NoiseInjection.backward(z.grad_fn, torch.ones_like(z))
    assert grads[1].shape == W.shape and all(g is None for g in grads[:1] + grads[2:])
    z = cpu_ops.noise_injection(y, W, a.clone().requires_grad_(), s, _one(1), _one(0))
    with torch.no_grad():
        grads = cpu_ops._NoiseInjection.backward(z.grad_fn, torch.ones_like(z))
    assert grads[2].shape == a.shape and grads[1] is None and grads[3] is None


def test_noise_scale_gradient_draws_the_forwards_noise():
    """ds regenerates eps from copies of the forward's seed and offset, whatever happens to the
    offset tensor after the forward."""
    B, N, d = 2, 5, 8
    y, W, a, s = _noise_inputs(B, N, d, 4, torch.float32, per_example=True)
    s = s.clone().requires_grad_()
    offset = _one(40)
    z = cpu_ops.noise_injection(y, W, a, s, _one(3), offset)
    offset += 10**6
    (ds,) = torch.autograd.grad(z, s, torch.ones_like(z))
    assert_close(ds, philox_noise(3, 40, B, N, d).sum(-1), torch.float32, scale=d ** 0.5)


def test_noise_saves_only_labels_and_scales():
    y, W, a, s = _noise_inputs(3, 7, 20, 5, torch.float32)
    z = cpu_ops.noise_injection(y, W.requires_grad_(), a, s, _one(1), _one(0))
    saved = z.grad_fn.saved_tensors
    assert len(saved) == 2 and saved[0] is y and saved[1] is a


def _noise_bad_inputs():
    y, W, a, s = _noise_inputs(2, 5, 8, 4, torch.float32)
    seed, offset = _one(0), _one(0)
    return [
        ((y, W[0], a, s, seed, offset), "W must be \\[m, d\\]"),
        ((y, W.double(), a, s, seed, offset), "W must be float32, float16 or bfloat16"),
        ((y.int(), W, a, s, seed, offset), "y must be a 1-D int64"),
        ((y, W, a.half(), s, seed, offset), "a must be a 1-D float32"),
        ((y, W, a, s[:1], seed, offset), "a and s must have the same shape"),
        ((y, W, a[:, None].expand(2, 4), s, seed, offset), r"a must be a 1-D float32 tensor \[B\] "
         r"\(per block\) or a 2-D one \[B, N\] with N = 5"),
        ((y, W, a, s.view(2, 1, 1), seed, offset), "s must be a 1-D float32"),
        ((y, W, a[:, None].expand(2, 5), s, seed, offset), "a and s must have the same shape"),
        ((y, W, a, s, seed.int(), offset), "seed must be an int64 tensor with one element"),
        ((y, W, a, s, seed, offset.repeat(2)), "offset must be an int64 tensor with one element"),
        ((y, W.to("meta"), a, s, seed, offset), "the CPU fused op needs CPU tensors, got W on meta"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_noise_bad_inputs_raise_value_error(case):
    args, message = _noise_bad_inputs()[case]
    with pytest.raises(ValueError, match="noise_injection: " + message):
        cpu_ops.noise_injection(*args)


def test_noise_label_out_of_range_raises():
    y, W, a, s = _noise_inputs(2, 5, 8, 4, torch.float32)
    with pytest.raises(IndexError, match="label 4 at position 0 is outside"):
        cpu_ops.noise_injection(torch.tensor([4, 0]), W, a, s, _one(0), _one(0))


# ------------------------------------------------------------------------------------------------
# Block loss

def _check_block_loss(B, N, d, dtype, seed=0, u_grad=True, per_example=False, w_grad=False):
    """Losses and gradients against the reference; w [B] or [B, N] (per_example), learned or not."""
    gen = torch.Generator().manual_seed(seed)
    u_hat, u = _draw(gen, B, N, d, dtype=dtype), _draw(gen, N, d, dtype=dtype)
    w = torch.rand((B, N) if per_example else (B,), generator=gen) * 2 + 0.1
    g = torch.randn(B, generator=gen)
    w = _leaves([w])[0] if w_grad else w
    leaves = [_leaves([u_hat])[0], _leaves([u])[0] if u_grad else u]
    ref_leaves = [_leaves([u_hat], True)[0], _leaves([u], True)[0] if u_grad else u.float()]
    losses, grads = _grads(cpu_ops.block_loss, (*leaves, w), g)
    ref_losses, ref_grads = _grads(block_loss_ref, (*ref_leaves, w), g)
    assert losses.dtype == torch.float32 and losses.shape == (B,)
    assert_close(losses, ref_losses, torch.float32)
    assert len(grads) == (2 if u_grad else 1) + w_grad
    if w_grad:  # dw[b, n] = dL[b] / N ||u_hat[b, n] - u[n]||^2, in fp32 (summed over n for [B])
        *grads, dw = grads
        *ref_grads, ref_dw = ref_grads
        assert dw.dtype == torch.float32 and dw.shape == w.shape
        assert_close(dw, ref_dw, torch.float32)
    assert all(t.dtype == dtype for t in grads)
    for grad, ref, scale in zip(grads, ref_grads, (1, B)):  # d u sums over the B blocks
        assert_close(grad, ref.to(dtype), dtype, scale=scale)


@SETTINGS
@given(B=st.sampled_from([1, 2, 3, 10]), N=st.sampled_from([1, 2, 7, 13]),
       d=st.sampled_from([1, 3, 10, 65]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_block_loss_matches_reference(B, N, d, dtype, seed):
    _check_block_loss(B, N, d, dtype, seed)


@SETTINGS
@given(B=st.sampled_from([1, 2, 3, 10]), N=st.sampled_from([1, 2, 7, 13]),
       d=st.sampled_from([1, 3, 10, 65, 2049]), dtype=st.sampled_from(DTYPES),
       per_example=st.booleans(), w_grad=st.booleans(), u_grad=st.booleans(),
       seed=st.integers(0, 2**16))
def test_block_loss_weights_per_example_and_their_gradient(B, N, d, dtype, per_example, w_grad,
                                                           u_grad, seed):
    """w [B] or [B, N], learned or not; d = 2049 puts a row across two backward strips."""
    _check_block_loss(B, N, d, dtype, seed, u_grad, per_example, w_grad)


@pytest.mark.parametrize("per_example", [False, True], ids=["per-block", "per-example"])
def test_block_loss_backward_returns_none_for_weights_without_grad(per_example):
    u_hat, u = torch.randn(2, 3, 4, requires_grad=True), torch.randn(3, 4)
    w = torch.rand((2, 3) if per_example else (2,))
    losses = cpu_ops.block_loss(u_hat, u, w)
    with torch.no_grad():
        du_hat, du, dw = cpu_ops._BlockLoss.backward(losses.grad_fn, torch.ones(2))
    assert du_hat.shape == u_hat.shape and du is None and dw is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_loss_many_chunks_and_strips(dtype):
    """N d = 15000: two forward chunks (8192) and eight backward strips (2048), partial ones last;
    per example: chunks of whole rows (one row of 5000, or three of 2000), rows across strips."""
    _check_block_loss(3, 3, 5000, dtype)
    _check_block_loss(3, 3, 5000, dtype, per_example=True, w_grad=True)
    _check_block_loss(2, 9, 2000, dtype, per_example=True, w_grad=True)


def test_block_loss_gradient_for_u_hat_only_and_expanded_grad():
    _check_block_loss(2, 3, 4, torch.float32, u_grad=False)
    u_hat = torch.randn(6, 5, 9).transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    u, w = torch.randn(5, 9), torch.stack([torch.rand(6)] * 2, dim=1)[:, 0]  # strided u_hat and w
    cpu_ops.block_loss(u_hat, u, w).sum().backward()  # dL of a sum: stride 0
    assert_close(u_hat.grad, (w * 2 / 5).view(-1, 1, 1) * (u_hat.detach() - u), torch.float32)


@pytest.mark.parametrize("per_example", [False, True], ids=["per-block", "per-example"])
def test_block_loss_is_reproducible_for_any_thread_count(per_example):
    u_hat, u = torch.randn(10, 200, 300, requires_grad=True), torch.randn(200, 300)
    w = torch.rand((10, 200) if per_example else (10,), requires_grad=True)

    def run():
        losses = cpu_ops.block_loss(u_hat, u, w)
        return losses, *torch.autograd.grad(losses.sum(), (u_hat, w))

    first, single = _with_threads(2, run), _with_threads(1, run)
    assert all(torch.equal(x, y) for x, y in zip(first, single))


@pytest.mark.parametrize("shapes, dtypes, message", [
    (((2, 3, 4), (3, 5), (2,)), (torch.float32,) * 3, "shapes do not match"),
    (((2, 3, 4), (3, 4), (2, 4)), (torch.float32,) * 3, r"or \[B, N\] = \[2, 3\] \(per example\)"),
    (((2, 3, 4), (3, 4), (2, 3, 1)), (torch.float32,) * 3, r"w \[B\] or \[B, N\]; got"),
    (((3, 4), (3, 4), (1,)), (torch.float32,) * 3, r"expects u_hat \[B, N, d\]"),
    (((2, 0, 4), (0, 4), (2,)), (torch.float32,) * 3, "B, N, d >= 1"),
    (((2, 3, 4), (3, 4), (2,)), (torch.float32, torch.float16, torch.float32), "one dtype"),
    (((2, 3, 4), (3, 4), (2,)), (torch.float64, torch.float64, torch.float32), "one dtype"),
    (((2, 3, 4), (3, 4), (2,)), (torch.float16, torch.float16, torch.float16), "fp32 weights"),
])
def test_block_loss_bad_inputs_raise(shapes, dtypes, message):
    with pytest.raises(ValueError, match=message):
        cpu_ops.block_loss(*(torch.ones(s, dtype=t) for s, t in zip(shapes, dtypes)))


# ------------------------------------------------------------------------------------------------
# Block linear

def _check_block_linear(blocks, n, k, m_out, has_bias, dtype, seed=0,
                        needs=(True, True, True)):
    gen = torch.Generator().manual_seed(seed)
    x, weight, dy = (_draw(gen, *shape, dtype=dtype)
                     for shape in ((blocks, n, k), (blocks, m_out, k), (blocks, n, m_out)))
    bias = _draw(gen, blocks, m_out, dtype=dtype) if has_bias else None
    tensors = [x, weight, bias]
    leaves = [t if t is None or not need else _leaves([t])[0] for t, need in zip(tensors, needs)]
    ref_leaves = [t if t is None else (_leaves([t], True)[0] if need else t.float())
                  for t, need in zip(tensors, needs)]
    y, grads = _grads(cpu_ops.block_linear, tuple(leaves), dy)
    y_ref, ref_grads = _grads(block_linear_ref, tuple(ref_leaves), dy.float())
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, scale=math.sqrt(k))  # sums over K
    scales = [math.sqrt(m_out), math.sqrt(n), math.sqrt(n)]  # dX over M_out; dW, dbias over N
    present = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
    assert len(grads) == len(present)
    for i, grad, ref in zip(present, grads, ref_grads):
        assert grad.dtype == dtype
        assert_close(grad, ref, dtype, scale=scales[i])


@SETTINGS
@given(blocks=st.sampled_from([1, 2, 3]), n=st.sampled_from([1, 2, 7, 17]),
       k=st.sampled_from([1, 3, 16, 33]), m_out=st.sampled_from([1, 5, 16, 31]),
       has_bias=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_block_linear_matches_reference(blocks, n, k, m_out, has_bias, dtype, seed):
    _check_block_linear(blocks, n, k, m_out, has_bias, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_linear_several_strips_and_ten_blocks(dtype):
    """M_out = 300: two 256-column strips in the backward pass; 10 blocks, N = 70."""
    _check_block_linear(10, 70, 40, 300, True, dtype)


@pytest.mark.parametrize("needs", [(False, True, True), (True, False, False), (False, False, True)])
def test_block_linear_computes_only_the_needed_gradients(needs):
    _check_block_linear(2, 9, 8, 7, True, torch.float32, needs=needs)


def _linear_bad_inputs():
    x, w = torch.randn(2, 4, 5), torch.randn(2, 3, 5)
    return {
        "x not 3-d": ((x[0], w, None), "expects x"),
        "block count": ((x, torch.randn(3, 3, 5), None), "does not match"),
        "in features": ((x, torch.randn(2, 3, 6), None), "does not match"),
        "bias shape": ((x, w, torch.randn(2, 4)), "bias must be"),
        "mixed dtypes": ((x, w.half(), None), "share a dtype"),
        "integer dtype": ((x.int(), w.int(), None), "supports fp32"),
        "empty": ((x[:, :0], w, None), "empty input"),
        "device": ((x.to("meta"), w.to("meta"), None), "needs CPU tensors"),
    }


@pytest.mark.parametrize("case", list(_linear_bad_inputs()))
def test_block_linear_bad_inputs_raise(case):
    args, message = _linear_bad_inputs()[case]
    with pytest.raises(ValueError, match="block_linear.*" + message):
        cpu_ops.block_linear(*args)


# ------------------------------------------------------------------------------------------------
# Softmax head

def _head_inputs(B, N, D, m, d, bias, dtype, seed, h_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    h = _draw(gen, B, N, D, dtype=dtype, scale=h_scale / D**0.25)
    k = _draw(gen, B, m, D, dtype=dtype, scale=D**-0.25)
    c = _draw(gen, B, m, dtype=dtype) if bias else None
    return h, k, c, _draw(gen, m, d, dtype=dtype), _draw(gen, B, N, d, dtype=dtype)


def _check_head(B, N, D, m, d, bias, dtype, seed=0, h_scale=1.0):
    h, k, c, v, grad = _head_inputs(B, N, D, m, d, bias, dtype, seed, h_scale)
    out, grads = _grads(cpu_ops.softmax_head, _leaves([h, k, c, v]), grad)
    ref_out, ref_grads = _grads(softmax_head_ref, _leaves([h, k, c, v], True), grad.float())
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert_close(out, ref_out, dtype)
    # dk, dc sum over one block's N rows (dk also carries h's size), dv over all B N rows
    scales = [1.0, N * h_scale] + ([N] if bias else []) + [B * N]
    for g, ref, scale in zip(grads, ref_grads, scales):
        assert g.shape == ref.shape
        assert_close(g, ref, dtype, scale=scale)


@SETTINGS
@given(B=st.sampled_from([1, 2, 3]), N=st.sampled_from([1, 2, 5, 37]),
       D=st.sampled_from([1, 8, 17, 130]), m=st.sampled_from([1, 2, 10, 37, 130]),
       d=st.sampled_from([1, 3, 10, 257]), bias=st.booleans(), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_softmax_head_matches_reference(B, N, D, m, d, bias, dtype, seed):
    """Any D and d: 130 and 257 are past the Triton op's limits (128 and 256)."""
    _check_head(B, N, D, m, d, bias, dtype, seed)


@pytest.mark.parametrize("tile_elements", [1, 50, 500, 5000])
def test_softmax_head_tilings(monkeypatch, tile_elements):
    """Tiles of 1 row x 16 classes, 3 rows x 16 classes, all 23 rows x 21 classes (chunks of the
    online softmax), and two whole blocks of 23 x 100 together."""
    monkeypatch.setattr(cpu_ops, "SOFTMAX_TILE_ELEMENTS", tile_elements)
    for dtype in DTYPES:
        _check_head(3, 23, 9, 100, 6, True, dtype)


# classes given a -inf bias: a whole leading chunk of the online softmax, one in the middle, the
# trailing ones, all but one, and every class of block 0 (no softmax: NaN, as torch.softmax gives)
HEAD_MASKS = {"leading": lambda c: c[:, :40], "middle": lambda c: c[:, 40:70],
              "trailing": lambda c: c[:, 70:], "all but one": lambda c: c[:, 1:],
              "all of block 0": lambda c: c[0]}


@pytest.mark.parametrize("mask", list(HEAD_MASKS))
@pytest.mark.parametrize("tile_elements", [50, 5000])
def test_softmax_head_masked_classes(monkeypatch, mask, tile_elements):
    """In chunks of 16 classes (tile 50) and in one tile: masked classes match the reference, and
    an all-masked row gives NaN in the same places. A leading chunk all -inf gave NaN (-inf - -inf)."""
    monkeypatch.setattr(cpu_ops, "SOFTMAX_TILE_ELEMENTS", tile_elements)
    B, N, D, m, d, dtype = 2, 23, 9, 100, 6, torch.float32
    h, k, c, v, grad = _head_inputs(B, N, D, m, d, True, dtype, 0)
    HEAD_MASKS[mask](c).fill_(float("-inf"))
    out, grads = _grads(cpu_ops.softmax_head, _leaves([h, k, c, v]), grad)
    ref_out, ref_grads = _grads(softmax_head_ref, _leaves([h, k, c, v], True), grad)
    rtol, atol = TOLERANCES[dtype]
    for name, got, ref, scale in zip(["o", "dh", "dk", "dc", "dv"], [out, *grads],
                                     [ref_out, *ref_grads], [1, 1, N, N, B * N]):
        assert got.isnan().any() == (mask == "all of block 0"), name
        torch.testing.assert_close(got, ref, rtol=rtol, atol=atol * scale, equal_nan=True,
                                   msg=lambda text: f"{mask}, {name}: {text}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_head_large_logits_stay_finite(dtype):
    _check_head(2, 5, 17, 130, 10, True, dtype, seed=7, h_scale=30.0)


def test_softmax_head_many_classes():
    """m = 5000 with the default tile, and m = 50257 (a GPT-2 vocabulary) with a few rows."""
    _check_head(2, 3, 16, 5000, 8, True, torch.float32)
    _check_head(1, 4, 8, 50257, 4, False, torch.float32)


def test_softmax_head_never_materialises_the_logits():
    """No tensor of B N m elements or more is created or saved; the reference's logits are seen."""
    B, N, D, m, d = 2, 1000, 16, 2003, 5  # B N m = 4M logits; a tile: 1000 rows x 1048 classes
    h, k, c, v, grad = _head_inputs(B, N, D, m, d, True, torch.float32, seed=3)

    def largest(fn):
        saved = []
        with CreatedTensors() as created, torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel()) or t, lambda t: t):
            out, grads = _grads(fn, _leaves([h, k, c, v]), grad)
        return max(saved), max(math.prod(s) for s in created.shapes)

    largest_saved, largest_created = largest(cpu_ops.softmax_head)
    assert largest_saved < B * N * m and largest_created <= cpu_ops.SOFTMAX_TILE_ELEMENTS
    assert min(largest(softmax_head_ref)) >= B * N * m  # the check sees the reference's logits


def _head_bad_inputs():
    h, k, c, v = torch.randn(2, 3, 8), torch.randn(2, 5, 8), torch.randn(2, 5), torch.randn(5, 4)
    return {
        "h not 3-d": (h[0], k, c, v), "k blocks differ": (h, k[:1], c, v),
        "k width differs": (h, k[..., :7], c, v), "v classes differ": (h, k, c, v[:4]),
        "c shape": (h, k, c[:, :4], v), "empty": (h[:, :0], k, c, v),
        "mixed dtypes": (h, k, c, v.half()), "float64": (h.double(), k.double(), c.double(), v.double()),
        "device": (h.to("meta"), k.to("meta"), c.to("meta"), v.to("meta")),
    }


@pytest.mark.parametrize("case", list(_head_bad_inputs()))
def test_softmax_head_bad_inputs_raise(case):
    with pytest.raises(ValueError, match="softmax_head"):
        cpu_ops.softmax_head(*_head_bad_inputs()[case])


# ------------------------------------------------------------------------------------------------
# Build and load

def test_missing_compiler_gives_one_line_reason(tmp_path):
    """In a fresh process with no compiler (CXX points nowhere) and an empty build cache."""
    script = ("from noprop_fast.ops import cpp as cpu_ops\n"
              "print(repr(cpu_ops.available()))\n"
              "try:\n    cpu_ops.load()\nexcept cpu_ops.FusedOpsUnavailable as err:\n"
              "    print(repr(str(err)))\n")
    env = {**os.environ, "CXX": "/nonexistent/g++", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    status_line, error_line = result.stdout.strip().splitlines()
    ok, reason = eval(status_line)
    assert ok is False and "\n" not in reason and "compiler" in reason and "/nonexistent/g++" in reason
    assert eval(error_line) == reason
    assert not list(tmp_path.iterdir())  # nothing was built


def test_compile_errors_are_condensed_to_their_first_error_line():
    log = ("Error building extension 'noprop_fast_cpu_0': [1/2] c++ -MMD -c noise.cpp\n"
           "FAILED: noise.o\n/src/noise.cpp:3:1: error: 'x' was not declared\n"
           "/src/noise.cpp:9:2: error: expected ';'\nninja: build stopped\n")
    assert cpu_ops._one_line(RuntimeError(log)) == "/src/noise.cpp:3:1: error: 'x' was not declared"
    assert cpu_ops._one_line(ImportError("libgomp.so.1: cannot open\nmore")) == \
        "libgomp.so.1: cannot open"


def test_extension_name_follows_the_sources(tmp_path):
    """A changed source gives a new name, hence a new build directory: no stale library loads."""
    source_dir = cpu_ops._source_dir()
    for name in cpu_ops.SOURCES + cpu_ops.HEADERS:
        (tmp_path / name).write_bytes((source_dir / name).read_bytes())
    name = cpu_ops._extension_name(tmp_path)
    assert name == cpu_ops._extension_name(tmp_path) and name.startswith("noprop_fast_cpu_")
    with open(tmp_path / "noise.cpp", "a") as f:
        f.write("\n// edited\n")
    assert cpu_ops._extension_name(tmp_path) != name
    assert Path(cpu_ops.load().__file__).stem.startswith(cpu_ops._extension_name(source_dir))


def test_a_lock_left_by_an_interrupted_build_is_cleared(tmp_path, monkeypatch, capsys):
    """cpp_extension waits on its lock file forever; an old one (a killed build) is removed,
    a fresh one (a build running in another process) is left alone."""
    from torch.utils import cpp_extension
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build_dir = Path(cpp_extension._get_build_directory("noprop_fast_cpu_test", verbose=False))
    lock = build_dir / "lock"
    lock.write_text("")
    cpu_ops._clear_stale_lock(cpp_extension, "noprop_fast_cpu_test")
    assert lock.exists()
    old = time.time() - 2 * cpu_ops.STALE_LOCK_SECONDS
    os.utime(lock, (old, old))
    cpu_ops._clear_stale_lock(cpp_extension, "noprop_fast_cpu_test")
    assert not lock.exists() and "interrupted build" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Double backward

def test_double_backward_raises():
    """Asking for the graph of a C++ op's gradient (or of the chunked cross-entropy's) raises,
    naming the op: with create_graph=True and an incoming gradient that does not require grad,
    once_differentiable let a second derivative through x^3 silently lack the op's own term."""
    from noprop_fast.ops.chunked_ce import linear_cross_entropy

    gen = torch.Generator().manual_seed(0)
    h, k, c, v = _draw(gen, 2, 3, 8), _draw(gen, 2, 5, 8), _draw(gen, 2, 5), _draw(gen, 5, 4)
    w, b, u = _draw(gen, 2, 4, 8), _draw(gen, 2, 4), _draw(gen, 3, 4)
    y, a, s = torch.tensor([0, 2, 4]), torch.rand(2, generator=gen), torch.rand(2, generator=gen)
    ops = {"softmax_head": (lambda t: cpu_ops.softmax_head(t, k, c, v), _draw(gen, 2, 3, 8)),
           "block_linear": (lambda t: cpu_ops.block_linear(t, w, b), _draw(gen, 2, 3, 8)),
           "block_loss": (lambda t: cpu_ops.block_loss(t, u, a), _draw(gen, 2, 3, 4)),
           "noise_injection": (lambda t: cpu_ops.noise_injection(y, t, a, s, _one(1), _one(0)),
                               _draw(gen, 5, 4)),
           "linear_cross_entropy": (lambda t: linear_cross_entropy(t, w[0], b[0], y.clamp(max=3)),
                                    _draw(gen, 3, 8))}
    for name, (op, x) in ops.items():
        x = x.requires_grad_()
        with pytest.raises(RuntimeError, match=f"{name}: no double backward"):
            torch.autograd.grad(op(x).sum() + x.pow(3).sum(), x, create_graph=True)
        (first,) = torch.autograd.grad(op(x).sum(), x)  # a plain backward still works
        assert first.shape == x.shape and torch.isfinite(first).all()
