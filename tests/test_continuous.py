"""NoProp-CT and NoProp-FM (docs/method.md section 5): the learned schedule, the losses, and the
chain and ODE with a perfect denoiser or the exact field."""
import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from noprop_fast import continuous
from noprop_fast.config import ImageConfig
from noprop_fast.data import load_image_dataset
from noprop_fast.errors import ConfigError
from noprop_fast.optim import make_optimizer
from noprop_fast.schedule import LearnedSchedule, NoiseSchedule
from noprop_fast.tasks.image import build_model, train_step

FINE = torch.linspace(0.0, 1.0, 20001)


@pytest.fixture(scope="module")
def digits():
    return load_image_dataset("digits")


def model_for(digits, method, **fields):
    cfg = ImageConfig(method=method, batch_size=32, **fields).validate()
    return cfg, build_model(cfg, digits, torch.device("cpu"))


def assert_monotone(schedule: LearnedSchedule):
    with torch.no_grad():
        gamma, dgamma = schedule.gamma(FINE)
        abar, slope = schedule(FINE)
    assert torch.all(gamma[1:] < gamma[:-1]), "gamma must decrease strictly in t"
    assert torch.all(dgamma < 0) and torch.all(slope > 0), "SNR'(t) must be positive everywhere"
    assert torch.all(abar[1:] >= abar[:-1])  # fp32 cannot tell neighbours apart near 1
    # the fixed ends: SNR(0) = snr_min, SNR(1) = snr_max
    assert gamma[0].item() == pytest.approx(schedule.gamma_0, abs=1e-4)
    assert gamma[-1].item() == pytest.approx(schedule.gamma_1, abs=1e-4)


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), snr_min=st.floats(1e-5, 0.5), ratio=st.floats(2.0, 1e6))
def test_gamma_is_monotone_with_fixed_ends_after_random_initialisation(seed, snr_min, ratio):
    torch.manual_seed(seed)
    assert_monotone(LearnedSchedule(snr_min, snr_min * ratio))


def test_snr_slope_is_the_derivative_of_snr():
    schedule = LearnedSchedule(1e-3, 100.0)
    t = torch.linspace(0.01, 0.99, 97, dtype=torch.float32).requires_grad_()
    gamma, dgamma = schedule.gamma(t)
    snr = torch.exp(-gamma)
    (autograd,) = torch.autograd.grad(snr.sum(), t)
    _, slope = schedule(t)
    torch.testing.assert_close(slope, autograd, rtol=1e-4, atol=1e-6)
    abar = schedule.alpha_bar(t)
    torch.testing.assert_close(abar / (1 - abar), snr, rtol=1e-4, atol=1e-7)


def test_gamma_stays_monotone_and_learns_through_the_ct_loss(digits):
    cfg, model = model_for(digits, "noprop-ct")
    schedule = model.noise_schedule
    before = [p.detach().clone() for p in schedule.parameters()]
    optimizer = make_optimizer(model, dataclasses.replace(cfg, lr=0.05))  # large steps
    for step in range(8):
        x, y = digits.train_x[step * 32:(step + 1) * 32], digits.train_y[step * 32:(step + 1) * 32]
        train_step(model, optimizer, None, x, y)
        assert_monotone(schedule)
    moved = [not torch.equal(a, p) for a, p in zip(before, schedule.parameters())]
    assert all(moved), "every parameter of gamma gets a gradient and moves"


def test_grid_schedule_has_positive_weights_and_the_fixed_ends():
    schedule = LearnedSchedule(1e-3, 100.0, eta=0.1)
    grid = schedule.grid(1000)
    assert grid.num_blocks == 1000 and torch.all(grid.snr_weights > 0)
    abar = grid.alpha_bar.double()
    assert abar[0].item() == pytest.approx(1e-3 / 1.001, rel=1e-5)
    assert abar[-1].item() == pytest.approx(100 / 101, rel=1e-6)
    # sum of the weights: eta / 2 (SNR(1) - SNR(0)), as DT's over its T blocks
    assert grid.snr_weights.double().sum().item() == pytest.approx(0.05 * (100 - 1e-3), rel=1e-3)


def test_from_alpha_bar_gives_the_cosine_schedule_bit_for_bit():
    from noprop_fast.schedule import cosine_alpha_bar
    cosine = NoiseSchedule.cosine(10, 100.0, 0.1)
    rebuilt = NoiseSchedule.from_alpha_bar(torch.tensor(cosine_alpha_bar(10, 100.0),
                                                        dtype=torch.float64), 0.1)
    for name, value in cosine.__dict__.items():
        assert torch.equal(value, getattr(rebuilt, name)), name


class PerfectDenoiser:
    """Stands in for `model.blocks.denoise`: CT returns u_y; FM returns u_y - z_0, z_0 being the
    latent it saw first (t = 0)."""

    def __init__(self, u: torch.Tensor, flow: bool):
        self.u, self.flow, self.z0 = u, flow, None

    def __call__(self, features, z, w, blocks=None, t=None):
        if self.flow:
            if self.z0 is None:
                self.z0 = z[0].clone()
            return (self.u - self.z0)[None]
        return self.u[None]


@pytest.mark.parametrize("stochastic", [False, True])
def test_ct_chain_with_a_perfect_denoiser_lands_on_u(digits, stochastic):
    """Eq. 3 over the learned grid with u_hat = u: z_1 ~ q(z_1 | u), mean sqrt(abar(1)) u and
    variance 1 - abar(1) = 1/101 (noise-free: the variance shrinks further)."""
    _, model = model_for(digits, "noprop-ct")
    n, d = 4000, model.embedding.dim
    u = model.embedding.weight[torch.arange(n) % 10]
    model.blocks.denoise = PerfectDenoiser(u, flow=False)
    torch.manual_seed(0)
    z = continuous.ct_chain(model, torch.zeros(1, n, 1), steps=200, stochastic=stochastic)
    abar_1 = 100 / 101
    error = z - math.sqrt(abar_1) * u
    assert error.mean().abs().item() < 0.01
    variance = error.square().mean().item()
    if stochastic:
        assert variance == pytest.approx(1 - abar_1, rel=0.05)
    else:
        assert variance < 1 - abar_1
    assert (z.float() @ model.embedding.weight.T).argmax(-1).eq(torch.arange(n) % 10).all()


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_fm_ode_with_the_exact_field_lands_on_u(digits, solver):
    _, model = model_for(digits, "noprop-fm", embedding="learned")
    n = 64
    u = model.embedding.weight.detach()[torch.arange(n) % 10]
    model.blocks.denoise = PerfectDenoiser(u, flow=True)
    z = continuous.fm_ode(model, torch.zeros(1, n, 1), steps=50, solver=solver)
    torch.testing.assert_close(z, u, rtol=1e-5, atol=1e-5)


def test_fm_loss_is_zero_for_the_exact_field(digits, monkeypatch):
    """With v = u - z_0 the flow term vanishes (one-hot: no anchor), so the loss pins the target."""
    _, model = model_for(digits, "noprop-fm")
    x, y = digits.train_x[:16], digits.train_y[:16]
    u = model.embedding(y)

    def exact(features, z, w, blocks=None, t=None):  # z = t u + (1 - t) z_0
        return (u - (z[0] - t[:, None] * u) / (1 - t)[:, None])[None]
    monkeypatch.setattr(model.blocks, "denoise", exact)
    loss, parts = continuous.fm_loss(model, x, y)
    assert loss.item() < 1e-8 and set(parts) == {"flow"}


def test_fm_anchor_trains_the_learned_embedding_and_the_classifier(digits):
    cfg, model = model_for(digits, "noprop-fm", embedding="learned")
    loss, parts = continuous.fm_loss(model, digits.train_x[:16], digits.train_y[:16])
    assert set(parts) == {"flow", "ce", "align"}
    loss.backward()
    assert model.embedding.weight.grad.abs().sum() > 0
    assert model.classifier.weight.grad.abs().sum() > 0


def test_ct_loss_parts_and_gradients(digits):
    _, model = model_for(digits, "noprop-ct", embedding="learned")
    loss, parts = continuous.ct_loss(model, digits.train_x[:16], digits.train_y[:16])
    assert set(parts) == {"denoise", "ce", "kl"} and parts["kl"] > 0  # abar(0) > 0
    torch.testing.assert_close(loss.detach(), parts["denoise"] + parts["ce"] + parts["kl"])
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"


def test_one_network_whatever_num_blocks(digits):
    _, a = model_for(digits, "noprop-ct", num_blocks=10)
    _, b = model_for(digits, "noprop-ct", num_blocks=3)
    assert a.num_blocks == b.num_blocks == 1
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())


@pytest.mark.parametrize("fields, words", [
    ({"method": "noprop-ct", "block_schedule": "sequential"}, "one network"),
    ({"method": "noprop-fm", "parallel": "blocks"}, "one process"),
    ({"method": "noprop-ct", "snr_min": 200.0}, "snr_min"),
    ({"method": "noprop-fm", "fm_readout": "classifier"}, "anchor"),
])
def test_settings_that_do_not_apply_are_refused_in_one_line(fields, words):
    with pytest.raises(ConfigError, match=words) as err:
        ImageConfig(**fields).validate()
    assert "\n" not in str(err.value)
