"""benchmarks/train_bench.py's step-only loop and trainer variants run at --smoke sizes on the CPU. The step
loop calls the trainer's in-place update on every device, so this run checks the API its GPU figures use
(a loop that still expected the update's old return values failed on the GPU host only)."""

import json
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
