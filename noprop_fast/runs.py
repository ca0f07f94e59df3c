"""The run folder (docs/usage.md, "A run's folder"): every file written to a temporary file and
renamed over the old one; a failed write is one line (`RunFolderError`). In a multi-process run
only rank 0 writes: `set_writer(False)` on every other rank turns the writers here into no-ops."""
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import UserError

CHECKPOINT = "checkpoint.pt"
RUN_FILES = ("config.yaml", "metrics.jsonl", CHECKPOINT, "summary.json")  # a run's own files
RUN_PLOTS = ("loss.png", "accuracy.png", "train_loss.png", "val_loss.png")  # plots.py, at the end
_writer = True  # False on every rank but 0 of a multi-process run


class RunFolderError(UserError):
    """The run folder cannot be written (read-only, under a file, a full disk)."""


def set_writer(flag: bool) -> None:
    global _writer
    _writer = flag


def is_writer() -> bool:
    return _writer


def default_run_dir(cfg) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{getattr(cfg, 'dataset', cfg.task)}-{cfg.method}-{stamp}"


def refuse_existing_run(run_dir: Path, overwrite: bool = False) -> None:
    """A new run into a folder that holds one would mix the two (metrics appended to the old ones,
    one run's config beside the other's checkpoint): refused unless `overwrite`."""
    if any((Path(run_dir) / name).exists() for name in RUN_FILES) and not overwrite:
        raise UserError(f"{run_dir}: already holds a run; continue it with --resume {run_dir}, or "
                        "pick another --out (--overwrite replaces it)")


def clear_run(run_dir: Path) -> None:
    """--overwrite: remove the old run's files, so that the new run starts clean."""
    if not _writer:
        return
    for name in (*RUN_FILES, *RUN_PLOTS, f".{CHECKPOINT}.tmp"):
        path = Path(run_dir) / name
        with _one_line(path):
            path.unlink(missing_ok=True)


def check_writable(run_dir: Path) -> None:
    """A probe file written and removed in the folder, or in its nearest existing parent (nothing
    is created): one line now rather than a traceback after the first epoch."""
    if not _writer:
        return
    run_dir = Path(run_dir)
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise RunFolderError(f"{run_dir}: cannot create the run folder ({existing} is a file)")
    probe = existing / f".write-check-{os.getpid()}.tmp"
    with _one_line(run_dir), _removed_on_failure(probe, always=True):
        probe.write_bytes(b"")


@contextmanager
def _one_line(path: Path):
    """An OSError inside becomes a RunFolderError naming `path` and the OS error."""
    try:
        yield
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise RunFolderError(f"{path}: cannot write the run folder ({reason})") from None


@contextmanager
def _removed_on_failure(tmp: Path, always: bool = False):
    """Remove `tmp` if the block fails (or is interrupted); always: in any case."""
    ok = False
    try:
        yield
        ok = True
    finally:
        if always or not ok:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass


def write_atomic(path: Path, write) -> None:
    """write(file) into a temporary file beside `path`, then rename it over `path` (atomic on
    POSIX); a failure removes the temporary file and is one line (RunFolderError)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with _one_line(path), _removed_on_failure(tmp):
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def save_checkpoint(run_dir: Path, state: dict, cfg=None) -> Path:
    """The checkpoint, after `cfg` into config.yaml where that changed: the config beside a
    checkpoint is the one it was trained with."""
    path = run_dir / CHECKPOINT
    if not _writer:
        return path
    if cfg is not None:
        from .config import config_text
        saved, text = run_dir / "config.yaml", config_text(cfg)
        if not saved.is_file() or saved.read_text() != text:  # a failed write leaves the old file
            write_atomic(saved, lambda f: f.write(text.encode()))
    try:
        write_atomic(path, lambda f: _torch_save(state, f))
    except RunFolderError as err:
        raise RunFolderError(f"{err}; the last good checkpoint is kept") from None
    return path


class _WriteErrors:
    """A file's `write`, keeping the OSError it raised: torch.save turns it into a RuntimeError
    that no longer says what failed (a full disk reads as "unexpected pos")."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.f.flush()


def _torch_save(state: dict, f) -> None:
    target = _WriteErrors(f)
    try:
        torch.save(state, target)
    except RuntimeError:
        if target.error is None:
            raise
        raise target.error from None


def load_checkpoint(run_dir: Path) -> dict:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file: say which, in one line
        raise UserError(f"{path}: cannot read checkpoint ({type(err).__name__})") from None


def checkpoint_bytes(run_dir: Path) -> int | None:
    path = Path(run_dir) / CHECKPOINT
    return path.stat().st_size if path.is_file() else None


def append_metrics(run_dir: Path, record: dict) -> None:
    if not _writer:
        return
    path = run_dir / "metrics.jsonl"
    with _one_line(path), open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def rewrite_metrics(run_dir: Path, history: list[dict]) -> None:
    """On resume: metrics.jsonl holds exactly the checkpoint's epochs (drops any written after it)."""
    if not _writer:
        return
    text = "".join(json.dumps(record) + "\n" for record in history)
    write_atomic(run_dir / "metrics.jsonl", lambda f: f.write(text.encode()))


def write_summary(run_dir: Path, summary: dict) -> None:
    if not _writer:
        return
    text = json.dumps(summary, indent=2) + "\n"
    write_atomic(run_dir / "summary.json", lambda f: f.write(text.encode()))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
