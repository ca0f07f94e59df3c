"""The report of profiling/bench.py: the header (device, versions, load, command), report.md's
tables, one per section, and results.json. See profiling/README.md for what each figure means.
"""
import json
import math
import os
import platform
import statistics
from pathlib import Path

import torch

import head_memory
from bench_common import H100_PEAK_FLOPS, HEAD_MEMORY_TARGET
from bench_memory_methods import VARIANTS as MEMORY_VARIANTS

OPS_NAMES = {"cpp": "C++ ops (noprop_fast.ops.cpp)", "triton": "Triton kernels (noprop_fast.kernels)"}


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
            f"| threads | {head.get('thread_rule', head['threads'])} |",
            f"| torch / triton / python | {head['torch']} / {head['triton']} / {head['python']} |",
            f"| fused ops | {head['fused_ops']}{loaded} |",
            f"| load average (1 min) at start / end | {head['load_average_start']:.2f} / "
            f"{head['load_average_end']:.2f} (other work on the machine disturbs the figures) |",
            f"| dtype | {head['precision']} (the memory sections and the loop rows: fp32) |",
            f"| date | {head['date']} |",
            f"| command | `{head['command']}` |",
            f"| run time | {head['seconds']:.0f} s in all ({seconds}) |",
            f"| plot | {head.get('plot', '-')} (throughput relative to the batched reference; "
            "memory ratios beside the paper's) |", ""]


PATH_LABELS = {"loop": "separate modules, loop", "reference": "batched reference",
               "fused": "fused", "graphs": "fused + CUDA graphs", "compiled": "torch.compile"}


def step_shape(result: dict) -> str:
    """The shapes of a throughput section's step, in words."""
    c = result["config"]
    if result["task"] == "image":
        return (f"MNIST config on synthetic data: image {'x'.join(map(str, c['image_shape']))}, "
                f"m = {c['num_classes']}, one-hot, batch {c['batch']}, T = {c['num_blocks']}, "
                f"NoProp, all blocks per step, {c['precision']}")
    return (f"NoProp-LM, {c['config']} shape: T = {c['num_blocks']}, {c['layers_per_block']} "
            f"layer(s) per block, D = {c['width']}, {c['heads']} heads, d = {c['embed_dim']}, "
            f"V = {c['vocab_size']}, batch {c['batch']} x L {c['seq_len']} = "
            f"{c['tokens_per_step']} tokens per step, learned W_embed, {c['precision']}, "
            f"{c['data']}")


def is_mnist_config(c: dict) -> bool:
    """The shapes at which the engine sets its target for the image step: MNIST, batch 128, T = 10."""
    return (list(c["image_shape"]), c["batch"], c["num_blocks"]) == ([1, 28, 28], 128, 10)


def render_throughput(result: dict, head: dict, cpu: bool) -> list[str]:
    """One task's table: every path's median throughput and its ratio to the batched reference."""
    c, unit = result["config"], result["unit"]
    title = ("Image task: training step throughput" if result["task"] == "image"
             else "Language task: training step throughput")
    out = section(title, cpu,
                  f"{step_shape(result)}. Per path: {c['warmup_steps']} warm-up step(s), then "
                  f"{c['rounds']} round(s) of {c['steps_per_round']} step(s), the paths in turn "
                  "within each round. vs reference: the ratio path / batched reference of each "
                  "round (both timed in that round), median and min..max over the rounds; higher "
                  "is faster.",
                  ["path", f"median {unit}", f"min..max {unit}", "vs reference",
                   "vs reference min..max", "first warm-up step (s)", "of which one-off (s)",
                   "last loss", "status"])
    for name, p in result["paths"].items():
        label = PATH_LABELS.get(name, name)
        if "median" in p:
            ratio_range = (f"{p['ratio_min']:.3f}..{p['ratio_max']:.3f}" if "ratio" in p else "-")
            out.append(f"| {label} | {p['median']:.1f} | {p['min']:.1f}..{p['max']:.1f} | "
                       f"{fmt(p.get('ratio'), '.3f')} | {ratio_range} | "
                       f"{fmt(p['first_step_seconds'], '.2f')} | "
                       f"{fmt(p['one_off_seconds'], '.2f')} | {p['last_loss']:.4f} | "
                       f"{p['status']} |")
        else:
            out.append(f"| {label} | - | - | - | - | - | - | - | "
                       f"{short_status(p['status'], head)} |")
    loop = result["paths"].get("loop", {})
    if "vs_reference" in loop:
        batched_over_loop = [1 / r for r in loop["vs_reference"]]  # reference / loop, per round
        median = statistics.median(batched_over_loop)
        summary = (f"batched reference / separate-modules loop = {median:.2f} (median over the "
                   f"rounds; {min(batched_over_loop):.2f}..{max(batched_over_loop):.2f})")
        summary += (f". The engine's target on a CPU at this config: above 1, the batched step "
                    f"faster than T separate modules: {'met' if median > 1 else 'not met'}."
                    if result["task"] == "image" and cpu and is_mnist_config(c) else ".")
    elif "median" in loop:
        summary = ("batched reference / separate-modules loop: no figure, the batched reference "
                   "was not measured (see its status).")
    else:
        summary = "batched reference / separate-modules loop: not measured (see the loop's status)."
    return out + ["", summary, "",
                  "loop: T separate single-block modules with the batched model's weights, each "
                  "with its own torch.optim.AdamW, block by block per batch (noisy input, forward, "
                  "weighted loss, backward, optimiser step), then the classifier's CE and the KL "
                  "with a shared AdamW; the same objective as the batched step (tested). Its last "
                  "loss is that whole objective. fused + CUDA graphs: the fused step captured once "
                  "(noprop_fast.graphs.CapturedStep) and replayed. torch.compile: "
                  "torch.compile of the loss function on the reference model, backward and "
                  "optimiser eager; its first warm-up step includes the compilation of the forward "
                  "and backward graphs with Inductor's caches off (a cold compile). The fused "
                  "path's first step includes, on GPU, Triton's compilation and autotuning; the "
                  "graphs path's, CapturedStep's uncaptured warm-up steps (3) and the capture. One-off: the first step's time minus the median of "
                  "the later warm-up steps. Paths that run the same model share it (reference and "
                  "torch.compile; fused and graphs, which has its own capturable optimiser). The paths draw different noise, so their "
                  "losses agree in size, not exactly.", ""]


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


def target_words(target: str, met: bool, applies: bool, here: str) -> str:
    """One of the engine's own targets, in plain words: met, not met, or set for other sizes."""
    if not applies:
        return f"The engine's target, {target}, is set for other sizes than {here}."
    return f"The engine's target, {target}: {'met' if met else 'not met'}."


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
        out += ["", f"fused / reference = {mem['fused/reference']:.3f}. " + target_words(
            f"at most {HEAD_MEMORY_TARGET} at m = 50257", mem["meets_target"],
            mem["target_applies"], "this shape")]
    return out + [""]


def mnist_shape(c: dict) -> str:
    return (f"MNIST config on synthetic data: image {'x'.join(map(str, c['image_shape']))}, "
            f"m = {c['num_classes']}, one-hot, batch {c['batch']}, T = {c['num_blocks']}, fp32")


MEMORY_COLUMN = {"cpu_saved_for_backward": "saved for backward MiB",
                 "cuda_peak_allocated": "CUDA peak MiB"}


def memory_caveat(kind: str) -> str:
    if kind == "cuda_peak_allocated":
        return ("These figures, like the paper's, count everything a step holds on the GPU, so the "
                "ratios compare with the paper's; the model, batch and GPU differ.")
    return ("These figures count activations only (weights and optimiser state are the same for "
            "every variant), so the ratios are not the paper's ratios and are expected to be "
            "further from 1.")


def render_methods_memory(mem: dict, cpu: bool) -> list[str]:
    c, paper = mem["config"], mem["paper_table2_gb"]
    sequential = mem["ratios"]["noprop-sequential/backprop"]
    out = section("Memory per method, image task, one training step (MiB)", cpu,
                  f"{mnist_shape(c)}. Method: {mem['method']}. noprop-sequential: one block per "
                  "step (blocks = slice(t, t + 1)), the largest over t. The paper's Table 2 (GPU "
                  "GB, one-hot, MNIST) counts all GPU memory, weights and optimiser state "
                  f"included. {memory_caveat(mem['kind'])} The paper does not say which of our "
                  "two NoProp rows its NoProp-DT figure corresponds to, so it stands beside both.",
                  ["variant", MEMORY_COLUMN[mem["kind"]], "/ backprop", "paper Table 2 GB",
                   "paper / backprop"])
    noprop_dt = (paper["noprop-dt"], paper["noprop-dt/backprop"])
    paper_of = {"noprop-all": noprop_dt, "noprop-sequential": noprop_dt,
                "backprop": (paper["backprop"], 1.0)}
    for name in MEMORY_VARIANTS:
        gb, ratio = paper_of[name]
        out.append(f"| {name} | {mib(mem['bytes'][name])} | "
                   f"{mem['ratios'][f'{name}/backprop']:.3f} | {gb:.2f} | {ratio:.2f} |")
    per_block = ", ".join(mib(b) for b in mem["sequential_per_block_bytes"])
    return out + ["", f"noprop-sequential per block t = 1..{c['num_blocks']} (MiB): {per_block}.",
                  "",
                  f"NoProp-sequential / backprop = {sequential:.3f} at T = {c['num_blocks']}. "
                  + target_words(f"at most {mem['sequential_target']} at T = 10, batch 128 "
                                 "(saved-for-backward bytes)", mem["meets_target"],
                                 mem["target_applies"], "this run"),
                  ""]


def render_lm_memory(mem: dict, cpu: bool) -> list[str]:
    c = mem["config"]
    out = section("Memory per method, language task, one training step (MiB)", cpu,
                  f"{c['config']} shape: T = {c['num_blocks']}, D = {c['width']}, V = "
                  f"{c['vocab_size']}, batch {c['batch']} x L {c['seq_len']}, fp32, reference ops. "
                  f"Method: {mem['method']}. noprop-all: NoProp-LM, every block on the batch; "
                  "noprop-sequential: one block per step, the largest over t; backprop: the GPT "
                  f"baseline of the same width and total depth. {memory_caveat(mem['kind'])} The "
                  "paper has no language-model memory figure.",
                  ["variant", MEMORY_COLUMN[mem["kind"]], "/ backprop"])
    for name, value in mem["bytes"].items():
        figure = mib(value) if isinstance(value, int) else value  # or why it is missing
        out.append(f"| {name} | {figure} | {fmt(mem['ratios'].get(f'{name}/backprop'), '.3f')} |")
    return out + [""]


def render(results: dict) -> str:
    head = results["header"]
    cpu = head["device_type"] == "cpu"
    out = render_header(head, cpu)
    for name in ("step", "lm"):
        if name in results:
            out += render_throughput(results[name], head, cpu)
    if "ops" in results:
        out += render_ops(results["ops"], head, cpu)
    if "memory" in results:
        out += render_memory(results["memory"], head, cpu)
    if "methods-memory" in results:
        out += render_methods_memory(results["methods-memory"], cpu)
    if "lm-memory" in results:
        out += render_lm_memory(results["lm-memory"], cpu)
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
