"""Image classification tasks with a C4 or D4 symmetry: digits (bundled), MNIST, Fashion-MNIST, CIFAR-10, SVHN.

Every image task gives x float32 [B, C, H, W] in [0, 1] and y int64 [B]. The group rotates / flips
the last two axes and leaves labels unchanged. The `variant` option sets up the upright-vs-rotated
generalisation study: "upright" leaves the data as stored, "rotated" moves every val and test image
by a random group element (fixed per seed), "augmented" does that to the training images as well.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tasks.base import Split, Task, TaskError, check_options, seeded
from tasks.formats import idx_count, read_cifar_batch, read_idx, read_svhn_mat, svhn_count
from tasks.groups import ImageGroup
from tasks.registry import register_task

VARIANTS = ("upright", "rotated", "augmented")
_SALT = {"train": 1, "val": 2, "test": 3}


def _check_choice(task: str, field: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise TaskError(f"task {task!r}: {field}={value!r}; allowed: {', '.join(map(repr, allowed))}")


def _check_size(task: str, field: str, value: object, available: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TaskError(f"task {task!r}: {field}={value!r}; allowed: a non-negative integer")
    if available is not None and value > available:
        raise TaskError(f"task {task!r}: {field}={value} but only {available} samples are available")


def random_group_action(group: ImageGroup, x: Tensor, generator: torch.Generator) -> Tensor:
    """Move each image by its own random group element (vectorised: one masked call per element)."""
    els = group.elements()
    which = torch.randint(len(els), (len(x),), generator=generator)
    out = x.clone()
    for i, g in enumerate(els):
        mask = which == i
        if mask.any():
            out[mask] = group.act_in(g, x[mask])
    return out


class ImageTask(Task):
    """Shared logic: group, variant, sizes; subclasses provide the upright split arrays via `_split`."""

    kind = "classification"
    input_kind = "image"
    metric_name = "acc"
    higher_is_better = True

    def __init__(self, name: str, group: str, variant: str, input_shape: tuple[int, ...], num_classes: int):
        _check_choice(name, "group", group, ("C4", "D4"))
        _check_choice(name, "variant", variant, VARIANTS)
        self.name, self.variant = name, variant
        self.group = ImageGroup(group)
        self.input_shape, self.output_shape = input_shape, (num_classes,)

    @abstractmethod
    def _split(self, split: Split, seed: int) -> tuple[Tensor, Tensor]:
        """The upright (x, y) of a split, before any variant rotation."""

    def load(self, split: Split, seed: int = 0) -> tuple[Tensor, Tensor]:
        _check_choice(self.name, "split", split, tuple(_SALT))
        x, y = self._split(split, seed)
        if self.variant == "augmented" or (self.variant == "rotated" and split != "train"):
            x = random_group_action(self.group, x, seeded(seed, 100 + _SALT[split]))
        return x.contiguous(), y


def stratified_order(y: np.ndarray, generator: torch.Generator) -> np.ndarray:
    """A random order of indices in which every prefix holds the classes in their overall proportions."""
    perm = torch.randperm(len(y), generator=generator).numpy()
    ys = y[perm]
    rank = np.zeros(len(y), dtype=np.float64)
    for c in np.unique(ys):
        where = np.flatnonzero(ys == c)
        rank[where] = (np.arange(len(where)) + 0.5) / len(where)
    return perm[np.argsort(rank, kind="stable")]


DIGITS = 1797  # images in scikit-learn's digits


class DigitsTask(ImageTask):
    """scikit-learn's bundled 8x8 digits (1797 images, values / 16), split stratified by seed."""

    def __init__(self, group: str = "C4", variant: str = "upright", n_train: int = 1197, n_val: int = 300,
                 n_test: int = 300):
        super().__init__("digits", group, variant, (1, 8, 8), 10)
        for field, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            _check_size("digits", field, v)
        if n_train + n_val + n_test > DIGITS:
            raise TaskError(f"task 'digits': n_train + n_val + n_test = {n_train + n_val + n_test}; at most {DIGITS} images exist")
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self._data: tuple[np.ndarray, np.ndarray] | None = None

    def _split(self, split: Split, seed: int) -> tuple[Tensor, Tensor]:
        if self._data is None:
            from sklearn.datasets import load_digits

            d = load_digits()
            self._data = (d.images.astype(np.float32) / 16.0, d.target.astype(np.int64))
        images, labels = self._data
        order = stratified_order(labels, seeded(seed, 7))
        start = {"train": 0, "val": self.sizes["train"], "test": self.sizes["train"] + self.sizes["val"]}[split]
        idx = order[start : start + self.sizes[split]]
        return torch.from_numpy(images[idx]).unsqueeze(1), torch.from_numpy(labels[idx])


@register_task(
    "digits",
    description="scikit-learn's bundled 8x8 handwritten digits; C4/D4 acting by rot90/flip",
    group="C4 | D4",
    options={"group": ("C4", "D4"), "variant": VARIANTS, "n_train": int, "n_val": int, "n_test": int},
)
def digits(**options) -> DigitsTask:
    check_options("digits", options, {"group", "variant", "n_train", "n_val", "n_test"})
    return DigitsTask(**options)


# ---------------------------------------------------------------------------------------------
# File-backed tasks: MNIST / Fashion-MNIST (IDX), CIFAR-10 (python batches) and SVHN (.mat), read from
# `data_dir` (option) or $SYMZOO_DATA. Nothing is read until `load()`. The validation split is
# carved out of the published training set by seed; the test split is the published test set.

DOWNLOAD = {
    "mnist": "https://yann.lecun.com/exdb/mnist/ (mirror: https://ossci-datasets.s3.amazonaws.com/mnist/)",
    "fashion_mnist": "https://github.com/zalandoresearch/fashion-mnist (the four *-ubyte.gz files under data/fashion)",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar.html (CIFAR-10 python version, cifar-10-python.tar.gz, unpacked)",
    "svhn": "http://ufldl.stanford.edu/housenumbers/ (format 2, cropped digits: train_32x32.mat and test_32x32.mat)",
}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")
FILE_OPTIONS = {"group": ("C4", "D4"), "variant": VARIANTS, "data_dir": str, "n_train": int, "n_val": int, "n_test": int}


class FileImageTask(ImageTask):
    """An image task read from files: finds them, caches the uint8 arrays, splits by seed."""

    files: tuple[str, ...]
    subdirs: tuple[str, ...]

    def __init__(self, name: str, input_shape: tuple[int, ...], group: str = "C4", variant: str = "upright",
                 data_dir: str | None = None, n_train: int | None = None, n_val: int = 5000, n_test: int | None = None):
        super().__init__(name, group, variant, input_shape, 10)
        for field, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if v is not None:
                _check_size(name, field, v)
        self.data_dir = data_dir
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self._arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def candidate_dirs(self) -> list[Path]:
        """Where the files may be: <root>/<subdir> for each accepted subfolder name, then <root> itself."""
        root = self.data_dir or os.environ.get("SYMZOO_DATA")
        if not root:
            raise TaskError(
                f"task {self.name!r}: no data directory; pass the option data_dir=... or set SYMZOO_DATA. "
                f"It must hold {', '.join(self.files)} (in a subfolder {self.subdirs[0]!r} or directly). "
                f"Get them from {DOWNLOAD[self.name]}"
            )
        root = Path(root).expanduser()
        return [root / sub for sub in self.subdirs] + [root]

    def find_files(self) -> dict[str, Path]:
        """Each required file's path (plain or .gz), from the first directory that holds all of them."""
        dirs = self.candidate_dirs()
        best: tuple[dict[str, Path], list[str]] | None = None
        for d in dirs:
            found, missing = {}, []
            for f in self.files:
                hit = next((d / n for n in (f, f + ".gz") if (d / n).is_file()), None)
                if hit is None:
                    missing.append(f)
                else:
                    found[f] = hit
            if not missing:
                return found
            if best is None or len(missing) < len(best[1]):
                best = (found, missing)
        missing = best[1] if best else list(self.files)
        raise TaskError(
            f"task {self.name!r}: missing data files {', '.join(missing)} (plain or .gz); looked in "
            f"{', '.join(str(d) for d in dirs)}. Get them from {DOWNLOAD[self.name]}"
        )

    @abstractmethod
    def _read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(train images uint8 [N, C, H, W], train labels, test images, test labels)."""

    def counts(self) -> tuple[int, int]:
        """(training images, test images) in the files, read cheaply (subclasses read headers only)."""
        xtr, _, xte, _ = self._read()
        return len(xtr), len(xte)

    def check_sizes(self, counts: tuple[int, int] | None = None) -> tuple[int, int]:
        """TaskError naming the option when n_train / n_val / n_test ask for more images than the files hold;
        `symzoo validate` calls it so that the error comes before any work. Returns (n_train, n_test) as used."""
        n_all, n_test_all = counts or self.counts()
        n_test = n_test_all if self.sizes["test"] is None else self.sizes["test"]
        _check_size(self.name, "n_test", n_test, n_test_all)
        n_val = self.sizes["val"]
        n_train = n_all - n_val if self.sizes["train"] is None else self.sizes["train"]
        _check_size(self.name, "n_val", n_val, n_all)
        _check_size(self.name, "n_train", n_train, n_all - n_val)
        return n_train, n_test

    def _split(self, split: Split, seed: int) -> tuple[Tensor, Tensor]:
        if self._arrays is None:
            self._arrays = self._read()
        xtr, ytr, xte, yte = self._arrays
        n_train, n_test = self.check_sizes((len(xtr), len(xte)))
        if split == "test":
            n = n_test
            idx = np.arange(n)
            x, y = xte, yte
        else:
            n_val = self.sizes["val"]
            perm = torch.randperm(len(xtr), generator=seeded(seed, 5)).numpy()
            idx = perm[:n_val] if split == "val" else perm[n_val : n_val + n_train]
            x, y = xtr, ytr
        images = torch.from_numpy(x[idx].astype(np.float32) / 255.0)
        return images, torch.from_numpy(y[idx].astype(np.int64))


class IdxImageTask(FileImageTask):
    """MNIST-format data: four IDX files of 28x28 grey images and their labels."""

    files = IDX_FILES

    def __init__(self, name: str, subdirs: tuple[str, ...], **options):
        self.subdirs = subdirs
        super().__init__(name, (1, 28, 28), **options)

    def _read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        paths = self.find_files()
        arrays = [read_idx(paths[f]) for f in self.files]
        for f, a, ndim in zip(self.files, arrays, (3, 1, 3, 1)):
            if a.ndim != ndim:
                raise TaskError(f"task {self.name!r}: {paths[f]} holds an array of shape {a.shape}; expected {ndim} axes")
        xtr, ytr, xte, yte = arrays
        return xtr[:, None], ytr, xte[:, None], yte

    def counts(self) -> tuple[int, int]:
        """Image counts from the IDX headers alone (the first 16 bytes of each images file)."""
        paths = self.find_files()
        return tuple(idx_count(paths[f]) for f in (self.files[0], self.files[2]))  # type: ignore[return-value]


class Cifar10Task(FileImageTask):
    """CIFAR-10: five training batches and one test batch of 32x32 RGB images (python pickles, read safely)."""

    files = CIFAR_FILES
    subdirs = ("cifar10/cifar-10-batches-py", "cifar-10-batches-py", "cifar10")

    def __init__(self, **options):
        super().__init__("cifar10", (3, 32, 32), **options)

    def _read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        paths = self.find_files()
        train = [read_cifar_batch(paths[f]) for f in self.files[:-1]]
        xte, yte = read_cifar_batch(paths["test_batch"])
        return np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train]), xte, yte


class SvhnTask(FileImageTask):
    """SVHN format 2 (cropped house-number digits): train_32x32.mat and test_32x32.mat, 32x32 RGB images with
    labels 0..9 (the files' label 10 is the digit 0). extra_32x32.mat is not used: train and val come from
    train_32x32.mat alone (torchvision's split="train"), test is test_32x32.mat."""

    files = SVHN_FILES
    subdirs = ("svhn", "SVHN")

    def __init__(self, **options):
        super().__init__("svhn", (3, 32, 32), **options)

    def _read(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        paths = self.find_files()
        (xtr, ytr), (xte, yte) = (read_svhn_mat(paths[f]) for f in self.files)
        return xtr, ytr, xte, yte

    def counts(self) -> tuple[int, int]:
        """Image counts from the .mat variable headers alone (no image data read)."""
        paths = self.find_files()
        return tuple(svhn_count(paths[f]) for f in self.files)  # type: ignore[return-value]


@register_task("mnist", description="MNIST handwritten digits (IDX files from data_dir or $SYMZOO_DATA); C4/D4",
               group="C4 | D4", options=dict(FILE_OPTIONS))
def mnist(**options) -> IdxImageTask:
    check_options("mnist", options, set(FILE_OPTIONS))
    return IdxImageTask("mnist", ("mnist", "MNIST/raw"), **options)


@register_task("fashion_mnist", description="Fashion-MNIST (IDX files from data_dir or $SYMZOO_DATA); C4/D4",
               group="C4 | D4", options=dict(FILE_OPTIONS))
def fashion_mnist(**options) -> IdxImageTask:
    check_options("fashion_mnist", options, set(FILE_OPTIONS))
    return IdxImageTask("fashion_mnist", ("fashion_mnist", "FashionMNIST/raw"), **options)


@register_task("cifar10", description="CIFAR-10 (python batches from data_dir or $SYMZOO_DATA); C4/D4",
               group="C4 | D4", options=dict(FILE_OPTIONS))
def cifar10(**options) -> Cifar10Task:
    check_options("cifar10", options, set(FILE_OPTIONS))
    return Cifar10Task(**options)


@register_task("svhn", description="SVHN cropped digits (format-2 .mat files from data_dir or $SYMZOO_DATA); C4/D4",
               group="C4 | D4", options=dict(FILE_OPTIONS))
def svhn(**options) -> SvhnTask:
    check_options("svhn", options, set(FILE_OPTIONS))
    return SvhnTask(**options)
