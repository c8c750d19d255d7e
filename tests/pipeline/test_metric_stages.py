"""The per-checkpoint metric stages (landscape, weightspace, lie) end to end through `symzoo run`,
with a real local Ray, store and MLflow; the stored values are checked against what must hold."""

import json

import polars as pl
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import zoos
from pipeline.cli import app
from pipeline.study import StudyError, parse_study

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

DIGITS = {"name": "digits", "options": {"group": "C4", "variant": "upright"}}
O5 = {"name": "o5_regression", "options": {"n_train": 64, "n_val": 16, "n_test": 32}}


def metric_study(tmp_path):
    one = {"seed": [0, 1], "optimizer": ["adam"], "lr": [0.01]}
    study = {
        "study": "metrics",
        "store": str(tmp_path / "store"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "output": str(tmp_path / "out"),
        "zoos": [
            {"name": "cnn", "task": DIGITS, "arch": {"name": "cnn", "config": {"width": 4, "depth": 1}},
             "grid": one, "epochs": 2, "checkpoints": [0, 1, 2]},
            {"name": "p4", "task": DIGITS, "arch": {"name": "p4cnn", "config": {"width": 2, "depth": 1}},
             "grid": one, "epochs": 2, "checkpoints": [0, 1, 2]},
            {"name": "mlp", "task": DIGITS, "arch": {"name": "mlp", "config": {"width": 4, "depth": 1}},
             "grid": one, "epochs": 1, "checkpoints": [0, 1]},
            {"name": "o5_inv", "task": O5, "arch": {"name": "scalar_mlp", "config": {"width": 8, "depth": 1}},
             "grid": one, "epochs": 1, "checkpoints": [0, 1]},
            {"name": "o5_mlp", "task": O5, "arch": {"name": "mlp", "config": {"width": 8, "depth": 1}},
             "grid": one, "epochs": 1, "checkpoints": [0, 1]},
        ],
        "analysis": [
            {"stage": "weightspace", "zoos": ["cnn", "p4", "mlp", "o5_mlp"]},
            {"stage": "landscape", "zoos": ["mlp", "p4"], "samples": 64, "iters": 200, "tol": 1e-6, "probes": 64,
             "epochs": [0, 1]},
            {"stage": "lie", "zoos": ["p4", "o5_inv", "o5_mlp"], "samples": 16, "flows": ["rotation", "translate_x"]},
        ],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path, study


def test_metric_stages_store_values_that_must_hold(ray_local, tmp_path):
    path, study = metric_study(tmp_path)
    r = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert r.exit_code == 0, r.output
    store = zoos.open(study["store"])

    # weightspace, epochs: all -> every stored checkpoint of every model
    ws = store.analysis("weightspace").collect()
    assert ws.group_by("zoo").len().sort("zoo").rows() == [("cnn", 6), ("mlp", 4), ("o5_mlp", 4), ("p4", 6)]
    p4, cnn = ws.filter(pl.col("zoo") == "p4"), ws.filter(pl.col("zoo") == "cnn")
    assert sorted(p4["epoch"].unique()) == [0, 1, 2] and p4["weight_distance"].max() == 0.0
    assert cnn["weight_distance"].min() > 0.1
    assert not ws.filter(pl.col("zoo") == "o5_mlp")["applicable"].any()  # O(5) is continuous: no group average
    # the conv kernel's distance, recomputed by hand from the stored weights with rot90
    row = cnn.filter(pl.col("epoch") == 2).row(0, named=True)
    w = store.state_dict(row["model_id"], epoch=2)["convs.0.weight"]
    avg = sum(torch.rot90(w, k, (-2, -1)) for k in range(4)) / 4
    assert row["layer_distance"][row["layers"].index("convs.0.weight")] == pytest.approx(
        float((w - avg).norm() / w.norm()), rel=1e-5)
    # training moved the cnn's weights: its distance differs between epoch 0 and 2
    by_epoch = cnn.filter(pl.col("model_id") == row["model_id"]).sort("epoch")["weight_distance"]
    assert abs(by_epoch[0] - by_epoch[2]) > 1e-4

    # landscape at epochs [0, 1]: checked against the full Hessian of one mlp model
    ls = store.analysis("landscape").collect()
    assert ls.group_by("zoo").len().sort("zoo").rows() == [("mlp", 4), ("p4", 4)]
    assert ls["hessian_trace"].is_finite().all() and ls["hessian_top"].is_finite().all()
    assert (ls["hessian_top"].abs() >= ls["hessian_trace"].abs() / ls["n_params"]).all()
    r0 = ls.filter((pl.col("zoo") == "mlp") & (pl.col("epoch") == 1)).row(0, named=True)
    eig, trace = exact_hessian(store, r0["model_id"], epoch=1, samples=64)
    top = eig[eig.abs().argmax()]
    assert r0["hessian_top"] == pytest.approx(float(top), rel=1e-2)
    assert abs(r0["hessian_trace"] - float(trace)) < 4 * r0["hessian_trace_se"] + 1e-6
    assert r0["n_params"] == eig.numel()

    # lie, epochs: last -> one row per model; O(5)-invariant scalar MLP ~0, the plain MLP not
    lie = store.analysis("lie").collect()
    assert lie.group_by("zoo").len().sort("zoo").rows() == [("o5_inv", 2), ("o5_mlp", 2), ("p4", 2)]
    assert set(lie["epoch"]) == {1, 2}
    inv, plain = (lie.filter(pl.col("zoo") == z)["lie_relative"] for z in ("o5_inv", "o5_mlp"))
    assert inv.max() < 1e-4 and plain.min() > 1e-2
    assert lie.filter(pl.col("zoo") == "p4")["directions"][0].to_list() == ["rotation", "translate_x"]
    assert len(lie.filter(pl.col("zoo") == "o5_mlp")["lie_norms"][0]) == 10  # so(5) has 10 generators

    # summary, plots, MLflow
    summary = pl.read_csv(tmp_path / "out" / "summary.csv")
    for col in ("wdist_first", "wdist_last", "hessian_top", "hessian_trace", "lie_generator_0", "lie_generator_9",
                "hessian_top__q25", "wdist_last__q75"):  # one column per direction, spreads beside
        assert col in summary.columns
    # these 1-2 epoch models of width 2-8 mostly learn nothing (training loss within 5% of its start): counted apart
    # and left out of the statistics, which then come from the mlp and o5_inv zoos
    learned = zoos.open(study["store"]).models().collect().select("zoo", "learned")
    assert summary.sort("zoo")["not_learned"].to_list() == [
        learned.filter((pl.col("zoo") == z) & ~pl.col("learned")).height for z in sorted(summary["zoo"])]
    assert summary.filter(pl.col("zoo") == "o5_inv")["lie_generator_0"][0] < 1e-4
    for png in ("weight_distance.png", "hessian_top.png", "lie_relative.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    client = MlflowClient(study["tracking_uri"])
    exp = client.get_experiment_by_name("metrics")
    runs = client.search_runs([exp.experiment_id], "tags.`symzoo.kind` = 'stage'")
    assert {r.data.tags["symzoo.stage"] for r in runs} == {"weightspace", "landscape", "lie"}
    # each stage run's metrics are the summary's numbers: the study's zoos, the models that learned
    shown = {f"{row['zoo']}.{c}": v for row in summary.iter_rows(named=True) for c, v in row.items()
             if c != "zoo" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    logged = {k: v for r in runs for k, v in r.data.metrics.items()}
    assert "mlp.hessian_top" in logged and "o5_inv.lie_generator_0" in logged
    assert all(v == pytest.approx(shown[k]) for k, v in logged.items()), (logged, shown)

    # a second run asking for all epochs computes only the checkpoints not stored yet under these settings (a
    # fresh MLflow file: the study's MLflow runs refuse changed stage params)
    landscape = {"stage": "landscape", "zoos": ["mlp", "p4"], "samples": 64, "iters": 200, "tol": 1e-6, "probes": 64}
    study["analysis"] = [{**landscape, "epochs": "all"}]
    path.write_text(yaml.safe_dump(study))
    again = CliRunner().invoke(app, ["run", str(path), "--plain", "--tracking-uri", f"sqlite:///{tmp_path / 'again.db'}"])
    assert again.exit_code == 0, again.output
    after = store.analysis("landscape").collect()
    new = after.join(ls.select("model_id", "epoch"), on=["model_id", "epoch"], how="anti")
    assert after.height == 10 and new.select("zoo", "epoch").unique().rows() == [("p4", 2)]  # p4 stored 0, 1, 2

    # other settings of a result (fewer probes, fewer iterations) compute every checkpoint anew, stored beside the
    # first results under their own settings id; the summary shows the study's own
    study["analysis"] = [{**landscape, "epochs": "all", "iters": 5, "probes": 2}]
    path.write_text(yaml.safe_dump(study))
    third = CliRunner().invoke(app, ["run", str(path), "--plain", "--tracking-uri", f"sqlite:///{tmp_path / 'third.db'}"])
    assert third.exit_code == 0, third.output
    rows = store.analysis("landscape").collect()
    assert rows.height == 20 and rows["settings_id"].n_unique() == 2
    assert rows.filter(~pl.col("settings_id").is_in(after["settings_id"].unique().to_list())).height == 10


def exact_hessian(store, model_id, epoch, samples):
    """Eigenvalues and trace of the full Hessian of the test loss of one stored model (float64)."""
    from pipeline.stages.common import model_context, test_batch

    module, task = model_context(store, model_id, None)
    state = store.state_dict(model_id, epoch=epoch)
    names = [k for k, _ in module.named_parameters()]
    shapes = [state[k].shape for k in names]
    flat = torch.cat([state[k].reshape(-1) for k in names]).double()
    x, y = test_batch(task, samples, 0)
    module = module.double()

    def loss(theta):
        parts, i = {}, 0
        for k, s in zip(names, shapes):
            parts[k] = theta[i:i + s.numel()].reshape(s)
            i += s.numel()
        return task.loss(torch.func.functional_call(module, parts, (x.double(),)), y)

    h = torch.autograd.functional.hessian(loss, flat)
    return torch.linalg.eigvalsh(h), h.trace()


def test_epochs_setting_is_validated():
    base = {"study": "s", "zoos": [{"name": "z", "task": DIGITS, "arch": {"name": "mlp"}, "grid": {"seed": [0]}}]}
    for epochs, fragment in (("first", "epochs"), ([], "empty"), ([-1], ">= 0")):
        with pytest.raises(StudyError, match=fragment):
            parse_study({**base, "analysis": [{"stage": "landscape", "epochs": epochs}]})
    with pytest.raises(StudyError, match="allowed: rotation"):
        parse_study({**base, "analysis": [{"stage": "lie", "flows": ["shear"]}]})
    ok = parse_study({**base, "analysis": [{"stage": "weightspace", "epochs": [0, 5]}]})
    assert ok.analysis[0].settings.epochs == [0, 5] and json.dumps(ok.analysis[0].settings.model_dump())


def test_report_of_a_study_without_a_phase_grid_has_every_stage(ray_local, tmp_path):
    """A study without a temperature x load grid within an architecture (the quickstart: lr only, widths that differ
    between architectures are matched sizes, not a load axis) has no phase
    diagram (said on the page), but the summary and a section per stage that ran."""
    path, study = metric_study(tmp_path)
    run = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert run.exit_code == 0 and f"report {path}" in run.output  # the next steps name the report's command
    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["report", study["store"], "--study", "metrics", "--out", str(out), "--no-log"])
    assert r.exit_code == 0, r.output
    assert "no phase diagram" in r.output
    page = (out / "report.html").read_text()
    assert "No phase diagram: no temperature axis" in page
    for stage in ("weightspace", "landscape", "lie"):
        assert f"<small>({stage})</small></h2>" in page
    assert "not learned (left out)" in page and "(median)" in page and "median [first quartile, third quartile]" in page
    assert (out / "summary.csv").exists() and not list(out.glob("phase_*.png"))
    # the study file alone names the store, the study and the output folder; a one-study store needs no --study
    for args, where in (([str(path)], tmp_path / "out"), ([study["store"], "--out", str(tmp_path / "r2")], tmp_path / "r2")):
        r = CliRunner().invoke(app, ["report", *args, "--no-log"])
        assert r.exit_code == 0, r.output
        assert (where / "report.html").read_text().count("<small>(landscape)</small>") == 1
    r = CliRunner().invoke(app, ["report", study["store"], "--study", "nope", "--no-log"])
    assert r.exit_code == 2 and "study 'nope' has no models in the store; studies there: metrics" in r.output


def test_the_summary_table_fits_a_100_column_terminal():
    """A row per statistic, a column per zoo: two zoos with every stage's statistics side by side in 100 columns."""
    import io

    from rich.console import Console

    from pipeline.report import print_summary
    from pipeline.runner import RunReport
    from pipeline.study import parse_study

    summary = pl.DataFrame({"zoo": ["cnn", "p4cnn"], "models": [16, 16], "ok": [15, 14], "not_learned": [1, 2],
                            "params": [2634, 2482], "test_acc": [0.912, 0.934], "test_acc__sd": [0.021, 0.015],
                            "test_acc__lo": [0.901, 0.926], "test_acc__hi": [0.923, 0.942],
                            "equiv_error": [0.41, 8.7e-8], "equiv_error__q25": [0.39, 6.1e-8], "equiv_error__q75": [0.47, 9.9e-8],
                            "lie_translate_x": [0.314, 0.549], "lie_translate_x__q25": [0.3, 0.5],
                            "lie_translate_x__q75": [0.396, 0.61]})
    out = io.StringIO()
    console = Console(file=out, width=100)
    study = parse_study({"study": "s", "zoos": [{"name": "cnn", "task": {"name": "digits"}, "arch": {"name": "mlp"}}]})
    print_summary(console, study, RunReport(summary=summary))
    text = out.getvalue()
    table = [line for line in text.splitlines() if line[:1] in "┏┃┡│└"]
    assert table and max(len(line) for line in table) <= 100  # (commands in "next steps" stay whole, to be copied)
    header = next(line for line in text.splitlines() if "cnn" in line and "p4cnn" in line)  # one table, both zoos
    assert header
    assert "0.912 ± 0.021 (0.901–0.923)" in text and "8.7e-08 [6.1e-08, 9.9e-08]" in text and "Lie translate_x (rel.) (median)" in text
    assert "3 models never learned" in text
    out = io.StringIO()
    print_summary(Console(file=out, width=100), study, RunReport(summary=summary.with_columns(pl.Series("not_learned", [1, 0]))))
    assert "1 model never learned" in out.getvalue()
    assert "report zoo-store --study s --out runs/s" in text  # the report's command, without a study file to name
