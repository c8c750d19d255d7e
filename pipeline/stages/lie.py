"""Lie stage: the local equivariance error (Lie derivative) of every model at chosen checkpoints.

For a task with a continuous symmetry group (O(5), O(3), O(1,3), E(3), ...) the derivative is taken
along each of the group's Lie-algebra generators, acting on inputs and outputs. For image tasks it is
taken along continuous image flows (rotation, translation in pixels, log-scale), the outputs treated
as invariant: a finite-group model (p4 CNN) is exact under rot90 but need not be under a small
rotation, and this stage shows how far. Rows store one norm per direction (`directions`, `lie_norms`),
their mean `lie_derivative`, `output_scale` (the mean output norm) and `lie_relative` (the mean over it),
which compares models whose outputs differ in scale; the summary has one relative column per direction. Other tasks (finite groups on points) have no flow: null rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import torch
from pydantic import Field, field_validator

from analysis import plots
from pipeline.stages.checkpoint import CheckpointSettings, CheckpointStage
from pipeline.stages.common import median_iqr, register_stage, test_batch


class LieSettings(CheckpointSettings):
    samples: int = Field(128, ge=1, description="test inputs per model")
    flows: list[str] = Field(["rotation", "translate_x", "translate_y", "scale"],
                             description="image flows for image tasks (continuous groups use their generators)")

    @field_validator("flows")
    @classmethod
    def _flows(cls, v: list[str]) -> list[str]:
        from analysis.lie import IMAGE_FLOWS

        bad = [f for f in v if f not in IMAGE_FLOWS]
        if bad or not v:
            raise ValueError(f"flows has {bad[0] if bad else 'nothing'!r}; allowed: {', '.join(IMAGE_FLOWS)}")
        return v


@register_stage
class Lie(CheckpointStage):
    name = "lie"
    Settings = LieSettings

    def measure(self, module: torch.nn.Module, task: Any, params: dict, buffers: dict, settings: dict[str, Any],
                device: str, model_ids: list[str]) -> dict[str, Any]:
        from analysis.lie import group_lie_derivatives, image_flow, lie_derivative, lie_norm
        from analysis.symmetry import evaluating
        from tasks.groups import LieGroup
        from zoos.functional import population_forward

        x, _ = test_batch(task, settings["samples"], settings["seed"], device)
        if isinstance(task.group, LieGroup):
            norms = group_lie_derivatives(module, params, buffers, x, task.group).detach()
            directions = [f"generator_{i}" for i in range(norms.shape[1])]
        elif task.input_kind == "image":
            directions = list(settings["flows"])
            norms = torch.stack([lie_norm(lie_derivative(module, params, buffers, x, image_flow(f))).detach()
                                 for f in directions], 1)
        else:
            return {"group": task.group.name, "applicable": False, "directions": [], "lie_norms": [],
                    "lie_derivative": None, "lie_relative": None, "output_scale": None}
        with evaluating(module), torch.no_grad():
            scale = lie_norm(population_forward(module, params, buffers, x))
        mean = norms.mean(1)
        return {"group": task.group.name, "applicable": True, "directions": directions,
                "lie_norms": norms, "lie_derivative": mean,
                "lie_relative": mean / scale.clamp_min(1e-30), "output_scale": scale}

    def summary_columns(self, rows: pl.DataFrame) -> pl.DataFrame:
        last = rows.filter(pl.col("applicable") & (pl.col("epoch") == pl.col("epoch").max().over("model_id")))
        if not last.height:
            return rows.select("zoo").unique()
        # one column per direction (a flow or a generator): its norm over the output scale, as lie_relative is
        scale = (pl.col("output_scale") if "output_scale" in last.columns  # rows written before it was stored:
                 else pl.when(pl.col("lie_relative") > 0).then(pl.col("lie_derivative") / pl.col("lie_relative")))
        per = (last.explode("directions", "lie_norms")
               .with_columns((pl.col("lie_norms") / scale.clip(lower_bound=1e-30)).alias("rel")))
        directions = per["directions"].unique(maintain_order=True).to_list()
        return per.group_by("zoo").agg(*[e for d in directions
                                         for e in median_iqr(pl.col("rel").filter(pl.col("directions") == d), f"lie_{d}")])

    def plots(self, rows: pl.DataFrame, out_dir: Path) -> list[Path]:
        ok = rows.filter(pl.col("applicable"))
        if not ok.height:
            return []
        return [plots.metric_vs_epoch(ok, "lie_relative", out_dir / "lie_relative.png", log=True)]
