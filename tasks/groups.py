"""Symmetry groups and their actions on a task's inputs and outputs.

A `Group` is the mathematics a task declares: which transformations leave the problem unchanged
and how they act on batched inputs `x` and targets `y`. Elements are opaque to callers: get them
from `elements()` (finite groups) or `sample()` (any group) and hand them back to `act_in` /
`act_out`. Lie groups also expose their Lie-algebra `generators()` and `exp()`, so that a Lie
derivative can differentiate `act_in(exp(t A), x)` at t = 0.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
from torch import Tensor

Element = Any


class Group(ABC):
    """A group acting on batched inputs (leading batch axis) and batched targets."""

    name: str
    is_finite: bool = False

    @abstractmethod
    def act_in(self, g: Element, x: Tensor) -> Tensor:
        """The action of `g` on a batch of inputs."""

    @abstractmethod
    def act_out(self, g: Element, y: Tensor) -> Tensor:
        """The action of `g` on a batch of targets (identity for an invariant task)."""

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> list[Element]:
        """`n` elements drawn from the group's uniform (Haar) measure, or a stated proxy."""

    @abstractmethod
    def identity(self) -> Element:
        """The identity element."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class FiniteGroup(Group):
    """A finite group: every element can be enumerated, so orbit averages are exact."""

    is_finite = True

    @abstractmethod
    def elements(self) -> list[Element]:
        """All elements, identity first."""

    @property
    def order(self) -> int:
        return len(self.elements())

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[Element]:
        els = self.elements()
        idx = torch.randint(len(els), (n,), generator=generator)
        return [els[i] for i in idx.tolist()]

    def identity(self) -> Element:
        return self.elements()[0]


class LieGroup(Group):
    """A continuous matrix group (possibly times a finite factor) with a Lie algebra."""

    @abstractmethod
    def generators(self) -> Tensor:
        """A basis of the Lie algebra as a [k, d, d] tensor, in the defining representation."""

    @abstractmethod
    def exp(self, a: Tensor) -> Element:
        """The element exp(a) for a Lie-algebra matrix `a` ([d, d]); differentiable in `a`."""


def element_list(group: Group, n_samples: int, generator: torch.Generator | None = None) -> Sequence[Element]:
    """All elements of a finite group, else `n_samples` sampled ones: what an orbit average runs over."""
    if isinstance(group, FiniteGroup):
        return group.elements()
    return group.sample(n_samples, generator)
