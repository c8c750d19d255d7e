"""Interpolation stage: weight matching of sampled pairs, then the linear path naive and aligned.

All λ of all pairs of a chunk are evaluated as one vectorised population; barriers in sup and midpoint
form, for loss and for error, and the relative barrier reduction that weight matching buys.
`epochs: all` (or a list) repeats the same pairs at every stored checkpoint: the barrier against
training time, one row per (pair, epoch). `InterpolationCross` is the sibling stage whose pairs join
two zoos of one architecture (models that differ in learning rate, optimiser, data, ...).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any, Literal

import polars as pl
import torch
from pydantic import Field

from analysis import plots
from pipeline.stages.common import Item, Settings, Stage, by_context, done_keys, mean_sd, ok_models, pair_population, shard_name


class InterpolationSettings(Settings):
    pairs: int = Field(8, ge=0, description="model pairs sampled per zoo (among models of equal shape); 0 = all pairs")
    lambdas: int = Field(25, ge=3, description="points on the path, ends included (odd: the midpoint is one)")
    epochs: Literal["last", "all"] | list[int] = Field(
        "last", description="checkpoints to interpolate at: 'last', 'all' stored, or a list of epochs")


def sample_pairs(ids: list[str], k: int, key: str) -> list[tuple[str, str]]:
    """All unordered pairs of `ids`, or `k` of them drawn reproducibly from `key` (k = 0: all)."""
    pairs = list(itertools.combinations(sorted(ids), 2))
    if k and len(pairs) > k:
        pairs = random.Random(key).sample(pairs, k)
    return sorted(pairs)


def stored_epochs(store: Any, zoo: str) -> dict[str, list[int]]:
    """model_id -> its stored checkpoint epochs (metadata only: no weight file is opened)."""
    frame = store.checkpoints(zoo=zoo).select("model_id", "epoch").collect()
    return {m: sorted(g["epoch"].to_list()) for (m,), g in frame.group_by("model_id")}


def pick_epochs(common: list[int], wanted: str | list[int], where: str) -> list[int]:
    """The epochs of `common` (the stored epochs a pair shares) that the `epochs` setting asks for."""
    if wanted == "last":
        return common[-1:]
    if wanted == "all":
        return common
    missing = sorted(set(wanted) - set(common))
    if missing:
        raise ValueError(f"epochs: {missing} not stored for {where}; stored epochs: {common}")
    return sorted(set(wanted))


def connect_pairs(module: torch.nn.Module, task: Any, a: dict, b: dict, settings: dict[str, Any], device: str) -> list[dict]:
    """Per stacked pair (a[p], b[p]): weight-match b to a, then loss and error along both linear paths."""
    from analysis.connectivity import barrier, barrier_reduction, linear_path
    from analysis.matching import weight_matching
    from zoos.permspec import apply_permutation
    from zoos.trainer import DATA_SEED

    spec, n = module.perm_spec(), next(iter(a.values())).shape[0]
    aligned, sweeps = {k: v.clone() for k, v in b.items()}, []
    gen = torch.Generator().manual_seed(settings["seed"])
    for p in range(n):
        match = weight_matching(spec, {k: v[p] for k, v in a.items()}, {k: v[p] for k, v in b.items()}, generator=gen)
        for k, v in apply_permutation(spec, {k: v[p] for k, v in b.items()}, match.perms).items():
            aligned[k][p] = v
        sweeps.append(match.sweeps)
    kw = dict(lambdas=settings["lambdas"], pairs=True, splits=("test",), seed=DATA_SEED,
              max_examples=settings["samples"], device=device)
    naive, matched = linear_path(module, a, b, task, **kw), linear_path(module, a, aligned, task, **kw)
    lam = naive.lambdas
    loss_n, loss_a, err_n, err_a = naive.loss["test"], matched.loss["test"], naive.error("test"), matched.error("test")
    b_naive, b_aligned = barrier(loss_n, lam), barrier(loss_a, lam)
    reduction = barrier_reduction(b_naive, b_aligned)
    has_mid = len(lam) % 2 == 1
    return [{
        "lambdas": lam.tolist(),
        "test_loss_naive": loss_n[p].tolist(), "test_loss_aligned": loss_a[p].tolist(),
        "test_err_naive": err_n[p].tolist(), "test_err_aligned": err_a[p].tolist(),
        "barrier_loss_naive": float(b_naive[p]), "barrier_loss_aligned": float(b_aligned[p]),
        "barrier_err_naive": float(barrier(err_n[p], lam)), "barrier_err_aligned": float(barrier(err_a[p], lam)),
        "midpoint_loss_naive": float(barrier(loss_n[p], lam, "midpoint")) if has_mid else None,
        "midpoint_loss_aligned": float(barrier(loss_a[p], lam, "midpoint")) if has_mid else None,
        "barrier_reduction": float(reduction[p]), "matching_sweeps": sweeps[p],
    } for p in range(n)]


def last_epoch_rows(rows: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Each pair's row at its latest interpolated epoch (what the summary and the heatmap show)."""
    return rows.filter(pl.col("epoch") == pl.col("epoch").max().over(keys))


class Interpolation(Stage):
    name = "interpolation"
    Settings = InterpolationSettings
    keys = ["zoo", "model_a", "model_b", "epoch"]

    def plan(self, store: Any, zoos: list, settings: InterpolationSettings) -> list[Item]:
        done = done_keys(store, self.name, self.keys)
        items: list[Item] = []
        for zoo in zoos:
            epochs = stored_epochs(store, zoo.name) if zoo.name in store.zoos() else {}
            for (config,), group in ok_models(store, zoo.name).group_by("context", maintain_order=True):
                for a, b in sample_pairs(group["model_id"].to_list(), settings.pairs, f"{settings.seed}:{zoo.name}"):
                    common = sorted(set(epochs[a]) & set(epochs[b]))
                    items += [{"zoo": zoo.name, "model_a": a, "model_b": b, "context": config, "epoch": e}
                              for e in pick_epochs(common, settings.epochs, f"zoo {zoo.name!r}")
                              if (zoo.name, a, b, e) not in done]
        return items

    def run(self, store_root: str, items: list[Item], settings: dict[str, Any], data_dir: str | None, device: str) -> list[dict]:
        """Items sharing (zoo, context, epoch) run as one stacked population of pairs."""
        from zoos.store import Store

        store = Store(store_root)
        rows: list[dict] = []
        for (_, _, epoch), group in by_context(items, "epoch").items():
            module, task, weights, index = pair_population(store, group, data_dir, device, epoch)
            a = {k: v[torch.tensor([index[i["model_a"]] for i in group])] for k, v in weights.tensors.items()}
            b = {k: v[torch.tensor([index[i["model_b"]] for i in group])] for k, v in weights.tensors.items()}
            results = connect_pairs(module.to(device), task, a, b, settings, device)
            for it, res in zip(group, results):
                ids = {k: v for k, v in it.items() if k != "context"}
                rows.append({**ids, "epoch": int(weights.epochs[index[it["model_a"]]]), **res})
        store.write_analysis(self.name, shard_name(self.name, items), rows)
        return rows

    def summary_columns(self, rows: pl.DataFrame) -> pl.DataFrame:
        last = last_epoch_rows(rows, ["zoo", "model_a", "model_b"])
        worse = (pl.col("barrier_loss_aligned") > pl.col("barrier_loss_naive")).sum()
        return last.group_by("zoo").agg(pl.len().alias("pairs"), worse.alias("matching_worse"),
                                        *mean_sd("barrier_loss_naive", "barrier_naive"),
                                        *mean_sd("barrier_loss_aligned", "barrier_aligned"))

    def plots(self, rows: pl.DataFrame, out_dir: Path) -> list[Path]:
        last = last_epoch_rows(rows, ["zoo", "model_a", "model_b"])
        out = [plots.interpolation_curves(last, "test_loss", out_dir / "interpolation_loss.png"),
               plots.barrier_heatmap(last, "barrier_loss_aligned", out_dir / "barriers_aligned.png")]
        if rows["epoch"].n_unique() > 1:
            out.append(plots.barrier_vs_epoch(rows, ["barrier_loss_naive", "barrier_loss_aligned"],
                                              out_dir / "barrier_vs_epoch.png"))
        return out


class InterpolationCrossSettings(InterpolationSettings):
    pairs: int = Field(8, ge=0, description="model pairs sampled per pair of zoos (one model from each); 0 = all")


class InterpolationCross(Interpolation):
    """Pairs across zoos of one architecture and config (equal parameter shapes): model_a from zoo, model_b from zoo_b."""

    name = "interpolation_cross"
    Settings = InterpolationCrossSettings
    keys = ["zoo", "zoo_b", "model_a", "model_b", "epoch"]

    def plan(self, store: Any, zoos: list, settings: InterpolationSettings) -> list[Item]:
        done = done_keys(store, self.name, self.keys)
        models = {z.name: ok_models(store, z.name) for z in zoos}
        epochs = {z.name: stored_epochs(store, z.name) if z.name in store.zoos() else {} for z in zoos}
        items: list[Item] = []
        for za, zb in itertools.combinations([z.name for z in zoos], 2):
            if not (models[za].height and models[zb].height):
                continue
            # zoos may differ in task options (e.g. augmented training): match on the architecture config;
            # the path is evaluated on zoo a's task (the items carry zoo a's context)
            by_config = {c: g["model_id"].to_list() for (c,), g in models[zb].group_by("arch_config")}
            arch_a, arch_b = (store.models(z).select("arch").head(1).collect()["arch"].to_list() for z in (za, zb))
            if arch_a != arch_b:
                continue
            for (config, arch_config), group in models[za].group_by("context", "arch_config", maintain_order=True):
                cross = sorted(itertools.product(group["model_id"].to_list(), by_config.get(arch_config, [])))
                if settings.pairs and len(cross) > settings.pairs:
                    cross = sorted(random.Random(f"{settings.seed}:{za}:{zb}").sample(cross, settings.pairs))
                for a, b in cross:
                    common = sorted(set(epochs[za][a]) & set(epochs[zb][b]))
                    items += [{"zoo": za, "zoo_b": zb, "model_a": a, "model_b": b, "context": config, "epoch": e}
                              for e in pick_epochs(common, settings.epochs, f"zoos {za!r} and {zb!r}")
                              if (za, zb, a, b, e) not in done]
        return items

    def summary_columns(self, rows: pl.DataFrame) -> pl.DataFrame:
        last = last_epoch_rows(rows, ["zoo", "zoo_b", "model_a", "model_b"])
        return last.group_by("zoo").agg(pl.len().alias("cross_pairs"), *mean_sd("barrier_loss_naive", "cross_barrier_naive"),
                                        *mean_sd("barrier_loss_aligned", "cross_barrier_aligned"))

    def plots(self, rows: pl.DataFrame, out_dir: Path) -> list[Path]:
        last = last_epoch_rows(rows, ["zoo", "zoo_b", "model_a", "model_b"])
        labelled = last.with_columns((pl.col("zoo") + " x " + pl.col("zoo_b")).alias("zoo"))
        out = [plots.interpolation_curves(labelled, "test_loss", out_dir / "cross_interpolation_loss.png"),
               plots.barrier_heatmap(labelled, "barrier_loss_aligned", out_dir / "cross_barriers_aligned.png")]
        if rows["epoch"].n_unique() > 1:
            out.append(plots.barrier_vs_epoch(rows.with_columns((pl.col("zoo") + " x " + pl.col("zoo_b")).alias("zoo")),
                                              ["barrier_loss_naive", "barrier_loss_aligned"], out_dir / "cross_barrier_vs_epoch.png"))
        return out
