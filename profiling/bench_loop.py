"""Section `loop` of profiling/bench.py: the batched NoProp step against the way public NoProp
code trains, T separate modules in a Python loop, at the MNIST config.

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

Measurement: warm-up steps per path, then rounds that run the two in turn (batched, loop, batched,
...), k steps each, as bench_step does. Figure: median images/s over the rounds, and batched / loop.
"""
import copy
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench_common import Sizes, mnist_model, synchronize
from noprop_fast.layers import ALL_BLOCKS
from noprop_fast.models.separate import separate_blocks_from
from noprop_fast.optim import make_optimizer
from noprop_fast.schedule import NoiseSchedule, prior_kl
from noprop_fast.trainer import train_step

PATHS = ("batched", "loop")


@dataclass
class SeparateModel:
    """The loop's state: T DTBlocks with an AdamW each, and the shared part (W_embed, classifier)
    with one AdamW over its parameters (the classifier; W_embed too where it is learned)."""
    blocks: nn.ModuleList
    block_optimizers: list
    embedding: nn.Module
    classifier: nn.Module
    shared_optimizer: torch.optim.Optimizer


def separate_model_from(model, cfg) -> SeparateModel:
    """Copies of `model`'s weights in separate modules; nothing is shared with `model`."""
    blocks = separate_blocks_from(model.blocks)
    embedding, classifier = copy.deepcopy(model.embedding), copy.deepcopy(model.classifier)

    def adamw(params):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    shared = [*classifier.parameters(), *embedding.parameters()]  # one-hot W_embed: a buffer
    return SeparateModel(blocks, [adamw(b.parameters()) for b in blocks], embedding, classifier,
                         adamw(shared))


def loop_step(loop: SeparateModel, schedule: NoiseSchedule, x: torch.Tensor, y: torch.Tensor,
              eps: torch.Tensor | None = None, eps_clean: torch.Tensor | None = None):
    """One training step of the loop form. eps [T, N, d] and eps_clean [N, d]: the blocks' and z_T's
    noise (torch.randn where not given). Returns (block_losses [T], ce), detached: block_losses
    unweighted, as `noprop_loss`'s parts["block_losses"]."""
    loop.shared_optimizer.zero_grad(set_to_none=True)  # a learned W_embed gathers every term
    block_losses = []
    for t, (block, optimizer) in enumerate(zip(loop.blocks, loop.block_optimizers)):
        u = loop.embedding(y)                              # [N, d]; its own graph per block
        noise = torch.randn_like(u) if eps is None else eps[t]
        z = schedule.input_scale[t] * u + schedule.noise_scale[t] * noise
        u_hat = block(x, z, loop.embedding.weight)         # [N, d]
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
    (ce + prior_kl(u, schedule)).backward()
    loop.shared_optimizer.step()
    return torch.stack(block_losses), ce.detach()


def bench_loop(sizes: Sizes, device: torch.device, rounds: int, steps: int, warmup: int) -> dict:
    cfg, model, x, y = mnist_model(sizes, device)
    schedule = NoiseSchedule.cosine(cfg.num_blocks, cfg.snr_max, cfg.eta, device)
    batched = copy.deepcopy(model)
    batched_opt = make_optimizer(batched, cfg)
    loop = separate_model_from(model, cfg)
    steps_of = {
        "batched": lambda: train_step(batched, batched_opt, schedule, x, y, ALL_BLOCKS)[0],
        "loop": lambda: loop_step(loop, schedule, x, y)[0].sum(),
    }
    warmup_seconds = {name: [] for name in PATHS}
    for name in PATHS:
        for _ in range(warmup):
            synchronize(device)
            start = time.perf_counter()
            steps_of[name]()
            synchronize(device)
            warmup_seconds[name].append(time.perf_counter() - start)
    per_round = {name: [] for name in PATHS}
    for _ in range(rounds):
        for name in PATHS:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                steps_of[name]()
            synchronize(device)
            per_round[name].append(steps * sizes.batch / (time.perf_counter() - start))
    paths = {name: {"images_per_second": rates, "median": statistics.median(rates),
                    "min": min(rates), "max": max(rates), "warmup_seconds": warmup_seconds[name]}
             for name, rates in per_round.items()}
    return {"config": {"image_shape": list(sizes.image_shape), "num_classes": sizes.num_classes,
                       "embedding": "onehot", "batch": sizes.batch, "num_blocks": sizes.num_blocks,
                       "method": "noprop", "blocks_per_step": "all", "precision": "fp32",
                       "rounds": rounds, "steps_per_round": steps, "warmup_steps": warmup},
            "paths": paths,
            "batched/loop": paths["batched"]["median"] / paths["loop"]["median"]}
