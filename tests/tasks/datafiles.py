"""Tiny data sets written in the published file formats (IDX, CIFAR-10 python batches, SVHN .mat), for the
file-backed tasks' tests."""

import numpy as np
import scipy.io

from tasks.formats import write_cifar_batch, write_idx


def write_mnist(folder, rng, n_train=30, n_test=10, gz=True) -> dict:
    """MNIST / Fashion-MNIST IDX files (plain or gzipped) of random 28x28 images and labels."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in data.items():
        write_idx(folder / (name + (".gz" if gz else "")), arr)
    return data


def write_cifar(folder, rng, n_per_batch=4) -> dict:
    """CIFAR-10's five training batches and its test batch: {name: (images [n, 3, 32, 32] uint8, labels [n])}."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images, labels = rng.integers(0, 256, (n_per_batch, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n_per_batch)
        write_cifar_batch(folder / name, images, labels)
        batches[name] = (images, labels)
    return batches


def write_svhn(folder, rng, n_train=30, n_test=9) -> dict:
    """SVHN format-2 files as published: X uint8 [32, 32, 3, N] (height, width, channel, image), y [N, 1] in 1..10."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        y[:2, 0] = [10, 1]  # the digit 0 is stored as 10
        scipy.io.savemat(str(folder / name), {"X": x, "y": y})
        data[name] = (x, y)
    return data
