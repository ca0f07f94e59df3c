"""The mathematics of NoProp-DT: noise schedule, loss weights, inference coefficients, KL.

Every task (images, language) takes its numbers from here, computed once: the flipped cosine
schedule clamped at snr_max (docs/method.md section 1), the weights w_t = (eta / 2)(SNR(t) -
SNR(t-1)) (section 2) and Eq. 3's coefficients a_t, b_t, c_t (section 4). With a perfect denoiser
the chain's marginals are exactly q(z_t | u) (a test checks). **t = 0 is pure noise, t = T is
clean.** Computed in float64 on the host and stored as float32 tensors; nothing here reads a
tensor's value, so it is safe to call before CUDA-graph capture.
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
