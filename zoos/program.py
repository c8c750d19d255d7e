"""The choice of population program: for a population on a device, which program runs each layer, and why
not a faster one. Made once, from (module, task, device, precision); the trainer follows it, the run report
records it, `symzoo archs` shows it, and one generic test holds every choice equal to vmap.

The programs, fastest first:
  popconv       convolutions as Triton implicit-GEMM kernels (`zoos.popconv`; a strided one at its stride
                channels-last, or as the stride-1 conv of its input's blocks), a per-channel scale and shift
                after it (an eval-mode batch norm) folded into its weights, a following monotone activation
                into its epilogue, and a 2x2 max-pool with it where the conv has few outputs
  popconv max-pool  any other 2x2 max-pool of a map, one pass in either memory format (`zoos.popconv`)
  popnorm       GroupNorm with one group: statistics and each model's affine in one Triton pass (`zoos.popnorm`)
  im2col + bmm  convolutions off the kernels: patches on a channels-last view, one batched matmul over the models
  grouped conv  on the CPU, other convolutions but those with the shortest patches: one convolution with a
                group per model (oneDNN's grouped kernels beat the patch matrix there)
  poplinear     Linear / FlatLinear / F.linear of up to 128 inputs and outputs as Triton kernels (`zoos.poplinear`):
                the bias in the product's epilogue, its gradient in the weight gradient's pass; "act+poplinear"
                (relu+poplinear, silu+poplinear, ...): a pointwise activation that only linears read, applied
                as they load their input, its derivative in their input gradient
  bmm           any wider Linear / FlatLinear / F.linear: one batched matmul over the models
  popmessage    an EGNN layer's edges on its fully connected graphs as Triton kernels: the pair features from the
                points (`zoos.popgeometry`), the edge MLP summed at each node and the edges' coordinate weights
                (`zoos.popmessage`), the points' step (`zoos.popgeometry`): no [graphs, n, n, H] edge tensor written
  population norm  GroupNorm / LayerNorm: per-sample statistics of the whole batch, per-model affine
  prologue      the ops on weights alone (a group CNN's kernel expansion): vmapped once a step
  vmap op       any other op that mixes data and weights, vmapped over the models on its own
  vmap          the whole forward vmapped (`torch.func`): the fallback, for a module the population
                program cannot run (the reason is recorded)
Ops on data alone run on the population's [N*B, ...] batch as they are: a population is one large batch.
The trainer's optimizer step runs as `zoos.popoptim`'s kernels wherever the population kernels run
(`optimizer` in the record).
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

from zoos import fastpop, popconv, popoptim
from zoos.fastpop import FastPopulation, FastStep, Unsupported

PRECISIONS = ("float32", "bf16")


class FallbackWarning(UserWarning):
    """A population runs the vmap fallback: the message names the layer and the reason."""


@dataclass
class Program:
    """What runs a population. `layers` is [(layer, program, why not a faster one)]; `reason` says why the
    whole forward is vmapped when `fast` is False. `step` is the fast program's training step (None for vmap)."""

    arch: str
    device: str
    precision: str
    fast: bool
    kernels: bool = False
    compile: bool = False
    layers: list[tuple[str, str, str]] = field(default_factory=list)
    reason: str | None = None
    optimizer: str = "eager"  # the optimizer step: "popoptim" (its Triton kernels), "eager" torch ops or "compiled"
    graphs: bool = False  # the trainer's choice: steps replayed as CUDA graphs
    compiled_ahead: dict[str, float] | None = None  # the trainer's: Triton kernels compiled before the first step (precompile)
    step: FastStep | None = field(default=None, repr=False)

    def describe(self) -> str:
        """One line: the program and how many layers each population op runs."""
        if not self.fast:
            return f"vmap ({self.reason})"
        counts = Counter("popconv fused" if program.startswith("popconv conv+") else program for _, program, _ in self.layers)
        text = ", ".join(f"{n} {p}" for p, n in counts.most_common())
        eager = self.step.pop.not_capturable if self.step is not None else None
        return text if eager is None else f"{text}; steps not replayed as CUDA graphs ({eager})"

    def as_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "device": self.device, "precision": self.precision, "fast": self.fast,
                "kernels": self.kernels, "compile": self.compile, "graphs": self.graphs,
                "optimizer": self.optimizer, "reason": self.reason, "compiled_ahead": self.compiled_ahead,
                "layers": [list(layer) for layer in self.layers], "summary": self.describe()}


_WARNED: set[tuple[str, str]] = set()


def choose_program(
    module: nn.Module,
    task: Any,
    device: str | torch.device,
    precision: str = "float32",
    *,
    arch: str = "",
    fast: bool | None = None,
    kernels: bool | None = None,
    compile: bool | None = None,
    dropout: bool = True,
    regulariser: Callable[[dict[str, Tensor]], Tensor] | None = None,
    warn: bool = True,
) -> Program:
    """The program for `module` (a template: no weights needed) on `task`'s data on `device`.

    fast: use the population program where the module allows (None: yes; off CUDA its convs run as grouped
    convolutions, and the tests hold it equal to vmap there). kernels: the population's Triton kernels, popconv's convs and the others
    in the program and popoptim's optimizer step (None: on CUDA, where available; the optimizer step runs on them
    under vmap too). compile: torch.compile the forward and the optimizer step (None: no; the trainer replays
    eager steps as CUDA graphs, and a compile pays only in long runs of some families: benchmarks/README.md).
    A vmap fallback on CUDA warns once per (arch, reason).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not known; allowed: {', '.join(PRECISIONS)}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    arch = arch or type(module).__name__
    want_fast = fast is not False
    kernels = (cuda and popconv.available(device)) if kernels is None else kernels
    compile = bool(compile)
    optimizer = "compiled" if compile else "popoptim" if kernels and popoptim.available(device) else "eager"
    if not want_fast:
        return Program(arch, str(device), precision, fast=False, optimizer=optimizer,
                       reason="asked for")
    try:
        step = FastStep(module, task.loss, tuple(task.input_shape), dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                        compile=compile, dropout=dropout, kernels=kernels, grouped_convs=not cuda, regulariser=regulariser)
    except Unsupported as e:
        reason = str(e).split(": ", 1)[-1]
        if warn and cuda and (arch, reason) not in _WARNED:
            _WARNED.add((arch, reason))
            warnings.warn(f"{arch}: the population program cannot run it ({reason}); it trains as plain vmap, "
                          "slower per model", FallbackWarning, stacklevel=2)
        return Program(arch, str(device), precision, fast=False, optimizer=optimizer, reason=reason)
    return Program(arch, str(device), precision, fast=True, kernels=kernels, compile=compile, optimizer=optimizer,
                   layers=list(step.pop.choices), step=step)


class _Plan(NamedTuple):
    """What a population's memory plan reads of its program's trace: per-sample elements of its largest
    activation and of every activation together, and a model's parameters."""

    sample_elements: int
    activation_elements: int
    params: int


_PLANS: dict[tuple, _Plan | None] = {}  # (group key, input shape) -> its plan: traced once a process


def _plan(pop: Any, task: Any) -> _Plan | None:
    """`pop`'s `_Plan`, or None where it runs as vmap."""
    from zoos.archs import build_arch
    from zoos.functional import template

    key = (pop.first.group_key(), tuple(task.input_shape))
    if key not in _PLANS:
        first = pop.first
        module = template(build_arch(first.arch, task, **first.arch_config))
        try:
            fast = FastPopulation(module, tuple(task.input_shape))
        except Unsupported:
            _PLANS[key] = None
        else:
            _PLANS[key] = _Plan(fast.sample_elements, fast.activation_elements, sum(p.numel() for p in module.parameters()))
    return _PLANS[key]


def max_models(pop: Any, task: Any) -> int | None:
    """The most models of `pop`'s architecture one population program holds at its batch size (its largest
    activation of all models' samples must stay within 32-bit indexing), or None where it runs as vmap."""
    plan = _plan(pop, task)
    if plan is None:
        return None
    batch = pop.first.factors["batch_size"]
    return max(1, fastpop.INDEX_LIMIT // max(1, plan.sample_elements) // (1 << (batch - 1).bit_length()))


MEMORY_SHARE = 0.8  # of the device's free memory that one population's training plans for


def models_in_memory(pop: Any, task: Any, free_bytes: int) -> int | None:
    """The most models of `pop` one population program trains within `free_bytes` of device memory: each model
    keeps at most every activation of its batch for the backward (4 bytes a value, an upper bound for bf16 and
    float32 alike) and its weights, gradients and two optimizer moments; None where it runs as vmap."""
    plan = _plan(pop, task)
    if plan is None:
        return None
    per_model = 4 * (pop.first.factors["batch_size"] * plan.activation_elements + 4 * plan.params)
    return max(1, int(MEMORY_SHARE * free_bytes) // per_model)


def split_evenly(pop: Any, limit: int) -> list:
    """`pop` as the fewest populations of at most `limit` models, their sizes differing by at most one."""
    from zoos.spec import PopulationSpec

    parts = -(-len(pop.models) // limit)
    q, r = divmod(len(pop.models), parts)
    starts = [i * q + min(i, r) for i in range(parts + 1)]
    return [PopulationSpec(pop.models[a:b]) for a, b in zip(starts, starts[1:])]


def fit_populations(pops: list, task_of: Callable[[Any], Any]) -> tuple[list, dict[str, int]]:
    """`pops` with every population larger than `max_models` split into equal parts that fit; returns the
    populations and {zoo: the limit} for each zoo split. `task_of(pop)` builds the population's task."""
    out, limits, cache = [], {}, {}
    for pop in pops:
        key = pop.first.group_key()
        if key not in cache:
            cache[key] = max_models(pop, task_of(pop))
        limit = cache[key]
        if limit is None or len(pop.models) <= limit:
            out.append(pop)
            continue
        out += split_evenly(pop, limit)
        limits[pop.zoo] = limit
    return out, limits


__all__ = ["FallbackWarning", "Program", "choose_program", "fit_populations", "max_models", "models_in_memory", "split_evenly"]
