"""The mathematics of docs/method.md sections 1, 2 and 4: schedule, weights, coefficients, KL."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from noprop_fast.ops.reference import noisy_latents
from noprop_fast.schedule import (NoiseSchedule, cosine_alpha_bar, denoise_step, prior_kl,
                                  required_snr_max)

# docs/method.md section 1: abar_t for T = 10 (before the endpoint clamp), to the printed 3 decimals
PAPER_T10 = [0.0, 0.028, 0.101, 0.213, 0.353, 0.506, 0.659, 0.797, 0.906, 0.976, 1.0]


def test_cosine_schedule_matches_the_method_doc_for_t10():
    abar = cosine_alpha_bar(10, snr_max=1e12)  # a clamp too high to bite below 1 - 1e-12
    assert abar == pytest.approx(PAPER_T10, abs=6e-4)


def test_endpoint_is_clamped_to_snr_max():
    s = NoiseSchedule.cosine(10, snr_max=100.0)
    abar_T = s.alpha_bar[-1].item()
    assert abar_T == pytest.approx(100 / 101, rel=1e-6)
    assert abar_T / (1 - abar_T) == pytest.approx(100.0, rel=1e-4)
    assert s.alpha_bar[0].item() == 0.0  # t = 0 is pure noise


@settings(deadline=None, max_examples=60)
@given(T=st.integers(1, 64), snr_max=st.floats(0.5, 1e6), eta=st.floats(1e-3, 10.0))
def test_every_snr_weight_positive_or_the_config_is_refused(T, snr_max, eta):
    top = snr_max / (1 + snr_max)
    unclamped = cosine_alpha_bar(T, snr_max=float("inf"))
    if T > 1 and unclamped[-2] >= top:  # the clamp flattens the top: w_T would be 0
        assert required_snr_max(T) >= snr_max
        with pytest.raises(ValueError, match="use snr_max >"):
            NoiseSchedule.cosine(T, snr_max=snr_max, eta=eta)
        return
    s = NoiseSchedule.cosine(T, snr_max=snr_max, eta=eta)
    assert s.alpha_bar.shape == (T + 1,)
    assert torch.all(s.snr_weights > 0), s.snr_weights
    # abar strictly increasing and w_t = eta / 2 (SNR(t) - SNR(t - 1)), recomputed in float64
    abar = torch.tensor(cosine_alpha_bar(T, snr_max), dtype=torch.float64)
    assert torch.all(abar[1:] > abar[:-1])
    snr = abar / (1 - abar)
    assert torch.allclose(s.snr_weights.double(), eta / 2 * (snr[1:] - snr[:-1]), rtol=1e-5)


def test_default_snr_max_supports_the_paper_t():
    assert required_snr_max(10) < 100.0 < required_snr_max(20)


def test_block_inputs_use_abar_of_previous_index():
    s = NoiseSchedule.cosine(10)
    abar = s.alpha_bar
    assert torch.allclose(s.input_scale, abar[:-1].sqrt())
    assert torch.allclose(s.noise_scale, (1 - abar[:-1]).sqrt())
    # square root on abar (docs/method.md section 8, mistake 3): variance of z_{t-1} is exactly 1 for unit u
    u = torch.randn(1, 4)
    z = noisy_latents(u, s.input_scale, s.noise_scale, torch.zeros(10, 1, 4))
    assert torch.allclose(z[:, 0], abar[:-1, None].sqrt() * u)


@settings(deadline=None, max_examples=25)
@given(T=st.integers(1, 40), headroom=st.floats(1.01, 100.0))
def test_perfect_denoiser_chain_has_the_forward_marginals(T, headroom):
    """Eq. 3 with u_hat = u: mean and variance of z_t follow q(z_t | u) exactly (a_t, b_t, c_t)."""
    s = NoiseSchedule.cosine(T, snr_max=max(required_snr_max(T), 1.0) * headroom)
    abar = s.alpha_bar.double()
    a, b, c = s.coef_a.double(), s.coef_b.double(), s.coef_c.double()
    mean, var = 0.0, 1.0  # z_0 ~ N(0, I), in units of u
    for t in range(1, T + 1):
        mean = a[t - 1] * 1.0 + b[t - 1] * mean
        var = b[t - 1] ** 2 * var + c[t - 1]
        assert mean.item() == pytest.approx(abar[t].sqrt().item(), abs=1e-5)
        assert var.item() == pytest.approx((1 - abar[t]).item(), abs=1e-5)


def test_denoise_step_noise_free_and_stochastic():
    s = NoiseSchedule.cosine(4)
    z, u_hat, eps = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    plain = denoise_step(z, u_hat, s, 2, None)
    assert torch.allclose(plain, s.coef_a[1] * u_hat + s.coef_b[1] * z)
    noisy = denoise_step(z, u_hat, s, 2, eps)
    assert torch.allclose(noisy - plain, s.coef_c[1].sqrt() * eps)


def test_empirical_chain_reaches_the_target():
    """Monte Carlo: a perfect denoiser's chain ends at z_T ~ q(z_T | u)."""
    torch.manual_seed(0)
    s = NoiseSchedule.cosine(10)
    u = torch.tensor([[2.0, -1.0]]).expand(200_000, 2)
    z = torch.randn_like(u)
    for t in range(1, 11):
        z = denoise_step(z, u, s, t, torch.randn_like(u))
    abar_T = s.alpha_bar[-1].item()
    assert z.mean(0).tolist() == pytest.approx((math.sqrt(abar_T) * u[0]).tolist(), abs=0.01)
    assert z.var(0).tolist() == pytest.approx([1 - abar_T] * 2, abs=0.002)
    zT = noisy_latents(u, s.alpha_bar[-1:].sqrt(), (1 - s.alpha_bar[-1:]).sqrt(),
                       torch.randn_like(u)[None])[0]  # z_T ~ q(z_T | y)
    assert zT.var(0).tolist() == pytest.approx([1 - abar_T] * 2, abs=0.002)


def test_prior_kl_formula():
    s = NoiseSchedule.cosine(10)
    u = torch.randn(6, 7)
    assert prior_kl(u, s).item() == 0.0  # abar_0 = 0: q(z_0 | y) is N(0, I) itself
    # a schedule with abar_0 > 0: compare with the closed form of KL(N(m, v I) || N(0, I))
    shifted = NoiseSchedule(**{**s.__dict__, "alpha_bar": torch.cat([torch.tensor([0.3]), s.alpha_bar[1:]])})
    mean_sq, v, d = 0.3 * u.square().sum(-1), 0.7, u.shape[1]
    closed = 0.5 * (mean_sq + d * v - d - d * math.log(v))
    assert prior_kl(u, shifted).item() == pytest.approx(closed.mean().item(), rel=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError):
        NoiseSchedule.cosine(0)
    with pytest.raises(ValueError):
        NoiseSchedule.cosine(10, snr_max=0)
    with pytest.raises(ValueError):
        NoiseSchedule.cosine(10, eta=0)


def test_the_inference_chain_with_a_perfect_denoiser_lands_on_the_forward_marginals():
    """The engine's Eq. 3 chain (methods.chain_from_features), not only one step of it: with a
    denoiser that returns u itself, z_T ~ q(z_T | u) = N(sqrt(abar_T) u, (1 - abar_T) I). The
    noise-free chain lands on sqrt(abar_T) u exactly (abar_0 = 0 makes b_1 = 0: z_0 is forgotten).
    A small snr_max keeps abar_T far from 1, where a chain without a_t or b_t would also land near u."""
    from types import SimpleNamespace
    from noprop_fast.noprop import chain_from_features
    T, n = 4, 100_000
    s = NoiseSchedule.cosine(T, snr_max=1.5 * required_snr_max(T))  # abar_T about 0.9
    u = torch.tensor([2.0, -1.0, 0.5])
    perfect = SimpleNamespace(denoise=lambda features, z, w, blocks: features)  # u_hat = u
    model = SimpleNamespace(num_blocks=T, blocks=perfect,
                            embedding=SimpleNamespace(weight=torch.zeros(4, 3)))
    features = u.expand(T, n, 3)
    abar_T = s.alpha_bar[-1].item()
    z = chain_from_features(model, s, features, True, torch.Generator().manual_seed(0))
    assert z.mean(0).tolist() == pytest.approx((math.sqrt(abar_T) * u).tolist(), abs=0.005)
    assert z.var(0).tolist() == pytest.approx([1 - abar_T] * 3, rel=0.03)
    z = chain_from_features(model, s, features, False, torch.Generator().manual_seed(0))
    assert torch.allclose(z, (math.sqrt(abar_T) * u).expand(n, 3), atol=1e-5)
