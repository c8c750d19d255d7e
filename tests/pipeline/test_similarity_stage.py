"""The similarity (CKA, L2 and canonical distance over pairs) and funcdim (Jacobian rank vs the scaling
bound) stages end to end through `symzoo run`, with a real local Ray, store and MLflow; stored values
are recomputed by hand from the stored weights."""

import polars as pl
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

import zoos
from pipeline.cli import app
from pipeline.stages.common import model_context
from pipeline.stages.common import test_batch as batch_of
from pipeline.study import StudyError, parse_study

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

DIGITS = {"name": "digits", "options": {"group": "C4", "variant": "upright"}}
O5 = {"name": "o5_regression", "options": {"n_train": 64, "n_val": 16, "n_test": 160}}


def similarity_study(tmp_path):
    study = {
        "study": "similarity",
        "store": str(tmp_path / "store"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "output": str(tmp_path / "out"),
        "zoos": [
            {"name": "o5", "task": O5, "arch": {"name": "mlp", "config": {"width": 8, "depth": 1}},
             "grid": {"seed": [0, 1, 2], "activation": ["relu", "tanh"], "lr": [0.01]}, "epochs": 1,
             "checkpoints": [1]},
            {"name": "cnn", "task": DIGITS, "arch": {"name": "cnn", "config": {"width": 4, "depth": 1}},
             "grid": {"seed": [0, 1], "lr": [0.01]}, "epochs": 2, "checkpoints": [0, 1, 2]},
        ],
        "analysis": [
            {"stage": "similarity", "samples": 64, "pairs": 0, "within": "seeds", "epochs": "all"},
            {"stage": "funcdim", "samples": 128, "zoos": ["o5"]},
        ],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path, study


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Kornblith et al.'s feature-space form: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    x = (x - x.mean(0)).double().flatten(1)
    y = (y - y.mean(0)).double().flatten(1)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def mlp_features(state: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden ReLU features, output) of a one-hidden-layer symzoo MLP, by hand."""
    h = torch.relu(x.flatten(1) @ state["net.layers.0.weight"].T + state["net.layers.0.bias"])
    return h, h @ state["net.layers.1.weight"].T + state["net.layers.1.bias"]


def permute_and_scale(state: dict, seed: int) -> dict:
    """The same function as `state`: hidden neurons permuted and each rescaled by c > 0 (c in, 1/c out)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(state["net.layers.0.bias"].numel(), generator=g)
    c = torch.exp(torch.randn(perm.numel(), generator=g))
    return {"net.layers.0.weight": state["net.layers.0.weight"][perm] * c[:, None],
            "net.layers.0.bias": state["net.layers.0.bias"][perm] * c,
            "net.layers.1.weight": state["net.layers.1.weight"][:, perm] / c,
            "net.layers.1.bias": state["net.layers.1.bias"]}


def flat(state: dict, keys: list[str]) -> torch.Tensor:
    return torch.cat([state[k].double().reshape(-1) for k in keys])


def jacobian_rank(store, model_id: str, samples: int) -> tuple[int, int]:
    """(rank of d outputs / d params on the test batch, #params) of a stored model, float64, by autograd."""
    module, task = model_context(store, model_id, None)
    module = module.double()
    state = {k: v.double() for k, v in store.state_dict(model_id).items()}
    names = [k for k, _ in module.named_parameters()]
    shapes = [state[k].shape for k in names]
    x, _ = batch_of(task, samples, 0)

    def outputs(theta):
        parts, i = dict(state), 0
        for k, s in zip(names, shapes):
            parts[k] = theta[i:i + s.numel()].reshape(s)
            i += s.numel()
        return torch.func.functional_call(module, parts, (x.double(),)).reshape(-1)

    jac = torch.autograd.functional.jacobian(outputs, flat(state, names))
    return int(torch.linalg.matrix_rank(jac)), jac.shape[1]


def test_similarity_and_funcdim_store_values_that_must_hold(ray_local, tmp_path):
    path, study = similarity_study(tmp_path)
    r = CliRunner().invoke(app, ["run", str(path), "--plain"])
    assert r.exit_code == 0, r.output
    store = zoos.open(study["store"])
    models = store.models().collect()
    activation = dict(models.select("model_id", "activation").iter_rows())

    # o5 (one checkpoint), within: seeds -> the 3 pairs of each activation, never a relu-tanh pair
    sim = store.analysis("similarity").collect()
    o5 = sim.filter(pl.col("zoo") == "o5")
    assert o5.height == 6
    assert all(activation[a] == activation[b] for a, b in o5.select("model_a", "model_b").iter_rows())
    assert o5["layers"][0].to_list() == ["net.acts.0", "output"]
    cka = sim["cka"].explode()
    assert cka.min() >= 0.0 and cka.max() <= 1.0 + 1e-9

    # CKA and L2 recomputed by hand from the stored weights, for a relu pair and a tanh pair
    task_x = batch_of(model_context(store, o5["model_a"][0], None)[1], 64, 0)[0]
    keys = ["net.layers.0.weight", "net.layers.0.bias", "net.layers.1.weight", "net.layers.1.bias"]
    for act in ("relu", "tanh"):
        row = o5.filter(pl.col("model_a").replace_strict(activation) == act).row(0, named=True)
        sa, sb = store.state_dict(row["model_a"]), store.state_dict(row["model_b"])
        assert row["l2_distance"] == pytest.approx(float((flat(sa, keys) - flat(sb, keys)).norm()), rel=1e-6)
        if act == "relu":
            (ha, oa), (hb, ob) = mlp_features(sa, task_x), mlp_features(sb, task_x)
            assert row["cka"] == pytest.approx([linear_cka(ha, hb), linear_cka(oa, ob)], abs=1e-5)
            assert row["cka_penultimate"] == row["cka"][0] and row["cka_output"] == row["cka"][1]
            assert linear_cka(ha, hb) < 0.999  # two seeds: features differ, so a stored 1 would be caught

    # canonical distance: ReLU pairs only; invariant to permuting and rescaling model b's hidden neurons,
    # unlike the plain L2 distance
    relu = o5.filter(pl.col("canonical_applicable"))
    assert relu.height == 3 and o5.filter(~pl.col("canonical_applicable"))["canonical_distance"].null_count() == 3
    from analysis.canonical import canonical_distance

    row = relu.row(0, named=True)
    sa, sb = store.state_dict(row["model_a"]), store.state_dict(row["model_b"])
    moved = permute_and_scale(sb, seed=3)
    assert torch.allclose(mlp_features(sb, task_x)[1], mlp_features(moved, task_x)[1], atol=1e-5)  # same function
    layers = [("net.layers.0.weight", "net.layers.0.bias"), ("net.layers.1.weight", "net.layers.1.bias")]
    double = lambda s: {k: s[k].double() for k in keys}  # noqa: E731
    assert row["canonical_distance"] == pytest.approx(float(canonical_distance(double(sa), double(moved), layers)), rel=1e-6)
    assert abs(float((flat(sa, keys) - flat(moved, keys)).norm()) - row["l2_distance"]) > 0.1 * row["l2_distance"]
    assert row["canonical_distance"] > 0.1  # two seeds are not one network up to symmetry

    # cnn, epochs: all -> its one pair at epochs 0, 1, 2; no canonical form for a CNN
    cnn = sim.filter(pl.col("zoo") == "cnn").sort("epoch")
    assert cnn["epoch"].to_list() == [0, 1, 2] and not cnn["canonical_applicable"].any()
    assert cnn["layers"][0].to_list() == ["acts.0", "output"] and cnn["cka"].explode().is_finite().all()

    # funcdim: ReLU rank <= #params - #hidden < #params with more Jacobian rows than params; tanh has no
    # such symmetry and exceeds that count; every rank equals a rank taken by hand
    fd = store.analysis("funcdim").collect().join(models.select("model_id", "activation"), on="model_id")
    assert fd.height == 6 and (fd["n_params"] == 97).all() and (fd["jacobian_rows"] >= 97).all()
    rl, th = fd.filter(pl.col("activation") == "relu"), fd.filter(pl.col("activation") == "tanh")
    assert rl["bound_applicable"].all() and (rl["bound"] == 89).all() and (rl["rank"] <= rl["bound"]).all()
    assert not th["bound_applicable"].any() and th["bound"].null_count() == 3 and (th["rank"] > 89).all()
    for mid, rank in fd.select("model_id", "rank").iter_rows():
        assert jacobian_rank(store, mid, 128) == (int(rank), 97)
    assert not fd["rank_capped"].any()  # 128 rows for 97 parameters: every rank below the rows

    # summary, plots, MLflow
    summary = pl.read_csv(tmp_path / "out" / "summary.csv")
    for col in ("cka_output", "cka_penult", "l2_dist", "canon_dist", "fdim_over_params", "fdim_over_bound"):
        assert col in summary.columns
    assert summary.filter(pl.col("zoo") == "cnn")["canon_dist"].is_null().all()
    o5 = summary.filter(pl.col("zoo") == "o5").row(0, named=True)
    assert o5["ok"] + o5["not_learned"] == o5["models"]  # statistics over the models that learned, if any
    assert o5["fdim_over_bound"] is None if o5["ok"] == 0 else o5["fdim_over_bound"] <= 1.0
    for png in ("cka_output.png", "cka_vs_layer.png", "canonical_vs_l2.png", "functional_dimension.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    client = MlflowClient(study["tracking_uri"])
    exp = client.get_experiment_by_name("similarity")
    runs = client.search_runs([exp.experiment_id], "tags.`symzoo.kind` = 'stage'")
    assert {"similarity", "funcdim"} <= {r.data.tags["symzoo.stage"] for r in runs}


def test_similarity_settings_are_validated():
    base = {"study": "s", "zoos": [{"name": "z", "task": DIGITS, "arch": {"name": "mlp"}, "grid": {"seed": [0, 1]}}]}
    for settings, fragment in (({"within": "width"}, "within"), ({"samples": 2}, "samples"), ({"pairs": -1}, "pairs")):
        with pytest.raises(StudyError, match=fragment):
            parse_study({**base, "analysis": [{"stage": "similarity", **settings}]})
    with pytest.raises(StudyError, match="epochs"):
        parse_study({**base, "analysis": [{"stage": "funcdim", "epochs": []}]})
    ok = parse_study({**base, "analysis": [{"stage": "similarity", "layers": ["net.acts.0", "output"]}]})
    assert ok.analysis[0].settings.layers == ["net.acts.0", "output"]


def test_a_functional_dimension_that_reaches_the_jacobians_rows_is_marked_capped():
    """With fewer Jacobian rows than the network has dimensions the rank is the row count, a lower bound only:
    `rank_capped` says so (and the summary counts it); with enough rows it is the network's own."""
    from pipeline.stages.similarity import Funcdim, FuncdimSettings
    from tasks import get_task
    from zoos.archs import build_arch
    from zoos.functional import stack_states, template

    task = get_task("digits")
    torch.manual_seed(0)
    models = [build_arch("mlp", task, width=4, depth=1, activation="tanh") for _ in range(2)]  # 310 params
    params, buffers = stack_states(models)
    stage = Funcdim()
    few = stage.measure(template(models[0]), task, params, buffers, FuncdimSettings(samples=3).model_dump(), "cpu",
                        model_ids=["a", "b"])
    assert few["jacobian_rows"] == 30 and (few["rank"] == 30).all() and few["rank_capped"].all()
    many = stage.measure(template(models[0]), task, params, buffers, FuncdimSettings(samples=64).model_dump(), "cpu",
                         model_ids=["a", "b"])
    assert many["jacobian_rows"] == 640 and (many["rank"] < 310).all() and not many["rank_capped"].any()
    rows = pl.DataFrame({"zoo": ["z", "z"], "model_id": ["a", "b"], "epoch": [1, 1], "rank_over_params": [0.1, 0.1],
                         "rank_over_bound": [0.1, 0.1], "rank_capped": [True, False]})
    assert stage.summary_columns(rows)["fdim_capped"].to_list() == [1]
