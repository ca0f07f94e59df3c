"""The report of profiling/bench.py: the header (device, versions, load, command), report.md's
tables, one per section, and results.json. See profiling/README.md for what each figure means.
"""
import json
import math
import os
import platform
from pathlib import Path

import torch

import head_memory
from bench_common import ACCEPT_MEMORY_RATIO, H100_PEAK_FLOPS
from bench_memory_methods import VARIANTS as MEMORY_VARIANTS

OPS_NAMES = {"cpp": "C++ ops (noprop_fast.cpu_ops)", "triton": "Triton kernels (noprop_fast.kernels)"}


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


def section(name: str, cpu: bool, prose: str, columns: list[str]) -> list[str]:
    """A section's title, its prose and its table's header."""
    return [f"## {name}{' (CPU numbers)' if cpu else ''}", "", prose, "",
            "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def render_header(head: dict, cpu: bool) -> list[str]:
    kind = "CPU numbers (no GPU in this run)" if cpu else "GPU numbers"
    seconds = ", ".join(f"{name} {t:.0f} s" for name, t in head.get("section_seconds", {}).items())
    loaded = "" if head["fused_ops"].startswith("not loaded") else \
        f" (loaded in {head['fused_load_seconds']:.2f} s)"
    return [f"# profiling/bench.py: {kind}", "",
            "| | |", "|---|---|",
            f"| device | {head['device_name']}{' (CPU)' if cpu else ''} |",
            f"| threads | torch.get_num_threads() = {head['threads']} |",
            f"| torch / triton / python | {head['torch']} / {head['triton']} / {head['python']} |",
            f"| fused ops | {head['fused_ops']}{loaded} |",
            f"| load average (1 min) at start / end | {head['load_average_start']:.2f} / "
            f"{head['load_average_end']:.2f} (other work on the machine disturbs the figures) |",
            f"| dtype | {head['precision']} (memory section: fp32) |",
            f"| date | {head['date']} |",
            f"| command | `{head['command']}` |",
            f"| run time | {head['seconds']:.0f} s in all ({seconds}) |", ""]


def render_step(step: dict, head: dict, cpu: bool) -> list[str]:
    c = step["config"]
    out = section("Training step", cpu,
                  f"MNIST config on synthetic data: image {'x'.join(map(str, c['image_shape']))}, "
                  f"m = {c['num_classes']}, one-hot, batch {c['batch']}, T = {c['num_blocks']}, "
                  f"NoProp, all blocks per step, {c['precision']}. Per path: {c['warmup_steps']} "
                  f"warm-up step(s), then {c['rounds']} round(s) of {c['steps_per_round']} step(s), "
                  "the paths in turn within each round.",
                  ["path", "median images/s", "min..max images/s", "vs reference",
                   "first warm-up step (s)", "of which one-off (s)", "last loss", "status"])
    for name, p in step["paths"].items():
        ratio = step["ratios"].get(f"{name}/reference", 1.0 if name == "reference" else None)
        if "median" in p:
            out.append(f"| {name} | {p['median']:.1f} | {p['min']:.1f}..{p['max']:.1f} | "
                       f"{fmt(ratio, '.3f')} | {fmt(p['first_step_seconds'], '.2f')} | "
                       f"{fmt(p['one_off_seconds'], '.2f')} | {p['last_loss']:.4f} | "
                       f"{p['status']} |")
        else:
            out.append(f"| {name} | - | - | - | - | - | - | {short_status(p['status'], head)} |")
    return out + ["", "The compiled path's first warm-up step includes torch.compile's compilation "
                  "of the forward and backward graphs, with Inductor's caches off (a cold compile); "
                  "the fused path's, on GPU, Triton's compilation and autotuning. One-off: the first "
                  "step's time minus the median of the later warm-up steps.", ""]


def render_ops(rows: list, head: dict, cpu: bool) -> list[str]:
    gpu_cols = [] if cpu else ["ref throughput", "fused throughput", "fused % of H100 peak"]
    out = section("Ops against their references (ms, median)", cpu,
                  f"dtype {head['precision']}. "
                  + ("CPU: torch.utils.benchmark blocked_autorange, median." if cpu else
                     "GPU: triton.testing.do_bench, median. Throughput: GB/s for noise_injection "
                     "and block_loss, TFLOP/s for block_linear and softmax_head, from the formulas "
                     f"below; H100 SXM peaks: 3.35 TB/s, "
                     f"{H100_PEAK_FLOPS[head['precision']] / 1e12:.0f} TFLOP/s "
                     f"({head['precision']}).")
                  + f" Each figure is the median of {head['op_repeats']} measurements, each taken "
                  "in turn with the other path's.\n\n"
                  "block_linear and softmax_head are called as the model calls them, on both paths "
                  "alike: the weight and bias (the head's k and c) are `block_slice(p, ALL_BLOCKS)"
                  ".to(dtype)` of leaf fp32 nn.Parameters [T, out, in] / [T, out] ([T, m, D] / "
                  "[T, m]; all blocks: the parameter itself) taken inside the timed call, and x (h, v) are leaves requiring grad; forward + "
                  "backward is `.backward()` into `.grad`, every leaf's `.grad` set to None before "
                  "each call, as the optimiser's zero_grad(set_to_none=True) does on every step. "
                  "noise_injection and block_loss take their inputs as leaves, differentiated with "
                  "torch.autograd.grad.",
                  ["op", "shape", "pass", "reference ms", "fused ms", "fused/ref", *gpu_cols,
                   "status"])
    for r in rows:
        line = (f"| {r['op']} | {r['shape']} | {r['pass']} | {r['reference_ms']:.4g} | "
                f"{fmt(r['fused_ms'], '.4g')} | {fmt(r.get('fused/reference'), '.2f')} |")
        if not cpu:
            scale, unit = (1e9, "GB/s") if r["unit"] == "bytes" else (1e12, "TFLOP/s")
            for path in ("reference", "fused"):
                rate = r.get(f"{path}_throughput")
                line += " - |" if rate is None else f" {rate / scale:.3g} {unit} |"
            line += f" {fmt(r.get('fused_of_h100_peak') and 100 * r['fused_of_h100_peak'], '.2g')} |"
        out.append(line + f" {short_status(r['fused_status'], head)} |")
    formulas = {r["op"]: r["formula"] for r in rows}
    out += ["", "Work counted (es = bytes per element; B blocks, N rows, d embedding, m classes, "
            "K / M_out a linear's in / out, D the head's input width):", ""]
    return out + [f"- {op}: {text}" for op, text in formulas.items()] + [""]


def render_memory(mem: dict, head: dict, cpu: bool) -> list[str]:
    s = mem["shape"]
    out = section("Head peak memory, forward + backward (MiB)", cpu,
                  f"softmax(h k^T + c) v with B = {s['blocks']}, N = {s['rows']}, D = {s['dim']}, "
                  f"m = {s['classes']}, d = {s['embed']}, fp32; everything allocated beyond the "
                  f"inputs, gradients included. Method: {mem['method']}. One fp32 [B, N, m] logits "
                  f"tensor is {mib(mem['logits_bytes'])} MiB.",
                  ["variant", "peak MiB", "largest single tensor MiB (op)", "status"])
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
    return out + [""]


def mnist_shape(c: dict) -> str:
    return (f"MNIST config on synthetic data: image {'x'.join(map(str, c['image_shape']))}, "
            f"m = {c['num_classes']}, one-hot, batch {c['batch']}, T = {c['num_blocks']}, fp32")


def render_loop(loop: dict, cpu: bool) -> list[str]:
    c = loop["config"]
    out = section("Batched step against T separate modules in a loop", cpu,
                  f"{mnist_shape(c)}, NoProp, every block on every batch. batched: `train_step` "
                  "on the batched model (stacked parameters, one forward and backward, one "
                  "BlockAdamW step). loop: T `DTBlock`s from `separate_blocks_from` (same "
                  "weights), each with its own torch.optim.AdamW; per batch, block by block: "
                  "noisy input, forward, weighted loss, backward, optimiser step; then the "
                  "classifier's CE with "
                  f"the shared AdamW. Per path: {c['warmup_steps']} warm-up step(s), then "
                  f"{c['rounds']} round(s) of {c['steps_per_round']} step(s), the paths in turn. "
                  "The --precision option does not apply: both run fp32.",
                  ["path", "median images/s", "min..max images/s", "warm-up steps (s)"])
    for name, p in loop["paths"].items():
        warm = ", ".join(f"{t:.2f}" for t in p["warmup_seconds"])
        out.append(f"| {name} | {p['median']:.1f} | {p['min']:.1f}..{p['max']:.1f} | {warm} |")
    return out + ["", f"batched / loop = {loop['batched/loop']:.2f} (median images/s).", ""]


def render_methods_memory(mem: dict, cpu: bool) -> list[str]:
    c, paper = mem["config"], mem["paper_table2_gb"]
    out = section("Activation memory per method, one training step (MiB)", cpu,
                  f"{mnist_shape(c)}. Method: {mem['method']}. noprop-sequential: one block per "
                  "step (blocks = slice(t, t + 1)), the largest over t. The paper's Table 2 (GPU "
                  "GB, one-hot, MNIST) counts all GPU memory, weights and optimiser state "
                  "included; these figures count activations only (weights and optimiser state "
                  "are the same for every variant), so the ratios are not the paper's ratios. The "
                  "paper does not say which of our two NoProp rows its NoProp-DT figure "
                  "corresponds to, so it stands beside both.",
                  ["variant", "saved for backward MiB", "/ backprop", "paper Table 2 GB",
                   "paper / backprop"])
    noprop_dt = (paper["noprop-dt"], paper["noprop-dt/backprop"])
    paper_of = {"noprop-all": noprop_dt, "noprop-sequential": noprop_dt,
                "backprop": (paper["backprop"], 1.0)}
    for name in MEMORY_VARIANTS:
        gb, ratio = paper_of[name]
        out.append(f"| {name} | {mib(mem['bytes'][name])} | "
                   f"{mem['ratios'][f'{name}/backprop']:.3f} | {gb:.2f} | {ratio:.2f} |")
    per_block = ", ".join(mib(b) for b in mem["sequential_per_block_bytes"])
    verdict = "yes" if mem["meets_bar"] else "no"
    note = "" if mem["bar_applies"] else " (the bar is set for T = 10, batch 128, not these sizes)"
    return out + ["", f"noprop-sequential per block t = 1..{c['num_blocks']} (MiB): {per_block}.",
                  "",
                  f"sequential / backprop = {mem['ratios']['noprop-sequential/backprop']:.3f} <= "
                  f"{mem['accept_sequential_ratio']} (issue acceptance): {verdict}{note}.", ""]


def render(results: dict) -> str:
    head = results["header"]
    cpu = head["device_type"] == "cpu"
    out = render_header(head, cpu)
    if "step" in results:
        out += render_step(results["step"], head, cpu)
    if "ops" in results:
        out += render_ops(results["ops"], head, cpu)
    if "memory" in results:
        out += render_memory(results["memory"], head, cpu)
    if "loop" in results:
        out += render_loop(results["loop"], cpu)
    if "methods-memory" in results:
        out += render_methods_memory(results["methods-memory"], cpu)
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


def write(results: dict, out: Path) -> str:
    """report.md and results.json into `out` (created); returns the report's text."""
    report = render(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report)
    (out / "results.json").write_text(json.dumps(finite(results), indent=1, allow_nan=False) + "\n")
    return report
