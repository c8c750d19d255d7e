"""Import published model zoos into a store, so that the same queries, `store.load_model` and analyses run on them.

Every imported model gets a registered architecture (`zoos.archs.published`) that computes what the
publication's code computed, with the publication's input pipeline in its `preprocess` config, and the task
it was trained on (where symzoo has that task: mnist, fashion_mnist, cifar10, svhn). A source that does not read
as its format is refused with one line naming the file and what is wrong, before anything is written.

- small-cnn-zoo (Unterthiner et al. 2020, "Small CNN Zoo"): one dataset's folder, as unpacked from its
  tar.xz, holding `weights.npy` (or `all_weights.npy`) [rows, D] of flattened Keras checkpoints,
  `layout.csv` (varname, start_idx, end_idx, size, shape) mapping columns to variables, and
  `metrics.csv[.gz]` (or `all_metrics.csv`) with one row per weights row: the checkpoint path as first
  column, `config.*` hyperparameters, `modeldir`, `step`, accuracies and losses. Arch `small_cnn_zoo`
  (Keras kernels converted: conv [kh, kw, in, out] -> [out, in, kh, kw], dense [in, out] -> [out, in]);
  `step` is the training step of a checkpoint, and a model's checkpoints in step order are at the published
  schedule's epochs (0, 1, 2, 3, 20, 40, 60, 80, 86: `SMALL_CNN_EPOCHS`), the stored `epoch`; the curves hold
  each metric at those epochs (NaN between them).
- model-zoos (Schürholt et al. 2022 "Model Zoos", the 2025 Phase-Transition model zoo and the zoos
  that share their folder-per-model layout): a folder holding, at any depth, one folder per model (a Ray
  Tune trial) with `params.json` (or `config.json`: the `model::`, `optim::`, `training::`, `dataset::`
  config), `result.json` (JSON lines, one per `training_iteration`) and `checkpoint_<n>/checkpoints` (a
  torch state dict). The published trainables evaluate the initial model as iteration 0 and train one epoch
  per iteration, so epoch n is `checkpoint_<n>` and the result line with training_iteration n (the official
  loader's rule, epoch == training_iteration); where result lines name their `checkpoint_dir_name` (Ray >= 2.7
  numbers checkpoint folders by count, not iteration), a folder's epoch is that line's training_iteration.
  Model types: CNN, CNN2, CNN3 -> `model_zoos_cnn` (published `module_list` indices, which dropout shifts);
  Resnet18 and Resnet18_width -> `resnet18_width`; any other type is refused, naming it. The dataset
  is read from `dataset::dump` / `training::data_path` and the folder names; its normalisation from the
  publication's generator scripts.

Models are grouped into populations of models sharing checkpoint epochs and shapes, written in shards of at
most `shard_size` models.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import os
import pickle
import re
import warnings
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from zoos.population import PopulationResult, model_id
from zoos.store import Store, StoreError

FORMATS = ("small-cnn-zoo", "model-zoos")
FORMAT_HELP = {
    "small-cnn-zoo": "a Small CNN Zoo dataset folder (e.g. mnist/ from mnist.tar.xz): weights.npy, layout.csv, "
    "metrics.csv.gz",
    "model-zoos": "a Model Zoos / Phase-Transition zoo folder: one folder per model (at any depth) with params.json "
    "or config.json, result.json and checkpoint_<n>/checkpoints",
}
# symzoo task of each published dataset name; datasets not listed keep their own name as task (no loader yet).
# Published hyperparameter columns -> symzoo's factor names (`zoos.spec.FACTORS`), added beside the published ones
# (which stay, and alone name a model's id), so one query compares e.g. learning rates of trained and imported zoos
FACTOR_ALIASES = {"learning_rate": "lr", "optim_lr": "lr", "optim_optimizer": "optimizer", "optim_wd": "weight_decay",
                  "model_nlin": "activation", "model_dropout": "dropout", "training_batchsize": "batch_size",
                  "model_width": "width"}


def _aliases(factors: dict[str, Any]) -> dict[str, Any]:
    """The published factors under symzoo's names too, where a factor of that name is not published already."""
    return {ours: factors[theirs] for theirs, ours in FACTOR_ALIASES.items() if theirs in factors and ours not in factors}


TASKS = {"mnist": "mnist", "fashion_mnist": "fashion_mnist", "cifar10": "cifar10", "svhn": "svhn"}


def import_zoo(fmt: str, src: str, store: Store, zoo: str | None = None, shard_size: int = 1000) -> int:
    """Import a published zoo of format `fmt` from directory `src` into `store`; return the models written. Refused
    before anything is written: an empty zoo name, a store path that is a file, a zoo of the store that holds another
    architecture or task."""
    if fmt not in FORMATS:
        raise StoreError(f"import format {fmt!r} is not known; allowed: {', '.join(FORMATS)}")
    if zoo is not None and not zoo.strip():
        raise StoreError(f"zoo name {zoo!r} (--zoo) is empty: give a name, or leave --zoo out for the source's own")
    if not os.path.isdir(src):
        raise StoreError(f"import source {src!r} is not a directory; {fmt} expects {FORMAT_HELP[fmt]}")
    _check_store_folder(store)
    if fmt == "small-cnn-zoo":
        return import_small_cnn_zoo(src, store, zoo=zoo, shard_size=shard_size)
    return import_model_zoos(src, store, zoo=zoo, shard_size=shard_size)


def _check_fits(arch: str, arch_config: dict, task: str, weights: dict[str, np.ndarray], where: str,
                cache: dict) -> None:
    """Refuse weights that do not load into `arch` built for `task` (keys and shapes), naming `where`.
    Tasks symzoo does not have are not checked."""
    from tasks import TASKS as REGISTERED, get_task
    from zoos.archs import build_arch

    if task not in REGISTERED:
        return
    key = (arch, json.dumps(arch_config, sort_keys=True), task)
    if key not in cache:
        with torch.device("meta"):
            cache[key] = {k: tuple(v.shape) for k, v in build_arch(arch, get_task(task), **arch_config).state_dict().items()}
    want = cache[key]
    got = {k: tuple(v.shape[1:]) for k, v in weights.items()}
    for k in sorted(set(want) | set(got)):
        if want.get(k) != got.get(k):
            raise StoreError(f"{where}: {k!r} has shape {got.get(k)} but {arch} {arch_config} on {task} needs {want.get(k)}")


def _check_store_folder(store: Store) -> None:
    """StoreError when a local store's path, or a path above it, is a file: a store is a folder."""
    if not store.local:
        return
    path = os.path.abspath(store.root)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "is a file" if path == os.path.abspath(store.root) else f"is under {path!r}, a file"
        raise StoreError(f"store {store.uri!r} {where}, not a folder: give a store folder (a new or an existing one)")


def _check_same_kind(store: Store, models: list[dict]) -> None:
    """StoreError when the zoo the models are imported into already holds models of another architecture or task:
    a zoo is one architecture on one task, so its analyses compare like with like."""
    zoo = models[0]["row"]["zoo"]
    if not store.exists or zoo not in store.zoos():
        return
    held = {(r["arch"], r["task"]) for r in store.models(zoo).select("arch", "task").unique().collect().to_dicts()}
    new = {(m["row"]["arch"], m["row"]["task"]) for m in models}
    if not new <= held:
        shown = lambda pairs: ", ".join(f"{a} on {t}" for a, t in sorted(pairs))  # noqa: E731
        raise StoreError(f"zoo {zoo!r} of store {store.uri!r} holds {shown(held)} models; these are {shown(new - held)}: "
                         "import them under another zoo name (--zoo)")


def _write_groups(store: Store, models: list[dict], shard_size: int) -> int:
    """Group imported models (row, epochs, metrics, curves, weights) by (epochs, layout) and write shards, after
    checking the zoo they go into holds the same architecture and task; then the zoo's earlier copies of these
    models (an import before, grouped otherwise) are removed, so each model is stored once."""
    if not models:
        return 0
    _check_same_kind(store, models)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for m in models:
        layout = tuple((k, v.shape[1:]) for k, v in m["weights"].items())
        groups[(tuple(m["epochs"]), layout)].append(m)
    shards = []
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
            shards.append(store.write_population(result))
    store.remove_models(models[0]["row"]["zoo"], {m["row"]["model_id"] for m in models}, keep=shards)
    return len(models)


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



@contextmanager
def _reading(path: str, what: str) -> Iterator[None]:
    """A file that is not what its name says becomes a StoreError naming it (not a numpy or json traceback)."""
    try:
        yield
    except StoreError:
        raise
    except (ValueError, KeyError, IndexError, TypeError, EOFError, OSError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: not a readable {what} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None


# --------------------------------------------------------------------------------------------------
# Small CNN Zoo


# The published zoo's checkpoints (its README): epochs 0 (initialisation), 1, 2, 3, 20, 40, 60, 80 and 86 of training,
# each row's `step` the training step it was taken at; a run that crashed lost its last checkpoints
SMALL_CNN_EPOCHS = (0, 1, 2, 3, 20, 40, 60, 80, 86)


def _small_cnn_epochs(steps: list[int], where: str) -> list[int]:
    """The epochs of one model's checkpoints, given their training steps in ascending order: the k-th is at the
    published schedule's k-th epoch. StoreError for two checkpoints at one step or more than the schedule holds."""
    if len(set(steps)) < len(steps):
        raise StoreError(f"{where}: two checkpoints at one training step ({', '.join(map(str, steps))})")
    if len(steps) > len(SMALL_CNN_EPOCHS):
        raise StoreError(f"{where}: {len(steps)} checkpoints, but the published zoo keeps {len(SMALL_CNN_EPOCHS)} a model "
                         f"(epochs {', '.join(map(str, SMALL_CNN_EPOCHS))})")
    return list(SMALL_CNN_EPOCHS[: len(steps)])


def _find(src: str, names: Iterable[str]) -> str:
    for name in names:
        if os.path.exists(os.path.join(src, name)):
            return os.path.join(src, name)
    raise StoreError(f"small-cnn-zoo source {src!r} has none of {', '.join(names)}; it expects {FORMAT_HELP['small-cnn-zoo']}")


def _parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text))


def _keras_layer(name: str) -> tuple[str, int, str]:
    """"sequential/conv2d_2/kernel:0" -> ("conv2d", 2, "kernel"): Keras layer kind, its number, the variable."""
    parts = [p for p in name.split(":")[0].split("/") if p]
    layer, leaf = (parts[-2] if len(parts) > 1 else ""), parts[-1]
    m = re.fullmatch(r"([a-z0-9]+?)(?:_(\d+))?", layer)
    if not m:
        return layer, 0, leaf
    return m.group(1), int(m.group(2) or 0), leaf


def _small_cnn_layout(layout_path: str, variables: list[tuple[str, int, int, tuple[int, ...]]]) -> tuple[dict, list]:
    """Map Keras variables to `small_cnn_zoo` keys: conv2d, conv2d_1, ... -> convs.i; the dense layer -> head.
    Returns (arch shape facts, [(varname, start, end, keras shape, our key)])."""
    convs: dict[int, dict[str, Any]] = defaultdict(dict)
    dense: dict[str, Any] = {}
    for v in variables:
        kind, n, leaf = _keras_layer(v[0])
        if kind == "conv2d" and leaf in ("kernel", "bias"):
            convs[n][leaf] = v
        elif kind == "dense" and n == 0 and leaf in ("kernel", "bias"):
            dense[leaf] = v
        else:
            raise StoreError(f"{layout_path}: variable {v[0]!r} is not a conv2d or dense kernel/bias of the Small CNN "
                             "Zoo's Keras CNN (conv2d, conv2d_1, ..., dense)")
    order = sorted(convs)
    if not order or order != list(range(len(order))) or set(dense) != {"kernel", "bias"} or \
            any(set(convs[i]) != {"kernel", "bias"} for i in order):  # fmt: skip
        raise StoreError(f"{layout_path}: expected kernel and bias of conv2d, conv2d_1, ... and of one dense layer; "
                         f"found {', '.join(v[0] for v in variables)}")
    mapped, c_in, width = [], None, None
    for i in order:
        k = convs[i]["kernel"][3]
        if len(k) != 4 or k[:2] != (3, 3) or (width is not None and k[2] != width):
            raise StoreError(f"{layout_path}: {convs[i]['kernel'][0]!r} has shape {k}; expected [3, 3, in, out] chained")
        c_in = k[2] if c_in is None else c_in
        width = k[3]
        mapped += [(*convs[i]["kernel"], f"convs.{i}.weight"), (*convs[i]["bias"], f"convs.{i}.bias")]
    dk = dense["kernel"][3]
    if len(dk) != 2 or dk[0] != width:
        raise StoreError(f"{layout_path}: {dense['kernel'][0]!r} has shape {dk}; expected [{width}, classes]")
    mapped += [(*dense["kernel"], "head.weight"), (*dense["bias"], "head.bias")]
    return {"depth": len(order), "width": width, "channels": c_in, "classes": dk[1]}, mapped


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
    if not layout:
        raise StoreError(f"{layout_path}: no variables listed")
    for col in ("varname", "start_idx", "end_idx", "shape"):
        if col not in layout[0]:
            raise StoreError(f"{layout_path} has no column {col!r}; columns: {', '.join(layout[0])}")
    metrics_path = _find(src, ["metrics.csv", "metrics.csv.gz", "all_metrics.csv"])
    opener = gzip.open if metrics_path.endswith(".gz") else open
    with _reading(metrics_path, "metrics table (metrics.csv)"), opener(metrics_path, "rt", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        table = list(reader)
    if len(table) != weights.shape[0]:
        raise StoreError(f"{metrics_path} has {len(table)} rows but {weights_path} has {weights.shape[0]}")
    col = {name: i for i, name in enumerate(header)}
    if "step" not in col:
        raise StoreError(f"{metrics_path} has no column 'step'; columns: {', '.join(header)}")

    variables = []
    for i, v in enumerate(layout):
        with _reading(f"{layout_path} row {i + 1}", "layout row (varname, start_idx, end_idx, shape)"):
            shape = _parse_shape(v["shape"])
            start, end = int(v["start_idx"]), int(v["end_idx"])
        if end - start != math.prod(shape) or start < 0 or end > weights.shape[1]:
            raise StoreError(f"{layout_path} row {v['varname']!r}: columns {start}:{end} do not hold prod{shape} values "
                             f"of the {weights.shape[1]} in {os.path.basename(weights_path)}")
        variables.append((v["varname"], start, end, shape))
    facts, mapped = _small_cnn_layout(layout_path, variables)

    steps = np.empty(len(table), dtype=np.int64)
    for r, row in enumerate(table):
        with _reading(f"{metrics_path} row {r + 2}", "metrics row (a number in 'step')"):
            steps[r] = int(float(row[col["step"]]))
        if steps[r] < 0:
            raise StoreError(f"{metrics_path} row {r + 2}: step {steps[r]} is negative; a checkpoint's training step is "
                             "0 or more")
    key_col = col.get("modeldir")
    by_model: dict[str, list[int]] = defaultdict(list)
    for r, row in enumerate(table):
        by_model[row[key_col] if key_col is not None and row[key_col] else os.path.dirname(row[0])].append(r)

    config_cols = [(name.removeprefix("config."), i) for name, i in col.items() if name.startswith("config.")]
    metric_cols = [(name, {"test_accuracy": "test_acc", "train_accuracy": "train_acc"}.get(name, name), col[name])
                   for name in ("test_accuracy", "test_loss", "train_accuracy", "train_loss") if name in col]
    dataset = table[0][col["config.dataset"]] if table and "config.dataset" in col else "unknown"
    task = TASKS.get(dataset, dataset)
    zoo = zoo or f"small-cnn-zoo-{dataset}".replace("_", "-")
    preprocess: dict[str, Any] = {"mean": [0.5], "std": [0.5]}  # [0, 1] -> [-1, 1], as `_preprocess_batch`
    if facts["channels"] == 1:
        preprocess["grayscale"] = "mean"
    cache: dict = {}
    models = []
    for modeldir, rows in by_model.items():
        rows = sorted(rows, key=lambda r: steps[r])
        epochs = _small_cnn_epochs([int(steps[r]) for r in rows], f"{metrics_path} (model {modeldir})")
        first = table[rows[0]]
        factors = {k: _number(first[i]) for k, i in config_cols}
        factors["modeldir"] = modeldir
        arch_config = {"depth": facts["depth"], "width": facts["width"],
                       "stride": int(factors.get("cnn_stride") or factors.get("stride") or 2),
                       "activation": str(factors.get("activation") or "relu"),
                       "dropout": float(factors.get("dropout") or 0.0), "preprocess": preprocess}  # fmt: skip
        flat = np.asarray(weights[np.asarray(rows)])
        w = {key: _batch_tf(name, flat[:, start:end], shape) for name, start, end, shape, key in mapped}
        _check_fits("small_cnn_zoo", arch_config, task, w, f"{layout_path} (model {modeldir})", cache)
        metrics = {ours: np.array([_float(table[r][i]) for r in rows]) for _, ours, i in metric_cols}
        # the curves as far as the checkpoints tell them: each metric at its checkpoints' epochs, NaN between
        curves = {k: np.full(epochs[-1] + 1, np.nan) for k in metrics}
        for k, v in metrics.items():
            curves[k][epochs] = v
        finite = all(np.isfinite(v).all() for v in w.values())
        row = {
            "model_id": model_id("small-cnn-zoo", zoo, factors),
            "study": "small-cnn-zoo",
            "zoo": zoo,
            "task": task,
            "task_config": json.dumps({"name": task}),
            "arch": "small_cnn_zoo",
            "arch_config": json.dumps(arch_config),
            **factors,
            **_aliases(factors),
            "status": "ok" if finite else "diverged",
            **{ours: _number(table[rows[-1]][i]) for _, ours, i in metric_cols},
            "n_params": int(sum(math.prod(s) for _, _, _, s, _ in mapped)),
            "epochs": epochs[-1],
        }
        models.append({"row": row, "epochs": epochs, "metrics": metrics, "curves": curves,
                       "weights": w})
    return _write_groups(store, models, shard_size)


def _float(cell: str) -> float:
    try:
        return float(cell) if cell != "" else np.nan
    except ValueError:
        return np.nan


def _batch_tf(name: str, flat: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Rows of flattened Keras variables [R, prod(shape)] -> torch layout [R, *torch_shape], float32, contiguous."""
    a = np.asarray(flat, dtype=np.float32).reshape(flat.shape[0], *shape)
    leaf = name.split(":")[0].split("/")[-1]
    if leaf == "kernel" and len(shape) == 4:
        a = np.transpose(a, (0, 4, 3, 1, 2))
    elif leaf == "kernel" and len(shape) == 2:
        a = np.transpose(a, (0, 2, 1))
    return np.ascontiguousarray(a)


# --------------------------------------------------------------------------------------------------
# Model Zoos family: one folder per model (Ray Tune trial directories)

# Dataset names by the words the zoos' paths use for them, most specific first.
DATASET_WORDS = [
    (r"f[_-]?mnist|fashion", "fashion_mnist"), (r"cifar[_-]?100", "cifar100"), (r"cifar[_-]?10", "cifar10"),
    (r"tiny[_-]?imagenet", "tiny_imagenet"), (r"stl[_-]?10", "stl10"), (r"svhn", "svhn"), (r"usps", "usps"),
    (r"mnist", "mnist"),
]  # fmt: skip
_HALF = {"mean": [0.5], "std": [0.5]}
_HALF3 = {"mean": [0.5] * 3, "std": [0.5] * 3}
_MNIST = {"mean": [0.1307], "std": [0.3081]}
_CIFAR10 = {"mean": [125.3 / 255, 123.0 / 255, 113.9 / 255], "std": [63.0 / 255, 62.1 / 255, 66.7 / 255]}
# The input pipeline of each (dataset, model family), from the zoos' generator scripts (Model Zoos
# `code/zoo_generators`, Phase-Transition `scripts/*/train_zoo_*.py`); "cnn" is CNN / CNN2, "cnn3" CNN3.
PREPROCESS: dict[tuple[str, str], dict[str, Any]] = {
    ("mnist", "cnn"): _MNIST,
    ("fashion_mnist", "cnn"): _HALF,
    ("usps", "cnn"): {"resize": [28, 28], **_MNIST},
    ("svhn", "cnn"): {"grayscale": "luma", "crop": 28, **_HALF},
    ("cifar10", "cnn"): {"resize": [28, 28], **_HALF3},
    ("stl10", "cnn"): {"resize": [28, 28], **_HALF3},
    ("cifar10", "cnn3"): _HALF3,
    ("stl10", "cnn3"): {"resize": [32, 32], **_HALF3},
    ("cifar10", "resnet"): _CIFAR10,
    ("cifar100", "resnet"): {"mean": [0.5071, 0.4867, 0.4408], "std": [0.2675, 0.2565, 0.2761]},
    ("svhn", "resnet"): {"mean": [0.4377, 0.4438, 0.4728], "std": [0.198, 0.201, 0.197]},
    ("tiny_imagenet", "resnet"): {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
}
MODEL_TYPES = {"CNN": "cnn", "CNN2": "cnn", "CNN3": "cnn3", "Resnet18": "resnet", "Resnet18_width": "resnet"}


def _trial_dirs(src: str) -> list[str]:
    """Every folder under `src` that holds a model: params.json or config.json next to result.json or a
    checkpoint_<n> folder (a zoo's top-level config.json, next to its trial folders, is not one), sorted."""
    out = []
    for dirpath, dirs, files in os.walk(src):
        has_config = "params.json" in files or "config.json" in files
        if has_config and ("result.json" in files or any(re.fullmatch(r"checkpoint_\d+", d) for d in dirs)):
            out.append(dirpath)
    return sorted(out)


def _dataset(config: dict, texts: list[str], where: str) -> str:
    """The dataset a trial trained on, from its data paths first, then its folder names."""
    for text in [str(config.get("dataset::dump") or ""), str(config.get("training::data_path") or ""), *texts]:
        for pattern, name in DATASET_WORDS:
            if re.search(pattern, text.lower()):
                return name
    raise StoreError(f"{where}: cannot tell the dataset: neither dataset::dump, training::data_path nor the folder "
                     f"names mention one of {', '.join(n for _, n in DATASET_WORDS)}")


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors through torch's weights-only unpickler; anything else (code, objects) is refused."""
    try:
        with warnings.catch_warnings():  # a damaged header reads as an odd pickle protocol: torch warns, then fails
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - damaged bytes raise anything from the zip, pickle or text decoding
        why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
            raise StoreError(f"refusing checkpoint {path}: it is not a plain tensor state dict (it holds objects, which "
                             f"symzoo never unpickles, or it is damaged): {why}") from None
        raise StoreError(f"checkpoint {path} is damaged or not a torch checkpoint: {type(e).__name__}: {why}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StoreError(f"refusing checkpoint {path}: it is not a state dict of tensors (got {type(state).__name__})")
    return state


def _read_results(path: str) -> dict[int, dict]:
    """result.json lines by training_iteration; a line that is not a JSON object with one is refused."""
    out: dict[int, dict] = {}
    what = f"{path}: not a readable JSON-lines file (Ray Tune's result.json): line"
    with _reading(path, "JSON-lines file (Ray Tune's result.json)"), open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise StoreError(f"{what} {n} is not JSON ({e})") from None
            if not isinstance(r, dict) or not isinstance(r.get("training_iteration"), int):
                raise StoreError(f"{what} {n} has no integer training_iteration")
            out[r["training_iteration"]] = r
    return out


def _map_model_zoos(model_type: str, config: dict, state: dict[str, torch.Tensor], path: str
                    ) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
    """(arch, arch config less preprocess, our state) of one published checkpoint; an unexpected key set is refused."""
    from zoos.archs.published import MODEL_ZOOS_CNNS, model_zoos_indices

    if model_type in MODEL_ZOOS_CNNS:
        dropout = float(config.get("model::dropout") or 0.0)
        idx = model_zoos_indices(model_type, dropout)
        names = ["conv1", "conv2", "conv3", "fc1", "fc2"]
        want = {f"module_list.{i}.{leaf}": f"{n}.{leaf}" for i, n in zip(idx, names) for leaf in ("weight", "bias")}
        if set(state) != set(want):
            raise StoreError(f"{path}: keys {', '.join(state)} are not a {model_type} with dropout {dropout} (weight layers "
                             f"at module_list indices {', '.join(map(str, idx))})")
        out = {ours: state[theirs].numpy().astype(np.float32) for theirs, ours in want.items()}
        c = out["conv3.weight"].shape[0]
        side = math.isqrt(out["fc1.weight"].shape[1] // c)
        if side * side * c != out["fc1.weight"].shape[1]:
            raise StoreError(f"{path}: {idx[3]}.weight has {out['fc1.weight'].shape[1]} inputs, not {c} square maps")
        out["fc1.weight"] = out["fc1.weight"].reshape(-1, c, side, side)
        nlin = str(config.get("model::nlin", "tanh")).lower()
        return "model_zoos_cnn", {"variant": model_type, "activation": nlin, "dropout": dropout}, out
    if "conv1.weight" not in state or "fc.weight" not in state:
        raise StoreError(f"{path}: not a torchvision-named ResNet-18 state dict (no conv1.weight / fc.weight)")
    width = int(state["conv1.weight"].shape[0])
    return "resnet18_width", {"width": width}, {k: v.numpy().astype(np.float32) for k, v in state.items()}


def import_model_zoos(src: str, store: Store, zoo: str | None = None, shard_size: int = 1000) -> int:
    """Import every model folder found under `src` (Model Zoos family); return the number of models written."""
    trials = _trial_dirs(src)
    if not trials:
        raise StoreError(f"model-zoos source {src!r} has no model folder; it expects {FORMAT_HELP['model-zoos']}")
    zoo = zoo or re.sub(r"[^A-Za-z0-9_.=+-]", "-", os.path.basename(os.path.abspath(src))).lstrip(".-") or "model-zoos"
    cache: dict = {}
    models = []
    for trial in trials:
        config_path = os.path.join(trial, "params.json" if os.path.exists(os.path.join(trial, "params.json")) else "config.json")
        with _reading(config_path, "JSON file (Ray Tune's params.json)"), open(config_path) as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise StoreError(f"{config_path}: not a JSON object of the model's config")
        model_type = str(config.get("model::type", ""))
        if model_type not in MODEL_TYPES:
            raise StoreError(f"{config_path}: model::type {model_type or None!r} is not one symzoo has the code of; "
                             f"known: {', '.join(MODEL_TYPES)}")
        result_path = os.path.join(trial, "result.json")
        by_iter = _read_results(result_path) if os.path.exists(result_path) else {}
        named = {r["checkpoint_dir_name"]: it for it, r in by_iter.items() if isinstance(r.get("checkpoint_dir_name"), str)}
        ckpts = {}
        for name in os.listdir(trial):
            m = re.fullmatch(r"checkpoint_(\d+)", name)
            if m:
                path = os.path.join(trial, name, "checkpoints")
                if not os.path.isfile(path):
                    raise StoreError(f"{os.path.join(trial, name)}: no 'checkpoints' file (the model's state dict)")
                ckpts[named.get(name, int(m.group(1)))] = path
        if not ckpts:
            continue
        epochs = sorted(ckpts)
        rel = os.path.relpath(trial, src)
        dataset = _dataset(config, [rel, os.path.abspath(src)], config_path)
        mapped = [_map_model_zoos(model_type, config, _load_tensors(ckpts[e]), ckpts[e]) for e in epochs]
        arch, arch_config, _ = mapped[0]
        family = MODEL_TYPES[model_type]
        if (dataset, family) not in PREPROCESS:
            raise StoreError(f"{config_path}: no known input pipeline for a {model_type} on {dataset}")
        arch_config = {**arch_config, "preprocess": PREPROCESS[(dataset, family)]}
        keys = list(mapped[0][2])
        for (_, _, w), e in zip(mapped, epochs):
            if list(w) != keys or any(w[k].shape != mapped[0][2][k].shape for k in keys):
                raise StoreError(f"{ckpts[e]}: keys or shapes differ from {ckpts[epochs[0]]}")
        weights = {k: np.stack([w[k] for _, _, w in mapped]) for k in keys}
        task = TASKS.get(dataset, dataset)
        _check_fits(arch, arch_config, task, weights, ckpts[epochs[-1]], cache)
        names = sorted({k for r in by_iter.values() for k, v in r.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and k.endswith(("_acc", "_loss"))})

        def value(r: dict | None, k: str) -> float:
            v = None if r is None else r.get(k)
            return np.nan if v is None or v == -999 else float(v)

        metrics = {k: np.array([value(by_iter.get(e), k) for e in epochs]) for k in names}
        n_curve = max(by_iter, default=-1) + 1
        curves = {k: np.array([value(by_iter.get(e), k) for e in range(n_curve)]) for k in names}
        factors = {k.replace("::", "_"): v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
        finite = all(np.isfinite(v).all() for v in weights.values())
        row = {
            "model_id": model_id("model-zoos", zoo, {**factors, "trial": rel}),
            "study": "model-zoos",
            "zoo": zoo,
            "task": task,
            "task_config": json.dumps({"name": task}),
            "arch": arch,
            "arch_config": json.dumps(arch_config),
            **factors,
            **_aliases(factors),
            "dataset": dataset,
            "trial": rel,
            "status": "ok" if finite else "diverged",
            **{k: value(by_iter.get(epochs[-1]), k) for k in names},
            "n_params": int(sum(math.prod(v.shape[1:]) for k, v in weights.items()
                                if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))),
            "epochs": epochs[-1],
        }
        models.append({"row": row, "epochs": epochs, "metrics": metrics, "curves": curves, "weights": weights})
    if not models:
        raise StoreError(f"model-zoos source {src!r}: no model folder has a checkpoint_<n>/checkpoints file")
    return _write_groups(store, models, shard_size)
