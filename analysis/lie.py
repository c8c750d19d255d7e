"""Lie derivative: the local equivariance error of a population for continuous transformations.

For a one-parameter flow ρ(t) = exp(tA) acting on inputs and outputs (Gruver et al. 2023),

    L_A f(x) = d/dt [ ρ_out(-t) f(ρ_in(t) x) ] at t = 0,

zero for every x exactly when f commutes with the flow. A flow is a plain function (t, batch) ->
batch: `group_flow` builds it from a task group's Lie-algebra generator (so(n), Lorentz boosts,
translations), `image_flow` rotates, translates (in pixels) or scales (log-factor) images by
differentiable resampling (bicubic: C1, so the derivative at t = 0 is well defined, where bilinear
sampling sits on its kinks). The resampling is `resample`, grid_sample's arithmetic written in plain
tensor ops, so that forward-mode AD runs through it on every device (aten's grid_sample has no
forward AD, and on CUDA its backward has no derivative either). The derivative is one forward-mode
`torch.func.jvp`; other ops without forward AD fall back to the double-vjp trick (the vjp of a vjp
is a jvp). The reported norm, as in lie-deriv, is the per-example L2 norm over output coordinates,
averaged over the batch.

Layer-wise attribution. Write f = f_k ∘ ... ∘ f_1 and give every listed layer its own flow
parameter: F(t_1..t_k) runs layer i as ρ_i(-t_i) f_i(ρ_{i-1}(t_i) h). Then ∂F/∂t_i at 0 is
J_{f>i} · L(f_i): the Lie derivative of layer i alone, carried to the output by the layers after it,
and for a chain the contributions sum to L f (the chain rule). How a hidden tensor transforms is a
rule (`hidden_flow`): shaped like one input batch -> the input flow, like one output batch -> the
output flow, image-like (>= 4 dims, more than one pixel) under an image flow -> that image flow,
otherwise invariant (a pooled 1x1 map is a vector of invariants).
Whatever runs outside the listed modules, or breaks the rule, is reported as `unattributed`.
The attribution costs one derivative of the whole population per listed layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp, vjp

from tasks.groups import LieGroup
from zoos.functional import evaluating, population_forward

Flow = Callable[[Tensor, Tensor], Tensor]  # (t: scalar tensor, batch [B, ...]) -> transformed batch
IMAGE_FLOWS = ("rotation", "translate_x", "translate_y", "scale")


def group_flow(group: LieGroup, generator: Tensor, side: str = "in") -> Flow:
    """The flow t -> act(exp(t A)) of a Lie group on inputs (side="in") or outputs ("out")."""
    if side not in ("in", "out"):
        raise ValueError(f"side={side!r}; allowed: 'in', 'out'")
    act = group.act_in if side == "in" else group.act_out

    def flow(t: Tensor, x: Tensor) -> Tensor:
        return act(group.exp(t * generator.to(t.dtype)), x)

    return flow


def _cubic(f: Tensor) -> list[Tensor]:
    """Weights of the taps at offsets -1, 0, 1, 2 for a fractional position f in [0, 1): the cubic
    convolution kernel with a = -0.75, as grid_sample and upsample use."""
    a = -0.75

    def near(d: Tensor) -> Tensor:  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: Tensor) -> Tensor:  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(f + 1), near(f), near(1 - f), far(2 - f)]


def resample(x: Tensor, grid: Tensor, mode: str = "bicubic") -> Tensor:
    """`F.grid_sample(x, grid, mode, padding_mode="zeros", align_corners=False)` in plain tensor ops
    (gathers and polynomials), so it has forward- and higher-order derivatives on every device.

    x [B, C, H, W]; grid [B, Ho, Wo, 2] of (x, y) sampling positions normalised to [-1, 1]."""
    if mode not in ("bicubic", "bilinear"):
        raise ValueError(f"resample mode={mode!r}; allowed: 'bicubic', 'bilinear'")
    b, c, h, w = x.shape
    ho, wo = grid.shape[1:3]
    ix = ((grid[..., 0] + 1) * w - 1) / 2  # pixel coordinates, align_corners=False
    iy = ((grid[..., 1] + 1) * h - 1) / 2
    x0, y0 = ix.floor(), iy.floor()
    fx, fy = ix - x0, iy - y0
    if mode == "bicubic":
        offsets, wx, wy = (-1, 0, 1, 2), _cubic(fx), _cubic(fy)
    else:
        offsets, wx, wy = (0, 1), [1 - fx, fx], [1 - fy, fy]
    flat = x.reshape(b, c, h * w)
    out = x.new_zeros(b, c, ho * wo)
    for oy, wy_ in zip(offsets, wy):
        yy = (y0 + oy).long()
        for ox, wx_ in zip(offsets, wx):
            xx = (x0 + ox).long()
            inside = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)  # zeros padding: taps outside read 0
            index = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).reshape(b, 1, -1).expand(b, c, -1)
            weight = (wy_ * wx_ * inside).reshape(b, 1, -1)
            out = out + flat.gather(2, index) * weight
    return out.reshape(b, c, ho, wo)


class ImageFlow:
    """Rotation (radians), translation (pixels) or scaling (log factor) of [B, ..., H, W] by resampling."""

    def __init__(self, kind: str, mode: str = "bicubic"):
        if kind not in IMAGE_FLOWS:
            raise ValueError(f"image flow kind={kind!r}; allowed: {', '.join(IMAGE_FLOWS)}")
        self.kind, self.mode = kind, mode

    def theta(self, t: Tensor, h: int, w: int) -> Tensor:
        """The 2x3 affine map from output to sampling coordinates (normalised to [-1, 1])."""
        one, zero = torch.ones_like(t), torch.zeros_like(t)
        if self.kind == "rotation":
            c, s = torch.cos(t), torch.sin(t)
            rows = [[c, -s, zero], [s, c, zero]]
        elif self.kind == "translate_x":
            rows = [[one, zero, t * 2 / w], [zero, one, zero]]
        elif self.kind == "translate_y":
            rows = [[one, zero, zero], [zero, one, t * 2 / h]]
        else:
            e = torch.exp(t)
            rows = [[e, zero, zero], [zero, e, zero]]
        return torch.stack([torch.stack(r) for r in rows])

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        if x.dim() < 3:
            raise ValueError(f"image flow needs [B, ..., H, W] inputs, got shape {tuple(x.shape)}")
        b, (h, w) = x.shape[0], x.shape[-2:]
        flat = x.reshape(b, -1, h, w)
        theta = self.theta(t.to(x.dtype), h, w).expand(b, 2, 3)
        grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
        return resample(flat, grid, self.mode).reshape(x.shape)


def image_flow(kind: str, mode: str = "bicubic") -> Flow:
    """A differentiable image transformation flow: 'rotation', 'translate_x', 'translate_y' or 'scale'."""
    return ImageFlow(kind, mode)


def derivative(fn: Callable[[Tensor], Tensor], t0: Tensor, tangent: Tensor | None = None) -> Tensor:
    """d/ds fn(t0 + s * tangent) at s = 0 by forward mode, or by double vjp where forward AD is missing."""
    tangent = torch.ones_like(t0) if tangent is None else tangent
    try:
        return jvp(fn, (t0,), (tangent,))[1]
    except (RuntimeError, NotImplementedError) as err:
        if "forward AD" not in str(err) and "jvp" not in str(err).lower():
            raise

    def pulled(u: Tensor) -> Tensor:  # u -> J^T u, linear in u; its vjp with the tangent is J tangent
        return vjp(fn, t0)[1](u)[0]

    out = fn(t0)
    _, pullback = vjp(pulled, torch.zeros_like(out))
    return pullback(tangent)[0]


def _fold(flow: Flow, t: Tensor, y: Tensor) -> Tensor:
    """Apply a batch-first flow to a population tensor [N, B, ...]."""
    n, b = y.shape[:2]
    return flow(t, y.reshape(n * b, *y.shape[2:])).reshape(y.shape)


def lie_derivative(
    module: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    x: Tensor,
    in_flow: Flow,
    out_flow: Flow | None = None,
) -> Tensor:
    """L f(x) [N, B, *out] for N stacked models (eval mode); `out_flow` None means invariant outputs."""
    t0 = torch.zeros((), dtype=x.dtype, device=x.device)

    def transformed(t: Tensor) -> Tensor:
        y = population_forward(module, params, buffers, in_flow(t, x))
        return y if out_flow is None else _fold(out_flow, -t, y)

    with evaluating(module):
        return derivative(transformed, t0)


def lie_norm(lie: Tensor) -> Tensor:
    """[N]: per-example L2 norm over output coordinates of L f [N, B, *out], averaged over the batch."""
    return lie.flatten(2).norm(dim=-1).mean(-1)


def group_lie_derivatives(
    module: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, group: LieGroup
) -> Tensor:
    """[N, k]: the Lie-derivative norm of every model along each of the group's k generators."""
    gens = group.generators().to(x.device)
    return torch.stack(
        [
            lie_norm(lie_derivative(module, params, buffers, x, group_flow(group, a, "in"), group_flow(group, a, "out")))
            for a in gens
        ],
        -1,
    )


@dataclass
class LayerwiseLie:
    """Per-layer attribution of the Lie derivative: contributions sum to `total` up to `unattributed`."""

    contributions: dict[str, Tensor]  # layer -> [N, B, *out]
    total: Tensor  # [N, B, *out]
    unattributed: Tensor  # total - sum of contributions

    def norms(self) -> dict[str, Tensor]:
        """{layer: [N]} norm of each contribution, plus 'total' and 'unattributed'."""
        out = {k: lie_norm(v) for k, v in self.contributions.items()}
        out["total"], out["unattributed"] = lie_norm(self.total), lie_norm(self.unattributed)
        return out


def leaf_layers(module: nn.Module) -> list[str]:
    """Names of the modules without children, in registration order: the default layers to attribute to."""
    return [name for name, m in module.named_modules() if name and not list(m.children())]


def default_hidden_flow(x: Tensor, out_shape: tuple[int, ...], in_flow: Flow, out_flow: Flow | None) -> Flow:
    """The rule of the module docstring: input-shaped, output-shaped, image-like, else invariant."""
    in_shape = tuple(x.shape)

    def flow(t: Tensor, h: Tensor) -> Tensor:
        if tuple(h.shape) == in_shape:
            return in_flow(t, h)
        if tuple(h.shape) == out_shape:
            return h if out_flow is None else out_flow(t, h)
        if isinstance(in_flow, ImageFlow) and h.dim() >= 4 and h.shape[-2] * h.shape[-1] > 1:
            return in_flow(t, h)
        return h

    return flow


def layerwise_lie_derivative(
    module: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    x: Tensor,
    in_flow: Flow,
    out_flow: Flow | None = None,
    *,
    layers: Sequence[str] | None = None,
    hidden_flow: Flow | None = None,
) -> LayerwiseLie:
    """Attribute L f to layers (default: every leaf module) by one flow parameter per layer."""
    layers = list(layers) if layers is not None else leaf_layers(module)
    mods = dict(module.named_modules())
    unknown = [name for name in layers if name not in mods]
    if unknown:
        raise KeyError(f"layer {unknown[0]!r} is not a submodule; leaves: {', '.join(leaf_layers(module))}")
    total = lie_derivative(module, params, buffers, x, in_flow, out_flow)
    if hidden_flow is None:
        hidden_flow = default_hidden_flow(x, tuple(total.shape[1:]), in_flow, out_flow)
    current: dict[str, Tensor] = {}

    def pre(i: int):
        def hook(_m, args):
            if not args or not torch.is_tensor(args[0]):
                return None
            return (hidden_flow(current["t"][i], args[0]), *args[1:])

        return hook

    def post(i: int):
        def hook(_m, _args, out):
            return hidden_flow(-current["t"][i], out) if torch.is_tensor(out) else out

        return hook

    handles = []
    for i, name in enumerate(layers):
        handles.append(mods[name].register_forward_pre_hook(pre(i)))
        handles.append(mods[name].register_forward_hook(post(i)))

    def run(ts: Tensor) -> Tensor:
        current["t"] = ts
        return population_forward(module, params, buffers, x)

    t0 = torch.zeros(len(layers), dtype=x.dtype, device=x.device)
    contributions = {}
    try:
        with evaluating(module):
            for i, name in enumerate(layers):
                contributions[name] = derivative(run, t0, F.one_hot(torch.tensor(i), len(layers)).to(t0))
    finally:
        for h in handles:
            h.remove()
        current.clear()
    summed = torch.stack(list(contributions.values())).sum(0) if contributions else torch.zeros_like(total)
    return LayerwiseLie(contributions, total, total - summed)


def finite_difference(
    module: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    x: Tensor,
    in_flow: Flow,
    out_flow: Flow | None = None,
    h: float = 1e-3,
) -> Tensor:
    """Central finite-difference estimate of L f(x) [N, B, *out]: a check on `lie_derivative`."""

    def at(t: float) -> Tensor:
        tt = torch.tensor(t, dtype=x.dtype, device=x.device)
        y = population_forward(module, params, buffers, in_flow(tt, x))
        return y if out_flow is None else _fold(out_flow, -tt, y)

    with evaluating(module), torch.no_grad():
        return (at(h) - at(-h)) / (2 * h)


__all__ = [
    "IMAGE_FLOWS", "Flow", "ImageFlow", "LayerwiseLie", "default_hidden_flow", "derivative", "finite_difference",
    "group_flow", "group_lie_derivatives", "image_flow", "layerwise_lie_derivative", "leaf_layers", "lie_derivative",
    "lie_norm", "resample",
]
