"""One step of NoProp-CT's and NoProp-FM's inference chain: `DenoisingBlocks.field_on_grid` (the
first fusion layer's image and time columns computed once per chain) against the plain `denoise`
call on the same latents, in one process.

    python profiling/bench_chain.py [--out DIR] [--repeats N] [--steps S]

Digits' 360 test images, one-hot embeddings, fp32, eval mode, untrained weights (the cost does
not depend on them). Each repeat times S steps of each path, the two interleaved so that a drift
of the machine touches them alike; reports the median milliseconds per step and their ratio.
Writes report.md and results.json naming the device, versions and this command.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench_report import device_header
from noprop_fast.config import ImageConfig
from noprop_fast.data import load_image_dataset
from noprop_fast.tasks.image import build_model


def per_step_ms(fn, steps: int) -> float:
    start = time.perf_counter()
    for k in range(steps):
        fn(k)
    return (time.perf_counter() - start) * 1e3 / steps


@torch.no_grad()
def measure(method: str, repeats: int, steps: int) -> dict:
    data = load_image_dataset("digits")
    model = build_model(ImageConfig(method=method).validate(), data, torch.device("cpu")).eval()
    x, w = data.test_x, model.embedding.weight
    n, times = x.shape[0], torch.linspace(0.0, 1.0, steps + 1)
    features = model.blocks.features(x)
    field = model.blocks.field_on_grid(features, w, times)
    z = torch.randn(n, w.shape[1])
    ks = [torch.tensor(k) for k in range(steps)]
    plain, grid = [], []
    for _ in range(repeats):
        plain.append(per_step_ms(lambda k: model.blocks.denoise(
            features, z[None], w, t=times[k].expand(n)), steps))
        grid.append(per_step_ms(lambda k: field(z, ks[k]), steps))
    return {"images": n, "plain_ms": statistics.median(plain),
            "field_on_grid_ms": statistics.median(grid),
            "ratio": statistics.median(grid) / statistics.median(plain), "plain_all": plain,
            "field_on_grid_all": grid}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="profiling/results/ct-fm-digits-cpu/bench-chain")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps < 1:
        print("bench_chain: --repeats and --steps must be at least 1", file=sys.stderr)
        return 2
    results = {"header": device_header(torch.device("cpu")), "repeats": args.repeats,
               "steps": args.steps,
               "methods": {m: measure(m, args.repeats, args.steps)
                           for m in ("noprop-ct", "noprop-fm")}}
    command = "python profiling/bench_chain.py" + "".join(f" {a}" for a in (argv or sys.argv[1:]))
    h = results["header"]
    lines = ["# One inference step of NoProp-CT and -FM: field_on_grid against denoise", "",
             f"- command: `{command}`",
             f"- device: {h['device_name']} ({h['threads']} threads); torch {h['torch']}, "
             f"triton {h['triton']}, Python {h['python']}; CPU numbers, fp32",
             f"- median of {args.repeats} repeats of {args.steps} steps each, interleaved", "",
             "| method | images | denoise (ms / step) | field_on_grid (ms / step) | ratio |",
             "|---|---:|---:|---:|---:|"]
    for method, r in results["methods"].items():
        lines.append(f"| {method} | {r['images']} | {r['plain_ms']:.2f} | "
                     f"{r['field_on_grid_ms']:.2f} | {r['ratio']:.3f} |")
    report = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
