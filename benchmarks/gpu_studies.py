"""The studies that run on a GPU, each validated and then run once through the CLI at reduced size.

    python benchmarks/gpu_studies.py --out results/      # a CUDA machine: every study below, ~3 min on one H200
    python benchmarks/gpu_studies.py --smoke --out DIR   # the CPU: the same code path, GPUs asked of no one
    python benchmarks/gpu_studies.py --only canon-digits,cgenn-convexhull --full --out DIR
                                                         # named studies as written, each with its report

Which studies: every file in studies/ whose resources ask for a GPU, and the quickstart with
`resources: {num_gpus: 0.5, precision: bf16}` (the README's main job, as a GPU user runs it). Each is
first checked with `symzoo validate` as written, then run with `symzoo run` (a subprocess: its own Ray,
an MLflow file store, a fresh store), the quickstart at its own size and the others after `reduce`: at
most two values of every grid factor, at most `--epochs` epochs, analysis samples capped. MNIST-shaped tasks read a generated, learnable data set
written as IDX files (train_bench.make_idx_data). Prints one row per study: exit codes and wall
seconds; writes <out>/gpu_studies.json. `--only` picks studies by name from every file in studies/ (a study
that asks for no GPU runs on the GPU machine's CPUs); `--full` runs them as written and writes each one's
`symzoo report` (summary tables, figures, report.html) to <out>/<study>/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_bench import make_idx_data  # noqa: E402

QUICKSTART_GPU = {"num_cpus": 1, "num_gpus": 0.5, "precision": "bf16"}


def gpu_studies() -> list[tuple[str, Path, dict | None, bool]]:
    """(name, study file, resources override or None, reduce?): the studies asking for a GPU, and the
    quickstart on a GPU at its full size (the demo's own job)."""
    out = [("quickstart (num_gpus 0.5, bf16)", ROOT / "studies" / "quickstart.yaml", QUICKSTART_GPU, False)]
    for path in sorted((ROOT / "studies").glob("*.yaml")):
        resources = (yaml.safe_load(path.read_text()) or {}).get("resources") or {}
        if resources.get("num_gpus", 0) > 0:
            out.append((path.stem, path, None, True))
    return out


def reduce(study: dict[str, Any], epochs: int, samples: int) -> dict[str, Any]:
    """The same study, smaller: two values per grid factor, `epochs` epochs at most, capped samples."""
    study = json.loads(json.dumps(study))  # a deep copy without YAML anchors' shared objects
    for zoo in study["zoos"]:
        zoo["grid"] = {k: v[:2] if isinstance(v, list) else v for k, v in (zoo.get("grid") or {}).items()}
        zoo["epochs"] = min(zoo.get("epochs", epochs), epochs)
        zoo["checkpoints"] = "0,1,last"
    for stage in study.get("analysis", []):
        for key, cap in (("samples", samples), ("steps", 50), ("probes", 4), ("iters", 10)):
            if key in stage:
                stage[key] = min(stage[key], cap)
        if stage.get("pairs") == 0:
            stage["pairs"] = 2
    return study


def symzoo(*args: str, env: dict[str, str], timeout: int) -> tuple[int, float, str]:
    """(exit code, wall seconds, output tail) of `python -m pipeline ARGS`."""
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=env,
                         timeout=timeout, cwd=ROOT)
    return run.returncode, time.perf_counter() - t0, (run.stdout + run.stderr)[-2000:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--smoke", action="store_true", help="no GPU asked for: the code path on a CPU")
    ap.add_argument("--only", default="", help="comma-separated study names, any in studies/ (default: the GPU ones)")
    ap.add_argument("--full", action="store_true", help="as written, not reduced; each study's report into --out")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpu-studies-"))
    data = work / "data"
    make_idx_data(data / "mnist", n_train=4000 if a.smoke else 20000, n_test=1000 if a.smoke else 5000)
    env = {**os.environ, "SYMZOO_DATA": str(data), "MLFLOW_ALLOW_FILE_STORE": "true",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    rows = []
    chosen = gpu_studies() if not a.only else [
        (p.stem, p, None, not a.full) for p in sorted((ROOT / "studies").glob("*.yaml")) if p.stem in a.only.split(",")]
    for name, path, resources, smaller in chosen:
        study = yaml.safe_load(path.read_text())
        if resources is not None:
            study["resources"] = resources
        if a.smoke:
            study["resources"] = {**study.get("resources", {}), "num_gpus": 0}
        as_written = work / f"{path.stem}-as-written.yaml"
        as_written.write_text(yaml.safe_dump(study))
        code_v, wall_v, out_v = symzoo("validate", str(as_written), env=env, timeout=300)
        case = work / path.stem
        small = reduce(study, a.epochs, a.samples) if smaller else json.loads(json.dumps(study))
        small.update(store=str(case / "store"), tracking_uri=(case / "mlruns").as_uri(), output=str(case / "out"))
        models = sum(_grid_size(z) for z in small["zoos"])
        epochs = max(z.get("epochs", 1) for z in small["zoos"])
        reduced = work / f"{path.stem}.yaml"
        reduced.write_text(yaml.safe_dump(small))
        code_r, wall_r, out_r = symzoo("run", str(reduced), "--plain", env=env, timeout=1800)
        if a.full and code_r == 0:
            a.out.mkdir(parents=True, exist_ok=True)
            (a.out / f"{path.stem}.log").write_text(out_r)
            code_p, _, out_p = symzoo("report", small["store"], "--study", small["study"], "--out", str(a.out / path.stem),
                                      "--no-log", env=env, timeout=600)
            if code_p:
                print(out_p, flush=True)
        rows.append({"study": name, "validate_exit": code_v, "validate_s": round(wall_v, 1), "run_exit": code_r,
                     "run_s": round(wall_r, 1), "models": models, "epochs": epochs, "reduced": smaller,
                     "stages": [s["stage"] for s in small.get("analysis", [])],
                     **({"validate_output": out_v} if code_v else {}), **({"run_output": out_r} if code_r else {})})
        print(f"{name:36s} validate exit {code_v} ({wall_v:5.1f} s)   run exit {code_r} ({wall_r:6.1f} s, "
              f"{models} models x <= {epochs} epochs, stages {', '.join(rows[-1]['stages'])})", flush=True)
        if code_v or code_r:
            print(out_v if code_v else out_r, flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_studies.json").write_text(json.dumps({"rows": rows}, indent=1))
    sys.exit(1 if any(r["validate_exit"] or r["run_exit"] for r in rows) else 0)


def _grid_size(zoo: dict) -> int:
    n = 1
    for values in (zoo.get("grid") or {}).values():
        n *= len(values) if isinstance(values, list) else 1
    return n


if __name__ == "__main__":
    main()
