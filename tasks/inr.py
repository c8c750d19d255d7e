"""INR tasks: one implicit neural representation per image, coordinates in [-1, 1]^2 -> intensities.

The data sets of weight-space learning (DWSNets, NFN, neural graphs) are populations of small
networks, each fitted to reproduce one image and labelled with that image's class. Here model i of a
population fits the image its `image` factor names: the task is *per model*. `load_models` gives
the shared coordinate grid x [P, 2] and each model's own targets y [N, P, C], which the population
trainer gathers on the device (no Python loop over models).

Image indices: image i is the i-th image of the source task's train, val and test splits (data seed
0) concatenated in that order, so the index, the split and the label of every INR are fixed by the
source task and its options. Every pixel is used for fitting and for evaluation (train = val = test
= the full grid): an INR is judged by how well it reproduces its image, measured as PSNR in dB
(peak 1, intensities in [0, 1]).

The group is the source's C4 / D4 acting on the domain: `act_in(g, p)` moves coordinates so that the
INR of the image moved by g^-1 is `f(act_in(g, p))`. A target is invariant only for a symmetric
image, so the equivariance stage measures each INR's self-similarity under the group; the data set
as a whole is closed under it (and for a SIREN, f∘A is the SIREN whose first weight is W A).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from tasks.base import SPLITS, Split, Task, TaskError, check_options
from tasks.groups import Element, FiniteGroup, ImageGroup
from tasks.registry import TASKS, get_task, register_task

SOURCES = ("digits", "mnist", "fashion_mnist", "cifar10")
INDEX_SEED = 0  # the data seed of the source split that fixes image indices


def coordinate_grid(height: int, width: int) -> Tensor:
    """[H * W, 2] pixel-centre coordinates (u = column, v = row) spanning [-1, 1], row-major like a flattened image."""
    v, u = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack([u, v], -1).reshape(-1, 2)


class CoordinateGroup(FiniteGroup):
    """An image group (C4 / D4) acting on 2-d coordinates by the matrices that move the pixel grid.

    `act_in(g, p) = A p` with A chosen so that `target(g^-1 . image)(p) = target(image)(act_in(g, p))`:
    a left action on coordinates (act_in(g, act_in(h, p)) = act_in(g h, p)); outputs are unchanged.
    """

    def __init__(self, name: str):
        self.images = ImageGroup(name)
        self.name = f"{name}(coords)"
        grid = coordinate_grid(3, 3)
        as_image = grid.T.reshape(2, 3, 3)
        self._matrix: dict[Element, Tensor] = {}
        for g in self.images.elements():
            moved = self.images.act_in(self.images.inverse(g), as_image).reshape(2, -1).T  # where each pixel's value comes from
            self._matrix[g] = torch.linalg.lstsq(grid, moved).solution.T.round()  # exact: entries are 0, +-1

    def elements(self) -> list[Element]:
        return self.images.elements()

    def matrix(self, g: Element) -> Tensor:
        """The 2x2 matrix of g acting on coordinates."""
        return self._matrix[g]

    def act_in(self, g: Element, x: Tensor) -> Tensor:
        return x @ self._matrix[g].to(x).T

    def act_out(self, g: Element, y: Tensor) -> Tensor:
        return y

    def compose(self, g: Element, h: Element) -> Element:
        return self.images.compose(g, h)

    def inverse(self, g: Element) -> Element:
        return self.images.inverse(g)


class InrTask(Task):
    """Fit one image per model: x = coordinates [P, 2], y = intensities [P, C]; loss MSE, metric PSNR."""

    kind = "regression"
    input_kind = "vector"
    metric_name = "psnr"
    higher_is_better = True
    per_model = "image"

    def __init__(self, source: str = "digits", group: str = "C4", image: int | None = None, **source_options: Any):
        if source not in SOURCES:
            raise TaskError(f"task 'inr': source={source!r}; allowed: {', '.join(map(repr, SOURCES))}")
        if group not in ("C4", "D4"):
            raise TaskError(f"task 'inr': group={group!r}; allowed: 'C4', 'D4'")
        if image is not None and (not isinstance(image, int) or isinstance(image, bool) or image < 0):
            raise TaskError(f"task 'inr': image={image!r}; allowed: an image index >= 0")
        self.name, self.image = "inr", image
        self.source = get_task(source, group=group, variant="upright", **source_options)
        self.group = CoordinateGroup(group)
        channels, height, width = self.source.input_shape
        self.image_shape = (channels, height, width)
        self.input_shape, self.output_shape = (2,), (channels,)
        self._images: tuple[Tensor, Tensor, list[str]] | None = None

    def images(self) -> tuple[Tensor, Tensor, list[str]]:
        """(images [M, C, H, W], labels [M], split of each image) in index order, read once."""
        if self._images is None:
            parts = {s: self.source.load(s, seed=INDEX_SEED) for s in SPLITS}
            self._images = (
                torch.cat([parts[s][0] for s in SPLITS]),
                torch.cat([parts[s][1] for s in SPLITS]),
                [s for s in SPLITS for _ in range(len(parts[s][1]))],
            )
        return self._images

    def _indices(self, keys: Sequence[int]) -> Tensor:
        n = len(self.images()[1])
        for k in keys:
            if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k < n:
                raise TaskError(f"task 'inr' (source {self.source.name!r}): image={k!r}; allowed: an integer in [0, {n})")
        return torch.tensor(list(keys), dtype=torch.long)

    def load_models(self, split: Split, seed: int, keys: Sequence[int]) -> tuple[Tensor, Tensor]:
        """(coordinates [P, 2] shared by all models, targets [N, P, C] of image keys[i] for model i)."""
        if split not in SPLITS:
            raise TaskError(f"task 'inr': split={split!r}; allowed: {', '.join(map(repr, SPLITS))}")
        images = self.images()[0][self._indices(keys)]  # [N, C, H, W]
        _, h, w = self.image_shape
        return coordinate_grid(h, w), images.flatten(2).transpose(1, 2).contiguous()

    def load(self, split: Split, seed: int = 0) -> tuple[Tensor, Tensor]:
        """(coordinates [P, 2], intensities [P, C]) of the one image this task names (option `image`)."""
        if self.image is None:
            raise TaskError("task 'inr': load() needs the option image=<index> (one image per model); "
                            "a population of INRs loads its images with load_models(split, seed, keys)")
        x, y = self.load_models(split, seed, [self.image])
        return x, y[0]

    def model_columns(self, keys: Sequence[int]) -> list[dict[str, Any]]:
        """Per-model columns of the models table: the image's source split and label."""
        _, labels, splits = self.images()
        idx = self._indices(keys).tolist()
        return [{"split": splits[i], "label": int(labels[i])} for i in idx]

    def metric(self, pred: Tensor, y: Tensor) -> Tensor:
        """PSNR in dB for intensities in [0, 1]: 10 log10(1 / MSE)."""
        mse = ((pred - y.to(pred.dtype)) ** 2).mean()
        return -10.0 * torch.log10(mse.clamp_min(1e-20))

    def image_of(self, pred: Tensor) -> Tensor:
        """Predictions on the coordinate grid [..., P, C] back as images [..., C, H, W]."""
        c, h, w = self.image_shape
        return pred.transpose(-1, -2).reshape(*pred.shape[:-2], c, h, w)


INR_OPTIONS: dict[str, Any] = {"source": SOURCES, "group": ("C4", "D4"), "image": int,
                               "data_dir": str, "n_train": int, "n_val": int, "n_test": int}


@register_task(
    "inr",
    description="one implicit neural representation per image of a source image task (per-model factor `image`)",
    group="C4 | D4 on coordinates",
    options=INR_OPTIONS,
    per_model="image",
)
def inr(**options: Any) -> InrTask:
    check_options("inr", options, set(INR_OPTIONS))
    source = options.get("source", "digits")
    if "data_dir" in options and "data_dir" not in TASKS.get(source, TASKS["digits"]).options:
        options = {k: v for k, v in options.items() if k != "data_dir"}  # bundled sources read no files
    return InrTask(**options)
