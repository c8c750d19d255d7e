"""Faults under a running study on the shared local Ray: a killed worker, a killed driver, diverging models.

Each test injects the fault for real (SIGKILL of a process this test started, an lr that overflows) and
then checks the store (every model exactly once, every checkpoint, no stray file) and MLflow (one
finished run per model).
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

import zoos
from pipeline.cli import app
from pipeline.progress import Display
from pipeline.runner import run_study
from pipeline.study import load_study
from tests.reliability.faults import (assert_logged_once, assert_store_whole, cmdline, descendants, expected_models,
                                      exposed_listeners, mlp_zoo, model_runs, outlivers, wait_for_process, wait_until,
                                      write_study)
from zoos.spec import expand, populations

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]


def test_killed_worker_is_retried_and_loses_nothing(ray_local, tmp_path):
    # 400 epochs: seconds of training even on an idle machine, so the kill lands mid-training
    path, _ = write_study(tmp_path, "killworker", [mlp_zoo("slow", [0, 1, 2], [0.01], epochs=400, checkpoints=[0, 200, 400])])
    study = load_study(path)
    shard = populations(expand(study.zoos[0], study.study))[0].shard
    out: dict = {}
    driver = threading.Thread(target=lambda: out.update(report=run_study(study, display=Display(plain=True))))
    driver.start()
    try:
        pid = wait_for_process(os.getpid(), f"train:slow:{shard}")
        time.sleep(0.5)  # into the training loop
        assert not (tmp_path / "store" / "manifest" / "slow" / f"{shard}.json").exists(), "killed before its shard was written"
        os.kill(pid, signal.SIGKILL)
    finally:
        driver.join(300)  # never leave a driver running into the next test or the session's ray.shutdown()
    assert not driver.is_alive() and "report" in out, "the study finished after the retry"
    assert not os.path.exists(f"/proc/{pid}") or "train:" not in Path(f"/proc/{pid}/cmdline").read_text()
    expected = expected_models(study)
    assert out["report"].trained_models == len(expected) == 3
    assert_store_whole(study.store, expected)
    assert_logged_once(study, expected)


def test_diverging_models_do_not_touch_the_others(ray_local, tmp_path):
    zoo = mlp_zoo("z", [0, 1], [0.05, 1e30], epochs=2, checkpoints=[0, 1, 2])
    reports = {}
    for name, lrs in (("with", [0.05, 1e30]), ("without", [0.05])):
        (tmp_path / name).mkdir()
        path, _ = write_study(tmp_path / name, "diverge", [{**zoo, "grid": {**zoo["grid"], "lr": lrs}}])
        reports[name] = run_study(load_study(path), display=Display(plain=True))
    assert reports["with"].trained_models == 4 and reports["without"].trained_models == 2
    with_bad, without = zoos.open(str(tmp_path / "with" / "store")), zoos.open(str(tmp_path / "without" / "store"))
    status = dict(with_bad.models().select("lr", "status").unique().collect().iter_rows())
    assert status == {0.05: "ok", 1e30: "diverged"}
    ok = sorted(without.models().collect()["model_id"])
    assert sorted(with_bad.models().filter(pl.col("status") == "ok").collect()["model_id"]) == ok  # same ids
    a = with_bad.checkpoints(columns="all").filter(pl.col("model_id").is_in(ok)).sort("model_id", "epoch").collect()
    b = without.checkpoints(columns="all").sort("model_id", "epoch").collect()
    assert a.height == b.height == 2 * 3
    for col in b.columns:  # every weight tensor and metric at every checkpoint, bit for bit
        x, y = a[col].to_numpy(), b[col].to_numpy()
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), col
    runs = model_runs(f"sqlite:///{tmp_path / 'with' / 'mlflow.db'}", "diverge")
    assert sorted(r.data.tags["status"] for r in runs) == ["diverged", "diverged", "ok", "ok"]


def test_killed_driver_resumes_without_duplicates_and_logs_what_it_stored(ray_local, tmp_path):
    path, _ = write_study(tmp_path, "killdriver", [
        mlp_zoo("fast", [0, 1, 2, 3, 4, 5], [0.01], epochs=1),
        mlp_zoo("slow", [0, 1, 2, 3], [0.01], epochs=80, population_size=2)])  # ~16 s a population: running at the kill
    study = load_study(path)
    manifests = tmp_path / "store" / "manifest"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    symzoo = str(Path(sys.executable).parent / "symzoo")
    proc = subprocess.Popen([symzoo, "run", str(path), "--plain"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: any(manifests.rglob("*.json")) or proc.poll() is not None, timeout=90, every=0.002,
                   what="the first shard")
        assert proc.poll() is None, f"symzoo run ended early: {proc.stderr.read().decode()[-2000:]}"
        started = descendants(proc.pid)  # its Ray: gcs, raylet, workers, agents, and symzoo's reaper
        proc.send_signal(signal.SIGKILL)  # the driver dies between storing a shard and logging its models
        proc.wait(10)
    finally:
        proc.kill()
    leftover = outlivers(started)

    store = zoos.open(study.store)
    stored = store.stored_ids()
    manifests_before = {m["shard"]: m["written"] for m in store.manifests()}
    logged = {r.data.tags["symzoo.model_id"] for r in model_runs(study.tracking_uri, study.study)
              if r.info.status == "FINISHED"}
    expected = expected_models(study)
    assert stored and stored != set(expected), "killed mid-study"
    assert stored - logged, "some models were stored but not logged when the driver died"

    r = CliRunner().invoke(app, ["run", str(path), "--plain"])  # the same command again
    assert r.exit_code == 0, r.output
    assert f"{len(expected) - len(stored)} models to train" in r.output, "only the missing populations train"
    assert {m["shard"]: m["written"] for m in store.manifests() if m["shard"] in manifests_before} == manifests_before
    assert_store_whole(study.store, expected)
    assert_logged_once(study, expected)
    assert not leftover, f"Ray processes outlived their killed driver: {leftover}"


_SIGINT_AT_DEFAULT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                      "os.execv(sys.argv[1], sys.argv[1:])")  # then the command in argv, Ctrl-C at its default


@pytest.mark.parametrize("sig, times, code, says", [(signal.SIGINT, 1, 130, "interrupted: "),
                                                   (signal.SIGINT, 2, 130, "interrupted: "),
                                                   (signal.SIGTERM, 1, 143, "terminated (SIGTERM): ")])
def test_a_stopped_run_says_so_ends_its_runs_killed_and_the_next_run_finishes_them(ray_local, tmp_path, sig, times,
                                                                                      code, says):
    """Ctrl-C (once, or again while it stops) or SIGTERM during training: one line saying so and how to go on (no
    traceback, no Ray crash dump), exit 130 / 143, no MLflow run left RUNNING; the same command again trains what is
    missing and ends every zoo run FINISHED, with a run for the analysis stage. (Each signal ends in the same
    interrupt, so the next run is checked once: after the double Ctrl-C, the stop most disturbed.)"""
    from mlflow.tracking import MlflowClient

    path, study = write_study(tmp_path, "stopped", [
        mlp_zoo("fast", [0, 1], [0.01], epochs=1),
        mlp_zoo("slow", [0, 1, 2, 3], [0.01], epochs=80, population_size=2)],
        analysis=[{"stage": "equivariance", "samples": 32}])
    manifests = tmp_path / "store" / "manifest"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # started as a terminal starts a foreground job, Ctrl-C at its default: an ignored SIGINT is inherited (the
    # suite run as a shell's background job), and Python then raises no KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-c", _SIGINT_AT_DEFAULT, str(Path(sys.executable).parent / "symzoo"),
                             "run", str(path), "--plain"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        wait_until(lambda: any(manifests.rglob("*.json")) or proc.poll() is not None, timeout=90, every=0.01,
                   what="the first shard")
        assert proc.poll() is None, "symzoo run ended before the signal"
        started = descendants(proc.pid)
        for _ in range(times):
            proc.send_signal(sig)
            time.sleep(0.7)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    out, err = out.decode(), err.decode()
    assert proc.returncode == code, (proc.returncode, out[-2000:], err[-2000:])
    assert says in err and "symzoo run" in err.split(says)[1].splitlines()[0], err[-1500:]  # one line, on stderr
    assert "Traceback" not in out + err and "*** SIGTERM received" not in err and "Segmentation" not in err, err[-2000:]
    client = MlflowClient(study["tracking_uri"])
    exp = client.get_experiment_by_name("stopped")
    statuses = {r.data.tags["symzoo.kind"] + ":" + r.info.status for r in client.search_runs([exp.experiment_id])}
    assert "study:KILLED" in statuses and not any(s.endswith(":RUNNING") for s in statuses), statuses
    assert not outlivers(started), "Ray processes outlived the stopped run"
    if times == 1:
        return

    r = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert r.exit_code == 0, r.output
    runs = client.search_runs([exp.experiment_id], "tags.`symzoo.kind` != 'model'")
    kinds = sorted((r.data.tags["symzoo.kind"], r.info.status) for r in runs)
    assert kinds == [("stage", "FINISHED"), ("study", "FINISHED"), ("zoo", "FINISHED"), ("zoo", "FINISHED")], kinds
    assert_store_whole(study["store"], expected_models(load_study(path)))


def test_a_local_run_listens_on_loopback_only_and_dies_with_its_driver(tmp_path):
    """A local `symzoo run` left Ray's gcs, raylet, workers and dashboard agent listening on all interfaces, and a
    SIGKILLed driver left the dashboard and runtime-env agents running under PID 1, still listening."""
    path, _ = write_study(tmp_path, "loopback", [mlp_zoo("slow", [0, 1], [0.01], epochs=300)])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "symzoo"), "run", str(path), "--plain"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_process(proc.pid, "train:slow:", timeout=120)  # Ray is up and a worker trains
        started = descendants(proc.pid)
        names = " ".join(cmdline(p) for p in started)
        exposed = exposed_listeners(started)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    leftover = outlivers(started)
    assert all(n in names for n in ("gcs_server", "raylet", "DashboardAgent", "pipeline.localray")), names
    assert not exposed, f"a local run's Ray listened beyond loopback: {exposed}"
    assert not leftover, f"Ray processes outlived their killed driver: {leftover}"


def test_a_study_whose_models_all_diverge_finishes_and_says_so(ray_local, tmp_path):
    """Every stage, plot and the summary cope with zero usable models (this crashed in plots.py, on every re-run)."""
    import yaml
    from typer.testing import CliRunner

    from pipeline.cli import app

    study = {"study": "alldiv", "store": str(tmp_path / "store"), "tracking_uri": f"sqlite:///{tmp_path / 'm.db'}",
             "output": str(tmp_path / "out"),
             "zoos": [{"name": "m", "task": {"name": "digits", "options": {"n_train": 64, "n_val": 32, "n_test": 32}},
                       "arch": {"name": "cnn", "config": {"width": 4, "depth": 2}}, "grid": {"seed": [0, 1], "lr": [1e4]},
                       "epochs": 2}],
             "analysis": [{"stage": s} for s in ("interpolation", "equivariance", "weightspace", "landscape", "lie",
                                                 "similarity", "funcdim", "bezier")]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    for _ in range(2):  # and again
        r = CliRunner().invoke(app, ["run", str(path), "--plain"])
        assert r.exit_code == 0, r.output
        diverged = next(line for line in r.output.splitlines() if line.startswith("│ diverged"))
        assert diverged.split("│")[2].strip() == "2"


def test_a_second_run_of_the_same_study_is_refused_naming_the_first(ray_local, tmp_path):
    """Two `symzoo run` of one study at once both trained everything and one crashed on the other's MLflow runs.
    Now the second is refused (exit 2) naming the process that holds the study; a lock whose process is gone is
    taken over."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    path, study = write_study(tmp_path, "twice", [mlp_zoo("slow", [0, 1], [0.01], epochs=60)])  # ~12 s: held while refused
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    first = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(path), "--plain"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    lock = tmp_path / "store" / ".locks" / "twice.json"
    try:
        deadline = time.monotonic() + 120
        while not lock.exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert lock.exists(), "the first run holds the study"
        second = CliRunner().invoke(app, ["run", str(path), "--plain"])
        assert second.exit_code == 2, second.output
        assert f"by process {first.pid} on" in second.output and "Traceback" not in second.output
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the holder dies without releasing its lock
        first.wait(60)
    assert lock.exists()
    again = CliRunner().invoke(app, ["run", str(path), "--plain"])  # a dead holder's lock is stale: taken over
    assert again.exit_code == 0, again.output
    assert not lock.exists(), "released at the end"
