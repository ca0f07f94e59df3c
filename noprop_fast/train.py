"""Command line: `python -m noprop_fast.train --task {image,lm} [--config NAME] [--field VALUE]`.

With no arguments it trains NoProp-DT on scikit-learn's digits (the `digits` config), which needs
no download and finishes in a few minutes on a laptop CPU. `--task lm` trains NoProp-LM on the
embedded corpus (the `stdlib` config: English text from the Python standard library's docs, built
into shards on first use), also offline and in minutes on a CPU; `--data-dir` points it at shards
such as FineWeb's. `--resume DIR` continues a run from its last checkpoint; `--help` lists the rest.

Errors a user can cause (bad config, missing data, corrupt files, a loss that turns NaN) end in one
line on stderr and a non-zero exit.

Several processes (distributed.py): launch with torchrun and name the split, e.g.
`torchrun --standalone --nproc-per-node 8 -m noprop_fast.train --parallel blocks`; rank 0 alone
prints and writes, and its checkpoints resume in any number of processes (`--parallel none`: one).
"""
import argparse
import os
import sys
from pathlib import Path

from . import threads

threads.passive_wait_unless_set()  # before anything imports torch: see threads.py

from . import preflight  # noqa: E402
from .config import (TASK_CONFIGS, add_run_arguments, field_overrides, from_mapping,  # noqa: E402
                     list_configs, parse_task_args, read_yaml, resolve, task_parser)
from .errors import ConfigError, UserError, cli_main  # noqa: E402


def build_parser(task: str = "image", config: str | None = None) -> argparse.ArgumentParser:
    parser = task_parser(
        "python -m noprop_fast.train", "Train a network with NoProp (or its backprop baseline).",
        task, "image: classification on digits, MNIST, CIFAR-10/100; lm: a language model on token "
        "shards")
    parser.add_argument("--list-configs", action="store_true",
                        help="list packaged configs and exit")
    parser.add_argument("--resume", metavar="DIR",
                        help="continue the run in DIR from its checkpoint")
    return add_run_arguments(parser, task, config,
                             "replace the run that --out already holds (refused without it)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Without --task, the task is that of the --config file or of the --resume run, else image."""
    return parse_task_args(argv, build_parser, resume=True)


def config_from_args(args: argparse.Namespace):
    cls = TASK_CONFIGS[args.task]
    overrides = field_overrides(args)
    base = None
    if args.resume:
        if args.config:
            raise UserError("--resume takes the run's own config; drop --config")
        if args.overwrite:
            raise UserError("--overwrite starts a new run; it does not go with --resume")
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise UserError(f"{saved}: not found; --resume needs the folder of an earlier run")
        base = from_mapping(read_yaml(saved), str(saved), cls=cls)
        overrides.setdefault("out", args.resume)
        if Path(overrides["out"]).resolve() != Path(args.resume).resolve():
            raise UserError("--out must be the resumed run's folder (or left out)")
    cfg = resolve(args.config, overrides, base=base, cls=cls)
    if base is not None:
        preflight.check_resume_fields(base, cfg)
    return cfg


def run(argv: list[str] | None = None) -> dict | None:
    """Parse, train, print the closing table; returns the summary (None for --list-configs)."""
    args = parse_args(argv)
    if args.list_configs:
        for name, description in list_configs():
            print(f"{name:<28} {description}")
        return None
    cfg = config_from_args(args)
    from .loop import train  # imported here so that --help and --list-configs stay fast
    how = dict(resume=args.resume, overwrite=args.overwrite, thread_count=args.threads,
               show_progress=not args.no_progress and sys.stderr.isatty())
    if cfg.parallel != "none":  # one process per rank, launched by torchrun (distributed.py)
        from .distributed import session
        with session(cfg) as parallel:
            return train(cfg, **how, parallel=parallel)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"rank {os.environ.get('RANK', '?')}: torchrun started "
                          f"{os.environ['WORLD_SIZE']} processes but --parallel is none: name a "
                          "mode (blocks, data, blocks+data)")
    return train(cfg, **how)


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, argv, interrupted="the last checkpoint is kept (the last finished epoch; "
                                           "for a language model, the last evaluation)")


if __name__ == "__main__":
    sys.exit(main())
