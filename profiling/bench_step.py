"""Section `step` of profiling/bench.py: the image task's training step at the MNIST config
(1x28x28, m = 10, one-hot, batch 128, T = 10, every block on every step), images/s on five paths:

    loop      the way public NoProp code trains: T separate `DTBlock` modules (the same weights),
              each with its own torch.optim.AdamW, looped over per batch (bench_loop.py); fp32 only
    reference `train_step` on the batched model, plain PyTorch, noise from torch.randn
    fused     the same step with `model.configure(fused_ops(device), dtype)` and Philox noise
    graphs    the fused step captured once in a CUDA graph and replayed (noprop_fast.graphs);
              CUDA only
    compiled  torch.compile(noprop_loss) on the reference model; backward and optimiser eager

Timing (bench_throughput.py): warm-up steps apart, then rounds that run the paths in turn; each
path's median images/s and its ratio to the reference, both with their range over the rounds.
Paths that run the same model share it (reference and compiled; fused and graphs, the latter with
its own capturable optimiser, as the trainer's --cuda-graphs builds it): a step's time does not
depend on the weights' values, and the language task's fineweb config then holds its weights twice
rather than four times.
"""
import copy

import torch

from bench_common import Sizes, mnist_model
from bench_loop import loop_step, separate_model_from
from bench_throughput import captured, graphs_status, measure_paths
from noprop_fast.ops import PRECISIONS, REFERENCE, PhiloxNoise
from noprop_fast.noprop import noprop_loss
from noprop_fast.optim import make_optimizer
from noprop_fast.schedule import NoiseSchedule
from noprop_fast.tasks.base import apply_gradients

PATHS = ("loop", "reference", "fused", "graphs", "compiled")


def compile_status(skip_compile: str) -> str:
    return f"skipped ({skip_compile})" if skip_compile else "ok"


def loop_status(precision: str) -> str:
    return "ok" if precision == "fp32" else f"fp32 only (this run: {precision})"


def training_paths(model, cfg, schedule: NoiseSchedule, x: torch.Tensor, y: torch.Tensor,
                   loss_fn, make_loop, device: torch.device, precision: str, skip_compile: str,
                   ops, ops_status: str) -> dict:
    """One task's five paths (see the module docstring): name -> a step returning its loss, or a
    status string. loss_fn(model, schedule, x, y, noise=...) -> (loss, parts): `noprop_loss` or
    `lm_loss`; make_loop(model) -> the loop's step (fp32 only). The fused and graphs paths train
    `model` itself (configured with the fused ops); the others copies of its weights."""
    dtype = PRECISIONS[precision]

    def scaler():
        return torch.amp.GradScaler(device.type) if precision == "fp16" else None

    paths = {name: "" for name in PATHS}
    paths["loop"] = loop_status(precision)
    if paths["loop"] == "ok":
        paths["loop"] = make_loop(model)
    ref = copy.deepcopy(model).configure(REFERENCE, dtype)
    ref_opt, ref_scaler = make_optimizer(ref, cfg), scaler()
    paths["reference"] = lambda: apply_gradients(loss_fn(ref, schedule, x, y)[0], ref_opt,
                                                 scaler=ref_scaler)
    paths["fused"] = ops_status or "ok"
    paths["graphs"] = graphs_status(device, precision, paths["fused"])
    if ops is not None:
        fused = model.configure(ops, dtype)  # the original: no further copy of the weights
        fused_opt, fused_scaler = make_optimizer(fused, cfg), scaler()
        noise = PhiloxNoise(0, device)
        paths["fused"] = lambda: apply_gradients(loss_fn(fused, schedule, x, y, noise=noise)[0],
                                                 fused_opt, scaler=fused_scaler)
        if paths["graphs"] == "ok":  # as the trainer's --cuda-graphs: the lr on the device
            graph_opt = make_optimizer(fused, cfg, capturable=True)
            graph_noise = PhiloxNoise(1, device)
            paths["graphs"] = captured(
                lambda xs, ys: apply_gradients(loss_fn(fused, schedule, xs, ys,
                                                       noise=graph_noise)[0], graph_opt),
                (x, y), device)
    paths["compiled"] = compile_status(skip_compile)
    if not skip_compile:
        compiled = torch.compile(loss_fn)
        paths["compiled"] = lambda: apply_gradients(compiled(ref, schedule, x, y)[0], ref_opt,
                                                    scaler=ref_scaler)
    return paths


def bench_step(sizes: Sizes, device: torch.device, precision: str, rounds: int, steps: int,
               warmup: int, skip_compile: str, ops, ops_status: str) -> dict:
    """skip_compile: "" to run the torch.compile path, else the option that left it out."""
    cfg, model, x, y = mnist_model(sizes, device)
    schedule = NoiseSchedule.cosine(cfg.num_blocks, cfg.snr_max, cfg.eta, device)

    def make_loop(model):
        loop = separate_model_from(model, cfg)
        return lambda: loop_step(loop, schedule, x, y)[2]

    paths = training_paths(model, cfg, schedule, x, y, noprop_loss, make_loop, device, precision,
                           skip_compile, ops, ops_status)
    measured = measure_paths(paths, sizes.batch, device, rounds, steps, warmup)
    return {"task": "image", "unit": "images/s",
            "config": {"image_shape": list(sizes.image_shape), "num_classes": sizes.num_classes,
                       "embedding": "onehot", "batch": sizes.batch, "num_blocks": sizes.num_blocks,
                       "method": "noprop", "blocks_per_step": "all", "precision": precision,
                       "rounds": rounds, "steps_per_round": steps, "warmup_steps": warmup},
            "paths": measured}
