"""The image task's separate-modules loop, the `loop` row of profiling/bench.py's `step` section:
the way public NoProp code trains, T separate modules in a Python loop, at the MNIST config.

    batched  `train_step` on the batched model: one forward over all T blocks' stacked parameters,
             one backward, one `BlockAdamW` step
    loop     T `DTBlock` modules (`separate_blocks_from` the same batched model, so the same
             weights), each with its own torch.optim.AdamW; per batch, for t = 1..T in turn:
             block t's noisy input, its forward, its weighted loss, its backward, its optimiser
             step; then the classifier's cross-entropy (and the KL) with the shared optimiser

The loop's objective is `noprop_loss`'s with all blocks on the batch (T / B = 1):

    loss_t = w_t ||u_hat_t(z_{t-1}, x) - u||^2   (batch mean),  z_{t-1} = sqrt(abar_{t-1}) u
                                                                + sqrt(1 - abar_{t-1}) eps_t
    shared = CE(classifier(z_T), y) + KL,        z_T ~ q(z_T | y)

Block t's parameters get the gradient of loss_t alone in both forms, and AdamW is elementwise, so
T AdamWs over T blocks updated every step are the batched `BlockAdamW` (optim.py). A test checks
that the loop's per-block losses equal `noprop_loss`'s `parts["block_losses"]` on the same weights
and noise.

bench_step.py times it beside the other paths (bench_throughput.py).
"""
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from noprop_fast.models.separate import separate_blocks_from
from noprop_fast.schedule import NoiseSchedule, prior_kl


@dataclass
class SeparateModel:
    """The loop's state: T DTBlocks with an AdamW each, and the shared part (W_embed, classifier)
    with one AdamW over its parameters (the classifier; W_embed too where it is learned)."""
    blocks: nn.ModuleList
    block_optimizers: list
    embedding: nn.Module
    classifier: nn.Module
    shared_optimizer: torch.optim.Optimizer


def separate_model_from(model, cfg, blocks: nn.ModuleList | None = None) -> SeparateModel:
    """Copies of `model`'s weights in separate modules; nothing is shared with `model`. blocks: the
    T single-block modules (default: `separate_blocks_from(model.blocks)`, the image task's
    DTBlocks; the language task passes its own, see bench_lm.py)."""
    blocks = separate_blocks_from(model.blocks) if blocks is None else blocks
    embedding, classifier = copy.deepcopy(model.embedding), copy.deepcopy(model.classifier)

    def adamw(params):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    shared = [*classifier.parameters(), *embedding.parameters()]  # one-hot W_embed: a buffer
    return SeparateModel(blocks, [adamw(b.parameters()) for b in blocks], embedding, classifier,
                         adamw(shared))


def image_block_output(block, x: torch.Tensor, z: torch.Tensor, embed_weight: torch.Tensor):
    """A DTBlock's u_hat: images x [N, C, H, W], z [N, d] -> [N, d]."""
    return block(x, z, embed_weight)


def loop_step(loop: SeparateModel, schedule: NoiseSchedule, x: torch.Tensor, y: torch.Tensor,
              eps: torch.Tensor | None = None, eps_clean: torch.Tensor | None = None,
              block_output=image_block_output):
    """One training step of the loop form. y [N]: the targets' ids (the language task: the next
    tokens, flattened to N*L rows). eps [T, N, d] and eps_clean [N, d]: the blocks' and z_T's
    noise (torch.randn where not given). block_output(block, x, z, W_embed) -> u_hat [N, d].
    Returns (block_losses [T], ce, loss), detached: block_losses unweighted, as `noprop_loss`'s
    parts["block_losses"]; loss the step's whole objective, as `noprop_loss`'s loss."""
    loop.shared_optimizer.zero_grad(set_to_none=True)  # a learned W_embed gathers every term
    block_losses = []
    for t, (block, optimizer) in enumerate(zip(loop.blocks, loop.block_optimizers)):
        u = loop.embedding(y)                              # [N, d]; its own graph per block
        noise = torch.randn_like(u) if eps is None else eps[t]
        z = schedule.input_scale[t] * u + schedule.noise_scale[t] * noise
        u_hat = block_output(block, x, z, loop.embedding.weight)  # [N, d]
        error = (u_hat - u).square().sum(-1).mean()        # ||u_hat - u||^2, batch mean
        optimizer.zero_grad(set_to_none=True)
        (schedule.snr_weights[t] * error).backward()
        optimizer.step()
        block_losses.append(error.detach())
    u = loop.embedding(y)
    abar_T = schedule.alpha_bar[-1]
    noise = torch.randn_like(u) if eps_clean is None else eps_clean
    z_clean = abar_T.sqrt() * u + (1 - abar_T).sqrt() * noise  # z_T ~ q(z_T | y)
    ce = F.cross_entropy(loop.classifier(z_clean), y)
    kl = prior_kl(u, schedule)
    (ce + kl).backward()
    loop.shared_optimizer.step()
    block_losses = torch.stack(block_losses)
    loss = (schedule.snr_weights * block_losses).sum() + ce.detach() + kl.detach()
    return block_losses, ce.detach(), loss
