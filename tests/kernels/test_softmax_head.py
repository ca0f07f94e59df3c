"""The fused softmax-embedding head (kernels/softmax_head.py) against `softmax_head_ref`.

(a) The output and every gradient (dh, dk, dc, dv) match the reference under autograd over odd
    shapes: m from 1 to past one chunk, D and d not multiples of a tile, N smaller than a row tile,
    with and without the bias, a random upstream gradient; every tile of d; strided views. The
    reference runs in fp32 on the same (rounded) inputs: the answer fp32 accumulation should reach.
(b) Logits far beyond exp's range (h scaled by 30) stay finite and match: the online max works.
    Classes masked by a -inf bias (a whole leading, middle or trailing chunk, all but one) match
    the reference; a row with every class masked gives NaN where the reference does.
(c) Neither the forward nor the backward creates a [B, N, m] tensor: no tensor saved for the
    backward, and no tensor any aten op creates, has B * N * m elements. The same checks catch the
    reference's logits, so they can fail.
(d) Inputs the kernels cannot take raise ValueError.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noprop_fast.kernels.softmax_head import MAX_D, MAX_DV, softmax_head, softmax_head_ref
from helpers import CreatedTensors
from tolerances import DTYPES, TOLERANCES, assert_close

SETTINGS = settings(max_examples=10, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _inputs(B, N, D, m, d, bias, dtype, device, seed, h_scale=1.0):
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    h, k = draw(B, N, D, scale=h_scale / D ** 0.25), draw(B, m, D, scale=D ** -0.25)
    c = draw(B, m) if bias else None
    return h, k, c, draw(m, d), draw(B, N, d)


def _fused_and_reference(h, k, c, v, grad):
    """(output, gradients) of the fused op, and of the reference in fp32 on the same values."""
    leaves = [t.detach().requires_grad_() for t in (h, k, c, v) if t is not None]  # views kept
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]

    def run(fn, tensors, upstream):
        h_, k_, *rest = tensors
        c_, v_ = (rest if c is not None else [None, rest[0]])
        out = fn(h_, k_, c_, v_)
        return out, torch.autograd.grad(out, tensors, upstream)

    return run(softmax_head, leaves, grad), run(softmax_head_ref, ref_leaves, grad.float())


def _compare(fused, reference, dtype, B, N, h_scale=1.0):
    (out, grads), (ref_out, ref_grads) = fused, reference
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close(out, ref_out, dtype)
    names = ["dh", "dk", "dc", "dv"] if len(grads) == 4 else ["dh", "dk", "dv"]
    # atol * rows for a gradient summed over rows: dk, dc over one block's N, dv over all B * N;
    # dk = dS^T h also carries h's magnitude
    scales = {"dh": 1.0, "dk": N * h_scale, "dc": N, "dv": B * N}
    for name, g, ref in zip(names, grads, ref_grads):
        assert g.shape == ref.shape, name
        assert_close(g, ref, dtype, scale=scales[name])


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(B=st.sampled_from([1, 2, 3]), N=st.sampled_from([1, 2, 5]), D=st.sampled_from([1, 8, 17]),
       m=st.sampled_from([1, 2, 10, 37, 130]), d=st.sampled_from([1, 3, 10, 20]),
       bias=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_output_and_gradients_match_reference(device, dtype, B, N, D, m, d, bias, seed):
    h, k, c, v, grad = _inputs(B, N, D, m, d, bias, dtype, device, seed)
    _compare(*_fused_and_reference(h, k, c, v, grad), dtype, B, N)


def test_more_classes_than_one_chunk_and_rows_than_one_tile(device):
    """m and N past several chunks and row tiles, and strided views as inputs: k with gaps between
    its rows, h transposed, c and v column views, an expanded upstream gradient."""
    B, N, D, m, d, dtype = 2, 70, 24, 300, 12, torch.float32
    h, k, c, v, _ = _inputs(B, N, D, m, d, True, dtype, device, seed=3)
    k = torch.cat([k, k], dim=-1)[..., :D]  # [B, m, D], k.stride(1) = 2 D
    h = h.transpose(0, 1).contiguous().transpose(0, 1)  # [B, N, D], h.stride(0) = D
    c, v = c.t().contiguous().t(), v.t().contiguous().t()  # last-dimension stride B and m
    grad = torch.randn(1, 1, d, device=device, dtype=dtype).expand(B, N, d)  # strides 0
    _compare(*_fused_and_reference(h, k, c, v, grad), dtype, B, N)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [33, 100, MAX_DV])
def test_every_embedding_tile(device, dtype, d):
    """Widths d past the 32 of the drawn shapes: each tile of d has its own block sizes."""
    B, N, D, m = 2, 37, 128, 70
    h, k, c, v, grad = _inputs(B, N, D, m, d, True, dtype, device, seed=d)
    _compare(*_fused_and_reference(h, k, c, v, grad), dtype, B, N)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hopper_tiles(device, dtype, monkeypatch):
    """The sm_90 tiles (64 rows or classes leading the backward's products, for wgmma; Delta from
    its own kernel), whatever the device at hand: the same answers. m spans several 64-class
    chunks and ends inside one; N ends inside a 64-row tile."""
    from noprop_fast.kernels import softmax_head as module

    monkeypatch.setattr(module, "_target_arch", lambda device: 90)
    assert module._config("bwd_dk", torch.float16, MAX_DV, 90)["BLOCK_M"] == 64
    assert module._config("bwd_dv", torch.float16, MAX_DV, 90)["BLOCK_M"] == 64
    assert module._config("bwd_dh", torch.float16, MAX_DV, 90)["BLOCK_N"] == 64  # + _bwd_delta
    B, N, D, m, d = 2, 37, 128, 150, MAX_DV
    h, k, c, v, grad = _inputs(B, N, D, m, d, True, dtype, device, seed=13)
    _compare(*_fused_and_reference(h, k, c, v, grad), dtype, B, N)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits_stay_finite(device, dtype):
    B, N, D, m, d = 2, 5, 17, 130, 10
    h, k, c, v, grad = _inputs(B, N, D, m, d, True, dtype, device, seed=7, h_scale=30.0)
    logits = torch.baddbmm(c.float().unsqueeze(1), h.float(), k.float().transpose(1, 2))
    assert logits.abs().max() > 100  # exp overflows fp32 past 88: the max must be subtracted
    fused, reference = _fused_and_reference(h, k, c, v, grad)
    assert torch.isfinite(fused[0]).all() and all(torch.isfinite(g).all() for g in fused[1])
    _compare(fused, reference, dtype, B, N, h_scale=30.0)


# classes given a -inf bias: a whole first chunk (every config's BLOCK_M is at most 64), one in
# the middle, the last chunk, every class but one, and every class of block 0 (no softmax there)
MASKS = {"leading": lambda c: c[:, :70], "middle": lambda c: c[:, 100:200],
         "trailing": lambda c: c[:, 230:], "all but one": lambda c: c[:, 1:],
         "all of block 0": lambda c: c[0]}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", list(MASKS))
def test_masked_classes_match_reference(device, dtype, mask):
    """A -inf bias masks a class; where every class of a row is masked, torch.softmax gives NaN,
    and so must the op: o and the gradients agree with the reference, NaNs in the same places."""
    B, N, D, m, d = 2, 37, 24, 260, 12
    h, k, c, v, grad = _inputs(B, N, D, m, d, True, dtype, device, seed=5)
    MASKS[mask](c).fill_(float("-inf"))
    (out, grads), (ref_out, ref_grads) = _fused_and_reference(h, k, c, v, grad)
    rtol, atol = TOLERANCES[dtype]
    for name, got, ref, scale in zip(["o", "dh", "dk", "dc", "dv"], [out, *grads],
                                     [ref_out, *ref_grads], [1, 1, N, N, B * N]):
        assert got.isnan().any() == (mask == "all of block 0"), name
        torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=atol * scale,
                                   equal_nan=True, msg=lambda text: f"{mask}, {name}: {text}")


def _saved_and_created_shapes(fn, h, k, c, v, grad):
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    leaves = [t.detach().clone().requires_grad_() for t in (h, k, c, v)]
    with CreatedTensors() as created, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, grad)
    return out, grads, saved, created.shapes


def test_logits_are_never_materialised(device):
    # m large next to everything else, and B * N * m unlike any other size in play
    B, N, D, m, d, dtype = 1, 5, 8, 4099, 3, torch.float32
    h, k, c, v, grad = _inputs(B, N, D, m, d, True, dtype, device, seed=11)
    logits_numel = B * N * m
    assert logits_numel not in (m * D, m * d, B * m, N * D, N * d)

    def has_logits(shapes):
        return any(torch.Size(s).numel() == logits_numel for s in shapes)

    out, grads, saved, created = _saved_and_created_shapes(softmax_head, h, k, c, v, grad)
    assert saved and created  # the hooks saw the pass
    assert not has_logits(saved), saved
    assert not has_logits(created), [s for s in created if torch.Size(s).numel() == logits_numel]
    # the checks can fail: the reference saves and creates [B, N, m] tensors
    ref_out, ref_grads, ref_saved, ref_created = _saved_and_created_shapes(
        softmax_head_ref, h, k, c, v, grad)
    assert has_logits(ref_saved) and has_logits(ref_created)
    assert_close(out, ref_out, dtype)
    for g, ref in zip(grads, ref_grads):
        assert_close(g, ref, dtype, scale=N)


def _bad_inputs(device):
    f32 = dict(device=device, dtype=torch.float32)
    h, k, c, v = (torch.randn(2, 3, 8, **f32), torch.randn(2, 5, 8, **f32),
                  torch.randn(2, 5, **f32), torch.randn(5, 4, **f32))
    return {
        "h not 3-d": (h[0], k, c, v),
        "k blocks differ": (h, k[:1], c, v),
        "k width differs": (h, k[..., :7], c, v),
        "v classes differ": (h, k, c, v[:4]),
        "c shape": (h, k, c[:, :4], v),
        "c not 2-d": (h, k, c[0], v),
        "empty": (h[:, :0], k, c, v),
        "d too wide": (h, k, c, torch.randn(5, MAX_DV + 1, **f32)),
        "D too wide": (torch.randn(2, 3, MAX_D + 1, **f32), torch.randn(2, 5, MAX_D + 1, **f32), c, v),
        "mixed dtypes": (h, k, c, v.half()),
        "integer": (h.long(), k.long(), c.long(), v.long()),
        "float64": (h.double(), k.double(), c.double(), v.double()),
    }


@pytest.mark.parametrize("case", list(_bad_inputs("cpu")))
def test_bad_input_raises_value_error(device, case):
    with pytest.raises(ValueError, match="softmax_head"):
        softmax_head(*_bad_inputs(device)[case])
