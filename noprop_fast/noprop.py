"""The NoProp maths both tasks share (docs/method.md): the noisy latents, the NoProp-DT loss
(section 2), the backprop baseline (section 5, Eqs. 17-19), and the Eq. 3 chain with the
predictions built on it (section 4); a language task's rows are its positions (section 7).
The model's `ops` compute the noisy latents, the block losses and the classifier's
cross-entropy (given a `PhiloxNoise`, every backend draws the same noise); the blocks compute in
`model.compute_dtype`, the losses, the classifier and the KL in fp32. No host reads here.
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
    `block_losses` [B] (unweighted ||u_hat - u||^2), `ce`, `kl`, and with a language model's
    `block_ce` weight each block's cross-entropy of its own softmax, `block_ce` [B], added to the
    loss with that weight. `noise`: see `noisy_latents`.
    `shared_terms=False` leaves out CE and KL but still draws z_T's noise (a block rank without
    the last block, docs/distributed.md)."""
    T = model.num_blocks
    with phase("forward"):
        u = model.embedding(y)                                # [N, d] fp32
        features = model.blocks.features(x, blocks)           # [B, N, F], independent of z
    nb = features.shape[0]
    with phase("noise"):
        z = noisy_latents(model, y, schedule.input_scale[blocks], schedule.noise_scale[blocks],
                          noise)
    local_ce = getattr(model, "block_ce", 0.0)  # a language model's `--block-ce` weight
    with phase("forward"):
        if local_ce:  # [B, N, d] and each block's CE of its own softmax, [B]
            u_hat, block_ce = model.blocks.denoise_with_ce(features, z, model.embedding.weight,
                                                           y, blocks)
        else:
            u_hat = model.blocks.denoise(features, z, model.embedding.weight, blocks)
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
        if shared_terms:  # the classifier's CE on z_T [N, d] against y [N]
            ce = model.ops.linear_cross_entropy(z_clean.to(u.dtype), model.classifier.weight,
                                                model.classifier.bias, y)
            kl = prior_kl(u, schedule)
        else:
            ce = kl = torch.zeros((), device=u.device, dtype=u.dtype)
    parts = {"block_losses": per_block.detach(), "ce": ce.detach(), "kl": kl.detach()}
    if local_ce:
        denoise = denoise + local_ce * (T / nb) * block_ce.sum()
        parts["block_ce"] = block_ce.detach()
    return denoise + ce + kl, parts


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
                 generator: torch.Generator | None = None, transport=None) -> torch.Tensor:
    """Eq. 3 from z_0 ~ N(0, I): z_t = a_t u_hat_t(z_{t-1}, x) + b_t z_{t-1} + sqrt(c_t) eps_t for
    t = 1..T, block t alone at step t. Returns z_T [N, d] (N rows of features: images, or the
    positions of token windows). `stochastic=False`: eps_t = 0 (z_0 is still drawn)."""
    return chain_from_features(model, schedule, model.blocks.features(x), stochastic, generator,
                               transport)


@torch.no_grad()
def chain_from_features(model, schedule: NoiseSchedule, features: torch.Tensor,
                        stochastic: bool = True, generator: torch.Generator | None = None,
                        transport=None) -> torch.Tensor:
    """`noprop_chain` given the z-independent features [T_local, N, F] of the blocks this process
    holds (a language model samples from the last position's row alone). transport: None in one
    process; in several (strategy.ManyProcesses), this process holds blocks transport.span with
    its slice of `schedule`, receives z before its first block, sends it after its last, and z_T
    is broadcast; every process draws z_0 and every eps_t (docs/distributed.md)."""
    w = model.embedding.weight
    z = torch.randn(features.shape[1], w.shape[1], device=w.device, dtype=w.dtype,
                    generator=generator)
    start, stop = (0, model.num_blocks) if transport is None else transport.span
    for t in range(1, (model.num_blocks if transport is None else transport.num_blocks) + 1):
        noise = torch.randn(z.shape, device=z.device, dtype=z.dtype,
                            generator=generator) if stochastic else None
        if t == start + 1 and transport is not None:
            transport.receive(z)
        if start < t <= stop:
            one = slice(t - start - 1, t - start)
            u_hat = model.blocks.denoise(features[one], z.unsqueeze(0), w, one)[0].to(z.dtype)
            z = denoise_step(z, u_hat, schedule, t - start, noise)
        if t == stop and transport is not None:
            transport.send(z)
    return z if transport is None else transport.broadcast(z)


@torch.no_grad()
def predict(model: ImageModel, schedule: NoiseSchedule, x: torch.Tensor, stochastic: bool = True,
            generator: torch.Generator | None = None, transport=None) -> torch.Tensor:
    """Class logits [N, m] for images x [N, C, H, W]; labels are not an argument. NoProp: the
    Eq. 3 chain, then the classifier on z_T; the backprop baseline: its own chain (Eqs. 17-19)."""
    if model.method == "backprop":
        return backprop_chain(model, x, generator)
    return model.classifier(noprop_chain(model, schedule, x, stochastic, generator, transport))


@torch.no_grad()
def predict_classes(model: ImageModel, schedule: NoiseSchedule, x: torch.Tensor,
                    stochastic: bool = True, seed: int = 0, batch_size: int = 1000,
                    transport=None) -> torch.Tensor:
    """Predicted classes [N] for images x, in eval mode, with inference noise drawn from `seed`."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=x.device).manual_seed(seed)
    predictions = torch.cat([predict(model, schedule, x[i:i + batch_size], stochastic, generator,
                                     transport).argmax(-1)
                             for i in range(0, x.shape[0], batch_size)])
    model.train(was_training)
    return predictions
