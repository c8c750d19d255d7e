"""Import published model zoos into a store, so the same queries and analyses run on them.

- Small CNN Zoo (Unterthiner et al. 2020): a directory with `weights.npy` (or `all_weights.npy`)
  [rows, D] of flattened TF checkpoints, `layout.csv` (varname, start_idx, end_idx, size, shape) that
  maps columns to variables, and `metrics.csv[.gz]` (or `all_metrics.csv`) with one row per weights row:
  the checkpoint path as first column, `config.*` hyperparameters, `modeldir`, `step`, accuracies/losses.
  TF kernels are converted to torch layout: conv [kh, kw, in, out] -> [out, in, kh, kw], dense
  [in, out] -> [out, in]. The zoo records training steps, not epochs: the stored `epoch` is the step.
- Model Zoos (Schürholt et al. 2022): Ray Tune trial directories, each with `params.json`,
  `result.json` (JSON lines, one per `training_iteration`; the first line evaluates the initial
  model when a `checkpoint_0` exists) and `checkpoint_<epoch>/checkpoints` (a torch state dict).
  State dicts with the CNN-s shapes are mapped to our `cnn_s` keys (so `store.load_model` works);
  others keep their keys with arch "imported".

Models are grouped into populations of models sharing checkpoint epochs and shapes, written in
shards of at most `shard_size` models.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import pickle
import re
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from zoos.population import PopulationResult, model_id
from zoos.store import Store, StoreError

FORMATS = ("small-cnn-zoo", "model-zoos")
# The CNN-s of the Model Zoos (MNIST-sized input): torch Sequential indices of its parameters.
CNN_S_PUBLISHED = [
    ("module_list.0.weight", (8, 1, 5, 5)), ("module_list.0.bias", (8,)),
    ("module_list.3.weight", (6, 8, 5, 5)), ("module_list.3.bias", (6,)),
    ("module_list.6.weight", (4, 6, 2, 2)), ("module_list.6.bias", (4,)),
    ("module_list.9.weight", (20, 36)), ("module_list.9.bias", (20,)),
    ("module_list.11.weight", (10, 20)), ("module_list.11.bias", (10,)),
]  # fmt: skip
CNN_S_OURS = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "conv3.weight", "conv3.bias",
              "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]  # fmt: skip
CNN_S_FC1 = (20, 4, 3, 3)  # our fc1.weight: the published [20, 36] reshaped over (channel, h, w)


def import_zoo(fmt: str, src: str, store: Store, zoo: str | None = None, shard_size: int = 1000) -> int:
    """Import a published zoo of format `fmt` from directory `src` into `store`; return the models written."""
    if fmt not in FORMATS:
        raise StoreError(f"import format {fmt!r} is not known; allowed: {', '.join(FORMATS)}")
    if not os.path.isdir(src):
        raise StoreError(f"import source {src!r} is not a directory")
    if fmt == "small-cnn-zoo":
        return import_small_cnn_zoo(src, store, zoo=zoo, shard_size=shard_size)
    return import_model_zoos(src, store, zoo=zoo, shard_size=shard_size)


def _write_groups(store: Store, models: list[dict], shard_size: int) -> int:
    """Group imported models (row, epochs, metrics, curves, weights) by (epochs, layout) and write shards."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for m in models:
        layout = tuple((k, v.shape[1:]) for k, v in m["weights"].items())
        groups[(tuple(m["epochs"]), layout)].append(m)
    written = 0
    for (epochs, layout), members in groups.items():
        for start in range(0, len(members), shard_size):
            chunk = members[start : start + shard_size]
            metric_names = sorted({k for m in chunk for k in m["metrics"]})
            curve_names = sorted({k for m in chunk for k in m["curves"]})
            n_curve = max((len(v) for m in chunk for v in m["curves"].values()), default=0)
            result = PopulationResult(
                models=[m["row"] for m in chunk],
                epochs=list(epochs),
                metrics={k: np.stack([m["metrics"].get(k, np.full(len(epochs), np.nan)) for m in chunk]) for k in metric_names},
                weights={k: np.stack([m["weights"][k] for m in chunk]).astype(np.float32) for k, _ in layout},
                curves={k: np.stack([_pad(m["curves"].get(k), n_curve) for m in chunk]) for k in curve_names},
            )
            store.write_population(result)
            written += len(chunk)
    return written


def _pad(values: Any, n: int) -> np.ndarray:
    out = np.full(n, np.nan)
    if values is not None:
        out[: len(values)] = values
    return out


def _number(value: str) -> Any:
    """A CSV cell as int, float, bool or str (empty -> None)."""
    if value == "":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"True": True, "False": False, "true": True, "false": False}.get(value, value)


# --------------------------------------------------------------------------------------------------
# Small CNN Zoo


def _find(src: str, names: Iterable[str]) -> str:
    for name in names:
        if os.path.exists(os.path.join(src, name)):
            return os.path.join(src, name)
    raise StoreError(f"small-cnn-zoo source {src!r} has none of {', '.join(names)}")


def _parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text))


def _tf_key(name: str) -> str:
    """A TF variable name ("sequential/conv2d_1/kernel:0") -> a torch-style key ("conv2d_1.weight")."""
    parts = [p for p in name.split(":")[0].split("/") if p]
    layer, leaf = (parts[-2] if len(parts) > 1 else "layer"), parts[-1]
    return f"{layer}.{ {'kernel': 'weight'}.get(leaf, leaf) }"


@contextmanager
def _reading(path: str, what: str) -> Iterator[None]:
    """A file that is not what its name says becomes a StoreError naming it (not a numpy or json traceback)."""
    try:
        yield
    except StoreError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, EOFError, OSError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: not a readable {what} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None


def import_small_cnn_zoo(src: str, store: Store, zoo: str | None = None, shard_size: int = 1000) -> int:
    """Import a Small CNN Zoo directory (weights.npy + layout.csv + metrics.csv[.gz]); return models written."""
    weights_path = _find(src, ["weights.npy", "all_weights.npy"])
    with _reading(weights_path, "numpy array of floats (weights.npy)"):
        weights = np.load(weights_path, mmap_mode="r")  # never pickles: an object array is refused
        if weights.ndim != 2 or not np.issubdtype(weights.dtype, np.floating):
            raise ValueError(f"expected a 2-D float array, got dtype {weights.dtype} and shape {weights.shape}")
    layout_path = _find(src, ["layout.csv"])
    with _reading(layout_path, "layout table (layout.csv)"), open(layout_path, newline="") as f:
        layout = list(csv.DictReader(f))
    for col in ("varname", "start_idx", "end_idx", "shape"):
        if layout and col not in layout[0]:
            raise StoreError(f"layout.csv has no column {col!r}; columns: {', '.join(layout[0])}")
    metrics_path = _find(src, ["metrics.csv", "metrics.csv.gz", "all_metrics.csv"])
    opener = gzip.open if metrics_path.endswith(".gz") else open
    with _reading(metrics_path, "metrics table (metrics.csv)"), opener(metrics_path, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        table = [dict(zip(header, row)) for row in reader]
    if len(table) != weights.shape[0]:
        raise StoreError(f"{metrics_path} has {len(table)} rows but the weights have {weights.shape[0]}")
    index_col = header[0]

    by_model: dict[str, list[int]] = defaultdict(list)
    for r, row in enumerate(table):
        key = row.get("modeldir") or os.path.dirname(row[index_col])
        by_model[key].append(r)

    variables = []
    for i, v in enumerate(layout):
        with _reading(f"{layout_path} row {i + 1}", "layout row (varname, start_idx, end_idx, shape)"):
            shape = _parse_shape(v["shape"])
            start, end = int(v["start_idx"]), int(v["end_idx"])
        if end - start != math.prod(shape):
            raise StoreError(f"layout.csv row {v['varname']!r}: end_idx - start_idx = {end - start} != prod{shape}")
        variables.append((v["varname"], start, end, shape))

    dataset = (table[0].get("config.dataset") or "unknown") if table else "unknown"
    zoo = zoo or f"small-cnn-zoo-{dataset}".replace("_", "-")
    models = []
    for modeldir, rows in by_model.items():
        rows = sorted(rows, key=lambda r: int(float(table[r].get("step") or 0)))
        first = table[rows[0]]
        factors = {k.removeprefix("config."): _number(v) for k, v in first.items() if k.startswith("config.")}
        factors["modeldir"] = modeldir
        steps = [int(float(table[r].get("step") or 0)) for r in rows]
        w = {}
        for name, start, end, shape in variables:
            w[_tf_key(name)] = np.ascontiguousarray(_batch_tf(name, weights[rows, start:end], shape))
        finals = {k: _number(table[rows[-1]][k]) for k in ("test_accuracy", "test_loss", "train_accuracy", "train_loss") if k in first}
        finite = all(np.isfinite(v).all() for v in w.values())
        row = {
            "model_id": model_id("small-cnn-zoo", zoo, factors),
            "study": "small-cnn-zoo",
            "zoo": zoo,
            "task": dataset,
            "task_config": json.dumps({"name": dataset}),
            "arch": "imported",
            "arch_config": json.dumps({"source": "small-cnn-zoo", "layout": [v["varname"] for v in layout]}),
            **factors,
            "status": "ok" if finite else "diverged",
            **{("test_acc" if k == "test_accuracy" else "train_acc" if k == "train_accuracy" else k): v for k, v in finals.items()},
            "n_params": int(sum(math.prod(s) for *_, s in variables)),
            "epochs": steps[-1],
        }
        metrics = {}
        for k in ("test_accuracy", "test_loss", "train_accuracy", "train_loss"):
            if k in first:
                name = {"test_accuracy": "test_acc", "train_accuracy": "train_acc"}.get(k, k)
                metrics[name] = np.array([float(table[r][k]) if table[r][k] != "" else np.nan for r in rows])
        models.append({"row": row, "epochs": steps, "metrics": metrics, "curves": {}, "weights": w})
    return _write_groups(store, models, shard_size)


def _batch_tf(name: str, flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Rows of flattened TF variables [R, prod(shape)] -> torch layout [R, *torch_shape]."""
    a = np.asarray(flat, dtype=np.float32).reshape(flat.shape[0], *shape)
    leaf = name.split(":")[0].split("/")[-1]
    if leaf == "kernel" and len(shape) == 4:
        return np.transpose(a, (0, 4, 3, 1, 2))
    if leaf == "kernel" and len(shape) == 2:
        return np.transpose(a, (0, 2, 1))
    return a


# --------------------------------------------------------------------------------------------------
# Model Zoos (Ray Tune trial directories)


def _trial_dirs(src: str) -> list[str]:
    """Every directory under `src` holding a params.json (a Ray Tune trial), sorted."""
    out = []
    for dirpath, _, files in os.walk(src):
        if "params.json" in files:
            out.append(dirpath)
    return sorted(out)


def _map_cnn_s(state: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], bool]:
    """Rename a published CNN-s state dict to our `cnn_s` keys when its shapes match, else keep it."""
    items = [(k, tuple(v.shape)) for k, v in state.items()]
    if items == CNN_S_PUBLISHED:
        out = {ours: state[theirs].numpy().astype(np.float32) for ours, (theirs, _) in zip(CNN_S_OURS, CNN_S_PUBLISHED)}
        out["fc1.weight"] = out["fc1.weight"].reshape(CNN_S_FC1)
        return out, True
    return {k: v.numpy().astype(np.float32) for k, v in state.items()}, False


def _load_tensors(path: str) -> dict:
    """A checkpoint's tensors through torch's weights-only unpickler; anything else (code, objects) is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise StoreError(f"refusing checkpoint {path}: it is not a plain tensor state dict, and symzoo never "
                         f"unpickles arbitrary objects ({str(e).splitlines()[0][:160]})") from None


def import_model_zoos(src: str, store: Store, zoo: str | None = None, shard_size: int = 1000) -> int:
    """Import Model Zoos trial directories found under `src`; return the number of models written."""
    trials = _trial_dirs(src)
    if not trials:
        raise StoreError(f"model-zoos source {src!r} has no trial directory (no params.json below it)")
    zoo = zoo or re.sub(r"[^A-Za-z0-9_.=+-]", "-", os.path.basename(os.path.abspath(src))).lstrip(".-") or "model-zoos"
    models = []
    for trial in trials:
        params_path = os.path.join(trial, "params.json")
        with _reading(params_path, "JSON file (Ray Tune's params.json)"), open(params_path) as f:
            params = json.load(f)
        results = []
        result_path = os.path.join(trial, "result.json")
        if os.path.exists(result_path):
            with _reading(result_path, "JSON-lines file (Ray Tune's result.json)"), open(result_path) as f:
                results = [json.loads(line) for line in f if line.strip()]
        ckpts = {}
        for name in os.listdir(trial):
            m = re.fullmatch(r"checkpoint_(\d+)", name)
            if m and os.path.exists(os.path.join(trial, name, "checkpoints")):
                ckpts[int(m.group(1))] = os.path.join(trial, name, "checkpoints")
        if not ckpts:
            continue
        epochs = sorted(ckpts)
        offset = 1 if 0 in ckpts else 0  # result line with training_iteration t describes epoch t - offset
        by_epoch = {int(r["training_iteration"]) - offset: r for r in results if "training_iteration" in r}
        states = [_load_tensors(ckpts[e]) for e in epochs]
        mapped = [_map_cnn_s(s) for s in states]
        is_cnn_s = all(ok for _, ok in mapped)
        weights = {k: np.stack([w[k] for w, _ in mapped]) for k in mapped[0][0]}
        if is_cnn_s:
            weights["drop.p"] = np.full((len(epochs),), float(params.get("model::dropout", 0.0)), dtype=np.float32)
        names = sorted({k for r in results for k, v in r.items() if isinstance(v, (int, float)) and k.endswith(("_acc", "_loss"))})

        def value(r: dict | None, k: str) -> float:
            v = None if r is None else r.get(k)
            return np.nan if v is None or v == -999 else float(v)

        metrics = {k: np.array([value(by_epoch.get(e), k) for e in epochs]) for k in names}
        n_curve = max(by_epoch, default=-1) + 1
        curves = {k: np.array([value(by_epoch.get(e), k) for e in range(n_curve)]) for k in names}
        factors = {k.replace("::", "_"): v for k, v in params.items() if isinstance(v, (int, float, str, bool))}
        last = by_epoch.get(epochs[-1], {})
        finite = all(np.isfinite(v).all() for v in weights.values())
        dataset = str(params.get("dataset::name", params.get("dataset", "mnist"))).lower()
        activation = str(params.get("model::nlin", "tanh")).lower()
        row = {
            "model_id": model_id("model-zoos", zoo, {**factors, "trial": os.path.relpath(trial, src)}),
            "study": "model-zoos",
            "zoo": zoo,
            "task": dataset,
            "task_config": json.dumps({"name": dataset}),
            "arch": "cnn_s" if is_cnn_s else "imported",
            "arch_config": json.dumps({"activation": activation, "dropout": float(params.get("model::dropout", 0.0))})
            if is_cnn_s
            else json.dumps({"source": "model-zoos", "type": params.get("model::type")}),
            **factors,
            "trial": os.path.relpath(trial, src),
            "status": "ok" if finite else "diverged",
            **{k: value(last, k) for k in names},
            "n_params": int(sum(math.prod(v.shape[1:]) for k, v in weights.items() if k != "drop.p")),
            "epochs": epochs[-1],
        }
        models.append({"row": row, "epochs": epochs, "metrics": metrics, "curves": curves, "weights": weights})
    if not models:
        raise StoreError(f"model-zoos source {src!r}: no trial has a checkpoint_<epoch>/checkpoints file")
    return _write_groups(store, models, shard_size)
