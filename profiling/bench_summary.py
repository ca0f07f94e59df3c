"""What profiling/bench.py prints: one line per section with its headline figure and, where the
engine sets itself a target for that figure, whether it is met. report.md holds everything else."""
import statistics

from bench_common import HEAD_MEMORY_TARGET
from bench_report import PATH_LABELS, is_mnist_config

TASKS = {"step": "image training step", "lm": "language training step"}


def throughput_row(result: dict) -> tuple[str, str]:
    """The batched reference's rate, each other path as a multiple of it; the loop target."""
    paths, unit = result["paths"], result["unit"]
    ref = paths.get("reference", {})
    if "median" not in ref:
        return f"batched reference: {ref.get('status', 'not measured')}", "-"
    others = [f"{PATH_LABELS.get(name, name)} x{p['ratio']:.2f}" for name, p in paths.items()
              if name != "reference" and "ratio" in p]
    figure = f"batched reference {ref['median']:.1f} {unit}" + (
        f"; {', '.join(others)}" if others else "")
    loop = paths.get("loop", {})
    if result["task"] != "image" or "vs_reference" not in loop:
        return figure, "-"
    batched_over_loop = statistics.median(1 / r for r in loop["vs_reference"])
    if not is_mnist_config(result["config"]):
        return figure, f"batched / loop {batched_over_loop:.2f} (target set for the MNIST config)"
    met = "met" if batched_over_loop > 1 else "not met"
    return figure, f"batched / loop {batched_over_loop:.2f}, above 1 on a CPU: {met}"


def ops_row(rows: list) -> tuple[str, str]:
    ratios = [r["fused/reference"] for r in rows if r.get("fused/reference") is not None]
    if not ratios:
        return f"{len(rows)} op measurements, fused path {rows[0]['fused_status'] if rows else '-'}", "-"
    return (f"{len(rows)} op measurements; fused / reference time {min(ratios):.2f}.."
            f"{max(ratios):.2f} (below 1: fused faster)", "-")


def target(words: str, mem: dict) -> str:
    if not mem.get("target_applies"):
        return f"{words} (set for other sizes)"
    return f"{words}: {'met' if mem['meets_target'] else 'not met'}"


def memory_row(mem: dict) -> tuple[str, str]:
    if "fused/reference" not in mem:
        return f"fused {mem['fused'].get('status')}, reference {mem['ref'].get('status')}", "-"
    return (f"fused / reference peak = {mem['fused/reference']:.3f}",
            target(f"at most {HEAD_MEMORY_TARGET} at m = 50257", mem))


def methods_memory_row(mem: dict, has_target: bool) -> tuple[str, str]:
    ratios = mem["ratios"]
    figure = ", ".join(f"{name.split('/')[0]} {value:.3f}" for name, value in ratios.items()
                       if value is not None and not name.startswith("backprop"))
    figure = f"/ backprop: {figure}" if figure else "-"
    if not has_target:
        return figure, "-"
    return figure, target(f"sequential at most {mem['sequential_target']} at T = 10, batch 128", mem)


def summary(results: dict) -> str:
    """The lines bench.py prints: a header line, then `section | figure | engine's target`."""
    head = results["header"]
    cpu = head["device_type"] == "cpu"
    rows = []
    for name in ("step", "lm"):
        if name in results:
            rows.append((TASKS[name], *throughput_row(results[name])))
    if "ops" in results:
        rows.append(("fused ops", *ops_row(results["ops"])))
    if "memory" in results:
        rows.append(("head memory", *memory_row(results["memory"])))
    if "methods-memory" in results:
        rows.append(("memory per method, image", *methods_memory_row(results["methods-memory"], True)))
    if "lm-memory" in results:
        rows.append(("memory per method, language",
                     *methods_memory_row(results["lm-memory"], False)))
    threads = f" ({head['thread_rule']})" if cpu and head.get("thread_rule") else ""
    lines = [f"{'CPU' if cpu else 'GPU'} numbers: {head['device_name']}{threads}, torch "
             f"{head['torch']}, {head['precision']}, {head['seconds']:.0f} s", ""]
    widths = [max(len(r[i]) for r in rows + [("section", "figure", "engine's target")])
              for i in range(3)]
    for row in [("section", "figure", "engine's target")] + rows:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(lines)
