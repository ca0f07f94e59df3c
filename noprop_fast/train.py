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

from . import preflight, runs  # noqa: E402
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
    if cfg.parallel != "none":  # one process per rank, launched by torchrun (distributed.py)
        from .distributed import session
        with session(cfg) as parallel:
            return train_config(cfg, args, parallel)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"rank {os.environ.get('RANK', '?')}: torchrun started "
                          f"{os.environ['WORLD_SIZE']} processes but --parallel is none: name a "
                          "mode (blocks, data, blocks+data)")
    return train_config(cfg, args)


def train_config(cfg, args: argparse.Namespace, parallel=None) -> dict:
    """Train `cfg` and print the closing table; `parallel`: (layout, groups) of a multi-process
    run (rank 0 alone prints and writes), None for one process."""
    from .distributed import rank_zero_first, same_on_every_rank
    run_dir = Path(cfg.out) if cfg.out else runs.default_run_dir(cfg)
    if parallel is not None:  # a time-stamped default folder: rank 0's on every rank
        run_dir = Path(same_on_every_rank(str(run_dir)))
    cfg.out = str(run_dir)
    if not args.resume:
        runs.refuse_existing_run(run_dir, args.overwrite)
    runs.check_writable(run_dir)
    show_progress = not args.no_progress and sys.stderr.isatty()
    thread_note = threads.apply(args.threads)
    if cfg.task == "lm":
        return run_lm(cfg, run_dir, args.resume, show_progress, parallel, args.overwrite,
                      thread_note)
    # imported here so that --help and --list-configs stay fast
    from .data import load_image_dataset
    from .reports import results_table
    from .trainer import Trainer

    with rank_zero_first(parallel and parallel[0]):  # a download or cache: built once
        data = load_image_dataset(cfg.dataset, cfg.data_dir)
    if parallel is None:
        trainer = Trainer(cfg, data, run_dir, show_progress=show_progress)
    else:
        from .parallel import ParallelTrainer
        trainer = ParallelTrainer(cfg, data, run_dir, show_progress, *parallel)
    start_run(trainer, run_dir, args.resume, args.overwrite)
    if args.resume:
        print(f"resuming {run_dir} after epoch {trainer.progress.epoch}")
    print(f"{cfg.method} on {cfg.dataset} ({data.source}), T={cfg.num_blocks}, "
          f"{cfg.embedding} embedding, device {device_note(trainer.device, thread_note)}, "
          f"{trainer.ops.name} ops, {cfg.precision}, "
          f"run {run_dir}",
          flush=True)
    summary = trainer.fit()
    print(results_table(trainer.progress.history))
    acc = summary["test_accuracy"]
    print(f"test accuracy {'-' if acc is None else f'{acc:.4f}'} ({cfg.inference} inference), "
          f"train {summary['train_seconds']:.1f}s, memory {summary['peak_memory_bytes'] / 2**20:.1f} MiB "
          f"({summary['memory_kind']}); summary in {run_dir / 'summary.json'}")
    print(checkpoint_line(summary, run_dir))
    write_plots(cfg, summary, trainer.progress.history, run_dir)
    return summary


def write_plots(cfg, summary: dict, history: list[dict], run_dir: Path) -> None:
    """The run's curves as PNGs in its folder (plots.py), one line naming them; a plot that cannot
    be drawn is one line on stderr and the run still succeeds. Rank 0 alone writes."""
    if not runs.is_writer():
        return
    from .plots import write_run_plots
    paths = write_run_plots(summary, history, run_dir, data_dir=cfg.data_dir,
                            warn=lambda line: print(line, file=sys.stderr, flush=True))
    if paths:
        print("plots: " + ", ".join(str(path) for path in paths), flush=True)


def checkpoint_line(summary: dict, run_dir: Path) -> str:
    size = summary.get("checkpoint_bytes")
    if size is None:
        return "no checkpoint written"
    return (f"checkpoint {size / 1e6:.1f} MB ({run_dir / runs.CHECKPOINT}: weights, AdamW's two "
            f"moments, progress; resume with --resume {run_dir})")


def start_run(trainer, run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """Resume: the checkpoint into `trainer`, and a length it has not passed yet. --overwrite:
    the old run's files go now, the last check before the first step."""
    if resume:
        trainer.restore(runs.load_checkpoint(run_dir))
        preflight.check_resume_progress(trainer.cfg, trainer.progress)
    elif overwrite:
        runs.clear_run(run_dir)


def device_note(device, thread_note: str) -> str:
    """The header's device: "cpu (2 threads: one per core, waiting threads sleep)" on a CPU."""
    return f"cpu ({thread_note})" if device.type == "cpu" else runs.device_name(device)


def run_lm(cfg, run_dir: Path, resume: str | None, show_progress: bool, parallel=None,
           overwrite: bool = False, thread_note: str = "") -> dict:
    from .data.corpus import load_token_data
    from .distributed import rank_zero_first
    from .lm_trainer import LMTrainer, parameter_count
    from .reports import closing_lines

    with rank_zero_first(parallel and parallel[0]):  # the embedded corpus: built once
        data = load_token_data(cfg.data_dir, show_progress)
    preflight.check_token_data(cfg, data)
    tokenizer = preflight.sampling_tokenizer(cfg, data)
    if parallel is None:
        trainer = LMTrainer(cfg, data, run_dir, show_progress=show_progress, pretrain=not resume)
    else:
        from .parallel import ParallelLMTrainer
        trainer = ParallelLMTrainer(cfg, data, run_dir, show_progress, *parallel,
                                    pretrain=not resume)
    start_run(trainer, run_dir, resume, overwrite)
    if resume:
        print(f"resuming {run_dir} after step {trainer.progress.step}")
    shape = (f"T={cfg.num_blocks} blocks of {cfg.layers_per_block} layer(s)" if cfg.method == "noprop"
             else f"{cfg.num_blocks * cfg.layers_per_block} layers")
    print(f"{cfg.method} LM on {data.source}, {shape}, "
          f"width {cfg.width}, "
          f"{getattr(trainer, 'total_parameters', parameter_count(trainer.model)) / 1e6:.2f}M "
          f"parameters, device "
          f"{device_note(trainer.device, thread_note)}, {trainer.ops.name} "
          f"ops, {cfg.precision}, run {run_dir}", flush=True)
    summary = trainer.fit()
    chains = (f"{cfg.eval_chains} chains, {cfg.inference} inference; one chain "
              f"{summary['val_loss_one_chain']:.4f}" if cfg.method == "noprop" else "")
    print(f"val loss {summary['val_loss']:.4f} nats/token (perplexity {summary['val_perplexity']:.2f}"
          f"{', ' + chains if chains else ''}) on {summary['val_tokens']:,} val tokens, whose unigram "
          f"entropy is {summary['unigram_entropy']:.4f} nats/token; {summary['tokens_seen']:,} "
          f"tokens seen in {summary['train_seconds']:.1f}s; summary in {run_dir / 'summary.json'}",
          flush=True)
    print(checkpoint_line(summary, run_dir), flush=True)
    if runs.is_writer():
        print("\n".join(closing_lines(cfg, summary, cfg.sample_tokens > 0 and cfg.num_samples > 0)))
    write_plots(cfg, summary, trainer.progress.history, run_dir)
    if tokenizer is not None:
        for i, text in enumerate(trainer.samples(tokenizer), 1):
            print(f"--- sample {i} (temperature {cfg.temperature}, top-k {cfg.top_k}) ---\n{text}")
    return summary


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, argv, interrupted="the last checkpoint is kept (the last finished epoch; "
                                           "for a language model, the last evaluation)")


if __name__ == "__main__":
    sys.exit(main())
