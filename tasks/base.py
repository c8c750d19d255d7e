"""The `Task` interface: a learning problem with a known symmetry group."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import Tensor

from tasks.groups import Group

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


class TaskError(ValueError):
    """Bad task configuration or missing data; the message says which field or file and what to do."""


class Task(ABC):
    """A learning problem: deterministic data for a seed, its symmetry group, its loss and metric.

    Attributes every task sets:
      name          registry name, e.g. "digits"
      group         the symmetry of the ground-truth map (a `tasks.groups.Group`)
      kind          "classification" (y: int64 class index) or "regression" (y: float tensor)
      input_shape   shape of one input, without the batch axis
      output_shape  shape of one model output, without the batch axis (num_classes for classification)
      input_kind    "image" ([C, H, W]), "points" ([n, d] per sample) or "vector" ([d])
      metric_name   what `metric` returns, e.g. "acc" or "rel_mse"
      higher_is_better  whether a larger metric is better
      per_model     None, or the generating factor that picks each model's own data (see tasks.inr)
    """

    name: str
    group: Group
    kind: Literal["classification", "regression"]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    input_kind: Literal["image", "points", "vector"]
    metric_name: str
    higher_is_better: bool
    per_model: str | None = None

    @abstractmethod
    def load(self, split: Split, seed: int = 0) -> tuple[Tensor, Tensor]:
        """(x, y) for a split, float32 inputs; the same seed always gives the same tensors."""

    def loss(self, pred: Tensor, y: Tensor) -> Tensor:
        """Mean loss over the batch (cross-entropy or mean squared error)."""
        if self.kind == "classification":  # not F.cross_entropy: vmapped, its Python decomposition imports sympy (~0.5 s)
            return -pred.log_softmax(-1).gather(-1, y[..., None]).mean()
        return ((pred - y.to(pred.dtype)) ** 2).mean()  # not F.mse_loss: its backward has no forward-mode derivative (Hessian-vector products)

    def metric(self, pred: Tensor, y: Tensor) -> Tensor:
        """Mean metric over the batch: accuracy for classification, relative MSE for regression."""
        if self.kind == "classification":
            return (pred.argmax(-1) == y).to(pred.dtype).mean()
        y = y.to(pred.dtype)
        return ((pred - y) ** 2).mean() / (y**2).mean().clamp_min(1e-12)

    def target(self, x: Tensor) -> Tensor | None:
        """The ground-truth map f*(x) for generated tasks; None for tasks read from data."""
        return None

    def config(self) -> dict:
        """The options this task was built with (enough to rebuild it with `tasks.get_task`)."""
        return dict(getattr(self, "_config", {}))

    def __repr__(self) -> str:
        return f"Task({self.name}, group={self.group.name}, x{self.input_shape} -> {self.output_shape})"


@dataclass(frozen=True)
class TaskInfo:
    """A registry entry: how to build a task and what to show in `symzoo tasks`."""

    name: str
    factory: Callable[..., Task]
    description: str
    group: str
    options: dict = field(default_factory=dict)  # option name -> allowed values / type, for help and errors
    per_model: str | None = None  # the factor that picks each model's own data (e.g. "image"), if any


def check_options(task: str, given: dict, allowed: dict) -> None:
    """Refuse unknown options with an error naming the option, the task and the allowed options."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TaskError(
            f"task {task!r} has no option {unknown[0]!r}; allowed options: {', '.join(sorted(allowed)) or 'none'}"
        )


DATA_STRIDE, MODEL_STRIDE = 1_000_003, 2_000_003  # primes: a task's data streams and a model's never coincide


def mix_seed(seed: int, salt: int, stride: int = DATA_STRIDE) -> int:
    """The seed of stream `salt` of `seed`: seed * stride + salt (mod 2^63 - 1), distinct for salts below stride.
    Tasks draw their data with DATA_STRIDE, models (`zoos.init.stream_seed`) theirs with MODEL_STRIDE."""
    return (int(seed) * stride + int(salt)) % (2**63 - 1)


def seeded(seed: int, salt: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, salt), so splits of one seed never share a stream."""
    return torch.Generator().manual_seed(mix_seed(seed, salt))
