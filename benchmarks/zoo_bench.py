"""Every zoo family on one GPU: one model alone, the peer's vmap population, and symzoo, side by side.

    python benchmarks/zoo_bench.py --out results/                        # every registered architecture
    python benchmarks/zoo_bench.py --archs p4cnn,cnn --models 1024 --out results/
    python benchmarks/zoo_bench.py --archs p4cnn,cnn:width=16:depth=3 --out results/   # a config of the family
    python benchmarks/zoo_bench.py --smoke --out DIR                     # tiny sizes on the CPU: the code paths

Each architecture runs with its default config on its registry example task (`ArchInfo.example_task`),
generated data of the real shapes: MNIST-shaped IDX files, CIFAR-10-shaped python batches, the generated
point tasks. Batches of 128 per model (the INR task: its 64 pixels, one full batch), Adam.

  alone    one model, float32, torch.optim.Adam, GPU-resident data: a plain training loop
  vmap     the peer's way: torch.func.stack_module_state + functional_call + vmap(grad), one
           torch.optim.Adam (foreach) over the stacked parameters, bf16 autocast; eager (its compile
           is what the population program is measured against at first step, not here)
  symzoo   zoos.trainer.train_population as the pipeline runs it (bf16, on-disk compile and task-data caches), in a
           fresh process: cold (empty caches) and warm (the same caches again); Python's bytecode of the packages
           is cached as an install leaves it (`bytecode_cache`)

ZOO_BENCH_PROFILE=N (N >= 1) also prints the N costliest GPU kernels (1: 12) of a second symzoo run of each population.
A warm run that compiles kernels the cold run's Triton cache should have held prints their names.
--tuning 'channels_last=0;forward=fma' adds a symzoo run under each popconv tuning set (`parse_tuning`),
in the same call, printed under the row with the default's speed over its own.

Columns: model-epochs/s in steady state (an epoch = the example task's own training set at the batch
size; steps timed after warm-up, evaluation not counted: symzoo's after the first step and, where its steps
replay as a CUDA graph, the eager steps and the capture before the first replay, `graph_warmup` in its
timings, a one-time cost reported in zoo_bench.json), seconds from process start to the end of
the first training step, peak GPU memory, and the family's bound: model-epochs/s at the card's dense
bf16 rate for the FLOPs of a model-epoch (forward + backward, counted by torch's FlopCounterMode), or
at its memory bandwidth for the bytes a model-epoch must move at least (its inputs once, its state
read and written by the optimizer each step), whichever is lower. Ratios are printed in one run.
Results go to <out>/zoo_bench.json.
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

import numpy as np

T_START = time.perf_counter()  # the worker's process start, before torch is imported

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PEAK_FLOPS = 790e12  # dense bf16 matmul on random data, measured on the H200 (KINDS.md)
PEAK_BYTES = 4.3e12  # device-to-device copy, bytes read + written per second, the same machine
BATCH = 128
COMPILE = {"auto": None, "on": True, "off": False}  # --compile as train_population's argument
# the natural training-set size of each example task (an epoch), for the steady-state model-epochs/s
EPOCH_SAMPLES = {"mnist": 55000, "cifar10": 45000, "o5_regression": 1000, "inertia": 1000, "convex_hull": 3000,
                 "nbody": 3000, "lorentz": 1000, "inr": 64, "digits": 1197}


# ---- data ------------------------------------------------------------------------------------------

def write_data(root: Path, n_train: int) -> None:
    """MNIST-shaped IDX files and CIFAR-10-shaped batches (random pixels: the timing does not read them)."""
    from tasks.formats import write_cifar_batch, write_idx
    from tasks.images import CIFAR_FILES, IDX_FILES

    g = np.random.default_rng(0)
    (root / "mnist").mkdir(parents=True, exist_ok=True)
    arrays = [g.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), g.integers(0, 10, n_train, dtype=np.uint8),
              g.integers(0, 256, (512, 28, 28), dtype=np.uint8), g.integers(0, 10, 512, dtype=np.uint8)]
    for name, a in zip(IDX_FILES, arrays):
        write_idx(root / "mnist" / name, a)
    (root / "cifar10").mkdir(parents=True, exist_ok=True)
    per = -(-n_train // 5)
    for name in CIFAR_FILES:
        n = 512 if name == "test_batch" else per
        write_cifar_batch(root / "cifar10" / name, g.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), g.integers(0, 10, n))


def task_options(name: str, options: dict, data_dir: Path, steps: int, batch: int) -> dict:
    """The example task at `steps` batches an epoch (validation and test sets small: evaluation is not timed)."""
    if name == "inr":
        return dict(options)
    n = steps * batch
    if name in ("mnist", "cifar10"):
        return {**options, "data_dir": str(data_dir), "n_train": n, "n_val": 256}
    if name == "digits":  # a fixed set of images: whole batches of what remains after the small evaluation splits
        from tasks.images import DIGITS

        n = min(n, (DIGITS - 512) // batch * batch)
    return {**options, "n_train": n, "n_val": 256, "n_test": 256}


# ---- one architecture, one population size: a worker process -----------------------------------------

def parse_arch(entry: str) -> tuple[str, dict[str, Any]]:
    """`name` or `name:key=value:...` (values as YAML reads them) -> (name, config)."""
    import yaml

    name, *fields = entry.split(":")
    config = {}
    for f in fields:
        key, eq, value = f.partition("=")
        if not eq or not key:
            raise ValueError(f"{entry!r}: a config field is key=value, got {f!r}")
        config[key] = yaml.safe_load(value)
    return name, config


def archs_problem(entries: list[str]) -> str | None:
    """What is wrong with the --archs entries, in a line (a malformed config field, an unregistered name), or None."""
    from zoos.archs import ARCHS

    try:
        unknown = [x for x in entries if parse_arch(x)[0] not in ARCHS]
    except ValueError as e:
        return f"--archs {e}"
    return f"unknown architecture {unknown[0]!r}; registered: {', '.join(sorted(ARCHS))}" if unknown else None


def worker(entry: str, n: int, steps: int, data_dir: str, kinds: list[str], compile_: str) -> dict[str, Any]:
    import torch

    marks = {"torch": time.perf_counter() - T_START}  # seconds from process start: where the time before the trainer goes
    from tasks import get_task
    from zoos.archs import ARCHS, build_arch
    from zoos.program import max_models
    from zoos.spec import expand, parse_zoo, populations
    from zoos.trainer import GRAPH_WARMUP, train_population

    imported_at = marks["symzoo"] = time.perf_counter() - T_START  # the interpreter, torch and symzoo
    device = "cuda" if torch.cuda.is_available() else "cpu"
    arch, config = parse_arch(entry)
    info = ARCHS[arch]
    task_name, base = info.example_task
    batch = 64 if task_name == "inr" else BATCH
    options = task_options(task_name, base, Path(data_dir), steps, batch)
    out: dict[str, Any] = {"arch": entry, "task": task_name, "models": n, "device": device}
    grid: dict[str, Any] = {"seed": list(range(n)), "optimizer": ["adam"], "lr": [1e-3], "batch_size": [batch]}
    epoch_steps, epochs = -(-options.get("n_train", steps * batch) // batch), 2  # the timed runs' steps an epoch
    if task_name == "inr":  # one full batch of an image's pixels an epoch
        grid["image"] = grid.pop("seed")
        epoch_steps, epochs = 1, 2 * steps
    zoo = parse_zoo({"name": arch, "task": {"name": task_name, "options": options}, "arch": {"name": arch, "config": config},
                     "grid": grid, "epochs": epochs, "checkpoints": [epochs], "train_metrics": "running"})
    pop = populations(expand(zoo, "bench"), max_size=n)[0]
    task = get_task(task_name, **options)
    fits = max_models(pop, task) if device == "cuda" else None
    marks["max_models"] = time.perf_counter() - T_START  # the program's trace (with the data if the task reads it)
    if fits is not None and fits < n:  # one program's activations within 32-bit indexing: as the pipeline splits
        out["capped_from"], n = n, fits
        out["models"] = n
        pop = populations(expand(zoo, "bench"), max_size=n)[0]
    if "symzoo" in kinds:
        from zoos import popconv

        tuning = popconv.parse_tuning(os.environ["ZOO_BENCH_TUNING"])[0] if os.environ.get("ZOO_BENCH_TUNING") else {}
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t_call = time.perf_counter()
        marks["cuda"] = t_call - T_START  # the CUDA context
        with popconv.tuned(tuning):  # the symzoo run and its profile
            result = train_population(pop, device=device, precision="bf16" if device == "cuda" else "float32",
                                      compile=COMPILE[compile_])
            t = result.timings
            # the steady state: every step but the first and, where steps replay as a CUDA graph, its warm-up
            warmup = GRAPH_WARMUP if "graph_warmup" in t else 0
            step_s = t["steps"] / max(1, epochs * epoch_steps - 1 - warmup)
            out["symzoo"] = {"step_ms": 1e3 * step_s, "first_step_s": t_call - T_START + t["first_step_at"],
                             "called_at_s": t_call - T_START,  # process start, imports, CUDA, data: before the trainer
                             "imported_at_s": imported_at, "marks": marks,
                             "timings": t, "program": result.program["summary"], "fast": result.program["fast"],
                             "compiled_ahead": result.program.get("compiled_ahead"),
                             "reason": result.program["reason"],
                             "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None}
            if os.environ.get("ZOO_BENCH_PROFILE") and device == "cuda":
                top = int(os.environ["ZOO_BENCH_PROFILE"])
                out["symzoo"]["profile"] = profile(pop, compile_, 12 if top == 1 else top)
    model = build_arch(arch, task, **config)
    out["params"] = model.num_params
    if "alone" in kinds:
        out["alone"] = time_alone(model, task, device, steps, batch)
    if "vmap" in kinds:
        try:
            out["vmap"] = time_vmap(arch, config, task, n, device, batch)
        except Exception as e:  # noqa: BLE001 - the peer's program failing (memory, indexing) is a result
            out["vmap"] = {"step_ms": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
        if device == "cuda":
            torch.cuda.empty_cache()
    out["bound"] = bound(model, task, batch, device)
    return out


def profile(pop: Any, compile_: str, top: int = 12) -> list[str]:
    """The GPU kernels of a second, compiled-already run of the population: the most costly `top`, as lines."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from zoos.trainer import train_population

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        train_population(pop, device="cuda", precision="bf16", compile=COMPILE[compile_])
    events = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events) or 1
    return [f"{100 * e.self_device_time_total / total:5.1f}% {e.self_device_time_total / 1e3:8.1f} ms {e.count:6d}x  "
            f"{_short(e.key)}" for e in events[:top]]


def _short(kernel: str, width: int = 150) -> str:
    """A kernel's name without its argument list and the namespaces every ATen kernel repeats, so that an
    elementwise kernel's functor (deep in its template arguments) shows."""
    for noise in ("void ", "at::native::", "(anonymous namespace)::", "c10::"):
        kernel = kernel.replace(noise, "")
    return kernel.split("(", 1)[0][:width]


def _batch(task: Any, device: str, batch: int):
    import torch

    x, y = task.load("train", 0) if task.per_model is None else task.load_models("train", 0, [0])
    if task.per_model is not None:
        y = y[0]
    idx = torch.arange(batch) % len(x)
    return x[idx].to(device), y[idx].to(device)


def time_alone(model: Any, task: Any, device: str, steps: int, batch: int) -> dict[str, float]:
    """One model, float32, a plain torch loop: ms a step after 5 warm-up steps."""
    import torch

    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = _batch(task, device, batch)

    def step():
        loss = task.loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed(step, device, max(5, min(steps, 30)))


def time_vmap(arch: str, config: dict[str, Any], task: Any, n: int, device: str, batch: int) -> dict[str, Any]:
    """The peer's population: stacked states, vmap(grad) of functional_call, one foreach Adam, bf16 autocast."""
    import torch
    from torch.func import functional_call, grad, stack_module_state, vmap

    from zoos.archs import build_arch

    models = [build_arch(arch, task, **config).to(device) for _ in range(n)]
    params, buffers = stack_module_state(models)
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    base = build_arch(arch, task, **config).to("meta")
    opt = torch.optim.Adam(params.values(), lr=1e-3, foreach=True)
    x1, y1 = _batch(task, device, batch)
    x, y = x1.expand(n, *x1.shape), y1.expand(n, *y1.shape)

    def loss(p, b, xb, yb):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
            pred = functional_call(base, (p, b), (xb,))
        return task.loss(pred.float(), yb)

    grads_of = vmap(grad(loss), randomness="different")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        grads = grads_of(params, buffers, x, y)
        for k, p in params.items():
            p.grad = grads[k]
        opt.step()

    try:
        times = timed(step, device, 5)
    except torch.OutOfMemoryError:
        return {"step_ms": None, "error": "out of memory"}
    return {**times, "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None}


WINDOWS = 5  # a peer's step time is the median of this many timed windows; their range is its spread


def timed(fn, device: str, iters: int, warmup: int = 3) -> dict[str, Any]:
    """ms per call after `warmup` calls: {"step_ms": the median of WINDOWS windows of `iters` calls, each timed
    with a device sync at both ends, "step_ms_range": [the fastest window's, the slowest's]}."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    windows = []
    for _ in range(WINDOWS):
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        windows.append(1e3 * (time.perf_counter() - t0) / iters)
    return {"step_ms": float(np.median(windows)), "step_ms_range": [min(windows), max(windows)]}


def bound(model: Any, task: Any, batch: int, device: str) -> dict[str, float]:
    """Model-epochs/s ceilings from one model-step's FLOPs (forward + backward) and minimal bytes."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x, y = _batch(task, "cpu", batch)
    model = model.cpu()
    with FlopCounterMode(display=False) as counter:
        task.loss(model(x), y).backward()
    flops = counter.get_total_flops()
    n_params = sum(p.numel() for p in model.parameters())
    bytes_ = x.numel() * 2 + n_params * 4 * 7  # bf16 inputs; weight, grad, two moments read, three written
    steps = max(1, EPOCH_SAMPLES.get(task.name, batch) // batch)
    return {"flops_per_step": flops, "bytes_per_step": bytes_,
            "model_epochs_per_s": min(PEAK_FLOPS / max(flops, 1), PEAK_BYTES / bytes_) / steps}


# ---- the driver: one process per (architecture, population size), cold then warm caches -------------

def run(args: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, env=env, timeout=1200)
    if out.returncode:
        return {"error": (out.stderr or out.stdout)[-1500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def bytecode_cache(folder: Path) -> dict:
    """A worker's environment: the pipeline workers' variables (`WORKER_ENV`) and Python's bytecode cache in
    `folder`, filled once by importing what a worker imports:
    what pip writes when it installs the packages (an image with read-only, uncompiled site-packages would
    otherwise compile torch's sources to bytecode in every process, seconds a process; so would
    PYTHONDONTWRITEBYTECODE, which this leaves out)."""
    from pipeline.localray import WORKER_ENV

    env = {**WORKER_ENV, **os.environ, "PYTHONPYCACHEPREFIX": str(folder),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    done = subprocess.run([sys.executable, "-c", "import sympy, torch, torch._dynamo, torch._inductor, tasks, zoos.archs, "
                           "zoos.trainer"], env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        sys.exit(f"zoo_bench: a worker's imports failed:\n{done.stderr[-2000:]}")
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="", help="comma-separated architectures (default: every registered one)")
    ap.add_argument("--models", default="256,1024")
    ap.add_argument("--steps", type=int, default=40, help="training steps an epoch in the timed runs (2 epochs)")
    ap.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="symzoo's torch.compile")
    ap.add_argument("--no-warm", action="store_true", help="skip the warm-cache rerun")
    ap.add_argument("--kinds", default="symzoo,alone,vmap", help="which of symzoo, alone, vmap to run")
    ap.add_argument("--tuning", default="", help="';'-separated popconv tuning sets, a symzoo run under each")
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--worker", nargs=6, metavar=("ARCH", "N", "STEPS", "DATA", "KINDS", "COMPILE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        arch, n, steps, data, kinds, comp = a.worker
        print(json.dumps(worker(arch, int(n), int(steps), data, kinds.split(","), comp)))
        return
    from zoos.archs import ARCHS
    from zoos.popconv import parse_tuning

    archs = a.archs.split(",") if a.archs else sorted(ARCHS)
    try:
        tunings = [t.strip() for t in a.tuning.split(";") if t.strip()]
        for t in tunings:
            parse_tuning(t)
    except ValueError as e:
        sys.exit(f"zoo_bench: --tuning {e}")
    problem = archs_problem(archs)
    if problem:
        sys.exit(f"zoo_bench: {problem}")
    sizes = [2] if a.smoke else [int(m) for m in a.models.split(",")]
    steps = 3 if a.smoke else a.steps
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-"))
    write_data(work / "data", steps * BATCH + 256)  # train + validation
    base_env = bytecode_cache(work / "pycache")
    rows = []
    print(f"{'arch':20s} {'N':>5s} {'alone':>9s} {'vmap':>9s} {'symzoo':>9s} {'x vmap':>7s} {'x alone':>8s} "
          f"{'bound':>9s} {'1st cold':>8s} {'1st warm':>8s} {'peak GB':>7s}  program", flush=True)
    for arch in archs:
        for n in sizes:
            caches = work / f"cache-{arch}-{n}"
            env = {**base_env, "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"), "TRITON_CACHE_DIR": str(caches / "triton"),
                   "SYMZOO_CACHE": str(caches / "symzoo")}  # generated task data: cold generates it, warm reads it
            cold = run([arch, str(n), str(steps), str(work / "data"), a.kinds, a.compile], env)
            cached = triton_entries(caches / "triton")
            warm = {} if a.no_warm or "error" in cold else run([arch, str(n), str(steps), str(work / "data"), "symzoo", a.compile], env)
            missed = kernel_names(caches / "triton", triton_entries(caches / "triton") - cached) if warm else {}
            row = {**cold, "warm": warm.get("symzoo"), "warm_error": warm.get("error"), "warm_compiled": missed, "tuned": {}}
            rows.append(row)
            print(line(arch, n, row), flush=True)
            if missed:  # kernels the warm run did not find in the cold run's cache
                print(f"      warm: {sum(missed.values())} kernels compiled again: "
                      + ", ".join(f"{k} x{v}" for k, v in sorted(missed.items(), key=lambda kv: -kv[1])), flush=True)
            for peer in ("alone", "vmap"):
                low, high = (row.get(peer) or {}).get("step_ms_range") or (0, 0)
                if low and high > 1.1 * low:  # a peer whose windows disagree: its ratio is only as good as this
                    print(f"      {peer}: {low:.3g}-{high:.3g} ms a step over {WINDOWS} windows "
                          f"(median {row[peer]['step_ms']:.3g})", flush=True)
            for name, r in (("cold", row.get("symzoo")), ("warm", row.get("warm"))):
                if r and r.get("compiled_ahead"):
                    ahead = r["compiled_ahead"]
                    workers = f", {ahead['processes']} in worker processes" if ahead.get("processes") else ""
                    print(f"      {name}: {ahead['kernels']} kernels compiled ahead in {r['timings'].get('compile', 0):.1f} s "
                          f"(the dry run, then {ahead.get('seconds', float('nan')):.1f} s compiling{workers})", flush=True)
            for t in tunings if "error" not in cold else []:
                tuned = run([arch, str(n), str(steps), str(work / "data"), "symzoo", a.compile], {**env, "ZOO_BENCH_TUNING": t})
                row["tuned"][t] = tuned.get("symzoo") or {"error": tuned.get("error")}
                ms = row["tuned"][t].get("step_ms")
                print(f"      tuning {t}: " + (f"{ms:.2f} ms a step; the default is {ms / row['symzoo']['step_ms']:.2f}x as fast"
                                                if ms else f"error {str(tuned.get('error')).strip().splitlines()[-1][:150]}"), flush=True)
            for kernel in (row.get("symzoo") or {}).get("profile", []):
                print("      " + kernel, flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "zoo_bench.json").write_text(json.dumps({"rows": rows, "steps": steps, "batch": BATCH}, indent=1))


def triton_entries(root: Path) -> set[str]:
    """The entries (one a compiled kernel specialisation) of a Triton cache directory."""
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def kernel_names(root: Path, entries: set[str]) -> dict[str, int]:
    """How many of `entries` each kernel has: the names of their compiled binaries (Triton names them after the kernel)."""
    names: dict[str, int] = {}
    for entry in entries:
        for f in (root / entry).glob("*.json"):
            if not f.name.startswith("__grp__"):
                names[f.stem] = names.get(f.stem, 0) + 1
    return names


def line(arch: str, n: int, row: dict) -> str:
    """One printed row: model-epochs/s of each way, the ratios, the bound, first-step times, memory."""
    if "error" in row:
        return f"{arch:20s} {n:5d}  error: {row['error'].strip().splitlines()[-1][:150]}"
    n = row["models"]
    steps = max(1, EPOCH_SAMPLES.get(row["task"], BATCH) // (64 if row["task"] == "inr" else BATCH))

    def rate(ms: float | None, models: int) -> float | None:
        return None if not ms else models * 1e3 / (ms * steps)

    alone = rate((row.get("alone") or {}).get("step_ms"), 1)
    vm = rate((row.get("vmap") or {}).get("step_ms"), n)
    ours = rate(row["symzoo"]["step_ms"], n)
    fmt = lambda v: f"{v:9.4g}" if v else f"{'-':>9s}"  # noqa: E731
    ratio = lambda a, b: f"{a / b:6.1f}x" if a and b else f"{'-':>7s}"  # noqa: E731
    warm = row.get("warm") or {}
    peak = row["symzoo"].get("peak_gb")
    return (f"{arch:20s} {n:5d} {fmt(alone)} {fmt(vm)} {fmt(ours)} {ratio(ours, vm)} {ratio(ours, alone):>8s} "
            f"{fmt(row['bound']['model_epochs_per_s'])} {row['symzoo']['first_step_s']:8.1f} "
            f"{warm.get('first_step_s', float('nan')):8.1f} {peak if peak is not None else float('nan'):7.2f}  "
            f"{row['symzoo']['program'] if row['symzoo']['fast'] else 'vmap: ' + str(row['symzoo']['reason'])[:60]}")


if __name__ == "__main__":
    main()
