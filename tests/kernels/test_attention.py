"""Causal flash attention (kernels/attention.py) against `causal_attention_ref`.

(a) The output and every gradient (dq, dk, dv) match the reference under autograd, for a random
    upstream gradient: Hypothesis-drawn shapes (L = 1, primes, non-powers of two, past several
    tiles; Z * H = 1 and more), every head width Dh, the default and a given scale; tiles of unequal
    sizes forced small (the diagonal's tile arithmetic); logits far beyond exp's range. The
    reference runs in fp32 on the same (rounded) inputs: the answer fp32 accumulation should reach.
(b) Causality, bitwise: changing keys and values after position i leaves o and dq of rows <= i
    unchanged (and changes the rows after i, so the check can fail).
(c) Strided views (q, k, v sliced out of a packed qkv tensor, a transposed k, an expanded upstream
    gradient) give the same answer as contiguous inputs; the backward is deterministic.
(d) Neither the forward nor the backward creates or saves a tensor as large as one [L, L] matrix
    (the reference does, so the check can fail); on a GPU, peak memory stays far below it.
(e) Inputs the kernels cannot take raise ValueError naming the op.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import noprop_fast.kernels.attention as attention
from noprop_fast.kernels.attention import HEAD_DIMS, causal_attention, causal_attention_ref
from helpers import CreatedTensors
from tolerances import ATTENTION_TOLERANCES, DTYPES, INTERPRETER

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _inputs(Z, H, L, Dh, dtype, device, seed, scale=1.0):
    """q, k, v and an upstream gradient [Z, H, L, Dh]; q carries `scale` (sharper softmax)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(Z, H, L, Dh, generator=gen) for _ in range(4))
    return [t.to(device=device, dtype=dtype) for t in (q * scale, k, v, grad)]


def _run(fn, q, k, v, grad, scale=None):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]  # views kept as they are
    out = fn(*leaves, scale=scale)
    return out, torch.autograd.grad(out, leaves, grad)


def _assert_close(actual, expected, dtype, scale=1.0, name=""):
    rtol, atol = ATTENTION_TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{name}: {m}")


def _check_against_reference(q, k, v, grad, scale=None, relative_atol=False):
    """Fused output and gradients against the fp32 reference. relative_atol: atol times the
    largest entry of each reference tensor (large logits, where dP - Delta cancels)."""
    dtype = q.dtype
    out, grads = _run(causal_attention, q, k, v, grad, scale)
    ref_out, ref_grads = _run(causal_attention_ref, *(t.float() for t in (q, k, v, grad)), scale)
    assert out.shape == q.shape and out.dtype == dtype
    for name, got, ref in zip(["o", "dq", "dk", "dv"], [out, *grads], [ref_out, *ref_grads]):
        assert got.shape == ref.shape and got.dtype == dtype, name
        size = max(1.0, ref.abs().max().item()) if relative_atol else 1.0
        _assert_close(got, ref, dtype, size, name)
    return out, grads


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(Z=st.sampled_from([1, 2]), H=st.sampled_from([1, 3]),
       L=st.sampled_from([1, 2, 5, 16, 17, 31, 37, 64, 70]), Dh=st.sampled_from([16, 32, 64]),
       scale=st.sampled_from([None, 0.3]), seed=st.integers(0, 2 ** 16))
def test_output_and_gradients_match_reference(device, dtype, Z, H, L, Dh, scale, seed):
    _check_against_reference(*_inputs(Z, H, L, Dh, dtype, device, seed), scale=scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Dh, L", [(16, 1), (32, 23), (64, 70), (128, 19)])
def test_every_head_width(device, dtype, Dh, L):
    """Each Dh has its own tiles; Dh = 128 once, small (the interpreter's time)."""
    assert set(HEAD_DIMS) == {16, 32, 64, 128}
    _check_against_reference(*_inputs(1, 2, L, Dh, dtype, device, seed=Dh + L))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_m, block_n", [(16, 16), (16, 32), (32, 16), (64, 16)])
def test_unequal_small_tiles(device, dtype, block_m, block_n, monkeypatch):
    """Tiles forced small and unequal, so that L = 67 crosses many of them: a query tile ends
    mid-way through a key tile and the reverse (the diagonal's first and last tiles)."""
    def small_tiles(kernel, dtype, head_dim):
        return {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n,
                "num_warps": 4, "num_stages": 1}

    monkeypatch.setattr(attention, "_config", small_tiles)
    _check_against_reference(*_inputs(2, 1, 67, 16, dtype, device, seed=block_m * block_n))


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits_stay_finite(device, dtype):
    q, k, v, grad = _inputs(1, 2, 61, 32, dtype, device, seed=5, scale=40.0)
    logits = q.float() @ k.float().transpose(-1, -2) / 32 ** 0.5
    assert logits.abs().max() > 100  # exp overflows fp32 past 88: the max must be subtracted
    out, grads = _check_against_reference(q, k, v, grad, relative_atol=True)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("i", [0, 15, 16, 40])
def test_causality_is_exact(device, dtype, i):
    """Row i attends to keys 0..i only: new keys and values after i change nothing in o and dq
    up to row i, bit for bit (masked probabilities are exactly 0), and do change the rows after."""
    Z, H, L, Dh = 1, 2, 53, 32
    q, k, v, grad = _inputs(Z, H, L, Dh, dtype, device, seed=i)
    k2, v2, _, _ = _inputs(Z, H, L, Dh, dtype, device, seed=i + 1000)
    k2 = torch.cat([k[..., :i + 1, :], k2[..., i + 1:, :]], dim=2)
    v2 = torch.cat([v[..., :i + 1, :], v2[..., i + 1:, :]], dim=2)
    out, (dq, _, _) = _run(causal_attention, q, k, v, grad)
    out2, (dq2, _, _) = _run(causal_attention, q, k2, v2, grad)
    assert torch.equal(out[..., :i + 1, :], out2[..., :i + 1, :])
    assert torch.equal(dq[..., :i + 1, :], dq2[..., :i + 1, :])
    assert not torch.equal(out[..., i + 1:, :], out2[..., i + 1:, :])
    assert not torch.equal(dq[..., i + 1:, :], dq2[..., i + 1:, :])


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views_and_determinism(device, dtype):
    """q and v sliced out of a packed [Z, L, 3, H, Dh] tensor (head and row strides not those of
    a contiguous tensor), k transposed in its last two dimensions (copied by the Function), an
    upstream gradient expanded over Z, H, L (strides 0): the reference's numbers and those of
    contiguous inputs; and a second backward gives the same bits (no atomics)."""
    Z, H, L, Dh = 2, 3, 29, 32
    q, k, v, _ = _inputs(Z, H, L, Dh, dtype, device, seed=17)
    qkv = torch.stack([t.transpose(1, 2) for t in (q, k, v)], dim=2).contiguous()  # [Z, L, 3, H, Dh]
    q_view, v_view = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
    k_view = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # stride(-1) = L
    assert not q_view.is_contiguous() and k_view.stride(-1) == L
    grad = torch.randn(1, 1, 1, Dh, device=device).to(dtype).expand(Z, H, L, Dh)
    out, grads = _check_against_reference(q_view, k_view, v_view, grad)
    contiguous_out, contiguous_grads = _run(causal_attention, q, k, v, grad.contiguous())
    for name, got, expected in zip(["o", "dq", "dk", "dv"], [out, *grads],
                                   [contiguous_out, *contiguous_grads]):
        _assert_close(got, expected, dtype, name=name)
    _, again = _run(causal_attention, q_view, k_view, v_view, grad)  # no atomics: same bits
    assert all(torch.equal(g, a) for g, a in zip(grads, again))


def _saved_and_created_sizes(fn, q, k, v, grad):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with CreatedTensors() as created, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.autograd.grad(fn(*leaves), leaves, grad)
    return saved, created.sizes


def test_no_l_by_l_tensor_is_created_or_saved(device):
    # one fp32 [L, L] matrix is larger than every legitimate tensor (Z H L Dh fp32 values)
    Z, H, L, Dh = 1, 2, 67, 16
    one_matrix = L * L * 4
    assert Z * H * L * Dh * 4 < one_matrix
    q, k, v, grad = _inputs(Z, H, L, Dh, torch.float32, device, seed=23)

    def matrices(sizes):
        return [s for s in sizes if s >= one_matrix]

    saved, created = _saved_and_created_sizes(causal_attention, q, k, v, grad)
    assert saved and created  # the hooks saw the pass
    assert not matrices(saved) and not matrices(created), (matrices(saved), matrices(created))
    # the checks can fail: attention that forms P saves and creates [Z, H, L, L] tensors
    def explicit(q, k, v):
        above = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)  # key j > query i
        s = (q @ k.transpose(-1, -2) * Dh ** -0.5).masked_fill(above, float("-inf"))
        return torch.softmax(s, dim=-1) @ v
    ref_saved, ref_created = _saved_and_created_sizes(explicit, q, k, v, grad)
    assert matrices(ref_saved) and matrices(ref_created)


@pytest.mark.skipif(INTERPRETER, reason="GPU memory; the interpreter runs on the CPU")
def test_peak_gpu_memory_is_linear_in_l(device):
    Z, H, L, Dh, dtype = 1, 4, 4096, 64, torch.float16
    q, k, v, grad = _inputs(Z, H, L, Dh, dtype, device, seed=29)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.autograd.grad(causal_attention(*leaves), leaves, grad)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    one_matrix = Z * H * L * L * 2  # P in fp16: 134 MB here
    assert extra < one_matrix / 4, f"{extra / 2**20:.1f} MiB over the inputs"


def _bad_inputs(device):
    f32 = dict(device=device, dtype=torch.float32)
    q = torch.randn(2, 3, 5, 16, **f32)
    return {
        "q not 4-d": (q[0], q, q),
        "k length differs": (q, q[:, :, :4], q),
        "v heads differ": (q, q, q[:, :2]),
        "k width differs": (q, torch.randn(2, 3, 5, 32, **f32), q),
        "empty": (q[:, :, :0], q[:, :, :0], q[:, :, :0]),
        "Dh not a tile": (q[..., :8], q[..., :8], q[..., :8]),
        "Dh too wide": tuple([torch.randn(1, 1, 3, 256, **f32)] * 3),
        "mixed dtypes": (q, q.half(), q),
        "integer": (q.long(), q.long(), q.long()),
        "float64": (q.double(), q.double(), q.double()),
        "another device": (q, q, q.to("meta")),
        "not a tensor": (q, q, q.tolist()),
        "rows too far apart for int32": tuple(  # meta: strides without memory
            [torch.empty_strided((1, 1, 2, 16), (0, 0, 2 ** 31, 1), device="meta")] * 3),
    }


@pytest.mark.parametrize("case", list(_bad_inputs("cpu")))
def test_bad_input_raises_value_error(device, case):
    with pytest.raises(ValueError, match=r"^causal_attention: [^\n]+$"):
        causal_attention(*_bad_inputs(device)[case])
