"""The phase-diagram study end to end: a 2x2 (width x batch size) shrink of studies/phases-digits.yaml
for both architectures through `symzoo run` and `symzoo report` (real Ray, store and MLflow sqlite),
then every table, diagram and the HTML page checked against the stored rows."""

from pathlib import Path

import polars as pl
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import zoos
from pipeline import phases
from pipeline.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

STUDY = Path(__file__).resolve().parents[2] / "studies" / "phases-digits.yaml"


def tiny_phase_study(tmp_path):
    """The real study file, shrunk: the two largest batch sizes (fewest steps), two widths, two seeds, one epoch,
    cheap stage settings."""
    study = yaml.safe_load(STUDY.read_text())
    kept = []
    for arch in ("cnn", "p4cnn"):
        arch_zoos = [z for z in study["zoos"] if z["arch"]["name"] == arch][-2:]
        for z in arch_zoos:
            z["grid"] = {**z["grid"], "width": z["grid"]["width"][:2], "seed": [0, 1]}
            z["epochs"], z["checkpoints"] = 1, "0,last"
        kept += arch_zoos
    study.update(zoos=kept, store=str(tmp_path / "store"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                 output=str(tmp_path / "out"))
    settings = {"interpolation": {"lambdas": 5, "samples": 64},
                "landscape": {"samples": 32, "iters": 3, "probes": 2},
                "bezier": {"lambdas": 5, "steps": 5, "batch_size": 32}, "similarity": {"samples": 64}}
    for stage in study["analysis"]:
        stage.update(settings.get(stage["stage"], {}))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path, study


def test_phase_study_runs_and_reports_every_cell(ray_local, tmp_path):
    path, study = tiny_phase_study(tmp_path)
    r = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert r.exit_code == 0, r.output
    store = zoos.open(study["store"])
    models = store.models().collect()
    assert models.height == 16 and models.group_by("arch", "width", "batch_size").len()["len"].to_list() == [2] * 8

    # every stored pair is two seeds of one cell: same arch, width and batch size
    cell_of = {m: (a, w, b) for m, a, w, b in models.select("model_id", "arch", "width", "batch_size").iter_rows()}
    for stage in ("interpolation", "bezier", "similarity"):
        rows = store.analysis(stage).collect()
        assert rows.height == 8, stage
        assert all(cell_of[a] == cell_of[b] and a != b for a, b in rows.select("model_a", "model_b").iter_rows()), stage

    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["report", study["store"], "--study", "phases-digits", "--out", str(out),
                                 "--tracking-uri", study["tracking_uri"]])
    assert r.exit_code == 0, r.output

    cells = pl.read_csv(out / "phases_cells.csv")
    assert cells.height == 8
    assert (cells["temperature_factor"].unique().to_list(), cells["load_factor"].unique().to_list()) == (["batch_size"], ["width"])
    assert cells["models"].to_list() == [2] * 8 and cells["interpolation_pairs"].to_list() == [1] * 8
    assert cells["bezier_pairs"].to_list() == [1] * 8 and cells["similarity_pairs"].to_list() == [1] * 8
    names = ["test_acc", "test_loss", "train_loss", "hessian_top", "hessian_trace", "barrier_naive", "barrier_aligned",
             "barrier_err_aligned", "bezier_barrier", "cka_penultimate", "cka_output"]
    assert cells.select(names).null_count().sum_horizontal().item() == 0
    assert cells["cka_output"].is_between(0, 1 + 1e-6).all() and cells["test_acc"].is_between(0, 1).all()
    # a cell's aligned barrier is the mean over its pairs, its Hessian trace the mean over its models
    interp = store.analysis("interpolation").collect()
    land = store.analysis("landscape").collect()
    for row in cells.iter_rows(named=True):
        in_cell = [m for m, c in cell_of.items() if c == (row["arch"], int(row["load"]), int(row["temperature"]))]
        assert len(in_cell) == 2
        pair = interp.filter(pl.col("model_a").is_in(in_cell))
        assert row["barrier_aligned"] == pytest.approx(pair["barrier_loss_aligned"].mean(), rel=1e-6)
        assert row["hessian_trace"] == pytest.approx(land.filter(pl.col("model_id").is_in(in_cell))["hessian_trace"].mean(), rel=1e-6)

    per_model = pl.read_csv(out / "phases_models.csv")
    assert per_model.height == 16 and per_model["hessian_top"].null_count() == 0
    matched = pl.read_csv(out / "phases_matched.csv")
    assert matched.height == 4  # 2 load levels x 2 batch sizes, both architectures side by side
    assert matched.select("cnn.barrier_aligned", "p4cnn.barrier_aligned").null_count().sum_horizontal().item() == 0
    assert (matched["cnn.n_params"] > matched["p4cnn.n_params"] * 0.8).all()  # matched sizes, level by level
    assert (matched["cnn.n_params"] < matched["p4cnn.n_params"] * 1.25).all()

    plots = sorted(p.name for p in out.glob("phase_*.png"))
    assert plots == sorted(f"phase_{n}.png" for n in names)
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') > len(names) and "src=\"http" not in page  # + stage plots
    assert page.count("<tr>") >= 1 + cells.height + 16  # header rows + a row per cell and per model
    for stage in ("interpolation", "bezier", "similarity", "landscape"):  # every stage the study ran has its section
        assert f"<small>({stage})</small></h2>" in page
    assert "Weight matching raised the loss barrier in" in page  # per-pair barriers, and how often matching hurt

    client = MlflowClient(study["tracking_uri"])
    exp = client.get_experiment_by_name("phases-digits")
    runs = client.search_runs([exp.experiment_id], "tags.`symzoo.stage` = 'report'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    assert {f"plots/{n}" for n in plots} <= {a.path for a in client.list_artifacts(run_id, "plots")}
    assert "report/report.html" in {a.path for a in client.list_artifacts(run_id, "report")}
    assert any(k.endswith(".barrier_aligned") for k in runs[0].data.metrics)

    bad = CliRunner().invoke(app, ["report", study["store"], "--study", "nope", "--no-log"])
    assert bad.exit_code == 2 and "phases-digits" in bad.output


class _Store:
    """Just enough of a store for `pair_rows`: one stage's rows."""

    def __init__(self, rows):
        self.rows = rows

    def analysis(self, stage):
        return pl.DataFrame(self.rows).lazy()


def test_pairs_across_cells_and_self_pairs_are_left_out():
    models = pl.DataFrame({"model_id": ["a", "b", "c", "d"], "arch": ["cnn"] * 4, "load": [4.0, 4.0, 4.0, 8.0],
                           "temperature": [8.0, 8.0, 32.0, 8.0]})
    store = _Store({"model_a": ["a", "a", "a", "a", "a"], "model_b": ["b", "c", "d", "a", "b"], "epoch": [2, 2, 2, 2, 1],
                    "barrier_loss_aligned": [0.1, 5.0, 6.0, 0.0, 9.0]})
    rows = phases.pair_rows(store, "interpolation", models)
    assert rows.select("model_a", "model_b", "barrier_loss_aligned").rows() == [("a", "b", 0.1)]  # last epoch only


def test_axes_are_picked_from_the_varying_factors_or_named():
    models = pl.DataFrame({"batch_size": [8, 8, 8], "lr": [0.1, 0.2, 0.3], "width": [4, 8, 8], "seed": [0, 1, 2]})
    assert phases.grid_axes(models) == ("lr", "width")
    assert phases.grid_axes(models, temperature="batch_size") == ("batch_size", "width")
    with pytest.raises(phases.PhaseError, match="no load axis"):
        phases.grid_axes(models.with_columns(pl.lit(4).alias("width")))


def test_a_load_at_one_temperature_is_a_row_of_cells_drawn_as_curves(tmp_path):
    """A data-efficiency study (train_fraction varies, batch size does not) gets a constant temperature; with
    neither varying there is still no temperature axis. Its cells are drawn as one curve per architecture."""
    models = pl.DataFrame({"arch": ["cgenn"] * 4 + ["mlp"] * 4, "batch_size": [50] * 8,
                           "train_fraction": [0.1, 0.1, 1.0, 1.0] * 2, "seed": [0, 1] * 4})
    assert phases.grid_axes(models) == ("batch_size", "train_fraction")
    with pytest.raises(phases.PhaseError, match="no temperature axis"):
        phases.grid_axes(models.with_columns(pl.lit(1.0).alias("train_fraction")))
    with pytest.raises(phases.PhaseError, match="no temperature axis"):  # a named temperature must vary or exist
        phases.grid_axes(models.drop("batch_size"))
    two_tasks = pl.DataFrame({"arch": ["mlp"] * 4, "task": ["digits", "digits", "o5", "o5"], "batch_size": [50] * 4,
                              "width": [4, 4, 8, 8]})
    with pytest.raises(phases.PhaseError, match="no temperature axis"):  # each task's own width: no load axis
        phases.grid_axes(two_tasks)
    cells = pl.DataFrame({"arch": ["cgenn", "cgenn", "mlp", "mlp"], "load": [0.1, 1.0, 0.1, 1.0], "temperature": [50.0] * 4,
                          "test_loss": [0.02, 0.01, 0.3, 0.1], "test_loss_sd": [0.005, None, 0.05, 0.02], "ok": [2, 1, 2, 2]})
    from analysis import plots

    png = plots.load_curves(cells, "test_loss", tmp_path / "load_test_loss.png", load_label="train_fraction", count="ok")
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"


def test_a_width_that_differs_only_between_architectures_is_no_load_axis():
    """The quickstart: cnn width 16 and p4cnn width 8 are matched sizes, not a load axis."""
    models = pl.DataFrame({"arch": ["cnn", "cnn", "p4cnn", "p4cnn"], "width": [16, 16, 8, 8], "lr": [0.01, 0.02, 0.01, 0.02]})
    with pytest.raises(phases.PhaseError, match="no load axis"):
        phases.grid_axes(models)
    assert phases.grid_axes(models.with_columns(pl.Series("width", [16, 32, 8, 16]))) == ("lr", "width")
