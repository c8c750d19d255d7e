"""Permutation specs: hidden-unit symmetry described as data, so one algorithm serves every architecture.

A `PermSpec` maps each hidden permutation to the (parameter, axis) pairs it acts on. Permuting every
listed axis of a trained network by the same permutation leaves the function it computes unchanged.
A residual stream is one permutation listed on many parameters; a group CNN keeps its group axis
separate from its channel axis, so a channel permutation moves whole fibres.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

Perms = dict[str, Tensor]  # permutation name -> int64 index tensor of its size


@dataclass(frozen=True)
class PermSpec:
    """`perms[name]` = ((state_dict key, axis), ...) acted on by hidden permutation `name`."""

    perms: Mapping[str, tuple[tuple[str, int], ...]]

    def axes_to_perm(self) -> dict[str, dict[int, str]]:
        """For each parameter key: {axis: permutation name} of the axes that some permutation acts on."""
        out: dict[str, dict[int, str]] = {}
        for name, pairs in self.perms.items():
            for key, axis in pairs:
                if axis in out.setdefault(key, {}):
                    raise ValueError(f"axis {axis} of {key!r} is claimed by {out[key][axis]!r} and {name!r}")
                out[key][axis] = name
        return out

    def sizes(self, state: Mapping[str, Tensor], batch_dims: int = 0) -> dict[str, int]:
        """The size of each permutation, read off `state` (checked consistent across its axes)."""
        out: dict[str, int] = {}
        for name, pairs in self.perms.items():
            for key, axis in pairs:
                if key not in state:
                    raise KeyError(f"permutation {name!r} names parameter {key!r}, which the state does not have")
                n = state[key].shape[batch_dims + axis]
                if out.setdefault(name, n) != n:
                    raise ValueError(f"permutation {name!r}: axis {axis} of {key!r} has size {n}, others {out[name]}")
        return out

    def identity(self, state: Mapping[str, Tensor], batch_dims: int = 0) -> Perms:
        return {k: torch.arange(n) for k, n in self.sizes(state, batch_dims).items()}

    def random(self, state: Mapping[str, Tensor], generator: torch.Generator | None = None) -> Perms:
        """A uniformly random permutation for every hidden permutation of the spec."""
        return {k: torch.randperm(n, generator=generator) for k, n in self.sizes(state).items()}


def apply_permutation(spec: PermSpec, state: Mapping[str, Tensor], perms: Perms, batch_dims: int = 0) -> dict[str, Tensor]:
    """Permute every axis the spec lists: new[..., i, ...] = old[..., perm[i], ...] along that axis.

    `batch_dims` leading axes (a stacked population) are left alone; the same permutation is applied
    to every model. Keys the spec does not mention are returned unchanged (not copied).
    """
    out = dict(state)
    for key, axes in spec.axes_to_perm().items():
        w = state[key]
        for axis, name in axes.items():
            w = w.index_select(batch_dims + axis, perms[name].to(w.device))
        out[key] = w
    return out


def invert(perms: Perms) -> Perms:
    """The inverse of each permutation."""
    return {k: torch.argsort(p) for k, p in perms.items()}


def compose(first: Perms, then: Perms) -> Perms:
    """The permutation that applies `first` and then `then` (apply_permutation order)."""
    return {k: first[k][then[k]] for k in first}
