"""Readers for MNIST's IDX files and CIFAR's python pickles, and the folder search. Every header
and size is checked, and a fault is a one-line `DataError` naming the file, what was expected and
what was found (not a reshape error deep inside numpy).

IDX (big-endian): two zero bytes, a type byte (0x08 = uint8, ...), the number of dimensions d, d
int32 sizes, then the items. MNIST: images [n, 28, 28] uint8 (magic 0x00000803), labels [n] uint8
(magic 0x00000801). CIFAR: a pickled dict with b"data", uint8 [n, 3072], each row channel-first
(row[c*1024 + h*32 + w] = pixel [c, h, w]), and b"labels" (CIFAR-10) or b"fine_labels" (CIFAR-100).
"""

import gzip
import io
import os
import pickle
import zlib

import numpy as np

from noprop_fast.errors import DataError

IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dim

# IDX type byte -> big-endian numpy dtype.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MAGIC_NAMES = {IDX_IMAGES_MAGIC: "uint8, 3 dims: images", IDX_LABELS_MAGIC: "uint8, 1 dim: labels"}

# How many classes each CIFAR label key indexes, for the range check.
_CIFAR_LABEL_CLASSES = {b"labels": 10, b"fine_labels": 100, b"coarse_labels": 20}

MAX_SEARCH_DEPTH = 3  # DIR/MNIST/raw/ is depth 2; one level more for an extra wrapper folder


def one_line_error(exc: BaseException) -> str:
    """An exception as one short line, for embedding in a DataError message."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def import_datasets(needed_for: str, without_it: str):
    """The `datasets` package, imported where it is used: it is slow to import, and the engine runs
    without it (digits, IDX and CIFAR files, token shards). Absent: a one-line DataError saying what
    needed it and what works without it."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{needed_for} needs the `datasets` package, which is not installed "
                        f"(pip install datasets); {without_it}") from None
    return datasets


def _read_bytes(path: str) -> bytes:
    """The file's bytes, decompressed when it starts with the gzip magic 1f 8b (by content, not by
    the `.gz` suffix: browsers unpack `train-images-idx3-ubyte.gz` and keep the name)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({one_line_error(e)})") from None
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt gzip data ({one_line_error(e)})") from None


def read_idx(path: str, magic: int | None = None) -> np.ndarray:
    """An IDX file (plain or gzipped) as a native-endian numpy array of its shape. `magic`: the
    4-byte header it must start with (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC); None: any valid one."""
    path = os.fspath(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header (at least 4)")
    found = int.from_bytes(raw[:4], "big")
    type_byte, ndim = raw[2], raw[3]
    if magic is not None and found != magic:
        raise DataError(f"{path}: bad IDX magic 0x{found:08x} (type 0x{type_byte:02x}, {ndim} "
                        f"dims), expected 0x{magic:08x} ({_MAGIC_NAMES.get(magic, 'IDX')})")
    if raw[:2] != b"\x00\x00" or type_byte not in _IDX_TYPES or ndim == 0:
        types = ", ".join(f"0x{t:02x}" for t in _IDX_TYPES)
        raise DataError(f"{path}: bad IDX magic 0x{found:08x}, expected 2 zero bytes, a type byte "
                        f"({types}) and a dimension count >= 1")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header of {ndim} dims ({header} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[type_byte])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        if magic == IDX_LABELS_MAGIC:
            what = f"{dims[0]} labels"
        elif magic == IDX_IMAGES_MAGIC:
            what = f"{dims[0]} images of {dims[1]}x{dims[2]}"
        else:
            what = f"shape {'x'.join(map(str, dims))} of {dtype.name}"
        raise DataError(f"{path}: size {len(raw)} bytes, header says {what} ({expected} bytes)")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    # astype copies into a writable, native-endian array (frombuffer over bytes is read-only).
    return data.astype(dtype.newbyteorder("="))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds (dicts, lists, strings, numbers, numpy arrays):
    an arbitrary pickle can run arbitrary code, so every other global is refused."""

    _ALLOWED = {(mod, name) for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
                for name in ("_reconstruct", "scalar")} | {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
        ("_codecs", "encode"),  # how Python 3 writes bytes into a protocol-2 pickle
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which a CIFAR batch never does")
        return super().find_class(module, name)


def read_cifar_pickle(path: str, label_key: str | bytes) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: (data uint8 [n, 3, 32, 32], labels int64 [n]), any n. `label_key`:
    "labels" (CIFAR-10), "fine_labels" or "coarse_labels" (CIFAR-100)."""
    path = os.fspath(path)
    key = label_key.encode() if isinstance(label_key, str) else label_key
    raw = _read_bytes(path)
    try:
        # encoding="bytes": the originals were pickled by Python 2; their str keys become bytes.
        obj = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # a non-pickle can raise nearly anything (UnpicklingError, EOFError, ...)
        raise DataError(f"{path}: not a CIFAR python pickle ({one_line_error(e)})") from None
    if not isinstance(obj, dict):
        kind = type(obj).__name__
        raise DataError(f"{path}: CIFAR pickle holds a {kind}, expected a dict with b'data' and {key!r}")
    obj = {k.encode() if isinstance(k, str) else k: v for k, v in obj.items()}
    missing = [k for k in (b"data", key) if k not in obj]
    if missing:
        found = ", ".join(repr(k) for k in list(obj)[:8])
        raise DataError(f"{path}: CIFAR pickle lacks {', '.join(map(repr, missing))} (keys found: {found})")
    data = obj[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: b'data' is a {desc}, expected a uint8 array of shape [n, 3072]")
    try:
        labels = np.asarray(obj[key], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: {key!r} is not a list of ints ({one_line_error(e)})") from None
    if labels.ndim != 1 or len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images in b'data' but {key!r} has shape {labels.shape}")
    num_classes = _CIFAR_LABEL_CLASSES.get(key)
    if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        found = f"[{labels.min()}, {labels.max()}]"
        raise DataError(f"{path}: {key!r} has values in {found}, expected 0..{num_classes - 1}")
    # [n, 3072] -> [n, 3, 32, 32]: each row is channel-major (all red, then green, then blue).
    return data.reshape(-1, 3, 32, 32), labels


def find_file_set(root: str, wanted: dict[str, tuple[str, ...]], what: str) -> dict[str, str] | None:
    """entry -> path in the shallowest folder under `root` (depth <= 3) that holds one accepted
    file for every entry of `wanted` (entry -> accepted names, preferred first). None where no
    folder holds any; a DataError naming the missing files where some hold only part of the set."""
    best_partial: tuple[str, dict[str, str]] | None = None
    frontier = [(root, 0)]
    while frontier:  # breadth first, so shallower folders are preferred
        folder, depth = frontier.pop(0)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue  # an unreadable sub-folder is not where the data is
        files = {e.name for e in entries if e.is_file()}
        found = {}
        for entry, names in wanted.items():
            hit = next((n for n in names if n in files), None)
            if hit is not None:
                found[entry] = os.path.join(folder, hit)
        if len(found) == len(wanted):
            return found
        if found and (best_partial is None or len(found) > len(best_partial[1])):
            best_partial = (folder, found)
        if depth < MAX_SEARCH_DEPTH:
            frontier += [(e.path, depth + 1) for e in entries if e.is_dir() and not e.name.startswith(".")]
    if best_partial is None:
        return None
    folder, found = best_partial
    missing = [os.path.join(folder, entry) for entry in wanted if entry not in found]
    have = ", ".join(os.path.basename(p) for p in found.values())
    raise DataError(f"{', '.join(missing)}: missing ({what}; {folder} holds only {have})")
