"""A worker node of a simulated multi-node Ray cluster dies mid-study: the study completes, nothing is lost.

The cluster runs in a subprocess (cluster_study.py) with its own RAY_TMPDIR, so it neither meets the
session's shared local Ray nor advertises itself to other processes' `ray.init()`.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.study import load_study
from tests.reliability.faults import assert_logged_once, assert_store_whole, expected_models, mlp_zoo, write_study

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray-cluster")]

ROOT = Path(__file__).resolve().parents[2]


def test_removed_node_loses_nothing(tmp_path):
    path, _ = write_study(tmp_path, "nodeloss", [mlp_zoo("z", [0, 1, 2, 3], [0.01], epochs=6, population_size=1)])
    ray_tmp = tempfile.mkdtemp(prefix="rz", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": str(ROOT)}
    try:
        p = subprocess.run([sys.executable, str(Path(__file__).with_name("cluster_study.py")), str(path)], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=150)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert "train:z:" in out["killed_task"], "a population was training on the removed node"
    assert not out["raylet_alive"], "the node's raylet is gone"
    study = load_study(path)
    expected = expected_models(study)
    assert out["trained_models"] == len(expected) == 4 and out["populations"] == 4
    assert_store_whole(study.store, expected)
    assert_logged_once(study, expected)
