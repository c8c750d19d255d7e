"""The group CNNs' weight prologue as gathers (`zoos.popgather`) against vmap: a training step side by side.

    .venv/bin/python benchmarks/prologue_bench.py --out DIR                     # CUDA: 256 models x 128 images, bf16, kernels
    .venv/bin/python benchmarks/prologue_bench.py --models 16 --batch 32 --out DIR   # the CPU: float32, grouped convs

Each family with its default config on its example task, random data of the task's shape: one population
program built twice in one process, its kernel expansions and repeated biases as gathers (the default) and as
one vmapped prologue (`popgather.vmapped()`), the rest alike. A step is `FastStep`'s forward and backward
(the trainer's gradients); ms a step is the median of `--repeats` windows of `--steps` steps after warm-up, the
two programs' windows interleaved; "ops" are the ATen ops one step dispatches (on a GPU, about its launches).
Results go to <out>/prologue_bench.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import get_task  # noqa: E402
from zoos import popgather  # noqa: E402
from zoos.archs import ARCHS, build_arch  # noqa: E402
from zoos.fastpop import FastStep  # noqa: E402
from zoos.functional import stack_states, template  # noqa: E402


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def family(arch: str, n: int, batch: int, steps: int, repeats: int, device: str) -> dict:
    task_name, options = ARCHS[arch].example_task
    task = get_task(task_name, **options)
    models = [build_arch(arch, task) for _ in range(n)]
    params, buffers = (({k: v.to(device) for k, v in d.items()}) for d in stack_states(models))
    module = template(models[0])
    cuda = device == "cuda"
    make = lambda: FastStep(module, task.loss, task.input_shape, dtype=torch.bfloat16 if cuda else torch.float32,  # noqa: E731
                            dropout=False, kernels=cuda)
    with popgather.vmapped():
        programs = {"vmap": make()}
    programs["gather"] = make()
    x = torch.randn(n, batch, *task.input_shape, device=device)
    y = torch.randint(0, int(np.prod(task.output_shape)), (n, batch), device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out: dict = {"arch": arch, "models": n, "batch": batch, "device": torch.cuda.get_device_name() if cuda else "cpu"}
    for name, step in programs.items():
        for _ in range(3):
            step(params, buffers, x, y)
        with _Count() as count:
            step(params, buffers, x, y)
        out[name] = {"ops": count.ops, "windows": []}
        out[name]["prologue"] = next(why for layer, _, why in step.pop.choices if layer == "weights")
    for _ in range(repeats):
        for name, step in programs.items():
            sync()
            t = time.perf_counter()
            for _ in range(steps):
                step(params, buffers, x, y)
            sync()
            out[name]["windows"].append(1e3 * (time.perf_counter() - t) / steps)
    for name in programs:
        out[name]["step_ms"] = float(np.median(out[name]["windows"]))
    return out


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="p4cnn,p4mcnn,canon_cnn")
    ap.add_argument("--models", type=int, default=256 if cuda else 16)
    ap.add_argument("--batch", type=int, default=128 if cuda else 32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("results"))
    a = ap.parse_args()
    unknown = [x for x in a.archs.split(",") if x not in ARCHS]
    if unknown:
        sys.exit(f"prologue_bench: --archs: unknown architecture {unknown[0]!r}; registered: {', '.join(sorted(ARCHS))}")
    rows = []
    print(f"{'arch':12s} {'ops vmap':>9s} {'ops gather':>11s} {'ms vmap':>9s} {'ms gather':>10s} {'vmap/gather':>12s}  range (ms)")
    for arch in a.archs.split(","):
        r = family(arch, a.models, a.batch, a.steps, a.repeats, "cuda" if cuda else "cpu")
        rows.append(r)
        v, g = r["vmap"], r["gather"]
        print(f"{arch:12s} {v['ops']:9d} {g['ops']:11d} {v['step_ms']:9.3f} {g['step_ms']:10.3f} {v['step_ms'] / g['step_ms']:11.2f}x"
              f"  vmap {min(v['windows']):.3g}-{max(v['windows']):.3g}, gather {min(g['windows']):.3g}-{max(g['windows']):.3g}",
              flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "prologue_bench.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
