"""Canonical form of a ReLU MLP modulo hidden-neuron permutation and positive scaling.

A ReLU MLP has two continuous-and-discrete families of parameters computing the same function: any
permutation of a hidden layer's neurons (rows of W_l, b_l and columns of W_{l+1}), and any positive
rescaling of a neuron (its incoming row and bias times c > 0, its outgoing column over c), since
relu(c z) = c relu(z). The canonical form picks one representative, layer by layer from the input:

  1. scale each hidden neuron so that its incoming vector [W_l[i], b_l[i]] has unit norm, pushing the
     scale into W_{l+1}[:, i] (dead neurons with a zero incoming vector are left unscaled);
  2. sort the neurons by the projection of that unit vector on a fixed generic direction (ties have
     probability zero), so layer l's order is fixed before layer l+1's incoming vectors are read.

Two networks related by these symmetries have identical canonical forms (to float rounding), so the
distance between canonical forms is a symmetry-aware distance. Vectorised over leading population axes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

Layer = tuple[str, str | None]  # (weight key [out, in], bias key [out] or None)


def mlp_layers(module: nn.Module) -> list[Layer]:
    """(weight, bias) state keys of a sequential MLP's nn.Linear layers, input to output."""
    out = []
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            prefix = f"{name}." if name else ""
            out.append((prefix + "weight", prefix + "bias" if m.bias is not None else None))
    if len(out) < 2:
        raise ValueError(f"an MLP with at least 2 nn.Linear layers is needed, found {len(out)}")
    return out


def _direction(n: int, like: Tensor, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64).to(like)


def canonical_form(state: Mapping[str, Tensor], layers: Sequence[Layer], *, seed: int = 0) -> dict[str, Tensor]:
    """The canonical representative of a ReLU MLP's state (any leading population axes); other keys unchanged."""
    out = dict(state)
    for (wk, bk), (nwk, _) in zip(layers[:-1], layers[1:]):
        w, nxt = out[wk], out[nwk]
        b = out[bk] if bk is not None else torch.zeros_like(w[..., 0])
        if nxt.shape[-1] != w.shape[-2]:
            raise ValueError(f"layer {nwk!r} reads {nxt.shape[-1]} features but {wk!r} has {w.shape[-2]} neurons")
        inc = torch.cat([w, b.unsqueeze(-1)], -1)
        scale = inc.norm(dim=-1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        inc = inc / scale.unsqueeze(-1)
        nxt = nxt * scale.unsqueeze(-2)
        order = torch.argsort(inc @ _direction(inc.shape[-1], inc, seed), dim=-1)
        inc = torch.take_along_dim(inc, order.unsqueeze(-1), dim=-2)
        out[wk] = inc[..., :-1]
        if bk is not None:
            out[bk] = inc[..., -1]
        out[nwk] = torch.take_along_dim(nxt, order.unsqueeze(-2), dim=-1)
    return out


def _flat(state: Mapping[str, Tensor], layers: Sequence[Layer], batch_dims: int) -> Tensor:
    keys = [k for layer in layers for k in layer if k is not None]
    return torch.cat([state[k].flatten(batch_dims) for k in keys], -1)


def canonical_distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor], layers: Sequence[Layer]) -> Tensor:
    """||canon(a) - canon(b)|| over the MLP's parameters: 0 for networks equal up to permutation and scaling."""
    return (_flat(canonical_form(a, layers), layers, 0) - _flat(canonical_form(b, layers), layers, 0)).norm()


def pairwise_canonical_distance(stacked: Mapping[str, Tensor], layers: Sequence[Layer]) -> Tensor:
    """[N, N] canonical distances between all models of a stacked population."""
    flat = _flat(canonical_form(stacked, layers), layers, 1)
    return torch.cdist(flat[None], flat[None])[0]
