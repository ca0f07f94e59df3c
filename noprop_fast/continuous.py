"""NoProp-CT and NoProp-FM (docs/method.md section 5): one network with the time t in [0, 1] as an
input, t drawn per example (t = 0 is noise, t = 1 is clean, as in DT). The model's `ops` compute
the noisy latents (one coefficient pair per example) and the weighted loss (one weight per example),
the same ops as DT's with [1, N] coefficients where DT passes [T]. No host reads in a training step.

- CT: z_t = sqrt(abar(t)) u_y + sqrt(1 - abar(t)) eps with the learned abar(t) of
  `schedule.LearnedSchedule`; loss = CE(classifier(z_1), y) + KL(q(z_0 | y) || N(0, I))
  + eta / 2 E_t[SNR'(t) ||u_hat(z_t, x, t) - u_y||^2]. Inference: Eq. 3 on the grid t_k = k / S.
- FM: z_t = t u_y + (1 - t) z_0, z_0 ~ N(0, I); loss ||v(z_t, x, t) - (u_y - z_0)||^2, and where
  W_embed is learned the anchor CE(classifier(z~_1), y) + ||z~_1 - u_y||^2 with
  z~_1 = z_t + (1 - t) v. Inference: dz/dt = v from t = 0 to 1 (Euler or Heun, S steps), then the
  nearest class embedding (or the classifier, where the anchor trained it).
"""
import torch

from .graphs import CapturedStep
from .models.image import ImageModel
from .noprop import noisy_latents
from .nvtx_ranges import phase
from .schedule import denoise_step, prior_kl

# FM draws t from U(0, FM_T_MAX): its target u - z_0 = (u - z_t) / (1 - t) divides by 1 - t
FM_T_MAX = 0.999
FEATURE_CHUNK = 1000  # images whose conv features are computed at once at inference


def ct_loss(model: ImageModel, x: torch.Tensor, y: torch.Tensor,
            noise=None) -> tuple[torch.Tensor, dict]:
    """NoProp-CT's loss for a batch; `noise`: see `noprop.noisy_latents`. The learned schedule
    gets its gradient through both the weights SNR'(t) and the noise scales."""
    schedule, n = model.noise_schedule, x.shape[0]
    with phase("forward"):
        u = model.embedding(y)                                    # [N, d] fp32
        features = model.blocks.features(x)                       # [1, N, F]
        t = torch.rand(n, device=x.device)                        # [N], one time per example
        abar, snr_slope = schedule(t)                             # [N], [N]: abar(t), SNR'(t)
    with phase("noise"):
        z = noisy_latents(model, y, abar.sqrt()[None], (1 - abar).sqrt()[None], noise)  # [1, N, d]
    with phase("forward"):
        u_hat = model.blocks.denoise(features, z, model.embedding.weight, t=t)
    with phase("loss"):
        weighted = model.ops.block_loss(u_hat, u.to(model.compute_dtype),
                                        (schedule.eta / 2 * snr_slope)[None])  # [1] fp32
        abar_0, abar_1 = schedule.end_alpha_bar[:1], schedule.end_alpha_bar[1:]
        with phase("noise"):  # z_1 ~ q(z_1 | y), the fixed clean end
            z_clean = noisy_latents(model, y, abar_1.sqrt(), (1 - abar_1).sqrt(), noise)[0]
        ce = model.ops.linear_cross_entropy(z_clean.to(u.dtype), model.classifier.weight,
                                            model.classifier.bias, y)
        kl = prior_kl(u, abar_0[0])
    parts = {"denoise": weighted.detach()[0], "ce": ce.detach(), "kl": kl.detach()}
    return weighted.sum() + ce + kl, parts


def fm_loss(model: ImageModel, x: torch.Tensor, y: torch.Tensor,
            noise=None) -> tuple[torch.Tensor, dict]:
    """NoProp-FM's loss for a batch, with the anchor where W_embed is learned. One row per
    label: y [N] (an image each, or the positions of token windows, y flattened)."""
    n = y.shape[0]
    with phase("forward"):
        u = model.embedding(y)                                    # [N, d] fp32
        features = model.blocks.features(x)                       # [1, N, F]
        t = torch.rand(n, device=x.device) * FM_T_MAX             # [N]
    with phase("noise"):  # z_t = t u + (1 - t) z_0: the noise op with a = t, s = 1 - t
        z = noisy_latents(model, y, t[None], (1 - t)[None], noise)  # [1, N, d]
    with phase("forward"):
        v = model.blocks.denoise(features, z, model.embedding.weight, t=t)  # [1, N, d]
    with phase("loss"):
        rest = (1 - t).unsqueeze(-1)                              # [N, 1]
        target = (u - z[0].float()) / rest                        # u - z_0
        flow = model.ops.block_loss(v, target.to(v.dtype), torch.ones_like(t)[None])  # [1]
        loss, parts = flow.sum(), {"flow": flow.detach()[0]}
        if model.embedding.weight.requires_grad:  # the anchor: W_embed cannot collapse
            z_end = z[0].float() + rest * v[0].float()            # z~_1 [N, d]
            ce = model.ops.linear_cross_entropy(z_end, model.classifier.weight,
                                                model.classifier.bias, y)
            align = (z_end - u).square().sum(-1).mean()
            loss = loss + ce + align
            parts.update(ce=ce.detach(), align=align.detach())
    return loss, parts


def _integrate(step, z: torch.Tensor, steps: int, graphs: bool) -> torch.Tensor:
    """z <- step(z, k) for k = 0..steps-1 (k a 0-dim int64 device tensor). graphs: through a
    graphs.CapturedStep, on CUDA one step captured once and replayed (on a CPU it runs staged, on
    its static buffers: what the tests check); else eagerly."""
    k = torch.zeros((), dtype=torch.int64, device=z.device)
    if graphs:
        step = CapturedStep(step, (z, k), z.device, warmup_steps=1)
    for i in range(steps):
        k.fill_(i)
        z = step(z, k)
    return z


@torch.no_grad()
def ct_chain(model: ImageModel, features: torch.Tensor, steps: int,
             stochastic: bool = True, graphs: bool = False) -> torch.Tensor:
    """Eq. 3 from z_0 ~ N(0, I) over the learned schedule on t_k = k / steps: step k + 1 uses
    u_hat(z_{t_k}, x, t_k). features: [1, N, F]. Returns z_1 [N, d]; noise from the global
    generator (the caller seeds it)."""
    grid = model.noise_schedule.grid(steps)
    times = torch.linspace(0.0, 1.0, steps + 1, device=features.device)
    w = model.embedding.weight
    denoise = model.blocks.field_on_grid(features, w, times)

    def step(z, k):
        u_hat = denoise(z, k).to(z.dtype)
        noise = torch.randn(z.shape, device=z.device, dtype=z.dtype) if stochastic else None
        return denoise_step(z, u_hat, grid, k + 1, noise)
    z = torch.randn(features.shape[1], w.shape[1], device=w.device, dtype=w.dtype)
    return _integrate(step, z, steps, graphs)


@torch.no_grad()
def fm_ode(model: ImageModel, features: torch.Tensor, steps: int, solver: str = "euler",
           graphs: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """dz/dt = v(z, x, t) from z_0 ~ N(0, I) at t = 0 to t = 1 in `steps` equal steps (Euler, or
    Heun's second order). Returns z_1 [N, d]; z_0 from `generator` (None: the global one)."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"unknown ODE solver {solver!r}")
    w = model.embedding.weight
    dt = 1.0 / steps
    times = torch.linspace(0.0, 1.0, steps + 1, device=features.device)
    field = model.blocks.field_on_grid(features, w, times)

    def step(z, k):
        v = field(z, k).to(z.dtype)
        if solver == "euler":
            return z + dt * v
        return z + dt / 2 * (v + field(z + dt * v, k + 1).to(z.dtype))
    z = torch.randn(features.shape[1], w.shape[1], device=w.device, dtype=w.dtype,
                    generator=generator)
    return _integrate(step, z, steps, graphs)


@torch.no_grad()
def predict_classes(model: ImageModel, x: torch.Tensor, steps: int, stochastic: bool = True,
                    solver: str = "euler", readout: str = "nearest",
                    seed: int = 0, graphs: bool = False) -> torch.Tensor:
    """Predicted classes [N] for images x, in eval mode: the chain (CT) or the ODE (FM) on the
    whole batch at once, its noise drawn from `seed` (the global generators are restored after).
    CT reads z_1 with its classifier; FM with the nearest class embedding, or (readout
    "classifier") with the classifier its anchor trained."""
    was_training = model.training
    model.eval()
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        features = torch.cat([model.blocks.features(x[i:i + FEATURE_CHUNK])
                              for i in range(0, x.shape[0], FEATURE_CHUNK)], dim=1)  # [1, N, F]
        if model.method == "noprop-ct":
            z = ct_chain(model, features, steps, stochastic, graphs)
        else:
            z = fm_ode(model, features, steps, solver, graphs)
    model.train(was_training)
    if model.method == "noprop-ct" or readout == "classifier":
        return model.classifier(z.float()).argmax(-1)
    return torch.cdist(z.float(), model.embedding.weight.float()).argmin(-1)
