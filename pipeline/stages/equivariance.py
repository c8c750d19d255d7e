"""Equivariance stage: per model, the relative orbit error under the task's group (exact for finite
groups, Monte-Carlo with a confidence interval for Lie groups) and the metric over the group orbit of
the test inputs (for digits trained upright: the accuracy on every rotation of the test set)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import torch
from pydantic import Field

from analysis import plots
from pipeline.stages.common import Item, Settings, Stage, by_context, mean_sd, median_iqr, model_context, ok_models, register_stage, stacked, test_batch, value_range


class EquivarianceSettings(Settings):
    group_samples: int = Field(16, ge=1, description="group elements sampled for Lie groups (finite groups use all)")


@register_stage
class Equivariance(Stage):
    name = "equivariance"
    Settings = EquivarianceSettings

    keys = ["model_id"]

    def wanted(self, store: Any, zoos: list, settings: EquivarianceSettings) -> list[Item]:
        return [{"zoo": zoo.name, "model_id": m, "context": c}
                for zoo in zoos for m, c in ok_models(store, zoo.name).select("model_id", "context").iter_rows()]

    def run(self, store_root: str, items: list[Item], settings: dict[str, Any], data_dir: str | None, device: str) -> list[dict]:
        from analysis.symmetry import orbit_error
        from tasks.groups import element_list
        from zoos.functional import population_forward, split_state
        from zoos.store import Store

        store = Store(store_root)
        rows: list[dict] = []
        for (zoo, _), group in by_context(items).items():
            module, task = model_context(store, group[0]["model_id"], data_dir)
            module = module.to(device)
            weights = stacked(store, [i["model_id"] for i in group], device)
            params, buffers = split_state(module, weights.tensors)
            x, y = test_batch(task, settings["samples"], settings["seed"], device)
            err = orbit_error(module, params, buffers, x, task.group, n_samples=settings["group_samples"],
                              generator=torch.Generator().manual_seed(settings["seed"]))
            elements = element_list(task.group, settings["group_samples"], torch.Generator().manual_seed(settings["seed"]))
            with torch.no_grad():
                metric = torch.vmap(task.metric, in_dims=(0, None))
                per_g = torch.stack([metric(population_forward(module, params, buffers, task.group.act_in(g, x)),
                                            task.group.act_out(g, y)) for g in elements], 1)  # [N, elements]
            worst = per_g.amin(1) if task.higher_is_better else per_g.amax(1)
            name = task.metric_name
            for i, mid in enumerate(weights.model_ids):
                rows.append({
                    "zoo": zoo, "model_id": mid, "epoch": int(weights.epochs[i]) if weights.epochs else -1,
                    "group": task.group.name, "exact": err.exact,
                    "equivariance_error": float(err.mean[i]), "equivariance_ci": float(err.ci[i]),
                    f"orbit_{name}": float(per_g[i].mean()), f"orbit_{name}_worst": float(worst[i]),
                })
        return self.write(store, items, rows, settings)

    def summary_columns(self, rows: pl.DataFrame) -> pl.DataFrame:
        orbit = [c for c in rows.columns if c.startswith("orbit_") and not c.endswith("_worst")]
        return rows.group_by("zoo").agg(*median_iqr("equivariance_error", "equiv_error"),
                                        *[e for c in orbit for e in mean_sd(c, c, *value_range(c))])

    def plots(self, rows: pl.DataFrame, out_dir: Path) -> list[Path]:
        return [plots.equivariance_by_zoo(rows, "equivariance_error", out_dir / "equivariance_error.png")]
