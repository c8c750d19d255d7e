"""What a researcher finds in a real `mlflow server` after `symzoo run`, read through MLflow's REST API: every
run ended, model runs named by their factors and nested under their zoo, every epoch's metrics, stage
settings in their own columns, the experiment opening on its runs; a second run with nothing to do changes
nothing."""

import json
import urllib.parse
import urllib.request

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]


def api(server: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """GET (or POST with a JSON body) one endpoint of MLflow's REST API 2.0."""
    url = f"{server}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def runs(server: str, experiment_id: str) -> list[dict]:
    return api(server, "runs/search", {"experiment_ids": [experiment_id], "max_results": 1000}).get("runs", [])


def tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def study(tmp_path, server: str):
    spec = {
        "study": "srv", "store": str(tmp_path / "store"), "tracking_uri": server, "output": str(tmp_path / "out"),
        "zoos": [{"name": "mlp", "task": {"name": "digits", "options": {"n_train": 200, "n_val": 50, "n_test": 100}},
                  "arch": {"name": "mlp", "config": {"width": 8, "depth": 1}},
                  "grid": {"seed": [0, 1], "lr": [0.01, 0.03], "optimizer": ["adam"]}, "epochs": 3,
                  "checkpoints": [0, 3]}],
        "analysis": [{"stage": "interpolation", "pairs": 1, "lambdas": 3, "samples": 50},
                     {"stage": "equivariance", "samples": 32}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_runs_in_a_real_mlflow_server(ray_local, tmp_path, mlflow_server):
    path = study(tmp_path, mlflow_server)
    first = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert first.exit_code == 0, first.output
    exp = api(mlflow_server, "experiments/get-by-name", experiment_name="srv")["experiment"]
    # the printed link opens the runs (MLflow 3.17's UI would open a GenAI page without workflowType)
    assert "View run" not in first.output
    assert f"{mlflow_server}/#/experiments/{exp['experiment_id']}?workflowType=machine_learning" in first.output
    assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    found = runs(mlflow_server, exp["experiment_id"])
    by_kind: dict[str, list[dict]] = {}
    for r in found:
        by_kind.setdefault(tags(r)["symzoo.kind"], []).append(r)
    assert {k: len(v) for k, v in by_kind.items()} == {"study": 1, "zoo": 1, "model": 4, "stage": 2}
    assert {r["info"]["status"] for r in found} == {"FINISHED"} and all(r["info"].get("end_time") for r in found)
    (study_run,), (zoo_run,) = by_kind["study"], by_kind["zoo"]
    assert tags(zoo_run)["mlflow.parentRunId"] == study_run["info"]["run_id"]
    assert {m["key"]: m["value"] for m in zoo_run["data"]["params"]}["epochs"] == "3"
    assert sorted(r["info"]["run_name"] for r in by_kind["model"]) == [
        "mlp lr=0.01 seed=0", "mlp lr=0.01 seed=1", "mlp lr=0.03 seed=0", "mlp lr=0.03 seed=1"]
    assert {tags(r)["mlflow.parentRunId"] for r in by_kind["model"]} == {zoo_run["info"]["run_id"]}
    model = by_kind["model"][0]
    history = api(mlflow_server, "metrics/get-history", run_id=model["info"]["run_id"], metric_key="test_acc")["metrics"]
    assert sorted(m["step"] for m in history) == [0, 1, 2, 3]  # every epoch, not only the checkpoints 0 and 3
    stage_params = {p["key"] for r in by_kind["stage"] for p in r["data"]["params"]}
    assert "interpolation.pairs" in stage_params and "seed" not in stage_params
    study_metrics = {m["key"] for m in study_run["data"]["metrics"]}
    assert {"trained_models", "mlp.test_acc"} <= study_metrics
    artifacts = api(mlflow_server, "artifacts/list", run_id=study_run["info"]["run_id"], path="plots")
    names = {f["path"].rsplit("/", 1)[-1] for f in artifacts.get("files", [])}
    assert "summary.csv" in names and "barriers_aligned.png" not in names  # stage plots live on their stage runs

    again = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert again.exit_code == 0, again.output
    after = {r["info"]["run_id"]: r for r in runs(mlflow_server, exp["experiment_id"])}
    assert set(after) == {r["info"]["run_id"] for r in found}, "no new run"
    for r in found:  # nothing ended again, nothing rewritten
        now = after[r["info"]["run_id"]]
        assert (now["info"]["status"], now["info"]["end_time"]) == ("FINISHED", r["info"]["end_time"])
        assert now["data"].get("metrics") == r["data"].get("metrics")
