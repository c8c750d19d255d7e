"""Connectivity stages end to end through `symzoo run`: interpolation at every checkpoint, across two
zoos of one architecture, and Bezier curves, with real Ray, store and MLflow."""

import polars as pl
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import zoos
from pipeline.cli import app
from pipeline.stages.interpolation import pick_epochs

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

MLP = {"name": "mlp", "config": {"width": 16, "depth": 1}}
DIGITS = {"name": "digits", "options": {"variant": "upright"}}


def write_study(tmp_path):
    study = {
        "study": "connect",
        "store": str(tmp_path / "store"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "output": str(tmp_path / "out"),
        "zoos": [
            {"name": "slow", "task": DIGITS, "arch": MLP, "grid": {"seed": [0, 1, 2], "lr": [0.01], "optimizer": ["adam"]},
             "epochs": 2, "checkpoints": [0, 1, 2]},
            {"name": "fast", "task": DIGITS, "arch": MLP, "grid": {"seed": [3, 4], "lr": [0.05], "optimizer": ["adam"]},
             "epochs": 2, "checkpoints": [0, 2]},
        ],
        "analysis": [
            {"stage": "interpolation", "zoos": ["slow"], "pairs": 2, "lambdas": 5, "samples": 300, "epochs": "all"},
            {"stage": "interpolation_cross", "pairs": 3, "lambdas": 5, "samples": 300},
            {"stage": "bezier", "zoos": ["slow"], "pairs": 1, "lambdas": 5, "steps": 40, "lr": 0.05, "align": False},
        ],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path, study


def test_connectivity_stages_store_one_row_per_pair_and_epoch(ray_local, tmp_path):
    path, study = write_study(tmp_path)
    r = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert r.exit_code == 0, r.output
    store = zoos.open(study["store"])
    ids = {z: set(store.models(z).collect()["model_id"]) for z in ("slow", "fast")}
    ck = store.checkpoints().select("model_id", "epoch", "test_loss").collect()
    stored_loss = {(m, e): v for m, e, v in ck.iter_rows()}

    # the same 2 pairs at each of the 3 stored epochs; the λ = 0 / 1 ends are the stored checkpoints
    interp = store.analysis("interpolation").collect()
    assert interp.height == 6 and interp.select("model_a", "model_b", "epoch").n_unique() == 6
    assert interp.group_by("model_a", "model_b").agg(pl.col("epoch").sort()).get_column("epoch").to_list() == [[0, 1, 2]] * 2
    for row in interp.iter_rows(named=True):
        assert row["test_loss_naive"][0] == pytest.approx(stored_loss[(row["model_a"], row["epoch"])], rel=1e-4)
        assert row["test_loss_naive"][-1] == pytest.approx(stored_loss[(row["model_b"], row["epoch"])], rel=1e-4)
        assert row["test_loss_aligned"][-1] == pytest.approx(row["test_loss_naive"][-1], rel=1e-4)  # b permuted = b
    ends = interp.group_by("model_a", "model_b").agg(pl.col("test_loss_naive").list.first().n_unique())
    assert ends["test_loss_naive"].to_list() == [3, 3]  # each epoch's own weights, not one checkpoint repeated

    # cross-zoo pairs: model_a from `slow`, model_b from `fast`, at each model's last epoch
    cross = store.analysis("interpolation_cross").collect()
    assert cross.height == 3 and set(cross["zoo"]) == {"slow"} and set(cross["zoo_b"]) == {"fast"}
    assert set(cross["model_a"]) <= ids["slow"] and set(cross["model_b"]) <= ids["fast"]
    for row in cross.iter_rows(named=True):
        assert row["epoch"] == 2
        assert row["test_loss_aligned"][-1] == pytest.approx(stored_loss[(row["model_b"], 2)], rel=1e-4)

    # a Bezier curve keeps the endpoints and, trained, goes below the straight line in the middle
    bez = store.analysis("bezier").collect()
    assert bez.height == 1
    row = bez.row(0, named=True)
    assert row["test_loss_bezier"][0] == pytest.approx(row["test_loss_linear"][0], rel=1e-5)
    assert row["test_loss_bezier"][-1] == pytest.approx(row["test_loss_linear"][-1], rel=1e-5)
    assert row["barrier_loss_bezier"] < row["barrier_loss_linear"]

    out = tmp_path / "out"
    for png in ("barrier_vs_epoch.png", "barriers_naive_aligned.png", "barriers_aligned.png", "cross_barriers_aligned.png",
                "bezier_loss.png"):  # 2 pairs of 3 models: dense enough for their matrix too
        assert (out / png).stat().st_size > 0, png
    client = MlflowClient(study["tracking_uri"])
    exp = client.get_experiment_by_name("connect")
    runs = client.search_runs([exp.experiment_id], "tags.`symzoo.kind` = 'stage'")
    assert {r.data.tags["symzoo.stage"] for r in runs} == {"interpolation", "interpolation_cross", "bezier"}
    metrics = {k for r in runs for k in r.data.metrics}
    assert {"slow.barrier_aligned", "slow.cross_barrier_aligned", "slow.bezier_barrier"} <= metrics

    again = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert again.exit_code == 0, again.output
    assert [store.analysis(s).collect().height for s in ("interpolation", "interpolation_cross", "bezier")] == [6, 3, 1]


def test_epoch_not_stored_is_refused_by_name_before_training(tmp_path):
    """A pair stage's epochs list names checkpoints every zoo must store: a study asking for one its zoo does
    not keep is refused as it is read, in one line (exit 2), before anything is trained or written."""
    path, study = write_study(tmp_path)
    study["analysis"] = [{"stage": "interpolation", "zoos": ["fast"], "epochs": [1]}]
    path.write_text(yaml.safe_dump(study))
    r = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert r.exit_code == 2, r.output
    assert "analysis[0].epochs: [1] not stored for zoo 'fast'; its checkpoints are [0, 2]" in r.output
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_stored_zoo_lacking_an_epoch_is_refused_when_the_stage_runs():
    """A zoo already in the store (imported) has no declared checkpoints to check as the study is read: the
    stage refuses the missing epoch by name when it plans."""
    assert pick_epochs([0, 2, 5], [5, 0], "zoo 'z'") == [0, 5]
    assert pick_epochs([0, 2, 5], "last", "zoo 'z'") == [5] and pick_epochs([0, 2], "all", "zoo 'z'") == [0, 2]
    with pytest.raises(ValueError, match=r"epochs: \[1\] not stored for zoo 'z'; stored epochs: \[0, 2\]"):
        pick_epochs([0, 2], [1, 2], "zoo 'z'")
