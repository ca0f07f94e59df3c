"""NoProp's schedules (docs/method.md sections 1, 2, 4 and 5): NoProp-DT's cosine schedule clamped
at snr_max, its loss weights w_t and Eq. 3's coefficients, and NoProp-CT's learned schedule
gamma(t). **t = 0 is pure noise, t = T (CT: t = 1) is clean.** The DT numbers are computed in
float64 and stored as float32 tensors; nothing here reads a tensor's value on the host, so it is
safe to call before CUDA-graph capture.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    """All per-block numbers of NoProp-DT for T blocks, as float32 tensors on one device; entry
    t - 1 of a [T] tensor belongs to block t (t = 1..T)."""

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
        schedule = cls.from_alpha_bar(torch.tensor(cosine_alpha_bar(num_blocks, snr_max),
                                                   dtype=torch.float64), eta, device)
        if schedule.snr_weights.min() <= 0:
            raise ValueError(f"snr_max={snr_max:g} clamps the top of the schedule for T={num_blocks}, "
                             f"so some SNR weights are not positive; use snr_max > "
                             f"{required_snr_max(num_blocks):.4g} or fewer blocks")
        return schedule

    @classmethod
    def from_alpha_bar(cls, abar: torch.Tensor, eta: float = 0.1,
                       device: torch.device | str | None = None) -> "NoiseSchedule":
        """The numbers of T steps from abar_0 .. abar_T [T + 1] (increasing, below 1): DT's
        cosine values, or NoProp-CT's learned abar(t) on its inference grid. Computed in float64."""
        abar = abar.detach().to(torch.float64)
        prev, cur = abar[:-1], abar[1:]
        alpha_prev = prev / cur                                       # alpha_{t-1}
        snr = abar / (1 - abar)

        def tensor(values: torch.Tensor) -> torch.Tensor:
            return values.to(device=device or abar.device, dtype=torch.float32)

        return cls(alpha_bar=tensor(abar), input_scale=tensor(prev.sqrt()),
                   noise_scale=tensor((1 - prev).sqrt()),
                   snr_weights=tensor(eta / 2 * (snr[1:] - snr[:-1])),
                   coef_a=tensor(cur.sqrt() * (1 - alpha_prev) / (1 - prev)),
                   coef_b=tensor(alpha_prev.sqrt() * (1 - cur) / (1 - prev)),
                   coef_c=tensor((1 - cur) * (1 - alpha_prev) / (1 - prev)))


class LearnedSchedule(nn.Module):
    """NoProp-CT's noise schedule (docs/method.md section 5): SNR(t) = exp(-gamma(t)) and
    abar(t) = sigmoid(-gamma(t)) for t in [0, 1], with

        gamma(t) = gamma_0 + (gamma_1 - gamma_0) (g(t) - g(0)) / (g(1) - g(0))

    and fixed endpoints gamma_0 = -log(snr_min) (t = 0, noise), gamma_1 = -log(snr_max) (t = 1,
    clean). g is a monotone increasing network (the form of variational diffusion models):
    g(t) = l1(t) + l3(sigmoid(l2(l1(t)))) with every weight positive (softplus of a free
    parameter), so gamma decreases strictly and SNR'(t) = -gamma'(t) SNR(t) > 0 for every t.
    gamma' is computed in closed form, so the loss weight costs no second backward."""

    def __init__(self, snr_min: float, snr_max: float, eta: float = 0.1, hidden: int = 64):
        super().__init__()
        self.eta = eta  # the denoising term's weight is eta / 2 SNR'(t)
        if not 0 < snr_min < snr_max:
            raise ValueError(f"the CT schedule needs 0 < snr_min < snr_max, got {snr_min:g} and "
                             f"{snr_max:g}")
        self.gamma_0, self.gamma_1 = -math.log(snr_min), -math.log(snr_max)
        # free parameters; the weights used are their softplus (> 0)
        self.w1, self.b1 = nn.Parameter(torch.tensor(0.5413)), nn.Parameter(torch.tensor(0.0))
        self.w2 = nn.Parameter(torch.randn(hidden) * 0.5)
        self.b2 = nn.Parameter(torch.randn(hidden) * 0.5)
        self.w3 = nn.Parameter(torch.randn(hidden) * 0.5 - 3.0)
        # t = 0 and 1, and abar there (fixed): device buffers, so that a captured step copies
        # nothing from the host; not in the state dict (they follow from snr_min and snr_max)
        ends = (1 / (1 + math.exp(self.gamma_0)), 1 / (1 + math.exp(self.gamma_1)))
        self.register_buffer("end_times", torch.tensor([0.0, 1.0]), persistent=False)
        self.register_buffer("end_alpha_bar", torch.tensor(ends), persistent=False)

    def _g(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """g(t) and g'(t) for t of any shape."""
        w1, w2, w3 = F.softplus(self.w1), F.softplus(self.w2), F.softplus(self.w3)
        h = w1 * t + self.b1                                          # l1(t)
        s = torch.sigmoid(h.unsqueeze(-1) * w2 + self.b2)             # [..., hidden]
        g = h + (s * w3).sum(-1)
        dg = w1 * (1 + (s * (1 - s) * w2 * w3).sum(-1))               # > 0
        return g, dg

    def gamma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gamma(t) and gamma'(t) (< 0), in fp32."""
        t = t.float()
        g, dg = self._g(t)
        ends, _ = self._g(self.end_times)
        span = ends[1] - ends[0]                                      # > 0
        scale = self.gamma_1 - self.gamma_0                           # < 0
        return self.gamma_0 + scale * (g - ends[0]) / span, scale * dg / span

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """abar(t) and SNR'(t) (> 0) for times t in [0, 1]."""
        gamma, dgamma = self.gamma(t)
        return torch.sigmoid(-gamma), -dgamma * torch.exp(-gamma)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-self.gamma(t)[0])

    def grid(self, steps: int) -> NoiseSchedule:
        """The Eq. 3 numbers on the grid t_k = k / steps, k = 0..steps (inference)."""
        t = torch.linspace(0.0, 1.0, steps + 1, device=self.w2.device, dtype=torch.float64)
        with torch.no_grad():
            abar = self.alpha_bar(t.float()).double()
        abar[[0, -1]] = self.end_alpha_bar.double()  # the fixed ends, as training uses them
        return NoiseSchedule.from_alpha_bar(abar, self.eta)


def prior_kl(u: torch.Tensor, schedule) -> torch.Tensor:
    """Batch mean of KL(q(z_0 | y) || N(0, I)), u [N, d] (docs/method.md section 2); schedule: a
    NoiseSchedule (its abar_0) or abar_0 itself as a tensor (NoProp-CT's fixed abar(0)). Zero for
    the cosine schedule (abar_0 = 0), kept for a schedule with abar_0 > 0 as the paper writes it."""
    d = u.shape[-1]
    abar0 = schedule.alpha_bar[0] if isinstance(schedule, NoiseSchedule) else schedule
    abar0 = abar0.to(u.dtype)
    const = d * (1 - abar0) - d - d * torch.log1p(-abar0)
    return 0.5 * (abar0 * u.square().sum(-1) + const).mean()


def denoise_step(z: torch.Tensor, u_hat: torch.Tensor, schedule: NoiseSchedule, t: int,
                 noise: torch.Tensor | None) -> torch.Tensor:
    """One step of Eq. 3 for block t (1-based): z_t from z_{t-1} and block t's prediction; noise
    None gives the noise-free variant (eps_t = 0)."""
    z_next = schedule.coef_a[t - 1] * u_hat + schedule.coef_b[t - 1] * z
    if noise is not None:
        z_next = z_next + schedule.coef_c[t - 1].sqrt() * noise
    return z_next
