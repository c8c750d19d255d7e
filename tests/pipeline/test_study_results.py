"""Two studies on one store: each one's summary, stage runs and report are its own results (the items its
settings ask for, computed under those settings), never those another study computed for other settings or
other pairs; results both ask for are computed once. Real Ray, store, MLflow sqlite and `symzoo report`."""

import polars as pl
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import zoos
from pipeline.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]


def write(path, study):
    path.write_text(yaml.safe_dump(study))
    return path


def test_each_study_sees_its_own_results_in_a_shared_store(ray_local, tmp_path):
    store = str(tmp_path / "store")
    first = write(tmp_path / "first.yaml", {
        "study": "first", "store": store, "tracking_uri": f"sqlite:///{tmp_path / 'first.db'}",
        "output": str(tmp_path / "first"),
        "zoos": [{"name": "mlp", "task": {"name": "digits", "options": {"variant": "upright"}},
                  "arch": {"name": "mlp", "config": {"width": 16, "depth": 1}},
                  "grid": {"seed": [0, 1, 2, 3], "lr": [0.01], "optimizer": ["adam"]}, "epochs": 2}],
        "analysis": [{"stage": "interpolation", "pairs": 2, "lambdas": 5, "samples": 64},
                     {"stage": "equivariance", "samples": 32}]})
    r = CliRunner().invoke(app, ["run", str(first), "--plain"])
    assert r.exit_code == 0, r.output
    summary_first = pl.read_csv(tmp_path / "first" / "summary.csv")
    assert summary_first["pairs"].to_list() == [2] and summary_first["ok"].to_list() == [4]

    # the same zoo from the store: every pair (the two the first study computed are reused), and the equivariance
    # error on more samples (another result: computed anew, beside the first study's)
    second = write(tmp_path / "second.yaml", {
        "study": "second", "store": store, "tracking_uri": f"sqlite:///{tmp_path / 'second.db'}",
        "output": str(tmp_path / "second"), "zoos": [{"name": "mlp", "stored": True}],
        "analysis": [{"stage": "interpolation", "pairs": 0, "lambdas": 5, "samples": 64},
                     {"stage": "equivariance", "samples": 64}]})
    r = CliRunner().invoke(app, ["run", str(second), "--plain"])
    assert r.exit_code == 0, r.output
    assert "interpolation: 0/4" in r.output and "equivariance: 0/4" in r.output, r.output  # 4 of each to compute
    s = zoos.open(store)
    assert s.analysis("interpolation").collect().height == 6  # 2 + 4: the shared pairs once
    equi = s.analysis("equivariance").collect()
    assert equi.group_by("settings_id").len()["len"].to_list() == [4, 4]
    summary_second = pl.read_csv(tmp_path / "second" / "summary.csv")
    assert summary_second["pairs"].to_list() == [6]

    # the first study's report, after the second ran: its own two pairs and its 32-sample errors, as its run said
    r = CliRunner().invoke(app, ["report", str(first), "--no-log", "--out", str(tmp_path / "first-report")])
    assert r.exit_code == 0, r.output
    again = pl.read_csv(tmp_path / "first-report" / "summary.csv")
    assert again.select(summary_first.columns).equals(summary_first)
    page = (tmp_path / "first-report" / "report.html").read_text()
    assert "2 pairs, one row each" in page and "several settings" not in page

    # the stage runs' metrics are each study's summary numbers
    for name, summary in (("first", summary_first), ("second", summary_second)):
        client = MlflowClient(f"sqlite:///{tmp_path / (name + '.db')}")
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id], "tags.`symzoo.stage` = 'interpolation'")
        assert runs[0].data.metrics["mlp.pairs"] == summary["pairs"][0]
        assert runs[0].data.metrics["mlp.barrier_naive"] == pytest.approx(summary["barrier_naive"][0])

    # a report from the store alone shows every result of the zoo and says that they come from several settings
    r = CliRunner().invoke(app, ["report", store, "--study", "first", "--no-log", "--out", str(tmp_path / "all")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "all" / "report.html").read_text()
    assert "Results under several settings are shown together for equivariance (2)" in page
