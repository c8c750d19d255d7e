"""Every zoo family on the CPU: the trainer's population program (its default) against its vmap, side by side.

    .venv/bin/python benchmarks/cpu_bench.py --out DIR                      # every registered architecture
    .venv/bin/python benchmarks/cpu_bench.py --archs cnn,egnn --models 32 --out DIR

Each architecture runs with its default config on its registry example task (generated data of the real
shapes, as zoo_bench writes it; generated splits made and kept on disk before the pair), `--models` models,
batches of 32, `--steps` steps an epoch for 2 epochs, Adam, float32, through `zoos.trainer.train_population`
twice, each in a fresh process: `fast=False` (vmap of the single-model loss) and the default (the population
program; on the CPU its convolutions run as grouped convolutions but the shortest patches, as im2col).
Columns: ms a training step (the trainer's `steps` over the steps after the first), seconds of evaluation
(every split at epoch 0 and after each epoch), seconds from the trainer's call to the end of its first step,
the program, and each time's ratio vmap / program.
Results go to <out>/cpu_bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

BATCH, EPOCHS = 32, 2


def population(entry: str, n: int, steps: int, data_dir: str) -> tuple[Any, int]:
    """`n` models of `entry` on its example task as the benchmark trains them, and the steps timed (after the first)."""
    from zoo_bench import parse_arch, task_options
    from zoos.archs import ARCHS
    from zoos.spec import expand, parse_zoo, populations

    arch, config = parse_arch(entry)
    task_name, base = ARCHS[arch].example_task
    batch = 64 if task_name == "inr" else BATCH
    grid: dict[str, Any] = {"seed": list(range(n)), "optimizer": ["adam"], "lr": [1e-3], "batch_size": [batch]}
    epochs = EPOCHS
    if task_name == "inr":  # one full batch of an image's pixels an epoch
        grid["image"] = grid.pop("seed")
        epochs = EPOCHS * steps
    options = task_options(task_name, base, Path(data_dir), steps, batch)
    zoo = parse_zoo({"name": arch, "task": {"name": task_name, "options": options}, "arch": {"name": arch, "config": config},
                     "grid": grid, "epochs": epochs, "checkpoints": [epochs], "train_metrics": "running"})
    pop = populations(expand(zoo, "bench"), max_size=n)[0]
    return pop, epochs * steps - 1 if task_name != "inr" else epochs - 1


def worker(entry: str, kind: str, n: int, steps: int, data_dir: str) -> dict[str, Any]:
    """One population of `entry` trained by `kind` (vmap | program): its times, in this fresh process."""
    import torch

    from tasks import get_task  # noqa: F401 - imported before the clock, as the pipeline's worker has it
    from zoos.trainer import train_population

    torch.set_num_threads(os.cpu_count() or 1)
    pop, taken = population(entry, n, steps, data_dir)
    result = train_population(pop, device="cpu", precision="float32", fast=False if kind == "vmap" else None)
    t = result.timings
    return {"arch": entry, "kind": kind, "models": n, "step_ms": 1e3 * t["steps"] / taken,
            "evaluation_s": t["evaluation"], "first_step_s": t["first_step_at"], "program": result.program["summary"]}


def generate_splits(entry: str, n: int, steps: int, data_dir: str) -> None:
    """The task's splits made once before the pair, so that neither kind's first step pays their generation."""
    from tasks.generated import GeneratedTask
    from zoos.trainer import DATA_SEED, SPLITS, make_task

    task = make_task(population(entry, n, steps, data_dir)[0])
    for split in SPLITS if isinstance(task, GeneratedTask) else ():
        task.load(split, seed=DATA_SEED)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", help="comma-separated architectures (default: every registered one)")
    ap.add_argument("--models", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="training steps an epoch")
    ap.add_argument("--out", required=True)
    ap.add_argument("--worker", nargs=4, metavar=("ARCH", "KIND", "DATA", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        entry, kind, data_dir, n = args.worker
        print(json.dumps(worker(entry, kind, int(n), args.steps, data_dir)))
        return

    from zoo_bench import write_data
    from zoos.archs import ARCHS

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    archs = args.archs.split(",") if args.archs else sorted(ARCHS)
    print(f"cpu_bench: {os.cpu_count()} cores, {args.models} models, batch {BATCH}, {args.steps} steps an epoch, "
          f"{EPOCHS} epochs; load average {os.getloadavg()[0]:.1f}")
    print(f"{'family':16s}{'step ms vmap':>13s}{'program':>9s}{'ratio':>7s}{'eval s vmap':>12s}{'program':>9s}"
          f"{'ratio':>7s}{'1st step s vmap':>16s}{'program':>9s}  program")
    rows = []
    with tempfile.TemporaryDirectory() as data:
        write_data(Path(data), args.steps * BATCH + 256)  # the training set and a validation split of 256
        from pipeline.localray import WORKER_ENV  # as the pipeline's workers run

        env = {**WORKER_ENV, **os.environ, "SYMZOO_CACHE": str(Path(data) / "cache"), "PYTHONPATH": str(ROOT)}
        os.environ["SYMZOO_CACHE"] = env["SYMZOO_CACHE"]
        for entry in archs:
            generate_splits(entry, args.models, args.steps, data)
            pair = {}
            for kind in ("vmap", "program"):
                cmd = [sys.executable, __file__, "--out", args.out, "--steps", str(args.steps),
                       "--worker", entry, kind, data, str(args.models)]
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if done.returncode != 0:
                    print(f"{entry:16s}{kind} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
                    break
                pair[kind] = json.loads(done.stdout.strip().splitlines()[-1])
            if len(pair) < 2:
                continue
            v, p = pair["vmap"], pair["program"]
            row = {"arch": entry, "models": args.models, "vmap": v, "program": p,
                   **{f"{k}_ratio": v[k] / p[k] for k in ("step_ms", "evaluation_s", "first_step_s")}}
            rows.append(row)
            print(f"{entry:16s}{v['step_ms']:13.1f}{p['step_ms']:9.1f}{row['step_ms_ratio']:6.2f}x"
                  f"{v['evaluation_s']:12.2f}{p['evaluation_s']:9.2f}{row['evaluation_s_ratio']:6.2f}x"
                  f"{v['first_step_s']:16.2f}{p['first_step_s']:9.2f}  {p['program']}", flush=True)
    (out / "cpu_bench.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
