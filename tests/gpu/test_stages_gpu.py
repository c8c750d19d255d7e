"""Every analysis stage on a GPU: a small study with all registered stages through `symzoo run` on CUDA
(training in bf16 on a fractional GPU), then every stage computed again on the CPU and on the GPU from
the same stored weights, row for row equal within float tolerance. Skipped without CUDA; run on the
GPU machine whenever GPU or stage code changes (benchmarks/README.md says how)."""

from __future__ import annotations

import contextlib
import math
import shutil

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from typer.testing import CliRunner

import zoos
from pipeline.cli import app
from pipeline.stages import STAGES
from pipeline.study import parse_study

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.xdist_group("ray"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DIGITS = {"name": "digits", "options": {"group": "C4", "variant": "upright", "n_train": 400, "n_val": 100,
                                        "n_test": 100}}
O5 = {"name": "o5_regression", "options": {"n_train": 64, "n_val": 16, "n_test": 32}}
SEEDS = {"seed": [0, 1, 2], "optimizer": ["adam"], "lr": [0.01]}
CNN = {"name": "cnn", "config": {"width": 4, "depth": 1}}
DEVICES = ("cpu", "cuda")


@contextlib.contextmanager
def _no_tf32_matmul():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def study_dict(tmp_path) -> dict:
    """Five small zoos (two of one CNN config for the cross-zoo stage, a p4 CNN, an invariant and a plain
    model of an O(5) task for the Lie group path) and every registered stage at a small size."""
    return {
        "study": "gpu-stages",
        "store": str(tmp_path / "store"),
        # the GPU machine has MLflow's client alone (no sqlite store): a file store
        "tracking_uri": (tmp_path / "mlruns").as_uri(),
        "output": str(tmp_path / "out"),
        "resources": {"num_cpus": 1, "num_gpus": 0.5, "precision": "bf16"},
        "zoos": [
            {"name": "cnn", "task": DIGITS, "arch": CNN, "grid": SEEDS, "epochs": 2, "checkpoints": [0, 1, 2]},
            {"name": "cnn_b", "task": DIGITS, "arch": CNN, "grid": {**SEEDS, "seed": [3, 4]}, "epochs": 2,
             "checkpoints": [0, 2]},
            {"name": "p4", "task": DIGITS, "arch": {"name": "p4cnn", "config": {"width": 2, "depth": 1}},
             "grid": SEEDS, "epochs": 2, "checkpoints": [0, 1, 2]},
            {"name": "o5_inv", "task": O5, "arch": {"name": "scalar_mlp", "config": {"width": 8, "depth": 1}},
             "grid": SEEDS, "epochs": 1, "checkpoints": [0, 1]},
            {"name": "o5_mlp", "task": O5, "arch": {"name": "mlp", "config": {"width": 8, "depth": 1}},
             "grid": SEEDS, "epochs": 1, "checkpoints": [0, 1]},
        ],
        "analysis": [
            {"stage": "interpolation", "pairs": 2, "lambdas": 5, "samples": 64},
            {"stage": "interpolation_cross", "zoos": ["cnn", "cnn_b"], "pairs": 2, "lambdas": 5, "samples": 64},
            {"stage": "bezier", "zoos": ["cnn", "p4"], "pairs": 1, "lambdas": 5, "steps": 20, "samples": 64},
            {"stage": "equivariance", "samples": 32, "group_samples": 4},
            {"stage": "weightspace", "zoos": ["cnn", "p4", "o5_mlp"]},
            {"stage": "landscape", "zoos": ["cnn", "p4", "o5_mlp"], "samples": 32, "iters": 20, "tol": 1e-4,
             "probes": 8},
            {"stage": "lie", "zoos": ["cnn", "p4", "o5_inv", "o5_mlp"], "samples": 16},
            {"stage": "similarity", "zoos": ["cnn", "p4"], "pairs": 2, "samples": 64},
            {"stage": "funcdim", "zoos": ["cnn", "o5_mlp"], "samples": 8},
        ],
    }


@pytest.fixture(scope="module")
def gpu_study(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu-study")
    study = study_dict(tmp)
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    result = CliRunner().invoke(app, ["run", str(path), "--plain"])
    return study, result


def test_every_stage_runs_on_the_gpu_through_the_cli(gpu_study):
    study, result = gpu_study
    assert result.exit_code == 0, result.output
    assert set(STAGES) == {s["stage"] for s in study["analysis"]}, "the study names every registered stage"
    store = zoos.open(study["store"])
    assert set(store.models().collect()["status"]) == {"ok"}
    for stage in STAGES:
        assert store.analysis(stage).collect().height > 0, f"stage {stage} stored nothing"
    lie = store.analysis("lie").collect().filter(pl.col("applicable"))
    assert lie.height and lie["lie_derivative"].is_finite().all()


def _numbers(value) -> list[float] | None:
    """A cell's numbers, flattened (None for cells that hold no numbers)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if value is None:
        return [math.nan]  # a missing value (a column another zoo's rows fill): compared as NaN
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, (list, tuple)):
        flat = [_numbers(v) for v in value]
        return None if any(f is None for f in flat) else [x for f in flat for x in f]
    return None


def _close(a: list[float], b: list[float], rtol: float, scale: float) -> bool:
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or abs(x - y) <= rtol * abs(y) + 1e-3 * scale + 1e-6 for x, y in zip(a, b))


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_on_the_gpu_equals_the_cpu(gpu_study, tmp_path, stage):
    """The stage's whole numerical path (load, measure, write) from one store on both devices."""
    study, result = gpu_study
    assert result.exit_code == 0, result.output
    spec = next(s for s in parse_study(study).analysis if s.stage == stage)
    zoo_specs = [z for z in parse_study(study).zoos if spec.zoos == "all" or z.name in spec.zoos]
    rows = []
    for i, device in enumerate(DEVICES):
        root = tmp_path / f"{i}-{device}"
        shutil.copytree(study["store"], root, ignore=shutil.ignore_patterns("analysis", "@analysis"))  # results and their manifests
        items = STAGES[stage].plan(zoos.open(str(root)), zoo_specs, spec.settings)
        assert items, f"{stage}: nothing planned"
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False), _no_tf32_matmul():
            rows.append(STAGES[stage].run(str(root), items, spec.settings.model_dump(), None, device))
    key = lambda r: tuple(str(r.get(k)) for k in ("zoo", "zoo_b", "model_id", "model_a", "model_b", "epoch"))  # noqa: E731
    cpu, gpu = (sorted(r, key=key) for r in rows)
    assert [key(r) for r in cpu] == [key(r) for r in gpu]
    # bezier trains its curve by SGD, and matching picks permutations: both amplify rounding a little
    rtol = 5e-2 if stage == "bezier" else 1e-3
    for column in sorted(set().union(*cpu, *gpu)):  # rows of different zoos may hold different columns
        pairs = [(_numbers(c.get(column)), _numbers(g.get(column))) for c, g in zip(cpu, gpu)]
        if any(c is None or g is None for c, g in pairs):
            assert [c.get(column) for c in cpu] == [g.get(column) for g in gpu], f"{stage}.{column}"
            continue
        scale = max([abs(x) for c, _ in pairs for x in c if not math.isnan(x)] + [0.0])
        bad = [(c, g) for c, g in pairs if not _close(g, c, rtol, scale)]
        assert not bad, f"{stage}.{column}: cuda {bad[0][1][:6]} vs cpu {bad[0][0][:6]}"
