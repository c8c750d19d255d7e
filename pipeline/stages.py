"""Analysis stages: what the pipeline runs over stored zoos, as Ray tasks, with results in the store.

A stage plans its items on the driver (model pairs, or models) leaving out those already in the
store, and a Ray task computes a chunk of items with the pure functions of `analysis/` and writes them
as one shard of `analysis/<stage>`. The driver then takes per-zoo summary columns, plots and MLflow
metrics from the stored rows.

- interpolation: weight matching of sampled pairs, then loss and error along the linear path, naive
  and aligned, all λ and pairs evaluated as one vectorised population; barriers in sup and midpoint form.
- equivariance: per model, the relative orbit error under the task's group (exact for finite groups,
  Monte-Carlo for Lie groups) and the metric averaged over the group orbit of the test inputs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol

import polars as pl
import torch

from analysis import plots

Item = dict[str, str]


class Stage(Protocol):
    def plan(self, store: Any, zoos: list, spec: Any) -> list[Item]: ...
    def run(self, store_root: str, items: list[Item], settings: dict[str, Any], data_dir: str | None, device: str) -> list[dict]: ...
    def summary_columns(self, rows: pl.DataFrame) -> pl.DataFrame: ...
    def summary_metrics(self, rows: pl.DataFrame) -> dict[str, float]: ...
    def plots(self, rows: pl.DataFrame, out_dir: Path) -> list[Path]: ...


def _shard(stage: str, items: list[Item]) -> str:
    """Deterministic shard name of a chunk: a retried task overwrites its own shard."""
    blob = json.dumps(sorted(json.dumps(i, sort_keys=True) for i in items))
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def _ok_models(store: Any, zoo: str) -> pl.DataFrame:
    if zoo not in store.zoos():
        return pl.DataFrame()
    return store.models(zoo).filter(pl.col("status") == "ok").select("model_id", "arch_config").collect().sort("model_id")


def _done(store: Any, stage: str, keys: list[str]) -> set[tuple]:
    if stage not in store.stages():
        return set()
    return set(store.analysis(stage).select(keys).collect().iter_rows())


def _context(store: Any, model_id: str, data_dir: str | None) -> tuple[torch.nn.Module, Any]:
    """(template module, task) of a stored model, rebuilt from its row."""
    from tasks import task_with_data
    from zoos.archs import build_arch

    row = store.models().filter(pl.col("model_id") == model_id).collect().row(0, named=True)
    options = json.loads(row["task_config"] or "{}")
    options.pop("name", None)
    task = task_with_data(row["task"], options, data_dir)
    return build_arch(row["arch"], task, **json.loads(row["arch_config"] or "{}")).eval(), task


def _by_context(items: list[Item], key: str) -> dict[tuple, list[Item]]:
    """Items grouped by (zoo, arch config): each group shares one template module."""
    groups: dict[tuple, list[Item]] = defaultdict(list)
    for it in items:
        groups[(it["zoo"], it[key])].append(it)
    return groups


def _test_batch(task: Any, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = task.load("test", seed)
    return x[:samples], y[:samples]


class Interpolation:
    """Weight matching + the linear path between sampled pairs of a zoo, naive vs aligned."""

    def plan(self, store: Any, zoos: list, spec: Any) -> list[Item]:
        done = _done(store, "interpolation", ["zoo", "model_a", "model_b"])
        items: list[Item] = []
        for zoo in zoos:
            models = _ok_models(store, zoo.name)
            if models.height < 2:
                continue
            for config, group in models.group_by("arch_config", maintain_order=True):
                pairs = list(itertools.combinations(group["model_id"].to_list(), 2))
                if spec.pairs and len(pairs) > spec.pairs:
                    pairs = random.Random(f"{spec.seed}:{zoo.name}").sample(pairs, spec.pairs)
                items += [{"zoo": zoo.name, "model_a": a, "model_b": b, "arch_config": config[0]}
                          for a, b in sorted(pairs) if (zoo.name, a, b) not in done]
        return items

    def run(self, store_root: str, items: list[Item], settings: dict[str, Any], data_dir: str | None, device: str) -> list[dict]:
        from analysis.connectivity import barrier, barrier_reduction, linear_path
        from analysis.matching import weight_matching
        from zoos.permspec import apply_permutation
        from zoos.store import Store

        store = Store(store_root)
        rows: list[dict] = []
        for (zoo, _), group in _by_context(items, "arch_config").items():
            module, task = _context(store, group[0]["model_a"], data_dir)
            spec = module.perm_spec()
            ids = sorted({i["model_a"] for i in group} | {i["model_b"] for i in group})
            stacked = store.to_torch(pl.col("model_id").is_in(ids))
            index = {m: i for i, m in enumerate(stacked.model_ids)}
            a_idx = torch.tensor([index[i["model_a"]] for i in group])
            b_idx = torch.tensor([index[i["model_b"]] for i in group])
            a = {k: v[a_idx].to(device) for k, v in stacked.tensors.items()}
            b = {k: v[b_idx].to(device) for k, v in stacked.tensors.items()}
            aligned, sweeps = {k: v.clone() for k, v in b.items()}, []
            gen = torch.Generator().manual_seed(settings["seed"])
            for p in range(len(group)):
                one_a = {k: v[p] for k, v in a.items()}
                one_b = {k: v[p] for k, v in b.items()}
                match = weight_matching(spec, one_a, one_b, generator=gen)
                for k, v in apply_permutation(spec, one_b, match.perms).items():
                    aligned[k][p] = v
                sweeps.append(match.sweeps)
            module = module.to(device)
            kw = dict(lambdas=settings["lambdas"], pairs=True, splits=("test",), max_examples=settings["samples"], device=device)
            naive, matched = linear_path(module, a, b, task, **kw), linear_path(module, a, aligned, task, **kw)
            lam = naive.lambdas
            err_n, err_a = naive.error("test"), matched.error("test")
            loss_n, loss_a = naive.loss["test"], matched.loss["test"]
            b_naive, b_aligned = barrier(loss_n, lam), barrier(loss_a, lam)
            red = barrier_reduction(b_naive, b_aligned)
            mid = len(lam) % 2 == 1
            for p, it in enumerate(group):
                rows.append({
                    "zoo": zoo, "model_a": it["model_a"], "model_b": it["model_b"],
                    "epoch": int(stacked.epochs[index[it["model_a"]]]) if stacked.epochs else -1,
                    "lambdas": lam.tolist(),
                    "test_loss_naive": loss_n[p].tolist(), "test_loss_aligned": loss_a[p].tolist(),
                    "test_err_naive": err_n[p].tolist(), "test_err_aligned": err_a[p].tolist(),
                    "barrier_loss_naive": float(b_naive[p]), "barrier_loss_aligned": float(b_aligned[p]),
                    "barrier_err_naive": float(barrier(err_n[p], lam)), "barrier_err_aligned": float(barrier(err_a[p], lam)),
                    "midpoint_loss_naive": float(barrier(loss_n[p], lam, "midpoint")) if mid else None,
                    "midpoint_loss_aligned": float(barrier(loss_a[p], lam, "midpoint")) if mid else None,
                    "barrier_reduction": float(red[p]), "matching_sweeps": sweeps[p],
                })
        store.write_analysis("interpolation", _shard("interpolation", items), rows)
        return rows

    def summary_columns(self, rows: pl.DataFrame) -> pl.DataFrame:
        return rows.group_by("zoo").agg(pl.col("barrier_loss_naive").mean().alias("barrier_naive"),
                                        pl.col("barrier_loss_aligned").mean().alias("barrier_aligned"))

    def summary_metrics(self, rows: pl.DataFrame) -> dict[str, float]:
        out = {}
        for zoo, naive, aligned in self.summary_columns(rows).iter_rows():
            out[f"{zoo}.barrier_loss_naive"], out[f"{zoo}.barrier_loss_aligned"] = naive, aligned
        return out

    def plots(self, rows: pl.DataFrame, out_dir: Path) -> list[Path]:
        return [plots.interpolation_curves(rows, "test_loss", out_dir / "interpolation_loss.png"),
                plots.barrier_heatmap(rows, "barrier_loss_aligned", out_dir / "barriers_aligned.png")]


class Equivariance:
    """Orbit equivariance error and orbit-averaged metric of every model."""

    def plan(self, store: Any, zoos: list, spec: Any) -> list[Item]:
        done = _done(store, "equivariance", ["model_id"])
        return [{"zoo": zoo.name, "model_id": m, "arch_config": c}
                for zoo in zoos for m, c in _ok_models(store, zoo.name).iter_rows() if (m,) not in done]

    def run(self, store_root: str, items: list[Item], settings: dict[str, Any], data_dir: str | None, device: str) -> list[dict]:
        from analysis.symmetry import orbit_error
        from tasks.groups import element_list
        from zoos.functional import population_forward, split_state
        from zoos.store import Store

        store = Store(store_root)
        rows: list[dict] = []
        for (zoo, _), group in _by_context(items, "arch_config").items():
            module, task = _context(store, group[0]["model_id"], data_dir)
            module = module.to(device)
            stacked = store.to_torch(pl.col("model_id").is_in([i["model_id"] for i in group]), device=device)
            params, buffers = split_state(module, stacked.tensors)
            x, y = (t.to(device) for t in _test_batch(task, settings["samples"], settings["seed"]))
            gen = torch.Generator().manual_seed(settings["seed"])
            err = orbit_error(module, params, buffers, x, task.group, n_samples=settings["group_samples"], generator=gen)
            elements = element_list(task.group, settings["group_samples"], torch.Generator().manual_seed(settings["seed"]))
            with torch.no_grad():
                per_g = torch.stack([
                    torch.vmap(task.metric, in_dims=(0, None))(
                        population_forward(module, params, buffers, task.group.act_in(g, x)), task.group.act_out(g, y))
                    for g in elements], 1)  # [N, |elements|]
            name = task.metric_name
            for i, mid in enumerate(stacked.model_ids):
                rows.append({
                    "zoo": zoo, "model_id": mid, "epoch": int(stacked.epochs[i]) if stacked.epochs else -1,
                    "group": task.group.name, "exact": err.exact,
                    "equivariance_error": float(err.mean[i]), "equivariance_ci": float(err.ci[i]),
                    f"orbit_{name}": float(per_g[i].mean()), f"orbit_{name}_worst": float(per_g[i].min() if task.higher_is_better else per_g[i].max()),
                })
        store.write_analysis("equivariance", _shard("equivariance", items), rows)
        return rows

    def summary_columns(self, rows: pl.DataFrame) -> pl.DataFrame:
        orbit = [c for c in rows.columns if c.startswith("orbit_") and not c.endswith("_worst")]
        return rows.group_by("zoo").agg(pl.col("equivariance_error").median().alias("equiv_error"),
                                        *[pl.col(c).mean() for c in orbit])

    def summary_metrics(self, rows: pl.DataFrame) -> dict[str, float]:
        cols = self.summary_columns(rows)
        return {f"{r['zoo']}.{k}": v for r in cols.iter_rows(named=True) for k, v in r.items() if k != "zoo" and v is not None}

    def plots(self, rows: pl.DataFrame, out_dir: Path) -> list[Path]:
        return [plots.equivariance_by_zoo(rows, "equivariance_error", out_dir / "equivariance_error.png")]


STAGES: dict[str, Stage] = {"interpolation": Interpolation(), "equivariance": Equivariance()}
