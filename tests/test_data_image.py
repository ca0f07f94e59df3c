"""Image datasets: digits, the IDX and CIFAR-pickle readers, datasets saves, errors, `batches`.

Every file is written here, by writers independent of the readers under test, with tiny counts
(the readers must check consistency, not the official 60000 / 10000 sizes). No network.
"""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from noprop_fast.data import (
    IMAGE_DATASETS,
    ImageData,
    batches,
    load_image_dataset,
    read_cifar_pickle,
    read_idx,
)
from noprop_fast.errors import ConfigError, DataError
from helpers import raises_one_line
from hidden_packages import needs_datasets
from original_files import MNIST_NAMES, make_cifar, make_mnist, write_cifar, write_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, for subprocesses


# ---------------------------------------------------------------- readers


def expected_normalised(train_pixels, test_pixels):
    """Reference normalisation in float64: [N, C, H, W] pixels 0..255 -> per-channel train z-scores."""
    train, test = train_pixels / 255.0, test_pixels / 255.0
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True)
    return (train - mean) / std, (test - mean) / std


def loader(name, folder):
    """A zero-argument call of load_image_dataset(name, data_dir=folder), for raises_one_line."""
    return lambda: load_image_dataset(name, data_dir=str(folder))


# ---------------------------------------------------------------- digits


def test_digits_shapes_normalisation_and_fixed_split():
    data = load_image_dataset("digits")
    assert isinstance(data, ImageData) and data.name == "digits" and data.num_classes == 10
    assert data.train_x.shape == (1437, 1, 8, 8) and data.test_x.shape == (360, 1, 8, 8)
    assert data.image_shape == (1, 8, 8)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.train_x.is_contiguous() and data.test_x.is_contiguous()
    assert abs(data.train_x.mean().item()) < 1e-5 and abs(data.train_x.std().item() - 1) < 1e-3
    assert "digits" in data.source
    # stratified: every class is in the test split in proportion (about 36 of each)
    assert torch.bincount(data.test_y, minlength=10).min() >= 34
    again = load_image_dataset("DIGITS")
    for a, b in [(data.train_x, again.train_x), (data.train_y, again.train_y), (data.test_y, again.test_y)]:
        assert torch.equal(a, b)


def test_image_data_to_moves_every_tensor():
    data = load_image_dataset("digits").to(torch.device("cpu"))
    assert all(t.device.type == "cpu" for t in (data.train_x, data.train_y, data.test_x, data.test_y))
    assert IMAGE_DATASETS == ("digits", "mnist", "cifar10", "cifar100")


def test_importing_data_does_not_import_datasets():
    code = "import sys, noprop_fast.data; assert 'datasets' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / ("x.gz" if gz else "x"), images, gz=gz)
    out = read_idx(path)
    assert out.dtype == np.uint8 and np.array_equal(out, images)
    ints = np.array([[-5, 70000], [3, 1 << 30]], dtype=np.int32)
    assert np.array_equal(read_idx(write_idx(tmp_path / "i", ints, type_byte=0x0C)), ints)


@settings(deadline=None, max_examples=40)
@given(n=st.integers(1, 5), rows=st.integers(1, 6), cols=st.integers(1, 6), gz=st.booleans(), data=st.data())
def test_read_idx_round_trip_random_shapes(tmp_path_factory, n, rows, cols, gz, data):
    values = data.draw(st.lists(st.integers(0, 255), min_size=n * rows * cols, max_size=n * rows * cols))
    array = np.array(values, dtype=np.uint8).reshape(n, rows, cols)
    path = write_idx(tmp_path_factory.mktemp("idx") / "a", array, gz=gz)
    assert np.array_equal(read_idx(path), array)


@pytest.mark.parametrize("layout", ["plain", "gz", "dotted", "nested"])
def test_mnist_from_idx_files(tmp_path, layout):
    folder = tmp_path / "MNIST" / "raw" if layout == "nested" else tmp_path
    x_tr, y_tr, x_te, y_te = make_mnist(folder, gz=layout in ("gz", "nested"), dotted=layout == "dotted")
    data = load_image_dataset("mnist", data_dir=str(tmp_path))
    assert data.train_x.shape == (20, 1, 28, 28) and data.test_x.shape == (7, 1, 28, 28)
    assert data.num_classes == 10 and str(folder) in data.source
    assert torch.equal(data.train_y, torch.from_numpy(y_tr.astype(np.int64)))
    assert torch.equal(data.test_y, torch.from_numpy(y_te.astype(np.int64)))
    want_train, want_test = expected_normalised(x_tr[:, None].astype(np.float64), x_te[:, None].astype(np.float64))
    np.testing.assert_allclose(data.train_x.numpy(), want_train, atol=1e-4)
    np.testing.assert_allclose(data.test_x.numpy(), want_test, atol=1e-4)


# ---------------------------------------------------------------- CIFAR pickles


@pytest.mark.parametrize("cifar100", [False, True])
def test_cifar_pickles_round_trip(tmp_path, cifar100):
    folder = tmp_path / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    x_tr, y_tr, x_te, y_te = make_cifar(folder, cifar100=cifar100)
    data = load_image_dataset("cifar100" if cifar100 else "cifar10", data_dir=str(tmp_path))
    assert data.train_x.shape == (12, 3, 32, 32) and data.test_x.shape == (3, 3, 32, 32)
    assert data.num_classes == (100 if cifar100 else 10)
    assert torch.equal(data.train_y, torch.from_numpy(y_tr)) and torch.equal(data.test_y, torch.from_numpy(y_te))
    # layout: pixel [c, h, w] of an image is data row[c*1024 + h*32 + w]
    test_file, label_key = ("test", "fine_labels") if cifar100 else ("test_batch", "labels")
    images, labels = read_cifar_pickle(folder / test_file, label_key)
    assert images.shape == (3, 3, 32, 32) and images.dtype == np.uint8 and labels.dtype == np.int64
    for i, c, h, w in [(0, 0, 0, 0), (1, 2, 31, 31), (2, 1, 5, 17), (0, 2, 30, 1)]:
        assert images[i, c, h, w] == x_te[i, c * 1024 + h * 32 + w]
    want_train, want_test = expected_normalised(
        x_tr.reshape(-1, 3, 32, 32).astype(np.float64), x_te.reshape(-1, 3, 32, 32).astype(np.float64)
    )
    np.testing.assert_allclose(data.train_x.numpy(), want_train, atol=1e-4)
    np.testing.assert_allclose(data.test_x.numpy(), want_test, atol=1e-4)


def test_cifar_pickle_protocol5_and_str_keys(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, (4, 3072), dtype=np.uint8)
    with open(tmp_path / "b", "wb") as f:
        pickle.dump({"data": data, "labels": [0, 1, 2, 9]}, f, protocol=5)
    images, labels = read_cifar_pickle(tmp_path / "b", "labels")
    assert np.array_equal(images.reshape(4, -1), data) and labels.tolist() == [0, 1, 2, 9]


# ---------------------------------------------------------------- datasets saves


def save_dataset_dict(folder, train, test):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict(train), "test": Dataset.from_dict(test)}).save_to_disk(str(folder))


@needs_datasets
def test_datasets_save_with_pil_images(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (9, 6, 6), dtype=np.uint8)
    split = lambda s: {"image": [Image.fromarray(p) for p in pixels[s]], "label": list(range(len(pixels[s])))}
    save_dataset_dict(tmp_path, split(slice(0, 6)), split(slice(6, 9)))
    data = load_image_dataset("mnist", data_dir=str(tmp_path))
    assert data.train_x.shape == (6, 1, 6, 6) and data.test_x.shape == (3, 1, 6, 6)
    assert data.train_y.tolist() == list(range(6)) and "datasets save" in data.source
    want_train, _ = expected_normalised(pixels[:6, None].astype(np.float64), pixels[6:, None].astype(np.float64))
    np.testing.assert_allclose(data.train_x.numpy(), want_train, atol=1e-4)


@needs_datasets
def test_datasets_save_cifar100_arrays_and_other_column_names(tmp_path):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)  # [n, H, W, C] as PIL would give
    train = {"pixels": list(pixels[:3]), "coarse_label": [1, 1, 1], "fine_label": [99, 0, 7]}
    test = {"pixels": list(pixels[3:]), "coarse_label": [2, 2], "fine_label": [3, 4]}
    save_dataset_dict(tmp_path, train, test)
    data = load_image_dataset("cifar100", data_dir=str(tmp_path))
    assert data.train_x.shape == (3, 3, 4, 4) and data.train_y.tolist() == [99, 0, 7]
    nchw = pixels.transpose(0, 3, 1, 2).astype(np.float64)
    want_train, want_test = expected_normalised(nchw[:3], nchw[3:])
    np.testing.assert_allclose(data.train_x.numpy(), want_train, atol=1e-4)
    np.testing.assert_allclose(data.test_x.numpy(), want_test, atol=1e-4)


# ---------------------------------------------------------------- errors


def test_error_unknown_name_and_missing_folder(tmp_path):
    raises_one_line(lambda: load_image_dataset("imagenet"), "imagenet", "digits, mnist, cifar10, cifar100")
    missing = tmp_path / "nope"
    raises_one_line(loader("mnist", missing), str(missing), "does not exist")
    (tmp_path / "file").write_bytes(b"")
    raises_one_line(loader("cifar10", tmp_path / "file"), "is a file, expected a folder")


@pytest.mark.parametrize(
    "name, expected",
    [("mnist", "train-images-idx3-ubyte[.gz]"), ("cifar10", "data_batch_1"), ("cifar100", "test")],
)
def test_error_folder_without_data(tmp_path, name, expected):
    (tmp_path / "unrelated.txt").write_text("hello")
    raises_one_line(loader(name, tmp_path), f"data in {tmp_path}", "dataset_dict.json", expected)


def test_error_one_missing_file_is_named(tmp_path):
    make_mnist(tmp_path / "raw", gz=True)
    os.remove(tmp_path / "raw" / "t10k-labels-idx1-ubyte.gz")
    raises_one_line(loader("mnist", tmp_path), str(tmp_path / "raw" / "t10k-labels-idx1-ubyte"), "missing")
    make_cifar(tmp_path / "c")
    os.remove(tmp_path / "c" / "data_batch_3")
    raises_one_line(loader("cifar10", tmp_path), str(tmp_path / "c" / "data_batch_3"))


def test_error_bad_idx_headers(tmp_path):
    make_mnist(tmp_path)
    images = tmp_path / MNIST_NAMES[0]
    write_idx(images, np.zeros(5, dtype=np.uint8))  # a labels file where the images should be
    raises_one_line(loader("mnist", tmp_path), str(images), "0x00000801", "expected 0x00000803")
    write_idx(images, np.zeros((2, 3, 3), dtype=np.float32), type_byte=0x0D)  # float type
    raises_one_line(loader("mnist", tmp_path), str(images), "0x00000d03")
    labels = tmp_path / MNIST_NAMES[1]
    write_idx(labels, np.zeros((4, 5), dtype=np.uint8))  # 2 dims
    raises_one_line(lambda: read_idx(labels, 0x00000801), str(labels), "2 dims")
    (tmp_path / "junk").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    raises_one_line(lambda: read_idx(tmp_path / "junk"), "junk", "bad IDX magic")
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    raises_one_line(lambda: read_idx(tmp_path / "tiny"), "tiny", "too short")


def test_error_truncated_idx(tmp_path):
    make_mnist(tmp_path)
    labels = tmp_path / MNIST_NAMES[3]
    labels.write_bytes(labels.read_bytes()[:-3])  # 8 header bytes + 7 labels, cut to 12
    raises_one_line(loader("mnist", tmp_path), str(labels), "size 12 bytes", "7 labels (15 bytes)")
    images = tmp_path / MNIST_NAMES[0]
    images.write_bytes(images.read_bytes()[:10])  # inside the dims
    raises_one_line(lambda: read_idx(images), str(images), "too short")


def test_error_counts_and_label_values(tmp_path):
    make_mnist(tmp_path)
    labels = tmp_path / MNIST_NAMES[1]
    write_idx(labels, np.zeros(19, dtype=np.uint8))
    raises_one_line(loader("mnist", tmp_path), str(labels), "19 labels", "20 images")
    write_idx(labels, np.full(20, 10, dtype=np.uint8))
    raises_one_line(loader("mnist", tmp_path), str(labels), "expected 0..9")
    make_mnist(tmp_path / "empty", n_train=0)
    raises_one_line(loader("mnist", tmp_path / "empty"), "train split is empty")


def test_error_corrupt_gzip(tmp_path):
    make_mnist(tmp_path, gz=True)
    images = tmp_path / (MNIST_NAMES[2] + ".gz")
    images.write_bytes(images.read_bytes()[:40])  # truncated stream
    raises_one_line(loader("mnist", tmp_path), str(images), "gzip")
    images.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    raises_one_line(lambda: read_idx(images), str(images), "gzip")


def test_error_bad_cifar_pickles(tmp_path):
    make_cifar(tmp_path)
    batch = tmp_path / "data_batch_2"
    batch.write_bytes(b"this is not a pickle")
    raises_one_line(loader("cifar10", tmp_path), str(batch), "not a CIFAR python pickle")
    rows = np.zeros((2, 3072), dtype=np.uint8)
    write_cifar(batch, rows, [1, 2], label_key=b"fine_labels")
    raises_one_line(lambda: read_cifar_pickle(batch, "labels"), str(batch), "b'labels'")
    write_cifar(batch, np.zeros((2, 3000), dtype=np.uint8), [1, 2])
    raises_one_line(lambda: read_cifar_pickle(batch, "labels"), str(batch), "(2, 3000)", "[n, 3072]")
    write_cifar(batch, rows, [1, 2, 3])
    raises_one_line(lambda: read_cifar_pickle(batch, "labels"), str(batch), "2 images")
    write_cifar(batch, rows, [1, 10])
    raises_one_line(lambda: read_cifar_pickle(batch, "labels"), str(batch), "expected 0..9")
    with open(batch, "wb") as f:
        pickle.dump([1, 2], f)
    raises_one_line(lambda: read_cifar_pickle(batch, "labels"), str(batch), "list")


class _Sneaky:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_pickle_refuses_arbitrary_globals(tmp_path):
    with open(tmp_path / "evil", "wb") as f:
        pickle.dump({b"data": _Sneaky(), b"labels": []}, f)
    raises_one_line(lambda: read_cifar_pickle(tmp_path / "evil", "labels"), "getcwd", "never does")


@needs_datasets
def test_error_datasets_save_problems(tmp_path):
    from datasets import Dataset, DatasetDict

    only_train = DatasetDict({"train": Dataset.from_dict({"image": [np.zeros((2, 2), np.uint8)], "label": [0]})})
    only_train.save_to_disk(str(tmp_path / "a"))
    raises_one_line(loader("mnist", tmp_path / "a"), "'train' and 'test'")
    grey = {"image": [np.zeros((3, 3), np.uint8)] * 2, "label": [0, 1]}
    save_dataset_dict(tmp_path / "b", grey, grey)
    raises_one_line(loader("cifar10", tmp_path / "b"), "1 channel,", "expected 3")
    save_dataset_dict(tmp_path / "c", {**grey, "label": [0, 10]}, grey)
    raises_one_line(loader("mnist", tmp_path / "c"), "expected 0..9")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "dataset_dict.json").write_text("{not json")
    raises_one_line(loader("mnist", tmp_path / "d"), str(tmp_path / "d"), "datasets save")


@needs_datasets
def test_error_hub_unreachable(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'ylecun/mnist' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    raises_one_line(lambda: load_image_dataset("mnist"), "ylecun/mnist", "hub", "--data-dir DIR")
    raises_one_line(lambda: load_image_dataset("cifar100"), "uoft-cs/cifar100", "--data-dir DIR")


def test_error_hub_offline_for_real(tmp_path):
    # the real offline path of `datasets`, in a fresh process (both read the env at
    # import); an empty HF_HOME so that a copy cached on this machine cannot be found
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = (
        "from noprop_fast.data import load_image_dataset\n"
        "from noprop_fast.errors import DataError\n"
        "try:\n    load_image_dataset('mnist')\n"
        "except DataError as e:\n    print(e)\nelse:\n    print('loaded')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1 and "ylecun/mnist" in lines[0] and "--data-dir DIR" in lines[0], run.stdout


# ---------------------------------------------------------------- batches


@settings(deadline=None, max_examples=60)
@given(n=st.integers(0, 40), batch_size=st.integers(1, 12), drop_last=st.booleans(), shuffle=st.booleans())
def test_batches_cover_every_index_once(n, batch_size, drop_last, shuffle):
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)  # row i holds i
    y = torch.arange(n)
    gen = torch.Generator().manual_seed(0)
    out = list(batches(x, y, batch_size, generator=gen, shuffle=shuffle, drop_last=drop_last))
    sizes = [len(yb) for _, yb in out]
    full, rest = divmod(n, batch_size)
    assert sizes == [batch_size] * full + ([rest] if rest and not drop_last else [])
    seen = torch.cat([yb for _, yb in out]) if out else torch.zeros(0, dtype=torch.int64)
    for xb, yb in out:
        assert torch.equal(xb[:, 0].long(), yb)  # rows stay paired with their labels
    if not drop_last:
        assert sorted(seen.tolist()) == list(range(n))
    assert len(set(seen.tolist())) == len(seen)
    if not shuffle:
        assert seen.tolist() == list(range(len(seen)))


def test_batches_same_seed_same_order():
    x, y = torch.randn(100, 2), torch.arange(100)

    def order(seed):
        return torch.cat([yb for _, yb in batches(x, y, 7, generator=torch.Generator().manual_seed(seed))])

    assert torch.equal(order(5), order(5))
    assert not torch.equal(order(5), order(6))
    assert not torch.equal(order(5), y)


def test_batches_rejects_bad_arguments():
    with pytest.raises(ConfigError):
        list(batches(torch.zeros(4, 2), torch.zeros(4), 0))
    with pytest.raises(ValueError):
        list(batches(torch.zeros(4, 2), torch.zeros(5), 2))
