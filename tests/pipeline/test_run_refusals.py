"""`symzoo run` refusals through the CLI: each exits 2 with one stderr line naming the option and its value, checked
before anything is created (MLflow file, experiment or run, store, lock, output folder); a run that fails after it
created them ends its MLflow runs FAILED and removes the folders it made and left empty."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from pipeline.cli import app

REPO = Path(__file__).resolve().parents[2]


def tree(root: Path) -> list[str]:
    """Every file and folder under `root`, relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def study_file(tmp_path: Path, **changes) -> Path:
    """A one-model study (store and output relative to the working directory, MLflow at its default ./symzoo.db)."""
    study = {"study": "tiny", "store": "tiny-store",
             "zoos": [{"name": "z", "task": {"name": "digits", "options": {"n_train": 64, "n_val": 32, "n_test": 32}},
                       "arch": {"name": "mlp", "config": {"width": 4, "depth": 1}}, "grid": {"seed": [0]}, "epochs": 1}],
             **changes}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.fixture
def here(tmp_path, monkeypatch):
    """tmp_path as the working directory, holding a file `afile` and a folder `adir` of the user's."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("the user's")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "kept").write_text("the user's")
    return tmp_path


def refused(tmp_path: Path, args: list[str], *says: str) -> None:
    """`symzoo run ARGS` exits 2 with one stderr line holding each of `says`, before Ray starts, creating nothing."""
    before = tree(tmp_path)
    r = CliRunner().invoke(app, ["run", *args, "--plain"])
    assert r.exit_code == 2, r.output
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    for text in says:
        assert text in r.stderr, (text, r.stderr)
    assert "starting Ray" not in r.output and "Traceback" not in r.output
    assert tree(tmp_path) == before, "a refused run leaves nothing behind (no symzoo.db, store, lock or runs/)"


@pytest.mark.parametrize("report, says", [
    ("adir", "it is a folder, not a file"),
    ("afile/x.json", "afile' is a file, not a folder"),
])
def test_a_report_path_that_cannot_be_written_is_refused_before_any_work(here, report, says):
    refused(here, [str(study_file(here)), "--report", report], f"--report '{report}'", says)


@pytest.mark.parametrize("store, says", [
    ("foo://x", "Unrecognized filesystem type"),
    ("afile", "it is a file, not a folder"),
    ("afile/store", "afile' is a file, not a folder"),
    ("adir", "is a folder of other files, not a symzoo store (no symzoo-store.json)"),
])
def test_an_unusable_store_is_refused_before_mlflow_and_the_store_are_touched(here, store, says):
    refused(here, [str(study_file(here)), "--store", store], f"'{store}'", "--store", says)


def test_a_tracking_file_under_a_file_is_refused_before_anything_is_made(here):
    refused(here, [str(study_file(here)), "--tracking-uri", "sqlite:///afile/m.db"], "afile/m.db", "--tracking-uri",
            "is a file, not a folder")


def test_a_stored_zoo_in_a_store_that_does_not_exist_is_refused(here):
    path = study_file(here, study="st", store="nostore", zoos=[{"name": "x", "stored": True}])
    refused(here, [str(path)], "zoo 'x' is named stored: true", "no symzoo store at 'nostore'", "--store")


def test_a_study_another_live_run_holds_is_refused_and_its_lock_kept(here):
    import json
    import socket

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = here / "tiny-store" / ".locks" / "tiny.json"
        lock.parent.mkdir(parents=True)
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "started": 0, "heartbeat": 0}))
        refused(here, [str(study_file(here))], "study 'tiny' is being run", f"by process {holder.pid}")
        assert json.loads(lock.read_text())["pid"] == holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_resources_a_local_ray_cannot_have_are_refused_before_ray_starts(tmp_path):
    """Measured in its own process (no Ray up yet): the user's stderr is the one error line, no Ray banner."""
    path = study_file(tmp_path, resources={"num_cpus": 1, "num_gpus": 64})
    before = tree(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-m", "pipeline", "run", str(path), "--plain"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [out.stderr.strip()] and "num_gpus=64" in out.stderr, out.stderr
    assert "a local Ray would start" in out.stderr and "resources" in out.stderr
    assert tree(tmp_path) == before


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_a_run_failing_after_it_started_ends_its_mlflow_runs_failed_and_removes_what_it_made_empty(ray_local, here):
    """A training task that raises: the store folder (with its lock folder) and output folder this run made are gone,
    the --report file is not written, and every MLflow run of the study is FAILED, none RUNNING."""
    path = study_file(here, study="raises", store="new/store", output="new/out",
                      zoos=[{"name": "o5", "task": {"name": "o5_regression", "options": {"n_train": 32, "n_val": 8,
                                                                                         "n_test": 8}},
                             "arch": {"name": "mlp", "config": {"width": 4, "depth": 1}},
                             "grid": {"seed": [0], "equiv_reg": [0.1]}, "epochs": 1}])
    before = tree(here)
    r = CliRunner().invoke(app, ["run", str(path), "--plain", "--report", "rep/x.json"])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training zoo 'o5'" in errors[0], r.stderr
    assert not (here / "new").exists() and not (here / "rep").exists()
    assert set(tree(here)) - set(before) <= {"symzoo.db", "symzoo.db-wal", "symzoo.db-shm", "mlruns"}, tree(here)
    client = MlflowClient(f"sqlite:///{here / 'symzoo.db'}")
    exp = client.get_experiment_by_name("raises")
    assert {run.info.status for run in client.search_runs([exp.experiment_id])} == {"FAILED"}


def test_epochs_a_stored_zoo_does_not_hold_are_refused_before_anything(here):
    """`symzoo validate` and `symzoo run` check a stage's epochs against a stored zoo's checkpoints before anything
    is created (the run used to fail after opening its MLflow runs)."""
    from tests.zoos.test_store import make_pop
    from zoos.store import Store

    Store(str(here / "st")).write_population(make_pop("zA", [0, 2, 3], seed=1))
    path = study_file(here, store="st", zoos=[{"name": "zA", "stored": True}],
                      analysis=[{"stage": "interpolation", "epochs": [4]}])
    says = "analysis[0].epochs: [4] not stored for zoo 'zA'; its checkpoints are at epochs ["
    refused(here, [str(path)], says)
    r = CliRunner().invoke(app, ["validate", str(path)])
    assert r.exit_code == 2 and says in r.output, r.output
