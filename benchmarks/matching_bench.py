"""Weight matching per pair, and all-pairs linear-path barriers over a zoo: CPU vs GPU in one run.

    .venv/bin/python benchmarks/matching_bench.py                 # CPU only (and CUDA when present)
    python3 benchmarks/matching_bench.py --zoo-pairs 0            # on a GPU host: all pairs on the GPU

1. `analysis.matching.weight_matching` for one pair of models, timed per pair (mean of `--pairs`
   pairs after one warm-up), for Git Re-Basin's MNIST MLP 784-512-512-512-10 and ResNet-20 x4 on
   CIFAR-10 shapes. Weights are independent random initialisations (`build_arch` under different
   seeds; no data needed): trained models take more coordinate-descent sweeps, so the sweeps are
   printed and the time per sweep is the figure that carries over.
2. The all-pairs naive barrier over a zoo of 64 CNNs (arch `cnn`, width 16, depth 2, the quickstart's
   zoo shape) on the 300 digits test images: for chunks of pairs, the 25 points of every path are
   stacked as one population ([pairs x 25] models, `analysis.connectivity.interpolate` +
   `evaluate_states`) and the sup barrier is taken per pair. Pairs/s is measured on `--cpu-pairs`
   pairs on the CPU and on every pair (2,016) on the GPU. Random-init weights: the cost of a forward
   does not depend on the values.
Only torch, numpy, scipy and scikit-learn are needed (no Ray, MLflow or polars).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from analysis.connectivity import as_lambdas, barrier, evaluate_states, interpolate  # noqa: E402
from analysis.matching import weight_matching  # noqa: E402
from tasks import get_task  # noqa: E402
from zoos.archs import build_arch  # noqa: E402

MATCH_MODELS = {  # label -> (task, task options, arch, arch config)
    "MLP 784-512x3-10": ("mnist", {}, "mlp", {"width": 512, "depth": 3}),
    "ResNet-20 x4": ("cifar10", {}, "resnet20", {"width": 4}),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_states(task, arch: str, config: dict, seeds: list[int]) -> tuple[torch.nn.Module, list[dict]]:
    """A template module and one state dict per seed (the architecture's own initialisation)."""
    states = []
    for s in seeds:
        torch.manual_seed(s)
        module = build_arch(arch, task, **config)
        states.append({k: v.detach().clone() for k, v in module.state_dict().items()})
    return module.eval(), states


def time_matching(label: str, devices: list[str], pairs: int) -> dict[str, tuple[float, float]]:
    """device -> (seconds per pair, mean sweeps) for weight matching of `pairs` random pairs."""
    task_name, options, arch, config = MATCH_MODELS[label]
    module, states = random_states(get_task(task_name, **options), arch, config, list(range(2 * pairs + 2)))
    spec = module.perm_spec()
    out = {}
    for device in devices:
        on = [{k: v.to(device) for k, v in s.items()} for s in states]
        weight_matching(spec, on[-2], on[-1], device=device, generator=torch.Generator().manual_seed(0))  # warm-up
        sync(device)
        t0, sweeps = time.perf_counter(), 0
        for p in range(pairs):
            sweeps += weight_matching(spec, on[2 * p], on[2 * p + 1], device=device,
                                      generator=torch.Generator().manual_seed(p)).sweeps
        sync(device)
        out[device] = ((time.perf_counter() - t0) / pairs, sweeps / pairs)
    return out


def all_pairs_barriers(module, stacked: dict, pair_list: list[tuple[int, int]], x, y, task, device: str,
                       lambdas: int, chunk_pairs: int) -> torch.Tensor:
    """Sup loss barrier of the naive linear path of every pair, `chunk_pairs` pairs (x `lambdas` points) at a time."""
    lam = as_lambdas(lambdas)
    out = []
    for lo in range(0, len(pair_list), chunk_pairs):
        idx = torch.tensor(pair_list[lo:lo + chunk_pairs], device=device)
        a = {k: v[idx[:, 0]] for k, v in stacked.items()}
        b = {k: v[idx[:, 1]] for k, v in stacked.items()}
        path = {k: v.flatten(0, 1) for k, v in interpolate(a, b, lam, pairs=True).items()}
        loss, _ = evaluate_states(module, path, x, y, task.loss, task.metric, device=device)
        out.append(barrier(loss.view(len(idx), len(lam)), lam))
    return torch.cat(out)


def time_zoo(devices: list[str], models: int, cpu_pairs: int, zoo_pairs: int, lambdas: int, chunk_pairs: int) -> dict:
    """device -> (pairs, seconds, pairs/s) for the all-pairs barrier over a zoo of `models` CNNs."""
    task = get_task("digits", variant="upright")
    module, states = random_states(task, "cnn", {"width": 16, "depth": 2}, list(range(models)))
    x, y = task.load("test", 0)
    every = list(itertools.combinations(range(models), 2))
    out = {}
    for device in devices:
        n = cpu_pairs if device == "cpu" else (zoo_pairs or len(every))
        pair_list = every[:n]
        stacked = {k: torch.stack([s[k] for s in states]).to(device) for k in states[0]}
        mod, xd, yd = module.to(device), x.to(device), y.to(device)
        all_pairs_barriers(mod, stacked, pair_list[:chunk_pairs], xd, yd, task, device, lambdas, chunk_pairs)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        b = all_pairs_barriers(mod, stacked, pair_list, xd, yd, task, device, lambdas, chunk_pairs)
        sync(device)
        dt = time.perf_counter() - t0
        assert b.shape == (len(pair_list),) and torch.isfinite(b).all()
        out[device] = (len(pair_list), dt, len(pair_list) / dt)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=3, help="pairs timed per matching model")
    p.add_argument("--models", type=int, default=64, help="CNNs in the zoo for the all-pairs barrier")
    p.add_argument("--cpu-pairs", type=int, default=48, help="pairs timed on the CPU (the GPU does all)")
    p.add_argument("--zoo-pairs", type=int, default=0, help="pairs on the GPU (0 = every pair)")
    p.add_argument("--lambdas", type=int, default=25)
    p.add_argument("--chunk-pairs", type=int, default=16, help="pairs evaluated as one population")
    p.add_argument("--gpu-chunk-pairs", type=int, default=256)
    args = p.parse_args()

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), GPU: {gpu}")

    print("\nweight matching, one pair (random-init weights)")
    print(f"{'model':<20}" + "".join(f"{d + ' s/pair':>14}{d + ' sweeps':>14}" for d in devices) + ("   cpu/cuda" if len(devices) > 1 else ""))
    for label in MATCH_MODELS:
        t = time_matching(label, devices, args.pairs)
        ratio = f"   {t['cpu'][0] / t['cuda'][0]:8.1f}x" if "cuda" in t else ""
        print(f"{label:<20}" + "".join(f"{t[d][0]:14.3f}{t[d][1]:14.1f}" for d in devices) + ratio)

    print(f"\nall-pairs naive barrier, {args.models} CNNs (width 16, depth 2) on 300 digits test images, {args.lambdas} points a path")
    res = {}
    for device in devices:
        chunk = args.chunk_pairs if device == "cpu" else args.gpu_chunk_pairs
        res.update(time_zoo([device], args.models, args.cpu_pairs, args.zoo_pairs, args.lambdas, chunk))
    for d, (n, dt, rate) in res.items():
        print(f"{d:<6} {n:5d} pairs in {dt:8.2f} s: {rate:9.1f} pairs/s")
    if "cuda" in res:
        print(f"cuda/cpu pairs/s: {res['cuda'][2] / res['cpu'][2]:.1f}x")


if __name__ == "__main__":
    main()
