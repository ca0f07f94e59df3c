"""The plot of profiling/bench.py (bench.png beside report.md): one panel per task's throughput,
each path's median relative to the batched reference with its range over the rounds as an error
bar, and one panel of the memory ratios to backprop beside the paper's Table 2 ratio. The title and
caption name the device, the versions, the shapes and the command. A path that was not measured
(CUDA only, skipped, failed, unavailable) has no bar, and its status is written where it would be.
"""
import textwrap
from pathlib import Path

from bench_report import PATH_LABELS, step_shape

PLOT_NAME = "bench.png"
TASK_TITLES = {"step": "Image task (images/s)", "lm": "Language task (tokens/s)"}


def short(status: str) -> str:
    """The start of a status, to fit under a missing bar."""
    return status.split(":")[0].split(" (")[0]


def throughput_panel(ax, result: dict, title: str) -> None:
    names = list(result["paths"])
    for i, name in enumerate(names):
        p = result["paths"][name]
        if "ratio" in p:
            ax.bar(i, p["ratio"], color="tab:blue" if name != "loop" else "tab:gray")
            ax.errorbar(i, p["ratio"], yerr=[[p["ratio"] - p["ratio_min"]],
                                             [p["ratio_max"] - p["ratio"]]],
                        color="black", capsize=3)
            ax.text(i, p["ratio_max"], f"{p['ratio']:.2f}", ha="center", va="bottom", fontsize=8)
        else:
            note = "no reference figure" if "median" in p else short(p["status"])
            ax.text(i, 0.02, note, rotation=90, ha="center", va="bottom", fontsize=8,
                    transform=ax.get_xaxis_transform())
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([PATH_LABELS.get(n, n) for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("throughput / batched reference")
    ax.set_title(title, fontsize=10)


def memory_panel(ax, results: dict) -> None:
    variants = ("noprop-all", "noprop-sequential", "backprop")
    series = []
    if "methods-memory" in results:
        mem = results["methods-memory"]
        paper = mem["paper_table2_gb"]["noprop-dt/backprop"]
        series.append(("image, this run", [mem["ratios"][f"{v}/backprop"] for v in variants]))
        series.append(("paper Table 2 (MNIST, GPU GB)", [paper, paper, 1.0]))
    if "lm-memory" in results:
        mem = results["lm-memory"]
        series.append(("language, this run",
                       [mem["ratios"].get(f"{v}/backprop", 0.0) for v in variants]))  # 0: failed
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(variants))]
        ax.bar(xs, values, width, label=label)
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels(variants, fontsize=8)
    kind = (results.get("methods-memory") or results.get("lm-memory"))["kind"]
    ax.set_ylabel("memory / backprop (" + ("CUDA peak" if kind == "cuda_peak_allocated"
                                           else "saved for backward") + ")")
    ax.set_title("Memory per method, one step", fontsize=10)
    ax.legend(fontsize=7)


def caption(results: dict) -> str:
    head = results["header"]
    lines = [f"{head['device_name']}, {head['threads']} threads; torch {head['torch']}, triton "
             f"{head['triton']}, python {head['python']}; {head['precision']}; {head['date']}."]
    for name in ("step", "lm"):
        if name in results:
            lines.append(f"{TASK_TITLES[name].split(' (')[0]}: {step_shape(results[name])}.")
    if "methods-memory" in results:
        c = results["methods-memory"]["config"]
        lines.append(f"Memory, image: MNIST config, batch {c['batch']}, T = {c['num_blocks']}, "
                     "fp32.")
    if "lm-memory" in results:
        c = results["lm-memory"]["config"]
        lines.append(f"Memory, language: {c['config']} shape, T = {c['num_blocks']}, batch "
                     f"{c['batch']} x L {c['seq_len']}, fp32.")
    lines.append(f"Command: {head['command']}")
    return "\n".join(textwrap.fill(line, 150) for line in lines)


def write_plot(results: dict, out: Path) -> Path | None:
    """bench.png in `out`, or None where no section of this run has a figure to plot."""
    tasks = [name for name in ("step", "lm") if name in results]
    memory = any(name in results for name in ("methods-memory", "lm-memory"))
    panels = len(tasks) + memory
    if not panels:
        return None
    import matplotlib
    matplotlib.use("Agg")  # files only; must precede the pyplot import (no display on servers)
    import matplotlib.pyplot as plt
    cpu = results["header"]["device_type"] == "cpu"
    fig, axes = plt.subplots(1, panels, figsize=(5.0 * panels, 5.2), squeeze=False)
    axes = list(axes[0])
    for ax, name in zip(axes, tasks):
        throughput_panel(ax, results[name], TASK_TITLES[name])
    if memory:
        memory_panel(axes[-1], results)
    fig.suptitle(f"profiling/bench.py: {'CPU numbers' if cpu else 'GPU numbers'}, "
                 f"{results['header']['device_name']}", fontsize=11)
    text = caption(results)
    fig.text(0.01, 0.01, text, fontsize=7, va="bottom", ha="left", family="monospace")
    fig.tight_layout(rect=(0, 0.03 + 0.022 * text.count("\n"), 1, 0.95))
    path = out / PLOT_NAME
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
