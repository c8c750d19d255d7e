"""`symzoo report STUDY.yaml` (or `STORE --study NAME`): every result of a study as one self-contained HTML page.

Reads the study's stored models and analysis rows and writes one page: the summary (a row per statistic,
a column per zoo, each with its spread, and how many models never learned), a section per analysis stage
that stored results (its plots and, for pair stages, every pair's numbers), and, where the study grids a
temperature factor (batch size or lr) against a load factor (width, data, depth) within an architecture,
the phase diagrams (`pipeline.phases`: a heatmap per metric, each cell with the number of models or pairs
it averages) with their tables as CSV. Plots are embedded as base64 PNG and tables as HTML, so the page can
be mailed or archived alone. The page, plots and tables are logged to the study's MLflow experiment as a
`report` stage run (unless --no-log).

Every option (the study, the phase axes, the tracking URI) is checked before anything is written; the files are
written into a hidden folder beside the output folder and moved into it at the end, so a refused or failed
report leaves no partial output (and no empty folder). What the store lacks for the study's zoos (an imported
zoo's training curves, a stage's results) is named in one line, not an error.
"""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import polars as pl
import typer

from pipeline.cli import command, console, fail, first_line


@dataclass
class StudyReport:
    """What `write_report` wrote: the page, the tables and the plots; the summary and, where the study has a
    temperature x load grid, its phase cells (else `no_phases` says why there are none)."""

    page: Path
    tables: list[Path] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    summary: pl.DataFrame | None = None
    cells: pl.DataFrame | None = None
    matched: pl.DataFrame | None = None
    no_phases: str = ""
    absent: str = ""  # one line: what the store lacks for the study's zoos (curves, a stage's results)


@dataclass
class ReportPlan:
    """What a report reads before it writes anything: the study's models and zoos, the stages with results for
    them, and its phase cells (else `no_phases` says why there are none)."""

    models: pl.DataFrame
    zoos: list[str]
    stages: list[str]
    cells: pl.DataFrame | None = None
    phase_models: pl.DataFrame | None = None
    no_phases: str = ""


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def html_table(frame: pl.DataFrame) -> str:
    """A polars frame as an HTML table (values escaped, floats to 4 significant digits)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in frame.iter_rows())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(path.name)}</figcaption></figure>'


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:12px;margin:1em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}figure{display:inline-block;margin:.5em}
img{max-width:900px}figcaption{font-size:11px;color:#666}"""


STAGE_TITLES = {
    "interpolation": "Linear mode connectivity: loss along the line between two models, naive and after weight matching",
    "interpolation_cross": "Linear mode connectivity across zoos",
    "bezier": "Bezier-curve mode connectivity",
    "equivariance": "Equivariance error and accuracy over the group orbit",
    "weightspace": "Distance of the weights to the equivariant subspace",
    "landscape": "Loss landscape: Hessian top eigenvalue and trace",
    "lie": "Lie derivative: local equivariance error under continuous transformations",
    "similarity": "Representation similarity: CKA and distances between models",
    "funcdim": "Functional dimension against the symmetry bound",
}
PAIR_COLUMNS = ("barrier_loss_naive", "barrier_loss_aligned", "barrier_err_naive", "barrier_err_aligned",
                "barrier_loss_linear", "barrier_loss_bezier", "cka_output", "cka_penultimate", "l2_distance",
                "canonical_distance")


def _summary_html(summary: pl.DataFrame) -> str:
    from pipeline.report import summary_rows

    rows = summary_rows(summary)
    frame = pl.DataFrame({"": [t for t, _ in rows], **{z: [cells[i] for _, cells in rows] for i, z in enumerate(summary["zoo"])}})
    return html_table(frame)


def with_pair_counts(cells: pl.DataFrame) -> pl.DataFrame:
    """The phase cell table for display: each pair metric as "value (n=pairs)", its stage's `<stage>_pairs`
    count (0 where the stage ran but no pair lies within the cell), so a mean over one pair reads as such."""
    from pipeline.phases import METRICS

    out = cells.with_columns(pl.col(c).fill_null(0) for c in cells.columns if c.endswith("_pairs"))
    for m in METRICS:
        count = f"{m.source}_pairs"
        if m.name in cells.columns and count in cells.columns:
            shown = [f"{_fmt(v)} (n={n or 0})".lstrip() for v, n in zip(cells[m.name].to_list(), cells[count].to_list())]
            out = out.with_columns(pl.Series(m.name, shown, dtype=pl.String))
    return out


def _pairs_html(store: Any, stage: str, zoos: list[str]) -> str:
    """Every pair of a pair stage at its last epoch, with its numbers (collapsed: a study may hold many)."""
    from pipeline.report import zoo_rows

    rows = zoo_rows(store, store.analysis(stage), zoos).collect()
    if "model_a" not in rows.columns or not rows.height:
        return ""
    keys = [c for c in ("zoo", "zoo_b", "model_a", "model_b") if c in rows.columns]
    if "epoch" in rows.columns:
        rows = rows.filter(pl.col("epoch") == pl.col("epoch").max().over(keys))
    cols = keys + [c for c in PAIR_COLUMNS if c in rows.columns]
    table = rows.select(cols).with_columns(pl.col("model_a").str.slice(0, 8), pl.col("model_b").str.slice(0, 8))
    worse = ""
    if {"barrier_loss_naive", "barrier_loss_aligned"} <= set(rows.columns):
        n = rows.filter(pl.col("barrier_loss_aligned") > pl.col("barrier_loss_naive")).height
        worse = f" Weight matching raised the loss barrier in {n} of {rows.height} pairs."
    return (f"<details><summary>{rows.height} pairs, one row each (last epoch).{worse}</summary>"
            f"{html_table(table.sort(keys))}</details>")


def plan_report(store: Any, study: str, temperature: str | None = None, load: str | None = None,
                stored: Sequence[str] = ()) -> ReportPlan:
    """Read what the report shows, writing nothing. PhaseError for a study with no models, a named temperature or
    load factor that is not a column, or a temperature and load that are one column."""
    from pipeline import phases
    from pipeline.report import zoo_rows

    if temperature is not None and temperature == load:
        raise phases.PhaseError(_same_axis(temperature, load))
    models = phases.study_models(store, study, stored)  # PhaseError naming the studies present when there is none
    zoos = sorted(models["zoo"].unique().to_list())
    stages = [st for st in store.stages()
              if zoo_rows(store, store.analysis(st), zoos).select(pl.len()).collect().item()]
    plan = ReportPlan(models=models, zoos=zoos, stages=stages)
    try:
        cells = phases.cell_table(store, study, temperature, load, stored)
    except phases.PhaseError as e:
        if temperature or load:  # axes the user named must exist
            raise
        plan.no_phases = str(e)
        return plan
    t_name, l_name = cells["temperature_factor"][0], cells["load_factor"][0]
    if t_name == l_name:  # one named, the other its default
        raise phases.PhaseError(_same_axis(t_name, l_name, defaulted="load" if load is None else "temperature"))
    plan.cells, plan.phase_models = cells, phases.model_table(store, study, temperature, load, stored)
    return plan


def _mixed_settings(store: Any, stages: list[str], zoos: list[str]) -> str:
    """One line naming the stages whose results for these zoos come from several settings (a report from a store
    alone shows them all; a study file picks its own), else empty."""
    from pipeline.report import zoo_rows

    counts = {}
    for stage in stages:
        rows = zoo_rows(store, store.analysis(stage), zoos)
        if "settings_id" in rows.collect_schema().names():
            counts[stage] = rows.select(pl.col("settings_id").n_unique()).collect().item()
    several = [f"{stage} ({n})" for stage, n in counts.items() if n > 1]
    return (f"Results under several settings are shown together for {', '.join(several)}: report the study file "
            "to see one study's own") if several else ""


def _same_axis(temperature: str, load: str, defaulted: str = "") -> str:
    note = f" (--{defaulted} not given: its default)" if defaulted else ""
    return (f"--temperature {temperature!r} and --load {load!r} name the same column{note}; a phase diagram draws "
            "one factor against another: name two different columns")


def write_report(store: Any, study: str, out_dir: Path, temperature: str | None = None, load: str | None = None,
                 stored: Sequence[str] = (), plan: ReportPlan | None = None) -> StudyReport:
    """The study's page (report.html), its summary, stage plots and, where it has the grid, phase diagrams;
    `stored`: the zoos it analyses as they are in the store (trained by another study, or imported).
    Everything is checked (`plan_report`) and written into a hidden folder beside `out_dir` first, then moved
    into it: a failure leaves `out_dir` as it was (and creates no folder)."""
    import os
    import shutil
    import tempfile

    plan = plan or plan_report(store, study, temperature, load, stored)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file, not a folder")
    anchor = out_dir.absolute().parent
    while not anchor.exists():  # the nearest existing folder: nothing is created above out_dir until the end
        anchor = anchor.parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.report-", dir=anchor))
    try:
        report = _write_into(store, study, tmp, plan)
        moved = lambda p: out_dir / p.relative_to(tmp)  # noqa: E731
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        taken = [moved(f) for f in files if moved(f).is_dir()]
        if taken:
            raise IsADirectoryError(f"{taken[0]} is a folder; the report writes a file of that name")
        out_dir.mkdir(parents=True, exist_ok=True)  # the study's folder may hold the run's files: they stay
        for f in files:
            moved(f).parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, moved(f))  # each file whole, old or new
        report.page = moved(report.page)
        report.tables, report.plots = [moved(p) for p in report.tables], [moved(p) for p in report.plots]
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_into(store: Any, study: str, out_dir: Path, plan: ReportPlan) -> StudyReport:
    """Write the report's files into `out_dir` (an empty folder)."""
    from analysis import plots
    from pipeline import phases
    from pipeline.report import StudyStore, absent, summarise_zoos

    models, zoos, stages = plan.models, plan.zoos, plan.stages
    report = StudyReport(page=out_dir / "report.html", no_phases=plan.no_phases)
    mixed = [] if isinstance(store, StudyStore) else _mixed_settings(store, stages, zoos)
    report.summary, study_plots, stage_plots = summarise_zoos(store, zoos, stages, out_dir)
    report.tables.append(out_dir / "summary.csv")
    report.plots += study_plots
    report.absent = absent(store, zoos, stages)

    if plan.cells is None:
        phase_parts = [f"<p>No phase diagram: {html.escape(plan.no_phases)}.</p>"]
    else:
        cells, phase_models = plan.cells, plan.phase_models
        metrics = phases.metrics_present(cells)
        report.cells, report.matched = cells, phases.matched_table(cells, [m.name for m in metrics])
        t_name, l_name = cells["temperature_factor"][0], cells["load_factor"][0]
        for name, frame in (("phases_cells", cells), ("phases_models", phase_models), ("phases_matched", report.matched)):
            frame.write_csv(out_dir / f"{name}.csv")
            report.tables.append(out_dir / f"{name}.csv")
        curves = cells["temperature"].n_unique() == 1  # one temperature: each metric along the load, per architecture
        counts = {m.name: "ok" if m.source in phases.PER_MODEL else f"{m.source}_pairs" for m in metrics}
        diagrams = [plots.load_curves(cells, m.name, out_dir / f"load_{m.name}.png", title=f"{study}: {m.title}",
                                      load_label=l_name, count=counts[m.name]) if curves else
                    plots.phase_diagram(cells, m.name, out_dir / f"phase_{m.name}.png", title=f"{study}: {m.title}",
                                        load_label=l_name, temperature_label=t_name, count=counts[m.name])
                    for m in metrics]
        report.plots += diagrams
        shown = ["arch", "load", "temperature", "n_params", "models", "ok", *[m.name for m in metrics],
                 *[c for c in cells.columns if c.endswith("_pairs")]]
        counted = with_pair_counts(cells)
        phase_parts = [
            f"<p>temperature = <b>{html.escape(t_name)}</b>{' (one value: curves along the load)' if curves else ''}, "
            f"load = <b>{html.escape(l_name)}</b>; {cells.height} cells. "
            "Per-model metrics average the cell's ok models at their last checkpoint, pair metrics the pairs of seeds "
            "within the cell; n in each cell counts them (in the tables: value (n=pairs)); bars and _sd columns are "
            "one standard deviation across them.</p>",
            *[_img(p) for p in diagrams],
            "<h3>Architectures side by side (i-th load level of each)</h3>",
            html_table(phases.matched_table(counted, [m.name for m in metrics])),
            "<h3>Cells</h3>", html_table(counted.select([c for c in shown if c in cells.columns])),
        ]

    archs = ", ".join(sorted(models["arch"].unique().to_list()))
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(study)}: report</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(study)}</h1>",
        f"<p>{models.height} models in {len(zoos)} zoos ({html.escape(', '.join(zoos))}); architectures: "
        f"{html.escape(archs)}; analysis stages: {html.escape(', '.join(stages) or 'none')}. Generated "
        f"{time.strftime('%Y-%m-%d %H:%M')} from store <code>{html.escape(str(store.root))}</code>.</p>",
        f"<p>{html.escape(report.absent[:1].upper() + report.absent[1:])}.</p>" if report.absent else "",
        f"<p>{html.escape(mixed)}.</p>" if mixed else "",
        "<h2>Summary</h2>",
        "<p>Zoo statistics leave out models that diverged and models that never learned (final training loss at "
        "least 95% of its initial value, and a training metric such as accuracy not doubled), counted in their own "
        "rows. (mean): mean ± standard deviation over the "
        "zoo's models or pairs; (median): median [first quartile, third quartile]; (lo–hi): the 95% interval of "
        "the mean (Student's t) or of the median (order statistics).</p>",
        _summary_html(report.summary),
        *[_img(p) for p in study_plots if not any(p in paths for paths in stage_plots.values())],  # once, in its stage
    ]
    for stage in stages:
        parts += [f"<h2>{html.escape(STAGE_TITLES.get(stage, stage))} <small>({html.escape(stage)})</small></h2>",
                  *[_img(p) for p in stage_plots.get(stage, [])], _pairs_html(store, stage, zoos)]
    parts += ["<h2>Phase diagrams</h2>", *phase_parts,
              "<h2>Models</h2><details><summary>one row per model</summary>",
              html_table(models.select([c for c in models.columns if models[c].dtype != pl.Object][:40])),
              "</details></body></html>"]
    report.page.write_text("\n".join(parts))
    return report


def log_report(tracking_uri: str, study: str, report: StudyReport, tracker: Any = None) -> str:
    """Log the page, tables and plots to the study's experiment as its `report` stage run; returns the run id.
    `tracker`: one already connected to `tracking_uri` (as `report` checks it before writing)."""
    from pipeline.phases import metrics_present
    from pipeline.runner import _summary_metrics
    from pipeline.tracking import Tracker

    if tracker is None:
        tracker = Tracker(tracking_uri, study)
        tracker.connect()
    metrics = _summary_metrics(report.summary)
    params: dict[str, Any] = {"zoos": report.summary.height if report.summary is not None else 0}
    if report.cells is not None:
        cells, names = report.cells, [m.name for m in metrics_present(report.cells)]
        for row in cells.iter_rows(named=True):
            key = f"{row['arch']}.{row['load_factor']}_{row['load']:g}.{row['temperature_factor']}_{row['temperature']:g}"
            metrics.update({f"{key}.{m}": float(row[m]) for m in names if row[m] is not None})
        params.update(temperature=cells["temperature_factor"][0], load=cells["load_factor"][0], cells=cells.height)
    run = tracker.log_stage("report", metrics, params=params)
    tracker.log_artifacts(run, report.plots, folder="plots")
    tracker.log_artifacts(run, [report.page, *report.tables], folder="report")
    return run


def _target(target: str, study: str | None, out: Path | None, tracking_uri: str | None,
            store_path: str | None = None) -> tuple[Any, str, list[str], Path, str | None]:
    """(store, study, its stored zoos, output folder, tracking URI) of the report: a study file gives them all
    (the options override them, --store its store) and the store as the study sees it (its own analysis results,
    `study_store`); a store needs --study unless it holds one study, and shows every result of its zoos."""
    from pipeline.cmd_store import _open
    from pipeline.report import study_store
    from pipeline.study import StudyError, load_study

    if Path(target).suffix.lower() in (".yaml", ".yml"):
        try:
            spec = load_study(target)  # its zoos need not build again: the report reads the store
        except StudyError as e:
            fail(str(e))
        stored = [z.name for z in spec.zoos if getattr(z, "stored", False)]
        store = _open(store_path or spec.store)
        if study is None or study == spec.study:
            try:
                store = study_store(store, spec)
            except ValueError as e:  # a stage's settings ask for what the store lacks (as `symzoo run` would say)
                fail(f"{target}: {e}")
        return store, study or spec.study, stored, out or spec.output_dir(), tracking_uri or spec.tracking_uri
    if store_path is not None:
        fail(f"--store {store_path} replaces a study file's store; {target} is a store already")
    store = _open(target)
    if study is None:
        names = sorted(store.models().select("study").unique().collect()["study"].to_list()) if store.zoos() else []
        if len(names) != 1:
            fail(f"store {target} holds {len(names)} studies ({', '.join(names) or 'none'}); name one with --study")
        study = names[0]
    return store, study, [], out or Path("runs") / study, tracking_uri  # an unknown study: write_report's PhaseError


# URI schemes MLflow's own tracking stores take ('': a folder path); any other is refused by name
MLFLOW_SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "databricks-uc",
                  "uc")


def _tracker(uri: str, study: str, source: str) -> Any:
    """A Tracker connected to `uri` (`source`: where the URI came from, for the message), or a one-line failure
    naming it, its value and the schemes MLflow takes; called before anything is written."""
    from urllib.parse import urlsplit

    from pipeline.tracking import Tracker, TrackingError

    allowed = ("sqlite:///FILE.db, http(s)://HOST:PORT, file:///FOLDER or a folder path "
               "(MLflow also takes postgresql://, mysql://, mssql://, databricks)")
    try:
        tracker = Tracker(uri, study)
    except TrackingError as e:
        scheme = urlsplit(uri).scheme
        if scheme.split("+")[0].lower() not in MLFLOW_SCHEMES:
            fail(f"{source} {uri!r}: MLflow has no tracking store for the scheme {scheme!r}; use {allowed}")
        fail(f"{source} {uri!r} is not usable: {e.cause or first_line(e)}; use {allowed}")
    try:
        tracker.connect()
    except TrackingError as e:
        fail(f"{source} {uri!r} cannot be reached or written: {e.cause or first_line(e)}; start the server or fix the URI")
    return tracker


@command("report")
def report_cmd(
    target: str = typer.Argument(..., metavar="STUDY_OR_STORE",
                                 help="a study file (its store, study, output folder and MLflow), or a store path or URI"),
    study: Optional[str] = typer.Option(None, "--study", help="the study to report (default: the study file's, or the "
                                        "store's only one)"),
    store_path: Optional[str] = typer.Option(None, "--store", help="the store, in place of the study file's (as `symzoo "
                                             "run --store` took it)"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default: the study's, runs/<study>)"),
    temperature: Optional[str] = typer.Option(None, "--temperature", help="temperature factor (default: batch_size or lr, whichever varies)"),
    load: Optional[str] = typer.Option(None, "--load", help="load factor (default: width, train_fraction or depth, whichever varies)"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: the study "
                                               "file's, else sqlite:///symzoo.db here)"),
    no_log: bool = typer.Option(False, "--no-log", help="write the files only; log nothing to MLflow"),
) -> None:
    """Every result of a study (summary, each analysis stage, phase diagrams where it grids temperature x load)
    as one self-contained HTML page."""
    from pipeline.phases import PhaseError
    from pipeline.tracking import TrackingError, default_tracking_uri

    s, study_name, stored, out_dir, uri = _target(target, study, out, tracking_uri, store_path)
    try:  # every option is checked before anything is written
        plan = plan_report(s, study_name, temperature, load, stored)
    except PhaseError as e:
        fail(str(e))
    tracker = None
    if not no_log:
        source = "--tracking-uri" if tracking_uri else f"{target}'s tracking_uri" if uri else "the default tracking URI"
        uri = uri or default_tracking_uri()
        tracker = _tracker(uri, study_name, source)
    try:
        report = write_report(s, study_name, out_dir, temperature, load, stored, plan=plan)
    except OSError as e:
        fail(f"the report to {out_dir} failed, nothing written there: {first_line(e)}")
    if tracker is not None:
        try:
            log_report(uri, study_name, report, tracker)
        except TrackingError as e:
            fail(f"{e} (the report itself is written: {report.page})")
    phases = f"{report.cells.height} phase cells" if report.cells is not None else "no phase diagram"
    console.print(f"[green]report[/]: {report.page} ({report.summary.height} zoos, {len(report.plots)} plots, {phases})")
    if report.absent:
        console.print(f"  {report.absent}", highlight=False, markup=False)
    for p in report.tables:
        console.print(f"  table: {p}")
