"""Importers of published zoos, on small fixtures written in the published formats."""

from __future__ import annotations

import csv
import gzip
import json
import os

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoos.export import export_nfn, export_safetensors, nfn_layout
from zoos.importers import import_zoo
from zoos.store import Store, StoreError

LAYOUT = [  # Small CNN Zoo order: bias then kernel per layer
    ("sequential/conv2d/bias:0", (2,)),
    ("sequential/conv2d/kernel:0", (3, 3, 1, 2)),
    ("sequential/dense/bias:0", (10,)),
    ("sequential/dense/kernel:0", (2, 10)),
]


def write_small_cnn_zoo(root, gz: bool) -> np.ndarray:
    """Two models x two checkpoints (steps 0 and 100) in weights.npy / layout.csv / metrics.csv[.gz]."""
    os.makedirs(root, exist_ok=True)
    d = sum(int(np.prod(s)) for _, s in LAYOUT)
    weights = np.random.default_rng(0).standard_normal((4, d)).astype(np.float32)
    np.save(os.path.join(root, "weights.npy"), weights)
    with open(os.path.join(root, "layout.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["varname", "start_idx", "end_idx", "size", "shape"])
        start = 0
        for name, shape in LAYOUT:
            size = int(np.prod(shape))
            w.writerow([name, start, start + size, size, str(shape)])
            start += size
    header = ["", "config.activation", "config.dataset", "config.learning_rate", "config.train_fraction",
              "modeldir", "step", "test_accuracy", "test_loss", "train_accuracy", "train_loss"]  # fmt: skip
    rows = [
        ["run/a/ckpt-0", "relu", "mnist", "0.01", "0.5", "run/a", "0", "0.1", "2.3", "0.1", "2.3"],
        ["run/a/ckpt-100", "relu", "mnist", "0.01", "0.5", "run/a", "100", "0.9", "0.3", "0.95", "0.2"],
        ["run/b/ckpt-100", "tanh", "mnist", "0.001", "1.0", "run/b", "100", "0.8", "0.5", "0.85", "0.4"],
        ["run/b/ckpt-0", "tanh", "mnist", "0.001", "1.0", "run/b", "0", "0.12", "2.2", "0.11", "2.2"],
    ]
    path = os.path.join(root, "metrics.csv.gz" if gz else "metrics.csv")
    with (gzip.open(path, "wt", newline="") if gz else open(path, "w", newline="")) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return weights


@pytest.mark.parametrize("gz", [False, True])
def test_small_cnn_zoo_converts_tf_layouts(tmp_path, gz):
    flat = write_small_cnn_zoo(tmp_path / "src", gz)
    store = Store(str(tmp_path / "store"))
    assert import_zoo("small-cnn-zoo", str(tmp_path / "src"), store) == 2
    models = store.models().sort("learning_rate").collect()
    assert models["zoo"].to_list() == ["small-cnn-zoo-mnist"] * 2
    assert models["activation"].to_list() == ["tanh", "relu"] and models.schema["learning_rate"] == pl.Float64
    assert models["test_acc"].to_list() == [0.8, 0.9] and models["arch"].to_list() == ["imported"] * 2

    ck = store.checkpoints().filter(pl.col("model_id") == models["model_id"][1]).sort("epoch").collect()
    assert ck["epoch"].to_list() == [0, 100] and ck["test_acc"].to_list() == [0.1, 0.9]

    # model a, step 100 is weights row 1; model b, step 0 is row 3
    for row, mid, step in [(1, models["model_id"][1], 100), (3, models["model_id"][0], 0)]:
        sd = store.state_dict(mid, epoch=step)
        tf_conv = flat[row, 2:20].reshape(3, 3, 1, 2)
        tf_dense = flat[row, 30:50].reshape(2, 10)
        assert sd["conv2d.weight"].shape == (2, 1, 3, 3) and sd["dense.weight"].shape == (10, 2)
        for o in range(2):
            for y in range(3):
                for x in range(3):
                    assert sd["conv2d.weight"][o, 0, y, x] == tf_conv[y, x, 0, o]
        np.testing.assert_array_equal(sd["dense.weight"].numpy(), tf_dense.T)
        np.testing.assert_array_equal(sd["conv2d.bias"].numpy(), flat[row, 0:2])

    weights, biases, ids = export_nfn(store)
    assert [tuple(w.shape) for w in weights] == [(2, 2, 1, 3, 3), (2, 10, 2)]
    assert [tuple(b.shape) for b in biases] == [(2, 2), (2, 10)]


class PublishedCNNS(nn.Module):
    """The Model Zoos CNN-s as published: a Sequential called `module_list`."""

    def __init__(self):
        super().__init__()
        self.module_list = nn.Sequential(
            nn.Conv2d(1, 8, 5), nn.MaxPool2d(2), nn.Tanh(),
            nn.Conv2d(8, 6, 5), nn.MaxPool2d(2), nn.Tanh(),
            nn.Conv2d(6, 4, 2), nn.Tanh(), nn.Flatten(),
            nn.Linear(36, 20), nn.Tanh(), nn.Linear(20, 10),
        )  # fmt: skip

    def forward(self, x):
        return self.module_list(x)


def write_trial(root, seed: int, epochs: list[int], net: nn.Module | None = None) -> list[nn.Module]:
    """A Ray Tune trial directory: params.json, result.json lines, checkpoint_<ep>/checkpoints."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "params.json"), "w") as f:
        json.dump({"model::type": "CNN", "model::nlin": "tanh", "model::dropout": 0.0, "optim::lr": 3e-4, "seed": seed}, f)
    with open(os.path.join(root, "result.json"), "w") as f:
        for it in range(1, max(epochs) + 2):  # iteration 1 evaluates the initial model
            train = -999 if it == 1 else 0.5 + it / 100
            f.write(json.dumps({"train_loss": 1.0, "train_acc": train, "test_loss": 1.0 / it,
                                "test_acc": 0.1 * it + seed / 100, "training_iteration": it}) + "\n")  # fmt: skip
    nets = []
    for e in epochs:
        torch.manual_seed(seed * 100 + e)
        m = PublishedCNNS() if net is None else net
        os.makedirs(os.path.join(root, f"checkpoint_{e:06d}"), exist_ok=True)
        torch.save(m.state_dict(), os.path.join(root, f"checkpoint_{e:06d}", "checkpoints"))
        nets.append(m)
    return nets


def cnn_s_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """Our cnn_s computation written out with the stored (renamed) tensors."""
    x = torch.tanh(F.max_pool2d(F.conv2d(x, sd["conv1.weight"], sd["conv1.bias"]), 2))
    x = torch.tanh(F.max_pool2d(F.conv2d(x, sd["conv2.weight"], sd["conv2.bias"]), 2))
    x = torch.tanh(F.conv2d(x, sd["conv3.weight"], sd["conv3.bias"]))
    x = torch.tanh(x.flatten(1) @ sd["fc1.weight"].flatten(1).T + sd["fc1.bias"])
    return F.linear(x, sd["fc2.weight"], sd["fc2.bias"])


def test_model_zoos_maps_cnn_s_and_keeps_the_function(tmp_path):
    src = tmp_path / "tune_zoo_mnist"
    nets = {s: write_trial(src / f"NN_tune_trainable_{s}", s, [0, 1, 2]) for s in (1, 2)}
    write_trial(src / "odd_trial", 9, [0, 2], net=nn.Sequential(nn.Linear(3, 4)))  # not a CNN-s
    store = Store(str(tmp_path / "store"))
    assert import_zoo("model-zoos", str(src), store) == 3
    models = store.models().collect()
    assert sorted(models["arch"].to_list()) == ["cnn_s", "cnn_s", "imported"]
    row = models.filter(pl.col("seed") == 2).row(0, named=True)
    assert row["zoo"] == "tune_zoo_mnist" and row["optim_lr"] == 3e-4 and row["status"] == "ok"
    assert row["test_acc"] == pytest.approx(0.3 + 0.02)  # epoch 2 = training_iteration 3

    ck = store.checkpoints().filter(pl.col("model_id") == row["model_id"]).sort("epoch").collect()
    assert ck["epoch"].to_list() == [0, 1, 2]
    assert np.isnan(ck["train_acc"][0]) and ck["test_acc"].to_list() == pytest.approx([0.12, 0.22, 0.32])
    curve = store.curves().filter(pl.col("model_id") == row["model_id"]).sort("epoch").collect()
    assert curve.height == 3

    x = torch.randn(5, 1, 28, 28)
    for e in (0, 2):
        sd = store.state_dict(row["model_id"], epoch=e)
        assert sd["fc1.weight"].shape == (20, 4, 3, 3) and float(sd["drop.p"]) == 0.0
        torch.testing.assert_close(cnn_s_forward(sd, x), nets[2][e](x))

    odd = models.filter(pl.col("arch") == "imported").row(0, named=True)
    sd = store.state_dict(odd["model_id"])
    assert set(sd) == {"0.weight", "0.bias"}
    with pytest.raises(StoreError, match="imported without a known architecture"):
        store.load_model(odd["model_id"])

    paths = export_safetensors(store, str(tmp_path / "st"), filter=pl.col("arch") == "cnn_s")
    from safetensors.torch import load_file

    loaded = load_file(paths[0])
    stacked, ids = store.to_torch(filter=pl.col("arch") == "cnn_s")
    torch.testing.assert_close(loaded["conv2.weight"], stacked["conv2.weight"][0])
    weights, biases = nfn_layout(stacked, strict=False)
    assert len(weights) == 5 and tuple(biases[-1].shape) == (2, 10)
    with pytest.raises(StoreError, match="drop.p"):
        nfn_layout(stacked)

    archs = pytest.importorskip("zoos.archs", exc_type=ImportError)
    assert archs is not None
    model = store.load_model(row["model_id"], epoch=2)
    torch.testing.assert_close(model(x), nets[2][2](x))


def test_import_errors_name_the_problem(tmp_path):
    store = Store(str(tmp_path / "store"))
    with pytest.raises(StoreError, match="format 'tar'"):
        import_zoo("tar", str(tmp_path), store)
    with pytest.raises(StoreError, match="not a directory"):
        import_zoo("model-zoos", str(tmp_path / "missing"), store)
    with pytest.raises(StoreError, match="no trial directory"):
        import_zoo("model-zoos", str(tmp_path), store)
    with pytest.raises(StoreError, match="weights.npy"):
        import_zoo("small-cnn-zoo", str(tmp_path), store)
