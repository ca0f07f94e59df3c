"""Command line: `python -m noprop_fast.compare [--task {image,lm}] [--config NAME] [--field value ...]
[--methods LIST] [--out DIR]`.

Trains NoProp-DT and the backprop baseline of the same architecture on the same data (loaded once,
one `ImageData` given to both trainers) and writes a side-by-side report. `--task lm` compares
NoProp-LM with a backprop GPT on token shards instead (compare_lm.py; its own report and plot).
The image report:

    OUT/report.md        config, device, torch version, command; one row per method; per-epoch table
    OUT/summary.json     {"config": ..., "runs": {method: summary}, "history": {method: [epochs]}}
    OUT/loss.png, accuracy.png, time.png, memory.png
    OUT/<method>/        each method's own run folder (config, metrics, checkpoint, summary)

    --task image|lm  chosen first: it decides which config fields exist [default image]
    --config NAME_OR_PATH, --<field> VALUE   as in `noprop_fast.train` (but not --method)
    --methods LIST   comma-separated, from noprop,backprop [default noprop,backprop]
    --out DIR        [default reports/compare-<dataset>-<time>; lm: reports/compare-lm-<time>]
    --overwrite      replace the runs that OUT/<method> already holds (refused without it)

The memory figure is what `Trainer.summary` reports: on CUDA the allocator's peak, on CPU the bytes
autograd saved for backward in the first step of an epoch, activations only (parameters and
buffers are resident under every method; saved-tensor hooks, see memory.py).
"""
import argparse
import dataclasses
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

from . import threads

threads.passive_wait_unless_set()  # before anything imports torch: see threads.py

from .config import (TASK_CONFIGS, ImageConfig, OneLineArgumentParser,  # noqa: E402
                     add_config_arguments, resolve)
from .errors import UserError, cli_main  # noqa: E402

METHODS = ("noprop", "backprop")
BASELINE = "backprop"  # the memory ratio is against this method's figure
# LMConfig's sampling fields: a comparison prints no samples, so --help leaves them out
LM_SAMPLING = ("sample", "sample_tokens", "num_samples", "temperature", "top_k")
MEMORY_KINDS = {
    "cuda_peak_allocated": "CUDA allocator peak",
    "cpu_saved_for_backward": "CPU activation bytes saved for backward (saved-tensor hooks)",
}


def build_parser(task: str = "image", config: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m noprop_fast.compare",
        description="Train NoProp and its backprop baseline on the same data; write a report. The "
                    "config fields listed are those of --task " + task + ".")
    parser.add_argument("--task", choices=sorted(TASK_CONFIGS), default="image",
                        help="image: NoProp-DT vs backprop on digits, MNIST, CIFAR; lm: NoProp-LM vs "
                             "a backprop GPT on token shards [default image]")
    parser.add_argument("--config", metavar="NAME_OR_PATH",
                        help=f"packaged config name or YAML file [default {TASK_CONFIGS[task].DEFAULT}]")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated methods to run [default {','.join(METHODS)}]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the runs that OUT/<method> already holds (refused without it)")
    parser.add_argument("--threads", metavar="N", type=threads.check_count,
                        help="intra-op threads on a CPU [default one per core, or OMP_NUM_THREADS; "
                             "waiting threads sleep]")
    add_config_arguments(parser, TASK_CONFIGS[task], config)
    for action in parser._actions:  # two config fields mean something else here
        if action.dest == "method" or action.dest in LM_SAMPLING:
            action.help = argparse.SUPPRESS  # method: rejected, --methods picks the runs
        elif action.dest == "out":
            action.help = "report folder; each method runs in OUT/<method> " \
                          f"[default reports/compare-{'<dataset>' if task == 'image' else 'lm'}-<time>]"
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The task first (it decides which config fields exist), then everything against that task.
    Without --task, the task is that of the --config file, else image."""
    from .train import implied_task
    pre = OneLineArgumentParser(add_help=False)
    pre.add_argument("--task", choices=sorted(TASK_CONFIGS))
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    task = known.task or implied_task(known.config, None)
    args = build_parser(task, known.config).parse_args(argv)
    args.task = task
    return args


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise UserError(f"--methods: {text!r} must name distinct methods from {','.join(METHODS)}")
    return methods


def refuse_existing_runs(out_dir: Path, methods: list[str], overwrite: bool = False) -> None:
    """Every method's run folder: empty (or --overwrite) and writable, before any work."""
    from . import runs
    for m in methods:
        if (out_dir / m).is_dir() and any((out_dir / m).iterdir()) and not overwrite:
            # the trainer appends to metrics.jsonl: an old run there would mix into the new one
            raise UserError(f"{out_dir / m}: already holds a run; choose another --out "
                            "(--overwrite replaces it)")
    for m in methods:
        runs.check_writable(out_dir / m)


def start_clean(run_dir: Path, overwrite: bool) -> None:
    """--overwrite: the old run's files go just before the new run starts."""
    if overwrite:
        from . import runs
        runs.clear_run(run_dir)


def _mib(n_bytes: int) -> float:
    return n_bytes / 2**20


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def results_markdown(runs: dict[str, dict]) -> str:
    """One row per method: accuracy, time, memory, what the memory is, ratio to the baseline."""
    base = runs.get(BASELINE, {}).get("peak_memory_bytes")
    lines = ["| method | test accuracy (%) | train s / epoch | peak memory (MiB) | memory is "
             f"| memory / {BASELINE} |", "|---|---:|---:|---:|---|---:|"]
    for method, s in runs.items():
        acc = None if s["test_accuracy"] is None else 100 * s["test_accuracy"]
        ratio = s["peak_memory_bytes"] / base if base else None
        name = method if s.get("block_schedule") is None else f"{method} ({s['block_schedule']})"
        lines.append(f"| {name} | {_fmt(acc, '.2f')} | {s['seconds_per_epoch']:.2f} "
                     f"| {_mib(s['peak_memory_bytes']):.1f} "
                     f"| {MEMORY_KINDS.get(s['memory_kind'], s['memory_kind'])} "
                     f"| {_fmt(ratio, '.2f')} |")
    return "\n".join(lines)


def epochs_markdown(histories: dict[str, list[dict]]) -> str:
    """Per epoch: train loss and test accuracy of every method ('-' where not evaluated)."""
    methods = list(histories)
    lines = ["| epoch | " + " | ".join(f"{m} loss | {m} acc (%)" for m in methods) + " |",
             "|---:|" + "---:|---:|" * len(methods)]
    by_epoch = {m: {r["epoch"]: r for r in h} for m, h in histories.items()}
    for epoch in sorted({e for rows in by_epoch.values() for e in rows}):
        cells = []
        for m in methods:
            r = by_epoch[m].get(epoch, {})
            acc = r.get("test_accuracy")
            cells += [_fmt(r.get("train_loss"), ".4f"), _fmt(None if acc is None else 100 * acc, ".2f")]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_note(runs: dict[str, dict]) -> str | None:
    """Under the memory chart: why NoProp saves nothing when it trains every block on every step."""
    noprop = runs.get("noprop")
    if noprop is None or noprop.get("block_schedule") != "all":
        return None
    return ("NoProp here trains all blocks on every step, so it holds every block's activations, "
            "as backprop does: the saving comes with --block-schedule sequential (one block's "
            "activations at a time).")


def write_plots(runs: dict[str, dict], histories: dict[str, list[dict]], out_dir: Path) -> None:
    """loss.png and accuracy.png per epoch, time.png and memory.png as one bar per method."""
    from .plots import bar_chart, line_chart

    first = next(iter(runs.values()))
    methods = list(runs)
    where = f"{first['dataset']}, {first['device']}"

    def per_epoch(key: str, scale: float = 1.0) -> dict:
        return {m: [(r["epoch"], scale * r[key]) for r in histories[m] if r.get(key) is not None]
                for m in methods}  # unevaluated epochs: gaps

    # log scale: NoProp's objective (denoising + CE + KL) and backprop's cross-entropy differ in scale
    line_chart(per_epoch("train_loss"), "epoch", "train loss (each method's own objective)",
               f"Train loss: {where}", out_dir / "loss.png", log=True, integer_x=True)
    line_chart(per_epoch("test_accuracy", 100), "epoch",
               f"test accuracy (%, {first['inference']} inference)", f"Test accuracy: {where}",
               out_dir / "accuracy.png", integer_x=True)
    seconds = [runs[m]["seconds_per_epoch"] for m in methods]
    bar_chart(methods, seconds, [f"{s:.2f} s" for s in seconds], "train seconds per epoch",
              f"Time per epoch: {where}", out_dir / "time.png")
    mib = [_mib(runs[m]["peak_memory_bytes"]) for m in methods]
    base = runs.get(BASELINE, {}).get("peak_memory_bytes")
    captions = [f"{v:.1f} MiB" + (f"\n{runs[m]['peak_memory_bytes'] / base:.2f} x {BASELINE}"
                                  if base else "") for m, v in zip(methods, mib)]
    kind = MEMORY_KINDS.get(first["memory_kind"], first["memory_kind"])
    bar_chart(methods, mib, captions, f"MiB: {kind}", f"Memory: {where}", out_dir / "memory.png",
              note=memory_note(runs))


def write_report(cfg: ImageConfig, runs: dict, histories: dict, out_dir: Path,
                 config_name: str, command: str) -> Path:
    import torch  # for its version only; the module stays light for --help

    first = next(iter(runs.values()))
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    text = "\n".join([
        f"# NoProp vs backprop on {cfg.dataset}", "",
        f"- dataset: {cfg.dataset} ({first['data_source']})",
        f"- config: {config_name}; T={cfg.num_blocks}, {cfg.embedding} embedding, "
        f"block schedule {cfg.block_schedule} (NoProp), {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"lr {cfg.lr}, seed {cfg.seed}",
        f"- device: {first['device']}",
        f"- torch: {torch.__version__}",
        f"- command: `{command}`",
        f"- date: {date}", "",
        "## Results", "",
        results_markdown(runs), "",
        f"Test accuracy uses {cfg.inference} inference, after the last epoch. "
        "With the sequential block schedule an epoch is T passes over the data.", "",
        "## Per epoch", "",
        "The losses are each method's own objective (NoProp: denoising + CE + KL; backprop: "
        "cross-entropy) and are not comparable in value.", "",
        epochs_markdown(histories), "",
        "Plots: loss.png, accuracy.png, time.png, memory.png. Each method's run: "
        + ", ".join(f"{m}/" for m in runs) + ".", ""])
    path = out_dir / "report.md"
    path.write_text(text)
    return path


def compare(cfg: ImageConfig, methods: list[str], out_dir, show_progress: bool = False, *,
            config_name: str = ImageConfig.DEFAULT, command: str | None = None,
            overwrite: bool = False) -> dict:
    """Train every method on one copy of the data; write report, summary and plots into out_dir.

    Returns {"config", "runs": {method: Trainer summary}, "history": {method: [epoch records]},
    "report": path of report.md}.
    """
    from .data import load_image_dataset  # imported here so that --help stays fast
    from .loop import Run

    out_dir = Path(out_dir)
    refuse_existing_runs(out_dir, methods, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    if command is None:
        command = shlex.join(sys.argv)
    data = load_image_dataset(cfg.dataset, cfg.data_dir)
    runs, histories = {}, {}
    for m in methods:
        run_cfg = dataclasses.replace(cfg, method=m, out=str(out_dir / m))
        print(f"== {m} on {cfg.dataset} ({data.source}), T={cfg.num_blocks}, run {out_dir / m}",
              flush=True)
        trainer = Run(run_cfg, data, out_dir / m, show_progress=show_progress)
        start_clean(out_dir / m, overwrite)
        runs[m] = trainer.fit()
        histories[m] = trainer.progress.history
    result = {"config": dataclasses.replace(cfg, out=str(out_dir)).to_dict(), "runs": runs,
              "history": histories}
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    write_plots(runs, histories, out_dir)
    result["report"] = str(write_report(cfg, runs, histories, out_dir, config_name, command))
    return result


def run(argv: list[str] | None = None) -> dict:
    """Parse, compare, print the results table; returns what `compare` (or `compare_lm`) returns."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("task", "config", "methods", "no_progress", "out", "overwrite", "threads")}
    if "method" in overrides:
        raise UserError("--method: compare runs every method in --methods; use --methods instead")
    methods = parse_methods(args.methods)
    cls = TASK_CONFIGS[args.task]
    cfg = resolve(args.config, overrides, cls=cls)
    name = cfg.dataset if args.task == "image" else "lm"
    out_dir = Path(getattr(args, "out", None)
                   or Path("reports") / f"compare-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    command = shlex.join(["python", "-m", "noprop_fast.compare", *argv])
    show_progress = not args.no_progress and sys.stderr.isatty()
    config_name = args.config or cls.DEFAULT
    thread_note = threads.apply(args.threads)
    import torch
    if cfg.device == "cpu" or not torch.cuda.is_available():
        print(f"CPU, {thread_note}", flush=True)
    if args.task == "lm":
        from . import compare_lm
        result = compare_lm.compare_lm(cfg, methods, out_dir, show_progress,
                                       config_name=config_name, command=command,
                                       overwrite=args.overwrite)
        print(compare_lm.results_markdown(result["runs"]))
        print(f"val loss in nats/token on the same val tokens; report in {result['report']}")
        return result
    result = compare(cfg, methods, out_dir, show_progress=show_progress, config_name=config_name,
                     command=command, overwrite=args.overwrite)
    print(results_markdown(result["runs"]))
    print(f"accuracy with {cfg.inference} inference; report in {result['report']}")
    return result


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, argv, interrupted="each finished run keeps its last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
