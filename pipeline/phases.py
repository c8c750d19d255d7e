"""Phase-diagram tables: a study's stored models and analysis rows as one row per cell of its grid.

A phase study (after Schürholt et al. 2025, "A Model Zoo on Phase Transitions in Neural Networks")
grids a *temperature* factor (batch size or learning rate: how noisy training is) against a *load*
factor (width or the amount of data), with several seeds per cell, and reads the phases off per-cell
averages of landscape metrics: test loss, Hessian top eigenvalue and trace, the loss barrier between
seeds along a line (naive and after weight matching) and along a Bezier curve, CKA between seeds.

`cell_table` joins the models table with every stage that stored results for the study: per-model
stages at each model's last analysed checkpoint, pair stages only for pairs whose two models sit in
the same cell (a pair across cells says nothing about one cell's phase). `matched_table` sets the
architectures side by side, cell by cell, the i-th load level of one against the i-th of the other,
which is how a study with matched parameter counts (cnn width 2w vs p4cnn width w) compares them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import polars as pl

# Candidate axes, in order of preference: the first factor that takes more than one value is used.
TEMPERATURES = ("batch_size", "lr")
LOADS = ("width", "train_fraction", "depth")


class PhaseError(ValueError):
    """A store or study that gives no phase diagram; the message names what is missing and what exists."""


@dataclass(frozen=True)
class Metric:
    """One phase-diagram metric: where it is stored (`models` or a stage) and the column it averages."""

    name: str
    source: str
    column: str
    title: str


METRICS: tuple[Metric, ...] = (
    Metric("test_acc", "models", "test_acc", "test accuracy"),
    Metric("test_loss", "models", "test_loss", "test loss"),
    Metric("train_loss", "models", "train_loss", "train loss"),
    Metric("hessian_top", "landscape", "hessian_top", "Hessian top eigenvalue"),
    Metric("hessian_trace", "landscape", "hessian_trace", "Hessian trace"),
    Metric("barrier_naive", "interpolation", "barrier_loss_naive", "loss barrier, naive (linear)"),
    Metric("barrier_aligned", "interpolation", "barrier_loss_aligned", "loss barrier after weight matching"),
    Metric("barrier_err_aligned", "interpolation", "barrier_err_aligned", "error barrier after weight matching"),
    Metric("bezier_barrier", "bezier", "barrier_loss_bezier", "loss barrier along the Bezier curve"),
    Metric("cka_penultimate", "similarity", "cka_penultimate", "linear CKA between seeds, penultimate features"),
    Metric("cka_output", "similarity", "cka_output", "linear CKA between seeds, outputs"),
    Metric("equivariance_error", "equivariance", "equivariance_error", "equivariance error (orbit)"),
    Metric("orbit_acc", "equivariance", "orbit_acc", "accuracy over the group orbit of the test set"),
    Metric("orbit_rel_mse", "equivariance", "orbit_rel_mse", "relative MSE over the group orbit of the test set"),
    Metric("weight_distance", "weightspace", "weight_distance", "weight distance to the equivariant subspace"),
)

CELL = ["arch", "load", "temperature"]
PER_MODEL = ("models", "landscape", "equivariance", "weightspace")  # sources of one value per model (the rest: pairs)


def study_models(store: Any, study: str, stored: Sequence[str] = ()) -> pl.DataFrame:
    """Every stored model of `study` (any status), and of the zoos it analyses as they are in the store
    (`stored`: its `stored: true` zoos, trained by another study or imported); PhaseError naming the studies
    present if there is none."""
    models = store.models().collect() if store.zoos() else pl.DataFrame()
    found = models.filter((pl.col("study") == study) | pl.col("zoo").is_in(list(stored))) if models.height else models
    if not found.height:
        have = sorted(models["study"].unique().to_list()) if models.height else []
        raise PhaseError(f"study {study!r} has no models in the store; studies there: {', '.join(have) or 'none'} (a "
                         "study that only analyses stored zoos is reported from its file: symzoo report STUDY.yaml)")
    return found


def grid_axes(models: pl.DataFrame, temperature: str | None = None, load: str | None = None) -> tuple[str, str]:
    """(temperature factor, load factor): the given ones, else the first candidate that varies across models.
    A study whose load varies at one temperature (a data-efficiency study: train_fraction) gets a constant
    temperature, its cells one row along the load."""
    def pick(given: str | None, candidates: tuple[str, ...], what: str) -> str:
        if given is not None:
            if given not in models.columns:
                raise PhaseError(f"--{what} {given!r} is not a column of the models table; factors there: "
                                 f"{', '.join(c for c in models.columns if c in TEMPERATURES + LOADS + ('seed',))}")
            return given
        varying = [c for c in candidates if c in models.columns and _varies(models, c)]
        if not varying:
            raise PhaseError(f"no {what} axis: none of {', '.join(candidates)} takes more than one value in this study; "
                             f"vary one of them in the zoos' grids, or name the factor with --{what}")
        return varying[0]

    try:
        t = pick(temperature, TEMPERATURES, "temperature")
    except PhaseError:
        constant = [c for c in TEMPERATURES if c in models.columns]
        loads = [load] if load is not None else [c for c in LOADS if c in models.columns]
        if temperature is not None or not constant or not any(c in models.columns and _varies(models, c) for c in loads):
            raise
        t = constant[0]
    return t, pick(load, LOADS, "load")


def _varies(models: pl.DataFrame, factor: str) -> bool:
    """Whether `factor` takes several values within one architecture on one task (a width that differs only
    between the architectures of a study, as in the quickstart's cnn and p4cnn, is a matched size, and one
    that differs between tasks is each task's own size: neither is a load axis)."""
    keys = [c for c in ("arch", "task") if c in models.columns]
    if not keys:
        return models[factor].n_unique() > 1
    return bool(models.group_by(keys).agg(pl.col(factor).n_unique())[factor].max() > 1)


def _with_cell(models: pl.DataFrame, temperature: str, load: str) -> pl.DataFrame:
    return models.with_columns(pl.col(load).cast(pl.Float64).alias("load"),
                               pl.col(temperature).cast(pl.Float64).alias("temperature"))


def model_table(store: Any, study: str, temperature: str | None = None, load: str | None = None,
                stored: Sequence[str] = ()) -> pl.DataFrame:
    """One row per model of the study (and its `stored` zoos): its cell, status, final metrics, and per-model
    stage metrics (last epoch)."""
    models = study_models(store, study, stored)
    t, l = grid_axes(models, temperature, load)
    models = _with_cell(models, t, l)
    keep = ["model_id", "zoo", *CELL, "seed", "n_params", "status"]
    out = models.select([c for c in keep if c in models.columns] +
                        [m.column for m in METRICS if m.source == "models" and m.column in models.columns])
    present = store.stages()
    for stage in sorted({m.source for m in METRICS if m.source not in ("models",)}):
        if stage not in present:
            continue
        rows = store.analysis(stage).collect()
        if "model_id" not in rows.columns:
            continue
        cols = [m.column for m in METRICS if m.source == stage and m.column in rows.columns]
        if not cols:
            continue
        if "epoch" in rows.columns:
            rows = rows.filter(pl.col("epoch") == pl.col("epoch").max().over("model_id"))
        out = out.join(rows.select("model_id", *cols).unique("model_id", keep="last"), on="model_id", how="left")
    return out.sort(CELL + ["seed"])


def pair_rows(store: Any, stage: str, models: pl.DataFrame) -> pl.DataFrame:
    """A pair stage's rows for pairs of two models of the study in one cell, at each pair's last epoch."""
    rows = store.analysis(stage).collect()
    if not {"model_a", "model_b"} <= set(rows.columns):
        return pl.DataFrame()
    if "zoo_b" in rows.columns:  # interpolation_cross-style stages: pairs join zoos, not seeds of a cell
        return pl.DataFrame()
    if "epoch" in rows.columns:
        rows = rows.filter(pl.col("epoch") == pl.col("epoch").max().over("model_a", "model_b"))
    cells = models.select("model_id", *CELL)
    rows = rows.join(cells, left_on="model_a", right_on="model_id", how="inner")
    rows = rows.join(cells.rename({c: f"{c}_b" for c in CELL}), left_on="model_b", right_on="model_id", how="inner")
    same = pl.all_horizontal([pl.col(c) == pl.col(f"{c}_b") for c in CELL])
    return rows.filter(same & (pl.col("model_a") != pl.col("model_b"))).drop([f"{c}_b" for c in CELL])


def cell_table(store: Any, study: str, temperature: str | None = None, load: str | None = None,
               stored: Sequence[str] = ()) -> pl.DataFrame:
    """One row per (arch, load, temperature) cell: model counts, parameters, and the mean and standard deviation
    (`<metric>_sd`) of every metric present.

    Metrics of models average over the cell's ok models; pair metrics over the cell's pairs (counted
    in `<stage>_pairs`). A metric whose stage was not run is absent.
    """
    models = study_models(store, study, stored)
    t, l = grid_axes(models, temperature, load)
    per_model = model_table(store, study, t, l, stored)
    ok = pl.col("status") == "ok"
    aggs = [pl.len().alias("models"), ok.sum().alias("ok"), pl.col("n_params").first().alias("n_params"),
            pl.col("zoo").unique().sort().str.join(",").alias("zoos")]
    aggs += [pl.col(m.column).filter(ok).mean().alias(m.name) for m in METRICS if m.column in per_model.columns]
    aggs += [pl.col(m.column).filter(ok).std().alias(f"{m.name}_sd") for m in METRICS if m.column in per_model.columns]
    cells = per_model.group_by(CELL).agg(aggs)
    cell_models = _with_cell(models, t, l)
    present = store.stages()
    for stage in sorted({m.source for m in METRICS if m.source != "models"}):
        if stage not in present:
            continue
        pairs = pair_rows(store, stage, cell_models)
        cols = [m for m in METRICS if m.source == stage and m.column in pairs.columns]
        if not pairs.height or not cols:
            continue
        agg = pairs.group_by(CELL).agg(pl.len().alias(f"{stage}_pairs"), *[pl.col(m.column).mean().alias(m.name) for m in cols],
                                       *[pl.col(m.column).std().alias(f"{m.name}_sd") for m in cols])
        cells = cells.drop([c for m in cols for c in (m.name, f"{m.name}_sd") if c in cells.columns]).join(agg, on=CELL, how="left")
    return cells.with_columns(pl.lit(l).alias("load_factor"), pl.lit(t).alias("temperature_factor")).sort(CELL)


def metrics_present(cells: pl.DataFrame) -> list[Metric]:
    """The metrics of METRICS that the cell table holds a value for."""
    return [m for m in METRICS if m.name in cells.columns and cells[m.name].drop_nulls().len()]


def matched_table(cells: pl.DataFrame, metrics: list[str]) -> pl.DataFrame:
    """Architectures side by side per (load level, temperature): level i is each arch's i-th smallest load.

    Columns `<arch>.n_params` and `<arch>.<metric>`, so a study with matched parameter counts per level
    compares the architectures cell by cell.
    """
    leveled = cells.with_columns(pl.col("load").rank("dense").over("arch").cast(pl.Int64).alias("load_level"))
    out = leveled.select("load_level", "temperature").unique()
    for arch in sorted(cells["arch"].unique().to_list()):
        sub = leveled.filter(pl.col("arch") == arch).select(
            "load_level", "temperature", pl.col("load").alias(f"{arch}.load"), pl.col("n_params").alias(f"{arch}.n_params"),
            *[pl.col(m).alias(f"{arch}.{m}") for m in metrics if m in cells.columns])
        out = out.join(sub, on=["load_level", "temperature"], how="left")
    return out.sort("load_level", "temperature")
