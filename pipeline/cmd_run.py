"""`symzoo validate` and `symzoo run`: check a study file, then train and analyse it on Ray."""

from __future__ import annotations

import json

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pipeline.cli import command, console, fail, first_line


def _load(path: Path, **overrides):
    """The validated study, or exit 2 with one `error: <file>: <key path>: <problem>` line a problem."""
    from pipeline.study import StudyError, load_study

    try:
        study = load_study(path, **overrides)
    except StudyError as e:
        fail(str(e))
    problems = _check_buildable(study)
    if problems:
        fail("\n".join(f"{path}: {p}" for p in problems))
    return study


def _check_buildable(study) -> list[str]:
    """Every problem found building each zoo's task and each of its architecture configs (on the meta device) and
    finding file-backed tasks' data files, a line each naming its zoo (one line for zoos sharing a task's problem,
    such as a missing data folder): bad names, configs and missing data fail before any work starts, all at once."""
    from pipeline.study import StudyError
    from tasks.base import TaskError
    from tasks.registry import task_with_data
    from zoos.archs.base import ArchError
    from zoos.spec import ZooSpec, build_model, expand

    import torch

    problems: list[str] = []
    task_problems: dict[str, list[tuple[int, str]]] = {}  # a message -> the zoos it is about (one data folder, many zoos)
    for i, zoo in enumerate(study.zoos):
        if not isinstance(zoo, ZooSpec):  # a stored zoo: checked against the store (check_stored_zoos)
            continue
        where, named = f"zoos[{i}]", f" (zoo {zoo.name!r})"
        try:
            task = task_with_data(zoo.task.name, zoo.task.options, study.data_dir)
            if hasattr(task, "find_files"):
                task.find_files()  # TaskError naming the missing files and where to get them
                task.check_sizes()  # n_train / n_val / n_test against the files' image counts (read from their headers)
        except TaskError as e:
            if str(e) not in task_problems:
                problems.append(str(e))  # its line, written below once every zoo it is about is known
            task_problems.setdefault(str(e), []).append((i, zoo.name))
            continue
        largest: tuple[int, dict] = (0, {})
        configs = {json.dumps(m.arch_config, sort_keys=True, default=str): m for m in expand(zoo, study.study)}
        seen: set[str] = set()
        for model in configs.values():  # each architecture config once, on the meta device: shapes, no memory
            try:
                with torch.device("meta"):
                    n = sum(p.numel() for p in build_model(zoo, model.factors, task).parameters())
            except ArchError as e:
                if str(e) not in seen:  # a grid over other factors repeats a config's problem
                    seen.add(str(e))
                    problems.append(f"{where}.arch: {e}{named}")
                continue
            if n > largest[0]:
                largest = (n, model.factors)
        try:
            if largest[0]:
                _check_fits(zoo.name, *largest)
        except StudyError as e:
            problems.append(f"{where}: {e}")
    for message, zoos in task_problems.items():
        at, names = ", ".join(str(i) for i, _ in zoos), ", ".join(repr(name) for _, name in zoos)
        problems[problems.index(message)] = f"zoos[{at}].task: {message} (zoo{'s' if len(zoos) > 1 else ''} {names})"
    return problems


def _check_fits(zoo: str, n_params: int, factors: dict) -> None:
    """StudyError when one model's training state (weights, gradients, two Adam moments: 16 bytes a parameter) is
    larger than this machine's memory: such a study fails hours later, in the first allocation."""
    import os

    from pipeline.study import StudyError

    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (not Linux): nothing to compare with
        return
    need = 16 * n_params
    if need > ram:
        shown = ", ".join(f"{k}={v}" for k, v in factors.items() if k in ("width", "depth", "embed"))
        raise StudyError(f"zoo {zoo!r}: a model ({shown or 'its config'}) has {n_params:,} parameters: its training state "
                         f"alone is {need / 1e9:,.0f} GB, more than this machine's {ram / 1e9:,.0f} GB of memory")


DATA_DIR_HELP = "folder with MNIST / Fashion-MNIST / CIFAR-10 files (overrides the study's data_dir; default: SYMZOO_DATA)"


@command("validate")
def validate_cmd(
    study_file: Path = typer.Argument(..., help="study YAML file"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
) -> None:
    """Check a study file: every key, value, task and architecture; exit code 2 listing the problems."""
    from zoos.spec import expand, populations

    from pipeline.runner import RunRefused, check_stored_zoos

    study = _load(study_file, data_dir=data_dir)
    try:
        stored = check_stored_zoos(study)
    except RunRefused as e:
        fail(str(e))
    table = Table("zoo", "task", "arch", "models", "populations", "epochs", box=None, header_style="bold")
    for zoo in study.zoos:
        if zoo.name in stored:  # found in the store: analysed, not trained
            found = stored[zoo.name]
            table.add_row(zoo.name, found["task"], found["arch"], f"{found['models']} stored ({found['ok']} ok)", "-", "-")
            continue
        models = expand(zoo, study.study)
        pops = "auto" if zoo.population_size == "auto" else str(len(populations(models, zoo.population_size)))
        table.add_row(zoo.name, zoo.task.name, zoo.arch.name, str(len(models)), pops, str(zoo.epochs))
    console.print(f"[green]ok[/]: {study_file} (study {study.study!r})")
    console.print(table)


@command("run")
def run_cmd(
    study_file: Path = typer.Argument(..., help="study YAML file"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join ('auto' or host:port); default: RAY_ADDRESS, else a local Ray"),
    store: Optional[str] = typer.Option(None, "--store", help="store path or URI (overrides the study's)"),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: sqlite:///symzoo.db here)"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    plain: bool = typer.Option(False, "--plain", help="plain progress lines even on a terminal"),
    report_json: Optional[Path] = typer.Option(None, "--report", help="also write what the run did as JSON here: "
                                               "placements of every population, phase times, MLflow time"),
    debug: bool = typer.Option(False, "--debug", help="on an error in a Ray task, print its whole traceback"),
) -> None:
    """Train the study's zoos (only what is missing), run its analysis stages, log to MLflow, summarise."""
    from pipeline.progress import Display
    from pipeline.report import print_summary
    from pipeline.runner import (TERMINATED, ResourceError, RunRefused, StageConfigError, TaskFailed, check_report_path,
                                 ignore_interrupts, run_study)
    from pipeline.tracking import TrackingError

    study = _load(study_file, store=store, tracking_uri=tracking_uri, data_dir=data_dir)
    try:
        if report_json is not None:  # before any work: a report that cannot be written fails now, not after it
            check_report_path(report_json)
        report = run_study(study, address=address, display=Display(plain=plain or None))
    except (RunRefused, TrackingError, StageConfigError, ResourceError) as e:
        fail(str(e))
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: one line, and what to do next
        ignore_interrupts()  # Ray's shutdown at exit must not be cut short by another
        what = "terminated (SIGTERM)" if TERMINATED.is_set() else "interrupted"
        typer.echo(f"{what}: every finished population and analysis chunk is stored and its MLflow run ended KILLED; "
                   f"`symzoo run {study_file}` again trains and analyses only what is missing", err=True)
        raise typer.Exit(143 if TERMINATED.is_set() else 130) from None
    except TaskFailed as e:  # an error inside a Ray task: its own one-line message, the traceback with --debug
        if debug:
            raise
        fail(f"{e.where}: {type(e.cause).__name__}: {first_line(e.cause)} (the traceback: symzoo run --debug)",
             code=2 if isinstance(e.cause, ValueError) else 1)  # a ValueError is an input the task refused
    # the report reads the zoos, output folder and MLflow from the study file, with this run's overrides
    again = str(study_file) + (f" --store {store}" if store is not None else "") + (
        f" --tracking-uri {tracking_uri}" if tracking_uri is not None else "")
    print_summary(console, study, report, report_args=again)
    if report_json is not None:  # whole or not at all: written beside it, then renamed into place
        part = report_json.with_name(f".{report_json.name}.part")
        try:
            report_json.parent.mkdir(parents=True, exist_ok=True)
            part.write_text(json.dumps(report.as_dict(), indent=2))
            part.replace(report_json)
        except OSError as e:
            part.unlink(missing_ok=True)
            fail(f"--report {str(report_json)!r} cannot be written: {e.strerror or e}")
