"""Plots of zoos and analysis results: each function takes polars frames and writes one PNG.

Training curves across a zoo, the distribution of a final metric per zoo, interpolation curves (naive
vs aligned), each pair's barrier before and after matching, a heatmap of pairwise barriers, and a per-zoo
equivariance error. matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _panels(n: int, width: float = 4.2, height: float = 3.2) -> tuple[plt.Figure, Sequence[plt.Axes]]:
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, axes[0]


def training_curves(curves: pl.DataFrame, metric: str, path: Path, max_models: int = 64) -> Path:
    """`metric` against epoch, one thin line per model (up to `max_models` per zoo), the median and quartiles of
    all of them, a panel per zoo. Epochs without a value (an imported zoo's curves are known at its checkpoints
    only) are left out, so a line joins the epochs that have one, each marked where they are few."""
    zoos = sorted(curves["zoo"].unique().to_list())
    fig, axes = _panels(len(zoos))
    known = curves.filter(pl.col(metric).is_not_null() & pl.col(metric).is_finite())
    for ax, zoo in zip(axes, zoos):
        sub = known.filter(pl.col("zoo") == zoo)
        ids = curves.filter(pl.col("zoo") == zoo)["model_id"].unique(maintain_order=True).to_list()[:max_models]
        marker = "o" if sub["epoch"].n_unique() <= 20 else None
        for mid in ids:
            m = sub.filter(pl.col("model_id") == mid).sort("epoch")
            ax.plot(m["epoch"].to_numpy(), m[metric].to_numpy(), lw=0.7, alpha=0.5, marker=marker, ms=2)
        med = sub.group_by("epoch").agg(pl.col(metric).median().alias("mid"), pl.col(metric).quantile(0.25).alias("lo"),
                                        pl.col(metric).quantile(0.75).alias("hi")).sort("epoch")
        ax.fill_between(med["epoch"].to_numpy(), med["lo"].to_numpy(), med["hi"].to_numpy(), color="k", alpha=0.12,
                        lw=0, label="quartiles")
        ax.plot(med["epoch"].to_numpy(), med["mid"].to_numpy(), color="k", lw=2, marker=marker, ms=4, label="median")
        ax.set(title=f"{zoo} ({len(ids)} models)", xlabel="epoch", ylabel=metric)
        ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def metric_distribution(models: pl.DataFrame, metrics: Sequence[str], path: Path) -> Path:
    """Per zoo, the distribution of each final metric (strip + box), a panel per metric."""
    zoos = sorted(models["zoo"].unique().to_list())
    fig, axes = _panels(len(metrics))
    rng = np.random.default_rng(0)
    for ax, metric in zip(axes, metrics):
        data = [models.filter(pl.col("zoo") == z)[metric].drop_nulls().drop_nans().to_numpy() for z in zoos]
        ax.boxplot(data, tick_labels=zoos, showfliers=False)
        for i, d in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(d)), d, s=8, alpha=0.6)
        ax.set(title=metric, ylabel=metric)
        ax.tick_params(axis="x", rotation=20)
    return _save(fig, path)


def interpolation_curves(rows: pl.DataFrame, value: str, path: Path, max_pairs: int = 16) -> Path:
    """`value` along the linear path, naive (dashed) vs aligned (solid), a panel per zoo.

    Expects list columns `lambdas`, `{value}_naive` and `{value}_aligned`, one row per pair.
    """
    zoos = sorted(rows["zoo"].unique().to_list())
    fig, axes = _panels(len(zoos))
    for ax, zoo in zip(axes, zoos):
        sub = rows.filter(pl.col("zoo") == zoo).head(max_pairs)
        for r in sub.iter_rows(named=True):
            lam = np.asarray(r["lambdas"])
            ax.plot(lam, r[f"{value}_naive"], ls="--", color="tab:red", alpha=0.5, lw=0.9)
            ax.plot(lam, r[f"{value}_aligned"], color="tab:blue", alpha=0.5, lw=0.9)
        ax.plot([], [], ls="--", color="tab:red", label="naive")
        ax.plot([], [], color="tab:blue", label="weight-matched")
        ax.set(title=f"{zoo}: {len(sub)} pairs", xlabel="λ", ylabel=value)
        ax.legend(fontsize=8)
    return _save(fig, path)


def pair_heatmap(rows: pl.DataFrame, column: str, path: Path, *, diagonal: float = float("nan"),
                 cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
                 labels: dict[str, str] | None = None) -> Path:
    """A symmetric model x model matrix of a pair metric per zoo (models in id order; unevaluated pairs blank, each
    evaluated cell written in it). `labels` names the models on the axes (default: the first 6 characters of the id)."""
    zoos = sorted(rows["zoo"].unique().to_list())
    fig, axes = _panels(len(zoos), width=4.6, height=4.0)
    for ax, zoo in zip(axes, zoos):
        sub = rows.filter(pl.col("zoo") == zoo)
        ids = sorted(set(sub["model_a"].to_list()) | set(sub["model_b"].to_list()))
        index = {m: i for i, m in enumerate(ids)}
        mat = np.full((len(ids), len(ids)), np.nan)
        np.fill_diagonal(mat, diagonal)
        for a, b, v in sub.select("model_a", "model_b", column).iter_rows():
            mat[index[a], index[b]] = mat[index[b], index[a]] = np.nan if v is None else v
        im = ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax)
        names = [(labels or {}).get(m, m[:6]) for m in ids]
        ax.set_xticks(range(len(ids)), names, rotation=90, fontsize=6)
        ax.set_yticks(range(len(ids)), names, fontsize=6)
        if len(ids) <= 12:  # the value in each evaluated cell
            for i in range(len(ids)):
                for j in range(len(ids)):
                    if i != j and mat[i, j] == mat[i, j]:
                        ax.text(j, i, f"{mat[i, j]:.2g}", ha="center", va="center", fontsize=6, color="w")
        ax.set(title=f"{zoo}: {column} ({len(sub)} pairs)")
        fig.colorbar(im, ax=ax, fraction=0.046, label=column)
    return _save(fig, path)


def barrier_heatmap(rows: pl.DataFrame, column: str, path: Path) -> Path:
    """Pairwise barrier matrix per zoo."""
    return pair_heatmap(rows, column, path)


def dense_pairs(rows: pl.DataFrame, share: float = 0.5) -> bool:
    """Whether every zoo's pairs cover at least `share` of the pairs among the models they touch: a matrix of them
    (`pair_heatmap`) is then mostly filled; sampled disjoint pairs leave it nearly blank."""
    for _, sub in rows.group_by("zoo"):
        n = len(set(sub["model_a"].to_list()) | set(sub["model_b"].to_list()))
        if sub.select("model_a", "model_b").unique().height < share * n * (n - 1) / 2:
            return False
    return True


def pair_slopes(rows: pl.DataFrame, before: str, after: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{zoo: (before [P], after [P])}: each pair's two values, the pairs in (model_a, model_b) order."""
    ordered = rows.sort("model_a", "model_b")
    out = {}
    for zoo in sorted(ordered["zoo"].unique().to_list()):
        sub = ordered.filter(pl.col("zoo") == zoo)
        out[zoo] = (sub[before].to_numpy(), sub[after].to_numpy())
    return out


def barrier_slopes(rows: pl.DataFrame, path: Path, value: str = "loss") -> Path:
    """Each pair's barrier naive and after weight matching joined by a line, a panel per zoo: red where matching
    raised it, blue where it lowered it, the means (black) with their 95% intervals (Student's t)."""
    from scipy import stats

    slopes = pair_slopes(rows, f"barrier_{value}_naive", f"barrier_{value}_aligned")
    fig, axes = _panels(len(slopes), width=3.4, height=3.4)
    for ax, (zoo, (naive, aligned)) in zip(axes, slopes.items()):
        worse = aligned > naive
        for a, b, w in zip(naive, aligned, worse):
            ax.plot([0, 1], [a, b], color="tab:red" if w else "tab:blue", alpha=0.6, lw=0.9, marker="o", ms=3)
        for x, v in ((0, naive), (1, aligned)):
            v = v[np.isfinite(v)]
            if len(v) > 1:
                half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
                ax.errorbar(x, v.mean(), yerr=half, color="k", capsize=4, marker="s", ms=5, zorder=3)
        ax.set_xticks([0, 1], ["naive", "weight-matched"])
        ax.set_xlim(-0.3, 1.3)
        ax.set(title=f"{zoo}: {len(naive)} pairs, {int(worse.sum())} worse", ylabel=f"{value} barrier")
    return _save(fig, path)


def equivariance_by_zoo(rows: pl.DataFrame, column: str, path: Path) -> Path:
    """Equivariance error per model, grouped by zoo, on a log axis (equivariant nets sit near 1e-7)."""
    zoos = sorted(rows["zoo"].unique().to_list())
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(zoos), 3.4))
    rng = np.random.default_rng(0)
    for i, zoo in enumerate(zoos):
        v = rows.filter(pl.col("zoo") == zoo)[column].to_numpy()
        ax.scatter(i + rng.uniform(-0.2, 0.2, len(v)), np.clip(v, 1e-12, None), s=10, alpha=0.7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(zoos)), zoos, rotation=20)
    ax.set(ylabel=column, title="equivariance error per model")
    return _save(fig, path)


def metric_vs_epoch(rows: pl.DataFrame, column: str, path: Path, *, log: bool = False, max_models: int = 32) -> Path:
    """A per-checkpoint metric against epoch, every zoo on one axis (equivariant vs baseline side by side).

    Thin lines: single models (up to `max_models` per zoo); thick line with markers: the zoo's median.
    Expects columns zoo, model_id, epoch and `column`, one row per (model, epoch). Where every model has one
    checkpoint there is no "through training": the values per zoo (strip and box) instead.
    """
    if rows.height and rows.group_by("model_id").len()["len"].max() == 1:
        return metric_by_zoo(rows, column, path, log=log)
    zoos = sorted(rows["zoo"].unique().to_list())
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, zoo in enumerate(zoos):
        color = colors[i % len(colors)]
        sub = rows.filter((pl.col("zoo") == zoo) & pl.col(column).is_not_null())
        values = sub[column].to_numpy()
        clip = (lambda v: np.clip(v, 1e-12, None)) if log else (lambda v: v)  # noqa: E731
        for mid in sub["model_id"].unique(maintain_order=True).to_list()[:max_models]:
            m = sub.filter(pl.col("model_id") == mid).sort("epoch")
            ax.plot(m["epoch"].to_numpy(), clip(m[column].to_numpy()), color=color, lw=0.6, alpha=0.35)
        med = sub.group_by("epoch").agg(pl.col(column).median()).sort("epoch")
        n = sub["model_id"].n_unique()
        ax.plot(med["epoch"].to_numpy(), clip(med[column].to_numpy()), color=color, lw=2, marker="o", ms=4,
                label=f"{zoo} (median of {n})")
        if values.size and log and (values <= 0).any():
            ax.annotate(f"{zoo}: values <= 0 drawn at 1e-12", (0.02, 0.02 + 0.06 * i), xycoords="axes fraction", fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel=column, title=f"{column} through training")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def metric_by_zoo(rows: pl.DataFrame, column: str, path: Path, *, log: bool = False) -> Path:
    """One value per model, per zoo: strip and box (the epoch in the title)."""
    zoos = sorted(rows["zoo"].unique().to_list())
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(zoos), 3.4))
    rng = np.random.default_rng(0)
    data = [rows.filter((pl.col("zoo") == z) & pl.col(column).is_not_null())[column].to_numpy() for z in zoos]
    if log:
        data = [np.clip(d, 1e-12, None) for d in data]
    ax.boxplot(data, tick_labels=zoos, showfliers=False)
    for i, d in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(d)), d, s=10, alpha=0.7)
    if log:
        ax.set_yscale("log")
    epochs = sorted(set(rows["epoch"].to_list())) if "epoch" in rows.columns else []
    when = f"epoch {epochs[0]}" if len(epochs) == 1 else "each model's last checkpoint"
    ax.set(ylabel=column, title=f"{column} at {when}")
    ax.tick_params(axis="x", rotation=20)
    return _save(fig, path)


def barrier_vs_epoch(rows: pl.DataFrame, columns: Sequence[str], path: Path) -> Path:
    """Barrier against training epoch, a panel per zoo: a thin line per pair and the median per column.

    Expects one row per (pair, epoch) with `model_a`, `model_b`, `epoch` and the barrier `columns`.
    """
    zoos = sorted(rows["zoo"].unique().to_list())
    fig, axes = _panels(len(zoos))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, zoo in zip(axes, zoos):
        sub = rows.filter(pl.col("zoo") == zoo).sort("epoch")
        for colour, column in zip(colours, columns):
            for _, pair in sub.group_by("model_a", "model_b"):
                ax.plot(pair["epoch"].to_numpy(), pair[column].to_numpy(), color=colour, lw=0.6, alpha=0.35)
            med = sub.group_by("epoch").agg(pl.col(column).median()).sort("epoch")
            ax.plot(med["epoch"].to_numpy(), med[column].to_numpy(), color=colour, lw=2, marker="o", ms=3, label=column)
        ax.set(title=f"{zoo}: barrier through training", xlabel="epoch", ylabel="barrier")
        ax.legend(fontsize=8)
    return _save(fig, path)


def path_curves(rows: pl.DataFrame, value: str, labels: dict[str, str], path: Path, max_pairs: int = 16) -> Path:
    """`value` along several paths per pair (list columns `{value}_{suffix}` for each suffix of `labels`), a panel per zoo."""
    zoos = sorted(rows["zoo"].unique().to_list())
    fig, axes = _panels(len(zoos))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, zoo in zip(axes, zoos):
        sub = rows.filter(pl.col("zoo") == zoo).head(max_pairs)
        for r in sub.iter_rows(named=True):
            for colour, suffix in zip(colours, labels):
                ax.plot(np.asarray(r["lambdas"]), r[f"{value}_{suffix}"], color=colour, alpha=0.6, lw=0.9)
        for colour, label in zip(colours, labels.values()):
            ax.plot([], [], color=colour, label=label)
        ax.set(title=f"{zoo}: {len(sub)} pairs", xlabel="t", ylabel=value)
        ax.legend(fontsize=8)
    return _save(fig, path)


def cka_heatmap(rows: pl.DataFrame, column: str, path: Path) -> Path:
    """Pairwise CKA matrix per zoo (diagonal 1 by definition)."""
    return pair_heatmap(rows, column, path, diagonal=1.0, cmap="magma", vmin=0.0, vmax=1.0)


def cka_vs_layer(rows: pl.DataFrame, path: Path) -> Path:
    """CKA against layer depth, a panel per zoo: a thin line per pair, the mean in black.

    Expects list columns `layers` (labels, input to output) and `cka` (one value per layer), one row per pair;
    where a zoo mixes depths, the pairs with its first row's layers are drawn.
    """
    zoos = sorted(rows["zoo"].unique().to_list())
    fig, axes = _panels(len(zoos))
    for ax, zoo in zip(axes, zoos):
        sub = rows.filter(pl.col("zoo") == zoo)
        labels = sub["layers"][0].to_list()
        sub = sub.filter(pl.col("layers") == pl.lit(pl.Series([labels])))  # depths may differ within a zoo
        values = np.array([list(v) for v in sub["cka"].to_list()], dtype=float)
        depth = np.arange(len(labels))
        for v in values:
            ax.plot(depth, v, color="tab:blue", lw=0.6, alpha=0.35)
        ax.plot(depth, values.mean(0), color="k", lw=2, marker="o", ms=4, label=f"mean of {len(values)} pairs")
        ax.set_xticks(depth, labels, rotation=30, ha="right", fontsize=7)
        ax.set(title=f"{zoo}: CKA by layer", ylabel="linear CKA", ylim=(0, 1.02))
        ax.legend(fontsize=8)
    return _save(fig, path)


def distance_scatter(rows: pl.DataFrame, x: str, y: str, path: Path) -> Path:
    """One distance against another per pair (e.g. canonical vs plain L2), every zoo on one axis, with y = x."""
    zoos = sorted(rows["zoo"].unique().to_list())
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    top = 0.0
    for zoo in zoos:
        sub = rows.filter(pl.col("zoo") == zoo)
        ax.scatter(sub[x].to_numpy(), sub[y].to_numpy(), s=14, alpha=0.7, label=zoo)
        top = max(top, float(sub[x].max()), float(sub[y].max()))
    ax.plot([0, top], [0, top], color="grey", ls="--", lw=0.8, label="y = x")
    ax.set(xlabel=x, ylabel=y, title=f"{y} vs {x}")
    ax.legend(fontsize=8)
    return _save(fig, path)


def rank_vs_bound(rows: pl.DataFrame, path: Path) -> Path:
    """Functional dimension (Jacobian rank) against parameter count per model, with the symmetry bound where known.

    Expects columns zoo, n_params, rank, bound (null where no bound applies), one row per model.
    """
    zoos = sorted(rows["zoo"].unique().to_list())
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rng = np.random.default_rng(0)
    top = float(rows["n_params"].max())
    for i, zoo in enumerate(zoos):
        sub = rows.filter(pl.col("zoo") == zoo)
        p = sub["n_params"].to_numpy().astype(float)
        jitter = 1 + rng.uniform(-0.02, 0.02, len(p))
        ax.scatter(p * jitter, sub["rank"].to_numpy(), s=14, alpha=0.7, color=colors[i % len(colors)], label=f"{zoo} rank")
        bounded = sub.filter(pl.col("bound").is_not_null())
        if bounded.height:
            ax.scatter(bounded["n_params"].to_numpy(), bounded["bound"].to_numpy(), marker="_", s=200,
                       color=colors[i % len(colors)], label=f"{zoo} bound (params - hidden)")
    ax.plot([0, top], [0, top], color="grey", ls="--", lw=0.8, label="rank = #params")
    ax.set(xlabel="#params", ylabel="Jacobian rank", title="functional dimension")
    ax.legend(fontsize=7)
    return _save(fig, path)


def load_curves(cells: pl.DataFrame, metric: str, path: Path, *, title: str | None = None, load_label: str = "load",
                count: str | None = None) -> Path:
    """A metric against the load (a data-efficiency curve: train fraction), one line per architecture: the
    cell means with +-1 standard deviation bars (`<metric>_sd`, where the cell has several models or pairs);
    a log axis where the loads span 10x or more. Expects `phase_diagram`'s cells at one temperature."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    loads = cells["load"].drop_nulls().to_numpy()
    for arch in sorted(cells["arch"].unique().to_list()):
        sub = cells.filter(pl.col("arch") == arch).sort("load")
        y = sub[metric].cast(pl.Float64).to_numpy()
        sd = sub[f"{metric}_sd"].cast(pl.Float64).fill_null(0.0).to_numpy() if f"{metric}_sd" in sub.columns else None
        n = f" (n >= {int(sub[count].fill_null(0).min())} a point)" if count and count in sub.columns else ""
        ax.errorbar(sub["load"].to_numpy(), y, yerr=sd, marker="o", capsize=3, label=arch + n)
    if loads.size and loads.min() > 0 and loads.max() / loads.min() >= 10:
        ax.set_xscale("log")
    ax.set(xlabel=load_label, ylabel=metric, title=title or metric)
    ax.legend(fontsize=8)
    return _save(fig, path)


def phase_diagram(cells: pl.DataFrame, metric: str, path: Path, *, title: str | None = None,
                  load_label: str = "load", temperature_label: str = "temperature", count: str | None = None) -> Path:
    """A metric over the temperature x load grid as a heatmap, one panel per architecture, one colour scale.

    Expects one row per cell with columns arch, load, temperature, n_params and `metric`; each cell shows
    its value (and, with `count`, n = that column: the models or pairs it averages), rows are labelled with
    the load and the parameter count, missing cells stay blank.
    """
    archs = sorted(cells["arch"].unique().to_list())
    values = cells[metric].drop_nulls().drop_nans().to_numpy() if cells[metric].dtype.is_float() else cells[metric].drop_nulls().to_numpy()
    vmin, vmax = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    fig, axes = _panels(len(archs), width=4.4, height=3.6)
    for ax, arch in zip(axes, archs):
        sub = cells.filter(pl.col("arch") == arch)
        loads, temps = sorted(sub["load"].unique().to_list()), sorted(sub["temperature"].unique().to_list())
        mat = np.full((len(loads), len(temps)), np.nan)
        counts = np.zeros_like(mat)
        params = {}
        counted = sub[count].fill_null(0).to_list() if count and count in sub.columns else [None] * sub.height
        for (load, temp, n, v), k in zip(sub.select("load", "temperature", "n_params", metric).iter_rows(), counted):
            mat[loads.index(load), temps.index(temp)] = np.nan if v is None else v
            counts[loads.index(load), temps.index(temp)] = -1 if k is None else k
            params[load] = n
        im = ax.imshow(mat, cmap="viridis", vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
        for i in range(len(loads)):
            for j in range(len(temps)):
                if np.isfinite(mat[i, j]):
                    bright = (mat[i, j] - vmin) / (vmax - vmin or 1.0) > 0.6
                    label = f"{mat[i, j]:.3g}" + (f"\nn={int(counts[i, j])}" if counts[i, j] >= 0 else "")
                    ax.text(j, i, label, ha="center", va="center", fontsize=7, color="k" if bright else "w")
        ax.set_xticks(range(len(temps)), [f"{t:g}" for t in temps])
        ax.set_yticks(range(len(loads)), [f"{v:g} ({params[v]})" for v in loads])
        ax.set(title=arch, xlabel=temperature_label, ylabel=f"{load_label} (params)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title or metric, fontsize=10)
    return _save(fig, path)
