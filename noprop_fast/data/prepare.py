"""Command line: `python -m noprop_fast.data.prepare --out DIR [--input FILE_OR_GLOB ...]`
(docs/language.md, "Token data"; the options: `--help`).
Shards named like FineWeb's (`{prefix}_val_000000.bin`, `{prefix}_train_000001.bin`, ...); the
val shard takes whole documents, so none is in both splits. A shard is written only when full or
at the input's end, through a temporary file, so a crash or Ctrl-C leaves only complete shards.
"""
import argparse
import functools
import glob
import itertools
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..config import OneLineArgumentParser
from ..errors import ConfigError, DataError, UserError, cli_main
from .formats import import_datasets, one_line_error
from .shards import ShardInfo, write_shard
from .tokenizer import get_tokenizer

FINEWEB = "HuggingFaceFW/fineweb"
LOADERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DEFAULT_VAL_TOKENS = {"fineweb": 10_000_000, "input": 1_000_000}
FINEWEB_MAX_TOKENS = 1_000_000_000  # 10 shards: FineWeb's sample-10BT holds 10B tokens


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m noprop_fast.data.prepare",
        description="Tokenize FineWeb (streamed from the Hub) or local text into token shards.")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the shards")
    parser.add_argument("--input", nargs="+", metavar="FILE_OR_GLOB",
                        help="local .txt/.md/.jsonl/.json/.parquet files [default: stream FineWeb]")
    parser.add_argument("--text-field", default="text",
                        help="the text's field (.jsonl/.json) or column (.parquet) [default text]")
    parser.add_argument("--fineweb-name", default="sample-10BT",
                        help="FineWeb subset to stream [default sample-10BT]")
    parser.add_argument("--tokenizer", choices=("gpt2", "byte"), default="gpt2",
                        help="gpt2 needs tiktoken; byte: UTF-8 bytes, vocabulary 257 "
                        "[default gpt2]")
    parser.add_argument("--val-tokens", type=int, metavar="N",
                        help="the val shard takes whole documents until it has N tokens "
                        f"[default {DEFAULT_VAL_TOKENS['fineweb']:,} for FineWeb, "
                        f"{DEFAULT_VAL_TOKENS['input']:,} for --input]")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N",
                        help="tokens per train shard [default 100,000,000]")
    parser.add_argument("--max-tokens", type=int, metavar="N",
                        help="stop after N tokens in all (the last document is cut) "
                        f"[default {FINEWEB_MAX_TOKENS:,} for FineWeb, no limit for --input]")
    parser.add_argument("--prefix", help="shard name prefix [default fineweb, or data for --input]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _texts(open_dataset, field: str, where: str, hint: str = "") -> Iterator[str]:
    """The non-empty texts of a `datasets` stream; anything the stream raises is one DataError."""
    try:
        for index, row in enumerate(open_dataset()):
            if field not in row:
                raise DataError(f"{where}: no field {field!r} (it has {', '.join(map(str, row))}); "
                                "name the text's field with --text-field")
            if not isinstance(row[field], str):
                raise DataError(f"{where}: record {index}: {field!r} is "
                                f"{type(row[field]).__name__}, not text")
            if row[field]:
                yield row[field]
    except UserError:
        raise
    except Exception as err:  # network, a missing or corrupt file, bad JSON, undecodable text ...
        raise DataError(f"{where}: {one_line_error(err)}{hint}") from None


def _datasets():
    datasets = import_datasets("streaming FineWeb, or reading .jsonl/.json/.parquet text,",
                               "plain-text input (.txt, .md), token shards already prepared, "
                               "and the default corpus need nothing more")
    datasets.disable_progress_bars()
    return datasets


def fineweb_texts(name: str) -> Iterator[str]:
    """FineWeb's documents, streamed from the Hugging Face Hub."""
    datasets = _datasets()
    open_dataset = functools.partial(datasets.load_dataset, FINEWEB, name=name, split="train",
                                     streaming=True)
    yield from _texts(open_dataset, "text", f"cannot stream {FINEWEB} ({name}) from the Hub",
                      hint="; streaming FineWeb needs network access: to prepare local files, "
                      "use --input FILE ...")


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """Files named or matched (globs sorted), each with a known extension; else a DataError."""
    files = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matched = sorted(Path(p) for p in glob.glob(pattern, recursive=True)
                             if Path(p).is_file())
            if not matched:
                raise DataError(f"--input {pattern}: no file matches")
            files += matched
        elif Path(pattern).is_file():
            files.append(Path(pattern))
        else:
            raise DataError(f"--input {pattern}: no such file")
    for path in files:
        if path.suffix.lower() not in LOADERS:
            raise DataError(f"{path}: unknown extension {path.suffix or '(none)'!r}; "
                            f"--input takes {', '.join(LOADERS)}")
    return files


def read_text_file(path: Path) -> str:
    """A .txt/.md file as one document, read as `datasets`' text loader reads it (UTF-8, universal
    newlines), but without that package or its cache: plain text needs neither."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: {one_line_error(err)}") from None


def file_texts(files: list[Path], field: str) -> Iterator[str]:
    """The documents of local files, in order: one per text file, one per JSON record or row.
    `datasets` is imported only for JSON and Parquet files."""
    for path in files:
        loader = LOADERS[path.suffix.lower()]
        if loader == "text":
            if text := read_text_file(path):
                yield text
            continue
        datasets = _datasets()
        open_dataset = functools.partial(datasets.load_dataset, loader, data_files=[str(path)],
                                         split="train", streaming=True)
        yield from _texts(open_dataset, field, str(path))


def encoded_documents(texts: Iterable[str], tokenizer, batch: int = 256) -> Iterator[np.ndarray]:
    """Each document's tokens, EOT first: uint16 [1 + len(ids)] (every vocabulary here is below
    2^16). Documents go to `encode_batch` `batch` at a time: tiktoken encodes a batch on threads."""
    texts = iter(texts)
    while documents := list(itertools.islice(texts, batch)):
        for ids in tokenizer.encode_batch(documents):
            tokens = np.empty(1 + len(ids), dtype=np.uint16)
            tokens[0], tokens[1:] = tokenizer.eot, ids
            yield tokens


class ShardWriter:
    """Fills the val shard with whole documents, then train shards of exactly `shard_tokens`."""

    def __init__(self, out: Path, prefix: str, tokenizer, val_tokens: int, shard_tokens: int):
        self.out, self.prefix, self.tokenizer = out, prefix, tokenizer
        self.val_tokens, self.shard_tokens = val_tokens, shard_tokens
        self.val_parts: list[np.ndarray] = []
        self.val_count = 0
        self.buffer: np.ndarray | None = None  # the train shard being filled, made on first use
        self.fill = 0
        self.written: list[ShardInfo] = []

    def _write(self, split: str, tokens: np.ndarray) -> None:
        if not self.written:  # created with the first shard, so a failed start leaves no folder
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise DataError(f"--out {self.out}: cannot create it ({err.strerror})") from None
        path = self.out / f"{self.prefix}_{split}_{len(self.written):06d}.bin"
        self.written.append(write_shard(path, tokens, tokenizer=self.tokenizer.name,
                                        vocab_size=self.tokenizer.vocab_size))

    def add(self, tokens: np.ndarray) -> None:
        if self.val_count < self.val_tokens:
            self.val_parts.append(tokens)
            self.val_count += len(tokens)
            return
        if self.val_parts:  # held back until now, so an input too small for train writes nothing
            self._write("val", np.concatenate(self.val_parts))
            self.val_parts = []
        if self.buffer is None:
            self.buffer = np.empty(self.shard_tokens, dtype=np.uint16)
        start = 0
        while start < len(tokens):
            take = min(len(tokens) - start, self.shard_tokens - self.fill)
            self.buffer[self.fill:self.fill + take] = tokens[start:start + take]
            self.fill += take
            start += take
            if self.fill == self.shard_tokens:
                self._write("train", self.buffer)
                self.fill = 0

    def finish(self) -> list[ShardInfo]:
        if not self.written and self.fill == 0:
            raise DataError(f"the input (or --max-tokens) ran out after {self.val_count:,} "
                            f"tokens, all of them for the val shard (which takes whole documents until it has "
                            f"{self.val_tokens:,}); lower --val-tokens or give more documents "
                            "(a .txt file is one document; .jsonl holds one per line)")
        if self.fill:
            self._write("train", self.buffer[:self.fill])
            self.fill = 0
        return self.written


def prepare(texts: Iterable[str], writer: ShardWriter, max_tokens: int | None,
            progress: bool) -> list[ShardInfo]:
    """Tokenize `texts` into `writer`'s shards, stopping after `max_tokens` (the last one cut)."""
    from tqdm import tqdm
    total = 0
    with tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokens", file=sys.stderr,
              disable=not progress, dynamic_ncols=True) as bar:
        documents = encoded_documents(texts, writer.tokenizer)
        for tokens in documents:
            if max_tokens is not None:
                tokens = tokens[:max_tokens - total]
            writer.add(tokens)
            total += len(tokens)
            bar.update(len(tokens))
            if total == max_tokens:
                documents.close()  # closes the stream now
                break
    return writer.finish()


def run(argv: list[str] | None = None) -> list[ShardInfo]:
    """Parse, tokenize, write the shards, print them; returns what was written."""
    args = build_parser().parse_args(argv)
    source = "input" if args.input else "fineweb"
    val_tokens = args.val_tokens if args.val_tokens is not None else DEFAULT_VAL_TOKENS[source]
    max_tokens = args.max_tokens
    if max_tokens is None and not args.input:
        max_tokens = FINEWEB_MAX_TOKENS
    for flag, value in (("--val-tokens", val_tokens), ("--shard-tokens", args.shard_tokens),
                        ("--max-tokens", max_tokens)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, not {value}")
    if max_tokens is not None and max_tokens <= val_tokens:
        raise ConfigError(f"--max-tokens ({max_tokens:,}) must exceed --val-tokens "
                          f"({val_tokens:,}), or nothing is left for training")
    prefix = args.prefix or ("data" if args.input else "fineweb")
    if not re.fullmatch(r"[A-Za-z0-9.-]+", prefix):  # no '_': the loader splits names on it
        raise ConfigError(f"--prefix {prefix!r}: use letters, digits, '-' and '.'")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: not a folder")
    existing = sorted(p.name for split in ("train", "val") for p in out.glob(f"*_{split}_*.bin"))
    if existing:
        raise DataError(f"--out {out} already holds shards ({existing[0]}, ...), which the loader "
                        "would mix with the new ones; choose another folder or delete them")
    tokenizer = get_tokenizer(args.tokenizer)  # a missing tokenizer fails before any download
    texts = file_texts(resolve_inputs(args.input), args.text_field) if args.input \
        else fineweb_texts(args.fineweb_name)
    writer = ShardWriter(out, prefix, tokenizer, val_tokens, args.shard_tokens)
    written = prepare(texts, writer, max_tokens,
                      progress=not args.no_progress and sys.stderr.isatty())
    print(f"wrote {len(written)} shards ({tokenizer.name} tokens, "
          f"{sum(s.num_tokens for s in written):,} in all) to {out}: "
          + ", ".join(f"{s.path.name} {s.num_tokens:,}" for s in written))
    return written


def main(argv: list[str] | None = None) -> int:
    return cli_main(run, argv, interrupted="the shards already written are complete; "
                    "the one being filled was dropped")


if __name__ == "__main__":
    sys.exit(main())
