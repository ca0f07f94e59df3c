"""Command line: `python -m noprop_fast.train --task {image,lm} [--config NAME] [--field value ...]`.

With no arguments it trains NoProp-DT on scikit-learn's digits (the `digits` config), which needs
no download and finishes in a few minutes on a laptop CPU. `--task lm` trains NoProp-LM on the
embedded corpus (the `stdlib` config: English text from the Python standard library's docs, built
into shards on first use), also offline and in minutes on a CPU; `--data-dir` points it at shards
such as FineWeb's.

    --config NAME_OR_PATH   a packaged config (see --list-configs) or a YAML file
    --resume DIR            continue the run in DIR from its last checkpoint
    --overwrite             replace the run already in --out (refused without it)
    --<field> VALUE         override any config field (see --help)

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
from .config import (TASK_CONFIGS, OneLineArgumentParser, add_config_arguments,  # noqa: E402
                     config_path, from_mapping, list_configs, read_yaml, resolve)
from .errors import ConfigError, UserError, cli_main  # noqa: E402


def build_parser(task: str = "image", config: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m noprop_fast.train",
        description="Train a network with NoProp (or its backprop baseline). The config fields "
                    "listed are those of --task " + task + ".")
    parser.add_argument("--task", choices=sorted(TASK_CONFIGS), default="image",
                        help="image: classification on digits, MNIST, CIFAR-10/100; lm: a language "
                             "model on token shards [default image]")
    parser.add_argument("--config", metavar="NAME_OR_PATH",
                        help="packaged config name or YAML file "
                             f"[default {TASK_CONFIGS[task].DEFAULT}]")
    parser.add_argument("--list-configs", action="store_true", help="list packaged configs and exit")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run that --out already holds (refused without it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", metavar="N", type=threads.check_count,
                        help="intra-op threads on a CPU [default one per core, or OMP_NUM_THREADS; "
                             "waiting threads sleep, so a core shared with other work does not "
                             "stall the run]")
    add_config_arguments(parser, TASK_CONFIGS[task], config)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The task first (it decides which config fields exist), then everything against that task.
    Without --task, the task is that of the --config file or of the --resume run, else image."""
    pre = OneLineArgumentParser(add_help=False)
    pre.add_argument("--task", choices=sorted(TASK_CONFIGS))
    pre.add_argument("--config")
    pre.add_argument("--resume")
    known, _ = pre.parse_known_args(argv)
    task = known.task or implied_task(known.config, known.resume)
    args = build_parser(task, known.config).parse_args(argv)
    args.task = task
    return args


def implied_task(config: str | None, resume: str | None) -> str:
    """The `task` key of the named config or of the resumed run's config.yaml (image if none)."""
    path = Path(resume) / "config.yaml" if resume else None
    if path is None and config:
        try:
            path = config_path(config)
        except UserError:
            return "image"  # the full parse reports the missing config
    if path is None or not path.is_file():
        return "image"
    task = read_yaml(path).get("task", "image")
    return task if task in TASK_CONFIGS else "image"


def config_from_args(args: argparse.Namespace):
    cls = TASK_CONFIGS[args.task]
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("task", "config", "list_configs", "resume", "no_progress", "overwrite", "threads")}
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
