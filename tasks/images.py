"""Image classification tasks with a C4 or D4 symmetry: digits (bundled), MNIST, Fashion-MNIST, CIFAR-10.

Every image task gives x float32 [B, C, H, W] in [0, 1] and y int64 [B]. The group rotates / flips
the last two axes and leaves labels unchanged. The `variant` option sets up the upright-vs-rotated
generalisation study: "upright" leaves the data as stored, "rotated" moves every val and test image
by a random group element (fixed per seed), "augmented" does that to the training images as well.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tasks.base import Split, Task, TaskError, check_options, seeded
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

    def _split(self, split: Split, seed: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must define _split")

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


class DigitsTask(ImageTask):
    """scikit-learn's bundled 8x8 digits (1797 images, values / 16), split stratified by seed."""

    def __init__(self, group: str = "C4", variant: str = "upright", n_train: int = 1197, n_val: int = 300,
                 n_test: int = 300):
        super().__init__("digits", group, variant, (1, 8, 8), 10)
        for field, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            _check_size("digits", field, v)
        if n_train + n_val + n_test > 1797:
            raise TaskError(f"task 'digits': n_train + n_val + n_test = {n_train + n_val + n_test}; at most 1797 images exist")
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
