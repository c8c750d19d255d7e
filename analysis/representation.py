"""Representations of a population: hidden features by hook, linear CKA between models, functional dimension.

Linear CKA (Kornblith et al. 2019) compares two models' features on the same batch through their
centred Gram matrices K = X X^T:

    standard  CKA = <HKH, HLH> / (||HKH|| ||HLH||)                      (H = I - 11^T/n)
    debiased  the same with the unbiased HSIC estimator (Song et al. 2012), i.e. U-centred Grams
              with zero diagonal, <U(K), U(L)> / (n (n - 3)); ~0 for independent features even
              when the feature dimension exceeds the batch, where the standard form is biased up.

Functional dimension (Grigsby et al. 2023) is the rank of the Jacobian of the outputs on a batch
with respect to all parameters. Hidden symmetries make it smaller than the parameter count: for a
ReLU MLP, each hidden neuron's positive rescaling (incoming weights and bias times c, outgoing
weights over c) is a one-parameter family of parameters computing the same function, so the rank
is at most #params - #hidden neurons (permutations are discrete and cost no dimension).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap


def population_features(
    module: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    x: Tensor,
    layers: Sequence[str],
    *,
    randomness: str = "different",
) -> dict[str, Tensor]:
    """{layer: [N, B, ...]}: the output of each named submodule for N stacked models on batch x."""
    mods = dict(module.named_modules())
    unknown = [name for name in layers if name not in mods]
    if unknown:
        raise KeyError(f"layer {unknown[0]!r} is not a submodule; submodules: {', '.join(n for n in mods if n)}")
    seen: dict[str, Tensor] = {}

    def hook(name: str):
        def fn(_mod, _inp, out):
            seen[name] = out[0] if isinstance(out, tuple) else out

        return fn

    handles = [mods[name].register_forward_hook(hook(name)) for name in layers]

    def one(p, b, xb):
        seen.clear()
        functional_call(module, (p, b), (xb,))
        missing = [name for name in layers if name not in seen]
        if missing:
            raise RuntimeError(f"layer {missing[0]!r} did not run in the forward pass")
        return tuple(seen[name] for name in layers)

    try:
        outs = vmap(one, in_dims=(0, 0, None), randomness=randomness)(dict(params), dict(buffers), x)
    finally:
        for h in handles:
            h.remove()
    return dict(zip(layers, outs))


def _centred(k: Tensor) -> Tensor:
    return k - k.mean(-1, keepdim=True) - k.mean(-2, keepdim=True) + k.mean((-2, -1), keepdim=True)


def _u_centred(k: Tensor) -> Tensor:
    """U-centring (Székely & Rizzo 2014): <U(K), U(L)> / (n(n-3)) is the unbiased HSIC estimator."""
    n = k.shape[-1]
    if n < 4:
        raise ValueError(f"debiased CKA needs a batch of at least 4 examples, got {n}")
    eye = torch.eye(n, dtype=k.dtype, device=k.device)
    k = k * (1 - eye)
    rows = k.sum(-1, keepdim=True)
    cols = k.sum(-2, keepdim=True)
    total = k.sum((-2, -1), keepdim=True)
    u = k - rows / (n - 2) - cols / (n - 2) + total / ((n - 1) * (n - 2))
    return u * (1 - eye)


def _gram(features: Tensor) -> Tensor:
    return features @ features.transpose(-1, -2)


def cka_matrix(features_a: Tensor, features_b: Tensor, *, debiased: bool = False) -> Tensor:
    """[Na, Nb] linear CKA between every model of population a and of b; features [N, B, *shape]."""
    fa = features_a.flatten(2).to(torch.float64)
    fb = features_b.flatten(2).to(torch.float64)
    centre = _u_centred if debiased else _centred
    ka, kb = centre(_gram(fa)).flatten(1), centre(_gram(fb)).flatten(1)
    ka = ka / ka.pow(2).sum(-1, keepdim=True).clamp_min(1e-300).sqrt()
    kb = kb / kb.pow(2).sum(-1, keepdim=True).clamp_min(1e-300).sqrt()
    return (ka @ kb.T).to(features_a.dtype)


def cka(x: Tensor, y: Tensor, *, debiased: bool = False) -> Tensor:
    """Linear CKA between two feature matrices [B, *shape] of the same batch."""
    return cka_matrix(x[None], y[None], debiased=debiased)[0, 0]


def layer_cka(
    module_a: nn.Module,
    state_a: tuple[Mapping[str, Tensor], Mapping[str, Tensor]],
    module_b: nn.Module,
    state_b: tuple[Mapping[str, Tensor], Mapping[str, Tensor]],
    x: Tensor,
    layers: Sequence[str] | Mapping[str, str],
    *,
    debiased: bool = False,
) -> dict[str, Tensor]:
    """{layer: [Na, Nb] CKA} between two populations (params, buffers), layer by layer.

    `layers` names submodules present in both, or maps a's layer name to b's.
    """
    pairs = dict(layers) if isinstance(layers, Mapping) else {name: name for name in layers}
    with torch.no_grad():
        fa = population_features(module_a, *state_a, x, list(pairs))
        fb = population_features(module_b, *state_b, x, list(pairs.values()))
    return {la: cka_matrix(fa[la], fb[lb], debiased=debiased) for la, lb in pairs.items()}


@dataclass
class FunctionalDimension:
    """Rank of the parameter-to-output Jacobian on a batch, with what it is compared against."""

    rank: int
    n_params: int
    singular_values: Tensor  # descending
    tol: float


def functional_dimension(
    module: nn.Module, state: Mapping[str, Tensor], x: Tensor, *, rtol: float | None = None
) -> FunctionalDimension:
    """Rank of d f(x_1..x_B) / d θ for one model: singular values above rtol * the largest count.

    Default rtol = max(rows, cols) * eps of the dtype (NumPy's matrix_rank rule); use float64 for a
    sharp rank. Buffers in `state` are held fixed; every parameter counts.
    """
    pnames = [k for k, _ in module.named_parameters()]
    params = {k: state[k] for k in pnames}
    buffers = {k: v for k, v in state.items() if k not in params}

    def outputs(p):
        return functional_call(module, (p, buffers), (x,)).reshape(-1)

    with torch.enable_grad():
        jac = jacrev(outputs)(params)
    j = torch.cat([jac[k].reshape(jac[k].shape[0], -1) for k in pnames], 1)
    s = torch.linalg.svdvals(j)
    if rtol is None:
        rtol = max(j.shape) * torch.finfo(j.dtype).eps
    tol = float(s[0]) * rtol if len(s) else 0.0
    return FunctionalDimension(int((s > tol).sum()), j.shape[1], s, tol)


def relu_mlp_bound(module: nn.Module) -> int:
    """#params - #hidden neurons of a sequential ReLU MLP: the bound left by positive scaling per neuron."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if len(linears) < 2:
        raise ValueError(f"relu_mlp_bound needs an MLP with at least 2 nn.Linear layers, found {len(linears)}")
    hidden = sum(m.out_features for m in linears[:-1])
    return sum(p.numel() for p in module.parameters()) - hidden
