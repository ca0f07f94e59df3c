"""The run folder: resolved config, per-epoch metrics, checkpoint, summary.

    DIR/config.yaml      the resolved config (what `--resume DIR` starts from)
    DIR/metrics.jsonl    one JSON object per epoch
    DIR/checkpoint.pt    model, optimiser and progress after the last finished epoch
    DIR/summary.json     the closing figures of a finished run

The checkpoint is written to a temporary file in the same folder and renamed over the old one, so
a crash mid-write leaves the previous checkpoint intact.

In a multi-process run (distributed.py) only rank 0 writes: `set_writer(False)` on every other
rank turns the writers here (and `config.save_config`) into no-ops.
"""
import json
import os
import time
from pathlib import Path

import torch

from .errors import UserError

CHECKPOINT = "checkpoint.pt"
_writer = True  # False on every rank but 0 of a multi-process run


def set_writer(flag: bool) -> None:
    global _writer
    _writer = flag


def is_writer() -> bool:
    return _writer


def default_run_dir(cfg) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{getattr(cfg, 'dataset', cfg.task)}-{cfg.method}-{stamp}"


def save_checkpoint(run_dir: Path, state: dict) -> Path:
    path = run_dir / CHECKPOINT
    if not _writer:
        return path
    tmp = run_dir / f".{CHECKPOINT}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half
    return path


def load_checkpoint(run_dir: Path) -> dict:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which, in one line
        raise UserError(f"{path}: cannot read checkpoint ({type(err).__name__})") from None


def append_metrics(run_dir: Path, record: dict) -> None:
    if not _writer:
        return
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def rewrite_metrics(run_dir: Path, history: list[dict]) -> None:
    """On resume: metrics.jsonl holds exactly the checkpoint's epochs (drops any written after it)."""
    if not _writer:
        return
    with open(run_dir / "metrics.jsonl", "w") as f:
        for record in history:
            f.write(json.dumps(record) + "\n")


def write_summary(run_dir: Path, summary: dict) -> None:
    if not _writer:
        return
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
