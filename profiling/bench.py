"""The one benchmark entry point: the fused path against the reference, and the batched step
against the separate-modules loop and the other methods, in one run, on whatever device is present.

    python profiling/bench.py                          # all sections; cuda if present, else cpu
    python profiling/bench.py --precision bf16 --sections step,ops
    python profiling/bench.py --quick --out /tmp/b     # tiny sizes: the smoke test's run
    python profiling/bench.py --sections loop,methods-memory   # loop; memory per method

Five sections (see profiling/README.md for what each figure means):

  step    one NoProp training step at the MNIST config (1x28x28, m = 10, one-hot, batch 128,
          T = 10, every block on every step) on three paths: the reference (`train_step`, plain
          PyTorch), the fused ops (`model.configure(fused_ops(device), dtype)`, Philox noise), and
          torch.compile of the reference loss (`noprop_loss`; backward and optimiser eager). Warm-up
          steps first (compilation and autotuning happen there and are reported apart), then
          rounds that run the paths in turn (ref, fused, compiled, ref, ...), k steps each, so that
          drift of the machine hits all of them alike. Figure: median images/s over the rounds.
  ops     each fused op against its `<op>_ref`, forward and forward + backward, at the shapes the
          MNIST step uses and the head at a language-model shape (B=1, N=1024, D=128, m=50257,
          d=256). CPU: torch.utils.benchmark's blocked_autorange median; GPU: triton's do_bench
          median. On GPU also GB/s or TFLOP/s from the formulas in `bench_ops.op_cases`.
          block_linear and softmax_head take slices of leaf nn.Parameters, as the model
          passes them, and their gradients go into .grad (set to None before each call).
  memory  the head's peak memory at m = 50257, fp32, forward + backward (`head_memory.py`).
  loop    the batched step (`train_step`) against T separate `DTBlock` modules with an AdamW each,
          looped over per batch as public NoProp code trains, same weights, same objective; rounds
          in turn as in `step`. Figure: median images/s of each and batched / loop.
  methods-memory  activation bytes saved for backward in one step (parameters and buffers
          excluded): NoProp with all blocks, NoProp sequential (one block per step, the largest
          over t), backprop; ratios to backprop beside the paper's Table 2.

The sections live in bench_step.py, bench_ops.py, `bench_memory` below (its worker is
head_memory.py), bench_loop.py and bench_memory_methods.py; bench_common.py holds what they share,
bench_report.py writes the report.

The data are synthetic MNIST-shaped tensors (nothing is downloaded): a step's time does not depend
on pixel values. Every figure goes to results.json; report.md holds the tables with the device,
versions, dtype, shapes and the command line. Numbers from a machine without a GPU are CPU numbers.
"""
import argparse
import dataclasses
import datetime
import os
import re
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository: run from a checkout without installing
sys.path.insert(0, str(HERE))         # the sections' modules and head_memory, the memory worker

import bench_report  # noqa: E402
import head_memory  # noqa: E402
from bench_common import ACCEPT_MEMORY_RATIO, QUICK, Sizes, load_fused  # noqa: E402
from bench_loop import bench_loop  # noqa: E402
from bench_memory_methods import bench_memory_methods  # noqa: E402
from bench_ops import bench_ops  # noqa: E402
from bench_step import bench_step  # noqa: E402
from noprop_fast.config import OneLineArgumentParser  # noqa: E402
from noprop_fast.errors import UserError, cli_main  # noqa: E402
from noprop_fast.fused import PRECISIONS  # noqa: E402

SECTIONS = ("step", "ops", "memory", "loop", "methods-memory")
# step and loop: (rounds, steps per round, warm-up steps) when not given; a CPU step at batch 128
# takes seconds
STEP_DEFAULTS = {"cpu": (3, 3, 2), "cuda": (5, 20, 5), "quick": (1, 1, 1)}


# ------------------------------------------------------------------------------------------------
# Section 3: the head's peak memory (the measurement itself is head_memory.py's)

def bench_memory(sizes: Sizes, device: torch.device) -> dict:
    shape = sizes.memory_head
    result = {"shape": asdict(shape), "dtype": "fp32", "logits_bytes": shape.logits_bytes(),
              "method": ("cuda max_memory_allocated - allocated before the call" if device.type == "cuda"
                         else "cpu resident high-water mark (VmHWM, reset before the call) - "
                              "resident set before the call, fresh process per variant, "
                              f"MALLOC_MMAP_THRESHOLD_={head_memory.MMAP_THRESHOLD}")}
    for variant in head_memory.VARIANTS:
        result[variant] = head_memory.measure(variant, shape, device, torch.get_num_threads())
    ref, fused = result["ref"], result["fused"]
    if ref.get("status") == "ok" and fused.get("status") == "ok" and ref["peak_bytes"] > 0:
        result["fused/reference"] = fused["peak_bytes"] / ref["peak_bytes"]
        result["meets_bar"] = result["fused/reference"] <= ACCEPT_MEMORY_RATIO
        result["bar_applies"] = shape.classes == Sizes().memory_head.classes  # not at --quick sizes
    return result


# ------------------------------------------------------------------------------------------------
# The command line

def parse_args(argv):
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of "
                   f"{','.join(SECTIONS)} [default all]")
    p.add_argument("--rounds", type=int, help="step, loop: rounds [default cpu 3, cuda 5]")
    p.add_argument("--steps-per-round", type=int, help="step, loop: steps per path per round "
                   "[default cpu 3, cuda 20]")
    p.add_argument("--warmup", type=int, help="step, loop: warm-up steps per path "
                   "[default cpu 2, cuda 5]")
    p.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS),
                   help="the blocks' and ops' dtype [default fp32]")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when present, else cpu")
    p.add_argument("--out", help="folder for report.md and results.json "
                   "[default profiling/results/<device>-<date>[-<precision>]]")
    p.add_argument("--no-compile", action="store_true", help="step: leave out the torch.compile path")
    p.add_argument("--min-run-time", type=float,
                   help="ops on CPU: seconds per measurement [default 0.5]")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 round x 1 step, no compile "
                   "(the smoke test)")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        raise UserError(f"--sections: {','.join(unknown) or 'none given'} is not a subset of "
                        f"{','.join(SECTIONS)}")
    args.sections = sections
    for name in ("rounds", "steps_per_round"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup is not None and args.warmup < 1:
        raise UserError("--warmup must be at least 1 (compilation must happen before the clock)")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def default_out(device: torch.device, precision: str, today: str) -> Path:
    kind = "cpu" if device.type == "cpu" else \
        re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    suffix = "" if precision == "fp32" else f"-{precision}"
    return HERE / "results" / f"{kind}-{today}{suffix}"


def run(argv=None) -> dict:
    run_start = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = resolve_device(args.device)
    sizes = QUICK if args.quick else Sizes()
    if args.min_run_time is not None:
        sizes = dataclasses.replace(sizes, min_run_time=args.min_run_time)
    now = datetime.datetime.now()
    out = Path(args.out) if args.out else default_out(device, args.precision, now.strftime("%Y-%m-%d"))
    if {"step", "ops"} & set(args.sections):
        ops, ops_status, load_seconds = load_fused(device)
    else:  # the other sections run the reference path only
        ops, ops_status, load_seconds = None, "not loaded (no section here uses them)", 0.0
    header = bench_report.device_header(device)
    header.update(precision=args.precision, date=now.strftime("%Y-%m-%d %H:%M:%S"),
                  command=shlex.join(["python", "profiling/bench.py", *argv]),
                  fused_ops=bench_report.OPS_NAMES[ops.name] if ops is not None else ops_status,
                  fused_load_seconds=load_seconds, sections=args.sections,
                  op_repeats=sizes.op_repeats, load_average_start=os.getloadavg()[0])
    results = {"header": header}
    print(f"device: {header['device_name']}, {header['threads']} threads, fused ops: "
          f"{header['fused_ops']}", file=sys.stderr, flush=True)
    rounds, steps, warmup = STEP_DEFAULTS["quick" if args.quick else device.type]
    rounds = args.rounds or rounds
    steps = args.steps_per_round or steps
    warmup = warmup if args.warmup is None else args.warmup
    section_seconds = header["section_seconds"] = {}
    if "step" in args.sections:
        print(f"step: {warmup} warm-up + {rounds} x {steps} steps per path...", file=sys.stderr,
              flush=True)
        section_start = time.perf_counter()
        results["step"] = bench_step(sizes, device, args.precision, rounds, steps, warmup,
                                     "--quick" if args.quick else "--no-compile" if args.no_compile
                                     else "", ops, ops_status)
        section_seconds["step"] = time.perf_counter() - section_start
    if "ops" in args.sections:
        print("ops...", file=sys.stderr, flush=True)
        section_start = time.perf_counter()
        results["ops"] = bench_ops(sizes, device, args.precision, ops, ops_status)
        section_seconds["ops"] = time.perf_counter() - section_start
    if "memory" in args.sections:
        print("memory...", file=sys.stderr, flush=True)
        section_start = time.perf_counter()
        results["memory"] = bench_memory(sizes, device)
        section_seconds["memory"] = time.perf_counter() - section_start
    if "loop" in args.sections:
        print(f"loop: {warmup} warm-up + {rounds} x {steps} steps per path...", file=sys.stderr,
              flush=True)
        section_start = time.perf_counter()
        results["loop"] = bench_loop(sizes, device, rounds, steps, warmup)
        section_seconds["loop"] = time.perf_counter() - section_start
    if "methods-memory" in args.sections:
        print("methods-memory...", file=sys.stderr, flush=True)
        section_start = time.perf_counter()
        results["methods-memory"] = bench_memory_methods(sizes, device)
        section_seconds["methods-memory"] = time.perf_counter() - section_start
    header["load_average_end"] = os.getloadavg()[0]
    header["seconds"] = time.perf_counter() - run_start
    report = bench_report.write(results, out)
    print(report)
    print(f"written: {out / 'report.md'}, {out / 'results.json'}", file=sys.stderr)
    return results


def main(argv=None) -> int:
    return cli_main(run, argv, "no report written")


if __name__ == "__main__":
    sys.exit(main())
