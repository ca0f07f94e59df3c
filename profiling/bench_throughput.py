"""The throughput measurement that the image and language tables share: several ways of running one
training step (the paths), timed alike, against the batched reference path.

    warm-up  every path runs `warmup` steps, each timed on its own. The first carries the one-off
             costs (torch.compile's compilation, Triton's compilation and autotuning, a CUDA graph's
             capture), reported apart and kept out of the throughput. Inductor's on-disk caches are
             off, so a compile time is a cold compile's.
    rounds   in each round every path runs k steps in turn (loop, reference, fused, ...), so that a
             drift of the machine (clock, other processes) hits all paths alike. A round's figure is
             k x units per step / its wall time (CUDA: synchronised before each clock read).

Per path: the median over the rounds, the range (min..max), and the ratio to the reference: the
per-round ratio path / reference (both from the same round), its median and range. A path that
cannot run here is a status string ("CUDA only", "skipped (...)", "unavailable: ...") and is not
timed; a path whose warm-up or rounds raise is "failed: <one line>" and the others go on.
"""
import statistics
import time
import warnings
from typing import Callable

import torch

from bench_common import one_line, synchronize

REFERENCE = "reference"


def measure_paths(paths: dict, units_per_step: int, device: torch.device, rounds: int, steps: int,
                  warmup: int) -> dict:
    """paths: name -> a step (no arguments; returns the loss, a device tensor) or a status string.
    Returns name -> {"status", and where timed: "per_second" [rounds], "median", "min", "max",
    "warmup_seconds", "first_step_seconds", "one_off_seconds", "last_loss", and where the reference
    was timed too: "vs_reference" [rounds], "ratio", "ratio_min", "ratio_max"}."""
    import torch._inductor.config as inductor_config
    warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")  # follows from the patch
    status = {name: "ok" if callable(p) else p for name, p in paths.items()}
    steps_of: dict[str, Callable] = {name: p for name, p in paths.items() if callable(p)}

    def fail(name: str, err: BaseException) -> None:
        status[name] = f"failed: {one_line(err)}"
        del steps_of[name]
        if device.type == "cuda":  # an out-of-memory path must not starve the next one
            torch.cuda.empty_cache()

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
        except Exception as err:  # a compile or capture failure is a figure, not the end of the run
            fail(name, err)
            continue
        warmup_seconds[name] = times

    per_round = {name: [] for name in steps_of}
    last_loss = {}
    for _ in range(rounds):
        for name in list(steps_of):
            try:
                synchronize(device)
                start = time.perf_counter()
                for _ in range(steps):
                    loss = steps_of[name]()
                synchronize(device)
            except Exception as err:
                fail(name, err)
                per_round.pop(name)
                continue
            per_round[name].append(steps * units_per_step / (time.perf_counter() - start))
            last_loss[name] = float(loss)  # after the clock: one host read per round

    out = {}
    reference = per_round.get(REFERENCE)
    for name in paths:
        entry = {"status": status[name]}
        if name in per_round:
            rates, warm = per_round[name], warmup_seconds[name]
            entry.update(per_second=rates, median=statistics.median(rates), min=min(rates),
                         max=max(rates), warmup_seconds=warm, first_step_seconds=warm[0],
                         # the first step's one-off cost: what it took beyond the median of the
                         # later warm-up steps (0 where it was no slower)
                         one_off_seconds=(max(0.0, warm[0] - statistics.median(warm[1:]))
                                          if len(warm) > 1 else None),
                         last_loss=last_loss[name])
            if reference is not None:
                ratios = [r / ref for r, ref in zip(rates, reference)]
                entry.update(vs_reference=ratios, ratio=statistics.median(ratios),
                             ratio_min=min(ratios), ratio_max=max(ratios))
        out[name] = entry
    return out


def captured(fn: Callable, inputs: tuple, device: torch.device) -> Callable:
    """A step that replays a CUDA graph of `fn(*inputs)` (noprop_fast.graphs.CapturedStep).

    CapturedStep runs its first `warmup_steps` calls uncaptured and captures on the next; here the
    first call makes all of them, so that the warm-up steps and the capture fall in this path's
    first warm-up step and every later call is a replay. A failed capture (CapturedStep then runs
    uncaptured) raises, so that the row reads "failed: ..." rather than timing eager steps. The
    import is here because the row exists on CUDA only."""
    state = {}

    def step():
        if "graph" not in state:
            from noprop_fast.graphs import CapturedStep
            graph = CapturedStep(fn, inputs, device, warn=lambda line: None)
            for _ in range(graph.warmup_left + 1):  # the uncaptured warm-up calls, then capture
                loss = graph(*inputs)
            if not graph.captured:
                raise RuntimeError(f"CUDA graph capture failed: {graph.failed}")
            state["graph"] = graph
            return loss
        return state["graph"](*inputs)
    return step


def graphs_status(device: torch.device, precision: str, fused_status: str) -> str:
    """Why the CUDA-graph row is not measured here, or "ok"."""
    if device.type != "cuda":
        return "CUDA only"
    if fused_status != "ok":
        return fused_status
    if precision == "fp16":
        return "not with fp16 (the loss scaler reads the gradients' finiteness on the host)"
    return "ok"
