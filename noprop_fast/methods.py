"""One training loss per method, and inference, for the image task.

NoProp-DT (docs/method.md section 2), for a minibatch (x, y) and the blocks in `blocks`:

    u        = W_embed[y]                                        [N, d]
    z[b]     = sqrt(abar_{t-1}) u + sqrt(1 - abar_{t-1}) eps     [B, N, d], sampled from q
    loss     = (T / B) sum_b w_t ||u_hat_t(z[b], x) - u||^2      (batch mean)
             + CE(classifier(z_T), y),   z_T ~ q(z_T | y)
             + KL(q(z_0 | y) || N(0, I))

With all blocks on the minibatch (B = T) the factor is 1; with one block (the sequential schedule)
it is the paper's T. Block t's parameters see only its own term, the classifier only the CE term,
W_embed all of them: nothing crosses between blocks (a test checks).

Backprop baseline (Eqs. 17-19): z_0 ~ N(0, I), z_t = (1 - a_t) z_{t-1} + a_t u_hat_t(z_{t-1}, x),
a_t = tanh(w_t), cross-entropy of the classifier on z_T, trained end to end.

Inference (Eq. 3): `predict` takes images only: the labels are never read.

Fused path (`model.fused` set, see `noprop_fast.fused`): the noisy latents and the clean z_T come
from the fused noise op, drawing from a `PhiloxNoise` stream, and the weighted block losses from
the fused loss op; the blocks use the fused FC and head. Given a `PhiloxNoise`, the reference path
draws the very same noise in plain PyTorch, so both paths can be compared step by step.

Precision: the blocks compute in `model.compute_dtype`; the losses, the classifier and the KL are
fp32 on both paths.

Nothing here reads a tensor's value on the host: the losses come back as device tensors.
"""
import torch
import torch.nn.functional as F

from .chunked_ce import linear_cross_entropy
from .layers import ALL_BLOCKS
from .models.image import ImageModel
from .nvtx_ranges import phase
from .schedule import NoiseSchedule, block_losses_ref, denoise_step, noisy_latents_ref, prior_kl


def noisy_latents(model: ImageModel, y: torch.Tensor, input_scale: torch.Tensor,
                  noise_scale: torch.Tensor, noise=None) -> torch.Tensor:
    """z[b] = input_scale[b] W_embed[y] + noise_scale[b] eps[b]: [B, N, d] in the compute dtype,
    differentiable in W_embed. eps: the fused op's Philox stream `noise` (a fused.PhiloxNoise;
    required on the fused path), or torch.randn where none is given."""
    w = model.embedding.weight.to(model.compute_dtype)
    shape = (input_scale.shape[0], y.shape[0], w.shape[1])
    if model.fused is not None:
        if noise is None:
            raise ValueError("the fused path draws its noise from a PhiloxNoise stream; pass one")
        offset = noise.advance(shape[0] * shape[1] * shape[2])
        return model.fused.noise_injection(y, w, input_scale, noise_scale, noise.seed, offset)
    accumulate = torch.promote_types(w.dtype, torch.float32)
    eps = torch.randn(shape, device=y.device, dtype=accumulate) if noise is None else \
        noise.normals(shape, y.device).to(accumulate)
    return noisy_latents_ref(w[y].to(accumulate), input_scale.to(accumulate),
                             noise_scale.to(accumulate), eps).to(w.dtype)


def noprop_loss(model: ImageModel, schedule: NoiseSchedule, x: torch.Tensor, y: torch.Tensor,
                blocks: slice = ALL_BLOCKS, noise=None,
                shared_terms: bool = True) -> tuple[torch.Tensor, dict]:
    """NoProp-DT loss for the blocks in `blocks`. Returns (loss, parts) with parts detached:
    `block_losses` [B] (unweighted ||u_hat - u||^2), `ce`, `kl`. `noise`: see `noisy_latents`.
    `shared_terms=False` leaves out CE and KL (their z_T noise is still drawn, so the noise stream
    moves on as with them): a process that holds some of the blocks of a multi-process run
    (distributed.py) counts them only where it holds the last block."""
    T, fused = model.num_blocks, model.fused
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
        if fused is not None:
            weighted = fused.block_loss(u_hat, target, weights)  # [B] fp32, w_t already applied
            per_block = weighted.detach() / weights
        else:
            accumulate = torch.promote_types(u_hat.dtype, torch.float32)
            per_block = block_losses_ref(u_hat.to(accumulate), target.to(accumulate))  # [B]
            weighted = weights * per_block
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
    """CE of the linear classifier on z [N, d] against y [N]. Fused: in row chunks, so a
    vocabulary's [N, m] logits never exist at once (chunked_ce.py); reference: F.cross_entropy."""
    if model.fused is not None:
        return linear_cross_entropy(z, model.classifier.weight, model.classifier.bias, y)
    return F.cross_entropy(model.classifier(z), y)


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
