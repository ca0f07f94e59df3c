"""The one benchmark entry point: the image and language tasks' training steps on every path, the
fused ops against their references, and the memory of each method, in one run, on whatever device
is present.

    python profiling/bench.py                          # all sections; cuda if present, else cpu;
                                                       # the report in runs/bench-<device>-<time>/
    python profiling/bench.py --quick --out /tmp/b     # minutes on a 2-core CPU: the MNIST-config
                                                       # step and memory, small LM, ops and heads
    python profiling/bench.py --tiny --no-compile --out /tmp/b   # the smoke test's run
    python profiling/bench.py --precision bf16 --sections step,lm,ops

Sections (see profiling/README.md for what each figure means):

  step    the image task's training step at the MNIST config (1x28x28, m = 10, one-hot, batch 128,
          T = 10, every block on every step), images/s on five paths: T separate modules looped
          over per batch, the batched reference, the fused ops, the fused step replayed as a CUDA
          graph (CUDA only), torch.compile of the reference loss; each against the batched
          reference in the same rounds (bench_step.py, bench_throughput.py).
  lm      the same five paths for NoProp-LM, tokens/s: the fineweb config on CUDA, a stdlib-like
          shape on a CPU (bench_lm.py).
  ops     each fused op against its `<op>_ref`, forward and forward + backward, at the shapes the
          MNIST step uses and the head at a language-model shape (B=1, N=1024, D=128, m=50257,
          d=256). CPU: torch.utils.benchmark's blocked_autorange median; GPU: triton's do_bench
          median, with GB/s or TFLOP/s (bench_ops.py).
  memory  the head's peak memory at m = 50257, fp32, forward + backward (`head_memory.py`).
  methods-memory  one image training step's memory: NoProp with all blocks, NoProp sequential
          (one block per step, the largest over t), backprop; ratios to backprop beside the
          paper's Table 2. CPU: bytes saved for backward; CUDA: the allocator's peak
          (bench_memory_methods.py).
  lm-memory       the same for NoProp-LM against the GPT baseline (bench_lm.py).

bench_common.py holds what the sections share; bench_report.py writes report.md and results.json,
bench_plot.py bench.png (throughput relative to the batched reference per task; the memory ratios
beside the paper's). The data are synthetic (nothing is downloaded): a step's time does not depend
on the values. Numbers from a machine without a GPU are CPU numbers.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository: run from a checkout without installing
sys.path.insert(0, str(HERE))         # the sections' modules and head_memory, the memory worker

from noprop_fast import threads  # noqa: E402

threads.passive_wait_unless_set()  # before torch loads its OpenMP runtime: see threads.py

import torch  # noqa: E402

import bench_report  # noqa: E402
import bench_summary  # noqa: E402
import head_memory  # noqa: E402
from bench_common import HEAD_MEMORY_TARGET, QUICK, TINY, Sizes, load_fused  # noqa: E402
from bench_lm import bench_lm, bench_lm_memory  # noqa: E402
from bench_memory_methods import bench_memory_methods  # noqa: E402
from bench_ops import bench_ops  # noqa: E402
from bench_plot import write_plot  # noqa: E402
from bench_step import bench_step  # noqa: E402
from noprop_fast.config import OneLineArgumentParser  # noqa: E402
from noprop_fast.errors import UserError, cli_main  # noqa: E402
from noprop_fast.ops import PRECISIONS  # noqa: E402

SECTIONS = ("step", "lm", "ops", "memory", "methods-memory", "lm-memory")
# step and lm: (rounds, steps per round, warm-up steps) when not given; a CPU image step at batch
# 128 takes seconds. Two warm-up steps at --quick, so that the one-off (compile) time is reported.
STEP_DEFAULTS = {"cpu": (3, 3, 2), "cuda": (5, 20, 5), "quick": (1, 1, 2), "tiny": (1, 1, 1)}


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
        result["meets_target"] = result["fused/reference"] <= HEAD_MEMORY_TARGET
        result["target_applies"] = shape.classes == Sizes().memory_head.classes  # not at --quick sizes
    return result


# ------------------------------------------------------------------------------------------------
# The command line

def parse_args(argv):
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of "
                   f"{','.join(SECTIONS)} [default all]")
    p.add_argument("--rounds", type=int, help="step, lm: rounds [default cpu 3, cuda 5]")
    p.add_argument("--steps-per-round", type=int, help="step, lm: steps per path per round "
                   "[default cpu 3, cuda 20]")
    p.add_argument("--warmup", type=int, help="step, lm: warm-up steps per path "
                   "[default cpu 2, cuda 5]")
    p.add_argument("--precision", default="fp32", choices=tuple(PRECISIONS),
                   help="the blocks' and ops' dtype [default fp32]")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when present, else cpu")
    p.add_argument("--out", help="folder for report.md, results.json and bench.png [default "
                   "runs/bench-<device>-<time>[-<precision>] in the checkout, which git ignores]")
    p.add_argument("--threads", metavar="N", type=threads.check_count,
                   help="intra-op threads on a CPU [default one per core, or OMP_NUM_THREADS]")
    p.add_argument("--no-compile", action="store_true",
                   help="step, lm: leave out the torch.compile path")
    p.add_argument("--min-run-time", type=float,
                   help="ops on CPU: seconds per measurement [default 0.5]")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="1 round x 1 step; the image step and "
                      "memory at the MNIST config, a small language model, tiny ops and heads")
    size.add_argument("--tiny", action="store_true", help="1 round x 1 step, T = 2 and the "
                      "smallest shapes everywhere (the smoke test; its figures say nothing)")
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


def default_out(device: torch.device, precision: str, stamp: str) -> Path:
    """runs/bench-<device>-<stamp>[-<precision>]: outside the tracked tree (runs/ is ignored), so a
    benchmark leaves the checkout clean; recorded results are copied to profiling/results/ by hand."""
    kind = "cpu" if device.type == "cpu" else \
        re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    suffix = "" if precision == "fp32" else f"-{precision}"
    return HERE.parent / "runs" / f"bench-{kind}-{stamp}{suffix}"


def run(argv=None) -> dict:
    run_start = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    thread_note = threads.apply(args.threads)
    device = resolve_device(args.device)
    size = "tiny" if args.tiny else "quick" if args.quick else None
    sizes = {"tiny": TINY, "quick": QUICK, None: Sizes()}[size]
    if args.min_run_time is not None:
        sizes = dataclasses.replace(sizes, min_run_time=args.min_run_time)
    now = datetime.datetime.now()
    out = Path(args.out) if args.out else default_out(device, args.precision,
                                                      now.strftime("%Y%m%d-%H%M%S"))
    if {"step", "lm", "ops"} & set(args.sections):
        ops, ops_status, load_seconds = load_fused(device)
    else:  # the other sections run the reference path only
        ops, ops_status, load_seconds = None, "not loaded (no section here uses them)", 0.0
    header = bench_report.device_header(device)
    header.update(precision=args.precision, date=now.strftime("%Y-%m-%d %H:%M:%S"),
                  command=shlex.join(["python", "profiling/bench.py", *argv]),
                  fused_ops=bench_report.OPS_NAMES[ops.name] if ops is not None else ops_status,
                  fused_load_seconds=load_seconds, sections=args.sections,
                  op_repeats=sizes.op_repeats, load_average_start=os.getloadavg()[0],
                  thread_rule=thread_note)
    results = {"header": header}
    print(f"device: {header['device_name']}"
          f"{f' ({thread_note})' if device.type == 'cpu' else ''}, fused ops: "
          f"{header['fused_ops']}; report into {out}", file=sys.stderr, flush=True)
    rounds, steps, warmup = STEP_DEFAULTS[size or device.type]
    rounds = args.rounds or rounds
    steps = args.steps_per_round or steps
    warmup = warmup if args.warmup is None else args.warmup
    section_seconds = header["section_seconds"] = {}
    skip_compile = "--no-compile" if args.no_compile else ""
    sections = {
        "step": (f"step: {warmup} warm-up + {rounds} x {steps} steps per path",
                 lambda: bench_step(sizes, device, args.precision, rounds, steps, warmup,
                                    skip_compile, ops, ops_status)),
        "lm": (f"lm: {warmup} warm-up + {rounds} x {steps} steps per path",
               lambda: bench_lm(sizes, device, args.precision, rounds, steps, warmup, skip_compile,
                                ops, ops_status)),
        "ops": ("ops", lambda: bench_ops(sizes, device, args.precision, ops, ops_status)),
        "memory": ("memory", lambda: bench_memory(sizes, device)),
        "methods-memory": ("methods-memory", lambda: bench_memory_methods(sizes, device)),
        "lm-memory": ("lm-memory", lambda: bench_lm_memory(sizes, device)),
    }
    for name, (note, section_fn) in sections.items():
        if name not in args.sections:
            continue
        print(f"{note}...", file=sys.stderr, flush=True)
        section_start = time.perf_counter()
        results[name] = section_fn()
        section_seconds[name] = time.perf_counter() - section_start
    header["load_average_end"] = os.getloadavg()[0]
    out.mkdir(parents=True, exist_ok=True)
    try:
        plot = write_plot(results, out)
        header["plot"] = plot.name if plot is not None else "none (no section here has a figure)"
    except ImportError as err:  # matplotlib missing: the tables still come out
        header["plot"] = f"not written: {err}"
    header["seconds"] = time.perf_counter() - run_start
    bench_report.write(results, out)
    print(bench_summary.summary(results))
    print(f"\nthe full report (every path, shape and method): {out / 'report.md'}; figures in "
          f"results.json, plot {header['plot']}")
    return results


def main(argv=None) -> int:
    return cli_main(run, argv, "no report written")


if __name__ == "__main__":
    sys.exit(main())
