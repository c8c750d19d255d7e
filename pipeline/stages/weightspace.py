"""Weight-space stage: how far each model's weights sit from the equivariant subspace, checkpoint by checkpoint.

For a finite group the layers that commute with its action form a linear subspace, and the group
average P projects onto it (`zoos.equivariance`). Per model and checkpoint this stage stores, for
every constrained layer, ||W - P(W)|| / ||W||, and over all of them together `weight_distance`
(the same ratio for the concatenated constrained weights). Equivariant architectures sit at 0 by
construction; a baseline trained with augmentation or the equivariance regulariser should move
towards 0 through training, one trained without should not. With the default `epochs: all` the rows
trace that path. Continuous groups have no finite group average: their rows carry nulls and
`applicable = false` (use the `lie` stage for them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import torch

from analysis import plots
from pipeline.stages.common import median_iqr, register_stage
from pipeline.stages.checkpoint import CheckpointSettings, CheckpointStage, Epochs


class WeightspaceSettings(CheckpointSettings):
    epochs: Epochs = "all"


@register_stage
class Weightspace(CheckpointStage):
    name = "weightspace"
    Settings = WeightspaceSettings

    def measure(self, module: torch.nn.Module, task: Any, params: dict, buffers: dict, settings: dict[str, Any],
                device: str, model_ids: list[str]) -> dict[str, Any]:
        from tasks.groups import FiniteGroup
        from zoos.equivariance import distance, projections, total_distance

        group = task.group
        projs = projections(module, group) if isinstance(group, FiniteGroup) else {}
        if not projs:  # a continuous group, or nothing the group constrains (e.g. an MLP on vectors)
            return {"group": group.name, "applicable": False, "weight_distance": None, "layers": [], "layer_distance": []}
        layers = sorted(projs)
        with torch.no_grad():
            per_layer = distance(params, projs, batch_dims=1)
            total = total_distance(params, projs, batch_dims=1)
        return {"group": group.name, "applicable": True, "weight_distance": total, "layers": layers,
                "layer_distance": torch.stack([per_layer[k] for k in layers], 1)}

    def summary_columns(self, rows: pl.DataFrame) -> pl.DataFrame:
        ok = rows.filter(pl.col("applicable"))
        first = ok.filter(pl.col("epoch") == pl.col("epoch").min().over("model_id"))
        last = ok.filter(pl.col("epoch") == pl.col("epoch").max().over("model_id"))
        return (first.group_by("zoo").agg(*median_iqr("weight_distance", "wdist_first"))
                .join(last.group_by("zoo").agg(*median_iqr("weight_distance", "wdist_last")), on="zoo"))

    def plots(self, rows: pl.DataFrame, out_dir: Path) -> list[Path]:
        ok = rows.filter(pl.col("applicable"))
        if not ok.height:
            return []
        return [plots.metric_vs_epoch(ok, "weight_distance", out_dir / "weight_distance.png")]
