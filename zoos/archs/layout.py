"""How a point-cloud task's columns transform, read off its group: what the equivariant point models need.

Generated tasks describe their group action as plain data (`tasks.groups.MatrixGroup`: a per-point
column layout of scalars "s", vectors "v" and positions "p", and an output layout). The point
architectures read that description instead of a table of task names, so a new task with the same
kind of group works without touching them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tasks.base import Task
from tasks.groups import LorentzGroup, MatrixGroup
from zoos.archs.base import ArchError


@dataclass(frozen=True)
class PointLayout:
    """Column roles of one point [k] and the output kind, for x [B, n, k]."""

    n: int  # points per sample
    d: int  # dimension of the vectors the group acts on
    scalars: tuple[int, ...]  # invariant columns
    vectors: tuple[tuple[int, ...], ...]  # column groups that rotate (v -> R v)
    positions: tuple[tuple[int, ...], ...]  # column groups that rotate and translate (r -> R r + t)
    metric: tuple[float, ...]  # diagonal of the invariant bilinear form (Euclidean or Minkowski)
    output: str  # "invariant" | "matrix" (Y -> R Y R^T) | "points" (per-point layout of y)
    out_positions: tuple[tuple[int, ...], ...] = ()  # for "points" outputs: position column groups of y
    out_vectors: tuple[tuple[int, ...], ...] = ()  # for "points" outputs: vector column groups of y

    @property
    def euclidean(self) -> bool:
        return all(m == 1.0 for m in self.metric)

    def metric_tensor(self, like: Tensor) -> Tensor:
        return torch.tensor(self.metric, dtype=like.dtype, device=like.device)


def _columns(kinds: tuple[str, ...], d: int) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    scalars, vectors, positions, i = [], [], [], 0
    for kind in kinds:
        if kind == "s":
            scalars.append(i)
            i += 1
        else:
            (vectors if kind == "v" else positions).append(tuple(range(i, i + d)))
            i += d
    return tuple(scalars), tuple(vectors), tuple(positions)


def point_layout(task: Task, arch: str) -> PointLayout:
    """The layout of a points task whose group is a `MatrixGroup`; refuse other tasks naming the arch."""
    g = task.group
    if task.input_kind != "points" or not isinstance(g, MatrixGroup) or isinstance(g.x_layout, str):
        raise ArchError(
            f"architecture {arch!r} needs a points task whose group acts by matrices on per-point columns; "
            f"task {task.name!r} has {task.input_kind} inputs and group {g.name}"
        )
    n, k = task.input_shape
    scalars, vectors, positions = _columns(g.x_layout, g.d)
    if not g.translations:  # without translations a position column group is just a vector
        vectors, positions = vectors + positions, ()
    if len(scalars) + g.d * (len(vectors) + len(positions)) != k:
        raise ArchError(f"architecture {arch!r}: task {task.name!r} has {k} columns per point, layout says otherwise")
    metric = (1.0, -1.0, -1.0, -1.0) if isinstance(g, LorentzGroup) else (1.0,) * g.d
    if isinstance(g.y_layout, str):
        return PointLayout(n, g.d, scalars, vectors, positions, metric, g.y_layout)
    _, out_v, out_p = _columns(g.y_layout, g.d)
    if not g.translations:
        out_v, out_p = out_v + out_p, ()
    return PointLayout(n, g.d, scalars, vectors, positions, metric, "points", out_p, out_v)
