"""The language models: batched layers, the chunked cross-entropy, leaks, gradient routing, the
fused path against the reference, and the NoProp loss pieces over positions.

(a) `linear_cross_entropy` (chunks of rows) matches F.cross_entropy on the full logits, value and
    gradients, with several chunks; it never allocates a whole [M, V] logits tensor.
(b) Leak tests: changing token i+1 or anything later changes nothing at positions up to i, for
    NoProp-LM's training features and denoiser outputs, its Eq. 3 chain (the validation logits)
    and the GPT, on the reference and the fused (C++) path, bitwise.
(c) Gradient routing: block t's loss term reaches only block t's slices of the block parameters;
    the CE term reaches none of them; W_embed gets gradient from both (docs/method.md section 2).
(d) The fused path's loss and gradients match the reference path's on the same noise.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from noprop_fast.ops import REFERENCE
from noprop_fast.ops.chunked_ce import cross_entropy_rows, linear_cross_entropy
from noprop_fast.ops.reference import linear_cross_entropy as linear_cross_entropy_ref
from noprop_fast.layers import BlockEmbedding, BlockLayerNorm, block_parameters
from noprop_fast.tasks.language import lm_loss, position_logits, sample, validation_loss
from noprop_fast.noprop import noprop_loss
from noprop_fast.models.lm import GPT, LanguageModel
from noprop_fast.schedule import NoiseSchedule
from helpers import CreatedTensors

V, L, T = 37, 11, 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noprop_model(ops=REFERENCE, seed=0, layers=1):
    torch.manual_seed(seed)
    return LanguageModel(T, V, L, 32, 2, layers, 8).configure(ops)


def gpt_model(ops=REFERENCE, seed=0):
    torch.manual_seed(seed)
    return GPT(T, V, L, 32, 2).configure(ops)


def cpp_ops():
    from noprop_fast.ops.cpp import available
    ok, why = available()
    if not ok:
        pytest.skip(f"C++ ops unavailable: {why}")
    from noprop_fast.ops import fused_ops
    return fused_ops(torch.device("cpu"))


# -- (a) chunked cross-entropy -----------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 40), d=st.integers(1, 9), vocab=st.integers(2, 50),
       chunk=st.integers(1, 300), bias=st.booleans())
def test_chunked_cross_entropy_matches_full_logits(m, d, vocab, chunk, bias):
    g = torch.Generator().manual_seed(m * 1000 + vocab)
    z = torch.randn(m, d, generator=g, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(vocab, d, generator=g).requires_grad_()
    b = torch.randn(vocab, generator=g).requires_grad_() if bias else None
    y = torch.randint(0, vocab, (m,), generator=g)
    loss = linear_cross_entropy(z, w, b, y, chunk_elements=chunk)
    expected = linear_cross_entropy_ref(z, w, b, y)
    inputs = [z, w] + ([b] if bias else [])
    grads = torch.autograd.grad(3.0 * loss, inputs)
    expected_grads = torch.autograd.grad(3.0 * expected, inputs)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cross_entropy_rows(z, w, b, y, chunk_elements=chunk).sum(), expected * m,
                               rtol=1e-5, atol=1e-5)


def test_chunked_cross_entropy_casts_gradients_to_input_dtypes():
    z = torch.randn(6, 4, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(9, 4, requires_grad=True)
    loss = linear_cross_entropy(z, w, None, torch.arange(6))
    loss.backward()
    assert loss.dtype == torch.float32 and z.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    expected = linear_cross_entropy_ref(z.detach().float(), w.detach(), None, torch.arange(6))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_chunked_cross_entropy_never_holds_all_logits():
    m, vocab, d = 64, 500, 8
    z, w = torch.randn(m, d, requires_grad=True), torch.randn(vocab, d, requires_grad=True)
    y = torch.randint(0, vocab, (m,))
    with CreatedTensors() as seen:
        linear_cross_entropy(z, w, None, y, chunk_elements=8 * vocab).backward()
    assert seen.largest < m * vocab, seen.largest
    assert seen.largest >= 8 * vocab  # one chunk's logits (the check sees allocations at all)


# -- layers ------------------------------------------------------------------------------------

def test_block_layer_norm_is_a_layer_norm_per_block():
    norm = BlockLayerNorm(3, 5)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, 4, 7, 5)
    out = norm(x)
    for t in range(3):
        expected = F.layer_norm(x[t], (5,), norm.weight[t], norm.bias[t])
        torch.testing.assert_close(out[t], expected)
    torch.testing.assert_close(norm(x[1:2], slice(1, 2)), out[1:2])


def test_block_embedding_looks_up_each_blocks_table():
    table = BlockEmbedding(2, 6, 3)
    ids = torch.tensor([[0, 5], [2, 2]])
    out = table(ids)
    assert out.shape == (2, 2, 2, 3)
    assert torch.equal(out[1, 0, 1], table.weight[1, 5])
    assert torch.equal(table(ids, slice(1, 2))[0], out[1])


# -- (b) leaks ---------------------------------------------------------------------------------

def windows(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, L), generator=g)


def changed_after(x, i, seed=1):
    """x with every token from position i + 1 on replaced (i + 1 is position i's target)."""
    g = torch.Generator().manual_seed(seed)
    other = x.clone()
    other[:, i + 1:] = (x[:, i + 1:] + 1 + torch.randint(0, V - 1, x[:, i + 1:].shape, generator=g)) % V
    assert (other[:, i + 1:] != x[:, i + 1:]).all()
    return other


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "cpp"])
@pytest.mark.parametrize("i", [0, 4, L - 2])
def test_noprop_lm_has_no_leak(fused, i):
    model = noprop_model(cpp_ops() if fused else REFERENCE).eval()
    schedule = NoiseSchedule.cosine(T)
    x = windows()
    x2 = changed_after(x, i)
    rows = lambda t: t.view(t.shape[0], 3, L, -1)[:, :, :i + 1]  # noqa: E731  [B, N, i+1, .]
    # training: the context features and the denoiser's output for the same noisy latents
    f, f2 = model.blocks.features(x), model.blocks.features(x2)
    assert torch.equal(rows(f), rows(f2))
    z = torch.randn(T, 3 * L, 8)
    w = model.embedding.weight
    assert torch.equal(rows(model.blocks.denoise(f, z, w)), rows(model.blocks.denoise(f2, z, w)))
    # evaluation: the chain's logits, with the same inference noise
    a = position_logits(model, schedule, x, generator=torch.Generator().manual_seed(5)).view(3, L, V)
    b = position_logits(model, schedule, x2, generator=torch.Generator().manual_seed(5)).view(3, L, V)
    assert torch.equal(a[:, :i + 1], b[:, :i + 1])
    assert not torch.equal(a[:, i + 1:], b[:, i + 1:])  # later positions do see the change


@pytest.mark.parametrize("fused", [False, True], ids=["reference", "cpp"])
@pytest.mark.parametrize("i", [0, 5])
def test_gpt_baseline_has_no_leak(fused, i):
    model = gpt_model(cpp_ops() if fused else REFERENCE).eval()
    x = windows()
    x2 = changed_after(x, i)
    a, b = model.logits(x).view(3, L, V), model.logits(x2).view(3, L, V)
    assert torch.equal(a[:, :i + 1], b[:, :i + 1])
    assert not torch.equal(a[:, i + 1:], b[:, i + 1:])


# -- (c) gradient routing ----------------------------------------------------------------------

def test_noprop_lm_gradients_stay_in_their_block():
    model = noprop_model(layers=2)
    schedule = NoiseSchedule.cosine(T)
    x, y = windows(), windows(seed=3)
    params = block_parameters(model.blocks)
    for t in range(T):
        torch.manual_seed(7)
        _, parts = noprop_loss(model, schedule, x, y.reshape(-1))
        torch.manual_seed(7)
        features = model.blocks.features(x)
        z = torch.randn(T, 3 * L, 8)
        u_hat = model.blocks.denoise(features, z, model.embedding.weight)
        term = (u_hat[t] - model.embedding(y.reshape(-1))).square().sum(-1).mean()
        grads = torch.autograd.grad(term, params + [model.embedding.weight], allow_unused=True)
        for p, g in zip(params, grads[:-1]):
            assert g is not None
            others = [s for s in range(T) if s != t]
            assert torch.count_nonzero(g[others]) == 0
        assert grads[-1] is not None and torch.count_nonzero(grads[-1]) > 0
    # the CE term reaches the classifier and W_embed, no block
    z_clean = model.embedding(y.reshape(-1)) + 0.1 * torch.randn(3 * L, 8)
    ce = F.cross_entropy(model.classifier(z_clean), y.reshape(-1))
    grads = torch.autograd.grad(ce, params + [model.embedding.weight], allow_unused=True)
    assert all(g is None for g in grads[:-1]) and grads[-1] is not None


# -- (d) fused against reference ---------------------------------------------------------------

@pytest.mark.parametrize("method", ["noprop", "backprop"])
def test_fused_lm_loss_and_gradients_match_the_reference(method):
    from step_equivalence import assert_same_lm_step
    ops = cpp_ops()
    build = noprop_model if method == "noprop" else gpt_model
    ref, fused = build(REFERENCE), build(ops)
    fused.load_state_dict(ref.state_dict())
    assert_same_lm_step(ref, fused, NoiseSchedule.cosine(T), windows(), windows(seed=3))


# -- evaluation and sampling -------------------------------------------------------------------

def test_validation_loss_is_the_mean_cross_entropy_of_the_position_logits():
    model = noprop_model().eval()
    schedule = NoiseSchedule.cosine(T)
    x, y = windows(), windows(seed=3)
    val = validation_loss(model, schedule, [(x, y)], seed=4)
    loss, tokens = val["val_loss_one_chain"], val["val_tokens"]
    logits = position_logits(model, schedule, x, generator=torch.Generator().manual_seed(4))
    assert tokens == x.numel()
    assert loss == pytest.approx(F.cross_entropy(logits, y.reshape(-1)).item(), rel=1e-5)


@pytest.mark.parametrize("build", [noprop_model, gpt_model], ids=["noprop", "backprop"])
def test_sampling_is_reproducible_and_respects_top_k(build):
    model = build()
    schedule = NoiseSchedule.cosine(T)
    draw = lambda seed, k: sample(model, schedule, [1, 2], 6, 1.0, k,  # noqa: E731
                                  generator=torch.Generator().manual_seed(seed))
    assert draw(0, 0) == draw(0, 0) and len(draw(0, 0)) == 6
    assert all(0 <= t < V for t in draw(1, 0))
    # top-1 is greedy: every token is the argmax of its position's logits, whatever the seed
    greedy = draw(2, 1)
    assert greedy == draw(3, 1) or model.method == "noprop"  # NoProp's chain itself draws noise
    if model.method == "backprop":
        ids = [1, 2] + greedy
        logits = model.logits(torch.tensor([ids[:-1]])).view(len(ids) - 1, V)
        assert greedy == logits[1:].argmax(-1).tolist()


def test_validation_loss_over_chains_is_minus_log_of_the_mean_probability():
    from noprop_fast.noprop import noprop_chain
    model = noprop_model().eval()
    schedule = NoiseSchedule.cosine(T)
    x, y = windows(), windows(seed=3)
    val = validation_loss(model, schedule, [(x, y)], seed=4, chains=3)
    generator = torch.Generator().manual_seed(4)
    probs = []
    for _ in range(3):  # the features do not draw noise, so the chains draw the same numbers here
        z = noprop_chain(model, schedule, x, generator=generator)
        probs.append(torch.softmax(model.classifier(z), -1).gather(1, y.reshape(-1, 1)).squeeze(1))
    expected = -torch.stack(probs).mean(0).log().mean().item()
    first = -probs[0].log().mean().item()
    assert val["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert val["val_loss_one_chain"] == pytest.approx(first, rel=1e-5)
    assert val["val_loss"] != pytest.approx(first, rel=1e-3)  # the chains do differ
