"""A population's optimizer step on its own: popoptim's kernels against the eager update, per family.

    python benchmarks/optimizer_bench.py                                   # CUDA machine, ~30 s
    python benchmarks/optimizer_bench.py --archs canon_cnn,egnn --models 1024
    python benchmarks/optimizer_bench.py --smoke                           # CPU (Triton's interpreter), tiny sizes

Each architecture's parameter tensors (its default config on its registry example task) stacked for N models,
float32, random gradients, Adam (its state that of the warm-up steps before the capture), and `zoos.trainer.Optimizer.step` timed as the trainer runs
it: captured in a CUDA graph and replayed (median over rounds of replays, CUDA events), for

  eager     the update as torch ops (`zoos.trainer._update_in_place`)
  popoptim  the update as `zoos.popoptim`'s kernels (what the trainer runs wherever the population kernels do)

and, for scale, the bytes bound: the update reads p, g and the two moments twice (the check, then the write)
and writes p and the moments once, 11 float32 words a parameter, at the card's copy bandwidth. Columns: the
parameter tensors, parameters a model, microseconds a step of each (the median round, with the fastest and slowest),
eager / popoptim, popoptim / bound.
Results go to <out>/optimizer_bench.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from zoo_bench import PEAK_BYTES, archs_problem, parse_arch, task_options, write_data  # noqa: E402

DEFAULT_ARCHS = "mlp,cnn,p4cnn,canon_cnn,resnet20,egnn,cgenn,vit"
WORDS = 11  # float32 words the update moves a parameter: p, g, m, v read twice; p, m, v written


def param_shapes(entry: str, data_dir: Path) -> list[tuple[int, ...]]:
    """One model's parameter shapes: the architecture's default config (or `entry`'s) on its example task."""
    from tasks import get_task
    from zoos.archs import ARCHS, build_arch

    arch, config = parse_arch(entry)
    task_name, base = ARCHS[arch].example_task
    task = get_task(task_name, **task_options(task_name, base, data_dir, 4, 16))
    return [tuple(p.shape) for p in build_arch(arch, task, **config).parameters()]


def time_update(update: str, shapes: list[tuple[int, ...]], n: int, device: str, rounds: int,
                replays: int) -> list[float]:
    """Microseconds of one `Optimizer.step` of n models in each round (a CUDA graph replayed; on the CPU, called),
    sorted."""
    import torch

    from zoos.trainer import Optimizer

    g = torch.Generator(device=device).manual_seed(0)
    params = {f"p{i}": torch.randn(n, *s, generator=g, device=device) for i, s in enumerate(shapes)}
    grads = {k: torch.randn(v.shape, generator=g, device=device) for k, v in params.items()}
    total = torch.rand(n, generator=g, device=device)
    full = lambda v: torch.full((n,), v, device=device)  # noqa: E731
    opt = Optimizer("adam", params, full(1e-3), full(1e-4), full(0.9), update=update)
    step = lambda: opt.step(params, grads, total)  # noqa: E731
    if device != "cuda":
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            step()
            times.append(1e6 * (time.perf_counter() - t))
        return sorted(times)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compiles and the first allocations, outside the capture
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / replays)
    if not bool(opt.state.alive.all()):
        raise RuntimeError(f"{update}: a model diverged on random gradients; the timing is of a frozen update")
    return sorted(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=DEFAULT_ARCHS, help="comma-separated architectures (name or name:key=value)")
    parser.add_argument("--models", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--replays", type=int, default=50, help="graph replays a timed round")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (Triton's interpreter)")
    args = parser.parse_args()
    if args.smoke:
        import os

        os.environ["TRITON_INTERPRET"] = "1"
        args.archs, args.models, args.rounds = "mlp,egnn", 2, 2
    small = [f"--{k} {v}" for k, v in [("models", args.models), ("rounds", args.rounds), ("replays", args.replays)] if v < 1]
    problem = archs_problem(args.archs.split(",")) or (f"{small[0]}: allowed: an integer >= 1" if small else None)
    if problem:
        print(f"optimizer_bench: {problem}", file=sys.stderr)
        sys.exit(2)
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    rows: list[dict[str, Any]] = []
    print(f"{'arch':12s} {'tensors':>7s} {'params':>9s} {'eager us (range)':>24s} {'popoptim us (range)':>24s} "
          f"{'eager/pop':>9s} {'pop/bound':>9s}")
    span = lambda row, k: f"{row[k + '_us']:.1f} ({row[k + '_us_range'][0]:.1f}-{row[k + '_us_range'][1]:.1f})"  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        write_data(Path(tmp), 64)
        for entry in args.archs.split(","):
            s = param_shapes(entry, Path(tmp))
            per_model = sum(int(torch.Size(x).numel()) for x in s)
            row = {"arch": entry, "tensors": len(s), "params": per_model, "models": args.models, "device": device,
                   "bound_us": 1e6 * WORDS * 4 * per_model * args.models / PEAK_BYTES}
            for update in ("eager", "popoptim"):
                times = time_update(update, s, args.models, device, args.rounds, args.replays)
                row[f"{update}_us"], row[f"{update}_us_range"] = times[len(times) // 2], [times[0], times[-1]]
            rows.append(row)
            print(f"{entry:12s} {len(s):7d} {per_model:9,d} {span(row, 'eager'):>24s} {span(row, 'popoptim'):>24s} "
                  f"{row['eager_us'] / row['popoptim_us']:8.1f}x {row['popoptim_us'] / row['bound_us']:8.1f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "optimizer_bench.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
