"""Command line: `python -m noprop_fast.compare` (options: --help; docs/usage.md, "The comparison
report"). Trains the methods of --methods (image: NoProp-DT, -CT, -FM and the backprop baseline of
the same architecture; lm: NoProp-LM and a GPT) from one config on the same data, loaded once, each
method in OUT/<method>, and writes report.md, summary.json and the charts into OUT (reports.py)."""
import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

from . import threads

threads.passive_wait_unless_set()  # before anything imports torch: see threads.py

from . import reports  # noqa: E402
from .config import (TASK_CONFIGS, add_run_arguments, field_overrides,  # noqa: E402
                     parse_task_args, resolve, task_parser)
from .errors import UserError, cli_main  # noqa: E402

METHODS = ("noprop", "noprop-ct", "noprop-fm", "backprop")  # every method some task compares
TASK_METHODS = {"image": METHODS, "lm": ("noprop", "backprop")}  # the ones each task has
DEFAULT_METHODS = ("noprop", "backprop")
ONE_NETWORK = ("noprop-ct", "noprop-fm")  # no blocks: the block schedule is NoProp-DT's alone
# LMConfig's sampling fields: a comparison prints no samples, so --help leaves them out
LM_SAMPLING = ("sample", "sample_tokens", "num_samples", "temperature", "top_k")


def build_parser(task: str = "image", config: str | None = None) -> argparse.ArgumentParser:
    parser = task_parser(
        "python -m noprop_fast.compare",
        "Train NoProp and its backprop baseline on the same data; write a report.", task,
        "image: NoProp-DT, NoProp-CT, NoProp-FM and backprop on digits, MNIST, CIFAR; lm: "
        "NoProp-LM vs a backprop GPT on token shards")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help="comma-separated methods to run, from "
                        f"{','.join(TASK_METHODS[task])} [default {','.join(DEFAULT_METHODS)}]")
    add_run_arguments(parser, task, config,
                      "replace the runs that OUT/<method> already holds (refused without it)")
    for action in parser._actions:  # two config fields mean something else here
        if action.dest == "method" or action.dest in LM_SAMPLING:
            action.help = argparse.SUPPRESS  # method: rejected, --methods picks the runs
        elif action.dest == "out":
            name = "<dataset>" if task == "image" else "lm"
            action.help = ("report folder; each method runs in OUT/<method> "
                           f"[default reports/compare-{name}-<time>]")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Without --task, the task is that of the --config file, else image."""
    return parse_task_args(argv, build_parser)


def parse_methods(text: str, task: str = "image") -> list[str]:
    """The methods of a --methods value, in its order; a UserError if one is unknown, repeated or
    not one of the task's."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise UserError(f"--methods: {text!r} must name distinct methods from "
                        f"{','.join(TASK_METHODS[task])}")
    check_methods(methods, task)
    return methods


def check_methods(methods: list[str], task: str) -> None:
    """Refuse, in one line, a method that the task does not have (lm: no NoProp-CT or -FM)."""
    foreign = [m for m in methods if m not in TASK_METHODS[task]]
    if foreign:
        raise UserError(f"--methods: {','.join(foreign)} {'is' if len(foreign) == 1 else 'are'} "
                        f"image-only; --task {task} compares {','.join(TASK_METHODS[task])}")


def run_config(cfg, method: str, out_dir: Path):
    """One method's config: the comparison's, with that method and its run folder; NoProp-CT and
    -FM train one network, so they take block_schedule all whatever NoProp-DT's is."""
    changes = {"method": method, "out": str(out_dir / method)}
    if method in ONE_NETWORK:
        changes["block_schedule"] = "all"
    return dataclasses.replace(cfg, **changes).validate()


def compare(cfg, methods: list[str], out_dir, show_progress: bool = False, *,
            config_name: str | None = None, command: str | None = None,
            overwrite: bool = False) -> dict:
    """Train every method on one copy of the data; write report, summary and plots into out_dir.

    Returns {"config", "runs": {method: the trainer's summary}, "history": {method: [epoch or
    evaluation records]}, "report": path of report.md}.
    """
    from .loop import Run  # imported here so that --help stays fast
    from .runs import check_writable, clear_run
    from .tasks import TASKS

    out_dir = Path(out_dir)
    check_methods(methods, cfg.task)
    if cfg.task == "lm" and reports.BASELINE in methods and cfg.embed_init != "learned":
        raise UserError("embed_init: the GPT baseline learns its own embeddings; compare with "
                        "embed_init learned, or --methods noprop")
    for m in methods:  # every run folder empty (or --overwrite) and writable, before any work
        if (out_dir / m).is_dir() and any((out_dir / m).iterdir()) and not overwrite:
            # the trainer appends to metrics.jsonl: an old run there would mix into the new one
            raise UserError(f"{out_dir / m}: already holds a run; choose another --out "
                            "(--overwrite replaces it)")
    run_cfgs = {m: run_config(cfg, m, out_dir) for m in methods}  # a bad pairing fails here
    for m in methods:
        check_writable(out_dir / m)
    data = TASKS[cfg.task].load_data(cfg, show_progress)  # once for every method
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, histories = {}, {}
    what = (f"LM on {reports.data_name(cfg)}" if cfg.task == "lm" else
            f"on {cfg.dataset} ({data.source})")
    for m in methods:
        detail = "" if cfg.task == "lm" else (
            f", {reports.prediction_steps(m, {}, cfg) or 'inference steps as configured'}"
            if m in ONE_NETWORK else f", T={cfg.num_blocks}")
        print(f"== {m} {what}{detail}, run {out_dir / m}", flush=True)
        trainer = Run(run_cfgs[m], data, out_dir / m, show_progress=show_progress)
        if overwrite:  # the old run's files go just before the new run starts
            clear_run(out_dir / m)
        runs[m] = trainer.fit()
        histories[m] = trainer.progress.history
    result = {"config": dataclasses.replace(cfg, out=str(out_dir)).to_dict(), "runs": runs,
              "history": histories}
    (out_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    result["report"] = str(reports.write_report(
        cfg, data, runs, histories, out_dir, config_name or type(cfg).DEFAULT,
        shlex.join(sys.argv) if command is None else command))
    return result


def run(argv: list[str] | None = None) -> dict:
    """Parse, compare, print the results table; returns what `compare` returns."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    overrides = field_overrides(args)
    overrides.pop("out", None)  # the report's folder
    if "method" in overrides:
        raise UserError("--method: compare runs every method in --methods; use --methods instead")
    methods = parse_methods(args.methods, args.task)
    cls = TASK_CONFIGS[args.task]
    cfg = resolve(args.config, overrides, cls=cls)
    name = cfg.dataset if args.task == "image" else "lm"
    out_dir = Path(getattr(args, "out", None)
                   or Path("reports") / f"compare-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    thread_note = threads.apply(args.threads)
    import torch
    if cfg.device == "cpu" or not torch.cuda.is_available():
        print(f"CPU, {thread_note}", flush=True)
    result = compare(cfg, methods, out_dir, not args.no_progress and sys.stderr.isatty(),
                     config_name=args.config or cls.DEFAULT, overwrite=args.overwrite,
                     command=shlex.join(["python", "-m", "noprop_fast.compare", *argv]))
    print(reports.results_markdown(result["runs"], args.task))
    if args.task == "image":
        one_network = [m for m in methods if m in ONE_NETWORK]  # their chain or ODE: report.md
        how = f" ({', '.join(one_network)}: see report.md)" if one_network else ""
        print(f"accuracy with {cfg.inference} inference{how}; report in {result['report']}")
    else:
        print(f"val loss in nats/token on the same val tokens; report in {result['report']}")
    return result


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, argv, interrupted="each finished run keeps its last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
