"""Bezier-curve mode connectivity (Garipov et al. 2018): a low-loss curve between two fixed models.

A Bezier curve with k bends has k trainable control points between the fixed endpoints a and b,
so its degree is k + 1: phi(t) = sum_i C(k+1, i) (1-t)^(k+1-i) t^i theta_i, theta_0 = a, theta_(k+1) = b.
Training samples t ~ U(0, 1) and minimises the task loss at phi(t). Several t per step are run as one
vectorised population, which lowers the gradient's variance at the cost of one batched forward.
Control points start evenly spaced on the segment, so the untrained curve is the linear path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import vmap

from analysis.connectivity import PathResult, as_lambdas, evaluate_path
from zoos.functional import evaluating, population_forward, split_state

State = dict[str, Tensor]


def bernstein(ts: Tensor, degree: int) -> Tensor:
    """Bernstein basis [T, degree + 1]: C(n, i) (1 - t)^(n - i) t^i."""
    i = torch.arange(degree + 1, dtype=ts.dtype, device=ts.device)
    binom = torch.tensor([math.comb(degree, j) for j in range(degree + 1)], dtype=ts.dtype, device=ts.device)
    t = ts[:, None]
    return binom * (1 - t) ** (degree - i) * t**i


def bezier_states(a: Mapping[str, Tensor], controls: Mapping[str, Tensor], b: Mapping[str, Tensor], ts: Tensor) -> State:
    """Points phi(t) of the curve, stacked [T, ...]; `controls` are stacked [k, ...] (k >= 0 bends).

    Keys missing from `controls` (buffers) follow the straight line; non-float entries are a's.
    """
    out = {}
    for key, va in a.items():
        if not va.is_floating_point():
            out[key] = va.expand(len(ts), *va.shape).clone()
            continue
        if key in controls:
            pts = torch.cat([va[None], controls[key], b[key][None]])
        else:
            pts = torch.stack([va, b[key]])
        w = bernstein(ts.to(va.device, va.dtype), len(pts) - 1)
        out[key] = torch.tensordot(w, pts, dims=1)
    return out


@dataclass
class BezierResult:
    """Trained control points (stacked [bends, ...]) and the loss / metric along the trained curve."""

    controls: State
    path: PathResult
    train_loss: list[float] = field(default_factory=list)


def bezier_curve(
    module: nn.Module,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    task: Any,
    *,
    bends: int = 3,
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 128,
    ts_per_step: int = 4,
    lambdas: int | Sequence[float] | Tensor = 25,
    splits: Sequence[str] = ("train", "test"),
    seed: int = 0,
    device: torch.device | str | None = None,
) -> BezierResult:
    """Train a Bezier curve with `bends` control points between fixed a and b on the task's train split.

    Each step draws a minibatch and `ts_per_step` values t ~ U(0, 1) and takes an Adam step on the
    mean loss at phi(t) (eval mode: no dropout). Returns the control points and the curve evaluated
    at `lambdas` on `splits`.
    """
    if bends < 1:
        raise ValueError(f"bends must be >= 1, got {bends}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    a = {k: (v.to(device) if device is not None else v) for k, v in a.items()}
    b = {k: (v.to(device) if device is not None else v) for k, v in b.items()}
    pnames = {n for n, _ in module.named_parameters()}
    frac = torch.arange(1, bends + 1, dtype=torch.float32) / (bends + 1)
    controls = {
        k: torch.stack([(1 - f) * a[k] + f * b[k] for f in frac.tolist()]).requires_grad_(True)
        for k in a
        if k in pnames and a[k].is_floating_point()
    }
    opt = torch.optim.Adam(list(controls.values()), lr=lr)
    x, y = task.load("train", seed)
    g = torch.Generator().manual_seed(seed)
    trace = []
    with evaluating(module):
        for _ in range(steps):
            idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=g)
            xb, yb = x[idx], y[idx]
            if device is not None:
                xb, yb = xb.to(device), yb.to(device)
            ts = torch.rand(ts_per_step, generator=g)
            params, buffers = split_state(module, bezier_states(a, controls, b, ts))
            pred = population_forward(module, params, buffers, xb)
            loss = vmap(task.loss, in_dims=(0, None))(pred, yb).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            trace.append(float(loss.detach()))
    controls = {k: v.detach() for k, v in controls.items()}
    lam = as_lambdas(lambdas)
    path = evaluate_path(module, bezier_states(a, controls, b, lam), lam, task, splits=splits, seed=seed, device=device)
    return BezierResult(controls, path, trace)
