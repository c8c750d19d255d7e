"""Weight matching with K restarts: spread of the objective and of the aligned barrier across seeds, its cost, and exact optima.

    .venv/bin/python benchmarks/matching_restarts_bench.py            # CPU, ~1 min on 2 cores (a third of it training)

`weight_matching(restarts=K)` runs restart 0 from the identity exactly as `restarts=1` does and K-1 descents
from random permutations, all following one random order per sweep; each descent keeps its cost matrices
between steps, updated by the positions that moved, and skips a step whose cost has not changed since the
unit was last solved; from width 256 the restarts descend on parallel threads, sharing torch's intra-op threads.

1. Spread. `--pairs` pairs of registry `mlp` models (width `--width`, depth `--depth`) trained with
   `--steps` Adam steps on the digits task. For every K in `--ks`, `--seeds` independent runs of
   `weight_matching(restarts=K)` (generator seeded 0..seeds-1) per pair: the std and range (max - min)
   across seeds of the final objective and of the aligned sup loss barrier (11 points, digits test
   split), averaged over pairs, and the largest barrier of any run; "at best" is the share of runs
   reaching the best objective any run found for that pair; s/pair is seconds per pair-matching and
   "x K=1" that time over the first K's, the Ks of one pair and seed run back to back so that they see
   the same machine load (the load average before and after is printed: the figures are meant for a
   machine with nothing else running). A second table does the same at width `--wide-width` (default
   512, `--wide-pairs` x `--wide-seeds` runs of each K in `--wide-ks`, default 1,4; 0 skips it): where a
   single run is a gamble.
2. Exact optimum. `--tiny-pairs` pairs of width-6 depth-2 `mlp` models on digits: every one of the
   6! x 6! permutation pairs is scored (one batched cost matrix per first permutation, gathered for
   all second permutations) and the share of runs reaching the maximum is reported for symzoo with
   each K in `--ks` (and 1 and the default), and `reference_weight_matching` below, an independent
   implementation of Git Re-Basin's algorithm (start from identity; each iteration visits the
   permutations in a random order and solves each linear assignment given the others; stop after an
   iteration without improvement).
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402
from torch.func import functional_call  # noqa: E402

from analysis.connectivity import barrier, interpolate  # noqa: E402
from analysis.matching import RESTARTS, _batched_cost, matching_objective, weight_matching  # noqa: E402
from tasks import get_task  # noqa: E402
from zoos.archs import build_arch  # noqa: E402
from zoos.permspec import PermSpec, apply_permutation  # noqa: E402

LAMBDAS = 11


def train_models(width: int, depth: int, seeds: list[int], steps: int) -> tuple[torch.nn.Module, list[dict]]:
    """One registry `mlp` per seed trained with Adam (lr 3e-3, batch 128) on digits' train split."""
    task = get_task("digits")
    x, y = task.load("train", 0)
    states = []
    for s in seeds:
        torch.manual_seed(s)
        model = build_arch("mlp", task, width=width, depth=depth)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(s)
        for _ in range(steps):
            idx = torch.randint(len(x), (128,), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return model.eval(), states


def aligned_barrier(model: torch.nn.Module, a: dict, b: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    """Sup loss barrier of the linear path from a to b (b already aligned), LAMBDAS points."""
    path = interpolate(a, b, LAMBDAS)
    with torch.no_grad():
        loss = torch.stack([torch.nn.functional.cross_entropy(functional_call(model, {k: v[i] for k, v in path.items()}, (x,)), y)
                            for i in range(LAMBDAS)])
    return float(barrier(loss, LAMBDAS))


def reference_weight_matching(spec: PermSpec, a: dict, b: dict, rng: np.random.Generator, max_iter: int = 100) -> dict:
    """Git Re-Basin's weight matching, written from the paper's Algorithm 1 in numpy; returns {perm: indices}."""
    wa = {k: v.double().numpy() for k, v in a.items()}
    wb = {k: v.double().numpy() for k, v in b.items()}
    names = list(spec.perms)
    owner = spec.axes_to_perm()
    perm = {p: np.arange(wa[spec.perms[p][0][0]].shape[spec.perms[p][0][1]]) for p in names}
    for _ in range(max_iter):
        improved = False
        for p in rng.permutation(len(names)):
            name = names[p]
            n = len(perm[name])
            cost = np.zeros((n, n))
            for key, axis in spec.perms[name]:
                w = wb[key]
                for ax, other in owner[key].items():
                    if ax != axis:
                        w = np.take(w, perm[other], axis=ax)
                cost += np.moveaxis(wa[key], axis, 0).reshape(n, -1) @ np.moveaxis(w, axis, 0).reshape(n, -1).T
            _, cols = linear_sum_assignment(cost, maximize=True)
            before, after = cost[np.arange(n), perm[name]].sum(), cost[np.arange(n), cols].sum()
            improved = improved or after > before + 1e-12
            perm[name] = cols
        if not improved:
            break
    return {k: torch.from_numpy(v).long() for k, v in perm.items()}


def exact_optimum(spec: PermSpec, a: dict, b: dict) -> float:
    """Max of the matching objective over all pairs of permutations of a two-permutation spec."""
    first, second = list(spec.perms)
    n0, n1 = spec.sizes(a)[first], spec.sizes(a)[second]
    p0 = torch.tensor(list(itertools.permutations(range(n0))))
    p1 = torch.tensor(list(itertools.permutations(range(n1))))
    r = len(p0)
    cost = _batched_cost(spec, spec.axes_to_perm(), a, b, second, {first: p0, second: torch.arange(n1).expand(r, n1)})
    ident = cost.diagonal(dim1=1, dim2=2).sum(-1)  # the second permutation's terms at identity, [r]
    base = torch.tensor([matching_objective(spec, a, b, {first: p, second: torch.arange(n1)}) for p in p0], dtype=torch.float64)
    rows = torch.arange(n1)
    scores = cost[:, rows, p1].sum(-1)  # [r, n1!]: the second permutation's terms for every pair
    return float((base - ident + scores.max(-1).values).max())


def parallel_capacity(n: int = 512, jobs: int = 4) -> float:
    """Time of `jobs` linear assignments of n x n random matrices one after another over the same in 2 threads:
    the speedup this machine gives the restarts' parallel steps right now (2.0 on 2 free cores)."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    mats = [rng.standard_normal((n, n)) for _ in range(jobs)]
    solve = lambda m: linear_sum_assignment(m, maximize=True)  # noqa: E731
    best = [float("inf"), float("inf")]
    with ThreadPoolExecutor(2) as pool:
        for _ in range(3):
            t0 = time.perf_counter()
            list(map(solve, mats))
            t1 = time.perf_counter()
            list(pool.map(solve, mats))
            t2 = time.perf_counter()
            best = [min(best[0], t1 - t0), min(best[1], t2 - t1)]
    return best[0] / best[1]


def spread_table(width: int, pairs: int, seeds: int, ks: list[int], args: argparse.Namespace) -> None:
    model, states = train_models(width, args.depth, list(range(2 * pairs)), args.steps)
    spec = model.perm_spec()
    x, y = get_task("digits").load("test", 0)
    runs: dict[int, list[list[tuple[float, float, float]]]] = {k: [[] for _ in range(pairs)] for k in ks}
    weight_matching(spec, states[0], states[1], generator=torch.Generator().manual_seed(0), restarts=max(ks))  # warm-up
    load = os.getloadavg()[0]
    for p in range(pairs):
        a, b = states[2 * p], states[2 * p + 1]
        for s in range(seeds):
            for k in ks:  # interleaved, so every K sees the same machine load
                t0 = time.perf_counter()
                res = weight_matching(spec, a, b, generator=torch.Generator().manual_seed(s), restarts=k)
                dt = time.perf_counter() - t0
                runs[k][p].append((res.objective[-1], aligned_barrier(model, a, apply_permutation(spec, b, res.perms), x, y), dt))
    best = [max(o for k in ks for o, _, _ in runs[k][p]) for p in range(pairs)]
    print(f"\nspread across {seeds} seeds, mean over {pairs} pairs of mlp width {width} depth {args.depth} "
          f"({args.steps} Adam steps on digits); load average {load:.2f} before, {os.getloadavg()[0]:.2f} after; "
          f"2-thread speedup of linear assignments {parallel_capacity():.2f}x after")
    print(f"{'K':>3} {'obj std':>9} {'obj range':>10} {'gap to best':>12} {'at best':>8} {'barrier mean':>13} "
          f"{'barrier std':>12} {'barrier range':>14} {'barrier max':>12} {'s/pair':>8} {'x K=' + str(ks[0]):>7}")
    t_first = None
    for k in ks:
        obj = np.array([[o for o, _, _ in r] for r in runs[k]])
        bar = np.array([[v for _, v, _ in r] for r in runs[k]])
        t = np.mean([d for r in runs[k] for _, _, d in r])
        t_first = t if t_first is None else t_first
        gap = np.mean(np.array(best)[:, None] - obj)
        at_best = np.mean(obj >= np.array(best)[:, None] - 1e-9 * np.abs(best)[:, None])
        print(f"{k:>3} {obj.std(1).mean():9.4f} {np.ptp(obj, 1).mean():10.4f} {gap:12.4f} {at_best:8.2f} {bar.mean():13.4f} "
              f"{bar.std(1).mean():12.4f} {np.ptp(bar, 1).mean():14.4f} {bar.max():12.4f} {t:8.3f} {t / t_first:7.2f}")


def exact_table(args: argparse.Namespace) -> None:
    model, states = train_models(6, 2, list(range(1000, 1000 + 2 * args.tiny_pairs)), args.steps)
    spec = model.perm_spec()
    label = lambda k: f"symzoo restarts={k}" + (" (default)" if k == RESTARTS else "")  # noqa: E731
    ks = sorted(set(args.ks) | {1, RESTARTS})
    hits = {"reference (1 run)": 0} | {label(k): 0 for k in ks}
    total = 0
    for p in range(args.tiny_pairs):
        a, b = states[2 * p], states[2 * p + 1]
        opt = exact_optimum(spec, a, b)
        at = lambda perms: matching_objective(spec, a, b, perms) >= opt - 1e-9 * abs(opt)  # noqa: E731
        for s in range(args.seeds):
            hits["reference (1 run)"] += at(reference_weight_matching(spec, a, b, np.random.default_rng(s)))
            for k in ks:
                hits[label(k)] += at(weight_matching(spec, a, b, generator=torch.Generator().manual_seed(s), restarts=k).perms)
            total += 1
    print(f"\nexact optimum (all 6! x 6! permutation pairs), mlp width 6 depth 2, {args.tiny_pairs} pairs x {args.seeds} seeds")
    for label, h in hits.items():
        print(f"{label:<32} {h / total:6.2f} ({h}/{total})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--steps", type=int, default=300, help="Adam steps per model")
    p.add_argument("--seeds", type=int, default=8, help="independent runs per pair and K")
    p.add_argument("--ks", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4, 8, 16])
    p.add_argument("--tiny-pairs", type=int, default=12, help="width-6 pairs for the exact-optimum check (0: skip)")
    p.add_argument("--wide-width", type=int, default=512, help="width of the second spread table (0: skip)")
    p.add_argument("--wide-pairs", type=int, default=2)
    p.add_argument("--wide-seeds", type=int, default=4)
    p.add_argument("--wide-ks", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4])
    args = p.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); 2-thread speedup of linear assignments now {parallel_capacity():.2f}x")
    if args.tiny_pairs:
        exact_table(args)
    if args.pairs:
        spread_table(args.width, args.pairs, args.seeds, args.ks, args)
    if args.wide_width and args.wide_pairs:
        spread_table(args.wide_width, args.wide_pairs, args.wide_seeds, args.wide_ks, args)


if __name__ == "__main__":
    main()
