"""Section `methods-memory` of profiling/bench.py: the activation memory of one training step per
method, at the MNIST config (1x28x28, m = 10, one-hot, batch 128, T = 10).

    noprop-all         NoProp, every block on the batch (blocks = all), as the step section runs it
    noprop-sequential  NoProp with the paper's sequential schedule: one block per step
                       (blocks = slice(t, t + 1)); the figure is the largest over t = 1..T
    backprop           the backprop baseline (Eqs. 17-19), the T blocks as one chain

Figure (`step_memory`), CPU: the bytes autograd saves for the backward pass during one
`train_step` (`noprop_fast.memory.SavedTensorBytes`, each storage once), with the model's
parameters and buffers excluded. This is activation memory only: the paper's Table 2 (GPU GB,
one-hot, MNIST: backprop 0.87, NoProp-DT 0.49) counts everything on the GPU, weights and optimiser
state included, which are the same for every method here, so CPU ratios are not the paper's and
are expected to be further from 1. CUDA: the allocator's peak during one step, everything the step
holds included, the quantity the paper's table reports. Each variant runs on a fresh model built
from the same seed. bench_lm.py measures the language task the same way.
"""
import gc

import torch

from bench_common import Sizes, mnist_model
from noprop_fast.layers import ALL_BLOCKS
from noprop_fast.memory import SavedTensorBytes
from noprop_fast.optim import make_optimizer
from noprop_fast.schedule import NoiseSchedule
from noprop_fast.tasks.image import train_step

VARIANTS = ("noprop-all", "noprop-sequential", "backprop")
PAPER_TABLE2_GB = {"backprop": 0.87, "noprop-dt": 0.49}  # GPU GB, one-hot, MNIST
SEQUENTIAL_MEMORY_TARGET = 0.15  # the engine's target at the MNIST config: sequential / backprop <= 0.15


def step_memory(build, device: torch.device) -> int:
    """The memory of one training step of `build()`'s (model, step) on a fresh model.

    CPU: the activation bytes autograd saves for backward in one step (`SavedTensorBytes`), the
    model's parameters and buffers excluded. CUDA: the allocator's peak during a second step (the
    first allocates the optimiser state) beyond what was allocated before the model was built, so
    everything the method holds counts: weights, gradients, optimiser state and activations, as in
    the paper's Table 2."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated(device)
        model, step = build()
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del model, step
        return peak
    model, step = build()
    with SavedTensorBytes(exclude=[*model.parameters(), *model.buffers()]) as saved:
        step()
    return saved.bytes


def image_step(sizes: Sizes, device: torch.device, method: str, blocks: slice):
    """(model, one train_step on `blocks`) on a fresh MNIST-config model."""
    cfg, model, x, y = mnist_model(sizes, device, method)
    schedule = NoiseSchedule.cosine(cfg.num_blocks, cfg.snr_max, cfg.eta, device)
    optimizer = make_optimizer(model, cfg)
    model.train()
    return model, lambda: train_step(model, optimizer, schedule, x, y, blocks)


def method_description(device: torch.device) -> str:
    if device.type == "cuda":
        return ("CUDA allocator peak of one training step (the second on a fresh model) beyond "
                "what was allocated before the model was built: weights, gradients, optimiser "
                "state and activations")
    return ("activation bytes saved for backward in one train_step (SavedTensorBytes), model "
            "parameters and buffers excluded")


def saved_bytes(sizes: Sizes, device: torch.device, method: str, blocks: slice) -> int:
    """One step's memory (see `step_memory`) on a fresh MNIST-config model."""
    return step_memory(lambda: image_step(sizes, device, method, blocks), device)


def bench_memory_methods(sizes: Sizes, device: torch.device) -> dict:
    T = sizes.num_blocks
    per_block = [saved_bytes(sizes, device, "noprop", slice(t, t + 1)) for t in range(T)]
    result = {"noprop-all": saved_bytes(sizes, device, "noprop", ALL_BLOCKS),
              "noprop-sequential": max(per_block),
              "backprop": saved_bytes(sizes, device, "backprop", ALL_BLOCKS)}
    backprop = result["backprop"]
    ratios = {f"{name}/backprop": result[name] / backprop for name in VARIANTS}
    paper_ratio = PAPER_TABLE2_GB["noprop-dt"] / PAPER_TABLE2_GB["backprop"]
    return {"config": {"image_shape": list(sizes.image_shape), "num_classes": sizes.num_classes,
                       "embedding": "onehot", "batch": sizes.batch, "num_blocks": T,
                       "dtype": "fp32"},
            "method": method_description(device),
            "kind": "cuda_peak_allocated" if device.type == "cuda" else "cpu_saved_for_backward",
            "bytes": result, "ratios": ratios, "sequential_per_block_bytes": per_block,
            "paper_table2_gb": {**PAPER_TABLE2_GB, "noprop-dt/backprop": paper_ratio},
            "sequential_target": SEQUENTIAL_MEMORY_TARGET,
            "meets_target": ratios["noprop-sequential/backprop"] <= SEQUENTIAL_MEMORY_TARGET,
            # the target is set for saved-for-backward bytes at the MNIST config
            "target_applies": (T, sizes.batch) == (Sizes().num_blocks, Sizes().batch)
            and device.type == "cpu"}
