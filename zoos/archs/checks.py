"""One generic equivariance check for any model and any group: the relative orbit error.

    err(g) = RMS(f(g.x) - g.f(x)) / (RMS f(g.x) + RMS g.f(x))

over every element of a finite group, or `n_samples` sampled elements of a Lie group. The error is
scale-free (0 for an exactly equivariant map, ~1 for unrelated outputs), so one tolerance per dtype
serves every architecture: 1e-5 in float64, 1e-4 in float32.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from tasks.groups import Element, Group, element_list

TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-4}


def relative_orbit_error(f_gx: Tensor, g_fx: Tensor) -> float:
    """RMS of the difference over the sum of the two RMS values (0 when both are zero)."""
    rms = lambda t: t.double().pow(2).mean().sqrt()  # noqa: E731
    denom = rms(f_gx) + rms(g_fx)
    return 0.0 if denom == 0 else float(rms(f_gx - g_fx) / denom)


@torch.no_grad()
def orbit_errors(
    model: Callable[[Tensor], Tensor], group: Group, x: Tensor, *, n_samples: int = 8, generator: torch.Generator | None = None
) -> list[float]:
    """The relative orbit error of `model` at the batch `x` for each element checked."""
    fx = model(x)
    return [relative_orbit_error(model(group.act_in(g, x)), group.act_out(g, fx)) for g in element_list(group, n_samples, generator)]


def assert_equivariant(
    model: Callable[[Tensor], Tensor],
    group: Group,
    x: Tensor,
    *,
    tol: float | None = None,
    n_samples: int = 8,
    generator: torch.Generator | None = None,
) -> float:
    """Fail unless every checked element's relative orbit error is below `tol` (default by x's dtype); returns the max."""
    tol = TOLERANCE.get(x.dtype, 1e-3) if tol is None else tol
    errs = orbit_errors(model, group, x, n_samples=n_samples, generator=generator)
    worst = max(range(len(errs)), key=errs.__getitem__)
    if not errs[worst] < tol:  # also fails on NaN
        raise AssertionError(
            f"not equivariant to {group.name}: relative orbit error {errs[worst]:.3g} at element #{worst} "
            f"(tolerance {tol:g}, {x.dtype}); all errors: {[f'{e:.2g}' for e in errs]}"
        )
    return errs[worst]


class PointPermutations(Group):
    """S_n alone, permuting the point axis (axis 1) of inputs, and of outputs when `permute_output`.

    For checking a model against the permutation factor of a task group such as O(5) x S_16.
    """

    def __init__(self, n: int, permute_output: bool = False):
        self.n, self.permute_output = n, permute_output
        self.name = f"S{n}"

    def act_in(self, g: Element, x: Tensor) -> Tensor:
        return x[:, g.to(x.device)]

    def act_out(self, g: Element, y: Tensor) -> Tensor:
        return y[:, g.to(y.device)] if self.permute_output else y

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[Element]:
        return [torch.randperm(self.n, generator=generator) for _ in range(n)]

    def identity(self) -> Element:
        return torch.arange(self.n)
