"""The GPU benchmarks' code paths at --smoke sizes on the CPU: train_bench.py's step-only loop and trainer
variants (the step loop calls the trainer's in-place update on every device, so this run checks the API its
GPU figures use: a loop that still expected the update's old return values failed on the GPU host only),
step_kernels_bench.py's launchers and optimizer_bench.py's updates in Triton's interpreter, and cpu_bench.py,
zoo_bench.py and prologue_bench.py at tiny sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_steps_and_variants(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_bench.py"), "--smoke", "--skip", "baseline,pipeline",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "train_bench.json").read_text())
    assert [s.get("error") for s in results["steps"]] == [None]
    assert results["steps"][0]["step_ms"] > 0 and results["steps"][0]["models"] == 4
    assert [v["kind"] for v in results["variants"]] == ["vmap", "fast"]
    assert all(0.0 <= v["test_acc_mean"] <= 1.0 and v["model_epochs_per_s"] > 0 for v in results["variants"])


def bench(*args, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_kernels_bench.py"), "--smoke", "--out",
                           str(tmp_path), *args], capture_output=True, text=True, timeout=600, env=env)


def test_step_kernels_smoke_compares_tuning_sets(tmp_path):
    """Each launcher of the step runs under two tile sets; the second's outputs equal the first's (tile sizes
    regroup the sums, they do not change what is summed)."""
    run = bench("--tuning", ";window_block_m=64,fused_block_m=128,wgrad_block_m=32", tmp_path=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "step_kernels_bench.json").read_text())
    first, second = results["sets"]
    kernels = {"window fwd", "window wgrad", "conv2 fwd", "conv2 dx", "conv2 wgrad"}
    assert kernels < set(first["ms"]) and set(second["ms"]) == kernels
    assert second["tuning"] == {"window_block_m": 64, "fused_block_m": 128, "wgrad_block_m": 32}
    assert set(second["max_rel_diff"]) == kernels and max(second["max_rel_diff"].values()) < 1e-5


def test_step_kernels_refuses_an_unknown_tuning_entry(tmp_path):
    run = bench("--tuning", "window_rows=64", tmp_path=tmp_path)
    assert run.returncode == 2
    assert "'window_rows' is not a popconv tuning entry" in run.stderr and "window_block_m" in run.stderr
    assert not (tmp_path / "step_kernels_bench.json").exists()


def test_cpu_bench_times_both_programs_of_a_family(tmp_path):
    """cpu_bench.py at tiny sizes: a family trained by vmap and by the population program, in fresh processes, with
    the CPU's program choice recorded (the cnn's convs grouped but its one-channel first conv)."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_bench.py"), "--archs", "cnn", "--models", "2",
                          "--steps", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    (row,) = json.loads((tmp_path / "cpu_bench.json").read_text())
    assert row["arch"] == "cnn"
    assert row["vmap"]["program"] == "vmap (asked for)" and row["vmap"]["step_ms"] > 0 and row["program"]["step_ms"] > 0
    assert row["step_ms_ratio"] == row["vmap"]["step_ms"] / row["program"]["step_ms"]
    assert row["program"]["program"].startswith("3 grouped conv, 1 im2col + bmm")
    assert "cnn" in run.stdout


def test_zoo_bench_gives_each_peer_its_spread(tmp_path):
    """zoo_bench.py at --smoke sizes: the three ways side by side, each peer's step time the median of its timed
    windows with their range, and the rows the table prints."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "zoo_bench.py"), "--smoke", "--archs", "mlp", "--no-warm",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    (row,) = json.loads((tmp_path / "zoo_bench.json").read_text())["rows"]
    assert row["arch"] == "mlp" and row["models"] == 2 and row["symzoo"]["step_ms"] > 0 and row["symzoo"]["fast"]
    for peer in ("alone", "vmap"):
        low, high = row[peer]["step_ms_range"]
        assert 0 < low <= row[peer]["step_ms"] <= high
    assert run.stdout.splitlines()[1].startswith("mlp ")


def test_prologue_bench_counts_fewer_ops_with_the_gathers(tmp_path):
    """prologue_bench.py at tiny sizes on the CPU: p4cnn's step with its kernel expansions as gathers dispatches
    fewer ops than with them vmapped, and both programs say which they run."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prologue_bench.py"), "--archs", "p4cnn", "--models", "2",
                          "--batch", "4", "--steps", "1", "--repeats", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    (row,) = json.loads((tmp_path / "prologue_bench.json").read_text())
    assert row["arch"] == "p4cnn" and row["gather"]["ops"] < row["vmap"]["ops"]
    assert "as one gather" in row["gather"]["prologue"] and "vmapped" in row["vmap"]["prologue"]
    assert all(len(row[k]["windows"]) == 2 and row[k]["step_ms"] > 0 for k in ("gather", "vmap"))


def test_optimizer_bench_times_both_updates_of_each_family(tmp_path):
    """optimizer_bench.py at --smoke sizes: each family's parameter tensors, both updates timed with their spread,
    and the bound."""
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "optimizer_bench.py"), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads((tmp_path / "optimizer_bench.json").read_text())
    assert [(r["arch"], r["models"]) for r in rows] == [("mlp", 2), ("egnn", 2)]
    assert rows[1]["tensors"] == 51  # egnn: many small tensors; its update spans two popoptim launches
    assert all(r["bound_us"] > 0 and r["params"] > 0 for r in rows)
    for r in rows:
        for update in ("eager", "popoptim"):
            low, high = r[f"{update}_us_range"]
            assert 0 < low <= r[f"{update}_us"] <= high
    assert [line.split()[0] for line in run.stdout.splitlines()[1:]] == ["mlp", "egnn"]


def test_optimizer_bench_refuses_an_unknown_architecture(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "optimizer_bench.py"), "--archs", "mlp,resnet21",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]  # one line, no traceback
    assert "unknown architecture 'resnet21'; registered: " in run.stderr and "resnet20" in run.stderr
    assert not (tmp_path / "optimizer_bench.json").exists()
