"""`symzoo` commands: store (ls, query, import)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pipeline.cli import command, console, fail, first_line  # noqa: F401
from pipeline.progress import counted

QUERY_FORMATS = ("table", "csv", "json", "parquet")


def _open(store: str):
    """Open an existing store or fail with a one-line error (exit 2)."""
    from zoos.store import Store, StoreError

    try:
        s = Store(store)
        s._require()
    except (StoreError, OSError) as e:
        fail(first_line(e))
    return s


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _final_metric(columns: list[str]) -> tuple[str | None, bool]:
    """The final test metric column of a models table and whether higher is better."""
    for name in ("test_acc", "test_rel_mse", "test_loss"):
        if name in columns:
            return name, name.endswith("acc")
    tests = sorted(c for c in columns if c.startswith("test_"))
    return (tests[0], tests[0].endswith("acc")) if tests else (None, True)


@command("ls")
def ls_cmd(store: str = typer.Argument(..., help="store path or URI")) -> None:
    """Summarise a store: per zoo, models (ok/diverged), checkpoints, epochs, params, final metric, size."""
    import polars as pl

    s = _open(store)
    zoos = s.zoos()
    if not zoos:
        console.print(f"store {store}: no complete shards")
        return
    table = Table("zoo", "models", "ok/diverged", "checkpoints", "epochs", "params", "metric", "best", "median",
                  "size", box=None, header_style="bold")  # fmt: skip
    twice = 0
    for zoo in zoos:
        models = s.models(zoo).collect()
        twice += models.height - models["model_id"].n_unique()
        ck = s.checkpoints(zoo=zoo).select("epoch").collect()
        status = models["status"] if "status" in models.columns else pl.Series([None] * models.height)
        ok, div = int((status == "ok").sum()), int((status == "diverged").sum())
        epochs = sorted(set(ck["epoch"].to_list()))
        ep = ", ".join(map(str, epochs)) if len(epochs) <= 6 else f"{epochs[0]}..{epochs[-1]} ({len(epochs)})"
        params = sorted(set(models["n_params"].drop_nulls().to_list())) if "n_params" in models.columns else []
        par = "-" if not params else str(params[0]) if len(params) == 1 else f"{params[0]}..{params[-1]}"
        metric, higher = _final_metric(models.columns)
        best = median = "-"
        if metric is not None:
            vals = models.filter(pl.col("status") == "ok")[metric] if "status" in models.columns else models[metric]
            vals = vals.drop_nulls().drop_nans()
            if len(vals):
                best = f"{(vals.max() if higher else vals.min()):.4g}"
                median = f"{vals.median():.4g}"
        table.add_row(zoo, str(models.height), f"{ok}/{div}", str(ck.height), ep, par, metric or "-", best, median,
                      _human(s.size_on_disk(zoo)))  # fmt: skip
    console.print(table)
    if twice:
        console.print(f"[yellow]warning[/]: {twice} models are stored twice (imported again before symzoo kept one "
                      f"copy) and counted twice above; `symzoo repair {store}` keeps each one's newest copy")


@command("query")
def query_cmd(
    store: str = typer.Argument(..., help="store path or URI"),
    sql: str = typer.Argument(..., help="polars SQL over models, checkpoints, curves, analysis_<stage>"),
    format: str = typer.Option("table", "--format", "-f", help="table | csv | json | parquet"),  # noqa: A002
    output: Optional[str] = typer.Option(None, "--output", "-o", help="write to this file instead of stdout"),
) -> None:
    """Run SQL over the store's tables (checkpoints: metrics only) and print or save the result."""
    import polars as pl

    if format not in QUERY_FORMATS:
        fail(f"--format {format!r} is not known; allowed: {', '.join(QUERY_FORMATS)}")
    if format == "parquet" and output is None:
        fail("--format parquet needs --output FILE")
    if output is not None:  # before the query runs: where its result goes
        folder = Path(output).absolute().parent
        if Path(output).is_dir():
            fail(f"--output {output!r} is a folder; name a file to write")
        if not folder.is_dir():
            fail(f"--output {output!r}: the folder {str(folder)!r} {'is a file' if folder.exists() else 'does not exist'}")
    reader = _file_reader(sql)
    if reader:
        fail(f"{reader}(...) reads files outside the store (and around its checksums); a query sees the store's tables "
             "only: models, checkpoints, curves, analysis_<stage>")
    s = _open(store)
    ctx = pl.SQLContext(models=s.models(), checkpoints=s.checkpoints(), curves=s.curves())
    for stage in s.stages():
        ctx.register(f"analysis_{stage}".replace("-", "_").replace(".", "_"), s.analysis(stage))
    try:
        df = ctx.execute(sql).collect()
    except Exception as e:  # polars raises several error types for bad SQL or unknown columns
        fail(f"bad SQL {sql!r}: {str(e).splitlines()[0]} (tables: {', '.join(ctx.tables())})")
    if format == "parquet":
        df.write_parquet(output)
    elif format == "csv":
        _emit(_flat(df).write_csv(), output)
    elif format == "json":
        _emit(json.dumps(df.to_dicts(), default=str, indent=1) + "\n", output)
    else:
        if output is not None:
            fail("--output needs --format csv, json or parquet")
        table = Table(*df.columns, box=None, header_style="bold")
        for row in df.iter_rows():
            table.add_row(*("" if v is None else f"{v:.6g}" if isinstance(v, float) else str(v) for v in row))
        console.print(table)
        console.print(f"[dim]{counted(df.height, 'row')}[/]")


def _file_reader(sql: str) -> str | None:
    """The first of polars SQL's file-reading table functions (read_csv, read_parquet, ...) the query calls, if any
    (string literals left out, so a value that merely mentions one is fine)."""
    import re

    code = re.sub(r"'(?:[^']|'')*'", "''", sql)
    m = re.search(r"\b(read_\w+)\s*\(", code, flags=re.IGNORECASE)
    return m.group(1) if m else None


def _flat(df: "pl.DataFrame") -> "pl.DataFrame":
    """CSV holds no nested values: list, array and struct columns (a stage's curves, per-flow norms) as JSON text."""
    import polars as pl

    nested = [c for c, t in df.schema.items() if isinstance(t, (pl.List, pl.Array, pl.Struct))]
    return df.with_columns(pl.Series(c, [None if v is None else json.dumps(v, default=str) for v in df[c].to_list()],
                                     dtype=pl.String) for c in nested)


def _emit(text: str, output: str | None) -> None:
    if output is None:
        typer.echo(text, nl=False)
    else:
        with open(output, "w") as f:
            f.write(text)


@command("import")
def import_cmd(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="small-cnn-zoo | model-zoos"),
    src: str = typer.Argument(..., help="the published zoo's folder (see FORMAT above)"),
    store: str = typer.Argument(..., help="store path or URI to write into"),
    zoo: Optional[str] = typer.Option(None, help="zoo name (default: derived from the source)"),
) -> None:
    """Import a published model zoo into a store; every model then loads with its architecture and task.

    small-cnn-zoo: one dataset's folder of the Small CNN Zoo (Unterthiner et al. 2020), e.g. mnist/ from
    mnist.tar.xz, holding weights.npy, layout.csv and metrics.csv.gz (checkpoints stored at their epochs 0, 1,
    2, 3, 20, 40, 60, 80 and 86; curves from their metrics).

    model-zoos: a folder of the Model Zoos (Schürholt et al. 2022), the Phase-Transition model zoo, or a zoo
    with their layout: one folder per model (Ray Tune trial, at any depth) holding params.json or config.json,
    result.json and checkpoint_<n>/checkpoints (epoch n = training_iteration n).

    A folder that does not read as its format is refused (exit 2) with the file and what is wrong; nothing is written.
    Models the zoo already holds (a folder imported again, grown) replace their earlier copies: each is stored once.
    """
    from zoos.importers import import_zoo
    from zoos.store import Store, StoreError

    try:
        target = Store(store)
        before = target.stored_ids()
        n = import_zoo(fmt, src, target, zoo=zoo)
        again = n - len(target.stored_ids() - before)
    except (StoreError, OSError) as e:
        fail(str(e))
    console.print(f"imported {n} models from {src} into {store}"
                  + (f" ({again} of them already there: rewritten)" if again else ""), soft_wrap=True)


@command("verify")
def verify_cmd(store: str = typer.Argument(..., help="store path or URI")) -> None:
    """Check every shard file against its manifest (present, size, sha256); exit 1 naming damaged files and their models."""
    s = _open(store)
    try:
        problems = s.verify()
    except (OSError, ValueError) as e:
        fail(f"cannot verify {store}: {e}")
    if not problems:
        shards = s.manifests() + s._analysis_manifests()
        files = sum(len(m["files"]) for m in shards)
        console.print(f"[green]ok[/]: {store}: {files} files of {len(shards)} shards match their manifests")
        return
    table = Table("file", "problem", "models", box=None, header_style="bold")
    for p in problems:
        ids = p["model_ids"]
        shown = "-" if not ids else f"{len(ids)}: " + ", ".join(ids[:4]) + (", ..." if len(ids) > 4 else "")
        table.add_row(p["file"], p["problem"], shown)
    console.print(table)
    fail(f"{counted(len(problems), 'problem')} (damaged or stray files, models stored twice) in {store}; `symzoo repair {store}` "
         "drops the damaged shards (their models then count as missing), stray files and the older copies of models "
         "stored twice, and a re-run of the study rewrites what it dropped; or read around the damage with "
         "zoos.open(..., skip_damaged=True)", code=1)


@command("repair")
def repair_cmd(store: str = typer.Argument(..., help="store path or URI")) -> None:
    """Drop the shards `verify` finds damaged, stray or unfinished files, and the older copies of models stored twice,
    so a re-run of the study rewrites what was dropped."""
    s = _open(store)
    mended = s.repair()
    dropped = [p for p in mended if not p.get("duplicates")]
    shards = sorted({p["shard"] for p in dropped if p["manifest"]})
    models = sorted({m for p in dropped for m in p["model_ids"]})
    strays = [p["file"] for p in dropped if not p["manifest"]]
    twice = sorted({m for p in mended for m in p.get("duplicates", [])})
    if not mended:
        console.print(f"[green]ok[/]: {store}: nothing damaged")
        return
    said = []
    if dropped:
        said.append(f"dropped {len(shards)} damaged shards ({len(models)} models) and {len(strays)} stray or unfinished "
                    f"files from {store}; re-run the study to rewrite them")
    if twice:
        said.append(f"{len(twice)} models of {store} stored twice are stored once now (their newest copy)")
    console.print("; ".join(said), highlight=False)
