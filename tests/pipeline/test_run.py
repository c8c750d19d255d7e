"""`symzoo run` end to end through the CLI, with a real local Ray, a real store and a real MLflow sqlite file."""

import json

import polars as pl
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import zoos
from pipeline.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]


def tiny_study(tmp_path, name="e2e"):
    study = {
        "study": name,
        "store": str(tmp_path / "store"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "output": str(tmp_path / "out"),
        "zoos": [
            {"name": "mlp", "task": {"name": "digits", "options": {"variant": "rotated"}},
             "arch": {"name": "mlp", "config": {"width": 16, "depth": 1}},
             "grid": {"seed": [0, 1, 2], "lr": [0.01, 0.03], "optimizer": ["adam"]},
             "epochs": 2, "checkpoints": [0, 1, 2]},
            {"name": "p4", "task": {"name": "digits", "options": {"variant": "rotated"}},
             "arch": {"name": "p4cnn", "config": {"width": 4, "depth": 1}},
             "grid": {"seed": [0, 1], "optimizer": ["adam"], "lr": [0.01]}, "epochs": 1},
        ],
        "analysis": [{"stage": "interpolation", "pairs": 2, "lambdas": 5, "samples": 128},
                     {"stage": "equivariance", "samples": 64}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path, study


def test_run_trains_analyses_logs_and_a_second_run_does_nothing(ray_local, tmp_path):
    path, study = tiny_study(tmp_path)
    r = CliRunner().invoke(app, ["run", str(path), "--plain", "--report", str(tmp_path / "run.json")])
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "run.json").read_text())
    assert (run["study"], run["store"], run["trained_models"]) == ("e2e", study["store"], 8) and run["written"]
    assert {p["zoo"] for p in run["placements"]} == {"mlp", "p4"}
    for p in run["placements"]:  # where and when each population ran, and the program that trained it
        assert p["host"] and p["node"] and p["finished"] >= p["started"] and p["program"]["summary"]
    assert set(run["phase_s"]) == {"train", "interpolation", "equivariance"}
    assert "zoo mlp varies lr: its column pools every level; each model's numbers are in the models table" in r.output
    assert "zoo p4 varies" not in r.output

    store = zoos.open(study["store"])
    models = store.models().collect()
    assert models.group_by("zoo").len().sort("zoo").rows() == [("mlp", 6), ("p4", 2)]
    assert set(models["status"]) == {"ok"}
    ck = store.checkpoints().filter(pl.col("zoo") == "mlp").collect()
    assert sorted(ck["epoch"].unique().to_list()) == [0, 1, 2] and ck.height == 6 * 3

    interp = store.analysis("interpolation").collect()
    assert interp.group_by("zoo").len().sort("zoo").rows() == [("mlp", 2), ("p4", 1)]
    assert interp["settings_id"].n_unique() == 1
    equi = store.analysis("equivariance").collect()
    assert equi.height == 8
    p4_err = equi.filter(pl.col("zoo") == "p4")["equivariance_error"].max()
    mlp_err = equi.filter(pl.col("zoo") == "mlp")["equivariance_error"].min()
    assert p4_err < 1e-4 < mlp_err  # the group CNN is invariant to C4, the MLP is not

    client = MlflowClient(study["tracking_uri"])
    exp = client.get_experiment_by_name("e2e")
    model_runs = client.search_runs([exp.experiment_id], "tags.`symzoo.kind` = 'model'")
    assert len(model_runs) == 8
    stage_runs = client.search_runs([exp.experiment_id], "tags.`symzoo.kind` = 'stage'")
    assert {r.data.tags["symzoo.stage"] for r in stage_runs} == {"interpolation", "equivariance"}
    for run in stage_runs:
        assert client.list_artifacts(run.info.run_id, "plots"), "stage plots are logged as artifacts"
    assert (tmp_path / "out" / "summary.csv").exists()
    assert "next steps" in r.output and "mlflow ui" in r.output
    assert "starting Ray" in r.output and "Ray up in" in r.output  # the first seconds say what they wait for

    again = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert again.exit_code == 0, again.output
    assert "0 models to train" in again.output
    assert len(client.search_runs([exp.experiment_id], "tags.`symzoo.kind` = 'model'")) == 8
    assert store.analysis("interpolation").collect().height == 3
    assert store.analysis("equivariance").collect().height == 8


def test_unwritable_store_and_unreachable_tracking_exit_2(ray_local, tmp_path):
    path, study = tiny_study(tmp_path, "bad")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = CliRunner().invoke(app, ["run", str(path), "--store", str(blocker / "store")])
    assert r.exit_code == 2 and "store" in r.output
    r = CliRunner().invoke(app, ["run", str(path), "--tracking-uri", "http://127.0.0.1:9"])
    assert r.exit_code == 2 and "127.0.0.1:9" in r.output
    assert not (tmp_path / "store").exists(), "nothing is written when the run is refused"


def test_model_runs_none_logs_zoo_summaries_and_keeps_every_model_in_the_store(ray_local, tmp_path):
    """model_runs: none: no MLflow run per model (the bottleneck of big zoos), the zoo run carries its
    models' final-metric mean and median, and the store still holds every model."""
    path, study = tiny_study(tmp_path, name="nomodels")
    study = {**study, "model_runs": "none", "analysis": []}
    path.write_text(yaml.safe_dump(study))
    r = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert r.exit_code == 0, r.output

    models = zoos.open(study["store"]).models().collect()
    assert models.height == 8
    client = MlflowClient(study["tracking_uri"])
    exp = client.get_experiment_by_name("nomodels")
    assert client.search_runs([exp.experiment_id], "tags.`symzoo.kind` = 'model'") == []
    zoo_runs = {r.data.tags["symzoo.zoo"]: r for r in client.search_runs([exp.experiment_id], "tags.`symzoo.kind` = 'zoo'")}
    mlp = zoo_runs["mlp"].data.metrics
    assert mlp["models_trained"] == 6
    accs = models.filter(pl.col("zoo") == "mlp")["test_acc"].to_numpy()
    assert mlp["test_acc_mean"] == pytest.approx(accs.mean(), abs=1e-6)
    assert mlp["test_acc_median"] == pytest.approx(float(pl.Series(accs).median()), abs=1e-6)


def test_a_task_that_raises_ends_in_one_line_and_failed_runs(ray_local, tmp_path):
    """An input only the training task can refuse (equiv_reg on a continuous group: no weight projections):
    one line naming the zoo and the error, exit 2, no traceback (that is behind --debug), MLflow runs FAILED."""
    study = {"study": "raises", "store": str(tmp_path / "store"), "tracking_uri": f"sqlite:///{tmp_path / 'm.db'}",
             "output": str(tmp_path / "out"),
             "zoos": [{"name": "o5", "task": {"name": "o5_regression", "options": {"n_train": 32, "n_val": 8, "n_test": 8}},
                       "arch": {"name": "mlp", "config": {"width": 4, "depth": 1}},
                       "grid": {"seed": [0], "equiv_reg": [0.1]}, "epochs": 1}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    r = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert r.exit_code == 2, r.output
    error = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "training zoo 'o5'" in error[0] and "TrainError: equiv_reg > 0" in error[0]
    assert "Traceback" not in r.output and "symzoo run --debug" in error[0]
    client = MlflowClient(study["tracking_uri"])
    exp = client.get_experiment_by_name("raises")
    assert {run.info.status for run in client.search_runs([exp.experiment_id])} == {"FAILED"}
    debug = CliRunner().invoke(app, ["run", str(path), "--plain", "--debug"])
    assert debug.exit_code == 1 and type(debug.exception).__name__ == "TaskFailed"
    assert type(debug.exception.__cause__).__name__.startswith("RayTaskError")  # Ray's traceback, for --debug


def test_validate_checks_split_sizes_against_the_data_files(tmp_path):
    """n_val left at 5,000 with 300 training images: refused by validate (and so by run), before Ray starts."""
    import numpy as np

    from tasks.formats import write_idx
    from tasks.images import IDX_FILES

    (tmp_path / "mnist").mkdir()
    g = np.random.default_rng(0)
    for name, a in zip(IDX_FILES, [g.integers(0, 255, (300, 28, 28), dtype=np.uint8), np.zeros(300, np.uint8),
                                   g.integers(0, 255, (50, 28, 28), dtype=np.uint8), np.zeros(50, np.uint8)]):
        write_idx(tmp_path / "mnist" / (name + ".gz"), a)
    study = {"study": "sizes", "store": str(tmp_path / "store"), "data_dir": str(tmp_path),
             "zoos": [{"name": "m", "task": {"name": "mnist"}, "arch": {"name": "mlp"}, "grid": {"seed": [0]}, "epochs": 1}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    for cmd in ("validate", "run"):
        r = CliRunner().invoke(app, [cmd, str(path)])
        assert r.exit_code == 2 and "n_val=5000 but only 300 samples are available" in r.output, r.output
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("resources,asked", [({"num_gpus": 1}, "num_gpus=1"), ({"num_cpus": 64}, "num_cpus=64")])
def test_resources_no_node_has_are_refused_not_waited_for(ray_local, tmp_path, resources, asked):
    """Ray waits forever for a task no node can run ("No available node types can fulfill ..."): refused at once
    on a local Ray (this session's: 2 CPUs, no GPU), naming what was asked and what there is."""
    path, study = tiny_study(tmp_path, "res")
    path.write_text(yaml.safe_dump({**study, "resources": resources}))
    r = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert r.exit_code == 2 and asked in r.output and "the largest node of this Ray has 2 CPUs and 0 GPUs" in r.output, r.output
    assert not (tmp_path / "store" / "models").exists(), "nothing trained"


def test_a_study_analyses_zoos_already_in_the_store_without_training_them(ray_local, tmp_path):
    """Zoos named `stored: true` (trained by another study, or imported) are found, validated and analysed by any
    stage, and never trained; one that is not in the store is refused in one line before any work."""
    path, first = tiny_study(tmp_path, name="trainer")
    r = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert r.exit_code == 0, r.output
    store = zoos.open(first["store"])
    trained = store.models().collect().height

    second = {"study": "reader", "store": first["store"], "tracking_uri": first["tracking_uri"],
              "output": str(tmp_path / "out2"),
              "zoos": [{"name": "mlp", "stored": True}, {"name": "p4", "stored": True}],
              "analysis": [{"stage": "interpolation", "pairs": 3, "lambdas": 3, "samples": 64, "seed": 7},
                           {"stage": "equivariance", "samples": 32, "seed": 7}, {"stage": "landscape", "samples": 32,
                                                                                 "iters": 3, "probes": 4}]}
    path2 = tmp_path / "reader.yaml"
    path2.write_text(yaml.safe_dump(second))
    v = CliRunner().invoke(app, ["validate", str(path2)])
    assert v.exit_code == 0, v.output
    assert "6 stored (6 ok)" in v.output and "2 stored (2 ok)" in v.output and "p4cnn" in v.output

    r = CliRunner().invoke(app, ["run", str(path2), "--plain"])
    assert r.exit_code == 0, r.output
    assert "0 models to train" in r.output
    assert store.models().collect().height == trained, "nothing trained"
    landscape = store.analysis("landscape").collect()
    assert sorted(landscape.group_by("zoo").len().rows()) == [("mlp", 6), ("p4", 2)]
    interp = store.analysis("interpolation").collect()
    assert interp.filter(pl.col("zoo") == "mlp").height > 2, "the second study's own pairs, beside the first's"
    assert f"report {path2}" in r.output
    rep = CliRunner().invoke(app, ["report", str(path2), "--no-log"])  # the stored zoos are the study's to report
    assert rep.exit_code == 0, rep.output
    page = (tmp_path / "out2" / "report.html").read_text()
    assert "2 zoos (mlp, p4)" in page and "<small>(landscape)</small>" in page

    missing = {**second, "zoos": [{"name": "nope", "stored": True}]}
    path3 = tmp_path / "missing.yaml"
    path3.write_text(yaml.safe_dump(missing))
    for cmd in ("validate", "run"):
        r = CliRunner().invoke(app, [cmd, str(path3)] + (["--plain"] if cmd == "run" else []))
        assert r.exit_code == 2, r.output
        assert "zoo 'nope' is named stored: true" in r.output and "mlp, p4" in r.output and "Traceback" not in r.output


def test_an_imported_zoo_is_analysed_end_to_end(ray_local, tmp_path):
    """A Model Zoos folder (CNN-s trials written as the published trainable leaves them) imported with the CLI, then
    a study naming it stored: interpolation (weight matching on the published architecture's permutation spec)
    and equivariance run on the imported models and the MNIST files of the data folder."""
    from tests.zoos.test_importers import write_mnist, write_trial

    write_mnist(tmp_path / "data" / "mnist", n_test=64)  # the task holds out 5,000 training images
    for seed in range(3):
        write_trial(tmp_path / "published" / f"trial_{seed}", seed, [0, 1, 2])
    store = str(tmp_path / "store")
    r = CliRunner().invoke(app, ["import", "model-zoos", str(tmp_path / "published"), store, "--zoo", "mz"])
    assert r.exit_code == 0, r.output
    study = {"study": "imported", "store": store, "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
             "output": str(tmp_path / "out"), "data_dir": str(tmp_path / "data"),
             "zoos": [{"name": "mz", "stored": True}],
             "analysis": [{"stage": "interpolation", "pairs": 2, "lambdas": 5, "samples": 32, "epochs": "all"},
                          {"stage": "equivariance", "samples": 32}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    r = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert r.exit_code == 0, r.output
    s = zoos.open(store)
    interp = s.analysis("interpolation").collect()
    assert interp.height == 2 * 3 and sorted(interp["epoch"].unique().to_list()) == [0, 1, 2]
    assert (interp["barrier_loss_aligned"] <= interp["barrier_loss_naive"] + 1e-6).sum() >= 1
    assert interp["matching_objective"].is_finite().all()
    equi = s.analysis("equivariance").collect()
    assert equi.height == 3 and equi["equivariance_error"].is_finite().all() and (equi["equivariance_error"] > 1e-3).all()


def test_a_local_rays_workers_put_large_cpu_tensors_on_huge_pages(ray_local, monkeypatch):
    """A local Ray's workers start with glibc's malloc on huge pages (a value the user set is kept): where the kernel
    offers transparent huge pages, a 64 MiB tensor made in a worker faults in 2 MiB pages, not 4 KiB ones."""
    import os
    from pathlib import Path

    from pipeline.localray import WORKER_ENV, worker_environment

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=0")
    worker_environment()
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.check=0"

    @ray_local.remote
    def in_worker():
        import resource

        import torch

        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(16 << 20)  # 64 MiB
        return os.environ.get("GLIBC_TUNABLES"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    env, faults = ray_local.get(in_worker.remote())
    assert env == WORKER_ENV["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert faults < (64 << 20) // 4096 // 4, faults  # 16,384 pages of 4 KiB; 32 of 2 MiB (and a few more)


def test_a_local_ray_keeps_token_authentication_without_saying_so(tmp_path):
    """Ray printed "Token authentication is enabled for this Ray cluster ..." into every local run's progress; a
    local Ray still starts with token authentication (Ray's default for a new cluster, its token under $HOME)."""
    import os
    import subprocess
    import sys

    script = ("from pipeline.localray import init_ray; init_ray(num_cpus=1)\n"
              "from ray._raylet import AuthenticationMode, get_authentication_mode\n"
              "print('token mode:', get_authentication_mode() == AuthenticationMode.TOKEN)\n"
              "import ray; ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)  # the token Ray makes goes here
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "token mode: True" in done.stdout
    assert "Token authentication" not in done.stdout + done.stderr, done.stderr[-2000:]
    assert (tmp_path / ".ray" / "auth_token").is_file()
