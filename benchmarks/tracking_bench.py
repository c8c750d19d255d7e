"""MLflow tracking overhead of a study: the quickstart and a 1,000-model zoo (alone, with an
equivariance stage, and with `model_runs: none`), through `run_study`.

Prints, for each study, the wall time, the time spent in MLflow calls and the part of it the driver
waited for (model runs are logged on a background thread while populations train), and first, side
by side, the cost of one model run (create + log_batch + terminate) on sqlite with its default
journal vs WAL + synchronous=NORMAL, which the tracker sets.

    .venv/bin/python benchmarks/tracking_bench.py            # ~5 min on a 2-core CPU
    .venv/bin/python benchmarks/tracking_bench.py --parts 1000,1000none   # the zoo with and without model runs
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def per_run_ms(uri: str, n: int = 60) -> float:
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment(f"bench-{time.time_ns()}")
    t0 = time.perf_counter()
    for i in range(n):
        run = client.create_run(exp, tags={"symzoo.kind": "model"}).info.run_id
        client.log_batch(run, metrics=[Metric("test_acc", 0.5, 0, s) for s in range(6)], params=[Param("seed", str(i))])
        client.set_terminated(run)
    return 1000 * (time.perf_counter() - t0) / n


def run(study: dict, work: Path) -> None:
    from pipeline.progress import Display
    from pipeline.runner import run_study
    from pipeline.study import parse_study

    s = parse_study(study)
    t0 = time.perf_counter()
    report = run_study(s, display=Display(plain=True, every_s=30), tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    wall = time.perf_counter() - t0
    n = report.trained_models
    print(f"{s.study:<12} {n:>6} models  wall {wall:7.1f}s  MLflow {report.tracking_s:6.1f}s "
          f"({1000 * report.tracking_s / max(n, 1):5.1f} ms/model)  waited {report.tracking_wait_s:5.1f}s "
          f"= {100 * report.tracking_wait_s / wall:4.1f}% of wall", flush=True)


def main() -> None:
    import argparse
    import logging

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="runs,quick,1000,1000eq,1000none",
                    help="comma list: runs (one model run, sqlite journals), quick, 1000, 1000eq, 1000none")
    parts = set(ap.parse_args().parts.split(","))
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.chdir(work)
        from pipeline.tracking import _fast_sqlite_commits

        if "runs" in parts:
            plain = per_run_ms(f"sqlite:///{work / 'plain.db'}")
            _fast_sqlite_commits()
            wal = per_run_ms(f"sqlite:///{work / 'wal.db'}")
            print(f"one model run on sqlite: default journal {plain:.1f} ms, WAL+NORMAL {wal:.1f} ms ({plain / wal:.1f}x)")

        if "quick" in parts:
            quick = yaml.safe_load((ROOT / "studies" / "quickstart.yaml").read_text())
            quick.update(store=str(work / "store-quick"), output=str(work / "out-quick"))
            run(quick, work)

        thousand = {
            "study": "zoo1000", "store": str(work / "store-1000"), "output": str(work / "out-1000"),
            "zoos": [{"name": "mlp1000", "task": {"name": "digits"},
                      "arch": {"name": "mlp", "config": {"width": 32, "depth": 2}},
                      "grid": {"seed": list(range(1000)), "optimizer": ["adam"], "lr": [0.003]},
                      "epochs": 10, "checkpoints": "0,1,2,5,last", "population_size": 250}],
        }
        if "1000" in parts:
            run(thousand, work)
        if "1000none" in parts:  # no MLflow run per model: zoo runs carry the summaries
            run({**thousand, "study": "zoo1000-none", "store": str(work / "store-1000none"),
                 "output": str(work / "out-1000none"), "model_runs": "none"}, work)
        if "1000eq" in parts:
            # the same zoo as a study usually is: with an analysis stage (the logging overlaps it too)
            run({**thousand, "study": "zoo1000+eq", "store": str(work / "store-1000eq"),
                 "output": str(work / "out-1000eq"), "analysis": [{"stage": "equivariance", "samples": 256}]}, work)


if __name__ == "__main__":
    main()
