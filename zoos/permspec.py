"""Permutation specs: hidden-unit symmetry described as data, so one algorithm serves every architecture.

A `PermSpec` maps each hidden permutation to the (parameter, axis) pairs it acts on. Permuting every
listed axis of a trained network by the same permutation leaves the function it computes unchanged.
A residual stream is one permutation listed on many parameters; a group CNN keeps its group axis
separate from its channel axis, so a channel permutation moves whole fibres.

Block-structured permutations (attention heads). An axis of n * m entries read as n blocks of m (n heads
of head_dim) has a smaller symmetry than all of S_{n*m}: whole blocks may move (a head permutation sigma),
and the entries inside each block may be permuted (tau[h], one permutation per block). `blocks[name] =
(group, n)` says permutation `name` is such a permutation; all permutations of one `group` move the blocks
alike (queries/keys and values/outputs share the head permutation), while each permutes inside the blocks
on its own. Such a permutation is still stored as one flat index tensor of size n * m,

    perm[h * m + j] = sigma[h] * m + tau[h, j]        (`from_blocks` / `to_blocks`)

so applying, inverting and composing are those of any permutation (block permutations form a group), and
a spec without `blocks` is exactly the plain spec it always was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor

Perms = dict[str, Tensor]  # permutation name -> int64 index tensor of its size


@dataclass(frozen=True)
class PermSpec:
    """`perms[name]` = ((state_dict key, axis), ...) acted on by hidden permutation `name`; `blocks[name]` =
    (group, number of blocks) for a block-structured one (see the module docstring)."""

    perms: Mapping[str, tuple[tuple[str, int], ...]]
    blocks: Mapping[str, tuple[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.blocks) - set(self.perms))
        if unknown:
            raise ValueError(f"blocks names permutation {unknown[0]!r}, which the spec does not have; "
                             f"permutations: {', '.join(self.perms)}")
        counts: dict[str, int] = {}
        for name, (group, n) in self.blocks.items():
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"blocks[{name!r}]: the number of blocks must be an integer >= 1, got {n!r}")
            if counts.setdefault(group, n) != n:
                raise ValueError(f"block group {group!r}: {name!r} has {n} blocks, another member {counts[group]}")

    def groups(self) -> dict[str, list[str]]:
        """{block group: its permutations, in spec order}."""
        out: dict[str, list[str]] = {}
        for name in self.perms:
            if name in self.blocks:
                out.setdefault(self.blocks[name][0], []).append(name)
        return out

    def unstructured(self) -> "PermSpec":
        """The same permutations with their block structure forgotten: every block-structured one becomes a
        plain permutation of all its entries (most of which are not symmetries: head-unaware matching)."""
        return PermSpec(self.perms)

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
            if name in self.blocks and out[name] % self.blocks[name][1]:
                raise ValueError(f"permutation {name!r} has size {out[name]}, not a multiple of its "
                                 f"{self.blocks[name][1]} blocks")
        return out

    def identity(self, state: Mapping[str, Tensor], batch_dims: int = 0) -> Perms:
        return {k: torch.arange(n) for k, n in self.sizes(state, batch_dims).items()}

    def random(self, state: Mapping[str, Tensor], generator: torch.Generator | None = None) -> Perms:
        """A uniformly random permutation the spec allows, for every hidden permutation: a block-structured one
        draws its group's block permutation (once per group, at its first member) and its own within-block ones."""
        out: Perms = {}
        sigmas: dict[str, Tensor] = {}
        for name, size in self.sizes(state).items():
            if name not in self.blocks:
                out[name] = torch.randperm(size, generator=generator)
                continue
            group, n = self.blocks[name]
            if group not in sigmas:
                sigmas[group] = torch.randperm(n, generator=generator)
            tau = torch.stack([torch.randperm(size // n, generator=generator) for _ in range(n)])
            out[name] = from_blocks(sigmas[group], tau)
        return out

    def check(self, perms: Perms) -> None:
        """Raise unless `perms` is a permutation the spec allows: every entry a permutation of its size, every
        block-structured one moving whole blocks, and the members of a block group moving them alike."""
        for name in self.perms:
            p = perms[name]
            if not torch.equal(p.sort().values, torch.arange(len(p), device=p.device)):
                raise ValueError(f"permutation {name!r} is not a permutation of 0..{len(p) - 1}")
        for group, names in self.groups().items():
            n = self.blocks[names[0]][1]
            sigmas = []
            for name in names:
                sigma, tau = to_blocks(perms[name], n)
                if not torch.equal(from_blocks(sigma, tau), perms[name].cpu()):
                    raise ValueError(f"permutation {name!r} moves entries across its {n} blocks")
                sigmas.append(sigma)
            if any(not torch.equal(s, sigmas[0]) for s in sigmas):
                raise ValueError(f"the permutations of block group {group!r} ({', '.join(names)}) move the blocks differently")


def from_blocks(sigma: Tensor, tau: Tensor) -> Tensor:
    """The flat permutation moving block sigma[h] to block h, entries inside it by tau[h]: [n] x [n, m] -> [n * m]."""
    n, m = tau.shape
    return (sigma.view(n, 1) * m + tau).flatten()


def to_blocks(perm: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(sigma [n], tau [n, m]) of a flat block permutation of n blocks (`from_blocks` inverted)."""
    v = perm.cpu().view(n, -1)
    return v[:, 0] // v.shape[1], v % v.shape[1]


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
