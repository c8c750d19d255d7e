"""Analysis throughput on CNN-s zoos: all-pairs barriers and orbit equivariance error, CPU vs GPU in one run.

    .venv/bin/python benchmarks/analysis_bench.py --out build/analysis-bench/cpu.json     # this machine
    python3 benchmarks/analysis_bench.py --reference build/analysis-bench/cpu.json        # GPU host: adds that column

Workload (issue 11, "Analysis throughput"): `cnn_s` (2,464 parameters) on 28x28x1 images, the first
512 test images of the generated MNIST-shaped set of `train_bench.py` (IDX files in a temporary
folder, read through the `mnist` task). Weights are random initialisations (`matching_bench.random_states`,
one seed per model): the cost of a forward or of a matching step does not depend on the values.
float32 throughout.

1. barrier   the naive linear path of every pair of a 64-model zoo (2,016 pairs), 25 lambdas, test
             loss on 512 images: all pairs x lambdas interpolated as one stacked population and
             evaluated `--chunk` models at a time by `analysis.connectivity.linear_path(..., pairs=True)`,
             then the sup barrier per pair. Figure: pairs/s.
   matched   `analysis.matching.weight_matching` for the first `--match-pairs` pairs (s/pair, its own
             figure), then the aligned linear paths of those pairs as one population (pairs/s).
2. orbit     `analysis.symmetry.orbit_error` over C4 (4 rotations, exact) of a 1,024-model zoo on 512
             images, models stacked `--orbit-chunk` at a time. Figure: models/s.
Each device times the full workload (GPU) or its first part (CPU, `--cpu-*`), after a warm-up call.
Only torch, numpy and scipy are needed (no pydantic, polars, Ray or MLflow).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from analysis.connectivity import barrier, linear_path  # noqa: E402
from analysis.matching import weight_matching  # noqa: E402
from analysis.symmetry import orbit_error  # noqa: E402
from benchmarks.matching_bench import random_states, sync  # noqa: E402
from benchmarks.train_bench import make_idx_data  # noqa: E402
from tasks import get_task  # noqa: E402
from tasks.groups import ImageGroup  # noqa: E402
from zoos.functional import split_state  # noqa: E402
from zoos.permspec import apply_permutation  # noqa: E402

N_TEST = 512


def timed(fn, device: str):
    """(result, seconds) of fn(), the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def path_barriers(module, a: dict, b: dict, task, device: str, lambdas: int, chunk: int) -> torch.Tensor:
    """Sup test-loss barrier [P] of the linear paths between stacked states a[P] and b[P], all points one population."""
    res = linear_path(module, a, b, task, lambdas=lambdas, pairs=True, splits=("test",), max_examples=N_TEST,
                      batch_size=N_TEST, chunk=chunk, device=device)
    return barrier(res.loss["test"], lambdas)


def pair_states(stacked: dict, pairs: list[tuple[int, int]], device: str) -> tuple[dict, dict]:
    idx = torch.tensor(pairs, device=device)
    return {k: v[idx[:, 0]] for k, v in stacked.items()}, {k: v[idx[:, 1]] for k, v in stacked.items()}


def bench_barriers(module, states: list[dict], task, device: str, n_pairs: int, match_pairs: int,
                   lambdas: int, chunk: int) -> dict:
    """Naive all-pairs barriers (pairs/s), weight matching (s/pair) and aligned barriers (pairs/s) on one device."""
    every = list(itertools.combinations(range(len(states)), 2))
    pairs = every[:n_pairs or len(every)]
    stacked = {k: torch.stack([s[k] for s in states]).to(device) for k in states[0]}
    module = module.to(device)
    warm = max(1, chunk // lambdas)
    path_barriers(module, *pair_states(stacked, pairs[:warm], device), task, device, lambdas, chunk)
    naive, dt = timed(lambda: path_barriers(module, *pair_states(stacked, pairs, device), task, device, lambdas, chunk), device)
    assert naive.shape == (len(pairs),) and torch.isfinite(naive).all()
    out = {"pairs": len(pairs), "lambdas": lambdas, "chunk_models": chunk, "naive_s": dt, "naive_pairs_per_s": len(pairs) / dt,
           "naive_barrier_mean": float(naive.mean())}
    if match_pairs:
        spec = module.perm_spec()
        mp = pairs[:match_pairs]
        one = lambda i, j, p: weight_matching(spec, states[i], states[j], device=device,  # noqa: E731
                                              generator=torch.Generator().manual_seed(p))
        one(*mp[0], 0)  # warm-up
        results, mdt = timed(lambda: [one(i, j, p) for p, (i, j) in enumerate(mp)], device)
        a, b = pair_states(stacked, mp, device)
        aligned_b = [apply_permutation(spec, {k: v[p] for k, v in b.items()}, r.perms) for p, r in enumerate(results)]
        b = {k: torch.stack([s[k] for s in aligned_b]) for k in b}
        aligned, adt = timed(lambda: path_barriers(module, a, b, task, device, lambdas, chunk), device)
        out.update({"match_pairs": len(mp), "match_s_per_pair": mdt / len(mp),
                    "match_sweeps_mean": sum(r.sweeps for r in results) / len(mp),
                    "aligned_pairs_per_s": len(mp) / adt, "aligned_barrier_mean": float(aligned.mean()),
                    "naive_barrier_mean_same_pairs": float(naive[:len(mp)].mean())})
    return out


def bench_orbit(module, states: list[dict], x: torch.Tensor, device: str, n_models: int, chunk: int) -> dict:
    """Orbit equivariance error over C4 of `n_models` stacked models, `chunk` at a time (models/s)."""
    group = ImageGroup("C4")
    stacked = {k: torch.stack([s[k] for s in states[:n_models]]).to(device) for k in states[0]}
    module, xd = module.to(device), x.to(device)

    def run(lo: int, hi: int) -> torch.Tensor:
        errs = []
        for s in range(lo, hi, chunk):
            params, buffers = split_state(module, {k: v[s:min(s + chunk, hi)] for k, v in stacked.items()})
            errs.append(orbit_error(module, params, buffers, xd, group).mean.cpu())
        return torch.cat(errs)

    run(0, min(chunk, n_models))  # warm-up
    err, dt = timed(lambda: run(0, n_models), device)
    assert err.shape == (n_models,) and torch.isfinite(err).all()
    return {"models": n_models, "chunk_models": chunk, "group": "C4", "s": dt, "models_per_s": n_models / dt,
            "error_mean": float(err.mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    p.add_argument("--reference", type=Path, default=None, help="JSON of an earlier run: its CPU figures become a column")
    p.add_argument("--zoo", type=int, default=64, help="models in the barrier zoo")
    p.add_argument("--lambdas", type=int, default=25)
    p.add_argument("--chunk", type=int, default=1024, help="GPU: models (pairs x lambdas) evaluated at once")
    p.add_argument("--match-pairs", type=int, default=64, help="GPU: pairs weight-matched")
    p.add_argument("--orbit-models", type=int, default=1024)
    p.add_argument("--orbit-chunk", type=int, default=1024, help="GPU: models per orbit_error call")
    p.add_argument("--cpu-pairs", type=int, default=16, help="CPU: pairs timed (the GPU does all)")
    p.add_argument("--cpu-chunk", type=int, default=100)
    p.add_argument("--cpu-match-pairs", type=int, default=8)
    p.add_argument("--cpu-orbit-models", type=int, default=64)
    p.add_argument("--cpu-orbit-chunk", type=int, default=32)
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU when a GPU is present")
    a = p.parse_args()

    gpu = torch.cuda.is_available()
    devices = ([] if gpu and a.no_cpu else ["cpu"]) + (["cuda"] if gpu else [])
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
               f"({torch.get_num_threads()} threads), GPU: {torch.cuda.get_device_name(0) if gpu else 'none'}")
    print(f"machine: {machine}", flush=True)

    with tempfile.TemporaryDirectory(prefix="analysis-bench-") as tmp:
        make_idx_data(Path(tmp), n_train=0, n_test=N_TEST)
        task = get_task("mnist", data_dir=tmp)
        x, _ = task.load("test", 0)
        module, states = random_states(task, "cnn_s", {}, list(range(max(a.zoo, a.orbit_models))))
        results: dict = {"machine": machine, "dtype": "float32", "weights": "random init", "test_images": N_TEST}
        for d in devices:
            cpu = d == "cpu"
            results[d] = {
                "barrier": bench_barriers(module, states[:a.zoo], task, d, a.cpu_pairs if cpu else 0,
                                          a.cpu_match_pairs if cpu else a.match_pairs, a.lambdas,
                                          a.cpu_chunk if cpu else a.chunk),
                "orbit": bench_orbit(module, states, x, d, a.cpu_orbit_models if cpu else a.orbit_models,
                                     a.cpu_orbit_chunk if cpu else a.orbit_chunk),
            }
            if not cpu:
                results[d]["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            print(f"{d}: {json.dumps(results[d])}", flush=True)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=2))

    cols = {d: results[d] for d in devices}
    if a.reference:
        ref = json.loads(a.reference.read_text())
        cols = {"ref cpu": ref["cpu"], **cols}
        print(f"ref cpu: {ref['machine']}")
    rows = [("all-pairs naive barrier, pairs/s", "barrier", "naive_pairs_per_s", True),
            ("weight matching, s/pair", "barrier", "match_s_per_pair", False),
            ("aligned barrier, pairs/s", "barrier", "aligned_pairs_per_s", True),
            ("orbit error C4, models/s", "orbit", "models_per_s", True)]
    print(f"\n{'figure':<34}" + "".join(f"{c:>12}" for c in cols) + ("".join(f"{'cuda/' + c:>16}" for c in cols if c != "cuda") if "cuda" in cols else ""))
    for label, part, key, higher in rows:
        vals = {c: r[part].get(key) for c, r in cols.items()}
        line = f"{label:<34}" + "".join(f"{v:12.4g}" if v is not None else f"{'-':>12}" for v in vals.values())
        if "cuda" in vals and vals["cuda"]:
            for c, v in vals.items():
                if c != "cuda":
                    line += f"{(vals['cuda'] / v if higher else v / vals['cuda']) if v else float('nan'):15.1f}x"
        print(line)


if __name__ == "__main__":
    main()
