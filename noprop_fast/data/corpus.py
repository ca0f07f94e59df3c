"""The embedded default corpus of `--task lm` (docs/language.md, "Token data"): English text that
every CPython carries, so a fresh machine trains offline. A document is in val when the CRC-32 of
its text is 0 mod VAL_MODULUS, whatever the order. The two shards are built on first use into
`<cache>/noprop_fast/stdlib-corpus-<key>/`, named like FineWeb's.
"""
import ast
import hashlib
import itertools
import os
import shutil
import sys
import sysconfig
import tempfile
import time
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import DataError
from .shards import TokenData, write_shard
from .tokenizer import get_tokenizer

CORPUS_FORMAT = 1  # bump when the documents or the shard layout change: the cache key hashes it
MIN_DOCSTRING_CHARS = 200  # shorter docstrings are mostly one-line summaries and parameter lists
VAL_MODULUS = 10  # ~10% of documents (~0.14M byte tokens) are held out for validation
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages",
                       "__pycache__"})
PREFIX = "stdlib"
TRAIN_FILE, VAL_FILE = f"{PREFIX}_train_000001.bin", f"{PREFIX}_val_000000.bin"


def _stdlib_sources() -> list[Path]:
    """The stdlib's .py files outside SKIP_DIRS, sorted, so the document order is fixed."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))


def _docstrings(path: Path) -> Iterator[str]:
    """The module, class and function docstrings of one source file, dedented (inspect.cleandoc)."""
    try:
        with warnings.catch_warnings():  # invalid escape sequences and the like in old sources
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return  # a file this Python cannot parse (or read) is simply not part of the corpus
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node, clean=True)
            if text and len(text) >= MIN_DOCSTRING_CHARS:
                yield text


def corpus_documents() -> Iterator[str]:
    """The corpus's texts in a fixed order: pydoc topics (sorted by name), then docstrings."""
    from pydoc_data.topics import topics
    seen: set[str] = set()
    docstrings = (doc for path in _stdlib_sources() for doc in _docstrings(path))
    for text in itertools.chain((topics[name] for name in sorted(topics)), docstrings):
        text = text.strip()
        if text and text not in seen:
            seen.add(text)
            yield text


def is_val_document(text: str) -> bool:
    """The stable train/val split: by a hash of the text, never by position."""
    return zlib.crc32(text.encode("utf-8")) % VAL_MODULUS == 0


def cache_root() -> Path:
    """$NOPROP_FAST_CACHE, else $XDG_CACHE_HOME, else ~/.cache."""
    for var in ("NOPROP_FAST_CACHE", "XDG_CACHE_HOME"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    return Path.home() / ".cache"


def corpus_key() -> str:
    """Another Python (version or build) has other docstrings, so it builds its own corpus."""
    ident = f"{sys.implementation.name} {sys.version} corpus format {CORPUS_FORMAT}"
    v = sys.version_info
    return f"py{v.major}.{v.minor}.{v.micro}-{hashlib.sha256(ident.encode()).hexdigest()[:10]}"


def _is_complete(folder: Path) -> bool:
    return (folder / TRAIN_FILE).is_file() and (folder / VAL_FILE).is_file()


def _build(folder: Path) -> tuple[int, int, int]:
    """Tokenize the documents into the two shards in `folder`; returns (documents, train, val)."""
    tokenizer = get_tokenizer("byte")
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}  # is_val -> per-document tokens
    documents = 0
    for text in corpus_documents():
        # EOT starts each document, so a window that crosses a boundary sees where it is
        parts[is_val_document(text)].append(
            np.asarray([tokenizer.eot, *tokenizer.encode(text)], dtype=np.uint16))
        documents += 1
    if not parts[False] or not parts[True]:
        raise DataError(f"the standard library at {sysconfig.get_paths()['stdlib']} gave "
                        f"{documents} documents, too few for a train and a val split")
    train, val = np.concatenate(parts[False]), np.concatenate(parts[True])
    write_shard(folder / VAL_FILE, val, tokenizer="byte", vocab_size=tokenizer.vocab_size)
    write_shard(folder / TRAIN_FILE, train, tokenizer="byte", vocab_size=tokenizer.vocab_size)
    return documents, len(train), len(val)


def embedded_corpus_dir(cache_dir: str | Path | None = None, progress: bool = True) -> Path:
    """The folder of the embedded corpus's shards under `cache_dir` (default: `cache_root()`).
    Built into a temporary folder beside it and renamed into place: a crash leaves no half-built
    corpus, and of two processes building at once the second drops its copy and uses the first's.
    `progress`: a line on stderr when it builds and one with the sizes when done."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    folder = root / "noprop_fast" / f"stdlib-corpus-{corpus_key()}"
    if _is_complete(folder):
        return folder
    if progress:
        print("building the embedded corpus from the Python standard library's docs (once) ...",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-", dir=folder.parent))
        building.chmod(0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
    except OSError as err:
        raise DataError(f"cannot write the embedded corpus under {folder.parent} ({err.strerror}); "
                        "set NOPROP_FAST_CACHE to a writable folder") from None
    try:
        documents, train_tokens, val_tokens = _build(building)
        try:
            building.rename(folder)
        except OSError:  # another process finished first (or a stale, incomplete folder is there)
            if not _is_complete(folder):
                raise DataError(f"{folder} exists but is incomplete; delete it to rebuild") \
                    from None
    finally:
        shutil.rmtree(building, ignore_errors=True)  # gone after a rename; a leftover otherwise
    if progress:
        print(f"embedded corpus: {documents:,} documents, {train_tokens:,} train and "
              f"{val_tokens:,} val tokens (bytes) in {folder} ({time.perf_counter() - start:.1f}s)",
              file=sys.stderr, flush=True)
    return folder


def load_token_data(data_dir: str | None, show_progress: bool = True) -> TokenData:
    """The shards of `data_dir`, or the embedded corpus (built and cached on first use)."""
    if data_dir is None:
        data_dir = embedded_corpus_dir(progress=show_progress)
    return TokenData.load(data_dir)
