"""The charts of a run's folder and of `compare`'s reports, in one look (docs/usage.md, "Plots and
the progress line"). matplotlib is imported when a chart is drawn, so --help stays fast."""
import textwrap
from pathlib import Path

# the training objective's name by task and method, for the train-loss axes
LOSS_NAMES = {
    ("image", "noprop"): "NoProp: denoising + CE + KL",
    ("image", "noprop-ct"): "NoProp-CT: CE + KL + SNR'-weighted denoising",
    ("image", "noprop-fm"): "NoProp-FM: vector-field regression (+ anchor CE)",
    ("image", "backprop"): "cross-entropy",
    ("lm", "noprop"): "NoProp objective, not a cross-entropy",
    ("lm", "noprop-fm"): "NoProp-FM: vector-field regression + anchor CE",
    ("lm", "backprop"): "cross-entropy, nats/token",
}


def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only; must precede the pyplot import (no display on servers)
    import matplotlib.pyplot as plt
    return plt


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width, break_on_hyphens=False))


def _log_axis(axis) -> None:
    """A log axis labelled in plain numbers. Minor ticks: all labelled when the axis spans less
    than a decade (it may have no major tick), else at 2, 3 and 5 only (nine labels overlap)."""
    from matplotlib.ticker import FuncFormatter

    def minor(value, _):
        low, high = sorted(axis.get_view_interval())
        few = low > 0 and high / low < 10
        return f"{value:.3g}" if few or f"{value:.0e}"[0] in "235" else ""

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(minor))


def _save(plt, fig, ax, title: str, path: Path, note: str | None = None) -> Path:
    ax.set_title(title)
    if note:  # under the axes, in a strip that tight_layout leaves free
        lines = _wrap(note, 76)
        fig.text(0.5, 0.015, lines, ha="center", va="bottom", fontsize=8.5)
        fig.tight_layout(rect=(0, 0.01 + 0.038 * (lines.count("\n") + 1), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def line_chart(series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
               title: str, path: Path, *, log: bool = False, integer_x: bool = False,
               reference: tuple[float, str] | None = None) -> Path:
    """One line with markers per series {label: [(x, y), ...]}; `reference` (y, label): a dashed
    gray horizontal line."""
    from matplotlib.ticker import MaxNLocator
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, points in series.items():
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    if reference is not None:
        ax.axhline(reference[0], color="gray", linestyle="--", label=reference[1])
    if log:
        ax.set_yscale("log")
        _log_axis(ax.yaxis)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel=xlabel, ylabel=_wrap(ylabel, 48))
    ax.legend()
    return _save(plt, fig, ax, title, path)


def bar_chart(labels: list[str], values: list[float], bar_labels: list[str], ylabel: str,
              title: str, path: Path, note: str | None = None) -> Path:
    """One bar per label, each captioned with its bar_labels entry; `note`: a sentence under the
    chart. A long y label is wrapped so that it fits beside the axes; past three bars the figure
    widens, so that the captions of neighbouring bars stay apart."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.6, 1.6 * len(labels)), 4.4))
    bars = ax.bar(labels, values, color=[f"C{i}" for i in range(len(labels))])
    ax.bar_label(bars, labels=bar_labels)
    ax.margins(y=0.15)  # room for the captions above the tallest bar
    ax.set(ylabel=_wrap(ylabel, 34))
    return _save(plt, fig, ax, title, path, note)


def curves(histories: dict[str, list[dict]], summary: dict, out_dir: Path, loss: str | None,
           data_dir: str | None = None) -> list[Path]:
    """The curves of a run or of a comparison's runs ({label: history}; `summary`: the first run's,
    `loss`: what the train loss is). image: loss.png (log scale) and accuracy.png per epoch; lm:
    train_loss.png (not when `loss` is None) and val_loss.png against tokens seen, the unigram
    entropy dashed (`data_dir`: the shard folder, for the titles)."""
    def series(x: str, y: str, scale: float = 1.0) -> dict:
        return {label: [(r[x], scale * r[y]) for r in history if r.get(y) is not None]
                for label, history in histories.items()}  # unevaluated: gaps

    if summary.get("task") == "lm":
        data = Path(data_dir).name if data_dir is not None else "embedded corpus"
        where = f"{data}, {summary['device']}"
        entropy = summary.get("unigram_entropy")
        train = [] if loss is None else [line_chart(
            series("tokens_seen", "train_loss"), "tokens seen", f"train loss ({loss})",
            f"Train loss: {where}", out_dir / "train_loss.png")]
        val = series("tokens_seen", "val_loss")
        one = series("tokens_seen", "val_loss_one_chain")  # NoProp's (its records name readouts)
        val.update({f"{label}, one chain": one[label] for label, history in histories.items()
                    if any("readouts" in r for r in history)})
        return [*train, line_chart(val, "tokens seen",
                                   "val loss (nats/token)", f"Validation loss: {where}",
                                   out_dir / "val_loss.png", reference=None if entropy is None
                                   else (entropy, f"unigram entropy {entropy:.3f}"))]
    where = f"{summary['dataset']}, {summary['device']}"
    return [line_chart(series("epoch", "train_loss"), "epoch", f"train loss ({loss})",
                       f"Train loss: {where}", out_dir / "loss.png", log=True, integer_x=True),
            line_chart(series("epoch", "test_accuracy", 100), "epoch",
                       f"test accuracy (%, {summary['inference']} inference)",
                       f"Test accuracy: {where}", out_dir / "accuracy.png", integer_x=True)]


def write_run_plots(summary: dict, history: list[dict], run_dir: Path, warn=print,
                    data_dir: str | None = None) -> list[Path]:
    """The run's curves as PNGs in run_dir (`data_dir`: a language model's shard folder, for the
    titles); [] and one line through `warn` if they cannot be drawn (a run that trained is never
    failed by its pictures)."""
    try:
        method, schedule = summary["method"], summary.get("block_schedule")
        label = method if schedule in (None, "all") else f"{method} ({schedule})"
        return curves({label: history}, summary, Path(run_dir),
                      LOSS_NAMES[summary.get("task", "image"), method], data_dir)
    except ImportError as err:
        warn(f"no plots: matplotlib cannot be imported ({err}); the run's figures are in "
             "metrics.jsonl")
    except Exception as err:  # noqa: BLE001 - a chart's failure must not cost the run
        warn(f"no plots: drawing them failed ({type(err).__name__}: "
             f"{' '.join(str(err).split())[:160]}); the run's figures are in metrics.jsonl")
    return []
