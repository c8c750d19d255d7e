"""Small building blocks shared by the architectures: a fibre-aware linear layer, an MLP stack and a batched
symmetric eigendecomposition of any batch size.

`FlatLinear` keeps the structure of its input in its weight ([out, *in_shape]) instead of a flat
[out, prod(in_shape)] matrix, so that a permutation of one input axis (channels before a flatten, a
per-point embedding before a concatenation) is a permutation of one weight axis: a `PermSpec` can
name it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from zoos.archs.base import ArchError, PopDropout, make_activation


class FlatLinear(nn.Module):
    """y = W . x over the trailing `len(in_shape)` axes of x, with W stored as [out, *in_shape]."""

    def __init__(self, in_shape: tuple[int, ...], out_features: int, bias: bool = True):
        super().__init__()
        self.in_shape = tuple(int(s) for s in in_shape)
        self.weight = nn.Parameter(torch.empty(out_features, *self.in_shape))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """U(-b, b) with b = 1/sqrt(fan_in), weight then bias: nn.Linear's default init and draws."""
        bound = 1.0 / math.sqrt(math.prod(self.in_shape))
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        k = len(self.in_shape)
        out = x.flatten(-k) @ self.weight.flatten(1).T
        return out if self.bias is None else out + self.bias


class MLPStack(nn.Module):
    """`depth` hidden Linear -> activation -> PopDropout blocks of `width` units, then a linear output.

    State keys are `layers.{i}.weight/bias` (i = 0..depth); `perm_pairs(prefix)` lists the hidden
    permutations `{prefix}h{i}` over those keys.
    """

    def __init__(self, in_features: int, width: int, depth: int, out_features: int, activation: str, dropout: float):
        super().__init__()
        dims = [in_features] + [width] * depth + [out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(make_activation(activation) for _ in range(depth))
        self.drops = nn.ModuleList(PopDropout(dropout) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        for layer, act, drop in zip(self.layers[:-1], self.acts, self.drops):
            x = drop(act(layer(x)))
        return self.layers[-1](x)

    def perm_pairs(self, prefix: str, name: str = "") -> dict[str, tuple[tuple[str, int], ...]]:
        """Hidden permutations of this stack; `prefix` is its state-dict prefix, `name` prefixes the perm names."""
        return {
            f"{name}h{i}": ((f"{prefix}layers.{i}.weight", 0), (f"{prefix}layers.{i}.bias", 0), (f"{prefix}layers.{i + 1}.weight", 1))
            for i in range(len(self.layers) - 1)
        }


def check_positive(arch: str, field: str, value: int, minimum: int = 1) -> int:
    """Refuse a non-integer or too-small size field with an error naming arch, field and value."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ArchError(f"architecture {arch!r}: {field} must be an integer >= {minimum}, got {value!r}")
    return value


def check_choice(arch: str, field: str, value: str, allowed: tuple[str, ...]) -> str:
    """Refuse a value outside `allowed` with an error naming arch, field, value and the choices."""
    if value not in allowed:
        raise ArchError(f"architecture {arch!r}: {field} {value!r} is not allowed; choose one of {', '.join(allowed)}")
    return value


EIGH_CHUNK = 16384  # matrices one CUDA eigh call takes: cuSOLVER's batched solver fails on batches of ~32k or more


def linalg_eigh(a: Tensor) -> tuple[Tensor, Tensor]:
    """torch.linalg.eigh of every symmetric matrix of a [B, d, d] (eigenvalues ascending), for any B: on a GPU in
    calls of at most EIGH_CHUNK matrices (a population's batch of samples is many more). A module calling it
    makes it a leaf of its torch.fx traces (`torch.fx.wrap("linalg_eigh")` there), so a population program
    calls it on its stacked batch."""
    if not a.is_cuda or a.dim() < 3 or a.shape[0] <= EIGH_CHUNK:
        return torch.linalg.eigh(a)
    parts = [torch.linalg.eigh(c) for c in a.split(EIGH_CHUNK)]
    return torch.cat([w for w, _ in parts]), torch.cat([v for _, v in parts])
