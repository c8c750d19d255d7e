"""Many models as one stacked program: stack states, run a population forward with `torch.func`.

A population is a template module plus stacked parameters and buffers, `{key: [N, *shape]}`.
`population_forward` maps the template over the leading axis with `vmap(functional_call)`, so N
models run as one program with no Python loop over models.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

State = dict[str, Tensor]


def stack_states(modules: Sequence[nn.Module]) -> tuple[State, State]:
    """(params, buffers) of `modules`, each stacked along a new leading axis (detached copies)."""
    params, buffers = stack_module_state(list(modules))
    return {k: v.detach() for k, v in params.items()}, {k: v.detach() for k, v in buffers.items()}


def template(module: nn.Module) -> nn.Module:
    """A copy of `module` on the meta device: the code to run, holding no weights of its own."""
    return copy.deepcopy(module).to("meta")


def split_state(module: nn.Module, state: Mapping[str, Tensor]) -> tuple[State, State]:
    """Split a flat state dict into (params, buffers) by the module's own names, in the module's order (so whatever
    iterates them, such as per-parameter random draws, does so alike in every process)."""
    pnames = [k for k, _ in module.named_parameters()]
    bnames = [k for k, _ in module.named_buffers()]
    missing = set(pnames + bnames) - set(state)
    if missing:
        raise KeyError(f"state has no entry for {sorted(missing)[:3]}")
    return {k: state[k] for k in pnames}, {k: state[k] for k in bnames}


def population_forward(
    module: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    x: Tensor,
    *,
    x_per_model: bool = False,
    randomness: str = "different",
) -> Tensor:
    """Outputs [N, B, ...] of N stacked models on one shared batch x [B, ...] (or x [N, B, ...] per model)."""

    def one(p, b, xb):
        return functional_call(module, (p, b), (xb,))

    return vmap(one, in_dims=(0, 0, 0 if x_per_model else None), randomness=randomness)(dict(params), dict(buffers), x)


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """Run `module` in eval mode (no dropout) and restore its mode afterwards."""
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)
