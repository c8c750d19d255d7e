"""Scale-out on one machine: the reference study through `symzoo run` on 1 and on 2 (or more) GPUs.

    python benchmarks/scale_bench.py --gpus 1,2 --out results/      # a 2-GPU machine, ~7 min
    python benchmarks/scale_bench.py --smoke --out /tmp/scale       # CPU, tiny sizes: the code paths only

The study (written as YAML, run as `symzoo run STUDY --report run.json` in a subprocess that sees the
first g GPUs through CUDA_VISIBLE_DEVICES):
  zoo cnn_s   train_bench.py's workload: CNN-s on 28x28x1, 60,000 generated MNIST-shaped samples,
              batch 128, Adam lr 1e-3, own init and data order per model, `population_size: auto`
              (equal populations, a multiple of the GPUs, at most 1,024 models each)
  zoo pairs   128 CNN-s trained one epoch (one population), and the interpolation stage over all
              8,128 of its pairs (naive and weight-matched paths, 25 points, test split): the
              all-pairs barrier, chunked into Ray tasks that spread over the GPUs
A warm-up run first (the same population shapes: torch.compile and Triton caches on disk, as after a
first study on a machine), then one run per GPU count, each into its own store and MLflow store.
Throughput = model-epochs / the driver's training phase (submit to last population back) and pairs /
the stage's phase; the whole `symzoo run` wall is printed too. Per-population costs for the scaling
model (benchmarks/README.md): GPU time, store write time and bytes, driver time per result, MLflow
time per model. Output: a table and <out>/scale_bench.json.
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

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_bench import BATCH, LR, make_idx_data, task_options, tracking_uri  # noqa: E402


def study(name: str, work: Path, data_dir: Path, models: int, epochs: int, pair_models: int, samples: int,
          items_per_task: int, gpu: bool, model_runs: str = "all") -> dict:
    """The reference zoo, plus (pair_models > 0) the pairs zoo and its all-pairs interpolation stage."""
    task = {"name": "mnist", "options": task_options(data_dir)}
    grid = {"lr": [LR], "optimizer": ["adam"], "batch_size": [BATCH]}
    spec = {
        "study": name, "store": str(work / f"store-{name}"), "output": str(work / f"runs-{name}"),
        "resources": {"num_gpus": 1 if gpu else 0, "num_cpus": 4 if gpu else 1, "precision": "bf16" if gpu else "float32",
                      "max_retries": 0},
        "model_runs": model_runs,
        "zoos": [{"name": "cnn_s", "task": task, "arch": {"name": "cnn_s"}, "grid": {"seed": list(range(models)), **grid},
                  "epochs": epochs, "checkpoints": "0,last", "population_size": "auto"}],
    }
    if pair_models:
        spec["zoos"].append({"name": "pairs", "task": task, "arch": {"name": "cnn_s"},
                             "grid": {"seed": list(range(10_000, 10_000 + pair_models)), **grid},
                             "epochs": 1, "checkpoints": "last", "population_size": pair_models})
        spec["analysis"] = [{"stage": "interpolation", "zoos": ["pairs"], "pairs": 0, "lambdas": 25, "samples": samples,
                             "items_per_task": items_per_task}]
    return spec


def run(name: str, gpus: int, spec: dict, work: Path, gpu: bool) -> dict:
    """`symzoo run` of `spec` seeing the first `gpus` GPUs; its --report JSON plus wall and MLflow figures."""
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    report = work / f"{name}.json"
    (work / name).mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(work / name)  # may allow MLflow's file store in os.environ: before env is copied
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus))) if gpu else ""}
    cmd = [sys.executable, "-m", "pipeline", "run", str(path), "--plain", "--report", str(report), "--tracking-uri", uri]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{name}: symzoo run exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    r = json.loads(report.read_text())
    r["cli_wall_s"] = wall
    return r


def figures(r: dict, gpus: int, pairs: int) -> dict:
    """Throughput and per-population costs from one run's report."""
    pl = r["placements"]
    model_epochs = sum(p["models"] * p.get("epochs", 0) for p in pl)
    n_models = sum(p["models"] for p in pl)
    main = [p for p in pl if p["zoo"] == "cnn_s"]
    span = max(p["finished"] for p in main) - min(p["started"] for p in main)  # the reference zoo's own populations
    stage_s = r["phase_s"].get("interpolation")
    return {
        "placements": pl,
        "reference_zoo_span_s": span,
        "reference_zoo_model_epochs_per_s": sum(p["models"] * p["epochs"] for p in main) / span,
        "gpus": gpus,
        "gpus_used": sorted({g for p in pl for g in p["gpu_ids"]}),
        "population_size": r["population_sizes"].get("cnn_s"),
        "populations": len(pl),
        "model_epochs": model_epochs,
        "train_phase_s": r["phase_s"]["train"],
        "model_epochs_per_s": model_epochs / r["phase_s"]["train"],
        "stage_s": stage_s,
        "pairs_per_s": pairs / stage_s if stage_s else None,
        "wall_s": r["wall_s"],
        "cli_wall_s": r["cli_wall_s"],
        # per-population costs of the main zoo (the scaling model's inputs)
        "gpu_s_per_population": sum(p["train_s"] for p in main) / len(main),
        "models_per_population": sum(p["models"] for p in main) / len(main),
        "write_s_per_population": sum(p["write_s"] for p in main) / len(main),
        "weight_bytes_per_population": sum(p["weight_bytes"] for p in main) / len(main),
        "driver_s_per_result": r["driver_result_s"] / len(pl),
        "population_timings": [{"gpu_ids": p["gpu_ids"], "models": p["models"], **p.get("timings", {})} for p in main],
        "mlflow_s_per_model": r["tracking_s"] / n_models,
        "mlflow_wait_s": r["tracking_wait_s"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--gpus", default="1,2", help="GPU counts to run, each its own `symzoo run`")
    ap.add_argument("--models", type=int, default=2048, help="models in the main zoo")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--pair-models", type=int, default=128,
                    help="models whose all pairs the barrier stage takes; 0 = the reference zoo alone, no stage")
    ap.add_argument("--samples", type=int, default=512, help="test images per path point")
    ap.add_argument("--tasks-per-gpu", type=int, default=4, help="barrier stage: Ray tasks per GPU of the largest run")
    ap.add_argument("--model-runs", choices=("all", "none"), default="all",
                    help="an MLflow run per model (all) or zoo/stage runs only (none: the scaling model's advice past ~2 GPUs)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    a = ap.parse_args()
    gpu = torch.cuda.is_available() and not a.smoke
    counts = [int(g) for g in a.gpus.split(",")]
    n_train = 60000
    if a.smoke:
        a.models, a.epochs, a.pair_models, a.samples, n_train, counts = 6, 1, min(a.pair_models, 4), 32, 600, [1, 2]
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    data_dir = work / "data"
    make_idx_data(data_dir, n_train, 10000 if not a.smoke else 500)
    pairs = a.pair_models * (a.pair_models - 1) // 2
    items = max(1, -(-pairs // (a.tasks_per_gpu * max(counts))))
    results: dict = {"device": torch.cuda.get_device_name() if gpu else "cpu", "gpus_visible": torch.cuda.device_count(),
                     "models": a.models, "epochs": a.epochs, "model_runs": a.model_runs, "pairs": pairs, "items_per_task": items, "runs": []}

    def spec(name: str, models: int, epochs: int, stage: bool = True) -> dict:
        s = study(name, work, data_dir, models, epochs, a.pair_models, a.samples, items, gpu, a.model_runs)
        return s if stage else {**s, "analysis": []}

    def per_s(v: float | None) -> str:
        return f"{v:10.1f}" if v is not None else f"{'-':>10s}"

    # warm-up: the populations the runs will train (1,024 CNN-s, and the 128-model pairs zoo), compiled once
    warm = run("warmup", 1, spec("warmup", min(a.models, 1024), 1, stage=False), work, gpu)
    print(f"warm-up      {warm['cli_wall_s']:7.1f} s", flush=True)
    print(f"{'GPUs':>5s}{'pop size':>10s}{'pops':>6s}{'model-ep/s':>12s}{'train s':>9s}{'ref zoo/s':>11s}{'pairs/s':>10s}"
          f"{'stage s':>9s}{'run wall s':>12s}", flush=True)
    for g in counts:
        f = figures(run(f"gpus{g}", g, spec(f"gpus{g}", a.models, a.epochs), work, gpu), g, pairs)
        results["runs"].append(f)
        print(f"{g:5d}{f['population_size'] or 0:10d}{f['populations']:6d}{f['model_epochs_per_s']:12.1f}"
              f"{f['train_phase_s']:9.1f}{f['reference_zoo_model_epochs_per_s']:11.1f}{per_s(f['pairs_per_s'])}"
              f"{per_s(f['stage_s'])[1:]}{f['cli_wall_s']:12.1f}", flush=True)
        (a.out / "scale_bench.json").write_text(json.dumps(results, indent=2))
    base = results["runs"][0]
    for f in results["runs"][1:]:
        f["train_speedup"] = f["model_epochs_per_s"] / base["model_epochs_per_s"]
        f["reference_zoo_speedup"] = f["reference_zoo_model_epochs_per_s"] / base["reference_zoo_model_epochs_per_s"]
        f["stage_speedup"] = f["pairs_per_s"] / base["pairs_per_s"] if f["pairs_per_s"] else None
        f["wall_speedup"] = base["cli_wall_s"] / f["cli_wall_s"]
        stage = f", all-pairs barrier {f['stage_speedup']:.2f}x" if f["stage_speedup"] else ""
        print(f"{f['gpus']} GPUs vs {base['gpus']}: training phase {f['train_speedup']:.2f}x, reference zoo "
              f"{f['reference_zoo_speedup']:.2f}x (efficiency {f['reference_zoo_speedup'] / (f['gpus'] / base['gpus']):.2f})"
              f"{stage}, whole `symzoo run` {f['wall_speedup']:.2f}x")
    for f in results["runs"]:
        for t in f["population_timings"]:
            print(f"{f['gpus']} GPU run, population on GPU {','.join(t['gpu_ids']) or '-'}: "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in t.items() if k not in ("gpu_ids", "models")))
    print("per population (main zoo, largest run): " + json.dumps({k: round(v, 4) for k, v in results["runs"][-1].items()
                                                                    if k.endswith(("per_population", "per_result", "per_model"))}))
    (a.out / "scale_bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
