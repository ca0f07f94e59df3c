"""Section 1 of profiling/bench.py: one NoProp training step at the MNIST config, three paths.

    reference  `train_step` with the model's plain PyTorch, noise from torch.randn
    fused      the same step with `model.configure(fused_ops(device), dtype)` and Philox noise
    compiled   torch.compile(noprop_loss) on the reference model; backward and optimiser eager

Warm-up steps first, each timed on its own (compilation and autotuning happen there and are
reported apart), then rounds that run the paths in turn (ref, fused, compiled, ref, ...), k steps
each, so that drift of the machine hits all of them alike. Figure: median images/s over the rounds.
"""
import copy
import statistics
import time
import warnings

import torch

from bench_common import Sizes, mnist_model, one_line, synchronize
from noprop_fast.fused import PRECISIONS, PhiloxNoise
from noprop_fast.layers import ALL_BLOCKS
from noprop_fast.methods import noprop_loss
from noprop_fast.optim import make_optimizer
from noprop_fast.schedule import NoiseSchedule
from noprop_fast.trainer import train_step

PATHS = ("reference", "fused", "compiled")


def compiled_train_step(loss_fn, model, optimizer, schedule, x, y, scaler):
    """`train_step` with the loss from `loss_fn` (torch.compile(noprop_loss)); the rest eager."""
    loss, _ = loss_fn(model, schedule, x, y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.detach()


def bench_step(sizes: Sizes, device: torch.device, precision: str, rounds: int, steps: int,
               warmup: int, skip_compile: str, ops, ops_status: str) -> dict:
    """skip_compile: "" to run the torch.compile path, else the option that left it out."""
    dtype = PRECISIONS[precision]
    cfg, model, x, y = mnist_model(sizes, device)
    schedule = NoiseSchedule.cosine(cfg.num_blocks, cfg.snr_max, cfg.eta, device)

    def scaler():
        return torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def make_path(fused):
        m = copy.deepcopy(model).configure(fused, dtype)
        return m, make_optimizer(m, cfg), scaler()

    steps_of, status = {}, {"reference": "ok", "fused": ops_status or "ok", "compiled": "ok"}
    ref, ref_opt, ref_scaler = make_path(None)
    steps_of["reference"] = lambda: train_step(ref, ref_opt, schedule, x, y, ALL_BLOCKS, None,
                                               ref_scaler)[0]
    if ops is not None:
        fused, fused_opt, fused_scaler = make_path(ops)
        noise = PhiloxNoise(0, device)
        steps_of["fused"] = lambda: train_step(fused, fused_opt, schedule, x, y, ALL_BLOCKS, noise,
                                               fused_scaler)[0]
    if not skip_compile:
        comp, comp_opt, comp_scaler = make_path(None)
        loss_fn = torch.compile(noprop_loss)
        steps_of["compiled"] = lambda: compiled_train_step(loss_fn, comp, comp_opt, schedule, x, y,
                                                           comp_scaler)
    else:
        status["compiled"] = f"skipped ({skip_compile})"

    # warm-up: each path's steps timed one by one; the first carries compilation / autotuning.
    # Inductor's on-disk caches are off for it, so the compile time is a cold compile's.
    import torch._inductor.config as inductor_config
    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")  # follows from the above
    warmup_seconds = {}
    for name in list(steps_of):
        times = []
        try:
            with inductor_config.patch(force_disable_caches=True):
                for _ in range(warmup):
                    synchronize(device)
                    start = time.perf_counter()
                    steps_of[name]()
                    synchronize(device)
                    times.append(time.perf_counter() - start)
        except Exception as err:  # a compile failure is a figure, not the end of the run
            status[name] = f"failed: {one_line(err)}"
            del steps_of[name]
            continue
        warmup_seconds[name] = times

    per_round = {name: [] for name in steps_of}
    last_loss = {}
    for _ in range(rounds):
        for name, step in steps_of.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                loss = step()
            synchronize(device)
            per_round[name].append(steps * sizes.batch / (time.perf_counter() - start))
            last_loss[name] = float(loss)  # after the clock: one host read per round

    paths = {}
    for name in PATHS:
        entry = {"status": status[name]}
        if name in per_round:
            rates = per_round[name]
            entry.update(images_per_second=rates, median=statistics.median(rates), min=min(rates),
                         max=max(rates), warmup_seconds=warmup_seconds[name],
                         first_step_seconds=warmup_seconds[name][0],
                         # the first step's one-off cost (compilation): what it took beyond the
                         # median of the later warm-up steps (0 where it was no slower)
                         one_off_seconds=(max(0.0, warmup_seconds[name][0]
                                              - statistics.median(warmup_seconds[name][1:]))
                                          if warmup > 1 else None),
                         last_loss=last_loss[name])
        paths[name] = entry
    ratios = {}
    for name in ("fused", "compiled"):
        if "median" in paths[name]:
            ratios[f"{name}/reference"] = paths[name]["median"] / paths["reference"]["median"]
    return {"config": {"image_shape": list(sizes.image_shape), "num_classes": sizes.num_classes,
                       "embedding": "onehot", "batch": sizes.batch, "num_blocks": sizes.num_blocks,
                       "method": "noprop", "blocks_per_step": "all", "precision": precision,
                       "rounds": rounds, "steps_per_round": steps, "warmup_steps": warmup},
            "paths": paths, "ratios": ratios}
