"""The fused path against the reference, in one run, on whatever device is present.

    python profiling/benchmark.py                          # all sections; cuda if present, else cpu
    python profiling/benchmark.py --precision bf16 --sections step,ops
    python profiling/benchmark.py --quick --out /tmp/b     # tiny sizes: the smoke test's run

Three sections (see profiling/README.md for what each figure means):

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
          median. On GPU also GB/s or TFLOP/s from the formulas in `op_cases`.
  memory  the head's peak memory at m = 50257, fp32, forward + backward (`head_memory.py`).

The data are synthetic MNIST-shaped tensors (nothing is downloaded): a step's time does not depend
on pixel values. Every figure goes to results.json; report.md holds the tables with the device,
versions, dtype, shapes and the command line. Numbers from a machine without a GPU are CPU numbers.
"""
import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repository: run from a checkout without installing
sys.path.insert(0, str(HERE))         # head_memory, this script's worker

import head_memory  # noqa: E402
from head_memory import HeadShape  # noqa: E402
from noprop_fast.config import ImageConfig, OneLineArgumentParser  # noqa: E402
from noprop_fast.data.image import ImageData  # noqa: E402
from noprop_fast.errors import UserError, cli_main  # noqa: E402
from noprop_fast.fused import PRECISIONS, PhiloxNoise, fused_ops  # noqa: E402
from noprop_fast.layers import ALL_BLOCKS, BlockLinear  # noqa: E402
from noprop_fast.methods import noprop_loss  # noqa: E402
from noprop_fast.optim import make_optimizer  # noqa: E402
from noprop_fast.schedule import NoiseSchedule  # noqa: E402
from noprop_fast.trainer import build_model, train_step  # noqa: E402

SECTIONS = ("step", "ops", "memory")
PATHS = ("reference", "fused", "compiled")
H100_PEAK_BYTES = 3.35e12                       # B/s, HBM3 (SXM)
H100_PEAK_FLOPS = {"bf16": 989e12, "fp16": 989e12,  # dense tensor cores (SXM)
                   "fp32": 67e12}                   # fp32 FMA units: the kernels use IEEE fp32
ACCEPT_MEMORY_RATIO = 0.25                      # the bar: fused peak <= 0.25 x reference peak
OPS_NAMES = {"cpp": "C++ ops (noprop_fast.cpu_ops)", "triton": "Triton kernels (noprop_fast.kernels)"}


@dataclass
class Sizes:
    """Everything a run's size depends on; `--quick` swaps in tiny values."""
    batch: int = 128            # images per step (and N of the MNIST-shaped ops)
    num_blocks: int = 10        # T
    num_classes: int = 10       # m, MNIST
    image_shape: tuple = (1, 28, 28)
    lm_head: HeadShape = field(default_factory=lambda: HeadShape(1, 1024, 128, 50257, 256))
    memory_head: HeadShape = field(default_factory=lambda: HeadShape(1, 1024, 128, 50257, 256))
    min_run_time: float = 0.5   # CPU: seconds per blocked_autorange measurement
    op_repeats: int = 3         # measurements per op and path, reference and fused in turn


QUICK = Sizes(batch=8, num_blocks=2, lm_head=HeadShape(1, 32, 32, 500, 16),
              memory_head=HeadShape(1, 64, 32, 2000, 32), min_run_time=0.01, op_repeats=1)
# (rounds, steps per round, warm-up steps) when not given: a CPU step at batch 128 takes seconds
STEP_DEFAULTS = {"cpu": (3, 3, 2), "cuda": (5, 20, 5), "quick": (1, 1, 1)}


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 200 else text[:197] + "..."


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_fused(device: torch.device):
    """(FusedOps, "", load seconds) or (None, "unavailable: <reason>", seconds)."""
    from noprop_fast.cpu_ops import FusedOpsUnavailable
    start = time.perf_counter()
    try:
        ops = fused_ops(device)
        return ops, "", time.perf_counter() - start
    except (FusedOpsUnavailable, ImportError) as err:
        return None, f"unavailable: {' '.join(str(err).split())}", time.perf_counter() - start


def mnist_model(sizes: Sizes, device: torch.device):
    """The MNIST config's model on synthetic data of MNIST's shape."""
    cfg = ImageConfig(dataset="mnist", method="noprop", embedding="onehot",
                      num_blocks=sizes.num_blocks, batch_size=sizes.batch)
    x = torch.randn(sizes.batch, *sizes.image_shape)
    y = torch.arange(sizes.batch) % sizes.num_classes
    data = ImageData("mnist-shaped", x, y, x[:2], y[:2], sizes.num_classes, "synthetic (benchmark)")
    return cfg, build_model(cfg, data, device), x.to(device), y.to(device)


# ------------------------------------------------------------------------------------------------
# 1. The training step

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


# ------------------------------------------------------------------------------------------------
# 2. Each op against its reference

@dataclass
class OpCase:
    op: str
    shape: str
    reference: object   # (**inputs) -> tensor
    fused: object       # (**inputs) -> tensor, or None
    inputs: dict        # the tensors: those requiring grad get gradients in forward+backward
    unit: str           # "bytes" (memory-bound) or "flops"
    work: dict          # pass -> bytes or flops, the formula in `formula`
    formula: str


def op_cases(sizes: Sizes, device: torch.device, dtype: torch.dtype, ops) -> list[OpCase]:
    """The ops at the MNIST step's shapes (and the head at the language-model shape)."""
    from noprop_fast.kernels.block_linear import block_linear_ref
    from noprop_fast.kernels.block_loss import block_loss_ref
    from noprop_fast.kernels.noise import noise_injection_ref
    from noprop_fast.kernels.softmax_head import softmax_head_ref

    es = torch.empty((), dtype=dtype).element_size()
    T, N, m = sizes.num_blocks, sizes.batch, sizes.num_classes
    d = m  # one-hot: d = m

    def rand(*size, grad=True, scale=1.0, kind=dtype):
        return (torch.randn(size, device=device) * scale).to(kind).requires_grad_(grad)

    cases = []
    # noise: the reference draws eps with torch.randn, as the reference step does
    noise = PhiloxNoise(0, device)
    a, s = torch.rand(T, device=device), torch.rand(T, device=device)
    fwd = es * (T * N * d + N * d) + 8 * N
    cases.append(OpCase(
        "noise_injection", f"B={T} N={N} d={d} m={m}",
        lambda y, W: noise_injection_ref(y, W, a, s, torch.randn(T, N, d, device=device)),
        ops and (lambda y, W: ops.noise_injection(y, W, a, s, noise.seed, noise.offset)),
        {"y": torch.arange(N, device=device) % m, "W": rand(m, d)}, "bytes",
        {"forward": fwd, "forward+backward": fwd + es * (T * N * d + m * d) + 8 * N},
        "fwd: es(BNd + Nd) + 8N (read W[y], labels; write z); bwd: es(BNd + md) + 8N"))
    w = torch.rand(T, device=device)
    fwd = es * (T * N * d + N * d)
    cases.append(OpCase(
        "block_loss", f"u_hat [{T},{N},{d}]",
        lambda u_hat, u: block_loss_ref(u_hat, u, w),
        ops and (lambda u_hat, u: ops.block_loss(u_hat, u, w)),
        {"u_hat": rand(T, N, d), "u": rand(N, d)}, "bytes",
        {"forward": fwd, "forward+backward": 3 * fwd},
        "fwd: es(BNd + Nd) (read u_hat, u); bwd: 2 es(BNd + Nd) (read both, write both grads)"))
    # block_linear at every shape a block FC has in the model (the last FC is the head's keys)
    _, model, _, _ = mnist_model(sizes, torch.device("cpu"))
    layers = {}
    for name, layer in model.blocks.named_modules():
        if isinstance(layer, BlockLinear) and name != "head":
            layers.setdefault((layer.in_features, layer.out_features), []).append(name)
    for (k_in, k_out), names in layers.items():
        flops = 2 * T * N * k_in * k_out
        cases.append(OpCase(
            "block_linear", f"[{T},{N},{k_in}]->{k_out} ({', '.join(names)})",
            lambda x, weight, bias: block_linear_ref(x, weight, bias),
            ops and (lambda x, weight, bias: ops.block_linear(x, weight, bias, "none")),
            {"x": rand(T, N, k_in), "weight": rand(T, k_out, k_in, scale=k_in ** -0.5),
             "bias": rand(T, k_out)}, "flops", {"forward": flops, "forward+backward": 3 * flops},
            "fwd: 2 B N K M_out; bwd: 2x fwd (dX and dW)"))
    D = model.blocks.head.in_features
    heads = [HeadShape(T, N, D, m, d), sizes.lm_head]
    for hs in heads:
        flops = 2 * hs.blocks * hs.rows * hs.classes * (hs.dim + hs.embed)
        inputs = {key: t.to(dtype).detach().requires_grad_(key != "grad_o")
                  for key, t in head_memory.head_inputs(hs, device).items() if key != "grad_o"}
        cases.append(OpCase(
            "softmax_head", f"h [{hs.blocks},{hs.rows},{hs.dim}] k [{hs.blocks},{hs.classes},{hs.dim}] "
            f"v [{hs.classes},{hs.embed}]", softmax_head_ref, ops and ops.softmax_head, inputs,
            "flops", {"forward": flops, "forward+backward": 3 * flops},
            "fwd: 2 B N m (D + d); bwd: 2x fwd (dP, dH, dK, dV; the fused kernels' recomputation "
            "of the logits not counted)"))
    return cases


def time_ms(fn, device: torch.device, min_run_time: float) -> float:
    """Median milliseconds of fn(): triton's do_bench on GPU, blocked_autorange on CPU."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    from torch.utils.benchmark import Timer
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def pass_fn(op, inputs: dict, backward: bool):
    """A closure for one pass: op forward (grad mode on, as in training), or forward + backward
    through torch.autograd.grad (nothing accumulates in .grad between calls)."""
    needs = [t for t in inputs.values() if t.requires_grad]
    if not backward:
        return lambda: op(**inputs)
    grad_out = torch.randn_like(op(**inputs))

    def forward_backward():
        return torch.autograd.grad(op(**inputs), needs, grad_out)
    return forward_backward


def bench_ops(sizes: Sizes, device: torch.device, precision: str, ops, ops_status: str) -> list:
    """Reference and fused measured in turn, `sizes.op_repeats` times each (drift hits both alike);
    each figure is the median of its repeats, all of them kept in results.json."""
    rows = []
    peak_flops = H100_PEAK_FLOPS[precision]
    for case in op_cases(sizes, device, PRECISIONS[precision], ops):
        for mode in ("forward", "forward+backward"):
            row = {"op": case.op, "shape": case.shape, "pass": mode, "unit": case.unit,
                   "work": case.work[mode], "formula": case.formula,
                   "fused_status": ops_status or "ok", "reference_ms_all": [], "fused_ms_all": []}
            backward = mode != "forward"
            reference = pass_fn(case.reference, case.inputs, backward)
            fused = None
            if case.fused is not None:
                try:
                    fused = pass_fn(case.fused, case.inputs, backward)
                except Exception as err:  # one op's failure is a figure, not the end of the run
                    row["fused_status"] = f"failed: {one_line(err)}"
            for _ in range(sizes.op_repeats):
                row["reference_ms_all"].append(time_ms(reference, device, sizes.min_run_time))
                if fused is not None:
                    row["fused_ms_all"].append(time_ms(fused, device, sizes.min_run_time))
            row["reference_ms"] = statistics.median(row["reference_ms_all"])
            row["fused_ms"] = statistics.median(row["fused_ms_all"]) if fused is not None else None
            if fused is not None:
                row["fused/reference"] = row["fused_ms"] / row["reference_ms"]
            if device.type == "cuda":
                for path in ("reference", "fused"):
                    if row[f"{path}_ms"] is not None:
                        rate = case.work[mode] / (row[f"{path}_ms"] * 1e-3)
                        peak = H100_PEAK_BYTES if case.unit == "bytes" else peak_flops
                        row[f"{path}_throughput"] = rate
                        row[f"{path}_of_h100_peak"] = rate / peak
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------
# 3. The head's peak memory

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
# The report

def device_header(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                      .splitlines() if line.startswith("model name")), platform.processor())
        name = f"{model}, {os.cpu_count()} cores"
    return {"device_type": device.type, "device_name": name, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version()}


def fmt(value, spec=".3g", none="-"):
    if value is None:
        return none
    return format(value, spec)


def mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f}"


def short_status(status: str, header: dict) -> str:
    """The fused ops' load failure is printed once, in the header; the tables point to it."""
    return "unavailable (see fused ops above)" if status == header["fused_ops"] else status


def render(results: dict) -> str:
    head, cpu = results["header"], results["header"]["device_type"] == "cpu"
    kind = "CPU numbers (no GPU in this run)" if cpu else "GPU numbers"
    out = [f"# Fused path against the reference: {kind}", "",
           "| | |", "|---|---|",
           f"| device | {head['device_name']}{' (CPU)' if cpu else ''} |",
           f"| threads | torch.get_num_threads() = {head['threads']} |",
           f"| torch / triton / python | {head['torch']} / {head['triton']} / {head['python']} |",
           f"| fused ops | {head['fused_ops']} (loaded in {head['fused_load_seconds']:.2f} s) |",
           f"| load average (1 min) at start / end | {head['load_average_start']:.2f} / "
           f"{head['load_average_end']:.2f} (other work on the machine disturbs the figures) |",
           f"| dtype | {head['precision']} (memory section: fp32) |",
           f"| date | {head['date']} |",
           f"| command | `{head['command']}` |", ""]
    if "step" in results:
        step = results["step"]
        c = step["config"]
        out += [f"## Training step{' (CPU numbers)' if cpu else ''}", "",
                f"MNIST config on synthetic data: image {'x'.join(map(str, c['image_shape']))}, "
                f"m = {c['num_classes']}, one-hot, batch {c['batch']}, T = {c['num_blocks']}, NoProp, "
                f"all blocks per step, {c['precision']}. Per path: {c['warmup_steps']} warm-up "
                f"step(s), then {c['rounds']} round(s) of {c['steps_per_round']} step(s), the paths "
                "in turn within each round.", "",
                "| path | median images/s | min..max images/s | vs reference | first warm-up step (s) "
                "| of which one-off (s) | last loss | status |", "|---|---|---|---|---|---|---|---|"]
        for name, p in step["paths"].items():
            ratio = step["ratios"].get(f"{name}/reference", 1.0 if name == "reference" else None)
            if "median" in p:
                out.append(f"| {name} | {p['median']:.1f} | {p['min']:.1f}..{p['max']:.1f} | "
                           f"{fmt(ratio, '.3f')} | {fmt(p['first_step_seconds'], '.2f')} | "
                           f"{fmt(p['one_off_seconds'], '.2f')} | {p['last_loss']:.4f} | "
                           f"{p['status']} |")
            else:
                out.append(f"| {name} | - | - | - | - | - | - | {short_status(p['status'], head)} |")
        out += ["", "The compiled path's first warm-up step includes torch.compile's compilation of "
                "the forward and backward graphs, with Inductor's caches off (a cold compile); the "
                "fused path's, on GPU, Triton's compilation and autotuning. One-off: the first "
                "step's time minus the median of the later warm-up steps.", ""]
    if "ops" in results:
        gpu_cols = "" if cpu else " ref throughput | fused throughput | fused % of H100 peak |"
        out += [f"## Ops against their references (ms, median){' (CPU numbers)' if cpu else ''}", "",
                f"dtype {head['precision']}. "
                + ("CPU: torch.utils.benchmark blocked_autorange, median." if cpu else
                   "GPU: triton.testing.do_bench, median. Throughput: GB/s for noise_injection and "
                   "block_loss, TFLOP/s for block_linear and softmax_head, from the formulas below; "
                   f"H100 SXM peaks: 3.35 TB/s, {H100_PEAK_FLOPS[head['precision']] / 1e12:.0f} "
                   f"TFLOP/s ({head['precision']}).")
                + f" Each figure is the median of {head['op_repeats']} measurements, each taken in "
                "turn with the other path's.", "",
                f"| op | shape | pass | reference ms | fused ms | fused/ref |{gpu_cols} status |",
                "|---|---|---|---|---|---|" + ("---|---|---|" if not cpu else "") + "---|"]
        for r in results["ops"]:
            line = (f"| {r['op']} | {r['shape']} | {r['pass']} | {r['reference_ms']:.4g} | "
                    f"{fmt(r['fused_ms'], '.4g')} | {fmt(r.get('fused/reference'), '.2f')} |")
            if not cpu:
                scale, unit = (1e9, "GB/s") if r["unit"] == "bytes" else (1e12, "TFLOP/s")
                for path in ("reference", "fused"):
                    rate = r.get(f"{path}_throughput")
                    line += " - |" if rate is None else f" {rate / scale:.3g} {unit} |"
                line += f" {fmt(r.get('fused_of_h100_peak') and 100 * r['fused_of_h100_peak'], '.2g')} |"
            out.append(line + f" {short_status(r['fused_status'], head)} |")
        formulas = {r["op"]: r["formula"] for r in results["ops"]}
        out += ["", "Work counted (es = bytes per element; B blocks, N rows, d embedding, m classes, "
                "K / M_out a linear's in / out, D the head's input width):", ""]
        out += [f"- {op}: {text}" for op, text in formulas.items()] + [""]
    if "memory" in results:
        mem = results["memory"]
        s = mem["shape"]
        out += [f"## Head peak memory, forward + backward (MiB){' (CPU numbers)' if cpu else ''}", "",
                f"softmax(h k^T + c) v with B = {s['blocks']}, N = {s['rows']}, D = {s['dim']}, "
                f"m = {s['classes']}, d = {s['embed']}, fp32; everything allocated beyond the inputs, "
                f"gradients included. Method: {mem['method']}. One fp32 [B, N, m] logits tensor is "
                f"{mib(mem['logits_bytes'])} MiB.", "",
                "| variant | peak MiB | largest single tensor MiB (op) | status |", "|---|---|---|---|"]
        for variant in head_memory.VARIANTS:
            r = mem[variant]
            if r.get("status") == "ok":
                out.append(f"| {variant} | {mib(r['peak_bytes'])} | {mib(r['largest_tensor_bytes'])} "
                           f"({r['largest_tensor_op']}) | ok |")
            else:
                out.append(f"| {variant} | - | - | {short_status(r.get('status'), head)} |")
        if "fused/reference" in mem:
            verdict = "meets" if mem["meets_bar"] else "misses"
            note = "" if mem["bar_applies"] else " (the bar is set for m = 50257, not this shape)"
            out += ["", f"fused / reference = {mem['fused/reference']:.3f}: {verdict} the bar "
                    f"(<= {ACCEPT_MEMORY_RATIO}){note}."]
        out.append("")
    return "\n".join(out)


def finite(obj):
    """NaN and infinities become None, so results.json is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------------
# The command line

def parse_args(argv):
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of "
                   f"{','.join(SECTIONS)} [default all]")
    p.add_argument("--rounds", type=int, help="step: rounds [default cpu 3, cuda 5]")
    p.add_argument("--steps-per-round", type=int, help="step: steps per path per round "
                   "[default cpu 3, cuda 20]")
    p.add_argument("--warmup", type=int, help="step: warm-up steps per path [default cpu 2, cuda 5]")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = resolve_device(args.device)
    sizes = QUICK if args.quick else Sizes()
    if args.min_run_time is not None:
        sizes = dataclasses.replace(sizes, min_run_time=args.min_run_time)
    now = datetime.datetime.now()
    out = Path(args.out) if args.out else default_out(device, args.precision, now.strftime("%Y-%m-%d"))
    ops, ops_status, load_seconds = load_fused(device)
    header = device_header(device)
    header.update(precision=args.precision, date=now.strftime("%Y-%m-%d %H:%M:%S"),
                  command=shlex.join(["python", "profiling/benchmark.py", *argv]),
                  fused_ops=OPS_NAMES[ops.name] if ops is not None else ops_status,
                  fused_load_seconds=load_seconds, sections=args.sections,
                  op_repeats=sizes.op_repeats, load_average_start=os.getloadavg()[0])
    results = {"header": header}
    print(f"device: {header['device_name']}, {header['threads']} threads, fused ops: "
          f"{header['fused_ops']}", file=sys.stderr, flush=True)
    if "step" in args.sections:
        rounds, steps, warmup = STEP_DEFAULTS["quick" if args.quick else device.type]
        rounds = args.rounds or rounds
        steps = args.steps_per_round or steps
        warmup = warmup if args.warmup is None else args.warmup
        print(f"step: {warmup} warm-up + {rounds} x {steps} steps per path...", file=sys.stderr,
              flush=True)
        results["step"] = bench_step(sizes, device, args.precision, rounds, steps, warmup,
                                     "--quick" if args.quick else "--no-compile" if args.no_compile
                                     else "", ops, ops_status)
    if "ops" in args.sections:
        print("ops...", file=sys.stderr, flush=True)
        results["ops"] = bench_ops(sizes, device, args.precision, ops, ops_status)
    if "memory" in args.sections:
        print("memory...", file=sys.stderr, flush=True)
        results["memory"] = bench_memory(sizes, device)
    header["load_average_end"] = os.getloadavg()[0]
    report = render(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps(finite(results), indent=1, allow_nan=False) + "\n")
    print(report)
    print(f"written: {out / 'report.md'}, {out / 'results.json'}", file=sys.stderr)
    return results


def main(argv=None) -> int:
    return cli_main(run, argv, "no report written")


if __name__ == "__main__":
    sys.exit(main())
