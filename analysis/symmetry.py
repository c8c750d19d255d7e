"""Orbit equivariance error of a population: how far f(g.x) is from g.f(x), per model.

For each group element g the relative error is

    e_g = RMS(f(g.x) - g.f(x)) / (RMS f(g.x) + RMS g.f(x))

(0 for an exactly equivariant model, at most 1), over the batch and every output coordinate, and
per output coordinate over the batch. Finite groups average over all elements, identity included,
so the number is exact for the batch. Lie groups average over sampled elements (the group's Haar
measure or its stated proxy), reported as mean ± 1.96 standard errors over the samples.

The same orbit average over a hidden layer's output (taken with a forward hook) measures how
invariant (or, with a `feature_action`, how equivariant) the learned features are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from analysis.representation import population_features
from tasks.groups import Element, FiniteGroup, Group, element_list
from zoos.functional import evaluating, population_forward


@dataclass
class OrbitError:
    """Relative orbit error of N models: `mean` [N] ± `ci` [N] (95%, 0 when exact), and its parts."""

    mean: Tensor  # [N] averaged over group elements and outputs
    ci: Tensor  # [N] half-width of the 95% interval over sampled elements; 0 for a finite group
    per_element: Tensor  # [N, n_elements]
    per_output: Tensor  # [N, *output_shape], averaged over elements
    exact: bool  # True when every element of a finite group was used


def relative_error(a: Tensor, b: Tensor, dims: Sequence[int]) -> Tensor:
    """RMS(a - b) / (RMS a + RMS b) over `dims`; 0 where both are 0."""
    rms = lambda t: t.pow(2).mean(dim=tuple(dims)).sqrt()  # noqa: E731
    return rms(a - b) / (rms(a) + rms(b)).clamp_min(torch.finfo(a.dtype).tiny)


def _on_batch(action: Callable[[Element, Tensor], Tensor], g: Element, y: Tensor) -> Tensor:
    """Apply a batch-first action to a population's [N, B, ...] tensor by folding N into the batch."""
    n, b = y.shape[:2]
    return action(g, y.reshape(n * b, *y.shape[2:])).reshape(n, b, *y.shape[2:])


def orbit_average(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    group: Group,
    out_action: Callable[[Element, Tensor], Tensor],
    *,
    n_samples: int = 32,
    generator: torch.Generator | None = None,
) -> OrbitError:
    """Orbit error of a population map `fn`: x [B, ...] -> [N, B, ...], with outputs acted on by `out_action`."""
    elements = element_list(group, n_samples, generator)
    fx = fn(x)
    per_el, per_out = [], []
    for g in elements:
        a = fn(group.act_in(g, x))
        b = _on_batch(out_action, g, fx)
        per_el.append(relative_error(a, b, range(1, a.dim())))
        per_out.append(relative_error(a, b, (1,)))
    per_element = torch.stack(per_el, 1)
    exact = isinstance(group, FiniteGroup)
    k = per_element.shape[1]
    if exact or k < 2:
        ci = torch.zeros_like(per_element[:, 0])
    else:
        ci = 1.96 * per_element.std(1) / k**0.5
    return OrbitError(per_element.mean(1), ci, per_element, torch.stack(per_out).mean(0), exact)


def orbit_error(
    module: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    x: Tensor,
    group: Group,
    *,
    n_samples: int = 32,
    generator: torch.Generator | None = None,
) -> OrbitError:
    """Equivariance error of N stacked models (eval mode) on a batch x: f(g.x) against group.act_out(g, f(x))."""
    with evaluating(module), torch.no_grad():
        fn = lambda xb: population_forward(module, params, buffers, xb)  # noqa: E731
        return orbit_average(fn, x, group, group.act_out, n_samples=n_samples, generator=generator)


def feature_error(
    module: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    x: Tensor,
    group: Group,
    layer: str,
    *,
    feature_action: Callable[[Element, Tensor], Tensor] | None = None,
    n_samples: int = 32,
    generator: torch.Generator | None = None,
) -> OrbitError:
    """Invariance error of the output of submodule `layer`: h(g.x) against h(x), or feature_action(g, h(x))."""
    action = feature_action if feature_action is not None else (lambda g, h: h)
    with evaluating(module), torch.no_grad():
        fn = lambda xb: population_features(module, params, buffers, xb, [layer])[layer]  # noqa: E731
        return orbit_average(fn, x, group, action, n_samples=n_samples, generator=generator)
