"""Writers of the original dataset files (MNIST IDX, CIFAR python pickles), for the tests.

Independent of the readers under test: they follow the published formats byte by byte, with tiny
random contents (the readers check consistency, not the official 60000 / 10000 sizes).
"""
import gzip
import os
import pickle
import struct

import numpy as np

MNIST_NAMES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]




def write_idx(path, array, type_byte=0x08, gz=False, dims=None):
    """IDX: 0, 0, type byte, ndim, big-endian int32 dims, then the raw big-endian items."""
    array = np.asarray(array)
    dims = array.shape if dims is None else dims
    header = bytes([0, 0, type_byte, len(dims)]) + b"".join(struct.pack(">i", d) for d in dims)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(payload)
    return str(path)


def make_mnist(folder, n_train=20, n_test=7, gz=False, dotted=False, seed=0):
    """Four IDX files with random 28x28 images; returns (train images, train labels, test ...)."""
    rng = np.random.default_rng(seed)
    arrays = [
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_train, dtype=np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_test, dtype=np.uint8),
    ]
    os.makedirs(folder, exist_ok=True)
    for name, array in zip(MNIST_NAMES, arrays):
        if dotted:  # train-images-idx3-ubyte -> train-images.idx3-ubyte
            name = name[: name.rindex("-", 0, name.rindex("-"))] + "." + name.split("-", 2)[2]
        write_idx(os.path.join(folder, name + (".gz" if gz else "")), array, gz=gz)
    return arrays


def write_cifar(path, data, labels, label_key=b"labels", extra=None, protocol=2):
    """A CIFAR batch as the originals are: a dict with bytes keys, b"data" uint8 [n, 3072]."""
    obj = {b"batch_label": b"synthetic", b"data": data, label_key: list(map(int, labels))}
    obj.update(extra or {})
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return str(path)


def make_cifar(folder, cifar100=False, sizes=(3, 2, 4, 1, 2), n_test=3, seed=0):
    """Small CIFAR batches; returns (train data [N, 3072], train labels, test data, test labels)."""
    rng = np.random.default_rng(seed)
    classes, key = (100, b"fine_labels") if cifar100 else (10, b"labels")
    names = ["train"] if cifar100 else [f"data_batch_{i + 1}" for i in range(len(sizes))]
    sizes = [sum(sizes)] if cifar100 else sizes
    os.makedirs(folder, exist_ok=True)
    train = []
    for name, n in zip(names, sizes):
        data, labels = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, classes, n)
        extra = {b"coarse_labels": list(labels // 5)} if cifar100 else None
        write_cifar(os.path.join(folder, name), data, labels, key, extra)
        train.append((data, labels))
    test_data, test_labels = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), rng.integers(0, classes, n_test)
    write_cifar(os.path.join(folder, "test" if cifar100 else "test_batch"), test_data, test_labels, key)
    return (np.concatenate([d for d, _ in train]), np.concatenate([l for _, l in train]), test_data, test_labels)
