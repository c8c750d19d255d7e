"""INRs fitted per second: one SIREN per digit, all trained as one vectorised population, to a PSNR target.

    .venv/bin/python benchmarks/inr_bench.py                       # all 1,797 digits on the CPU
    python benchmarks/inr_bench.py --device cuda --seeds 1 4        # on a GPU (torch + pydantic + numpy only)

Calls `zoos.trainer.train_population` directly (no Ray, MLflow or polars), timing every epoch with the
trainer's progress callback. "Fitted" means PSNR over the whole image >= --target dB. The figure
reported is fitted INRs / wall seconds (model build, data and evaluation included) at the first epoch
where --quantile of the models have reached the target; the same run gives the epochs it took.
Without scikit-learn (a bare GPU box) the digits are read from --digits-npz (written here with
--write-digits-npz).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch


def _digits_from_npz(task, path: str) -> None:
    """Hand the bundled digits to the task without scikit-learn (the arrays `DigitsTask` would read)."""
    d = np.load(path)
    task.source._data = (d["images"], d["labels"])


def run(images: int, seeds: int, epochs: int, lr: float, target: float, quantile: float, device: str,
        digits_npz: str | None) -> dict:
    """Train `images` x `seeds` SIRENs (2-32-32-1, Adam, full batch) and time the epochs until the target."""
    from zoos import trainer
    from zoos.spec import expand, parse_zoo, populations

    zoo = parse_zoo({"name": "bench", "task": {"name": "inr", "options": {"source": "digits"}},
                     "arch": {"name": "siren", "config": {"width": 32, "depth": 2}},
                     "grid": {"image": {"range": [0, images]}, "seed": list(range(seeds)), "optimizer": ["adam"], "lr": [lr]},
                     "epochs": epochs, "checkpoints": [0, epochs], "population_size": images * seeds})
    pop = populations(expand(zoo, "bench"), images * seeds)[0]
    if digits_npz:
        make_task = trainer.make_task

        def patched(p, data_dir=None):
            task = make_task(p, data_dir)
            _digits_from_npz(task, digits_npz)
            return task

        trainer.make_task = patched
    stamps: list[float] = []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    result = trainer.train_population(pop, device=device, progress=lambda e, n: (sync(), stamps.append(time.perf_counter())))
    total = time.perf_counter() - start
    psnr = result.curves["test_psnr"]  # [N, epochs + 1]
    frac = (psnr >= target).mean(0)
    hit = np.flatnonzero(frac >= quantile)
    out = {"models": len(pop), "epochs": epochs, "wall_s": round(total, 2),
           "median_psnr_final": round(float(np.median(psnr[:, -1])), 2),
           "frac_at_target_final": round(float(frac[-1]), 4)}
    if len(hit):
        e = int(hit[0])
        t = stamps[e - 1] - start
        out.update({"epochs_to_target": e, "seconds_to_target": round(t, 2),
                    "fitted_per_s": round(float((psnr[:, e] >= target).sum()) / t, 1)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1797)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1], help="models per image (one run per value)")
    ap.add_argument("--epochs", type=int, default=100, help="full-batch steps (a digit has 64 pixels)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--target", type=float, default=30.0, help="PSNR target, dB")
    ap.add_argument("--quantile", type=float, default=0.95, help="share of models that must reach the target")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--digits-npz", default=None)
    ap.add_argument("--write-digits-npz", default=None, help="write the digits (needs scikit-learn) and exit")
    args = ap.parse_args()
    if args.write_digits_npz:
        from sklearn.datasets import load_digits

        d = load_digits()
        np.savez_compressed(args.write_digits_npz, images=d.images.astype(np.float32) / 16.0, labels=d.target.astype(np.int64))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine())
    print(f"# {machine}; nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}, torch {torch.__version__}")
    for seeds in args.seeds:
        print(json.dumps({"device": args.device, "seeds": seeds, **run(args.images, seeds, args.epochs, args.lr,
                                                                        args.target, args.quantile, args.device, args.digits_npz)}),
              flush=True)


if __name__ == "__main__":
    main()
