"""MLflow tracking against a real sqlite store: structure of runs, idempotence, clear errors."""

import socket

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import MODEL_ID, Tracker, TrackingError, mlflow_cause


def _rows(n):
    return [{"model_id": f"m{i:03d}", "status": "ok" if i else "diverged", "seed": i, "lr": 0.01 * (i + 1),
             "arch": "mlp", "task": "digits", "n_params": 123} for i in range(n)]


def test_runs_are_nested_and_carry_every_epoch(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(uri, "study-a")
    t.connect()
    ckpt = {f"m{i:03d}": {"test_acc": [(0, 0.1), (5, 0.5 + i / 10)]} for i in range(3)}
    t.log_models("zoo1", _rows(3), ["seed", "lr"], ckpt, varying=["lr", "seed"])
    t.finish()

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("study-a")
    runs = client.search_runs([exp.experiment_id], "tags.`symzoo.kind` = 'model'")
    assert sorted(r.data.tags[MODEL_ID] for r in runs) == ["m000", "m001", "m002"]
    zoo_run = client.search_runs([exp.experiment_id], "tags.`symzoo.kind` = 'zoo'")[0]
    study_run = client.search_runs([exp.experiment_id], "tags.`symzoo.kind` = 'study'")[0]
    assert zoo_run.data.tags["mlflow.parentRunId"] == study_run.info.run_id
    r1 = next(r for r in runs if r.data.tags[MODEL_ID] == "m001")
    assert r1.data.tags["mlflow.parentRunId"] == zoo_run.info.run_id
    assert r1.data.params["lr"] == "0.02" and r1.data.tags["status"] == "ok"
    assert r1.info.run_name == "zoo1 lr=0.02 seed=1"  # named by what varies in the zoo
    assert client.get_experiment(exp.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    history = client.get_metric_history(r1.info.run_id, "test_acc")
    assert [(m.step, m.value) for m in history] == [(0, 0.1), (5, pytest.approx(0.6))]
    assert t.seconds > 0 and t.calls > 0


def test_reconnecting_finds_the_same_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(uri, "s")
    first.connect()
    first.log_models("z", _rows(2), ["seed"], {})
    again = Tracker(uri, "s")
    again.connect()
    assert again.study_run_id == first.study_run_id
    assert again.zoo_run("z") == first.zoo_run("z")
    assert again.logged_models() == {"m000", "m001"}


def test_unreachable_server_is_a_clear_error():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = Tracker(f"http://127.0.0.1:{port}", "s")
    with pytest.raises(TrackingError, match=f"127.0.0.1:{port}") as e:
        t.connect()
    assert e.value.cause and "\n" not in e.value.cause and e.value.cause in str(e.value)  # MLflow's own words, one line
    assert e.value.cause.startswith("MlflowException: ") and "TrackingError" not in str(e.value)  # not wrapped twice
    assert str(e.value).startswith(f"cannot use the MLflow tracking URI 'http://127.0.0.1:{port}': MlflowException")


def test_mlflow_cause_is_one_line_cut_between_words():
    page = "<html><body>" + " ".join(f"word{i}" for i in range(100)) + "</body>\n<p>more</p></html>"
    cut = mlflow_cause(ConnectionError(page), limit=60)
    assert cut.startswith("ConnectionError: <html><body>word0 ") and cut.endswith(" [...]") and len(cut) <= 66
    assert cut[:-6].split()[-1] in page.split()  # no word cut in two
    assert mlflow_cause(OSError("\n  disk I/O error  \nat line 3")) == "OSError: disk I/O error"
    assert mlflow_cause(TimeoutError()) == "TimeoutError"


def test_changed_study_and_stage_settings_can_be_logged_again(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for epochs, pairs in [(2, 4), (3, 8)]:  # the user edits the study file and runs it again
        t = Tracker(uri, "s")
        t.connect()
        t.log_study({"zoos": ["a"], "epochs": epochs})
        t.zoo_run("a", config={"models": epochs * 10})
        t.log_stage("interpolation", {"a.barrier": 0.5}, params={"pairs": pairs})
        t.finish()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("s")
    study = client.search_runs([exp.experiment_id], "tags.`symzoo.kind` = 'study'")
    assert len(study) == 1 and study[0].data.tags["config.epochs"] == "3"
    stages = client.search_runs([exp.experiment_id], "tags.`symzoo.kind` = 'stage'")
    assert sorted(r.data.params["interpolation.pairs"] for r in stages) == ["4", "8"]  # a stage's own columns
    assert {r.info.status for r in stages} == {"FINISHED"}
    # the run of the settings the study asked for last is the current one; the earlier settings' is marked so
    assert {r.data.params["interpolation.pairs"]: r.data.tags["symzoo.current"] for r in stages} == {"4": "false", "8": "true"}


def _runs(uri, study, kind):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], f"tags.`symzoo.kind` = '{kind}'")


def test_a_run_with_nothing_to_do_rewrites_nothing_and_a_later_one_adds_a_step(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(uri, "s")
    first.connect()
    first.zoo_run("a", config={"task": "digits", "epochs": 2})
    first.begin_work()
    first.log_summary({"trained_models": 6.0})
    first.finish()
    (before,) = _runs(uri, "s", "study")
    noop = Tracker(uri, "s")
    noop.connect()
    noop.zoo_run("a", config={"task": "digits", "epochs": 2})
    noop.finish()
    (after,) = _runs(uri, "s", "study")
    assert (after.info.status, after.info.end_time, after.data.metrics) == ("FINISHED", before.info.end_time, {"trained_models": 6.0})
    (zoo,) = _runs(uri, "s", "zoo")
    assert zoo.data.params == {"task": "digits", "epochs": "2"} and zoo.info.status == "FINISHED"
    more = Tracker(uri, "s")
    more.connect()
    more.begin_work()
    more.log_summary({"trained_models": 2.0})
    more.finish()
    history = MlflowClient(uri).get_metric_history(after.info.run_id, "trained_models")
    assert [(m.step, m.value) for m in history] == [(0, 6.0), (1, 2.0)]  # the first run's value stays


def test_runs_of_a_failed_or_killed_driver_end_failed_or_killed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(uri, "s")
    t.connect()
    t.begin_work()
    t.zoo_run("a")
    t.create_model_runs("a", {"m000": "a seed=0"})
    t.abort("FAILED")  # what run_study does when its work raises
    assert {r.info.status for r in _runs(uri, "s", "study") + _runs(uri, "s", "zoo") + _runs(uri, "s", "model")} == {"FAILED"}
    dying = Tracker(uri, "s")
    dying.connect()
    dying.begin_work()  # ... and the driver is killed here: the study run stays RUNNING
    assert _runs(uri, "s", "study")[0].info.status == "RUNNING"
    later = Tracker(uri, "s")
    later.connect()
    assert later.killed == 1 and _runs(uri, "s", "study")[0].info.status == "KILLED"


def test_artifacts_of_a_sqlite_store_go_beside_its_file(tmp_path, monkeypatch):
    """Not into the folder the process runs in (MLflow's ./mlruns default, which tests and users then find there)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "db").mkdir()
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    t = Tracker(uri, "s")
    t.connect()
    plot = tmp_path / "plot.png"
    plot.write_bytes(b"png")
    t.log_artifacts(t.study_run_id, [plot])
    t.finish()
    assert (tmp_path / "db" / "mlruns" / "s").is_dir() and not (tmp_path / "mlruns").exists()
    assert [p.name for p in (tmp_path / "db" / "mlruns" / "s").rglob("*.png")] == ["plot.png"]


def test_a_database_deleted_during_the_run_is_said_to_be_gone(tmp_path):
    """The run held the sqlite file open: MLflow's writes went to the deleted file without an error (exit 0 with
    every log lost). The end of the run now says so."""
    db = tmp_path / "mlflow.db"
    t = Tracker(f"sqlite:///{db}", "s")
    t.connect()
    t.begin_work()
    db.unlink()
    with pytest.raises(TrackingError, match="was deleted during the run"):
        t.finish()


def test_a_failing_tracking_store_is_one_tracking_error_naming_it(tmp_path):
    t = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "s")
    t.connect()
    t._client.log_batch = lambda *a, **k: (_ for _ in ()).throw(OSError("disk I/O error"))  # the store fails mid-run
    with pytest.raises(TrackingError, match=r"MLflow at 'sqlite:///.*m.db' failed during the run: OSError: disk I/O error"):
        t.log_summary({"x": 1.0})
