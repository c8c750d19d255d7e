"""Bezier stage: for a few pairs per zoo, a trained Bezier curve between the (weight-matched) endpoints
against the straight line between them (Garipov et al. 2018): how much of a linear barrier a curve of
`bends` control points removes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import torch
from pydantic import Field

from analysis import plots
from pipeline.stages.common import Item, Settings, Stage, by_context, item_generator, mean_sd, ok_models, pair_pool, pair_population, register_stage
from pipeline.stages.interpolation import factor_cells, sample_pairs


class BezierSettings(Settings):
    pairs: int = Field(2, ge=0, description="model pairs per zoo and architecture config, drawn as the interpolation stage draws them; 0 = all pairs")
    lambdas: int = Field(25, ge=3, le=1001, description="points on each path, ends included")
    align: bool = Field(True, description="weight-match model_b to model_a before fitting the curve")
    bends: int = Field(1, ge=1, description="control points between the endpoints (degree = bends + 1)")
    steps: int = Field(200, ge=0, description="Adam steps of curve training")
    lr: float = Field(0.01, gt=0, description="Adam learning rate of the control points")
    batch_size: int = Field(128, ge=1)
    ts_per_step: int = Field(4, ge=1, description="points t ~ U(0, 1) per step, run as one population")


@register_stage
class Bezier(Stage):
    name = "bezier"
    Settings = BezierSettings
    pairs = "within"
    keys = ["zoo", "model_a", "model_b"]

    def wanted(self, store: Any, zoos: list, settings: BezierSettings) -> list[Item]:
        items: list[Item] = []
        for zoo in zoos:
            cells = factor_cells(store, zoo.name)
            for (config,), group in ok_models(store, zoo.name).group_by("context", maintain_order=True):
                items += [{"zoo": zoo.name, "model_a": a, "model_b": b, "context": config}
                          for a, b in sample_pairs(pair_pool(group), settings.pairs, f"{settings.seed}:{zoo.name}", cells)]
        return items

    def run(self, store_root: str, items: list[Item], settings: dict[str, Any], data_dir: str | None, device: str) -> list[dict]:
        """One curve per pair (trained on the task's train split), evaluated with the line on the test split."""
        from analysis.bezier import bezier_curve
        from analysis.connectivity import barrier, linear_path
        from analysis.matching import weight_matching
        from zoos.permspec import apply_permutation
        from zoos.store import Store
        from zoos.trainer import DATA_SEED

        store = Store(store_root)
        rows: list[dict] = []
        for (zoo, _), group in by_context(items).items():
            module, task, weights, index = pair_population(store, group, data_dir, device)
            module = module.to(device)
            for it in group:
                a = {k: v[index[it["model_a"]]].clone() for k, v in weights.tensors.items()}
                b = {k: v[index[it["model_b"]]].clone() for k, v in weights.tensors.items()}
                if settings["align"]:
                    gen = item_generator(settings["seed"], it["model_a"], it["model_b"])  # the pair's own draws
                    b = apply_permutation(module.perm_spec(), b, weight_matching(module.perm_spec(), a, b, generator=gen).perms)
                torch.manual_seed(settings["seed"])
                curve = bezier_curve(module, a, b, task, bends=settings["bends"], steps=settings["steps"], lr=settings["lr"],
                                     batch_size=settings["batch_size"], ts_per_step=settings["ts_per_step"],
                                     lambdas=settings["lambdas"], splits=("test",), seed=DATA_SEED, device=device)
                line = linear_path(module, a, b, task, lambdas=settings["lambdas"], splits=("test",), seed=DATA_SEED, device=device)
                lam = line.lambdas
                loss_l, loss_c = line.loss["test"], curve.path.loss["test"]
                err_l, err_c = line.error("test"), curve.path.error("test")
                rows.append({
                    "zoo": zoo, "model_a": it["model_a"], "model_b": it["model_b"],
                    "epoch": int(weights.epochs[index[it["model_a"]]]), "aligned": bool(settings["align"]),
                    "bends": settings["bends"], "steps": settings["steps"], "lambdas": lam.tolist(),
                    "test_loss_linear": loss_l.tolist(), "test_loss_bezier": loss_c.tolist(),
                    "test_err_linear": err_l.tolist(), "test_err_bezier": err_c.tolist(),
                    "barrier_loss_linear": float(barrier(loss_l, lam)), "barrier_loss_bezier": float(barrier(loss_c, lam)),
                    "barrier_err_linear": float(barrier(err_l, lam)), "barrier_err_bezier": float(barrier(err_c, lam)),
                    "curve_train_loss": float(sum(curve.train_loss[-20:]) / max(1, len(curve.train_loss[-20:]))),
                })
        return self.write(store, items, rows, settings)

    def summary_columns(self, rows: pl.DataFrame) -> pl.DataFrame:
        return rows.group_by("zoo").agg(pl.len().alias("bezier_pairs"), *mean_sd("barrier_loss_linear", "line_barrier", 0),
                                        *mean_sd("barrier_loss_bezier", "bezier_barrier", 0))

    def plots(self, rows: pl.DataFrame, out_dir: Path) -> list[Path]:
        return [plots.path_curves(rows, "test_loss", {"linear": "straight line", "bezier": "Bezier curve"},
                                  out_dir / "bezier_loss.png")]
