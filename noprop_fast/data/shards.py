"""Token shards (the FineWeb token-shard format) and the batches a language model trains on.

A shard is a header of 256 little-endian int32, then uint16 token ids:

    header[0] = 20240520    magic
    header[1] = 1           version (uint16 ids)
    header[2] = n           number of tokens; the file is exactly 1024 + 2 n bytes
    header[3] = tokenizer   0 = gpt2, 1 = byte (this project's addition; published shards leave it 0)
    header[4] = vocab size  0 = the tokenizer's default (50257 for gpt2, 257 for byte)

so a shard from another writer, with zeros there, reads as GPT-2. A folder holds `*_train_*.bin`
and `*_val_*.bin`; a fault is a one-line `DataError` naming the file and what was expected.

Batches: a split is one stream (its shards in name order), EOT starting each document. A window is
seq_len + 1 consecutive tokens w; x = w[:-1], y = w[1:]. Training windows lie on a grid of stride
seq_len from an offset drawn anew each epoch, in a random order, both from a torch.Generator seeded
by (seed, epoch): a run is reproducible and resumes from two integers.
"""

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from noprop_fast.data.tokenizer import ByteTokenizer, GPT2Tokenizer
from noprop_fast.errors import ConfigError, DataError

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = 4 * HEADER_INTS
TOKENIZER_CODES = {"gpt2": 0, "byte": 1}
DEFAULT_VOCAB = {"gpt2": GPT2Tokenizer.vocab_size, "byte": ByteTokenizer.vocab_size}
MAX_VOCAB = 65536  # what a uint16 id can index
_CHECK_CHUNK = 1 << 24  # tokens per step of the id check and the unigram count (32 MiB of uint16)


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    num_tokens: int
    tokenizer: str
    vocab_size: int  # resolved: the header's 0 becomes the tokenizer's default


def write_shard(path, tokens, tokenizer: str = "gpt2", vocab_size: int | None = None) -> ShardInfo:
    """Write `tokens` (ints, 0 <= id < vocab_size) as a shard; through a temp file and a rename,
    so a crash leaves either the old file or the complete new one."""
    path = Path(path)
    if tokenizer not in TOKENIZER_CODES:
        raise ConfigError(f"unknown tokenizer {tokenizer!r}, expected one of: {', '.join(TOKENIZER_CODES)}")
    vocab = DEFAULT_VOCAB[tokenizer] if vocab_size is None else int(vocab_size)
    if not 1 <= vocab <= MAX_VOCAB:
        raise ConfigError(f"vocab_size {vocab} does not fit a uint16 token shard (1..{MAX_VOCAB})")
    ids = np.asarray(tokens)
    if ids.size == 0:
        ids = np.zeros(0, dtype=np.uint16)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise DataError(f"{path}: tokens must be a 1-D sequence of ints, got {ids.dtype} of shape {ids.shape}")
    bad = _first_out_of_range(ids, vocab)
    if bad is not None:
        raise DataError(f"{path}: token id {ids[bad]} at index {bad} is outside the vocabulary (0..{vocab - 1})")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:5] = MAGIC, VERSION, len(ids), TOKENIZER_CODES[tokenizer], 0 if vocab_size is None else vocab
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            header.tofile(f)
            ids.astype("<u2", copy=False).tofile(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return ShardInfo(path, len(ids), tokenizer, vocab)


def read_header(path) -> ShardInfo:
    """Validate a shard's header against its size; the token ids are not read."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a token shard") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e.strerror})") from None
    if size < HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte header of a token shard")
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, count, code, vocab = (int(v) for v in header[:5])
    if magic != MAGIC:
        hint = " (20240801 is llm.c's Llama-3 format with uint32 ids, not supported)" if magic == 20240801 else ""
        raise DataError(f"{path}: bad magic {magic} in header[0], expected {MAGIC} (a uint16 token shard){hint}")
    if version != VERSION:
        raise DataError(f"{path}: version {version} in header[1], expected {VERSION} (uint16 token ids)")
    expected = HEADER_BYTES + 2 * count
    if count < 0 or size != expected:
        fault = "truncated file" if size < expected else f"{size - expected} bytes more than the header says"
        raise DataError(f"{path}: size {size} bytes, but header[2] says {count} tokens "
                        f"({expected} bytes = {HEADER_BYTES}-byte header + 2 per token): {fault}")
    names = {c: n for n, c in TOKENIZER_CODES.items()}
    if code not in names:
        known = ", ".join(f"{c} = {n}" for n, c in TOKENIZER_CODES.items())
        raise DataError(f"{path}: unknown tokenizer code {code} in header[3] (known: {known})")
    if not 0 <= vocab <= MAX_VOCAB:
        raise DataError(f"{path}: vocabulary size {vocab} in header[4], expected 0 (the default) or 1..{MAX_VOCAB}")
    tokenizer = names[code]
    return ShardInfo(path, count, tokenizer, vocab or DEFAULT_VOCAB[tokenizer])


def _first_out_of_range(ids: np.ndarray, vocab: int) -> int | None:
    """Index of the first id outside 0..vocab-1, or None; chunked, so a memmap is read once in
    pieces instead of being materialised as a boolean array of its full length."""
    for start in range(0, len(ids), _CHECK_CHUNK):
        chunk = ids[start : start + _CHECK_CHUNK]
        if chunk.max() >= vocab or chunk.min() < 0:
            return start + int(np.argmax((chunk >= vocab) | (chunk < 0)))
    return None


def read_shard(path, vocab_size: int | None = None) -> np.ndarray:
    """The shard's ids as a read-only uint16 memmap, every id checked against `vocab_size` (default:
    the header's). The check reads the whole file once (about 0.1 s per 100M tokens when cached)."""
    info = read_header(path)
    vocab = info.vocab_size if vocab_size is None else int(vocab_size)
    if info.num_tokens == 0:
        return np.zeros(0, dtype=np.uint16)  # mmap cannot map zero bytes
    ids = np.memmap(info.path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(info.num_tokens,))
    if vocab < MAX_VOCAB:
        bad = _first_out_of_range(ids, vocab)
        if bad is not None:
            raise DataError(f"{info.path}: token id {ids[bad]} at index {bad} is outside the "
                            f"vocabulary of {vocab} ids ({info.tokenizer}): a corrupt shard or the "
                            "wrong tokenizer")
    return ids


def _check_split(split: str) -> None:
    if split not in ("train", "val"):
        raise ConfigError(f"unknown split {split!r}, expected 'train' or 'val'")


def find_shards(data_dir, split: str) -> list[Path]:
    """The files `*_{split}_*.bin` directly in `data_dir`, sorted by name."""
    _check_split(split)
    folder, pattern = Path(data_dir), f"*_{split}_*.bin"
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "no such folder"
        raise DataError(f"{folder}: {what} (expected token shards {pattern})")
    shards = sorted(p for p in folder.glob(pattern) if p.is_file())
    if not shards:
        nested = sorted({p.parent.name for p in folder.glob(f"*/{pattern}")})
        hint = f"; sub-folder {', '.join(nested)} has them, pass that folder" if nested else ""
        raise DataError(f"{folder}: no token shards matching {pattern} (FineWeb's: fineweb_{split}_000000.bin){hint}")
    return shards


@dataclass
class TokenData:
    """Both splits of a shard folder, validated, with one tokenizer and vocabulary throughout."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    tokenizer: str
    vocab_size: int
    source: str

    @classmethod
    def load(cls, data_dir) -> "TokenData":
        paths = {split: find_shards(data_dir, split) for split in ("train", "val")}
        infos = [read_header(p) for split in ("train", "val") for p in paths[split]]
        first = infos[0]
        for info in infos[1:]:
            if (info.tokenizer, info.vocab_size) != (first.tokenizer, first.vocab_size):
                raise DataError(f"{info.path}: tokenizer {info.tokenizer} with vocabulary "
                                f"{info.vocab_size}, but {first.path} has {first.tokenizer} with "
                                f"{first.vocab_size}; every shard must use the same")
        shards = {split: [read_shard(p, first.vocab_size) for p in paths[split]] for split in paths}
        counts = {split: sum(len(s) for s in shards[split]) for split in shards}
        source = (f"{data_dir}: {len(shards['train'])} train shards ({counts['train']} tokens), "
                  f"{len(shards['val'])} val ({counts['val']} tokens), {first.tokenizer} "
                  f"vocabulary {first.vocab_size}")
        return cls(shards["train"], shards["val"], first.tokenizer, first.vocab_size, source)

    def num_tokens(self, split) -> int:
        _check_split(split)
        return sum(len(s) for s in getattr(self, split))


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """H = -sum_v p_v ln p_v in nats per token, p the unigram frequencies of `tokens`: the best
    cross-entropy of a model that ignores its context."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), _CHECK_CHUNK):  # bincount would otherwise widen all ids to int64
        chunk = np.bincount(np.asarray(tokens[start : start + _CHECK_CHUNK]), minlength=vocab_size)
        if len(chunk) > vocab_size:
            raise ValueError(f"token id {len(chunk) - 1} is outside the vocabulary of {vocab_size}")
        counts += chunk
    total = int(counts.sum())
    if total == 0:
        raise ValueError("the unigram entropy of no tokens is undefined")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


class _Stream:
    """The shards of a split as one sequence of tokens, read by copying windows out of it."""

    def __init__(self, shards: Sequence[np.ndarray]):
        self.shards = list(shards)
        self.ends = np.cumsum([len(s) for s in self.shards], dtype=np.int64)
        self.num_tokens = int(self.ends[-1]) if self.shards else 0

    def copy_into(self, start: int, out: np.ndarray) -> None:
        """out[:] = tokens[start : start + len(out)], across shard borders where needed."""
        i = int(np.searchsorted(self.ends, start, side="right"))  # first shard ending after `start`
        local, filled = start - (int(self.ends[i]) - len(self.shards[i])), 0
        while filled < len(out):
            piece = self.shards[i][local : local + len(out) - filled]
            out[filled : filled + len(piece)] = piece
            filled, i, local = filled + len(piece), i + 1, 0


def _assemble(stream: _Stream, starts: np.ndarray, seq_len: int, device: torch.device):
    """(x, y) int64 [B, seq_len] on `device` from the windows at `starts`. For an accelerator: int32
    in pinned host memory, copied without blocking, widened on the device (PyTorch's host allocator
    does not reuse a pinned buffer before the copy that reads it has finished)."""
    on_host = device.type == "cpu"
    windows = torch.empty((len(starts), seq_len + 1), dtype=torch.int64 if on_host else torch.int32,
                          pin_memory=device.type == "cuda")
    rows = windows.numpy()
    for row, start in zip(rows, starts):
        stream.copy_into(int(start), row)
    if not on_host:
        windows = windows.to(device, non_blocking=True).long()
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def _check_sizes(batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ConfigError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside a world of {world_size} processes")


def _too_short(split: str, stream: _Stream, seq_len: int) -> DataError:
    return DataError(f"{split} split: {stream.num_tokens} tokens in {len(stream.shards)} shards, "
                     f"fewer than seq_len + 1 = {seq_len + 1} needed for one window")


def _check_windows(split: str, num_tokens: int, num_windows: int, seq_len: int, world_size: int):
    if num_windows < world_size:
        raise DataError(f"{split} split: {num_tokens} tokens make {num_windows} windows of "
                        f"seq_len + 1 = {seq_len + 1} tokens, fewer than the {world_size} "
                        "processes that each need one")


class TokenBatches:
    """Training batches (x, y), both int64 [batch, seq_len], as the module docstring says.

    Every process draws the same window order and rank r takes every W-th window of it, so W
    processes see disjoint windows (`windows_per_epoch` each; the order's last windows are left out
    when their number does not divide by W). A batch may span two epochs. `state_dict()` holds the
    epoch and position, so a resumed run continues the same stream."""

    def __init__(self, shards: list[np.ndarray], batch_size: int, seq_len: int, device, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        _check_sizes(batch_size, seq_len, rank, world_size)
        self.stream = _Stream(shards)
        self.batch_size, self.seq_len, self.device = batch_size, seq_len, torch.device(device)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        n = self.stream.num_tokens
        if n < seq_len + 1:
            raise _too_short("train", self.stream, seq_len)
        # Windows at offset + k * seq_len, k < num_windows, must end inside the stream. With the
        # offset anywhere in [0, seq_len) that allows (n - 1) // seq_len - 1 windows; with a
        # single window the offset takes whatever slack there is.
        full = (n - 1) // seq_len
        self._num_windows = full - 1 if full >= 2 else 1
        self._max_offset = seq_len if full >= 2 else n - seq_len
        _check_windows("train", n, self._num_windows, seq_len, world_size)
        self.windows_per_epoch = self._num_windows // world_size  # per process
        self._set_position(0, 0)

    def _set_position(self, epoch: int, position: int) -> None:
        """This rank's window starts for `epoch`, to be read from index `position` on."""
        # SeedSequence mixes (seed, epoch) so that nearby pairs give unrelated streams
        mixed = np.random.SeedSequence([self.seed % 2**64, epoch]).generate_state(1, np.uint64)[0]
        g = torch.Generator().manual_seed(int(mixed >> 1))
        offset = int(torch.randint(self._max_offset, (1,), generator=g))
        order = torch.randperm(self._num_windows, generator=g).numpy()
        mine = order[: self.windows_per_epoch * self.world_size][self.rank :: self.world_size]
        self._starts = offset + self.seq_len * mine.astype(np.int64)
        self.epoch, self.position = epoch, position

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        parts, needed = [], self.batch_size
        while needed:
            if self.position == self.windows_per_epoch:
                self._set_position(self.epoch + 1, 0)
            take = min(needed, self.windows_per_epoch - self.position)
            parts.append(self._starts[self.position : self.position + take])
            self.position, needed = self.position + take, needed - take
        return _assemble(self.stream, np.concatenate(parts), self.seq_len, self.device)

    def state_dict(self) -> dict:
        """Plain ints (no tensors): the same on every rank, so rank 0's copy resumes them all."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "seq_len": self.seq_len,
                "world_size": self.world_size, "num_tokens": self.stream.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        ours = self.state_dict()
        for key in ("seq_len", "world_size"):
            if int(state[key]) != ours[key]:
                raise ConfigError(f"the batch stream was saved with {key} = {state[key]}, this run has {ours[key]}")
        if int(state["num_tokens"]) != ours["num_tokens"]:
            raise DataError(f"the batch stream was saved over {state['num_tokens']} training "
                            f"tokens, this run has {ours['num_tokens']}: resume with the same data")
        if not 0 <= int(state["position"]) <= self.windows_per_epoch:
            raise DataError(f"batch stream position {state['position']} is outside 0..{self.windows_per_epoch}")
        self.seed = int(state["seed"])
        self._set_position(int(state["epoch"]), int(state["position"]))


def val_batches(shards, batch_size, seq_len, device, max_tokens: int | None = None, rank=0, world_size=1):
    """(x, y) batches like TokenBatches' of the val tokens in order, window k starting at token
    k * seq_len (up to max_tokens targets), so the targets cover tokens 1 .. K * seq_len once.
    With W processes the K windows are cut to a multiple of W and rank r takes the r-th contiguous
    block: equal shares, so the mean of the per-process means is the mean over all tokens. Sizes
    are checked here, before the first batch."""
    _check_sizes(batch_size, seq_len, rank, world_size)
    stream, device = _Stream(shards), torch.device(device)
    if stream.num_tokens < seq_len + 1:
        raise _too_short("val", stream, seq_len)
    num_windows = (stream.num_tokens - 1) // seq_len
    if max_tokens is not None:
        if max_tokens < seq_len:
            raise ConfigError(f"max_tokens = {max_tokens} is less than one window of seq_len = {seq_len} tokens")
        num_windows = min(num_windows, max_tokens // seq_len)
    _check_windows("val", stream.num_tokens, num_windows, seq_len, world_size)
    per_rank = num_windows // world_size
    first = rank * per_rank

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for begin in range(first, first + per_rank, batch_size):
            window_ids = np.arange(begin, min(begin + batch_size, first + per_rank), dtype=np.int64)
            yield _assemble(stream, seq_len * window_ids, seq_len, device)

    return batches()
