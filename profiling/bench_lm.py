"""Section `lm` of profiling/bench.py: the language task's training step, tokens/s on five paths,
at the fineweb config on CUDA and a stdlib-like shape on a CPU (bench_common.Sizes.lm).

    loop      the way public NoProp code trains: T single-block language models (`LanguageBlocks`
              with one block each, holding block t's slice of the batched model's weights), each
              with its own torch.optim.AdamW, looped over per batch (bench_loop.loop_step, the same
              loop as the image task's); then the classifier's CE and the KL with a shared AdamW.
              fp32 only
    reference `lm_loss` + `apply_gradients` on the batched NoProp-LM (`build_lm`), plain PyTorch
    fused     the same with `model.configure(fused_ops(device), dtype)` and Philox noise
    graphs    the fused step captured once in a CUDA graph and replayed (noprop_fast.graphs);
              CUDA only
    compiled  torch.compile(lm_loss) on the reference model; backward and optimiser eager

The loop's objective is lm_loss's: every position of the N windows is one row (M = N*L rows), the
target of row n*L + i the embedding of y[n, i], block t's loss w_t ||u_hat_t - u||^2 over the rows
(a test checks the per-block losses against lm_loss's on the same weights and noise).

The tokens are random ids, fixed for the run (nothing is downloaded; a step's time does not depend
on which tokens it sees). Timing as in bench_step.py (bench_throughput.py), shared models likewise.

Memory (`bench_lm_memory`, section `lm-memory`): one step of NoProp-LM with all blocks, NoProp-LM
with one block per step (the largest over t), and the GPT baseline of the same width and total
depth: bytes saved for backward (CPU) or the CUDA allocator's peak.
"""
import dataclasses

import torch
import torch.nn as nn

from bench_common import LMShape, Sizes, one_line
from bench_loop import loop_step, separate_model_from
from bench_memory_methods import method_description, step_memory
from bench_step import training_paths
from bench_throughput import measure_paths
from noprop_fast.config import LMConfig
from noprop_fast.noprop import noprop_loss
from noprop_fast.models.lm import LanguageBlocks
from noprop_fast.optim import make_optimizer
from noprop_fast.schedule import NoiseSchedule
from noprop_fast.tasks.base import apply_gradients
from noprop_fast.tasks.language import build_lm, lm_loss



def lm_config(shape: LMShape, method: str = "noprop") -> LMConfig:
    return LMConfig(method=method, num_blocks=shape.num_blocks,
                    layers_per_block=shape.layers_per_block, width=shape.width, heads=shape.heads,
                    embed_dim=shape.embed_dim, seq_len=shape.seq_len, batch_size=shape.batch)


def lm_model(shape: LMShape, device: torch.device, method: str = "noprop"):
    """(cfg, model, x, y): the model from `build_lm` (seeded) and one batch of random ids [N, L]."""
    cfg = lm_config(shape, method)
    model = build_lm(cfg, shape.vocab_size, device)
    generator = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(shape.vocab_size, (shape.batch, shape.seq_len + 1), generator=generator)
    x, y = tokens[:, :-1], tokens[:, 1:]  # y[:, i] = x[:, i + 1], as TokenBatches gives them
    return cfg, model, x.contiguous().to(device), y.contiguous().to(device)


def separate_language_blocks_from(model, cfg: LMConfig) -> nn.ModuleList:
    """T one-block LanguageBlocks, block t holding a copy of block t's slice of every stacked
    parameter of `model.blocks` (every parameter of LanguageBlocks is stacked [T, ...])."""
    state = model.blocks.state_dict()
    reference = next(iter(state.values()))
    blocks = nn.ModuleList()
    for t in range(model.num_blocks):
        block = LanguageBlocks(1, model.vocab_size, model.max_len, cfg.width, cfg.heads,
                               cfg.layers_per_block, model.embedding.dim)
        block.load_state_dict({key: value[t:t + 1] for key, value in state.items()})  # strict
        blocks.append(block.to(device=reference.device, dtype=reference.dtype)
                      .train(model.blocks.training))
    return blocks


def language_block_output(block, x: torch.Tensor, z: torch.Tensor, embed_weight: torch.Tensor):
    """A one-block LanguageBlocks' u_hat: ids x [N, L], z [N*L, d] -> [N*L, d]."""
    return block.denoise(block.features(x), z.unsqueeze(0), embed_weight)[0]


def lm_loop_step(loop, schedule: NoiseSchedule, x: torch.Tensor, y: torch.Tensor,
                 eps: torch.Tensor | None = None, eps_clean: torch.Tensor | None = None):
    """One step of the loop form on windows x, y [N, L]; returns (block_losses [T], ce, loss)."""
    return loop_step(loop, schedule, x, y.reshape(-1), eps, eps_clean, language_block_output)


def separate_lm_from(model, cfg: LMConfig):
    return separate_model_from(model, cfg, separate_language_blocks_from(model, cfg))


def bench_lm(sizes: Sizes, device: torch.device, precision: str, rounds: int, steps: int,
             warmup: int, skip_compile: str, ops, ops_status: str) -> dict:
    shape = sizes.lm(device)
    cfg, model, x, y = lm_model(shape, device)
    schedule = NoiseSchedule.cosine(cfg.num_blocks, cfg.snr_max, cfg.eta, device)

    def make_loop(model):
        loop = separate_lm_from(model, cfg)
        return lambda: lm_loop_step(loop, schedule, x, y)[2]

    paths = training_paths(model, cfg, schedule, x, y, lm_loss, make_loop, device, precision,
                           skip_compile, ops, ops_status)
    del model  # held on by the fused paths only (the fineweb config's weights once more)
    measured = measure_paths(paths, shape.tokens, device, rounds, steps, warmup)
    return {"task": "lm", "unit": "tokens/s",
            "config": {**dataclasses.asdict(shape), "tokens_per_step": shape.tokens,
                       "method": "noprop", "embed_init": cfg.embed_init, "precision": precision,
                       "data": "random token ids (synthetic)", "rounds": rounds,
                       "steps_per_round": steps, "warmup_steps": warmup},
            "paths": measured}


# ------------------------------------------------------------------------------------------------
# Section `lm-memory`

LM_MEMORY_VARIANTS = ("noprop-all", "noprop-sequential", "backprop")


def lm_step_fn(shape: LMShape, device: torch.device, method: str, blocks: slice):
    """(model, one training step) on a fresh model: NoProp-LM on `blocks`, or the GPT."""
    cfg, model, x, y = lm_model(shape, device, method)
    schedule = NoiseSchedule.cosine(cfg.num_blocks, cfg.snr_max, cfg.eta, device)
    optimizer = make_optimizer(model, cfg)
    model.train()

    def step():
        if method == "noprop":
            loss, _ = noprop_loss(model, schedule, x, y.reshape(-1), blocks)
        else:
            loss, _ = lm_loss(model, schedule, x, y)
        return apply_gradients(loss, optimizer, blocks)
    return model, step


def bench_lm_memory(sizes: Sizes, device: torch.device) -> dict:
    """Bytes per variant; a variant that runs out of memory (the reference head at the fineweb
    config forms [T, N*L, V] logits) is "failed: <one line>" and has no ratio."""
    shape = sizes.lm(device)
    T = shape.num_blocks

    def measure(method, blocks):
        try:
            return step_memory(lambda: lm_step_fn(shape, device, method, blocks), device)
        except torch.OutOfMemoryError as err:
            return f"failed: {one_line(err)}"

    per_block = [measure("noprop", slice(t, t + 1)) for t in range(T)]
    failed = [b for b in per_block if isinstance(b, str)]
    result = {"noprop-all": measure("noprop", slice(None)),
              "noprop-sequential": failed[0] if failed else max(per_block),
              "backprop": measure("backprop", slice(None))}
    backprop = result["backprop"]
    ratios = {f"{name}/backprop": value / backprop for name, value in result.items()
              if isinstance(value, int) and isinstance(backprop, int)}
    return {"config": dataclasses.asdict(shape), "dtype": "fp32", "ops": "reference",
            "method": method_description(device),
            "kind": "cuda_peak_allocated" if device.type == "cuda" else "cpu_saved_for_backward",
            "bytes": result, "sequential_per_block_bytes": per_block, "ratios": ratios}
