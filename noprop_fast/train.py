"""Command line: `python -m noprop_fast.train --task image [--config NAME] [--field value ...]`.

With no arguments it trains NoProp-DT on scikit-learn's digits (the `digits` config), which needs
no download and finishes in a few minutes on a laptop CPU.

    --config NAME_OR_PATH   a packaged config (see --list-configs) or a YAML file
    --resume DIR            continue the run in DIR from its last checkpoint
    --<field> VALUE         override any config field (see --help)

Errors a user can cause (bad config, missing data, corrupt files, a loss that turns NaN) end in one
line on stderr and a non-zero exit.
"""
import argparse
import sys
from pathlib import Path

from . import runs
from .config import (TASK_CONFIGS, OneLineArgumentParser, add_config_arguments, from_mapping,
                     list_configs, read_yaml, resolve)
from .errors import UserError, cli_main


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m noprop_fast.train",
        description="Train a network with NoProp (or its backprop baseline).")
    parser.add_argument("--task", choices=sorted(TASK_CONFIGS), default="image",
                        help="image: classification on digits, MNIST, CIFAR-10/100 [default image]")
    parser.add_argument("--config", metavar="NAME_OR_PATH",
                        help="packaged config name or YAML file [default digits]")
    parser.add_argument("--list-configs", action="store_true", help="list packaged configs and exit")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace):
    cls = TASK_CONFIGS[args.task]
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("task", "config", "list_configs", "resume", "no_progress")}
    base = None
    if args.resume:
        if args.config:
            raise UserError("--resume takes the run's own config; drop --config")
        saved = Path(args.resume) / "config.yaml"
        if not saved.is_file():
            raise UserError(f"{saved}: not found; --resume needs the folder of an earlier run")
        base = from_mapping(read_yaml(saved), str(saved), cls=cls)
        overrides.setdefault("out", args.resume)
        if Path(overrides["out"]).resolve() != Path(args.resume).resolve():
            raise UserError("--out must be the resumed run's folder (or left out)")
    return resolve(args.config, overrides, base=base, cls=cls)


def run(argv: list[str] | None = None) -> dict | None:
    """Parse, train, print the closing table; returns the summary (None for --list-configs)."""
    args = build_parser().parse_args(argv)
    if args.list_configs:
        for name, description in list_configs():
            print(f"{name:<28} {description}")
        return None
    cfg = config_from_args(args)
    # imported here so that --help and --list-configs stay fast
    from .data import load_image_dataset
    from .trainer import Trainer, results_table

    run_dir = Path(cfg.out) if cfg.out else runs.default_run_dir(cfg)
    cfg.out = str(run_dir)
    data = load_image_dataset(cfg.dataset, cfg.data_dir)
    trainer = Trainer(cfg, data, run_dir, show_progress=not args.no_progress and sys.stderr.isatty())
    if args.resume:
        trainer.restore(runs.load_checkpoint(run_dir))
        print(f"resuming {run_dir} after epoch {trainer.progress.epoch}")
    print(f"{cfg.method} on {cfg.dataset} ({data.source}), T={cfg.num_blocks}, "
          f"{cfg.embedding} embedding, device {runs.device_name(trainer.device)}, "
          f"{'reference' if trainer.ops is None else trainer.ops.name} ops, {cfg.precision}, "
          f"run {run_dir}",
          flush=True)
    summary = trainer.fit()
    print(results_table(trainer.progress.history))
    acc = summary["test_accuracy"]
    print(f"test accuracy {'-' if acc is None else f'{acc:.4f}'} ({cfg.inference} inference), "
          f"train {summary['train_seconds']:.1f}s, memory {summary['peak_memory_bytes'] / 2**20:.1f} MiB "
          f"({summary['memory_kind']}); summary in {run_dir / 'summary.json'}")
    return summary


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, argv, interrupted="the last finished epoch's checkpoint is kept")


if __name__ == "__main__":
    sys.exit(main())
