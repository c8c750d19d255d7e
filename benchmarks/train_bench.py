"""Population training on one GPU: symzoo's Ray pipeline vs one model per Ray task (the published zoos' way).

    python benchmarks/train_bench.py --out results/          # on a CUDA machine; ~6 min on one H100
    python benchmarks/train_bench.py --smoke                 # tiny sizes on the CPU: the code paths only
    python benchmarks/train_bench.py --skip steps,variants --models 2048 --pop 2048 --pipeline-epochs 10 \
        --train-metrics running                             # baseline + the pipeline at 2,048 x 10 epochs
    python benchmarks/train_bench.py --skip baseline,pipeline,variants --steps 2048,1024 --step-kinds kernels \
        --tuning "window_block_m=64;window_block_m=128"      # the step alone, two popconv tuning sets

Workload: the CNN-s zoo on 28x28x1 images, 60,000 training samples resident on the device (a
generated, learnable MNIST-shaped data set written as IDX files, read through the `mnist` task),
batch 128 per model, Adam lr 1e-3, every model its own init and data order.

  baseline   one model per Ray task, num_gpus=1/8 (8 at once), a standard PyTorch loop
             (torch.optim.Adam, float32) on the same GPU-resident data
  pipeline   `symzoo`'s own path: run_study -> Ray task per population -> train_population -> store
  variants   train_population called directly (no Ray) for each (trainer path, dtype, population size),
             plus a step-only loop and a torch.profiler table of the fast step

Both figures are model-epochs per second; the ratio is printed side by side. Results go to
<out>/train_bench.json and <out>/profile.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.formats import write_idx  # noqa: E402
from tasks.images import IDX_FILES  # noqa: E402

BATCH, LR = 128, 1e-3


# ---- data: a learnable MNIST-shaped set (10 stroke prototypes, shifted, scaled and noisy) ------------

def make_idx_data(root: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    """Write the four MNIST IDX files: n_train + 5,000 (val) training images and n_test test images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    protos = []
    for _ in range(10):
        img = np.zeros((28, 28))
        p0, ctrl, p1 = rng.uniform(6, 22, size=(3, 2))
        for t in np.linspace(0, 1, 12):  # a stroke: blobs along a quadratic Bezier curve
            c = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * ctrl + t**2 * p1
            img += np.exp(-((yy - c[0]) ** 2 + (xx - c[1]) ** 2) / 4.0)
        protos.append(img / img.max())
    protos = np.stack(protos)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 10, n)
        x = np.empty((n, 28, 28), dtype=np.uint8)
        for s in range(0, n, 5000):
            yb = y[s : s + 5000]
            imgs = protos[yb] * rng.uniform(0.6, 1.0, (len(yb), 1, 1))
            shifts = rng.integers(-3, 4, (len(yb), 2))
            imgs = np.stack([np.roll(im, tuple(sh), (0, 1)) for im, sh in zip(imgs, shifts)])
            imgs += rng.normal(0, 0.25, imgs.shape)
            x[s : s + 5000] = (np.clip(imgs, 0, 1) * 255).astype(np.uint8)
        return x, y.astype(np.uint8)

    xtr, ytr = sample(n_train + 5000)
    xte, yte = sample(n_test)
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in zip(IDX_FILES, (xtr, ytr, xte, yte)):
        write_idx(root / name, arr)


def task_options(data_dir: Path) -> dict:
    return {"data_dir": str(data_dir), "n_val": 5000}


# ---- baseline: one model per Ray task, fractional GPU, a standard torch loop -------------------------

def one_model(seed: int, epochs: int, data_dir: str) -> dict:
    """Train one CNN-s the usual way (inside a Ray task): Adam, shuffled mini-batches of GPU-resident data."""
    import torch.nn.functional as F

    from tasks import task_with_data
    from zoos.init import init_model
    from zoos.spec import TRAIN_DEFAULTS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    task = task_with_data("mnist", {"n_val": 5000}, data_dir)
    x, y = (t.to(device) for t in task.load("train", seed=0))
    xt, yt = (t.to(device) for t in task.load("test", seed=0))
    model = init_model("cnn_s", {}, {**TRAIN_DEFAULTS, "seed": seed}, task).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    g = torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x), device=device, generator=g)
        for s in range(0, len(x), BATCH):
            idx = order[s : s + BATCH]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    if device == "cuda":
        torch.cuda.synchronize()
    return {"train_s": time.perf_counter() - t0, "test_acc": acc}


def run_baseline(n_models: int, epochs: int, data_dir: Path, gpu: bool) -> dict:
    import ray

    task = ray.remote(one_model).options(num_gpus=1 / 8 if gpu else 0, num_cpus=0.1 if gpu else 1)
    t0 = time.perf_counter()
    out = ray.get([task.remote(s, epochs, str(data_dir)) for s in range(n_models)])
    wall = time.perf_counter() - t0
    accs = [o["test_acc"] for o in out]
    return {"models": n_models, "epochs": epochs, "wall_s": wall, "model_epochs_per_s": n_models * epochs / wall,
            "alone_model_epochs_per_s": float(np.mean([epochs / o["train_s"] for o in out])),
            "test_acc_mean": float(np.mean(accs)), "test_acc_std": float(np.std(accs))}


# ---- the pipeline: run_study with a one-zoo study ---------------------------------------------------

def zoo_dict(n_models: int, epochs: int, pop_size: int, data_dir: Path, train_metrics: str = "full") -> dict:
    """The CNN-s zoo every run of this benchmark trains."""
    return {
        "name": "cnn_s", "task": {"name": "mnist", "options": task_options(data_dir)},
        "arch": {"name": "cnn_s"}, "grid": {"seed": list(range(n_models)), "lr": [LR], "optimizer": ["adam"],
                                             "batch_size": [BATCH]},
        "epochs": epochs, "checkpoints": "0,last", "population_size": pop_size, "train_metrics": train_metrics,
    }


def study_dict(name: str, n_models: int, epochs: int, pop_size: int, data_dir: Path, work: Path, precision: str, gpu: bool,
               train_metrics: str = "full") -> dict:
    return {
        "study": name, "store": str(work / f"store-{name}"), "output": str(work / f"runs-{name}"),
        "tracking_uri": tracking_uri(work / f"tracking-{name}"),  # a store per run: a file store slows as it fills
        "resources": {"num_gpus": 1 if gpu else 0, "num_cpus": 1, "precision": precision, "max_retries": 0,
                      "compile": gpu},  # a long CNN-s run: compiled steps repay their compile (README.md)
        "zoos": [zoo_dict(n_models, epochs, pop_size, data_dir, train_metrics)],
    }


def tracking_uri(work: Path) -> str:
    """sqlite where SQLAlchemy is installed; else MLflow's file store (mlflow-skinny on the GPU machine)."""
    import importlib.util

    work.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("sqlalchemy"):
        return f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    return (work / "mlruns").as_uri()


class GpuMemory:
    """Peak GPU memory used (nvidia-smi, every 0.2 s) while the block runs: the pipeline's workers included."""

    def __enter__(self):
        self.peak, self.total, self._stop = 0, 0, threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            try:
                line = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"],
                                      capture_output=True, text=True, timeout=5).stdout.split("\n")[0]
                used, total = (int(v) for v in line.split(","))
                self.peak, self.total = max(self.peak, used), total
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            time.sleep(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run_pipeline(name: str, n_models: int, epochs: int, pop_size: int, data_dir: Path, work: Path, precision: str, gpu: bool,
                 train_metrics: str = "full") -> dict:
    from pipeline.progress import Display
    from pipeline.runner import run_study
    from pipeline.study import parse_study
    from zoos.store import Store

    study = parse_study(study_dict(name, n_models, epochs, pop_size, data_dir, work, precision, gpu, train_metrics))
    with GpuMemory() as mem:
        report = run_study(study, display=Display(plain=True, every_s=60.0))
    models = Store(study.store).models("cnn_s").collect()
    accs = models["test_acc"].to_numpy()
    me = n_models * epochs
    return {"models": n_models, "epochs": epochs, "population_size": pop_size, "precision": precision,
            "train_metrics": train_metrics, "phases": [pl["timings"] for pl in report.placements],
            "wall_s": report.wall_s, "train_task_s": report.train_task_s, "tracking_wait_s": report.tracking_wait_s,
            "model_epochs_per_s_tasks": me / report.train_task_s, "model_epochs_per_s_wall": me / report.wall_s,
            "gpu_mem_peak_mib": mem.peak, "gpu_mem_total_mib": mem.total,
            "test_acc_mean": float(np.mean(accs)), "test_acc_std": float(np.std(accs)),
            "test_acc_first64_mean": float(np.mean(accs[:64])), "diverged": int((models["status"] != "ok").sum())}


# ---- variants: train_population directly, the step alone, a profile --------------------------------

def population(n_models: int, epochs: int, data_dir: Path, first_seed: int = 0, train_metrics: str = "full"):
    from zoos.spec import expand, parse_zoo, populations

    zoo = zoo_dict(n_models, epochs, n_models, data_dir, train_metrics)  # no study: nothing written
    zoo["grid"]["seed"] = list(range(first_seed, first_seed + n_models))
    return populations(expand(parse_zoo(zoo), "v"), n_models)[0]


def run_variant(n_models: int, kind: str, precision: str, data_dir: Path, device: str, train_metrics: str = "full") -> dict:
    """kind: vmap (grouped convs), fast (im2col + bmm) or kernels (popconv's Triton convs); with -nographs the
    steps run eagerly instead of replaying as a CUDA graph."""
    from zoos.trainer import train_population

    pop = population(n_models, 1, data_dir, train_metrics=train_metrics)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    path = kind.removesuffix("-nographs")
    res = train_population(pop, device=device, precision=precision, fast=path != "vmap", kernels=path == "kernels",
                           graphs=None if path == kind else False)
    wall = time.perf_counter() - t0
    out = {"models": n_models, "kind": kind, "precision": precision, "train_metrics": train_metrics, "wall_s": wall,
           "model_epochs_per_s": n_models / wall, "test_acc_mean": float(np.mean(res.curves["test_acc"][:, -1])),
           "timings": res.timings}
    if device == "cuda":
        out["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


STEP_FLAGS = {"unfused": "pool and activation as separate (inductor) kernels", "gather": "the first conv gathers "
              "from the data set (no window table)", "paddeddx": "a pooled layer's input gradient as the padded conv "
              "of the unpooled gradient", "eager": "the optimizer update as eager torch ops"}


def run_steps(n_models: int, precision: str, data_dir: Path, device: str, steps: int, kind: str,
              profile_to: Path | None = None, tuning: dict | None = None) -> dict:
    """The fast training step alone (batch indices, forward, backward, AdamW + divergence check, as the
    trainer runs them) timed over `steps` steps. kind: fast (im2col + bmm) or kernels (popconv), with any
    of the STEP_FLAGS appended, e.g. kernels-gather-eager (session 4's step); `tuning`: popconv tuning
    entries for this run (tile sizes read at launch)."""
    from torch.profiler import ProfilerActivity, profile

    from tasks import task_with_data
    from zoos import popconv
    from zoos.fastpop import FastStep
    from zoos.functional import stack_states, template
    from zoos.init import init_model
    from zoos.spec import TRAIN_DEFAULTS
    from zoos.trainer import Optimizer

    base, *flags = kind.split("-")
    unknown = set(flags) - set(STEP_FLAGS)
    if base not in ("fast", "kernels") or unknown:
        raise SystemExit(f"step kind {kind!r}: expected fast or kernels, then any of -{', -'.join(STEP_FLAGS)}")
    kernels, fuse = base == "kernels", "unfused" not in flags
    task = task_with_data("mnist", task_options(data_dir))
    x, y = (t.to(device) for t in task.load("train", seed=0))
    models = [init_model("cnn_s", {}, {**TRAIN_DEFAULTS, "seed": s}, task) for s in range(n_models)]
    params, buffers = stack_states(models)
    params = {k: v.to(device) for k, v in params.items()}
    buffers = {k: v.to(device) for k, v in buffers.items()}
    lr = torch.full((n_models,), LR, device=device)
    optimizer = Optimizer("adam", params, lr, torch.zeros_like(lr), torch.full_like(lr, 0.9),
                          update="compiled" if device == "cuda" and "eager" not in flags else "eager")  # in place
    if precision == "bf16":
        x = x.to(torch.bfloat16)  # resident in the compute dtype, as the trainer keeps it
    now = popconv.tuning.current()
    changes = {"fuse": fuse,  # read when the graph is emitted
               "windows": "never" if "gather" in flags else now.windows,  # read when the table is built
               "window_dx": "paddeddx" not in flags and now.window_dx,  # read when the graph is emitted
               **(tuning or {})}
    with popconv.tuned(changes):
        step = FastStep(template(models[0]), task.loss, task.input_shape, dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                        compile=device == "cuda", dropout=False, kernels=kernels)

        def one(i: int):
            idx = torch.randint(0, len(x), (n_models, BATCH), device=device)
            grads, loss = step(params, buffers, x, y[idx], rows=idx)
            optimizer.step(params, grads, loss)

        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        for i in range(3):
            one(i)
        sync()
        first = time.perf_counter() - t0  # tracing and compiling included
        t0 = time.perf_counter()
        for i in range(steps):
            one(i)
        sync()
        dt = (time.perf_counter() - t0) / steps
        out = {"models": n_models, "precision": precision, "kind": kind, "tuning": tuning or {}, "step_ms": dt * 1e3,
               "first_steps_s": first, "model_epochs_per_s": n_models * BATCH / (dt * len(x)),
               "window_table": step.pop.window_table(x) is not None}
        if profile_to is not None:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            with profile(activities=acts) as prof:
                for i in range(5):
                    one(i)
                sync()
            key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
            profile_to.write_text(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
        return out


# ---- main -------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--models", type=int, default=1024, help="pipeline: models in the zoo")
    ap.add_argument("--pop", type=int, default=1024, help="pipeline: population size")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-metrics", default="full,running",
                    help="pipeline runs, one per zoo train_metrics mode: full (a pass over the train split after "
                         "every epoch) and/or running (the epoch's batches)")
    ap.add_argument("--pipeline-epochs", default="", help="pipeline: comma list of epochs, a run of each train_metrics "
                    "mode for each (default: --epochs); the baseline trains --epochs")
    ap.add_argument("--baseline-models", type=int, default=64)
    ap.add_argument("--variants", default="vmap:float32:256,fast:bf16:1024,kernels:float32:256,kernels:bf16:256,"
                                          "kernels:bf16:1024,kernels:bf16:2048",
                    help="trainer runs, kind:precision:models[:train_metrics]; kind = vmap | fast (im2col) | kernels "
                         "(Triton), with -nographs: eager steps (no CUDA graph)")
    ap.add_argument("--steps", default="256,1024,2048,4096")
    ap.add_argument("--step-kinds", default="kernels-gather-paddeddx-eager,kernels-paddeddx-eager,kernels-paddeddx,kernels",
                    help="step-only loops: fast (im2col) or kernels (popconv, pool and activation folded, the first conv "
                         "from its window table, compiled update), each with flags: " +
                         "; ".join(f"-{k}: {v}" for k, v in STEP_FLAGS.items()))
    ap.add_argument("--tuning", default="", help="step-only loops: ';'-separated sets of popconv tuning "
                    "key=value,... each run with every step kind, e.g. 'window_block_m=64;window_block_m=256,window_warps=8'")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: baseline,pipeline,variants,steps")
    a = ap.parse_args()
    from zoos import popconv

    try:
        tunings = popconv.parse_tuning(a.tuning)
    except ValueError as e:
        ap.error(str(e))
    gpu = torch.cuda.is_available() and not a.smoke
    device = "cuda" if gpu else "cpu"
    n_train = 600 if a.smoke else 60000
    if a.smoke:
        a.models, a.pop, a.epochs, a.baseline_models = 8, 4, 1, 2
        a.variants, a.steps = "vmap:float32:4,fast:float32:4", "4"
        a.step_kinds = "fast"
    skip = set(filter(None, a.skip.split(",")))
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    data_dir = work / "data"
    make_idx_data(data_dir, n_train, 10000 if not a.smoke else 500)
    os.environ["SYMZOO_DATA"] = str(data_dir)
    results: dict = {"device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
                     "n_train": n_train, "batch": BATCH}

    def save():
        (a.out / "train_bench.json").write_text(json.dumps(results, indent=2))

    def say(msg: str):
        print(msg, flush=True)

    if "steps" not in skip:
        results["steps"] = []
        sizes = [int(s) for s in a.steps.split(",")]
        for t, tuning in enumerate(tunings):
            named = ",".join(f"{k}={v}" for k, v in tuning.items())
            for kind in a.step_kinds.split(","):
                for n in sizes:
                    prof = a.out / f"profile-{kind}{f'-t{t}' if t else ''}.txt" if n == sizes[min(1, len(sizes) - 1)] else None
                    try:
                        r = run_steps(n, "bf16" if gpu else "float32", data_dir, device, steps=50 if gpu else 2, kind=kind,
                                      profile_to=prof, tuning=tuning)
                    except Exception as e:  # a tile that does not fit this card: say so, go on with the others
                        say(f"step only   N={n:5d} {kind:22s} failed: {type(e).__name__}: {str(e)[:200]}  {named}")
                        results["steps"].append({"models": n, "kind": kind, "tuning": tuning, "error": f"{type(e).__name__}: {e}"})
                        continue
                    results["steps"].append(r)
                    say(f"step only   N={n:5d} {kind:22s} {r['precision']:8s} {r['step_ms']:8.2f} ms/step  "
                        f"{r['model_epochs_per_s']:8.1f} model-epochs/s  (first 3 steps {r['first_steps_s']:.1f} s) {named}")
                    save()
    if "variants" not in skip:
        results["variants"] = []
        for v in a.variants.split(","):
            kind, prec, n, *mode = v.split(":")
            r = run_variant(int(n), kind, prec, data_dir, device, *mode)
            results["variants"].append(r)
            phases = ", ".join(f"{k} {t:.2f}" for k, t in r["timings"].items())
            say(f"trainer     N={n:>5s} {kind:16s} {prec:8s} {r['train_metrics']:8s} {r['model_epochs_per_s']:8.1f} model-epochs/s "
                f"(1 epoch, eval incl., {r['wall_s']:.1f} s: {phases}; peak {r.get('gpu_mem_peak_gib', 0):.1f} GiB, "
                f"test acc {r['test_acc_mean']:.3f})")
            save()
    if skip >= {"baseline", "pipeline"}:
        return
    from pipeline.localray import init_ray

    if gpu:  # the steps and variants above leave this process's cached blocks on the card: nvidia-smi would count them
        torch.cuda.empty_cache()
    init_ray(num_cpus=os.cpu_count())
    if "baseline" not in skip:
        b = results["baseline"] = run_baseline(a.baseline_models, a.epochs, data_dir, gpu)
        say(f"baseline    {b['models']} models x {b['epochs']} epochs, 1 per Ray task, num_gpus=1/8: "
            f"{b['model_epochs_per_s']:.2f} model-epochs/s (one alone: {b['alone_model_epochs_per_s']:.2f}); "
            f"test acc {b['test_acc_mean']:.4f} +- {b['test_acc_std']:.4f}")
        save()
    if "pipeline" not in skip:
        precision = "bf16" if gpu else "float32"
        run_pipeline("warmup", min(a.pop, a.models), 1, a.pop, data_dir, work, precision, gpu)  # compiles, starts the worker
        results["pipeline"] = []
        runs = [(e, mode) for e in (a.pipeline_epochs or str(a.epochs)).split(",") for mode in a.train_metrics.split(",")]
        for i, (epochs, mode) in enumerate(runs):
            p = run_pipeline(f"bench{i}-{mode}", a.models, int(epochs), a.pop, data_dir, work, precision, gpu, mode)
            results["pipeline"].append(p)
            say(f"pipeline    {p['models']} models x {p['epochs']} epochs, populations of {p['population_size']}, {precision}, "
                f"train_metrics {mode}: {p['model_epochs_per_s_tasks']:.1f} model-epochs/s in its Ray tasks (train + store "
                f"write), {p['model_epochs_per_s_wall']:.1f} over the whole run_study wall ({p['wall_s']:.1f} s, MLflow of "
                f"every model incl.); GPU memory peak {p['gpu_mem_peak_mib']} / {p['gpu_mem_total_mib']} MiB; "
                f"test acc {p['test_acc_mean']:.4f} +- {p['test_acc_std']:.4f}, {p['diverged']} diverged; population phases "
                + "; ".join(", ".join(f"{k} {t:.2f} s" for k, t in ph.items()) for ph in p["phases"]))
            save()
    if "baseline" in results and results.get("pipeline"):
        b = results["baseline"]
        lines = [f"\n{'':62s}{'model-epochs/s':>16s}{'ratio':>8s}",
                 f"{'one model per task (1/8 GPU), ' + str(b['epochs']) + ' epochs':62s}{b['model_epochs_per_s']:16.2f}{1.0:8.1f}"]
        for p in results["pipeline"]:
            p["ratio_tasks"] = p["model_epochs_per_s_tasks"] / b["model_epochs_per_s"]
            p["ratio_wall"] = p["model_epochs_per_s_wall"] / b["model_epochs_per_s"]
            what = f"{p['train_metrics']} train metrics, {p['epochs']} epochs"
            lines += [f"{'symzoo pipeline (Ray tasks), ' + what:62s}"
                      f"{p['model_epochs_per_s_tasks']:16.2f}{p['ratio_tasks']:8.1f}",
                      f"{'symzoo pipeline (whole run), ' + what:62s}"
                      f"{p['model_epochs_per_s_wall']:16.2f}{p['ratio_wall']:8.1f}"]
        say("\n".join(lines))
        save()

if __name__ == "__main__":
    main()
