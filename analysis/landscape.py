"""Loss-landscape curvature of a population: Hessian top eigenvalue and trace from Hessian-vector products.

The Hessian of the task loss on a batch is never formed: H v is forward-over-reverse
(`torch.func.jvp` of `torch.func.grad`), vmapped over the N stacked models, so the cost per
product is about that of two backward passes for the whole population.

  top eigenvalue  power iteration on H (as PyHessian): converges to the eigenvalue of largest
                  magnitude, reported with its Rayleigh quotient <v, Hv>, v unit norm;
  trace           Hutchinson's estimator E[z^T H z] with Rademacher z, mean ± standard error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from zoos.functional import evaluating

State = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]  # (prediction, target) -> scalar mean loss


def _hvp(module: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> Callable[[State, State, State], State]:
    """(params, buffers, v) -> H v for one model; vmap it over a population."""

    def loss(p: State, b: State) -> Tensor:
        return loss_fn(functional_call(module, (p, b), (x,)), y)

    def hvp(p: State, b: State, v: State) -> State:
        return jvp(lambda q: grad(loss)(q, b), (p,), (v,))[1]

    return hvp


def _dot(a: State, b: State) -> Tensor:
    """Per-model inner product of two stacked states: [N]."""
    return sum((a[k] * b[k]).flatten(1).sum(1) for k in a)


Generators = torch.Generator | Sequence[torch.Generator] | None


def _draw(params: Mapping[str, Tensor], generator: Generators, draw: Callable[..., Tensor]) -> State:
    """A random tensor like each stacked parameter, `draw(shape, generator=...)`, drawn in the parameters' sorted
    order (not the mapping's, which may differ between processes): all from one generator, or model i's slice from
    generator[i] (a model's draws then do not depend on the models stacked beside it)."""
    keys = sorted(params)
    if generator is None or isinstance(generator, torch.Generator):
        drawn = {k: draw(params[k].shape, generator=generator) for k in keys}
        return {k: drawn[k].to(p) for k, p in params.items()}
    per_model = [{k: draw(params[k].shape[1:], generator=g) for k in keys} for g in generator]
    return {k: torch.stack([d[k] for d in per_model]).to(p) for k, p in params.items()}


def _rademacher(params: Mapping[str, Tensor], generator: Generators) -> State:
    bits = _draw(params, generator, lambda shape, generator: torch.randint(0, 2, shape, generator=generator))
    return {k: v * 2 - 1 for k, v in bits.items()}


@dataclass
class TopEigenvalue:
    """Per model: the dominant Hessian eigenvalue, its unit eigenvector, the last relative change, and the
    iterations it took."""

    value: Tensor  # [N]
    vector: State  # {key: [N, *shape]}
    rel_change: Tensor  # [N] |λ_k - λ_{k-1}| / |λ_k| at the model's last iteration
    iterations: Tensor  # [N]


def hessian_top_eigenvalue(
    module: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    iters: int = 100,
    tol: float = 1e-4,
    generator: Generators = None,
) -> TopEigenvalue:
    """Power iteration on every model's Hessian at once; a model stops (its value and vector kept) once it changes
    by < tol (relative), so its result does not depend on the models beside it. `generator`: one for every
    model's start, or one a model."""
    params, buffers = dict(params), dict(buffers)
    hvp = vmap(_hvp(module, x, y, loss_fn))
    v = _draw(params, generator, torch.randn)
    value = torch.zeros(next(iter(params.values())).shape[0], dtype=x.dtype, device=x.device)
    rel = torch.full_like(value, float("inf"))
    active = torch.ones_like(value, dtype=torch.bool)
    taken = torch.zeros_like(value, dtype=torch.long)
    with evaluating(module):
        for k in range(1, iters + 1):
            norm = _dot(v, v).sqrt().clamp_min(1e-30)
            unit = {key: t / norm.view(-1, *[1] * (t.dim() - 1)) for key, t in v.items()}
            hv = hvp(params, buffers, unit)
            new = _dot(unit, hv).detach()
            rel = torch.where(active, (new - value).abs() / new.abs().clamp_min(1e-30), rel)
            value = torch.where(active, new, value)
            v = {key: torch.where(active.view(-1, *[1] * (t.dim() - 1)), hv[key].detach(), t) for key, t in v.items()}
            taken += active
            if k > 1:
                active &= ~(rel < tol)
                if not bool(active.any()):
                    break
    norm = _dot(v, v).sqrt().clamp_min(1e-30)
    vector = {key: t / norm.view(-1, *[1] * (t.dim() - 1)) for key, t in v.items()}
    return TopEigenvalue(value, vector, rel, taken)


@dataclass
class Trace:
    """Per model: Hutchinson's trace estimate, its standard error, and the probes it took.

    samples holds every model's probe values z^T H z in order, NaN past the probes that model used.
    """

    mean: Tensor  # [N]
    se: Tensor  # [N]
    n_samples: Tensor  # [N] probes used per model
    samples: Tensor  # [N, most probes used]

    def precise(self, rel_se: float) -> Tensor:
        """[N] whether each model's standard error is at most `rel_se` of its |estimate|."""
        return self.se <= rel_se * self.mean.abs()


def hessian_trace(
    module: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    n_samples: int = 64,
    rel_se: float | None = None,
    min_samples: int = 8,
    generator: Generators = None,
) -> Trace:
    """tr H ≈ mean over Rademacher z of z^T H z, every model with its own probes (`generator`: one for all
    models' probes, or one a model).

    With `rel_se`, probes are added until the standard error is at most `rel_se` times |mean|: a model stops at
    the first count n >= min(min_samples, n_samples) where that holds, or at `n_samples`, whichever comes first.
    Without it every model takes `n_samples` probes.
    """
    if n_samples < 2:
        raise ValueError(f"n_samples={n_samples}; Hutchinson's standard error needs at least 2")
    if rel_se is not None and not rel_se > 0:
        raise ValueError(f"rel_se={rel_se}; the target standard error is a positive fraction of the estimate")
    params, buffers = dict(params), dict(buffers)
    hvp = vmap(_hvp(module, x, y, loss_fn))
    first = max(2, min(min_samples, n_samples)) if rel_se is not None else n_samples
    n_models = next(iter(params.values())).shape[0]
    active = torch.ones(n_models, dtype=torch.bool, device=x.device)
    samples: list[Tensor] = []
    with evaluating(module):
        for k in range(1, n_samples + 1):
            z = _rademacher(params, generator)
            value = _dot(z, hvp(params, buffers, z)).detach()
            samples.append(torch.where(active, value, torch.full_like(value, float("nan"))))
            if k >= first and rel_se is not None:
                s = torch.stack(samples, 1)[:, :k]
                se = s.std(1) / k**0.5
                active &= ~(se <= rel_se * s.mean(1).abs())
                if not bool(active.any()):
                    break
    s = torch.stack(samples, 1)
    count = (~s.isnan()).sum(1)
    mean = s.nansum(1) / count
    var = ((s - mean[:, None]) ** 2).nansum(1) / (count - 1)
    return Trace(mean, var.sqrt() / count.sqrt(), count, s)
