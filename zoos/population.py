"""What a trained population hands to the store: rows, curves and stacked checkpoint weights.

This is the contract between the population trainer (`zoos.trainer`) and the weight store
(`zoos.store`); the pipeline moves it from one to the other inside a Ray task, so weights never
pass through the driver.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def model_id(study: str, zoo: str, factors: dict[str, Any]) -> str:
    """A stable id for a model: a hash of (study, zoo, generating factors), key order irrelevant."""
    blob = json.dumps({"study": study, "zoo": zoo, "factors": factors}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def population_id(model_ids: list[str]) -> str:
    """The deterministic shard name of a population: a retried population overwrites its own shard."""
    return "pop-" + hashlib.sha256("\n".join(sorted(model_ids)).encode()).hexdigest()[:16]


@dataclass
class PopulationResult:
    """N models trained together.

    models       one dict per model (the `models` table row): model_id, study, zoo, task, task_config
                 (JSON str), arch, arch_config (JSON str), every generating factor as its own key,
                 status ("ok" | "diverged"), final metrics (e.g. test_acc), n_params, epochs
    epochs       the checkpoint epochs stored, ascending, shared by all models of the population
    metrics      name -> float array [N, len(epochs)]: metrics at the stored checkpoints
    weights      state_dict key -> float32 array [N, len(epochs), *shape] (parameters and buffers)
    curves       name -> float array [N, n_epochs + 1]: every epoch's metrics, epoch 0 = at init
    timings      where the wall time went, seconds: plan (the memory plan), init (the models' initial weights, on
                 the device), setup (the data, the program), compile (the kernels compiled ahead), evaluation,
                 first_step, graph_warmup, steps (the rest); first_step_at from the call to the end of the first
                 step (not stored; the pipeline reports them per population)
    program      the population program that trained it, as `zoos.program.Program.as_dict()` (reported, not stored)
    """

    models: list[dict[str, Any]]
    epochs: list[int]
    metrics: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]
    curves: dict[str, np.ndarray] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    program: dict[str, Any] = field(default_factory=dict)  # zoos.program.Program.as_dict(): what ran each layer

    @property
    def ids(self) -> list[str]:
        return [m["model_id"] for m in self.models]

    @property
    def shard(self) -> str:
        return population_id(self.ids)

    @classmethod
    def concat(cls, parts: list["PopulationResult"]) -> "PopulationResult":
        """One result of populations trained one after another: their models in order; the timings summed
        (a moment, `*_at`, is the first part's); the first part's program, with how many parts there were."""
        first = parts[0]
        if any(p.epochs != first.epochs for p in parts):
            raise ValueError("the parts stored different checkpoint epochs")

        def joined(name: str) -> dict[str, np.ndarray]:
            return {k: np.concatenate([getattr(p, name)[k] for p in parts]) for k in getattr(first, name)}

        timings = {k: (v if k.endswith("_at") else sum(p.timings.get(k, 0.0) for p in parts))
                   for k, v in first.timings.items()}
        return cls([m for p in parts for m in p.models], list(first.epochs), joined("metrics"), joined("weights"),
                   joined("curves"), timings, {**first.program, "parts": len(parts)})

    def validate(self) -> None:
        """Check that every array agrees with the number of models and checkpoints."""
        n, c = len(self.models), len(self.epochs)
        for name, a in self.metrics.items():
            if a.shape != (n, c):
                raise ValueError(f"metric {name!r} has shape {a.shape}, expected {(n, c)}")
        for name, a in self.weights.items():
            if a.shape[:2] != (n, c):
                raise ValueError(f"weight {name!r} has leading shape {a.shape[:2]}, expected {(n, c)}")
        for name, a in self.curves.items():
            if a.shape[0] != n:
                raise ValueError(f"curve {name!r} has {a.shape[0]} rows, expected {n}")
