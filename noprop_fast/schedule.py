"""The mathematics of NoProp-DT: noise schedule, loss weights, inference coefficients, KL.

Every task (images, language) takes its numbers from here, so there is one set of them, computed
once (docs/method.md sections 1, 2 and 4).

Index convention: T blocks, latents z_0 ... z_T. **t = 0 is pure noise, t = T is clean.**

    abar_t   increasing in t: abar_0 = 0, abar_T -> 1 (clamped, below)
    SNR(t)   = abar_t / (1 - abar_t)
    alpha_{t-1} = abar_{t-1} / abar_t

Schedule: the cosine schedule (s = 0.008) flipped so that t = T is clean,

    abar_t = 1 - cos^2(((t/T + s) / (1 + s)) pi/2) / cos^2((s / (1 + s)) pi/2).

abar_T = 1 would make SNR(T) infinite, so abar is clamped into [0, snr_max / (1 + snr_max)] and
the clamped values are used everywhere: training noise, loss weights, inference coefficients.

Training (block t = 1..T, trained on the same minibatch):

    z_{t-1} = sqrt(abar_{t-1}) u + sqrt(1 - abar_{t-1}) eps          (sampled from q, never a chain)
    loss_t  = w_t ||u_hat_t - u||^2,   w_t = (eta / 2) (SNR(t) - SNR(t-1)) > 0

Inference (Eq. 3), z_0 ~ N(0, I), for t = 1..T:

    z_t = a_t u_hat_t(z_{t-1}, x) + b_t z_{t-1} + sqrt(c_t) eps_t
    a_t = sqrt(abar_t) (1 - alpha_{t-1}) / (1 - abar_{t-1})
    b_t = sqrt(alpha_{t-1}) (1 - abar_t) / (1 - abar_{t-1})
    c_t = (1 - abar_t) (1 - alpha_{t-1}) / (1 - abar_{t-1})

These are the posterior q(z_t | z_{t-1}, u) of the forward process, so with a perfect denoiser the
chain's marginals are exactly q(z_t | u): mean sqrt(abar_t) u, variance 1 - abar_t (a test checks).

Everything is computed in float64 on the host once and stored as float32 tensors; nothing here
reads a tensor's value, so it is safe to call before CUDA-graph capture.
"""
import math
from dataclasses import dataclass

import torch

COSINE_OFFSET = 0.008  # s of the cosine schedule


def cosine_alpha_bar(num_blocks: int, snr_max: float) -> list[float]:
    """abar_0 .. abar_T (T + 1 values, increasing), clamped to [0, snr_max / (1 + snr_max)]."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    if not snr_max > 0:
        raise ValueError(f"snr_max must be > 0, got {snr_max}")
    s, T = COSINE_OFFSET, num_blocks
    top = 1.0 if math.isinf(snr_max) else snr_max / (1.0 + snr_max)
    norm = math.cos(s / (1 + s) * math.pi / 2) ** 2
    values = []
    for t in range(T + 1):
        abar = 1.0 - math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 / norm
        values.append(min(max(abar, 0.0), top))
    return values


def required_snr_max(num_blocks: int) -> float:
    """The smallest snr_max that leaves abar_{T-1} unclamped, so that every w_t is positive."""
    abar = cosine_alpha_bar(num_blocks, snr_max=float("inf"))
    return abar[-2] / (1.0 - abar[-2]) if num_blocks > 1 else 0.0


@dataclass(frozen=True)
class NoiseSchedule:
    """All per-block numbers of NoProp-DT for T blocks, as float32 tensors on one device.

    Shapes: `alpha_bar` [T + 1] (index t = 0..T); every other tensor [T], where entry t - 1 belongs
    to block t (t = 1..T).
    """

    alpha_bar: torch.Tensor     # [T + 1] abar_0 .. abar_T
    input_scale: torch.Tensor   # [T] sqrt(abar_{t-1}): weight of u in block t's noisy input
    noise_scale: torch.Tensor   # [T] sqrt(1 - abar_{t-1}): weight of eps in block t's noisy input
    snr_weights: torch.Tensor   # [T] w_t = eta / 2 (SNR(t) - SNR(t-1)), all > 0
    coef_a: torch.Tensor        # [T] a_t of Eq. 3
    coef_b: torch.Tensor        # [T] b_t of Eq. 3
    coef_c: torch.Tensor        # [T] c_t of Eq. 3 (a variance)

    @property
    def num_blocks(self) -> int:
        return self.snr_weights.shape[0]

    @classmethod
    def cosine(cls, num_blocks: int, snr_max: float = 100.0, eta: float = 0.1,
               device: torch.device | str = "cpu") -> "NoiseSchedule":
        if not eta > 0:
            raise ValueError(f"eta must be > 0, got {eta}")
        abar = cosine_alpha_bar(num_blocks, snr_max)
        snr = [a / (1.0 - a) for a in abar]
        weights, a_coef, b_coef, c_coef = [], [], [], []
        for t in range(1, num_blocks + 1):
            prev, cur = abar[t - 1], abar[t]
            alpha_prev = prev / cur  # alpha_{t-1}
            weights.append(eta / 2 * (snr[t] - snr[t - 1]))
            a_coef.append(math.sqrt(cur) * (1 - alpha_prev) / (1 - prev))
            b_coef.append(math.sqrt(alpha_prev) * (1 - cur) / (1 - prev))
            c_coef.append((1 - cur) * (1 - alpha_prev) / (1 - prev))
        if min(weights) <= 0:
            raise ValueError(f"snr_max={snr_max:g} clamps the top of the schedule for T={num_blocks}, "
                             f"so some SNR weights are not positive; use snr_max > "
                             f"{required_snr_max(num_blocks):.4g} or fewer blocks")

        def tensor(values):
            return torch.tensor(values, dtype=torch.float64).to(device=device, dtype=torch.float32)

        return cls(
            alpha_bar=tensor(abar),
            input_scale=tensor([math.sqrt(a) for a in abar[:-1]]),
            noise_scale=tensor([math.sqrt(1 - a) for a in abar[:-1]]),
            snr_weights=tensor(weights),
            coef_a=tensor(a_coef),
            coef_b=tensor(b_coef),
            coef_c=tensor(c_coef),
        )


def noisy_latents_ref(u: torch.Tensor, input_scale: torch.Tensor, noise_scale: torch.Tensor,
                      noise: torch.Tensor) -> torch.Tensor:
    """Block inputs: z[b] = sqrt(abar_{t-1}) u + sqrt(1 - abar_{t-1}) eps[b] for each block b.

    u: [N, d] clean targets; input_scale, noise_scale: [B] (slices of `NoiseSchedule.input_scale`
    and `.noise_scale`); noise: [B, N, d] standard normal. Returns [B, N, d].
    The fused noise-injection kernel is held to this reference.
    """
    scale = input_scale.view(-1, 1, 1).to(u.dtype)
    sigma = noise_scale.view(-1, 1, 1).to(u.dtype)
    return scale * u.unsqueeze(0) + sigma * noise


def clean_latent_sample(u: torch.Tensor, schedule: NoiseSchedule, noise: torch.Tensor) -> torch.Tensor:
    """z_T ~ q(z_T | y) = sqrt(abar_T) u + sqrt(1 - abar_T) eps: the classifier's training input."""
    abar_T = schedule.alpha_bar[-1].to(u.dtype)
    return abar_T.sqrt() * u + (1 - abar_T).sqrt() * noise


def block_losses_ref(u_hat: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Unweighted per-block denoising errors: mean over the batch of ||u_hat[t] - u||^2.

    u_hat: [T, N, d]; u: [N, d]. Returns [T] (sum over d, mean over N).
    """
    return (u_hat - u.unsqueeze(0)).square().sum(-1).mean(-1)


def prior_kl(u: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """Batch mean of KL(q(z_0 | y) || N(0, I)) = 0.5 (abar_0 ||u||^2 + d(1 - abar_0) - d - d log(1 - abar_0)).

    u: [N, d]. It reaches W_embed only. With abar_0 = 0 (the cosine schedule) it is identically
    zero; it is kept so that a schedule with abar_0 > 0 is handled as the paper writes it.
    """
    d = u.shape[-1]
    abar0 = schedule.alpha_bar[0].to(u.dtype)
    const = d * (1 - abar0) - d - d * torch.log1p(-abar0)
    return 0.5 * (abar0 * u.square().sum(-1) + const).mean()


def denoise_step(z: torch.Tensor, u_hat: torch.Tensor, schedule: NoiseSchedule, t: int,
                 noise: torch.Tensor | None) -> torch.Tensor:
    """One step of Eq. 3 for block t (1-based): z_t from z_{t-1} and block t's prediction.

    noise None gives the noise-free variant (eps_t = 0).
    """
    z_next = schedule.coef_a[t - 1] * u_hat + schedule.coef_b[t - 1] * z
    if noise is not None:
        z_next = z_next + schedule.coef_c[t - 1].sqrt() * noise
    return z_next
