"""`symzoo report STORE --study NAME`: the phase diagrams of a study as one self-contained HTML page.

Reads the stored models and analysis rows of the study (`pipeline.phases`), draws one phase diagram
per metric (a heatmap over temperature x load, a panel per architecture), writes the tables behind
them as CSV, and puts everything on one HTML page: plots embedded as base64 PNG, tables as HTML, so
the page can be mailed or archived alone. The plots, tables and page are logged to the study's MLflow
experiment as a `phases` stage run (unless --no-log).
"""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import polars as pl
import typer

from pipeline.cli import app, console, fail


@dataclass
class PhaseReport:
    """What `write_report` wrote: the page, the tables and the diagrams, and the tables themselves."""

    page: Path
    tables: list[Path] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    cells: pl.DataFrame | None = None
    matched: pl.DataFrame | None = None


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


def write_report(store: Any, study: str, out_dir: Path, temperature: str | None = None, load: str | None = None) -> PhaseReport:
    """Phase diagrams, their tables (CSV) and the HTML page of `study` into `out_dir`."""
    from analysis import plots
    from pipeline import phases

    cells = phases.cell_table(store, study, temperature, load)
    models = phases.model_table(store, study, temperature, load)
    metrics = phases.metrics_present(cells)
    matched = phases.matched_table(cells, [m.name for m in metrics])
    t_name, l_name = cells["temperature_factor"][0], cells["load_factor"][0]
    out_dir.mkdir(parents=True, exist_ok=True)
    report = PhaseReport(page=out_dir / "phases.html", cells=cells, matched=matched)
    for name, frame in (("phases_cells", cells), ("phases_models", models), ("phases_matched", matched)):
        frame.write_csv(out_dir / f"{name}.csv")
        report.tables.append(out_dir / f"{name}.csv")
    for m in metrics:
        report.plots.append(plots.phase_diagram(cells, m.name, out_dir / f"phase_{m.name}.png", title=f"{study}: {m.title}",
                                                load_label=l_name, temperature_label=t_name))

    shown = ["arch", "load", "temperature", "n_params", "models", "ok", *[m.name for m in metrics],
             *[c for c in cells.columns if c.endswith("_pairs")]]
    archs = ", ".join(sorted(cells["arch"].unique().to_list()))
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(study)}: phase diagrams</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(study)}: phase diagrams</h1>",
        f"<p>{models.height} models in {cells.height} cells; architectures: {html.escape(archs)}; "
        f"temperature = <b>{html.escape(t_name)}</b>, load = <b>{html.escape(l_name)}</b>. "
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} from store <code>{html.escape(str(store.root))}</code>.</p>",
        "<p>Per-model metrics (test/train loss, accuracy, Hessian) average the cell's ok models at their last "
        "checkpoint; pair metrics (barriers, CKA) average the pairs of seeds within the cell.</p>",
        "<h2>Phase diagrams</h2>", *[_img(p) for p in report.plots],
        "<h2>Architectures side by side (i-th load level of each)</h2>", html_table(matched),
        "<h2>Cells</h2>", html_table(cells.select([c for c in shown if c in cells.columns])),
        "<h2>Models</h2><details><summary>one row per model</summary>", html_table(models), "</details>",
        "</body></html>",
    ]
    report.page.write_text("\n".join(parts))
    return report


def log_report(tracking_uri: str, study: str, report: PhaseReport) -> str:
    """Log the page, tables and diagrams to the study's experiment as its `phases` stage run; returns the run id."""
    from pipeline.phases import metrics_present
    from pipeline.tracking import Tracker

    tracker = Tracker(tracking_uri, study)
    tracker.connect()
    cells, names = report.cells, [m.name for m in metrics_present(report.cells)]
    metrics = {}
    for row in cells.iter_rows(named=True):
        key = f"{row['arch']}.{row['load_factor']}_{row['load']:g}.{row['temperature_factor']}_{row['temperature']:g}"
        metrics.update({f"{key}.{m}": float(row[m]) for m in names if row[m] is not None})
    run = tracker.log_stage("phases", metrics, params={"temperature": cells["temperature_factor"][0],
                                                       "load": cells["load_factor"][0], "cells": cells.height})
    tracker.log_artifacts(run, report.plots, folder="plots")
    tracker.log_artifacts(run, [report.page, *report.tables], folder="report")
    return run


@app.command("report")
def report_cmd(
    store: str = typer.Argument(..., help="store path or URI"),
    study: str = typer.Option(..., "--study", help="the study whose models and analyses to report"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default runs/<study>)"),
    temperature: Optional[str] = typer.Option(None, "--temperature", help="temperature factor (default: batch_size or lr, whichever varies)"),
    load: Optional[str] = typer.Option(None, "--load", help="load factor (default: width, train_fraction or depth, whichever varies)"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: sqlite:///symzoo.db here)"),
    no_log: bool = typer.Option(False, "--no-log", help="write the files only; log nothing to MLflow"),
) -> None:
    """Phase diagrams of a study (temperature x load, a panel per architecture) as one self-contained HTML page."""
    from pipeline.cmd_store import _open
    from pipeline.phases import PhaseError
    from pipeline.tracking import TrackingError, default_tracking_uri

    s = _open(store)
    try:
        report = write_report(s, study, out or Path("runs") / study, temperature, load)
    except PhaseError as e:
        fail(str(e))
    if not no_log:
        try:
            log_report(tracking_uri or default_tracking_uri(), study, report)
        except TrackingError as e:
            fail(str(e))
    console.print(f"[green]report[/]: {report.page} ({report.cells.height} cells, {len(report.plots)} phase diagrams)")
    for p in report.tables:
        console.print(f"  table: {p}")
