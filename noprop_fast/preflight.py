"""Checks made before the first training step, so that a mistake costs no training time
(docs/usage.md, "A run's folder"): the fields a resume may change (RESUMABLE) and the language
data. The image task's empty-split checks live in `data.image.load_image_dataset`."""
import dataclasses

from .errors import ConfigError, DataError

_HOW = {"out", "data_dir", "device", "fused", "precision", "cuda_graphs", "parallel",
        "block_ranks", "dist_timeout"}  # where and how the steps run
RESUMABLE = {
    "image": {"epochs", "eval_every", "inference", "lr", "weight_decay"} | _HOW,
    "lm": {"max_steps", "eval_every", "eval_tokens", "eval_chains", "inference", "lr",
           "weight_decay", "sample", "sample_tokens", "num_samples", "temperature", "top_k"} | _HOW,
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_resume_fields(saved, cfg) -> None:
    """`cfg` (the resumed run's config with the command line's overrides) may differ from `saved`
    (its config.yaml) only in RESUMABLE fields."""
    allowed = RESUMABLE[cfg.task]
    for f in dataclasses.fields(cfg):
        old, new = getattr(saved, f.name), getattr(cfg, f.name)
        if f.name not in allowed and old != new:
            may = ", ".join(_flag(n) for n in sorted(allowed - _HOW))
            raise ConfigError(f"{_flag(f.name)} {new}: a resumed run keeps its {f.name} ({old}); "
                              f"on resume you may change {may} and where it runs; for another "
                              f"{f.name} start a new run in another --out")


def check_resume_progress(cfg, progress) -> None:
    """A resumed run cannot train for less than it already has."""
    if cfg.task == "image" and cfg.epochs < progress.epoch:
        raise ConfigError(f"--epochs {cfg.epochs}: the run has already trained {progress.epoch} "
                          "epochs; give at least that many")
    if cfg.task == "lm" and cfg.max_steps < progress.step:
        raise ConfigError(f"--max-steps {cfg.max_steps}: the run has already trained "
                          f"{progress.step} steps; give at least that many")


def check_token_data(cfg, data) -> None:
    """The validation split holds one window of seq_len + 1 tokens (and eval_tokens one window's
    targets); the shards' vocabulary is their tokenizer's."""
    from .data.shards import DEFAULT_VOCAB, val_batches
    val_batches(data.val, cfg.batch_size, cfg.seq_len, "cpu", max_tokens=cfg.eval_tokens)
    expected = DEFAULT_VOCAB.get(data.tokenizer)
    if expected is not None and data.vocab_size != expected:
        raise DataError(f"{data.source.split(': ')[0]}: the shards' header gives a vocabulary of "
                        f"{data.vocab_size} ids, but their {data.tokenizer} tokenizer has "
                        f"{expected}: rewrite them with python -m noprop_fast.data.prepare")


def sampling_tokenizer(cfg, data):
    """The tokenizer the closing samples decode with, loaded now (None without samples)."""
    from .data.tokenizer import get_tokenizer
    if cfg.sample_tokens == 0:
        return None
    try:
        return get_tokenizer(data.tokenizer)
    except DataError as err:
        reason = getattr(err, "reason", str(err))
        raise DataError(f"the samples printed at the end of the run need the {data.tokenizer} "
                        f"tokenizer, which needs tiktoken (pip install tiktoken) and, the first "
                        f"time, a network connection ({reason}); or train without samples: "
                        "--sample-tokens 0") from None
