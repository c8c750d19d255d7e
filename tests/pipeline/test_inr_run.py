"""`symzoo run` on an INR zoo: per-image SIRENs trained through Ray, PSNR per checkpoint, and the
matching (interpolation) and equivariance stages running on the stored INRs."""

import math

import polars as pl
import pytest
import yaml
from typer.testing import CliRunner

import zoos
from pipeline.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]


def test_inr_study_trains_stores_psnr_and_runs_the_stages(ray_local, tmp_path):
    study = {
        "study": "inr-e2e", "store": str(tmp_path / "store"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "output": str(tmp_path / "out"),
        "zoos": [{"name": "siren", "task": {"name": "inr", "options": {"source": "digits"}},
                  "arch": {"name": "siren", "config": {"width": 16}},
                  "grid": {"image": {"range": [0, 6]}, "seed": [0, 1], "optimizer": ["adam"], "lr": [0.003]},
                  "epochs": 40, "checkpoints": [0, 20, 40]}],
        "analysis": [{"stage": "interpolation", "pairs": 3, "lambdas": 5, "samples": 64},
                     {"stage": "equivariance", "samples": 64}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    r = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert r.exit_code == 0, r.output

    store = zoos.open(study["store"])
    models = store.models().collect()
    assert models.height == 12 and set(models["status"]) == {"ok"}
    assert sorted(models["image"].unique().to_list()) == list(range(6)) and set(models["split"]) == {"train"}
    assert models["label"].dtype == pl.Int64 and models["test_psnr"].min() > 20
    ck = store.checkpoints().collect()
    psnr = ck.pivot(on="epoch", index="model_id", values="test_psnr")
    assert (psnr["40"] > psnr["0"] + 10).all()  # PSNR stored per checkpoint, and it rises

    interp = store.analysis("interpolation").collect()
    assert all(math.isfinite(v) for v in interp["barrier_loss_aligned"])
    image = dict(models.select("model_id", "image").iter_rows())
    pairs = [(image[a], image[b]) for a, b in interp.select("model_a", "model_b").iter_rows()]
    assert sorted(pairs) == [(i, i) for i in range(6)], "pairs are two seeds of one image: the path is judged on that image"
    equi = store.analysis("equivariance").collect()
    assert equi.height == 12 and set(equi["group"]) == {"C4(coords)"} and equi["equivariance_error"].min() > 0
    summary = pl.read_csv(tmp_path / "out" / "summary.csv")
    assert "test_psnr" in summary.columns and summary["test_psnr"][0] > 20
