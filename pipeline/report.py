"""The end of a run: a summary table per zoo, the plots behind it, and the next steps to take."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.table import Table

from analysis import plots
from pipeline.tracking import experiment_url
from pipeline.study import Study


def _final_metric_columns(models: pl.DataFrame) -> list[str]:
    return [c for c in models.columns if c.startswith("test_") and models[c].dtype.is_numeric()]


def summarise(store: Any, study: Study, out_dir: Path) -> tuple[pl.DataFrame, list[Path], dict[str, list[Path]]]:
    """Per-zoo summary (also written as CSV), study plots, and plots per analysis stage."""
    from pipeline.stages import STAGES

    names = [z.name for z in study.zoos]
    models = store.models().filter(pl.col("zoo").is_in(names)).collect()
    metric_cols = _final_metric_columns(models)
    aggs = [pl.len().alias("models"), (pl.col("status") == "ok").sum().alias("ok"),
            (pl.col("status") == "diverged").sum().alias("diverged"), pl.col("n_params").first().alias("params")]
    aggs += [pl.col(c).filter(pl.col("status") == "ok").mean().alias(c) for c in metric_cols]
    summary = models.group_by("zoo").agg(aggs).sort("zoo")

    plot_paths: list[Path] = []
    curves = store.curves().filter(pl.col("zoo").is_in(names)).collect()
    curve_metric = next((c for c in ("test_acc", "test_rel_mse", "test_loss") if c in curves.columns), None)
    if curve_metric and curves.height:
        plot_paths.append(plots.training_curves(curves, curve_metric, out_dir / "training_curves.png"))
    if metric_cols and models.height:
        plot_paths.append(plots.metric_distribution(models.filter(pl.col("status") == "ok"), metric_cols[:3],
                                                    out_dir / "final_metrics.png"))

    stage_plots: dict[str, list[Path]] = {}
    present = store.stages()
    for stage in study.analysis:
        if stage.stage not in present:
            continue
        rows = store.analysis(stage.stage).filter(pl.col("zoo").is_in(names)).collect()
        impl = STAGES[stage.stage]
        summary = summary.join(impl.summary_columns(rows), on="zoo", how="left")
        stage_plots[stage.stage] = impl.plots(rows, out_dir)
        plot_paths += stage_plots[stage.stage]
    summary.write_csv(out_dir / "summary.csv")
    return summary, plot_paths, stage_plots


# Column headers of the summary table, where the column name alone says too little.
COLUMN_TITLES = {
    "test_acc": "test acc", "orbit_acc": "acc over orbit", "equiv_error": "equiv. error",
    "barrier_naive": "barrier naive", "barrier_aligned": "barrier aligned", "test_rel_mse": "test rel. MSE",
    "orbit_rel_mse": "rel. MSE over orbit",
    "wdist_first": "w-dist to equiv. first", "wdist_last": "w-dist to equiv. last", "hessian_top": "Hessian top eig.",
    "hessian_trace": "Hessian trace", "lie_relative": "Lie deriv. (relative)",
    "cka_output": "CKA output", "cka_penult": "CKA penult.", "l2_dist": "L2 dist.", "canon_dist": "canonical dist.",
    "fdim_over_bound": "fdim / bound", "fdim_over_params": "fdim / params", "bezier_barrier": "Bezier barrier",
    "line_barrier": "line barrier", "cross_barrier_naive": "cross-zoo barrier naive",
    "cross_barrier_aligned": "cross-zoo barrier aligned", "test_psnr": "test PSNR (dB)",
}


def print_summary(console: Console, study: Study, report: Any) -> None:
    """The table a person reads at the end of `symzoo run`, then what to do next."""
    summary = report.summary
    if summary is not None and summary.height:
        shown = [c for c in summary.columns if c not in ("test_loss",) and not (c == "diverged" and not summary[c].sum())]
        table = Table(title=f"study {study.study}", header_style="bold")
        for c in shown:
            table.add_column(COLUMN_TITLES.get(c, c), justify="left" if c == "zoo" else "right")
        for row in summary.select(shown).iter_rows():
            table.add_row(*[_fmt(v) for v in row])
        console.print(table)
    console.print(
        f"trained {report.trained_models} models ({report.skipped_models} already stored) in {report.wall_s:.1f}s; "
        f"MLflow: {report.tracking_s:.1f}s of logging, {report.tracking_wait_s:.1f}s of it waited for "
        f"({100 * report.tracking_share:.1f}% of the run)"
    )
    out = study.output_dir()
    uri = study.tracking_uri or "sqlite:///symzoo.db"
    console.print("\n[bold]next steps[/]")
    console.print(f"  plots and summary:  {out}/")
    if uri.startswith(("http://", "https://")):  # a server: its own page (mlflow ui takes no server URI)
        console.print(f"  browse the runs:    {experiment_url(uri, report.experiment_id)}", soft_wrap=True)
    else:
        console.print(f"  browse the runs:    {_command('mlflow')} ui --backend-store-uri {uri}", soft_wrap=True)
        console.print(f"                      then {experiment_url('http://127.0.0.1:5000', report.experiment_id)}",
                      soft_wrap=True)
    symzoo, python = _command("symzoo"), _command("python")
    console.print(f"  query the zoo:      {symzoo} ls {study.store}", soft_wrap=True)
    console.print(
        f"""  in Python:          {python} -c "import polars as pl, zoos; """
        f"""print(zoos.open('{study.store}').models().filter(pl.col('status') == 'ok').collect())\"""",
        highlight=False, soft_wrap=True,
    )


def _command(name: str) -> str:
    """`name` as this shell can run this install's: the bare name where PATH finds it, else its full path
    (after `make demo` without activating .venv a bare `symzoo` is not found and `python` lacks polars)."""
    import shutil
    import sys

    here = Path(sys.executable).parent
    found = shutil.which(name)
    if found and Path(found).parent.resolve() == here.resolve():
        return name
    if (here / name).exists():
        return str(here / name)
    return f"{sys.executable} -m pipeline" if name == "symzoo" else name


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.3f}"
    return str(v)
