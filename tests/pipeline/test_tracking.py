"""MLflow tracking against a real sqlite store: structure of runs, idempotence, clear errors."""

import socket

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking import MODEL_ID, Tracker, TrackingError


def _rows(n):
    return [{"model_id": f"m{i:03d}", "status": "ok" if i else "diverged", "seed": i, "lr": 0.01 * (i + 1),
             "arch": "mlp", "task": "digits", "n_params": 123} for i in range(n)]


def test_runs_are_nested_and_carry_checkpoint_metrics(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(uri, "study-a")
    t.connect()
    ckpt = {f"m{i:03d}": {"test_acc": [(0, 0.1), (5, 0.5 + i / 10)]} for i in range(3)}
    t.log_models("zoo1", _rows(3), ["seed", "lr"], ckpt)
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
    with pytest.raises(TrackingError, match=f"127.0.0.1:{port}"):
        t.connect()


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
    assert sorted(r.data.params["pairs"] for r in stages) == ["4", "8"]
