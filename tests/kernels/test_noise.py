"""Fused noise injection (kernels/noise.py) against its references.

The noise is compared exactly: `philox_randn_ref` must reproduce tl.randn and the kernel's noise
(the Philox integers bitwise, the fp32 Box-Muller transform to 1e-6), and then the forward and the
gradients dW, da, ds are held to `noise_injection_ref` with that same noise, over odd shapes from
hypothesis, with scales per block ([B]) and per example ([B, N]).
"""
import pytest
import torch
import triton
import triton.language as tl
from hypothesis import HealthCheck, given, settings, strategies as st

from noprop_fast.kernels.noise import (_cos_of_angle, noise_injection, noise_injection_ref,
                                       philox_4x32_ref, philox_randint_ref, philox_randn_ref)
from helpers import philox_noise
from tolerances import DTYPES, assert_close

SETTINGS = settings(deadline=None, max_examples=10, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
INT64_MAX = 2**63 - 1


def _inputs(B, N, d, m, dtype, device, labels=None, gen_seed=0, per_example=False):
    """y [N], W [m, d], and scales a, s [B] (per block) or [B, N] (per example)."""
    gen = torch.Generator().manual_seed(gen_seed)
    y = torch.randint(0, m, (N,), generator=gen) if labels is None else torch.tensor(labels)
    W = torch.randn(m, d, generator=gen).to(dtype)
    a = torch.rand((B, N) if per_example else (B,), generator=gen)
    s = (1 - a.square()).sqrt()  # a^2 + s^2 = 1, as for a schedule
    return y.to(device), W.to(device), a.to(device), s.to(device)


def _device_int(value, device):
    return torch.tensor([value], dtype=torch.int64, device=device)


def test_philox_ref_matches_random123_known_answers():
    """Philox-4x32-10 known-answer vectors of Random123 (kat_vectors: counter, key -> output)."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, expected in cases:
        out = philox_4x32_ref(*[torch.tensor([c]) for c in counter], *key)
        assert tuple(int(w) for w in out) == expected


@triton.jit
def _randint_kernel(seed_ptr, offset_ptr, out1_ptr, out2_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < n
    offsets = tl.load(offset_ptr) + i.to(tl.int64)
    r1, r2, _, _ = tl.randint4x(tl.load(seed_ptr), offsets)
    tl.store(out1_ptr + i, r1.to(tl.int64), mask=mask)  # uint32 -> int64 zero-extends
    tl.store(out2_ptr + i, r2.to(tl.int64), mask=mask)


@pytest.mark.parametrize("seed,offset", [(0, 0), (123456789012, 2**32 - 20), (-1, 2**40 + 3),
                                         (2**62 + 7, 5 * 2**32 + 2**31)])
def test_philox_integers_equal_triton_bitwise(seed, offset, device):
    """The two Philox words behind tl.randn, including offsets that cross 2^32 and negative seeds."""
    n = 100
    out1 = torch.empty(n, dtype=torch.int64, device=device)
    out2 = torch.empty_like(out1)
    _randint_kernel[(1,)](_device_int(seed, device), _device_int(offset, device), out1, out2, n,
                          BLOCK=128)
    ref1, ref2 = philox_randint_ref(seed, offset + torch.arange(n))
    assert torch.equal(out1.cpu(), ref1) and torch.equal(out2.cpu(), ref2)


@triton.jit
def _randn_kernel(seed_ptr, offset_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.randn(tl.load(seed_ptr), tl.load(offset_ptr) + i.to(tl.int64)), mask=i < n)


@pytest.mark.parametrize("seed,offset", [(3, 0), (-7, 2**33 - 500)])
def test_philox_randn_ref_equals_tl_randn(seed, offset, device):
    """The reference is Triton's own tl.randn, not only this file's kernel."""
    n = 4096
    out = torch.empty(n, device=device)
    _randn_kernel[(n // 1024,)](_device_int(seed, device), _device_int(offset, device), out, n, BLOCK=1024)
    ref = philox_randn_ref(seed, offset + torch.arange(n))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-6, atol=1e-6)


@triton.jit
def _cos_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    tl.store(out_ptr + i, _cos_of_angle(tl.load(x_ptr + i, mask=mask, other=0.0)), mask=mask)


def test_cos_of_angle_is_accurate_on_zero_to_two_pi(device):
    """The kernel's cos (in place of libdevice's) over the whole Box-Muller range, quadrant
    boundaries included, against float64: within 2 fp32 ulps of 1."""
    x = torch.cat([torch.linspace(0, 6.2831855, 100_003),
                   torch.tensor([0.0, 0.78539816, 1.5707964, 2.3561945, 3.1415927, 4.712389, 6.2831855])])
    out = torch.empty_like(x, device=device)
    _cos_kernel[(triton.cdiv(x.numel(), 1024),)](x.to(device), out, x.numel(), BLOCK=1024)
    error = (out.cpu().double() - torch.cos(x.double())).abs().max().item()
    assert error < 2.4e-7, error


@pytest.mark.parametrize("seed,offset", [(0, 0), (987654321, 2**32 - 100), (-5, 3 * 2**32)])
def test_kernel_noise_equals_philox_randn_ref(seed, offset, device):
    """a = 0, s = 1 gives z = eps: the kernel's noise, element by element."""
    B, N, d = 3, 7, 65
    y, W, _, _ = _inputs(B, N, d, 4, torch.float32, device)
    z = noise_injection(y, W, torch.zeros(B, device=device), torch.ones(B, device=device),
                        _device_int(seed, device), _device_int(offset, device))
    torch.testing.assert_close(z.cpu(), philox_noise(seed, offset, B, N, d), rtol=1e-6, atol=1e-6)


@SETTINGS
@given(B=st.sampled_from([1, 2, 3, 10]), N=st.sampled_from([1, 2, 7]),
       d=st.sampled_from([1, 3, 10, 20, 65]), m=st.sampled_from([1, 2, 10]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(-2**63, INT64_MAX),
       offset=st.integers(0, 2**62), gen_seed=st.integers(0, 2**16), per_example=st.booleans())
def test_forward_matches_reference(B, N, d, m, dtype, seed, offset, gen_seed, per_example, device):
    y, W, a, s = _inputs(B, N, d, m, dtype, device, gen_seed=gen_seed, per_example=per_example)
    z = noise_injection(y, W, a, s, _device_int(seed, device), _device_int(offset, device))
    assert z.shape == (B, N, d) and z.dtype == dtype
    expected = noise_injection_ref(y.cpu(), W.cpu(), a.cpu(), s.cpu(), philox_noise(seed, offset, B, N, d))
    assert_close(z.cpu(), expected, dtype)


def _check_grad(B, N, d, m, dtype, device, labels=None, gen_seed=0):
    """dW of the kernel against autograd of the reference (fp32, same noise); returns dW and y."""
    y, W, a, s = _inputs(B, N, d, m, dtype, device, labels=labels, gen_seed=gen_seed)
    dz = torch.randn(B, N, d, generator=torch.Generator().manual_seed(gen_seed + 1)).to(dtype)
    W.requires_grad_(True)
    z = noise_injection(y, W, a, s, _device_int(11, device), _device_int(5, device))
    (dW,) = torch.autograd.grad(z, W, dz.to(device))
    W32 = W.detach().cpu().float().requires_grad_(True)
    z_ref = noise_injection_ref(y.cpu(), W32, a.cpu(), s.cpu(), philox_noise(11, 5, B, N, d))
    (expected,) = torch.autograd.grad(z_ref, W32, dz.float())
    assert dW.dtype == dtype and dW.shape == (m, d)
    assert_close(dW.cpu(), expected, dtype, scale=B)
    return dW.cpu(), y.cpu()


@SETTINGS
@given(B=st.sampled_from([1, 2, 3, 10]), N=st.sampled_from([1, 2, 7]),
       d=st.sampled_from([1, 3, 10, 20, 65]), m=st.sampled_from([1, 2, 10]),
       dtype=st.sampled_from(DTYPES), gen_seed=st.integers(0, 2**16))
def test_backward_matches_reference(B, N, d, m, dtype, gen_seed, device):
    _check_grad(B, N, d, m, dtype, device, gen_seed=gen_seed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_accumulates_repeated_labels_and_zeroes_absent_ones(dtype, device):
    labels = [3, 3, 0, 3, 7, 3, 0, 3, 3, 9, 3]  # label 3 eight times; 1, 2, 4, 5, 6, 8 never
    dW, _ = _check_grad(4, len(labels), 20, 10, dtype, device, labels=labels)
    absent = [k for k in range(10) if k not in labels]
    assert torch.all(dW[absent] == 0)
    assert torch.all(dW[[0, 3, 7, 9]].abs().sum(-1) > 0)


# which of W, a, s require grad: NoProp-DT (W), a learned embedding under a learned schedule (all
# three), a fixed embedding under a learned schedule (a, s), and each scale alone
GRAD_SETS = [("W",), ("W", "a", "s"), ("a", "s"), ("a",), ("s",)]


def _check_scale_grads(B, N, d, m, dtype, device, per_example, wanted, gen_seed=0):
    """Every gradient in `wanted` of the kernel against autograd of the fp32 reference (same noise,
    same rounded inputs); the others must come back as None."""
    y, W, a, s = _inputs(B, N, d, m, dtype, device, gen_seed=gen_seed, per_example=per_example)
    dz = torch.randn(B, N, d, generator=torch.Generator().manual_seed(gen_seed + 1)).to(dtype)
    leaves = {"W": W, "a": a, "s": s}
    for name in wanted:
        leaves[name].requires_grad_(True)
    z = noise_injection(y, W, a, s, _device_int(11, device), _device_int(5, device))
    grads = dict(zip(wanted, torch.autograd.grad(z, [leaves[n] for n in wanted], dz.to(device))))
    ref = {n: t.detach().cpu().float().requires_grad_(n in wanted) for n, t in leaves.items()}
    z_ref = noise_injection_ref(y.cpu(), ref["W"], ref["a"], ref["s"], philox_noise(11, 5, B, N, d))
    expected = dict(zip(wanted, torch.autograd.grad(z_ref, [ref[n] for n in wanted], dz.float())))
    # dW sums over the B blocks; da and ds over the d columns (and for [B] scales the N examples)
    terms = {"W": B, "a": d * (1 if per_example else N), "s": d * (1 if per_example else N)}
    for name in wanted:
        assert grads[name].shape == leaves[name].shape
        assert grads[name].dtype == (dtype if name == "W" else torch.float32)
        assert_close(grads[name].cpu(), expected[name], dtype, scale=terms[name] ** 0.5)
    return grads


@SETTINGS
@given(B=st.sampled_from([1, 2, 3, 10]), N=st.sampled_from([1, 2, 7, 13]),
       d=st.sampled_from([1, 3, 10, 20, 65, 300]), m=st.sampled_from([1, 2, 10]),
       dtype=st.sampled_from(DTYPES), per_example=st.booleans(), wanted=st.sampled_from(GRAD_SETS),
       gen_seed=st.integers(0, 2**16))
def test_scale_gradients_match_reference(B, N, d, m, dtype, per_example, wanted, gen_seed, device):
    """da and ds (and dW beside them) for [B] and [B, N] scales; d = 300 spans two column tiles."""
    _check_scale_grads(B, N, d, m, dtype, device, per_example, wanted, gen_seed)


@pytest.mark.parametrize("per_example", [False, True], ids=["per-block", "per-example"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_gradients_one_block_many_examples(per_example, dtype, device):
    """NoProp-CT's shape: B = 1, a time per example; d = 600 spans three column tiles."""
    _check_scale_grads(1, 37, 600, 7, dtype, device, per_example, ("W", "a", "s"))


@pytest.mark.parametrize("per_example", [False, True], ids=["per-block", "per-example"])
def test_backward_returns_none_for_scales_without_grad(per_example, device):
    """a and s not requiring grad (NoProp-DT): the backward computes and returns only dW."""
    from noprop_fast.kernels import noise as module

    y, W, a, s = _inputs(2, 5, 8, 4, torch.float32, device, per_example=per_example)
    z = noise_injection(y, W.requires_grad_(True), a, s, _device_int(1, device),
                        _device_int(0, device))
    with torch.no_grad():
        grads = module._NoiseInjection.backward(z.grad_fn, torch.ones_like(z))
    assert grads[0] is None and grads[1] is not None and grads[1].shape == W.shape
    assert all(g is None for g in grads[2:])
    a.requires_grad_(True)  # and with a alone: dW and ds are None
    z = noise_injection(y, W.detach(), a, s, _device_int(1, device), _device_int(0, device))
    with torch.no_grad():
        grads = module._NoiseInjection.backward(z.grad_fn, torch.ones_like(z))
    assert grads[1] is None and grads[2].shape == a.shape and grads[3] is None


def test_scale_gradient_draws_the_forwards_noise(device):
    """ds regenerates eps from copies of the forward's seed and offset: advancing the offset tensor
    in place after the forward (as a CUDA graph's caller does) leaves ds unchanged."""
    B, N, d = 2, 5, 8
    y, W, a, s = _inputs(B, N, d, 4, torch.float32, device, per_example=True)
    s.requires_grad_(True)
    offset = _device_int(40, device)
    z = noise_injection(y, W, a, s, _device_int(3, device), offset)
    offset += 10**6
    (ds,) = torch.autograd.grad(z, s, torch.ones_like(z))
    expected = philox_noise(3, 40, B, N, d).sum(-1)
    assert_close(ds.cpu(), expected, torch.float32, scale=d ** 0.5)


def test_noise_is_not_saved_for_backward(device):
    B, N, d = 3, 7, 20
    y, W, a, s = _inputs(B, N, d, 5, torch.float32, device)
    z = noise_injection(y, W.requires_grad_(True), a, s, _device_int(1, device), _device_int(0, device))
    saved = z.grad_fn.saved_tensors
    assert len(saved) == 2 and saved[0] is y and saved[1] is a


def test_noise_properties(device):
    """Same (seed, offset): identical; another seed or offset: different; the counter is the flat
    index; mean 0 and variance 1 over 50k samples."""
    B, N, d = 2, 25, 1000
    y, W, _, _ = _inputs(B, N, d, 3, torch.float32, device)
    a, s = torch.zeros(B, device=device), torch.ones(B, device=device)

    def eps(seed, offset):
        return noise_injection(y, W, a, s, _device_int(seed, device), _device_int(offset, device)).cpu()

    base = eps(42, 1000)
    assert torch.equal(base, eps(42, 1000))
    for other in (eps(43, 1000), eps(42, 1000 + B * N * d)):
        assert (other == base).float().mean() < 1e-3
    shifted = eps(42, 1000 + 7).flatten()  # element k at offset o + 7 is element k + 7 at offset o
    assert torch.equal(shifted[:-7], base.flatten()[7:])
    assert abs(base.mean().item()) < 0.05 and abs(base.var().item() - 1) < 0.05
    assert abs(base[0].mean() - base[1].mean()) < 0.05  # the two blocks draw from the same law


def test_cuda_graph_replay_draws_new_noise(device):
    """Seed and offset are read on the device: a captured graph follows an in-place offset bump."""
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    B, N, d = 3, 16, 20
    y, W, a, s = _inputs(B, N, d, 10, torch.float32, device)
    seed, offset = _device_int(7, device), _device_int(0, device)
    noise_injection(y, W, a, s, seed, offset)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z = noise_injection(y, W, a, s, seed, offset)
    graph.replay()
    first = z.clone()
    offset += B * N * d
    graph.replay()
    assert not torch.equal(first, z)
    torch.testing.assert_close(z, noise_injection(y, W, a, s, seed, offset), rtol=0, atol=0)


def _bad_inputs(device):
    y, W, a, s = _inputs(2, 5, 8, 4, torch.float32, device)
    seed, offset = _device_int(0, device), _device_int(0, device)
    return [
        ((y, W[0], a, s, seed, offset), "W must be \\[m, d\\]"),
        ((y, W.to(torch.float64), a, s, seed, offset), "W must be float32, float16 or bfloat16"),
        ((y.to(torch.int32), W, a, s, seed, offset), "y must be a 1-D int64"),
        ((y.view(1, -1), W, a, s, seed, offset), "y must be a 1-D int64"),
        ((y, W, a.half(), s, seed, offset), "a must be a 1-D float32"),
        ((y, W, a, s.view(1, -1), seed, offset), "s must be a 1-D float32"),
        ((y, W, a, s[:1], seed, offset), "a and s must have the same shape"),
        # per example: a, s [B, N] with N the labels' count, both of one shape
        ((y, W, a[:, None].expand(2, 6), s, seed, offset),
         r"a must be a 1-D float32 tensor \[B\] \(per block\) or a 2-D one \[B, N\] with N = 5"),
        ((y, W, a, s.view(2, 1, 1), seed, offset), "s must be a 1-D float32"),
        ((y, W, a[:, None].expand(2, 5), s, seed, offset), "a and s must have the same shape"),
        ((y, W, a, s, seed.int(), offset), "seed must be an int64 tensor with one element"),
        ((y, W, a, s, seed, offset.repeat(2)), "offset must be an int64 tensor with one element"),
        ((y, W, a, s, 0, offset), "seed must be an int64 tensor"),
    ]


@pytest.mark.parametrize("case", range(13))
def test_bad_inputs_raise_a_clear_error(case, device):
    args, message = _bad_inputs(device)[case]
    with pytest.raises(ValueError, match="noise_injection: " + message):
        noise_injection(*args)


@pytest.mark.parametrize("seed,offset", [(0, 0), (123456789012, 2**40 - 5), (-5, 3 * 2**32 + 7)])
def test_kernel_noise_equals_cpu_op_noise(seed, offset, device):
    """The Triton kernel and the C++ CPU op (noprop_fast.ops.cpp) draw the same noise for one seed
    and offset: with a = 0, s = 1 each returns its eps."""
    from noprop_fast.ops import cpp as cpu_ops

    ok, reason = cpu_ops.available()
    if not ok:
        pytest.skip(reason)
    B, N, d = 3, 7, 65
    y, W, _, _ = _inputs(B, N, d, 4, torch.float32, device)
    zeros, ones = torch.zeros(B), torch.ones(B)
    z_kernel = noise_injection(y, W, zeros.to(device), ones.to(device), _device_int(seed, device),
                               _device_int(offset, device))
    z_cpu = cpu_ops.noise_injection(y.cpu(), W.cpu(), zeros, ones, _device_int(seed, "cpu"),
                                    _device_int(offset, "cpu"))
    torch.testing.assert_close(z_kernel.cpu(), z_cpu, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [4, -1, 2**40])
def test_label_outside_the_classes_is_a_clear_error(bad, device):
    """A label outside [0, m) raises IndexError naming it, as the C++ op does, and is never an
    address: the forward's rows for it are NaN, the others right, and the backward adds nothing
    for it (reading or writing W's row 4, -1 or 2^40 would be garbage, a fault or heap damage).
    On a GPU the error surfaces at check_labels(), which the run calls where it syncs anyway."""
    from noprop_fast.ops import cpp as cpu_ops
    from noprop_fast.kernels.noise import _noise_backward, _noise_forward, check_labels

    B, N, d, m = 2, 5, 8, 4
    y, W, a, s = _inputs(B, N, d, m, torch.float32, device)
    y[3] = bad
    seed, offset = _device_int(1, device), _device_int(0, device)
    with pytest.raises(IndexError, match=rf"noise_injection: label( {bad})? at position 3 is "
                                         rf"outside \[0, {m}\)"):
        noise_injection(y, W, a, s, seed, offset)
        check_labels()
    check_labels()  # reset: raises no more
    ok, reason = cpu_ops.available()
    if ok:
        with pytest.raises(IndexError, match=rf"noise_injection: label {bad} at position 3 is outside"):
            cpu_ops.noise_injection(y.cpu(), W.cpu(), a.cpu(), s.cpu(), seed.cpu(), offset.cpu())
    # the kernels themselves: the good rows are right, the bad one NaN, and the flag is set
    good = (torch.arange(N) != 3).to(device)
    z = _noise_forward(y, W, a, s, seed, offset)
    assert torch.isnan(z[:, 3]).all()
    assert_close(z[:, good], noise_injection_ref(y[good], W, a, s, philox_noise(1, 0, B, N, d)[:, good.cpu()]
                                                 .to(device)), torch.float32)
    with pytest.raises(IndexError, match="at position 3"):
        check_labels()
    dz = torch.randn(B, N, d).to(device)
    dW, _, _ = _noise_backward(dz, y, a, (m, d), torch.float32)
    W32 = W.detach().float().requires_grad_()
    z_good = noise_injection_ref(y[good], W32, a, s, torch.zeros(B, N - 1, d, device=device))
    (expected,) = torch.autograd.grad(z_good, W32, dz[:, good])
    assert_close(dW, expected, torch.float32, scale=B)
