"""The image block's conv tower on a CPU: the op-level figures behind `ConvTower.conv_maps`.

    python profiling/bench_conv_tower.py [--out DIR] [--repeats N]

At the MNIST config (batch 128, one block, fp32), forward and backward, best of N runs each, the
variants interleaved so that a drift of the machine touches them alike:

    ops    dropout masks: F.dropout (bernoulli_) against `_UniformDropout` (uniform_ < 1 - p), at
           [128, 64, 14, 14]; max pooling with indices on NCHW against channels_last maps, at
           [128, 32, 28, 28]
    tower  one block's tower with its FC and BatchNorm, as public NoProp code writes it
           (`models.separate.ConvBranch`: conv, ReLU, max pool, dropout, NCHW) against the engine's
           `ConvTower` with one block, both with the same weights

Writes report.md and results.json naming the device, versions, shapes and this command.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_report import device_header
from noprop_fast.models.image import ConvTower, _UniformDropout
from noprop_fast.models.separate import ConvBranch

BATCH, DROPOUT = 128, 0.2


def best_ms(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def op_cases() -> dict:
    h = torch.randn(BATCH, 64, 14, 14, requires_grad=True)
    maps = torch.randn(BATCH, 32, 28, 28, requires_grad=True)
    maps_cl = maps.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    return {
        "dropout [128, 64, 14, 14]: F.dropout (bernoulli_)":
            lambda: F.dropout(h, DROPOUT, True).sum().backward(),
        "dropout [128, 64, 14, 14]: _UniformDropout (uniform_)":
            lambda: _UniformDropout.apply(h, DROPOUT).sum().backward(),
        "max pool [128, 32, 28, 28]: NCHW":
            lambda: F.max_pool2d(maps, 2).sum().backward(),
        "max pool [128, 32, 28, 28]: channels_last":
            lambda: F.max_pool2d(maps_cl, 2).sum().backward(),
    }


def tower_cases() -> dict:
    torch.manual_seed(0)
    engine = ConvTower(1, (1, 28, 28), DROPOUT, shared_input=True)
    public = ConvBranch((1, 28, 28), DROPOUT)
    with torch.no_grad():  # the same weights: block 0 of each stacked parameter
        for name in ("conv1", "conv2", "conv3", "fc", "bn"):
            for kind in ("weight", "bias"):
                getattr(getattr(public, name), kind).copy_(getattr(getattr(engine, name), kind)[0])
    x = torch.randn(BATCH, 1, 28, 28)
    return {"tower: conv, ReLU, max pool, dropout, NCHW (ConvBranch, as public code)":
                lambda: public(x).sum().backward(),
            "tower: ConvTower, one block (the engine)": lambda: engine(x).sum().backward()}


def measure(cases: dict, repeats: int) -> dict:
    for fn in cases.values():  # warm-up
        fn()
    runs = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            runs[name] += best_ms(fn, 1)
    return {name: {"best_ms": min(t), "all_ms": t} for name, t in runs.items()}


def render(results: dict, command: str) -> str:
    head = results["header"]
    lines = ["# The conv tower's ops on a CPU (CPU numbers)", "",
             f"device: {head['device_name']}; threads {head['threads']}; torch {head['torch']}, "
             f"python {head['python']}; fp32; batch {BATCH}, dropout {DROPOUT}; forward + "
             f"backward, best of {results['repeats']} interleaved runs.", "",
             f"command: `{command}`", "", "| case | best ms | ratio in its pair |", "|---|---:|---:|"]
    for group in ("ops", "tower"):
        names = list(results[group])
        for first, second in zip(names[::2], names[1::2]):
            a, b = results[group][first]["best_ms"], results[group][second]["best_ms"]
            lines += [f"| {first} | {a:.2f} | 1.00 |", f"| {second} | {b:.2f} | {b / a:.2f} |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="profiling/results/cpu-conv-tower")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    if args.repeats < 1:
        print("bench_conv_tower: --repeats must be at least 1", file=sys.stderr)
        return 2
    results = {"header": device_header(torch.device("cpu")), "repeats": args.repeats,
               "ops": measure(op_cases(), args.repeats),
               "tower": measure(tower_cases(), args.repeats)}
    command = "python profiling/bench_conv_tower.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = render(results, command)
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
