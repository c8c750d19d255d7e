"""Distance of a network's weights to the equivariant subspace, by group averaging (Kim et al. 2023).

For a finite group G acting on a layer's input and output by ρ_in, ρ_out, the layers that commute
with the action form a linear subspace, and the orthogonal projection onto it is the group average

    P(W) = (1/|G|) Σ_g ρ_out(g) W ρ_in(g)^-1.

Every action here permutes coordinates (rot90 / flip permute pixels and kernel taps), so P is a mean
of index gathers: cheap, differentiable, and it works on any leading axes, so one projection serves
a single model, a stacked population [N, ...] and `torch.func.vmap` alike. The projections provided:

  conv kernel, trivial channel representations (cnn, cnn_s, resnet20): the group acts on the
      kernel's spatial taps, P(W) = mean_g g.W; a conv with such a kernel commutes with rot90/flip.
  first linear layer of an MLP on images: the group permutes the input pixels and the hidden units
      are invariant, P(W) = mean_g W[:, π_g]; the layer then sees the same features for x and g.x.
  a linear layer reading a feature map (weight [out, C, h, w], `zoos.archs.layers.FlatLinear`):
      the map's spatial axes carry the action, channels are trivial, as for a conv kernel.
  architectures registered as equivariant (group CNNs, ...): the identity, distance 0.

`distance` reports ||W - P(W)|| / ||W|| per layer, `regulariser` is Σ ||W - P(W)||² for training.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from tasks.groups import FiniteGroup, Group

Projection = Callable[[Tensor], Tensor]


def index_permutations(group: FiniteGroup, shape: tuple[int, ...]) -> Tensor:
    """[|G|, prod(shape)] int64: row g lists, for each flat position of g.x, the flat position of x it reads."""
    idx = torch.arange(math.prod(shape), dtype=torch.float64).reshape(1, *shape)
    rows = []
    for g in group.elements():
        moved = group.act_in(g, idx)
        if moved.shape != idx.shape:
            raise ValueError(
                f"group {group.name} maps an array of shape {tuple(shape)} to shape {tuple(moved.shape[1:])}; "
                "only shape-preserving actions (square spatial axes for rot90) can be projected"
            )
        rows.append(moved.reshape(-1).round().long())
    return torch.stack(rows)


def gather_average(perms: Tensor, ndim: int) -> Projection:
    """P(W) = mean_g W[..., π_g] over the last `ndim` axes of W (flattened), any leading axes."""

    def project(w: Tensor) -> Tensor:
        flat = w.flatten(-ndim) if ndim > 1 else w
        p = perms.to(flat.device)
        return flat[..., p].mean(-2).reshape(w.shape)

    return project


def kernel_projection(group: FiniteGroup, kernel_size: tuple[int, int]) -> Projection:
    """Projection of conv kernels [..., kh, kw] onto those invariant under the group's spatial action."""
    return gather_average(index_permutations(group, (1, *kernel_size)), 2)


def input_projection(group: FiniteGroup, input_shape: tuple[int, ...]) -> Projection:
    """Projection of a linear layer [..., out, prod(input_shape)] reading flattened images onto invariant ones."""
    return gather_average(index_permutations(group, tuple(input_shape)), 1)


def identity_projection(w: Tensor) -> Tensor:
    """The projection of an already equivariant layer: itself."""
    return w


def _registered_equivariant(model: nn.Module) -> bool:
    name = getattr(model, "arch_name", "")
    if not name:
        return False
    from zoos.archs.base import ARCHS

    return name in ARCHS and ARCHS[name].equivariant


def _reads_feature_map(mod: nn.Module) -> bool:
    """A linear layer whose weight keeps its input's [C, h, w] shape (FlatLinear on images)."""
    w = getattr(mod, "weight", None)
    return len(getattr(mod, "in_shape", ())) == 3 and isinstance(w, Tensor) and w.dim() == 4


def projections(model: nn.Module, group: Group, input_shape: tuple[int, ...] | None = None) -> dict[str, Projection]:
    """{state key: P} for the model's weights that the group constrains; keys left out are unconstrained.

    `input_shape` ([C, H, W] of one image) is needed only for an MLP on images and defaults to
    `model.input_shape`. A model may supply its own `equivariance_projections(group)`.
    """
    if not isinstance(group, FiniteGroup):
        raise ValueError(
            f"group {group.name} is continuous; weight projections are provided for finite groups "
            "(C4, D4, ...) only: use analysis.lie for continuous groups"
        )
    own = getattr(model, "equivariance_projections", None)
    if callable(own):
        return dict(own(group))
    if _registered_equivariant(model):
        return {k: identity_projection for k, p in model.named_parameters() if p.dim() >= 2}
    input_shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    out: dict[str, Projection] = {}
    seen_conv = False
    first_linear = True
    kernels: dict[tuple[int, int], Projection] = {}
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, nn.Conv2d):
            seen_conv = True
            ks = tuple(mod.kernel_size)
            if ks not in kernels:
                kernels[ks] = kernel_projection(group, ks)
            out[prefix + "weight"] = kernels[ks]
        elif _reads_feature_map(mod):
            hw = tuple(mod.weight.shape[-2:])
            if hw not in kernels:
                kernels[hw] = kernel_projection(group, hw)
            out[prefix + "weight"] = kernels[hw]
            first_linear = False
        elif isinstance(mod, nn.Linear):
            if first_linear and not seen_conv and input_shape is not None and len(input_shape) == 3:
                if mod.in_features != math.prod(input_shape):
                    raise ValueError(
                        f"first linear layer {name!r} reads {mod.in_features} features, but input_shape "
                        f"{tuple(input_shape)} has {math.prod(input_shape)}"
                    )
                out[prefix + "weight"] = input_projection(group, tuple(input_shape))
            first_linear = False
    return out


def _norm(w: Tensor, batch_dims: int) -> Tensor:
    return w.flatten(batch_dims).norm(dim=-1) if w.dim() > batch_dims else w.abs()


def _check_keys(state: Mapping[str, Tensor], projections: Mapping[str, Projection]) -> None:
    missing = sorted(set(projections) - set(state))
    if missing:
        raise KeyError(f"projection for {missing[0]!r}, which the state does not have (keys: {sorted(state)[:5]} ...)")


def distance(state: Mapping[str, Tensor], projections: Mapping[str, Projection], batch_dims: int = 0) -> dict[str, Tensor]:
    """{key: ||W - P(W)|| / ||W||}, one value per model when `batch_dims` leading axes stack a population."""
    _check_keys(state, projections)
    out = {}
    for key, project in projections.items():
        w = state[key]
        out[key] = _norm(w - project(w), batch_dims) / _norm(w, batch_dims).clamp_min(1e-30)
    return out


def total_distance(state: Mapping[str, Tensor], projections: Mapping[str, Projection], batch_dims: int = 0) -> Tensor:
    """||W - P(W)|| / ||W|| with W all the projected weights as one vector (one value per stacked model)."""
    _check_keys(state, projections)
    keys = sorted(projections)
    flat = lambda w: w.reshape(*w.shape[:batch_dims], -1)  # noqa: E731
    diff = torch.cat([flat(state[k] - projections[k](state[k])) for k in keys], -1)
    full = torch.cat([flat(state[k]) for k in keys], -1)
    return diff.norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-30)


def regulariser(state: Mapping[str, Tensor], projections: Mapping[str, Projection]) -> Tensor:
    """Σ_key ||W - P(W)||² over all projected weights (and all stacked models): differentiable in the state."""
    terms = [((state[k] - p(state[k])) ** 2).sum() for k, p in projections.items()]
    if not terms:
        some = next(iter(state.values()), None)
        return some.new_zeros(()) if some is not None else torch.zeros(())
    return torch.stack(terms).sum()
