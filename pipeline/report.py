"""The end of a run: a summary table per zoo, the plots behind it, and the next steps to take."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
from rich.console import Console
from rich.table import Table

from analysis import plots
from pipeline.progress import counted
from pipeline.tracking import experiment_url
from zoos.trainer import LEARNED
from pipeline.study import Study


def _final_metric_columns(models: pl.DataFrame) -> list[str]:
    return [c for c in models.columns if c.startswith("test_") and models[c].dtype.is_numeric()]


def _learned(models: pl.DataFrame) -> pl.Expr:
    """ok models that learned (`learned` is false for a model whose training loss stayed near its initial value;
    stores written before the column existed count every ok model)."""
    ok = pl.col("status") == "ok"
    return ok & pl.col("learned").fill_null(True) if "learned" in models.columns else ok


def _without_unlearned(rows: pl.DataFrame, unlearned: set[str]) -> pl.DataFrame:
    """A stage's rows less those of models that never learned (per model, or either side of a pair)."""
    for col in ("model_id", "model_a", "model_b"):
        if col in rows.columns and unlearned:
            rows = rows.filter(~pl.col(col).is_in(sorted(unlearned)))
    return rows


class StudyStore:
    """A store as one study sees it: each of the study's analysis stages answers with the study's own results
    (`Stage.rows`: the items its settings want, computed under those settings), in the study's order; results
    other studies stored for other settings or other items are not there. Every other call goes to the store."""

    def __init__(self, store: Any, results: dict[str, pl.DataFrame], asked: dict[str, dict[str, int]] | None = None):
        self.store, self.results = store, results
        self.asked = asked or {}  # stage -> {zoo it runs on: the items its settings want there}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def stages(self) -> list[str]:
        return [stage for stage, rows in self.results.items() if rows.height]

    def analysis(self, stage: str) -> pl.LazyFrame:
        rows = self.results.get(stage)
        return rows.lazy() if rows is not None else pl.LazyFrame({"model_id": pl.Series([], dtype=pl.String)})


def study_store(store: Any, study: Study) -> StudyStore:
    """`store` as `study` sees it (`StudyStore`). ValueError where a stage's settings ask for what the store
    lacks (an epoch no model stored), as planning the stage would."""
    from pipeline.stages import STAGES

    results: dict[str, pl.DataFrame] = {}
    asked: dict[str, dict[str, int]] = {}
    for stage in study.analysis:  # each stage once (`Study` refuses one listed twice)
        zoos = study.stage_zoos(stage)
        impl = STAGES[stage.stage]
        wanted = impl.wanted(store, zoos, stage.settings)
        asked[stage.stage] = {z.name: sum(z.name in (it["zoo"], it.get("zoo_b")) for it in wanted) for z in zoos}
        results[stage.stage] = impl.rows(store, zoos, stage.settings, wanted)
    return StudyStore(store, results, asked)


def summarise(store: Any, study: Study, out_dir: Path) -> tuple[pl.DataFrame, list[Path], dict[str, list[Path]]]:
    """Per-zoo summary (also written as CSV: every statistic with its spread in sibling columns), study plots, and
    plots per analysis stage. Zoo statistics leave out models that diverged or never learned (counted apart).
    `store`: as the study sees it (`study_store`)."""
    return summarise_zoos(store, [z.name for z in study.zoos], [s.stage for s in study.analysis], out_dir)


def pooled_factors(store: Any, names: list[str]) -> dict[str, list[str]]:
    """{zoo: the factors other than seed that vary among its models} for zoos whose summary column pools levels
    of a factor (a data-efficiency zoo's train fractions, a width sweep's widths)."""
    from zoos.spec import FACTORS

    models = _models(store, names)
    out = {}
    for (zoo,), group in models.group_by("zoo", maintain_order=True):
        varied = [f for f in FACTORS if f != "seed" and f in group.columns and group[f].n_unique() > 1]
        if varied:
            out[zoo] = varied
    return dict(sorted(out.items()))


def unlearned_models(store: Any, names: list[str]) -> set[str]:
    """The ids of these zoos' ok models that never learned (left out of every zoo statistic)."""
    return _unlearned_ids(_models(store, names))


def _unlearned_ids(models: pl.DataFrame) -> set[str]:
    if "status" not in models.columns:
        return set()
    return set(models.filter((pl.col("status") == "ok") & ~_learned(models))["model_id"].to_list())


def statistics_rows(store: Any, names: list[str], stage: str, unlearned: set[str] | None = None) -> pl.DataFrame:
    """A stage's rows of these zoos that their statistics count: none of a model that never learned (a pair: of
    either model; `unlearned`: those models, if known)."""
    unlearned = unlearned_models(store, names) if unlearned is None else unlearned
    return _without_unlearned(zoo_rows(store, store.analysis(stage), names).collect(), unlearned)


def zoo_rows(store: Any, frame: pl.LazyFrame, names: list[str]) -> pl.LazyFrame:
    """The rows of `frame` (a store table) that belong to these zoos. A row without a zoo (a shard or table
    without the column) takes its model's zoo from the models table, by `model_id`, else `model_a`; a table with
    neither column has no rows of theirs (the store answers a table with no file, such as an imported zoo's
    curves, with a `model_id` column alone)."""
    cols = frame.collect_schema().names()
    key = next((c for c in ("model_id", "model_a") if c in cols), None)
    models = store.models()
    if key is not None and "zoo" in models.collect_schema().names():
        owners = dict(models.select("model_id", "zoo").collect().iter_rows())
        owner = pl.col(key).replace_strict(owners, default=None, return_dtype=pl.String)
        frame = frame.with_columns((pl.coalesce("zoo", owner) if "zoo" in cols else owner).alias("zoo"))
    elif "zoo" not in cols:
        return frame.head(0).with_columns(pl.lit(None, dtype=pl.String).alias("zoo"))
    return frame.filter(pl.col("zoo").is_in(names))


def _models(store: Any, names: list[str]) -> pl.DataFrame:
    """The models of these zoos (none where the store has no models table)."""
    models = store.models()
    if "zoo" not in models.collect_schema().names():
        return models.head(0).with_columns(pl.lit(None, dtype=pl.String).alias("zoo")).collect()
    return models.filter(pl.col("zoo").is_in(names)).collect()


def absent(store: Any, names: list[str], stages: list[str], analysis: bool = True) -> str:
    """One line naming what the store lacks for these zoos (empty if nothing): training curves (an imported zoo
    whose table records no metrics has none), and each of `stages`' results per zoo, or any analysis at all
    (unless `analysis` is False: a study that asks for none)."""
    def zoos_in(frame: pl.LazyFrame) -> set[str]:
        cols = [c for c in ("zoo", "zoo_b") if c in frame.collect_schema().names()]
        return {z for c in cols for z in frame.select(c).unique().collect()[c].to_list()}

    from pipeline.stages import STAGES

    parts = []
    no_curves = [z for z in names if z not in zoos_in(zoo_rows(store, store.curves(), names))]
    if no_curves:
        parts.append(f"training curves of {', '.join(no_curves)}")
    asked = getattr(store, "asked", {})  # a study's view: which zoos each stage runs on, and what it wants there
    idle = {st: [z for z, n in asked[st].items() if not n and z in names] for st in stages if st in asked}
    present = set(store.stages())
    missing = {st: [z for z in (asked[st] if st in asked else names) if z in names and z not in idle.get(st, [])
                    and z not in zoos_in(zoo_rows(store, store.analysis(st), names))]
               for st in stages if st in present or st in asked}
    if analysis and not asked and not any(len(m) < len(names) for m in missing.values()):
        parts.append(f"analysis results (no stage has run on {', '.join(names)})")
    else:
        parts += [f"{st} results of {', '.join(m)}" for st, m in missing.items() if m]
    nothing = [f"{st} in {', '.join(zs)} ({_why_idle(STAGES[st])})" for st, zs in idle.items() if zs and st in STAGES]
    line = f"absent from the store: {'; '.join(parts)}" if parts else ""
    if nothing:
        line += ("; " if line else "") + f"nothing to compute for {'; '.join(nothing)}"
    return line


def _why_idle(stage: Any) -> str:
    """Why a stage's settings want nothing of a zoo."""
    if stage.pairs == "within":
        return "no two of its models that trained share an architecture and task config"
    if stage.pairs == "across":
        return "no model of another zoo of the stage shares its architecture config"
    return "no model trained without diverging, or none stored the checkpoints asked for"


def summarise_zoos(store: Any, names: list[str], stages: list[str], out_dir: Path
                   ) -> tuple[pl.DataFrame, list[Path], dict[str, list[Path]]]:
    """`summarise` for these zoos and analysis stages (what `symzoo report` reads from a store alone). What the
    store lacks (curves, a stage's rows for some zoos) is left out of the summary and plots, not an error."""
    from pipeline.stages import STAGES
    from pipeline.stages.common import mean_sd, value_range

    models = _models(store, names)
    if "status" not in models.columns:
        models = models.with_columns(pl.lit(None, dtype=pl.String).alias("status"))
    metric_cols = _final_metric_columns(models)
    good = _learned(models)
    aggs = [pl.len().alias("models"), good.sum().alias("ok"), (pl.col("status") == "diverged").sum().alias("diverged"),
            ((pl.col("status") == "ok") & ~good).sum().alias("not_learned")]
    aggs += [pl.col("n_params").first().alias("params")] if "n_params" in models.columns else []
    aggs += [e for c in metric_cols for e in mean_sd(pl.col(c).filter(good), c, *value_range(c))]
    summary = models.group_by("zoo").agg(aggs).sort("zoo")

    plot_paths: list[Path] = []
    curves = zoo_rows(store, store.curves(), names).collect()
    curve_metric = next((c for c in ("test_acc", "test_rel_mse", "test_loss") if c in curves.columns), None)
    if curve_metric and curves.height:
        plot_paths.append(plots.training_curves(curves, curve_metric, out_dir / "training_curves.png"))
    if metric_cols and models.filter(good).height:
        plot_paths.append(plots.metric_distribution(models.filter(good), metric_cols[:3], out_dir / "final_metrics.png"))

    stage_plots: dict[str, list[Path]] = {}
    unlearned = _unlearned_ids(models)
    present = store.stages()
    for stage in stages:
        if stage not in present or stage not in STAGES:
            continue
        rows = zoo_rows(store, store.analysis(stage), names).collect()
        if not rows.height:
            continue
        impl = STAGES[stage]
        summary = summary.join(impl.summary_columns(_without_unlearned(rows, unlearned)), on="zoo", how="left")
        stage_plots[stage] = impl.plots(rows, out_dir)  # the plots show every model, the statistics the learned
        plot_paths += stage_plots[stage]
    summary.write_csv(out_dir / "summary.csv")
    return summary, plot_paths, stage_plots


LEGEND = ("(mean): mean ± standard deviation over models or pairs; (median): median [quartiles]; "
          "(lo–hi): the 95% interval of the mean (Student's t) or of the median (order statistics)")

# Row titles of the summary table, where the column name alone says too little.
COLUMN_TITLES = {
    "test_acc": "test acc", "orbit_acc": "acc over orbit", "equiv_error": "equiv. error",
    "barrier_naive": "loss barrier naive", "barrier_aligned": "loss barrier aligned",
    "err_barrier_naive": "error barrier naive", "err_barrier_aligned": "error barrier aligned", "test_rel_mse": "test rel. MSE",
    "orbit_rel_mse": "rel. MSE over orbit", "pairs": "pairs", "matching_worse": "pairs matching made worse",
    "wdist_first": "w-dist to equiv. first", "wdist_last": "w-dist to equiv. last", "hessian_top": "Hessian top eig.",
    "hessian_trace": "Hessian trace", "trace_rel_se": "trace s.e. / |trace|",
    "trace_imprecise": "traces above their s.e. target", "lie_relative": "Lie deriv. (relative)",
    "cka_output": "CKA output", "cka_penult": "CKA penult.", "l2_dist": "L2 dist.", "canon_dist": "canonical dist.",
    "fdim_over_bound": "fdim / bound", "fdim_over_params": "fdim / params",
    "fdim_capped": "fdim capped by the Jacobian's rows (a lower bound)", "bezier_barrier": "Bezier barrier",
    "line_barrier": "line barrier", "cross_barrier_naive": "cross-zoo barrier naive",
    "cross_barrier_aligned": "cross-zoo barrier aligned", "test_psnr": "test PSNR (dB)",
    "not_learned": "not learned (left out)", "ok": "learned (in the statistics)",
    "similarity_pairs": "pairs (similarity)", "bezier_pairs": "pairs (Bezier)", "cross_pairs": "pairs (cross-zoo)",
}


def _title(column: str) -> str:
    if column.startswith("lie_") and column not in COLUMN_TITLES:
        return f"Lie {column.removeprefix('lie_')} (rel.)"
    return COLUMN_TITLES.get(column, column)


def summary_rows(summary: pl.DataFrame) -> list[tuple[str, list[str]]]:
    """The summary as (row title, one cell per zoo): a statistic's row says mean ± sd or median [q25, q75],
    followed by its 95% interval (lo–hi) where the summary has one."""
    from pipeline.stages.common import HI, LO, Q25, Q75, SD, SIBLINGS

    cols = set(summary.columns)

    def column(c: str, suffix: str) -> list:
        return summary[c + suffix].to_list() if c + suffix in cols else [None] * summary.height

    out = []
    for c in summary.columns:
        if c == "zoo" or c.endswith(SIBLINGS) or c == "test_loss":
            continue
        if c == "diverged" and not (summary[c].fill_null(0) > 0).any():
            continue
        values = summary[c].to_list()
        interval = list(zip(column(c, LO), column(c, HI)))
        if c + SD in cols:
            cells = [_spread(v, sd=s, ci=ci) for v, s, ci in zip(values, column(c, SD), interval)]
            out.append((f"{_title(c)} (mean)", cells))
        elif c + Q25 in cols:
            cells = [_spread(v, q=q, ci=ci) for v, q, ci in zip(values, zip(column(c, Q25), column(c, Q75)), interval)]
            out.append((f"{_title(c)} (median)", cells))
        else:
            out.append((_title(c), [_fmt(v) for v in values]))
    return out


def _known(v: Any) -> bool:
    return v is not None and v == v


def _spread(v: Any, sd: Any = None, q: tuple = (None, None), ci: tuple = (None, None)) -> str:
    """"v ± sd" or "v [q25, q75]", then " (lo–hi)": the 95% interval, where there is one."""
    if not _known(v):
        return ""
    text = _fmt(v)
    if all(_known(x) for x in q):
        text += f" [{_fmt(q[0])}, {_fmt(q[1])}]"
    elif _known(sd):
        text += f" ± {_fmt(sd)}"
    if all(_known(x) for x in ci):
        text += f" ({_fmt(ci[0])}–{_fmt(ci[1])})"
    return text


def print_summary(console: Console, study: Study, report: Any, report_args: str | None = None) -> None:
    """The table a person reads at the end of `symzoo run` (a row per statistic, a column per zoo, split into
    tables that fit the terminal), then what to do next. `report_args`: what `symzoo report` takes for this
    study (its file and the run's overrides); default: the store and the study's name."""
    summary = report.summary
    if summary is not None and summary.height:
        rows = summary_rows(summary)
        zoos = summary["zoo"].to_list()
        label = max(len(t) for t, _ in rows) + 2
        cell = max([len(z) for z in zoos] + [len(v) for _, cells in rows for v in cells]) + 3
        per_table = max(1, (console.width - label) // cell)
        for start in range(0, len(zoos), per_table):
            part = zoos[start:start + per_table]
            table = Table(title=f"study {study.study}" if start == 0 else None, header_style="bold")
            table.add_column("", justify="left", no_wrap=True)
            for z in part:
                table.add_column(z, justify="right", no_wrap=True)
            for title, cells in rows:
                table.add_row(title, *cells[start:start + per_table])
            console.print(table)
        from rich.text import Text

        console.print(Text(LEGEND, "dim"))
        from pipeline.phases import LOADS

        for zoo, factors in getattr(report, "pooled", {}).items():
            where = ("`symzoo report` draws each metric per level" if any(f in LOADS for f in factors) else
                     "each model's numbers are in the models table (symzoo query)")
            console.print(f"zoo {zoo} varies {', '.join(factors)}: its column pools every level; {where}",
                          highlight=False, markup=False)
        if report.absent:
            console.print(report.absent[:1].upper() + report.absent[1:], highlight=False, markup=False)
        left_out = int(summary["not_learned"].fill_null(0).sum()) if "not_learned" in summary.columns else 0
        if left_out:
            console.print(f"{left_out} model{'s' * (left_out != 1)} never learned (final training loss >= {LEARNED:.0%} "
                          "of its initial value, and its metric not doubled): "
                          "counted, left out of the statistics; the models table's `learned` column marks them")
    console.print(
        f"trained {counted(report.trained_models, 'model')} ({report.skipped_models:,} already stored) in {report.wall_s:.1f}s; "
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
    if report_args is None:
        report_args = f"{study.store} --study {study.study} --out {out}" + (
            f" --tracking-uri {study.tracking_uri}" if study.tracking_uri else "")
    console.print(f"  the whole report:   {symzoo} report {report_args}", soft_wrap=True, highlight=False)
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
    """Three significant digits (a summary compares zoos, not the fourth digit)."""
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if v != 0 else "0"
    return str(v)
