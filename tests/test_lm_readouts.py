"""NoProp-LM's local cross-entropy (`--block-ce`), its readouts (`--readout`) and their
calibration (`--calibrate-tokens`), docs/language.md:

(a) Every readout is causal: changing token i+1 or anything later changes nothing of the
    predictive distribution at positions up to i (reference and fused path, bitwise).
(b) The local cross-entropy of block t reaches block t's slices of the block parameters alone,
    and the loss is the DT loss plus its weight times the blocks' cross-entropies; the fused
    path's loss and gradients match the reference's with it on.
(c) The readouts are what they say: the classifier readout is the former estimator's number, the
    others the mean of the block softmaxes along the same chains.
(d) Temperatures: the logits divided by each; fitted on held-back train tokens alone.
"""
import pytest
import torch
import torch.nn.functional as F

from noprop_fast import readouts
from noprop_fast.errors import UserError
from noprop_fast.layers import block_parameters
from noprop_fast.noprop import noprop_loss
from noprop_fast.ops import REFERENCE
from noprop_fast.ops.chunked_ce import cross_entropy_rows
from noprop_fast.schedule import NoiseSchedule
from noprop_fast.tasks.language import _classifier_loss, held_back, validation_loss
from test_lm import L, T, V, changed_after, cpp_ops, noprop_model, one_thread, windows  # noqa: F401


# -- (a) causality -----------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [False, True], ids=["reference", "cpp"])
@pytest.mark.parametrize("readout", readouts.CHOICES)
@pytest.mark.parametrize("i", [0, L - 2])
def test_every_readout_has_no_leak(fused, readout, i):
    model = noprop_model(cpp_ops() if fused else REFERENCE).eval()
    schedule = NoiseSchedule.cosine(T)
    x = windows()
    x2 = changed_after(x, i)
    weights = [0.1, 0.2, 0.3, 0.4] if readout == "fitted" else None
    a, b = (readouts.log_probs(model, schedule, ids, readout, chains=2,
                               generator=torch.Generator().manual_seed(5),
                               weights=weights).view(3, L, V)
            for ids in (x, x2))
    assert torch.equal(a[:, :i + 1], b[:, :i + 1])
    assert not torch.equal(a[:, i + 1:], b[:, i + 1:])


# -- (b) the local cross-entropy ---------------------------------------------------------------

def test_block_ce_gradients_stay_in_their_block():
    model = noprop_model(layers=2)
    x, y = windows(), windows(seed=3).reshape(-1)
    params = block_parameters(model.blocks)
    features = model.blocks.features(x)
    z = torch.randn(T, 3 * L, 8)
    _, ce = model.blocks.denoise_with_ce(features, z, model.embedding.weight, y)
    assert ce.shape == (T,)
    for t in range(T):
        grads = torch.autograd.grad(ce[t], params + [model.embedding.weight], retain_graph=True,
                                    allow_unused=True)
        others = [s for s in range(T) if s != t]
        for p, g in zip(params, grads[:-1]):
            assert g is not None and torch.count_nonzero(g[others]) == 0
        assert grads[-1] is None  # z is given: W_embed enters only through the noisy latents
    # block t's softmax is softmax(q_t K_t^T + c_t)
    q = model.blocks.head_input(features, z)
    expected = F.cross_entropy(F.linear(q[1], model.blocks.head.weight[1],
                                        model.blocks.head.bias[1]), y)
    torch.testing.assert_close(ce[1], expected)


def test_block_ce_adds_its_weighted_term_to_the_loss():
    model = noprop_model()
    schedule = NoiseSchedule.cosine(T)
    x, y = windows(), windows(seed=3).reshape(-1)
    torch.manual_seed(7)
    plain, _ = noprop_loss(model, schedule, x, y)
    model.block_ce = 0.5
    torch.manual_seed(7)
    both, parts = noprop_loss(model, schedule, x, y)
    torch.testing.assert_close(both, plain + 0.5 * parts["block_ce"].sum())
    assert parts["block_ce"].shape == (T,) and (parts["block_ce"] > 0).all()


def test_fused_block_ce_loss_and_gradients_match_the_reference():
    from step_equivalence import assert_same_lm_step
    ops = cpp_ops()
    ref, fused = noprop_model(REFERENCE), noprop_model(ops)
    fused.load_state_dict(ref.state_dict())
    ref.block_ce = fused.block_ce = 1.0
    assert_same_lm_step(ref, fused, NoiseSchedule.cosine(T), windows(), windows(seed=3))


# -- (c) the readouts --------------------------------------------------------------------------

def test_readouts_are_the_mixtures_they_name():
    model = noprop_model().eval()
    schedule = NoiseSchedule.cosine(T)
    x, y = windows(), windows(seed=3)
    val = validation_loss(model, schedule, [(x, y)], seed=4, chains=3, readout="blocks")
    old = _classifier_loss(model, schedule, [(x, y)], True, 4, 3, None)
    table = val["readouts"]
    assert table["classifier"]["val_loss"] == pytest.approx(old["val_loss"], rel=1e-5)
    assert table["classifier"]["val_loss_one_chain"] == pytest.approx(old["val_loss_one_chain"],
                                                                      rel=1e-5)
    assert val["val_loss"] == table["blocks"]["val_loss"]
    # by hand: each chain's T block softmaxes, from the same draws
    generator = torch.Generator().manual_seed(4)
    features = model.blocks.features(x)
    probs = torch.stack([torch.stack(readouts.chain_scores(
        model, schedule, features,
        lambda h, w, b: torch.softmax(F.linear(h, w, b), -1), generator=generator))
        for _ in range(3)])                                  # [K, T + 1, M, V]
    p_y = probs.gather(-1, y.reshape(1, 1, -1, 1).expand(3, T + 1, -1, 1))[..., 0]
    blocks = -p_y[:, :T].mean((0, 1)).log().mean().item()
    assert table["first"]["val_loss"] == pytest.approx(-p_y[:, 0].mean(0).log().mean().item(),
                                                       rel=1e-5)
    last = -p_y[:, T - 1].mean(0).log().mean().item()
    assert table["blocks"]["val_loss"] == pytest.approx(blocks, rel=1e-5)
    assert table["last"]["val_loss"] == pytest.approx(last, rel=1e-5)
    one = -p_y[0, :T].mean(0).log().mean().item()
    assert table["blocks"]["val_loss_one_chain"] == pytest.approx(one, rel=1e-5)


def test_sampling_from_a_block_readout_is_reproducible():
    from noprop_fast.tasks.language import sample
    model = noprop_model()
    schedule = NoiseSchedule.cosine(T)
    draw = lambda seed: sample(model, schedule, [1, 2], 6, 1.0, 0, readout="blocks",  # noqa: E731
                               generator=torch.Generator().manual_seed(seed))
    assert draw(0) == draw(0) and len(draw(0)) == 6 and all(0 <= t < V for t in draw(1))


# -- (d) temperatures --------------------------------------------------------------------------

def test_cross_entropy_rows_divides_the_logits_by_each_temperature():
    g = torch.Generator().manual_seed(0)
    z, w, b = torch.randn(50, 6, generator=g), torch.randn(9, 6, generator=g), torch.randn(9)
    y = torch.randint(0, 9, (50,), generator=g)
    temperatures = torch.tensor([0.5, 1.0, 3.0])
    rows = cross_entropy_rows(z, w, b, y, chunk_elements=40, temperatures=temperatures)
    for k, tau in enumerate(temperatures):
        expected = F.cross_entropy(F.linear(z, w, b) / tau, y, reduction="none")
        torch.testing.assert_close(rows[k], expected)
    assert readouts.TEMPERATURES[readouts.ONE] == 1.0


def test_temperatures_are_fitted_on_the_held_back_tokens_alone():
    model = noprop_model().eval()
    schedule = NoiseSchedule.cosine(T)
    held = [(windows(seed=8), windows(seed=9))]
    runs = [validation_loss(model, schedule, [(windows(seed=s), windows(seed=s + 1))], seed=4,
                            chains=2, heldback=held, temperatures=True) for s in (3, 5)]
    for readout in readouts.READOUTS:
        a, b = runs[0]["readouts"][readout], runs[1]["readouts"][readout]
        assert a["temperature"] == b["temperature"]          # the val tokens do not move it
        assert a["temperature_one_chain"] == b["temperature_one_chain"]
    # fitted on the val tokens themselves, it can only help them (1 is on the grid)
    val = [(windows(seed=3), windows(seed=4))]
    own = validation_loss(model, schedule, val, seed=4, chains=2, heldback=val,
                          temperatures=True)["readouts"]
    for readout in readouts.READOUTS:
        assert own[readout]["val_loss"] <= own[readout]["uncalibrated"] + 1e-6


def test_held_back_tokens_come_off_the_end_of_the_train_split():
    import numpy as np
    shards = [np.arange(100), np.arange(100, 300)]
    train, held, note = held_back(shards, 40, seq_len=8)
    assert [len(s) for s in train] == [100, 160] and held[0].tolist() == list(range(260, 300))
    assert note == "" and held_back(shards, 0, 8) == (shards, None, "")
    # more than half the last shard: a tenth of it, said in the note
    train, held, note = held_back(shards, 101, seq_len=8)
    assert [len(s) for s in train] == [100, 180] and len(held[0]) == 20
    assert "a tenth" in note and "101" in note
    with pytest.raises(UserError, match="calibrate_tokens"):
        held_back(shards, 101, seq_len=20)


def test_fitted_weights_maximise_the_held_back_likelihood():
    g = torch.Generator().manual_seed(0)
    truth = torch.tensor([0.7, 0.2, 0.1])
    # rows drawn from the mixture: component c's density is high on its own rows
    which = torch.multinomial(truth, 4000, replacement=True, generator=g)
    log_p = torch.full((3, 4000), -30.0)
    log_p[which, torch.arange(4000)] = -0.5
    weights = readouts.fit_weights(log_p)
    torch.testing.assert_close(weights, torch.bincount(which, minlength=3) / 4000.0,
                               atol=1e-3, rtol=0)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_the_fitted_readout_is_the_best_mixture_on_its_own_tokens():
    model = noprop_model().eval()
    schedule = NoiseSchedule.cosine(T)
    val = [(windows(seed=3), windows(seed=4))]
    table = validation_loss(model, schedule, val, seed=4, chains=2, heldback=val,
                            readout="fitted")["readouts"]
    fitted = table["fitted"]
    assert len(fitted["weights"]) == T + 1 and sum(fitted["weights"]) == pytest.approx(1, abs=1e-3)
    for readout in readouts.READOUTS:  # each is a mixture of the same components at temperature 1
        assert "temperature" not in table[readout]  # none fitted unless asked
        assert fitted["val_loss"] <= table[readout]["val_loss"] + 1e-4
        assert fitted["val_loss_one_chain"] <= table[readout]["val_loss_one_chain"] + 1e-4
