"""Import benchmark: a Small CNN Zoo fixture of 10,000 weights rows in the published layout, imported into a store.

The fixture is the published format (Keras variable names in layout.csv, 4,970 columns per row, the README's
metrics.csv.gz columns, 9 checkpoints per model at epochs 0, 1, 2, 3, 20, 40, 60, 80, 86, each row's `step` the
training step (1,875 an epoch), rows in shuffled order).
Prints, measured in one run on this machine: the fixture's size, the import's wall time and throughput
(models/s, rows/s, MB/s of weights), the time to list the models and to `load_model` one of them.

    .venv/bin/python benchmarks/import_bench.py [--rows 10000] [--shard-size 1000]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import platform
import shutil
import tempfile
import time

import numpy as np
import torch

from zoos.importers import import_zoo
from zoos.store import Store

LAYOUT = [
    ("sequential/conv2d/kernel:0", (3, 3, 1, 16)), ("sequential/conv2d/bias:0", (16,)),
    ("sequential/conv2d_1/kernel:0", (3, 3, 16, 16)), ("sequential/conv2d_1/bias:0", (16,)),
    ("sequential/conv2d_2/kernel:0", (3, 3, 16, 16)), ("sequential/conv2d_2/bias:0", (16,)),
    ("sequential/dense/kernel:0", (16, 10)), ("sequential/dense/bias:0", (10,)),
]  # fmt: skip
EPOCHS = [0, 1, 2, 3, 20, 40, 60, 80, 86]
CONFIG = ["activation", "b_init", "dataset", "dnn_architecture", "dropout", "epochs", "epochs_between_checkpoints",
          "init_std", "l2reg", "learning_rate", "num_layers", "num_units", "optimizer", "random_seed",
          "train_fraction", "w_init"]  # fmt: skip


def write_fixture(root: str, rows: int) -> float:
    """weights.npy, layout.csv, metrics.csv.gz of `rows` rows (whole models of 9 checkpoints, then a partial one);
    returns the weights' size in MB."""
    rng = np.random.default_rng(0)
    d = sum(int(np.prod(s)) for _, s in LAYOUT)
    weights = (0.1 * rng.standard_normal((rows, d))).astype(np.float32)
    np.save(os.path.join(root, "weights.npy"), weights)
    with open(os.path.join(root, "layout.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["varname", "start_idx", "end_idx", "size", "shape"])
        start = 0
        for name, shape in LAYOUT:
            n = int(np.prod(shape))
            w.writerow([name, start, start + n, n, str(shape)])
            start += n
    order = rng.permutation(rows)
    with gzip.open(os.path.join(root, "metrics.csv.gz"), "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", *(f"config.{c}" for c in CONFIG), "modeldir", "step", "test_accuracy", "test_loss",
                    "train_accuracy", "train_loss"])  # fmt: skip
        for r in order:
            m, e = divmod(int(r), len(EPOCHS))
            act = ("relu", "tanh")[m % 2]
            config = [act, "zeros", "mnist", "cnn", "0.0", "86", "20", "0.1", "0.0", f"{10 ** -(m % 4 + 1)}", "3", "16",
                      "adam", "42", ("0.1", "0.25", "0.5", "1.0")[m % 4], "he_normal"]  # fmt: skip
            step = EPOCHS[e] * 1875  # 60,000 images in batches of 32
            w.writerow([f"/w/{m}/permanent_ckpt-{step}", *config, f"/w/{m}", step,
                        *(f"{v:.4f}" for v in rng.random(4))])  # fmt: skip
    return weights.nbytes / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--shard-size", type=int, default=1000)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="import_bench_")
    try:
        src = os.path.join(tmp, "mnist")
        os.makedirs(src)
        mb = write_fixture(src, args.rows)
        store = Store(os.path.join(tmp, "store"))
        t0 = time.perf_counter()
        n = import_zoo("small-cnn-zoo", src, store, shard_size=args.shard_size)
        wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        models = store.models().collect()
        t_list = time.perf_counter() - t0
        t0 = time.perf_counter()
        model = store.load_model(models["model_id"][0], epoch=86)
        t_load = time.perf_counter() - t0
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10) and len(models) == n
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
        print(f"fixture: {args.rows} rows x 4970 float32 ({mb:.0f} MB), {n} models (9 checkpoints each), shards of {args.shard_size}")
        print(f"import: {wall:.2f} s = {n / wall:.0f} models/s = {args.rows / wall:.0f} rows/s = {mb / wall:.0f} MB/s of weights")
        print(f"store.models() of {len(models)} rows: {1000 * t_list:.0f} ms; load_model of one: {1000 * t_load:.0f} ms")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
