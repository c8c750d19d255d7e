"""Interpolation stage: weight matching of sampled pairs, then the linear path naive and aligned.

All λ of all pairs of a chunk are evaluated as one vectorised population; barriers in sup and midpoint
form, for loss and for error, and the relative barrier reduction that weight matching buys.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import polars as pl
import torch
from pydantic import Field

from analysis import plots
from pipeline.stages.common import Item, Settings, Stage, by_context, done_keys, model_context, ok_models, shard_name, stacked


class InterpolationSettings(Settings):
    pairs: int = Field(8, ge=0, description="model pairs sampled per zoo (among models of equal shape); 0 = all pairs")
    lambdas: int = Field(25, ge=3, description="points on the path, ends included (odd: the midpoint is one)")


class Interpolation(Stage):
    name = "interpolation"
    Settings = InterpolationSettings

    def plan(self, store: Any, zoos: list, settings: InterpolationSettings) -> list[Item]:
        done = done_keys(store, self.name, ["zoo", "model_a", "model_b"])
        items: list[Item] = []
        for zoo in zoos:
            for (config,), group in ok_models(store, zoo.name).group_by("arch_config", maintain_order=True):
                pairs = list(itertools.combinations(group["model_id"].to_list(), 2))
                if settings.pairs and len(pairs) > settings.pairs:
                    pairs = random.Random(f"{settings.seed}:{zoo.name}").sample(pairs, settings.pairs)
                items += [{"zoo": zoo.name, "model_a": a, "model_b": b, "arch_config": config}
                          for a, b in sorted(pairs) if (zoo.name, a, b) not in done]
        return items

    def run(self, store_root: str, items: list[Item], settings: dict[str, Any], data_dir: str | None, device: str) -> list[dict]:
        from analysis.connectivity import barrier, barrier_reduction, linear_path
        from analysis.matching import weight_matching
        from zoos.permspec import apply_permutation
        from zoos.store import Store

        store = Store(store_root)
        rows: list[dict] = []
        for (zoo, _), group in by_context(items).items():
            module, task = model_context(store, group[0]["model_a"], data_dir)
            module, spec = module.to(device), module.perm_spec()
            weights = stacked(store, sorted({i["model_a"] for i in group} | {i["model_b"] for i in group}), device)
            index = {m: i for i, m in enumerate(weights.model_ids)}
            a = {k: v[torch.tensor([index[i["model_a"]] for i in group])] for k, v in weights.tensors.items()}
            b = {k: v[torch.tensor([index[i["model_b"]] for i in group])] for k, v in weights.tensors.items()}
            aligned, sweeps = {k: v.clone() for k, v in b.items()}, []
            gen = torch.Generator().manual_seed(settings["seed"])
            for p in range(len(group)):
                match = weight_matching(spec, {k: v[p] for k, v in a.items()}, {k: v[p] for k, v in b.items()}, generator=gen)
                for k, v in apply_permutation(spec, {k: v[p] for k, v in b.items()}, match.perms).items():
                    aligned[k][p] = v
                sweeps.append(match.sweeps)
            kw = dict(lambdas=settings["lambdas"], pairs=True, splits=("test",), max_examples=settings["samples"], device=device)
            naive, matched = linear_path(module, a, b, task, **kw), linear_path(module, a, aligned, task, **kw)
            lam = naive.lambdas
            loss_n, loss_a, err_n, err_a = naive.loss["test"], matched.loss["test"], naive.error("test"), matched.error("test")
            b_naive, b_aligned = barrier(loss_n, lam), barrier(loss_a, lam)
            reduction = barrier_reduction(b_naive, b_aligned)
            has_mid = len(lam) % 2 == 1
            for p, it in enumerate(group):
                rows.append({
                    "zoo": zoo, "model_a": it["model_a"], "model_b": it["model_b"],
                    "epoch": int(weights.epochs[index[it["model_a"]]]) if weights.epochs else -1,
                    "lambdas": lam.tolist(),
                    "test_loss_naive": loss_n[p].tolist(), "test_loss_aligned": loss_a[p].tolist(),
                    "test_err_naive": err_n[p].tolist(), "test_err_aligned": err_a[p].tolist(),
                    "barrier_loss_naive": float(b_naive[p]), "barrier_loss_aligned": float(b_aligned[p]),
                    "barrier_err_naive": float(barrier(err_n[p], lam)), "barrier_err_aligned": float(barrier(err_a[p], lam)),
                    "midpoint_loss_naive": float(barrier(loss_n[p], lam, "midpoint")) if has_mid else None,
                    "midpoint_loss_aligned": float(barrier(loss_a[p], lam, "midpoint")) if has_mid else None,
                    "barrier_reduction": float(reduction[p]), "matching_sweeps": sweeps[p],
                })
        store.write_analysis(self.name, shard_name(self.name, items), rows)
        return rows

    def summary_columns(self, rows: pl.DataFrame) -> pl.DataFrame:
        return rows.group_by("zoo").agg(pl.col("barrier_loss_naive").mean().alias("barrier_naive"),
                                        pl.col("barrier_loss_aligned").mean().alias("barrier_aligned"))

    def plots(self, rows: pl.DataFrame, out_dir: Path) -> list[Path]:
        return [plots.interpolation_curves(rows, "test_loss", out_dir / "interpolation_loss.png"),
                plots.barrier_heatmap(rows, "barrier_loss_aligned", out_dir / "barriers_aligned.png")]
