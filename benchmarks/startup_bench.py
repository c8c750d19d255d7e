"""What a worker's first population costs: fresh processes, each training populations back to back.

    python benchmarks/startup_bench.py --out results/             # CUDA machine; ~3 min on one H100
    python benchmarks/startup_bench.py --smoke                    # tiny sizes on the CPU: the code paths only

A Ray worker that trains its first population pays for things later populations in the same process
do not: importing torch and symzoo, the CUDA context, and torch.compile of the population programs
(from the on-disk caches after the first run on a machine, from scratch before). This benchmark runs
`--processes` fresh Python processes one after the other, all sharing one Inductor / Triton cache
directory that starts empty, and in each trains `--populations` populations of train_bench's CNN-s
zoo (own seeds each) with `train_population`. It prints every population's wall time split by the
trainer's phases (setup, evaluation, first step, steps) and the process's Dynamo compile counters, so
the first-population extra (population 1 minus population 2) and where it goes can be read off.
Process 1 shows a cold machine; processes 2+ show what a fresh worker pays on a warm one.
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

T_START = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(n_models: int, epochs: int, populations: int, data_dir: Path, device: str, profile_to: Path | None) -> dict:
    """One fresh process's populations: wall time and trainer phases of each, compile counters."""
    import cProfile
    import io
    import pstats

    import torch
    import torch._dynamo.utils

    from benchmarks.train_bench import population
    from zoos.trainer import train_population

    out: dict = {"import_s": time.perf_counter() - T_START, "populations": []}
    for p in range(populations):
        pop = population(n_models, epochs, data_dir, first_seed=p * n_models)
        prof = cProfile.Profile() if profile_to is not None and p == 0 else None
        t0 = time.perf_counter()
        if prof is not None:
            prof.enable()
        res = train_population(pop, device=device, precision="bf16" if device == "cuda" else "float32")
        if prof is not None:
            prof.disable()
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(60)
            profile_to.write_text(text.getvalue())
        out["populations"].append({"wall_s": time.perf_counter() - t0, **res.timings,
                                   "test_acc": float(res.curves["test_acc"][:, -1].mean())})
    counters = torch._dynamo.utils.counters
    out["unique_graphs"] = int(counters["stats"]["unique_graphs"])
    out["recompiles"] = {str(k): int(v) for k, v in counters["recompiles"].items()} if "recompiles" in counters else {}
    out["compile_times"] = torch._dynamo.utils.compile_times(repr="str", aggregate=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--models", type=int, default=1024, help="models per population")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--populations", type=int, default=2, help="populations per process")
    ap.add_argument("--processes", type=int, default=3, help="fresh processes, one after the other")
    ap.add_argument("--profile", action="store_true", help="cProfile the last process's first population")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: run one process's part, write JSON here
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        import torch

        device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
        prof = a.child.with_name(a.child.stem + "-profile.txt") if a.profile else None
        a.child.write_text(json.dumps(child(a.models, a.epochs, a.populations, a.data, device, prof)))
        return

    from benchmarks.train_bench import make_idx_data

    if a.smoke:
        a.models, a.epochs, a.processes = 4, 1, 2
    work = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    data_dir = work / "data"
    make_idx_data(data_dir, 600 if a.smoke else 60000, 500 if a.smoke else 10000)
    env = {**os.environ, "SYMZOO_DATA": str(data_dir), "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"), "TRITON_CACHE_DIR": str(work / "triton")}
    a.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for i in range(a.processes):
        dest = work / f"proc{i}.json"
        cmd = [sys.executable, __file__, "--child", str(dest), "--data", str(data_dir), "--models", str(a.models),
               "--epochs", str(a.epochs), "--populations", str(a.populations)] + (["--smoke"] if a.smoke else []) \
            + (["--profile"] if a.profile and i == a.processes - 1 else [])
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True)
        r = json.loads(dest.read_text())
        r["process_wall_s"] = time.perf_counter() - t0
        runs.append(r)
        cache = "empty caches" if i == 0 else "warm disk caches"
        print(f"process {i + 1} ({cache}): {r['process_wall_s']:.1f} s, import {r['import_s']:.1f} s, "
              f"{r['unique_graphs']} graphs compiled, recompiles {r['recompiles']}", flush=True)
        for j, p in enumerate(r["populations"]):
            phases = ", ".join(f"{k} {v:.2f}" for k, v in p.items() if k not in ("wall_s", "test_acc"))
            print(f"  population {j + 1}: {p['wall_s']:6.2f} s  ({phases})", flush=True)
        if len(r["populations"]) > 1:
            print(f"  first-population extra: {r['populations'][0]['wall_s'] - r['populations'][1]['wall_s']:.2f} s", flush=True)
        print("  " + r["compile_times"].replace("\n", "\n  "), flush=True)
    if a.profile:
        (a.out / "startup_profile.txt").write_text((work / f"proc{a.processes - 1}-profile.txt").read_text())
    (a.out / "startup_bench.json").write_text(json.dumps({"models": a.models, "epochs": a.epochs, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
