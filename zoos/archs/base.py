"""What every architecture shares: the `SymModule` base, its registry, activations, init and dropout.

An architecture is an `nn.Module` built from a task and a plain config dict. It reports its parameter
count and its permutation spec, and says which group (if any) it is equivariant to. Everything that
varies per model inside a population (dropout rate, for one) is a buffer, so that stacking the
models' states is all a vectorised population needs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from tasks.base import Task
from zoos.permspec import PermSpec


class ArchError(ValueError):
    """Bad architecture name or config; the message names the field, the value and what is allowed."""


class SymModule(nn.Module, ABC):
    """Base class of every symzoo architecture."""

    arch_name: str = ""
    config: dict[str, Any]

    @abstractmethod
    def perm_spec(self) -> PermSpec:
        """Which (state_dict key, axis) pairs each hidden permutation acts on."""

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass(frozen=True)
class ArchInfo:
    """A registry entry: the factory, its defaults, and what `symzoo archs` shows."""

    name: str
    factory: Callable[..., SymModule]
    equivariant: bool
    symmetry: str  # e.g. "C4 (rot90)", "S_n", "E(n) x S_n", "none"
    input_kinds: tuple[str, ...]  # task input kinds it accepts: "image", "points", "vector"
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    example_task: tuple[str, dict[str, Any]] = ("mnist", {})  # a natural task (name, options): `symzoo archs`, zoo_bench


ARCHS: dict[str, ArchInfo] = {}


def register_arch(
    name: str, *, equivariant: bool, symmetry: str, input_kinds: tuple[str, ...], description: str,
    example_task: tuple[str, dict[str, Any]], **defaults: Any
) -> Callable:
    """Class decorator: register `cls(task, **config)` under `name` with its default config and a natural task."""

    def deco(cls):
        cls.arch_name = name
        ARCHS[name] = ArchInfo(name, cls, equivariant, symmetry, input_kinds, description, dict(defaults), example_task)
        return cls

    return deco


def build_arch(name: str, task: Task, **config: Any) -> SymModule:
    """Build architecture `name` for `task`; unknown names or config keys are refused with what is allowed."""
    if name not in ARCHS:
        raise ArchError(f"unknown architecture {name!r}; available: {', '.join(sorted(ARCHS))}")
    info = ARCHS[name]
    unknown = sorted(set(config) - set(info.defaults))
    if unknown:
        raise ArchError(
            f"architecture {name!r} has no config field {unknown[0]!r}; allowed: {', '.join(sorted(info.defaults))}"
        )
    if task.input_kind not in info.input_kinds:
        raise ArchError(
            f"architecture {name!r} takes {'/'.join(info.input_kinds)} inputs, "
            f"but task {task.name!r} has {task.input_kind} inputs"
        )
    full = {**info.defaults, **config}
    module = info.factory(task, **full)
    module.config = full
    return module


@dataclass(frozen=True)
class Activation:
    """A pointwise activation (it commutes with any permutation of units) and the properties code relies on."""

    module: type[nn.Module]
    kwargs: dict[str, Any] = field(default_factory=dict)
    homogeneous: bool = False  # act(c z) = c act(z) for c > 0: an MLP using it has per-neuron scaling symmetry
    monotone: bool = False  # non-decreasing: it commutes with a max-pool (a fused conv + pool + act may apply it last)

    def build(self) -> nn.Module:
        return self.module(**self.kwargs)


# The one table of activations: the names a zoo's `activation` factor allows, and what each one is.
ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(nn.ReLU, homogeneous=True, monotone=True),
    "gelu": Activation(nn.GELU),
    "tanh": Activation(nn.Tanh, monotone=True),
    "silu": Activation(nn.SiLU),
    "sigmoid": Activation(nn.Sigmoid, monotone=True),
    "leaky_relu": Activation(nn.LeakyReLU, {"negative_slope": 0.1}, homogeneous=True, monotone=True),
}


def activation_slope(name: str) -> float:
    """The negative slope of activation `name` (leaky_relu's), else 0: what a kernel applying it by name needs."""
    return float(ACTIVATIONS[name].kwargs.get("negative_slope", 0.0))


# A function an architecture's forward calls on its weights and data (a leaf of torch.fx traces: `torch.fx.wrap`)
# -> its population form, `form(kernels, dtype, args, kwargs) -> (run, program, why)`: given whether the population
# kernels run, the compute dtype and the call's arguments as one model's probes (shapes; plain values as they are),
# `run` takes the same arguments with the weights stacked [N, ...] and the data [N*B, ...] (`zoos.fastpop`), and
# `program` and `why` are what the population's program choice records for the call.
POPULATION_FORMS: dict[Callable, Callable] = {}


def population_form(fn: Callable) -> Callable[[Callable], Callable]:
    """Decorator: register the decorated function as `fn`'s population form (POPULATION_FORMS)."""

    def register(form: Callable) -> Callable:
        POPULATION_FORMS[fn] = form
        return form

    return register


def make_activation(name: str) -> nn.Module:
    """A pointwise activation by name."""
    if name not in ACTIVATIONS:
        raise ArchError(f"activation {name!r} is not known; allowed: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name].build()


class PopDropout(nn.Module):
    """Dropout whose rate is a buffer, so each model of a stacked population has its own rate.

    Under `torch.func.vmap(..., randomness="different")` every model also draws its own mask.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ArchError(f"dropout must be in [0, 1), got {p}")
        self.register_buffer("p", torch.tensor(float(p)))

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.p
        return x * (torch.rand_like(x) < keep).to(x.dtype) / keep


def init_resets(module: nn.Module) -> list[Callable[[], None]]:
    """What redraws `module`'s weights as its construction drew them: the `reset_parameters()` of the outermost
    modules that define one, in module order (a module's own reset covers its subtree). An architecture whose
    init is more than its layers' own resets (draws of its own, a rescale after a layer's reset) defines
    `reset_parameters()` drawing in the order its `__init__` does, so that `zoos.init.init_population` can
    replay it instead of building every model."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        return [reset]
    return [r for child in module.children() for r in init_resets(child)]


INIT_SCHEMES = ("default", "kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform", "orthogonal")


def reinit(module: nn.Module, scheme: str, generator: torch.Generator | None = None) -> None:
    """Re-initialise weight tensors (dim >= 2) with a named scheme; biases are set to zero.

    "default" keeps each layer's own PyTorch initialisation. The fan of an n-d weight follows
    `torch.nn.init`: dim 0 is fan-out, dim 1 fan-in, the rest a receptive field.
    """
    if scheme not in INIT_SCHEMES:
        raise ArchError(f"init {scheme!r} is not known; allowed: {', '.join(INIT_SCHEMES)}")
    if scheme == "default":
        return
    init = {
        "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu", generator=generator),
        "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator),
        "xavier_normal": lambda w: nn.init.xavier_normal_(w, generator=generator),
        "xavier_uniform": lambda w: nn.init.xavier_uniform_(w, generator=generator),
        "orthogonal": lambda w: nn.init.orthogonal_(w.view(w.shape[0], -1), generator=generator),
    }[scheme]
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2 and "norm" not in name:
                init(p)
            elif name.endswith("bias"):
                p.zero_()
