"""Importers of published zoos, on fixtures written in the published formats from the publications' own code:
every imported model loads and computes what an independent reference written from the publication computes."""

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

from tasks.formats import write_idx
from zoos.export import export_nfn
from zoos.importers import import_zoo
from zoos.store import Store, StoreError

# --------------------------------------------------------------------------------------------------
# Small CNN Zoo: Keras `build_cnn` (3 x Conv2D(16, 3, strides=2, 'valid', activation), GAP, Dense(10))

KERAS_LAYOUT = [  # variable order of the published layout.csv: per layer, bias then kernel
    ("sequential/conv2d/bias:0", (16,)), ("sequential/conv2d/kernel:0", (3, 3, 1, 16)),
    ("sequential/conv2d_1/bias:0", (16,)), ("sequential/conv2d_1/kernel:0", (3, 3, 16, 16)),
    ("sequential/conv2d_2/bias:0", (16,)), ("sequential/conv2d_2/kernel:0", (3, 3, 16, 16)),
    ("sequential/dense/bias:0", (10,)), ("sequential/dense/kernel:0", (16, 10)),
]  # fmt: skip
SMALL_CNN_HEADER = ["", "config.activation", "config.b_init", "config.dataset", "config.dnn_architecture", "config.dropout",
                    "config.epochs", "config.l2reg", "config.learning_rate", "config.num_layers", "config.num_units",
                    "config.optimizer", "config.train_fraction", "config.w_init", "modeldir", "step", "test_accuracy",
                    "test_loss", "train_accuracy", "train_loss"]  # fmt: skip


def keras_cnn_forward(flat: np.ndarray, x: np.ndarray, activation: str) -> np.ndarray:
    """The Small CNN Zoo network on [0, 1] images x [B, C, H, W], from one weights row, in Keras' own layouts:
    scale to [-1, 1], average the channels (`_preprocess_batch`), NHWC valid stride-2 convs, GAP, dense."""
    v, start = {}, 0
    for name, shape in KERAS_LAYOUT:
        n = int(np.prod(shape))
        v[name.split("/")[1] + "/" + name.split("/")[2][:-2]] = flat[start : start + n].reshape(shape).astype(np.float64)
        start += n
    act = {"relu": lambda a: np.maximum(a, 0), "tanh": np.tanh}[activation]
    h = (2.0 * x.astype(np.float64) - 1.0).mean(axis=1)[..., None]  # NHWC, one channel
    for layer in ("conv2d", "conv2d_1", "conv2d_2"):
        k, b = v[f"{layer}/kernel"], v[f"{layer}/bias"]
        oh, ow = (h.shape[1] - 3) // 2 + 1, (h.shape[2] - 3) // 2 + 1
        out = np.zeros((h.shape[0], oh, ow, k.shape[3]))
        for i in range(oh):
            for j in range(ow):
                patch = h[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3, :]
                out[:, i, j, :] = np.einsum("bhwc,hwco->bo", patch, k) + b
        h = act(out)
    return h.mean(axis=(1, 2)) @ v["dense/kernel"] + v["dense/bias"]


def write_small_cnn_zoo(root, gz: bool, dataset: str = "mnist", steps: tuple[int, ...] = (0, 100),
                        x_test: np.ndarray | None = None, y_test: np.ndarray | None = None, metrics: bool = True):
    """Two models x `steps` checkpoints (rows shuffled) in weights.npy / layout.csv / metrics.csv[.gz].
    With test data, the stored test_accuracy is the reference network's accuracy on it; without `metrics`, the
    table has no accuracy or loss columns."""
    os.makedirs(root, exist_ok=True)
    d = sum(int(np.prod(s)) for _, s in KERAS_LAYOUT)
    plan = [(m, act, lr, step) for step in steps for m, act, lr in (("a", "relu", "0.01"), ("b", "tanh", "0.001"))]
    plan = [plan[i] for i in np.random.default_rng(2).permutation(len(plan))]
    weights = (0.3 * np.random.default_rng(0).standard_normal((len(plan), d))).astype(np.float32)
    np.save(os.path.join(root, "weights.npy"), weights)
    with open(os.path.join(root, "layout.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["varname", "start_idx", "end_idx", "size", "shape"])
        start = 0
        for name, shape in KERAS_LAYOUT:
            size = int(np.prod(shape))
            w.writerow([name, start, start + size, size, str(shape)])
            start += size
    rows = []
    for r, (m, act, lr, step) in enumerate(plan):
        acc = 0.1 + r / 10
        if x_test is not None:
            acc = float((keras_cnn_forward(weights[r], x_test, act).argmax(1) == y_test).mean())
        rows.append([f"run/{m}/permanent_ckpt-{step}", act, "zeros", dataset, "cnn", "0.0", "86", "0.0", lr, "3", "16",
                     "adam", "1.0", "he_normal", f"run/{m}", str(step), repr(acc), "2.0", "0.5", "1.5"])  # fmt: skip
    path = os.path.join(root, "metrics.csv.gz" if gz else "metrics.csv")
    with (gzip.open(path, "wt", newline="") if gz else open(path, "w", newline="")) as f:
        w = csv.writer(f)
        keep = len(SMALL_CNN_HEADER) if metrics else SMALL_CNN_HEADER.index("step") + 1
        w.writerow(SMALL_CNN_HEADER[:keep])
        w.writerows(row[:keep] for row in rows)
    return weights, plan


def write_mnist(root, n_train: int = 5001, n_test: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-format IDX files of random images; returns the test images as [0, 1] floats [N, 1, 28, 28] and labels."""
    rng = np.random.default_rng(1)
    os.makedirs(root, exist_ok=True)
    test = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n_test).astype(np.uint8)
    write_idx(os.path.join(root, "train-images-idx3-ubyte"), rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8))
    write_idx(os.path.join(root, "train-labels-idx1-ubyte"), rng.integers(0, 10, n_train).astype(np.uint8))
    write_idx(os.path.join(root, "t10k-images-idx3-ubyte"), test)
    write_idx(os.path.join(root, "t10k-labels-idx1-ubyte"), labels)
    return test[:, None].astype(np.float32) / 255.0, labels.astype(np.int64)


@pytest.mark.parametrize("gz", [False, True])
def test_small_cnn_zoo_loads_as_the_keras_network_and_reproduces_accuracy(tmp_path, gz):
    x_test, y_test = write_mnist(tmp_path / "data")
    epoch_of = {0: 0, 1875: 1, 3750: 2, 5625: 3, 37500: 20}  # training steps (1,875 an epoch) -> the schedule's epochs
    flat, plan = write_small_cnn_zoo(tmp_path / "src", gz, "mnist", tuple(epoch_of), x_test, y_test)
    store = Store(str(tmp_path / "store"))
    assert import_zoo("small-cnn-zoo", str(tmp_path / "src"), store) == 2
    models = store.models().sort("learning_rate").collect()
    assert models["zoo"].to_list() == ["small-cnn-zoo-mnist"] * 2 and models["task"].to_list() == ["mnist"] * 2
    assert models["activation"].to_list() == ["tanh", "relu"] and models.schema["learning_rate"] == pl.Float64
    assert models["arch"].to_list() == ["small_cnn_zoo"] * 2 and models["n_params"].to_list() == [4970] * 2
    config = json.loads(models["arch_config"][1])
    assert config["preprocess"] == {"mean": [0.5], "std": [0.5], "grayscale": "mean"} and config["stride"] == 2

    for mid, name, act in [(models["model_id"][1], "a", "relu"), (models["model_id"][0], "b", "tanh")]:
        ck = store.checkpoints().filter(pl.col("model_id") == mid).sort("epoch").collect()
        assert ck["epoch"].to_list() == [0, 1, 2, 3, 20]
        for step, epoch in epoch_of.items():
            r = plan.index(next(p for p in plan if p[0] == name and p[3] == step))
            model = store.load_model(mid, epoch=epoch)
            want = keras_cnn_forward(flat[r], x_test[:8], act)
            np.testing.assert_allclose(model(torch.from_numpy(x_test[:8])).detach().numpy(), want, rtol=1e-4, atol=1e-5)
            assert ck.filter(pl.col("epoch") == epoch)["test_acc"][0] == pytest.approx(
                float((keras_cnn_forward(flat[r], x_test, act).argmax(1) == y_test).mean()))
        assert store.models().filter(pl.col("model_id") == mid).collect()["epochs"][0] == 20
        # the curves: each metric at the checkpoints' epochs (the checkpoints' values), NaN between them
        curve = store.curves().filter(pl.col("model_id") == mid).sort("epoch").collect()
        assert curve["epoch"].to_list() == list(range(21))
        at = curve.filter(pl.col("test_acc").is_not_nan())
        assert at["epoch"].to_list() == [0, 1, 2, 3, 20] and at["test_acc"].to_list() == ck["test_acc"].to_list()
        assert at["train_loss"].to_list() == ck["train_loss"].to_list()
        # load_model + the recorded task's test data reproduce the stored final accuracy
        task = store.load_task(mid, data_dir=str(tmp_path / "data"))
        x, y = task.load("test")
        with torch.no_grad():
            acc = float((store.load_model(mid)(x).argmax(1) == y).float().mean())
        assert acc == pytest.approx(store.models().filter(pl.col("model_id") == mid).collect()["test_acc"][0])

    weights, biases, _ = export_nfn(store)
    assert [tuple(w.shape) for w in weights] == [(2, 16, 1, 3, 3), (2, 16, 16, 3, 3), (2, 16, 16, 3, 3), (2, 10, 16)]


def test_small_cnn_zoo_run_that_crashed_keeps_the_epochs_of_the_checkpoints_it_has(tmp_path):
    """The published zoo lacks the last checkpoints of runs that crashed: model b here stops after epoch 1."""
    src = tmp_path / "src"
    flat, plan = write_small_cnn_zoo(src, gz=False, steps=(0, 1875, 3750))
    keep = [r for r, p in enumerate(plan) if not (p[0] == "b" and p[3] == 3750)]
    np.save(src / "weights.npy", flat[keep])
    lines = (src / "metrics.csv").read_text().splitlines()
    (src / "metrics.csv").write_text("\n".join([lines[0]] + [lines[r + 1] for r in keep]) + "\n")
    store = Store(str(tmp_path / "store"))
    assert import_zoo("small-cnn-zoo", str(src), store) == 2
    models = store.models().sort("activation").collect()  # relu: a, tanh: b
    assert models["epochs"].to_list() == [2, 1]
    for mid, epochs in zip(models["model_id"], ([0, 1, 2], [0, 1])):
        ck = store.checkpoints().filter(pl.col("model_id") == mid).sort("epoch").collect()
        assert ck["epoch"].to_list() == epochs
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    want = keras_cnn_forward(flat[plan.index(("b", "tanh", "0.001", 1875))], x.numpy(), "tanh")
    np.testing.assert_allclose(store.load_model(models["model_id"][1])(x).detach().numpy(), want, rtol=1e-4, atol=1e-5)


def test_small_cnn_zoo_cifar10_averages_colour_channels(tmp_path):
    flat, plan = write_small_cnn_zoo(tmp_path / "src", True, "cifar10", (0, 100, 200))
    store = Store(str(tmp_path / "store"))
    assert import_zoo("small-cnn-zoo", str(tmp_path / "src"), store) == 2
    row = store.models().filter(pl.col("activation") == "tanh").collect().row(0, named=True)
    assert row["task"] == "cifar10" and row["zoo"] == "small-cnn-zoo-cifar10"
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want = keras_cnn_forward(flat[plan.index(("b", "tanh", "0.001", 200))], x.numpy(), "tanh")
    got = store.load_model(row["model_id"], epoch=2)(x).detach().numpy()  # the third checkpoint: epoch 2
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Model Zoos family: the published Sequential CNNs (`def_net.py`), Ray Tune trial folders, the Phase-Transition ResNet-18


class PublishedCNN(nn.Module):
    """`def_net.py` CNN (CNN-s) and CNN3 (CNN-m) as published: a `module_list` whose indices dropout shifts."""

    def __init__(self, variant: str, channels_in: int, nlin: str, dropout: float):
        super().__init__()
        act = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "leakyrelu": nn.LeakyReLU}[nlin]
        layers: list[nn.Module] = []
        if variant == "CNN":
            spec, flat, drop_all = [(channels_in, 8, 5, True), (8, 6, 5, True), (6, 4, 2, False)], 36, dropout > 0
        else:
            spec, flat, drop_all = [(channels_in, 16, 3, True), (16, 32, 3, True), (32, 15, 3, True)], 60, True
        for c_in, c_out, k, pool in spec:
            layers.append(nn.Conv2d(c_in, c_out, k))
            if pool:
                layers.append(nn.MaxPool2d(2, 2))
            layers.append(act())
            if drop_all and (pool or variant == "CNN3"):
                layers.append(nn.Dropout(dropout))
        layers += [nn.Flatten(), nn.Linear(flat, 20), act()]
        if drop_all:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(20, 10))
        self.module_list = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.module_list:
            x = layer(x)
        return x


def write_published_trial(root, config: dict, nets: list[nn.Module], first_iteration: int = 0,
                          config_name: str = "params.json"):
    """A Ray Tune trial folder as the published trainable leaves it: params.json; result.json with iteration 0 the
    initial evaluation (train metrics -999), iteration n after n epochs; checkpoint_<n>/checkpoints per epoch."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, config_name), "w") as f:
        json.dump(config, f)
    with open(os.path.join(root, "result.json"), "w") as f:
        for it in range(first_iteration, first_iteration + len(nets)):
            train = -999 if it == 0 else 0.5 + it / 100
            f.write(json.dumps({"train_loss": train, "train_acc": train, "test_loss": 1.0 / (it + 1),
                                "test_acc": 0.1 + 0.2 * it, "training_iteration": it, "trial_id": "x"}) + "\n")  # fmt: skip
    for it, net in enumerate(nets, start=first_iteration):
        os.makedirs(os.path.join(root, f"checkpoint_{it:06d}"), exist_ok=True)
        torch.save(net.state_dict(), os.path.join(root, f"checkpoint_{it:06d}", "checkpoints"))


def write_trial(root, seed: int, epochs: list[int]) -> list[nn.Module]:
    """An MNIST CNN-s trial (dropout 0) with checkpoints at `epochs` only, result lines for iterations 0..max(epochs)."""
    torch.manual_seed(seed)
    nets = [PublishedCNN("CNN", 1, "tanh", 0.0).eval() for _ in range(max(epochs) + 1)]
    write_published_trial(root, mz_config("CNN", 1, "tanh", 0.0, "/data/MNIST/dataset.pt", seed), nets)
    for e in range(max(epochs) + 1):
        if e not in epochs:
            path = os.path.join(root, f"checkpoint_{e:06d}")
            os.remove(os.path.join(path, "checkpoints"))
            os.rmdir(path)
    return [nets[e] for e in epochs]


def mz_config(variant: str, channels: int, nlin: str, dropout: float, dump: str, seed: int = 1) -> dict:
    return {"model::type": variant, "model::channels_in": channels, "model::nlin": nlin, "model::dropout": dropout,
            "model::init_type": "kaiming_uniform", "optim::optimizer": "adam", "optim::lr": 1e-3, "optim::wd": 1e-4,
            "seed": seed, "training::batchsize": 10, "training::epochs_train": 3, "cuda": False,
            "dataset::dump": dump}  # fmt: skip


def reference_input(dataset: str, variant: str, x: torch.Tensor) -> torch.Tensor:
    """The generator scripts' transforms on [0, 1] images (after ToTensor)."""
    if dataset == "mnist":
        return (x - 0.1307) / 0.3081
    if dataset == "svhn":  # SVHN CNN-s: Grayscale() (ITU-R 601-2 luma), CenterCrop(28) of 32x32, Normalize(0.5, 0.5)
        x = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])[..., 2:30, 2:30]
        return (x - 0.5) / 0.5
    if variant == "CNN":  # CIFAR-10 CNN-s: Resize((28, 28)) then Normalize(0.5, 0.5)
        x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    return (x - 0.5) / 0.5


MZ_CASES = [  # (variant, dataset, channels, nlin, dropout)
    ("CNN", "mnist", 1, "tanh", 0.0),
    ("CNN", "mnist", 1, "gelu", 0.5),
    ("CNN", "cifar10", 3, "leakyrelu", 0.5),
    ("CNN3", "cifar10", 3, "relu", 0.0),
    ("CNN3", "cifar10", 3, "tanh", 0.5),
]


@pytest.mark.parametrize("variant,dataset,channels,nlin,dropout", MZ_CASES)
def test_model_zoos_cnns_load_as_published_and_epochs_match_iterations(tmp_path, variant, dataset, channels, nlin, dropout):
    src = tmp_path / f"tune_zoo_{variant}_hyperparameter_10_random_seeds"
    dump = f"/ds/zoos/{dataset.upper()}/tune_zoo/dataset.pt"
    torch.manual_seed(0)
    nets = [PublishedCNN(variant, channels, nlin, dropout).eval() for _ in range(4)]
    write_published_trial(src / "NN_tune_trainable_a1_00000_0_seed=1", mz_config(variant, channels, nlin, dropout, dump), nets)
    store = Store(str(tmp_path / "store"))
    assert import_zoo("model-zoos", str(src), store) == 1
    row = store.models().collect().row(0, named=True)
    assert (row["arch"], row["task"], row["dataset"], row["model_dropout"]) == ("model_zoos_cnn", dataset, dataset, dropout)
    assert row["test_acc"] == pytest.approx(0.7)  # the last checkpoint (epoch 3) is training_iteration 3
    ck = store.checkpoints().filter(pl.col("model_id") == row["model_id"]).sort("epoch").collect()
    assert ck["epoch"].to_list() == [0, 1, 2, 3]
    assert ck["test_acc"].to_list() == pytest.approx([0.1, 0.3, 0.5, 0.7])
    assert np.isnan(ck["train_acc"][0]) and ck["train_acc"][1:].to_list() == pytest.approx([0.51, 0.52, 0.53])
    curve = store.curves().filter(pl.col("model_id") == row["model_id"]).sort("epoch").collect()
    assert curve["test_acc"].to_list() == pytest.approx([0.1, 0.3, 0.5, 0.7])

    x = torch.rand(5, channels, 28 if dataset == "mnist" else 32, 28 if dataset == "mnist" else 32)
    for e in (0, 3):
        model = store.load_model(row["model_id"], epoch=e)
        with torch.no_grad():
            torch.testing.assert_close(model(x), nets[e](reference_input(dataset, variant, x)), rtol=1e-5, atol=1e-5)


def test_model_zoos_mnist_accuracy_is_reproduced_from_the_task_data(tmp_path):
    x_test, y_test = write_mnist(tmp_path / "data")
    torch.manual_seed(3)
    net = PublishedCNN("CNN", 1, "tanh", 0.5).eval()
    with torch.no_grad():
        acc = float((net((torch.from_numpy(x_test) - 0.1307) / 0.3081).argmax(1).numpy() == y_test).mean())
    trial = tmp_path / "zoos" / "MNIST" / "tune_zoo_mnist_uniform" / "NN_tune_trainable_0"
    write_published_trial(trial, mz_config("CNN", 1, "tanh", 0.5, "/x/dataset.pt"), [net])
    with open(trial / "result.json", "w") as f:
        f.write(json.dumps({"test_acc": acc, "train_acc": -999, "training_iteration": 0}) + "\n")
    store = Store(str(tmp_path / "store"))
    import_zoo("model-zoos", str(tmp_path / "zoos" / "MNIST"), store)
    mid = store.models().collect()["model_id"][0]
    x, y = store.load_task(mid, data_dir=str(tmp_path / "data")).load("test")
    with torch.no_grad():
        assert float((store.load_model(mid)(x).argmax(1) == y).float().mean()) == pytest.approx(acc)


def test_model_zoos_svhn_cnn_loads_with_the_svhn_task(tmp_path):
    """An SVHN CNN-s (1 input channel: the zoo made the images grey) loads with task svhn and, on the task's
    test images read from the published .mat files, computes the published network on the published transforms."""
    import scipy.io

    rng = np.random.default_rng(6)
    (tmp_path / "data").mkdir()
    for name, n in (("train_32x32.mat", 5001), ("test_32x32.mat", 7)):  # the task's default n_val is 5000
        scipy.io.savemat(str(tmp_path / "data" / name), {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                                          "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})
    torch.manual_seed(4)
    nets = [PublishedCNN("CNN", 1, "relu", 0.0).eval() for _ in range(2)]
    src = tmp_path / "zoos" / "SVHN" / "tune_zoo_svhn_kaiming_uniform"
    write_published_trial(src / "NN_tune_trainable_0", mz_config("CNN", 1, "relu", 0.0, "/ds/SVHN/dataset.pt"), nets)
    store = Store(str(tmp_path / "store"))
    assert import_zoo("model-zoos", str(src), store) == 1
    row = store.models().collect().row(0, named=True)
    assert (row["arch"], row["task"], row["dataset"]) == ("model_zoos_cnn", "svhn", "svhn")
    assert json.loads(row["arch_config"])["preprocess"] == {"grayscale": "luma", "crop": 28, "mean": [0.5], "std": [0.5]}
    x, y = store.load_task(row["model_id"], data_dir=str(tmp_path / "data")).load("test")
    assert x.shape == (7, 3, 32, 32) and y.min() >= 0 and y.max() <= 9
    for e in (0, 1):
        with torch.no_grad():
            out = store.load_model(row["model_id"], epoch=e)(x)
            assert out.shape == (7, 10)
            torch.testing.assert_close(out, nets[e](reference_input("svhn", "CNN", x)), rtol=1e-5, atol=1e-5)


class PublishedResNet18Width(nn.Module):
    """The Phase-Transition zoo's ResNet18_width written from its definition: torchvision ResNet with BasicBlocks
    [2, 2, 2, 2], conv1 replaced by a 3x3 stride-1 conv, max-pool by Identity; torchvision's module names."""

    class Block(nn.Module):
        def __init__(self, c_in, c, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)
            self.downsample = (nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), nn.BatchNorm2d(c))
                               if stride != 1 or c_in != c else None)  # fmt: skip

        def forward(self, x):
            out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    def __init__(self, width: int, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.Identity()
        c_in = width
        for i, m in enumerate((1, 2, 4, 8)):
            setattr(self, f"layer{i + 1}", nn.Sequential(self.Block(c_in, width * m, 1 if i == 0 else 2),
                                                         self.Block(width * m, width * m, 1)))
            c_in = width * m
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, classes)
        with torch.no_grad():  # trained-looking BatchNorm statistics
            for mod in self.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.normal_(0, 0.1)
                    mod.running_var.uniform_(0.5, 2.0)
                    mod.weight.normal_(1, 0.2)
                    mod.bias.normal_(0, 0.1)
                    mod.num_batches_tracked.fill_(391)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_phase_transition_resnet18_with_config_json(tmp_path):
    src = tmp_path / "Cifar-10" / "Resnet18_width_v2" / "tune_zoo_cifar-10_Resnet18_width_kaiming_uniform_150eps_width_4-8"
    os.makedirs(src)
    with open(src / "config.json", "w") as f:  # the experiment's own config.json (grid values as strings): not a model
        json.dump({"model::type": "Resnet18_width", "model::width": "{'grid_search': [4, 8]}"}, f)
    torch.manual_seed(0)
    nets = [PublishedResNet18Width(4).eval() for _ in range(3)]
    config = {"model::type": "Resnet18_width", "model::channels_in": 3, "model::o_dim": 10, "model::nlin": "relu",
              "model::dropout": 0.0, "model::init_type": "kaiming_uniform", "model::use_bias": False, "model::width": 4,
              "optim::optimizer": "sgd", "optim::lr": 0.1, "seed": 0, "training::batchsize": 128,
              "dataset::dump": "/ds2/model_zoos/taxonomy/cifar_10/dataset_preprocessed.pt"}  # fmt: skip
    write_published_trial(src / "NN_tune_trainable_8c2f4_00000_0_batchsize=128,width=4", config, nets, config_name="config.json")
    store = Store(str(tmp_path / "store"))
    assert import_zoo("model-zoos", str(src), store) == 1
    row = store.models().collect().row(0, named=True)
    assert (row["arch"], row["task"], json.loads(row["arch_config"])["width"]) == ("resnet18_width", "cifar10", 4)
    assert row["n_params"] == sum(p.numel() for p in nets[0].parameters())
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor([125.3, 123.0, 113.9])[:, None, None] / 255
    std = torch.tensor([63.0, 62.1, 66.7])[:, None, None] / 255
    for e in (0, 2):
        with torch.no_grad():
            torch.testing.assert_close(store.load_model(row["model_id"], epoch=e)(x), nets[e]((x - mean) / std),
                                       rtol=1e-4, atol=1e-5)
    ck = store.checkpoints().filter(pl.col("model_id") == row["model_id"]).sort("epoch").collect()
    assert ck["test_acc"].to_list() == pytest.approx([0.1, 0.3, 0.5])


# --------------------------------------------------------------------------------------------------
# Malformed sources: one line naming the file and the problem, nothing written


def _good_trial(root) -> None:
    torch.manual_seed(0)
    write_published_trial(root, mz_config("CNN", 1, "tanh", 0.0, "/d/MNIST/dataset.pt"), [PublishedCNN("CNN", 1, "tanh", 0.0)] * 2)


def _break_result(trial):
    with open(trial / "result.json", "a") as f:
        f.write("{not json\n")


def _break_checkpoint(trial):
    os.remove(trial / "checkpoint_000001" / "checkpoints")


def _break_dropout_indices(trial):  # says dropout 0.5, but the checkpoints have the no-dropout indices
    cfg = json.loads((trial / "params.json").read_text())
    (trial / "params.json").write_text(json.dumps({**cfg, "model::dropout": 0.5}))


def _break_pickle(trial):
    torch.save({"w": torch.zeros(2), "code": print}, trial / "checkpoint_000001" / "checkpoints")


def _truncate_checkpoint(trial):
    path = trial / "checkpoint_000001" / "checkpoints"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble_checkpoint(trial):
    path = trial / "checkpoint_000001" / "checkpoints"
    data = bytearray(path.read_bytes())
    data[100:300] = np.random.default_rng(3).integers(0, 256, 200, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def _break_type(trial):
    cfg = json.loads((trial / "params.json").read_text())
    (trial / "params.json").write_text(json.dumps({**cfg, "model::type": "MLP"}))


@pytest.mark.parametrize(
    "breaker,match",
    [
        (_break_result, r"result\.json: not a readable JSON-lines file .*line 3 is not JSON"),
        (_break_checkpoint, r"checkpoint_000001: no 'checkpoints' file"),
        (_break_dropout_indices, r"checkpoints: keys .* are not a CNN with dropout 0.5 .*0, 4, 8, 11, 14"),
        (_break_pickle, r"refusing checkpoint .*checkpoint_000001/checkpoints: it is not a plain tensor state dict"),
        (_truncate_checkpoint, r"checkpoint .*checkpoint_000001/checkpoints is damaged or not a torch checkpoint: "),
        (_garble_checkpoint, r"checkpoint .*checkpoint_000001/checkpoints is damaged or not a torch checkpoint: "),
        (_break_type, r"params\.json: model::type 'MLP'"),
    ],
)
def test_malformed_model_zoos_folder_is_refused_whole(tmp_path, breaker, match):
    src = tmp_path / "tune_zoo_mnist"
    _good_trial(src / "a")
    _good_trial(src / "b")
    breaker(src / "b")
    store = Store(str(tmp_path / "store"))
    with pytest.raises(StoreError, match=match) as e:
        import_zoo("model-zoos", str(src), store)
    assert "\n" not in str(e.value) and str(src / "b") in str(e.value)
    assert not os.path.exists(tmp_path / "store") or store.models().collect().height == 0


def test_malformed_small_cnn_zoo_is_refused(tmp_path):
    src = tmp_path / "src"
    write_small_cnn_zoo(src, gz=False, steps=(0, 100, 200))
    store = Store(str(tmp_path / "store"))
    text = (src / "layout.csv").read_text().replace("sequential/dense/kernel:0", "sequential/batch_normalization/gamma:0")
    (src / "layout.csv").write_text(text)
    with pytest.raises(StoreError, match=r"layout\.csv: variable 'sequential/batch_normalization/gamma:0' is not"):
        import_zoo("small-cnn-zoo", str(src), store)
    write_small_cnn_zoo(src, gz=False, steps=(0, 100, 200))
    lines = (src / "metrics.csv").read_text().splitlines()
    (src / "metrics.csv").write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(StoreError, match=r"metrics\.csv has 2 rows but .*weights\.npy has 6"):
        import_zoo("small-cnn-zoo", str(src), store)
    write_small_cnn_zoo(src, gz=False, steps=(-1, 100))
    with pytest.raises(StoreError, match=r"metrics\.csv row \d: step -1 is negative; a checkpoint's training step"):
        import_zoo("small-cnn-zoo", str(src), store)
    write_small_cnn_zoo(src, gz=False, steps=(0, 100, 100))
    with pytest.raises(StoreError, match=r"metrics\.csv \(model run/[ab]\): two checkpoints at one training step "
                                         r"\(0, 100, 100\)"):
        import_zoo("small-cnn-zoo", str(src), store)
    write_small_cnn_zoo(src, gz=False, steps=tuple(range(0, 1000, 100)))
    with pytest.raises(StoreError, match=r"10 checkpoints, but the published zoo keeps 9 a model \(epochs 0, 1, 2, 3, "
                                         r"20, 40, 60, 80, 86\)"):
        import_zoo("small-cnn-zoo", str(src), store)
    assert not os.path.exists(tmp_path / "store") or store.models().collect().height == 0


def test_import_errors_name_the_problem(tmp_path):
    store = Store(str(tmp_path / "store"))
    with pytest.raises(StoreError, match="format 'tar'"):
        import_zoo("tar", str(tmp_path), store)
    with pytest.raises(StoreError, match="not a directory; model-zoos expects .*params.json or config.json"):
        import_zoo("model-zoos", str(tmp_path / "missing"), store)
    with pytest.raises(StoreError, match="no model folder"):
        import_zoo("model-zoos", str(tmp_path), store)
    with pytest.raises(StoreError, match="weights.npy"):
        import_zoo("small-cnn-zoo", str(tmp_path), store)


def test_import_help_names_the_folder_and_files():
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = CliRunner().invoke(app, ["import", "--help"], terminal_width=200).output
    for word in ("weights.npy", "layout.csv", "metrics.csv", "params.json", "config.json", "result.json", "checkpoint_"):
        assert word in out, word


def test_checkpoint_folders_named_in_results_take_that_iteration(tmp_path):
    """Ray >= 2.7 numbers checkpoint folders by count and names each in its result line: the name decides the epoch."""
    trial = tmp_path / "tune_zoo_mnist" / "t0"
    torch.manual_seed(0)
    nets = [PublishedCNN("CNN", 1, "tanh", 0.0).eval() for _ in range(2)]
    write_published_trial(trial, mz_config("CNN", 1, "tanh", 0.0, "/d/mnist/dataset.pt"), nets)  # checkpoint_000000, _000001
    with open(trial / "result.json", "w") as f:
        for it in (1, 2, 3):
            line = {"test_acc": it / 10, "training_iteration": it}
            if it in (2, 3):
                line["checkpoint_dir_name"] = f"checkpoint_{it - 2:06d}"
            f.write(json.dumps(line) + "\n")
    store = Store(str(tmp_path / "store"))
    import_zoo("model-zoos", str(tmp_path / "tune_zoo_mnist"), store)
    ck = store.checkpoints().sort("epoch").collect()
    assert ck["epoch"].to_list() == [2, 3] and ck["test_acc"].to_list() == pytest.approx([0.2, 0.3])
    mid = ck["model_id"][0]
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(store.load_model(mid, epoch=3)(x), nets[1]((x - 0.1307) / 0.3081))


def test_cli_import_of_a_malformed_folder_exits_2_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    src = tmp_path / "tune_zoo_mnist"
    _good_trial(src / "a")
    _break_checkpoint(src / "a")
    r = CliRunner().invoke(app, ["import", "model-zoos", str(src), str(tmp_path / "store")])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "checkpoint_000001: no 'checkpoints' file" in lines[0], r.output
    assert not os.path.exists(tmp_path / "store" / "manifest")


def _tree(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_cli_import_refuses_a_zoo_of_another_arch_an_empty_name_and_a_file_as_store(tmp_path):
    """Each refused in one stderr line naming the value, exit 2, the store left as it was: a zoo already holding
    another architecture / task (a Model Zoos CNN on MNIST beside Small CNN Zoo models would mix in one zoo), an
    empty --zoo (not quietly the default name), a store path that is a file or lies under one."""
    from typer.testing import CliRunner

    from pipeline.cli import app
    from zoos.store import Store

    write_trial(tmp_path / "published" / "trial_0", 0, [0, 1])
    write_small_cnn_zoo(tmp_path / "scz", gz=False)
    store = tmp_path / "store"
    r = CliRunner().invoke(app, ["import", "model-zoos", str(tmp_path / "published"), str(store), "--zoo", "zA"])
    assert r.exit_code == 0, r.output
    (tmp_path / "afile").write_text("the user's")
    before = _tree(tmp_path)
    for zoo_args, store_arg, says in [
        (["--zoo", "zA"], str(store), ["zoo 'zA'", "holds model_zoos_cnn on mnist", "small_cnn_zoo on mnist", "--zoo"]),
        (["--zoo", ""], str(store), ["zoo name '' (--zoo) is empty"]),
        ([], str(tmp_path / "afile"), [f"store '{tmp_path / 'afile'}' is a file, not a folder"]),
        ([], str(tmp_path / "afile" / "s"), [f"is under '{tmp_path / 'afile'}', a file, not a folder"]),
    ]:
        r = CliRunner().invoke(app, ["import", "small-cnn-zoo", str(tmp_path / "scz"), store_arg, *zoo_args])
        assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1, (zoo_args, store_arg, r.output)
        assert all(s in r.stderr for s in says) and "Errno" not in r.stderr, (says, r.stderr)
        assert _tree(tmp_path) == before, "nothing written"
    assert Store(str(store)).zoos() == ["zA"]
    r = CliRunner().invoke(app, ["import", "small-cnn-zoo", str(tmp_path / "scz"), str(store), "--zoo", "zB"])
    assert r.exit_code == 0 and Store(str(store)).zoos() == ["zA", "zB"], r.output



def test_importing_a_grown_folder_again_stores_each_model_once(tmp_path):
    """A folder re-imported after trials were added (its models grouped into other shards than before) replaces the
    zoo's earlier copies: each model stored once. A second folder holding another copy of one trial (the same
    config, so the same model id; other weights) replaces that model's copy; the first import's others stay."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    src = tmp_path / "tune_zoo_mnist"
    nets = {s: write_trial(src / f"trial_{s}", s, [0, 1]) for s in range(3)}
    store = str(tmp_path / "store")
    assert import_zoo("model-zoos", str(src), Store(store), zoo="z") == 3
    nets[3] = write_trial(src / "trial_3", 3, [0, 1])
    r = CliRunner().invoke(app, ["import", "model-zoos", str(src), store, "--zoo", "z"])
    assert r.exit_code == 0 and " ".join(r.output.split()).endswith("(3 of them already there: rewritten)"), r.output
    s = Store(store)
    models = s.models().collect()
    assert models.height == 4 and models["model_id"].n_unique() == 4 and len(s.manifests()) == 1
    assert s.checkpoints().collect().height == 4 * 2 and s.verify() == []

    other = tmp_path / "more"
    nets[4] = write_trial(other / "trial_4", 4, [0, 1])
    torch.manual_seed(99)
    nets[2] = [PublishedCNN("CNN", 1, "tanh", 0.0).eval() for _ in range(2)]
    write_published_trial(other / "trial_2", mz_config("CNN", 1, "tanh", 0.0, "/data/MNIST/dataset.pt", 2), nets[2])
    assert import_zoo("model-zoos", str(other), s, zoo="z") == 2
    models = s.models().collect()
    assert models.height == 5 and models["model_id"].n_unique() == 5 and len(s.manifests()) == 2 and s.verify() == []
    x = torch.rand(4, 1, 28, 28)
    for seed, model_id in zip(models["seed"], models["model_id"]):
        for epoch in (0, 1):
            with torch.no_grad():
                torch.testing.assert_close(s.load_model(model_id, epoch=epoch)(x),
                                           nets[seed][epoch](reference_input("mnist", "CNN", x)), rtol=1e-5, atol=1e-5)
