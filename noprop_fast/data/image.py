"""Image classification datasets as normalised tensors, small enough to live whole on the device
(docs/usage.md, "Data": the splits, where MNIST and CIFAR are looked for, the normalisation). Every
problem a user can cause is a one-line `DataError`."""

import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from noprop_fast.data.formats import (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, find_file_set,
                                      import_datasets, one_line_error, read_cifar_pickle, read_idx)
from noprop_fast.errors import ConfigError, DataError

IMAGE_DATASETS = ("digits", "mnist", "cifar10", "cifar100")


@dataclass(frozen=True)
class _Spec:
    """What a dataset looks like and where the hub keeps it."""
    title: str
    hub_id: str
    channels: int
    num_classes: int
    image_columns: tuple[str, ...]  # preferred names in a datasets save, first match wins
    label_columns: tuple[str, ...]
    files: dict[str, tuple[str, ...]]  # original files: shown name -> accepted names, preferred first


# Plain before gzipped (some tools keep both; plain reads faster); the dotted variant
# (`train-images.idx3-ubyte`) is how some mirrors and Kaggle name them.
_MNIST_FILES = {
    f"{stem}-{kind}[.gz]": tuple(f"{stem}{sep}{kind}{gz}" for sep in "-." for gz in ("", ".gz"))
    for stem, kind in [("train-images", "idx3-ubyte"), ("train-labels", "idx1-ubyte"),
                       ("t10k-images", "idx3-ubyte"), ("t10k-labels", "idx1-ubyte")]
}
_CIFAR10_FILES = {n: (n,) for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
_CIFAR100_FILES = {"train": ("train",), "test": ("test",)}

_SPECS = {
    "mnist": _Spec("MNIST", "ylecun/mnist", 1, 10, ("image",), ("label",), _MNIST_FILES),
    "cifar10": _Spec("CIFAR-10", "uoft-cs/cifar10", 3, 10, ("img", "image"), ("label",), _CIFAR10_FILES),
    "cifar100": _Spec("CIFAR-100", "uoft-cs/cifar100", 3, 100, ("img", "image"),
                      ("fine_label", "label"), _CIFAR100_FILES),
}


@dataclass
class ImageData:
    """A train/test pair of normalised images and their labels, all on one device."""
    name: str
    train_x: torch.Tensor  # [N, C, H, W] float32, per-channel (x - train mean) / train std
    train_y: torch.Tensor  # [N] int64 in [0, num_classes)
    test_x: torch.Tensor  # [M, C, H, W] float32, normalised with the TRAIN statistics
    test_y: torch.Tensor  # [M] int64
    num_classes: int
    source: str  # one line: where the data came from, for logs and reports

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train_x.shape[1:])

    def to(self, device) -> "ImageData":
        """A copy with all four tensors on `device` (whole datasets live there: no loader)."""
        tensors = ("train_x", "train_y", "test_x", "test_y")
        return dataclasses.replace(self, **{k: getattr(self, k).to(device) for k in tensors})


def load_image_dataset(name: str, data_dir: str | None = None, device="cpu") -> ImageData:
    """Load `name` (one of IMAGE_DATASETS) normalised, on `device`; `data_dir`: where MNIST and
    CIFAR are kept (the module docstring), ignored by digits."""
    key = name.lower() if isinstance(name, str) else name
    if key not in IMAGE_DATASETS:
        raise DataError(f"unknown image dataset {name!r}, expected one of {', '.join(IMAGE_DATASETS)}")
    if key == "digits":
        x_train, y_train, x_test, y_test, source = _load_digits()
        num_classes = 10
    else:
        spec = _SPECS[key]
        num_classes = spec.num_classes
        if data_dir is None:
            x_train, y_train, x_test, y_test = _load_hub(spec)
            source = f"hub: {spec.hub_id}"
        else:
            x_train, y_train, x_test, y_test, source = _load_folder(key, spec, data_dir)
    if len(y_train) == 0:  # the statistics below would be NaN
        raise DataError(f"{source}: the train split is empty")
    if len(y_test) == 0:  # found here, not after the first epoch when it is evaluated
        raise DataError(f"{source}: the test split is empty")
    train_x, test_x = _to_unit_float(x_train), _to_unit_float(x_test)
    _normalise_(train_x, test_x)
    train_y, test_y = (torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
                       for y in (y_train, y_test))
    return ImageData(key, train_x, train_y, test_x, test_y, num_classes, source).to(device)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int,
            generator: torch.Generator | None = None, shuffle: bool = True,
            drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (xb [B, ...], yb [B]) from tensors that already sit on their device. With
    `shuffle`, a `torch.randperm` on x's device (`generator` must live there) and a gather per
    batch: no workers, no host round trip. The last batch has N % batch_size rows unless
    `drop_last` drops it."""
    n = x.shape[0]
    if y.shape[0] != n or x.device != y.device:
        raise ValueError(f"x has {n} rows on {x.device}, y has {y.shape[0]} on {y.device}; expected the same")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    stop = n - n % batch_size if drop_last else n
    order = torch.randperm(n, generator=generator, device=x.device) if shuffle else None
    for start in range(0, stop, batch_size):
        rows = slice(start, start + batch_size)
        idx = rows if order is None else order[rows]
        yield x[idx], y[idx]


def _load_digits():
    """scikit-learn's 1797 8x8 digits with the fixed stratified 1437 / 360 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # [1797, 8, 8] in 0..16 -> [1797, 1, 8, 8]
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=360, stratify=labels, random_state=0)
    source = "scikit-learn digits (bundled)"
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], source


def _load_folder(key: str, spec: _Spec, data_dir: str):
    """From a datasets save in `data_dir`, else from the original files under it."""
    folder = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    if not os.path.isdir(folder):
        what = "is a file, expected a folder" if os.path.exists(folder) else "data folder does not exist"
        raise DataError(f"{folder}: {what} (it should hold the {spec.title} data)")
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        datasets = import_datasets(f"{folder}: reading a datasets save (dataset_dict.json)",
                                   f"the original {spec.title} files need nothing more")
        try:
            saved = datasets.load_from_disk(folder)
        except Exception as e:  # a damaged save fails in many ways (json, arrow, missing shards)
            raise DataError(f"{folder}: cannot load the datasets save ({one_line_error(e)})") from None
        return (*_from_dataset_dict(saved, spec, folder), f"datasets save in {folder}")
    files = find_file_set(folder, spec.files, f"expected all {len(spec.files)} {spec.title} files in one folder")
    if files is None:
        shown = ", ".join(spec.files)
        extra = "" if key == "mnist" else f" (unpacked from the {spec.title} python tar.gz)"
        raise DataError(f"no {spec.title} data in {folder}: expected a datasets save "
                        f"(dataset_dict.json) or the files {shown}{extra}, in it or a sub-folder "
                        "up to depth 3")
    found_in = os.path.dirname(next(iter(files.values())))  # all files sit in one folder
    if key == "mnist":
        return (*_mnist_from_idx(list(files.values())), f"IDX files in {found_in}")
    label_key = "fine_labels" if key == "cifar100" else "labels"
    parts = [read_cifar_pickle(files[n], label_key) for n in spec.files]
    train, test = parts[:-1], parts[-1]  # the test file is listed last for both CIFARs
    x_train = np.concatenate([p[0] for p in train])
    y_train = np.concatenate([p[1] for p in train])
    return x_train, y_train, test[0], test[1], f"{spec.title} python pickles in {found_in}"


def _mnist_from_idx(paths: list[str]):
    """(x_train [N,1,H,W] uint8, y_train, x_test, y_test) from the four IDX paths, cross-checked."""
    out = []
    for images_path, labels_path in (paths[0:2], paths[2:4]):
        images = read_idx(images_path, IDX_IMAGES_MAGIC)  # [n, H, W] uint8
        labels = read_idx(labels_path, IDX_LABELS_MAGIC)  # [n] uint8
        if len(images) != len(labels):
            raise DataError(f"{labels_path}: {len(labels)} labels, but {images_path} holds {len(images)} images")
        if len(labels) and labels.max() >= 10:
            raise DataError(f"{labels_path}: label values up to {labels.max()}, expected 0..9")
        out += [images[:, None], labels.astype(np.int64)]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise DataError(f"{paths[2]}: images of {out[2].shape[2:]}, but the train images are {out[0].shape[2:]}")
    return tuple(out)


def _load_hub(spec: _Spec):
    """Download (or reuse the cache of) `spec.hub_id`; one-line DataError when offline."""
    datasets = import_datasets(f"downloading {spec.hub_id} from the dataset hub",
                               f"or pass --data-dir DIR with the original {spec.title} files")
    try:
        loaded = datasets.load_dataset(spec.hub_id)
    except Exception as e:  # offline shows up as ConnectionError, OfflineModeIsEnabled, OSError, ...
        raise DataError(f"could not reach the dataset hub for {spec.hub_id} ({one_line_error(e)}); "
                        f"pass --data-dir DIR with a datasets save or the original {spec.title} "
                        "files") from None
    return _from_dataset_dict(loaded, spec, f"hub: {spec.hub_id}")


def _from_dataset_dict(saved, spec: _Spec, where: str):
    """(x_train [N,C,H,W], y_train [N], x_test, y_test) numpy arrays from a DatasetDict."""
    splits = list(saved.keys()) if hasattr(saved, "keys") else []
    if "train" not in splits or "test" not in splits:
        raise DataError(f"{where}: datasets save has splits {splits}, expected 'train' and 'test'")
    out = []
    for split in ("train", "test"):
        out += _split_arrays(saved[split], spec, f"{where} (split {split!r})")
    if out[0].shape[1:] != out[2].shape[1:]:
        raise DataError(f"{where}: test images are {out[2].shape[1:]}, train images {out[0].shape[1:]}")
    return tuple(out)


def _split_arrays(split, spec: _Spec, where: str):
    """One split's (images [n, C, H, W], labels [n] int64), in one pass over the images."""
    import datasets  # present: the split came from it

    columns = split.column_names
    if len(split) == 0:
        raise DataError(f"{where}: split is empty, expected {spec.title} images")
    image_col = next((c for c in spec.image_columns if c in columns), None)
    if image_col is None:
        first = split.with_format("numpy")[0]  # decodes one row, to find the column of images
        image_col = next((c for c in columns
                          if isinstance(first[c], np.ndarray) and first[c].ndim in (2, 3)), None)
    label_col = next((c for c in spec.label_columns if c in columns), None)
    if label_col is None:
        class_cols = [c for c, f in split.features.items() if isinstance(f, datasets.ClassLabel)]
        label_col = class_cols[0] if len(class_cols) == 1 else None
    if image_col is None or label_col is None:
        missing = "an image column (PIL images or arrays)" if image_col is None else "a label column"
        raise DataError(f"{where}: no {missing} among columns {columns}")

    images = None
    row = 0
    for batch in split.with_format("numpy", columns=[image_col]).iter(batch_size=1024):
        block = batch[image_col]  # [b, H, W] or [b, H, W, C] (PIL) or [b, C, H, W] (arrays)
        if not isinstance(block, np.ndarray) or block.dtype == object:
            raise DataError(f"{where}: column {image_col!r} holds images of different shapes near row {row}")
        if images is None:
            images = np.empty((len(split), *block.shape[1:]), dtype=block.dtype)
        elif block.shape[1:] != images.shape[1:]:
            raise DataError(f"{where}: image at row {row} is {block.shape[1:]}, earlier ones {images.shape[1:]}")
        images[row : row + len(block)] = block
        row += len(block)
    images = _to_nchw(images, spec, f"{where}: column {image_col!r}")
    if np.issubdtype(images.dtype, np.integer) and (images.min() < 0 or images.max() > 255):
        raise DataError(f"{where}: pixel values in [{images.min()}, {images.max()}], expected 0..255")

    labels = np.asarray(split.with_format("numpy", columns=[label_col])[label_col][:])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: label column {label_col!r} is {labels.dtype} {labels.shape}, expected [n] ints")
    if labels.min() < 0 or labels.max() >= spec.num_classes:
        raise DataError(f"{where}: column {label_col!r} has values in [{labels.min()}, "
                        f"{labels.max()}], expected 0..{spec.num_classes - 1}")
    return images, labels.astype(np.int64)


def _to_nchw(images: np.ndarray, spec: _Spec, where: str) -> np.ndarray:
    """[n, H, W] -> [n, 1, H, W]; [n, H, W, C] (PIL layout: last axis 1 or 3, second not) ->
    [n, C, H, W]; [n, C, H, W] kept."""
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    elif images.ndim != 4 or images.shape[1] not in (1, 3):
        raise DataError(f"{where}: images of shape {images.shape[1:]}, expected [H, W], [H, W, C] or [C, H, W]")
    if images.shape[1] != spec.channels:
        found = f"{images.shape[1]} channel{'s' if images.shape[1] > 1 else ''}"
        raise DataError(f"{where}: images have {found}, expected {spec.channels} for {spec.title}")
    return images


def _to_unit_float(images: np.ndarray) -> torch.Tensor:
    """[N, C, H, W] pixels as float32 in [0, 1]: integers are divided by 255, floats kept."""
    array = np.ascontiguousarray(images)
    if not array.flags.writeable:  # e.g. an unpickled buffer; torch warns on read-only memory
        array = array.copy()
    x = torch.from_numpy(array)
    if x.dtype.is_floating_point:
        return x.to(torch.float32).contiguous()
    return x.to(torch.float32).div_(255.0)


def _normalise_(train_x: torch.Tensor, test_x: torch.Tensor) -> None:
    """In place: x = (x - mean_c) / std_c with per-channel statistics of train_x [N, C, H, W]."""
    std, mean = torch.std_mean(train_x, dim=(0, 2, 3), keepdim=True, correction=0)  # [1, C, 1, 1]
    std = std.clamp_min(1e-6)  # a constant channel (blank synthetic data) would divide by zero
    train_x.sub_(mean).div_(std)
    test_x.sub_(mean).div_(std)
