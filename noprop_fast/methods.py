"""One training loss per method, and inference, for the image task.

NoProp-DT: docs/method.md section 2 (the loss over the blocks in `blocks`, scaled by T / B so that
one block of the sequential schedule counts as the paper's T); the backprop baseline: section 5
(Eqs. 17-19); inference (Eq. 3): section 4, from the images alone.

The model's `ops` (`noprop_fast.ops`) compute the noisy latents, the block losses and the
classifier's cross-entropy; given a `PhiloxNoise`, every backend draws the same noise, so the
backends can be compared step by step. The blocks compute in `model.compute_dtype`; the losses,
the classifier and the KL are fp32. Nothing here reads a tensor's value on the host.
"""
import torch
import torch.nn.functional as F

from .layers import ALL_BLOCKS
from .models.image import ImageModel
from .nvtx_ranges import phase
from .schedule import NoiseSchedule, denoise_step, prior_kl


def noisy_latents(model: ImageModel, y: torch.Tensor, input_scale: torch.Tensor,
                  noise_scale: torch.Tensor, noise=None) -> torch.Tensor:
    """z[b] = input_scale[b] W_embed[y] + noise_scale[b] eps[b]: [B, N, d] in the compute dtype,
    differentiable in W_embed; eps from `noise` (`ops.noise_injection`)."""
    w = model.embedding.weight.to(model.compute_dtype)
    return model.ops.noise_injection(y, w, input_scale, noise_scale, noise)


def noprop_loss(model: ImageModel, schedule: NoiseSchedule, x: torch.Tensor, y: torch.Tensor,
                blocks: slice = ALL_BLOCKS, noise=None,
                shared_terms: bool = True) -> tuple[torch.Tensor, dict]:
    """NoProp-DT loss for the blocks in `blocks`. Returns (loss, parts) with parts detached:
    `block_losses` [B] (unweighted ||u_hat - u||^2), `ce`, `kl`. `noise`: see `noisy_latents`.
    `shared_terms=False` leaves out CE and KL (their z_T noise is still drawn, so the noise stream
    moves on as with them): a process that holds some of the blocks of a multi-process run
    (distributed.py) counts them only where it holds the last block."""
    T = model.num_blocks
    with phase("forward"):
        u = model.embedding(y)                                # [N, d] fp32
        features = model.blocks.features(x, blocks)           # [B, N, F], independent of z
    nb = features.shape[0]
    with phase("noise"):
        z = noisy_latents(model, y, schedule.input_scale[blocks], schedule.noise_scale[blocks],
                          noise)
    with phase("forward"):
        u_hat = model.blocks.denoise(features, z, model.embedding.weight, blocks)  # [B, N, d]
    with phase("loss"):
        weights = schedule.snr_weights[blocks]
        target = u.to(model.compute_dtype)
        weighted = model.ops.block_loss(u_hat, target, weights)  # [B] fp32, w_t applied
        per_block = weighted.detach() / weights
        denoise = (T / nb) * weighted.sum()
        # z_T ~ q(z_T | y): the same op with abar_T, for one "block"
        abar_T = schedule.alpha_bar[-1:]
        with phase("noise"):
            z_clean = noisy_latents(model, y, abar_T.sqrt(), (1 - abar_T).sqrt(), noise)[0]
        if shared_terms:
            ce = classifier_cross_entropy(model, z_clean.to(u.dtype), y)
            kl = prior_kl(u, schedule)
        else:
            ce = kl = torch.zeros((), device=u.device, dtype=u.dtype)
    parts = {"block_losses": per_block.detach(), "ce": ce.detach(), "kl": kl.detach()}
    return denoise + ce + kl, parts


def classifier_cross_entropy(model, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CE of the linear classifier on z [N, d] against y [N] (`ops.linear_cross_entropy`)."""
    return model.ops.linear_cross_entropy(z, model.classifier.weight, model.classifier.bias, y)


def backprop_chain(model: ImageModel, x: torch.Tensor, generator=None) -> torch.Tensor:
    """Eqs. 17-19: run the T blocks as one residual chain; returns the classifier logits [N, m]."""
    features = model.blocks.features(x)                       # [T, N, 256], all blocks at once
    w = model.embedding.weight
    z = torch.randn(x.shape[0], w.shape[1], device=x.device, dtype=w.dtype, generator=generator)
    mix = torch.tanh(model.mix_logits)                        # [T]
    for t in range(model.num_blocks):
        one = slice(t, t + 1)
        u_hat = model.blocks.denoise(features[one], z.unsqueeze(0), w, one)[0]
        z = (1 - mix[t]) * z + mix[t] * u_hat.to(z.dtype)     # the chain's state stays in W's dtype
    return model.classifier(z)


def backprop_loss(model: ImageModel, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    with phase("forward"):
        logits = backprop_chain(model, x)                     # [N, m]
    with phase("loss"):
        ce = F.cross_entropy(logits, y)
    return ce, {"ce": ce.detach()}


@torch.no_grad()
def noprop_chain(model, schedule: NoiseSchedule, x: torch.Tensor, stochastic: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. 3 from z_0 ~ N(0, I): z_t = a_t u_hat_t(z_{t-1}, x) + b_t z_{t-1} + sqrt(c_t) eps_t for
    t = 1..T, block t alone at step t. Returns z_T [N, d] (N rows of features: images, or the
    positions of token windows). `stochastic=False`: eps_t = 0 (z_0 is still drawn)."""
    return chain_from_features(model, schedule, model.blocks.features(x), stochastic, generator)


@torch.no_grad()
def chain_from_features(model, schedule: NoiseSchedule, features: torch.Tensor,
                        stochastic: bool = True, generator: torch.Generator | None = None):
    """`noprop_chain` given every block's z-independent features [T, N, F] (a language model
    samples from the last position's row alone)."""
    w = model.embedding.weight
    z = torch.randn(features.shape[1], w.shape[1], device=w.device, dtype=w.dtype,
                    generator=generator)
    for t in range(1, model.num_blocks + 1):
        one = slice(t - 1, t)
        u_hat = model.blocks.denoise(features[one], z.unsqueeze(0), w, one)[0].to(z.dtype)
        noise = torch.randn(z.shape, device=z.device, dtype=z.dtype,
                            generator=generator) if stochastic else None
        z = denoise_step(z, u_hat, schedule, t, noise)
    return z


@torch.no_grad()
def predict(model: ImageModel, schedule: NoiseSchedule, x: torch.Tensor, stochastic: bool = True,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """Class logits [N, m] for images x [N, C, H, W]; labels are not an argument.

    NoProp: the Eq. 3 chain (`noprop_chain`), then the classifier on z_T.
    `stochastic=False` is the noise-free variant (eps_t = 0; z_0 is still drawn).
    Backprop baseline: its own chain (Eqs. 17-19).
    """
    if model.method == "backprop":
        return backprop_chain(model, x, generator)
    return model.classifier(noprop_chain(model, schedule, x, stochastic, generator))


@torch.no_grad()
def predict_classes(model: ImageModel, schedule: NoiseSchedule, x: torch.Tensor,
                    stochastic: bool = True, seed: int = 0, batch_size: int = 1000) -> torch.Tensor:
    """Predicted classes [N] for images x, in eval mode, with inference noise drawn from `seed`."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    predictions = torch.cat([predict(model, schedule, x[i:i + batch_size], stochastic, generator)
                             .argmax(-1) for i in range(0, x.shape[0], batch_size)])
    model.train(was_training)
    return predictions


def evaluate(model: ImageModel, schedule: NoiseSchedule, x: torch.Tensor, y: torch.Tensor,
             stochastic: bool = True, seed: int = 0) -> float:
    """Test accuracy: predictions from the images alone, compared with y afterwards."""
    predictions = predict_classes(model, schedule, x, stochastic, seed)
    return (predictions == y).float().mean().item()  # host sync: once per evaluation
