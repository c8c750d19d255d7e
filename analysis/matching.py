"""Permutation matching: bring model b into model a's basis of hidden units (Git Re-Basin, Ainsworth et al. 2023).

Everything is driven by the architecture's `PermSpec` (see `zoos.permspec`), so one algorithm serves
every architecture. A matching is a dict of permutations `perms` such that
`apply_permutation(spec, b, perms)` computes the same function as b and sits close to a.

- `weight_matching`: coordinate descent over the spec's permutations; each step is a linear
  assignment on the inner products of a's and (partly permuted) b's weights, or for a block group
  (attention heads) a head-aware assignment: heads paired as wholes by their best within-head match.
- `activation_matching`: linear assignment on the correlation (or inner product) of hidden
  activations of a and b at the sites where each permutation acts, accumulated batch by batch.
- `ste_matching`: the straight-through estimator (§3.3): train a proxy whose weight-matching
  projection, averaged with a, has low loss on the task's data.
- `merge_many`: align N models to one common basis (MergeMany) and average them.

Activation sites. A permutation acts on the features of some hidden activations; matching by
activations needs to know where to observe them. An architecture may declare them with an
optional method `perm_sites() -> {perm name: [(module path, feature axis), ...]}` (the feature axis
counts the batch axis, e.g. 1 for [B, C, H, W], -1 for [B, ..., C]); a plain string means axis 1.
Without it the sites are inferred from the spec: the outputs of the `nn.Linear` / `nn.ConvNd` /
`nn.LayerNorm` / `nn.GroupNorm` modules whose `weight` has its output axis permuted. Inferred
sites are pre-activation; for a pointwise activation that is the same unit correspondence, and
since pre-activations are rarely constant (dead ReLUs are) they identify units more reliably.
A permutation with several sites (a residual stream) sums their statistics.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.func import functional_call

from zoos.functional import evaluating
from zoos.permspec import PermSpec, Perms, apply_permutation, compose, invert

State = dict[str, Tensor]
Sites = dict[str, list[tuple[str, int]]]


@dataclass
class MatchResult:
    """Permutations that bring b to a (`apply_permutation(spec, b, perms)`), and the objective trace.

    objective           the matching objective after initialisation and after every sweep (weight
                        matching: of the best restart), or the matched similarity per round; never
                        decreasing for weight matching
    sweeps              coordinate-descent sweeps of the best restart (or optimisation steps for STE)
    restart_objectives  weight matching: the final objective of every restart, restart 0 first; the
                        result is the best of them (the lowest index among equals)
    """

    perms: Perms
    objective: list[float] = field(default_factory=list)
    sweeps: int = 0
    restart_objectives: list[float] = field(default_factory=list)


def _to(state: Mapping[str, Tensor], device: torch.device | str | None) -> State:
    return {k: (v.to(device) if device is not None else v) for k, v in state.items()}


def _flat_along(w: Tensor, axis: int) -> Tensor:
    """`w` as [size of `axis`, everything else], in float64 for a stable assignment."""
    return w.movedim(axis, 0).reshape(w.shape[axis], -1).double()


def matching_objective(spec: PermSpec, a: Mapping[str, Tensor], b: Mapping[str, Tensor], perms: Perms) -> float:
    """sum over the spec's parameters of <a_k, permuted b_k>: what weight matching maximises."""
    pb = apply_permutation(spec, b, perms)
    return float(sum((a[k].double() * pb[k].double()).sum() for k in spec.axes_to_perm()))


RESTARTS = 4  # default weight-matching restarts: the rule and the figures are in benchmarks/README.md


def _batched_cost(spec: PermSpec, axes: dict[str, dict[int, str]], a: State, b: State, name: str,
                  perms: dict[str, Tensor]) -> Tensor:
    """[R, n, n] cost matrices of permutation `name` for R restarts (`perms[p]`: [R, size of p]) in one matmul per key."""
    cost, r = None, next(iter(perms.values())).shape[0]
    for key, axis in spec.perms[name]:
        wb = b[key].unsqueeze(0).expand(r, *b[key].shape)
        for ax, other in axes[key].items():
            if ax != axis:
                idx = perms[other].to(wb.device).view(r, *[-1 if d == ax else 1 for d in range(wb.dim() - 1)])
                wb = wb.gather(ax + 1, idx.expand(wb.shape))
        fa = _flat_along(a[key], axis)  # [n, m]
        fb = wb.movedim(axis + 1, 1).reshape(r, wb.shape[axis + 1], -1).double()  # [R, n, m]
        c = fa @ fb.transpose(1, 2)
        cost = c if cost is None else cost + c
    return cost


def _units(spec: PermSpec) -> list[list[str]]:
    """What one coordinate-descent step solves, in spec order: a plain permutation alone, or a block group's
    permutations together (they share the block permutation)."""
    units: list[list[str]] = []
    groups = spec.groups()
    for name in spec.perms:
        if name not in spec.blocks:
            units.append([name])
        elif groups[spec.blocks[name][0]][0] == name:
            units.append(groups[spec.blocks[name][0]])
    return units


def assign_blocks(costs: Sequence[np.ndarray], n: int) -> tuple[list[np.ndarray], float]:
    """The block permutations maximising sum_k <costs[k], P_k>, all P_k moving the n blocks alike and each
    permuting inside the blocks on its own (`zoos.permspec`), and that maximum.

    Block h of a paired with block g of b scores the best within-block assignment of every cost (one small
    linear assignment per pair of blocks and cost); one assignment over the blocks then picks the pairing.
    Exact: the objective separates over the blocks once they are paired."""
    m = costs[0].shape[0] // n
    score = np.zeros((n, n))
    inner = [[[np.empty(0, dtype=np.int64)] * n for _ in range(n)] for _ in costs]
    for k, c in enumerate(costs):
        blocks = c.reshape(n, m, n, m)
        for h in range(n):
            for g in range(n):
                rows, cols = linear_sum_assignment(blocks[h, :, g, :], maximize=True)
                score[h, g] += blocks[h, rows, g, cols].sum()
                inner[k][h][g] = cols
    rows, sigma = linear_sum_assignment(score, maximize=True)
    perms = [np.concatenate([sigma[h] * m + inner[k][h][sigma[h]] for h in range(n)]) for k in range(len(costs))]
    return perms, float(score[rows, sigma].sum())


def _solve(costs: Sequence[np.ndarray], n_blocks: int | None) -> list[np.ndarray]:
    """The exact maximiser of one descent step: a linear assignment, or `assign_blocks` for a block group."""
    if n_blocks is None:
        rows, cols = linear_sum_assignment(costs[0], maximize=True)
        assert (rows == np.arange(len(rows))).all()
        return [cols]
    return assign_blocks(costs, n_blocks)[0]


_THREADED_FROM = 256  # the restarts' steps run in threads when a permutation has at least this many entries


class _Costs:
    """The cost matrices of one descent, kept between its steps and updated by what moved.

    A term of permutation p's cost matrix from a parameter with one other permuted axis (permutation q) is
    C = A[n, size q, rest] . B[:, perm_q][n, size q, rest]^T; when perm_q has changed at positions J only since
    C was computed, C changes by A[:, J] . (B[:, new perm_q[J]] - B[:, old perm_q[J]])^T, |J| / size q of the
    full matmul. Terms with no other permuted axis are constant; a term with several is recomputed when one
    of them moves. A matrix is recomputed in full when more than a third of its positions moved, or once
    the positions updated since its last full computation add up to its size (so rounding cannot build up).
    Every cost depends on this descent's own permutations and history only: a descent computes the same
    numbers whatever other descents run beside it."""

    def __init__(self, plan: dict[str, tuple[Tensor | None, list, list, list[str]]]):
        self.plan = plan
        self.cost: dict[str, Tensor] = {}  # name -> [n, n]: the constant terms and those with one other axis
        self.many: dict[str, Tensor] = {}  # name -> [n, n]: the terms with several other axes
        self.seen: dict[str, dict[str, Tensor]] = {}  # name -> {q: perm q when the cost was last computed}
        self.since: dict[str, int] = {}  # name -> positions updated since its last full computation

    def current(self, name: str, perms: dict[str, Tensor]) -> bool:
        """Whether `name`'s cost is the one `get` last returned: nothing it depends on has moved since."""
        seen = self.seen.get(name)
        return seen is not None and all(torch.equal(perms[q], old) for q, old in seen.items())

    def get(self, name: str, perms: dict[str, Tensor]) -> Tensor:
        const, ones, manys, deps = self.plan[name]
        seen = self.seen.get(name)
        moved = None if seen is None else {q: (perms[q] != old).nonzero().flatten() for q, old in seen.items()}
        size = sum(fb.shape[1] for _, _, fb in ones)
        count = 0 if moved is None else sum(len(moved[q]) for q, _, _ in ones)
        if moved is None or 3 * count > size or self.since[name] + count > size:
            c = const.clone() if const is not None else None
            for q, fa, fb in ones:
                t = fa.flatten(1) @ fb[:, perms[q]].flatten(1).T
                c = t if c is None else c + t
            self.cost[name], self.since[name] = c, 0
        elif count:
            c = self.cost[name]
            for q, fa, fb in ones:
                j = moved[q]
                if len(j):
                    c += fa[:, j].flatten(1) @ (fb[:, perms[q][j]] - fb[:, seen[q][j]]).flatten(1).T
            self.since[name] += count
        if manys and (moved is None or any(len(moved[q]) for *_, others in manys for _, q in others)):
            self.many[name] = sum(_full_term(fa, fb, others, perms) for fa, fb, others in manys)
        self.seen[name] = {q: perms[q].clone() for q in deps}
        c = self.cost.get(name)
        return self.many[name] if c is None else c + self.many[name] if manys else c


def _full_term(fa: Tensor, wb: Tensor, others: list[tuple[int, str]], perms: dict[str, Tensor]) -> Tensor:
    """fa [n, m] . (wb, its axis first, with each of `others` (axis, permutation) gathered)^T flattened: [n, n]."""
    for ax, q in others:
        wb = wb.index_select(ax, perms[q])
    return fa @ wb.reshape(wb.shape[0], -1).T


def _cost_plan(spec: PermSpec, a: State, b: State) -> dict[str, tuple[Tensor | None, list, list, list[str]]]:
    """Per permutation: (sum of its constant terms or None, [(q, A [n, size q, rest], B [n, size q, rest])] for
    the terms with one other permuted axis, [(A [n, m], B its axis first, [(axis, q)])] for those with
    several, the permutations its cost depends on)."""
    axes = spec.axes_to_perm()
    plan = {}
    for name, pairs in spec.perms.items():
        const, ones, manys, deps = None, [], [], []
        for key, axis in pairs:
            others = [(ax, q) for ax, q in axes[key].items() if ax != axis]
            deps += [q for _, q in others if q not in deps]
            if not others:
                t = _flat_along(a[key], axis) @ _flat_along(b[key], axis).T
                const = t if const is None else const + t
            elif len(others) == 1:
                ax, q = others[0]
                n, m = a[key].shape[axis], a[key].shape[ax]
                ones.append((q, a[key].double().movedim((axis, ax), (0, 1)).reshape(n, m, -1).contiguous(),
                             b[key].double().movedim((axis, ax), (0, 1)).reshape(n, m, -1).contiguous()))
            else:
                wb = b[key].double().movedim(axis, 0)
                shift = [(ax + (ax < axis), q) for ax, q in others]  # axes of wb after moving `axis` first
                manys.append((_flat_along(a[key], axis), wb, shift))
        plan[name] = (const, ones, manys, deps)
    return plan


_sharing = threading.Lock()
_sharers = [0, 0]  # [blocks inside `_intra_op_threads` now, torch's thread count before the first of them]


@contextlib.contextmanager
def _intra_op_threads(n: int):
    """torch's intra-op threads set to n while the block runs (the restarts' threads share the cores: each matmul
    asking for all of them oversubscribes the machine), restored after. torch's count is process-wide, so where
    blocks overlap (matchings on threads of a caller's own) the first sets it and the last restores it."""
    with _sharing:
        if _sharers[0] == 0:
            _sharers[1] = torch.get_num_threads()
            torch.set_num_threads(n)
        _sharers[0] += 1
    try:
        yield
    finally:
        with _sharing:
            _sharers[0] -= 1
            if _sharers[0] == 0:
                torch.set_num_threads(_sharers[1])


def _descend(spec: PermSpec, a: State, b: State, inits: list[Perms], max_sweeps: int,
             generator: torch.Generator | None) -> list[tuple[Perms, list[float], int]]:
    """Coordinate descent from each of `inits`: (perms, objective trace, sweeps) per start.

    Sweep s visits the units (a permutation, or a block group solved as one) in one random order, the s-th
    `randperm` drawn from `generator`, the same for every start (drawn in sweep order by the first start to
    reach it), so start 0 draws exactly as a lone run and `generator` ends where the longest descent leaves it.
    Each start keeps its cost matrices between steps (`_Costs`: updated by the positions that moved) and skips a
    step whose cost has not changed since the unit was last solved (the solver would return what it returned
    then, which is already in place). A start stops after a sweep that changes nothing. The starts descend on
    parallel threads, each at its own pace, once a permutation has `_THREADED_FROM` entries (torch's matmuls
    and scipy's solver release the GIL; below that the GIL-bound rest of a step costs more than they gain),
    the cores shared among them: each thread's matmuls get torch's intra-op threads // threads.
    """
    names, units = list(spec.perms), _units(spec)
    dev = next(iter(a.values())).device
    plan = _cost_plan(spec, a, b)
    perms = [{p: init[p].to(dev).long().clone() for p in names} for init in inits]
    costs = [_Costs(plan) for _ in inits]
    traces = [[matching_objective(spec, a, b, perms[r])] for r in range(len(inits))]
    sweeps = [0] * len(inits)

    def step(r: int, unit: list[str], n_blocks: int | None) -> bool:
        mine = perms[r]
        if all(costs[r].current(name, mine) for name in unit):
            return False
        cs = [costs[r].get(name, mine).cpu().numpy() for name in unit]
        new = _solve(cs, n_blocks)
        rows = np.arange(len(new[0]))
        before = sum(c[rows, mine[name].cpu().numpy()].sum() for c, name in zip(cs, unit))
        gain = sum(c[rows, cols].sum() for c, cols in zip(cs, new)) - before
        if gain > 1e-12 * max(1.0, abs(before)):
            for name, cols in zip(unit, new):
                mine[name] = torch.from_numpy(np.asarray(cols)).long().to(dev)
            return True
        return False

    orders: list[list[int]] = []  # sweep s's order of the units: orders[s - 1], drawn by the first start to reach it
    drawing = threading.Lock()

    def order(sweep: int) -> list[int]:
        with drawing:
            while len(orders) < sweep:
                orders.append(torch.randperm(len(units), generator=generator).tolist())
            return orders[sweep - 1]

    def descend(r: int) -> None:
        for sweep in range(1, max_sweeps + 1):
            changed = False
            for i in order(sweep):
                unit = units[i]
                changed |= step(r, unit, spec.blocks[unit[0]][1] if unit[0] in spec.blocks else None)
            traces[r].append(matching_objective(spec, a, b, perms[r]) if changed else traces[r][-1])
            sweeps[r] = sweep
            if not changed:
                return

    # threads pay once the assignments are large (below, a step's GIL-bound rest outweighs the parallel solves)
    big = bool(names) and max(len(v) for v in perms[0].values()) >= _THREADED_FROM
    workers = min(len(inits), os.cpu_count() or 1) if big else 1
    if workers > 1:
        with _intra_op_threads(max(1, torch.get_num_threads() // workers)), ThreadPoolExecutor(workers) as pool:
            list(pool.map(descend, range(len(inits))))
    else:
        for r in range(len(inits)):
            descend(r)
    return [({p: perms[r][p].cpu().clone() for p in names}, traces[r], sweeps[r]) for r in range(len(inits))]


def _starts_generator(generator: torch.Generator | None) -> torch.Generator:
    """A generator for the random starts seeded from `generator`'s state without drawing from it, so the
    first start's descent draws exactly as a lone run."""
    state = (generator or torch.default_generator).get_state().numpy().tobytes()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(state, digest_size=7).digest(), "little"))


def weight_matching(
    spec: PermSpec,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    *,
    max_sweeps: int = 100,
    init: Perms | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    restarts: int = RESTARTS,
) -> MatchResult:
    """Permutations of b maximising sum_k <a_k, P(b)_k>, by coordinate descent over the spec's permutations.

    Each step fixes all permutations but one, builds its cost matrix (matmuls over the other axes,
    on the weights' device) and solves it exactly with `linear_sum_assignment`; a block group (attention
    heads: a head permutation shared by Q/K and V/O, within-head permutations of each) is one step, solved
    exactly by `assign_blocks`. Head-unaware matching is this on `spec.unstructured()`. A sweep visits every
    permutation once in random order; a descent stops when a whole sweep changes nothing.
    The descent is local, so it runs `restarts` times and keeps the best: restart 0 starts from
    `init` (identity if None) and draws from `generator` exactly as `restarts=1` does (its result is
    the single run's); restarts 1.. start from uniformly random permutations (from a generator seeded
    by `generator`'s state); every restart follows the same random sweep orders, and from
    `_THREADED_FROM`-unit permutations each descends on a thread of its own. The result's objective is
    never below restart 0's.

    Cost. Each descent keeps its cost matrices between steps and updates them by the positions of the
    other permutations that moved (`_Costs`), and skips a step whose cost has not changed since its unit
    was last solved (the assignment would be the one already in place), so the matmuls shrink as a
    descent settles and most of a step is its linear assignment. That is per restart: K restarts do about
    K times one run's work (random starts take as many sweeps as the identity start, ~20 on a width-512
    MLP), so their wall time is about K / (free cores) times one run's; the figures and the quality rule
    behind the default are in benchmarks/README.md.
    """
    if max_sweeps < 1:
        raise ValueError(f"max_sweeps must be >= 1, got {max_sweeps}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    a, b = _to(a, device), _to(b, device)
    sizes = spec.sizes(a)
    if spec.sizes(b) != sizes:
        raise ValueError(f"models a and b have different permutation sizes: {sizes} vs {spec.sizes(b)}")
    a, b = {k: v.double() for k, v in a.items()}, {k: v.double() for k, v in b.items()}  # once, not per cost matrix
    starts = _starts_generator(generator)
    inits = [init or spec.identity(a)] + [spec.random(a, starts) for _ in range(restarts - 1)]
    runs = _descend(spec, a, b, inits, max_sweeps, generator)
    finals = [trace[-1] for _, trace, _ in runs]
    best = max(range(len(runs)), key=lambda r: (finals[r], -r))
    perms, trace, sweeps = runs[best]
    return MatchResult(perms, trace, sweeps, finals)


# ---------------------------------------------------------------------------------------------------
# activation matching


_SITE_AXIS: dict[type, Callable[[nn.Module], int]] = {
    nn.Linear: lambda m: -1,
    nn.Conv1d: lambda m: 1,
    nn.Conv2d: lambda m: 1,
    nn.Conv3d: lambda m: 1,
    nn.GroupNorm: lambda m: 1,
    nn.LayerNorm: lambda m: -len(m.normalized_shape),
}


def perm_sites(module: nn.Module, spec: PermSpec) -> Sites:
    """Where each permutation's features can be observed: `module.perm_sites()` if defined, else inferred.

    Returns {perm name: [(module path, feature axis of its output), ...]}; see the module docstring.
    """
    declared = getattr(module, "perm_sites", None)
    if callable(declared):
        out: Sites = {}
        for name, sites in declared().items():
            sites = [sites] if isinstance(sites, (str, tuple)) else list(sites)
            out[name] = [(s, 1) if isinstance(s, str) else (s[0], int(s[1])) for s in sites]
        return out
    mods = dict(module.named_modules())
    out = {}
    for name, pairs in spec.perms.items():
        for key, axis in pairs:
            path, _, leaf = key.rpartition(".")
            m = mods.get(path)
            if leaf == "weight" and axis == 0 and type(m) in _SITE_AXIS:
                out.setdefault(name, []).append((path, _SITE_AXIS[type(m)](m)))
    missing = sorted(set(spec.perms) - set(out))
    if missing:
        raise ValueError(
            f"cannot infer an activation site for permutation {missing[0]!r} of {type(module).__name__}: "
            f"no Linear/Conv/LayerNorm/GroupNorm weight has its output axis permuted by it; "
            f"define `perm_sites()` on the architecture"
        )
    return out


class _Capture:
    """Forward hooks that keep the outputs of the named modules of one forward pass."""

    def __init__(self, module: nn.Module, paths: Iterable[str]):
        mods = dict(module.named_modules())
        self.out: dict[str, Tensor] = {}
        self.handles = []
        for p in set(paths):
            if p not in mods:
                raise KeyError(f"activation site {p!r} is not a submodule; submodules: {', '.join(list(mods)[1:8])}, ...")
            self.handles.append(mods[p].register_forward_hook(self._hook(p)))

    def _hook(self, path: str):
        def hook(_m, _inp, output):
            self.out[path] = output

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _features(act: Tensor, axis: int) -> Tensor:
    """[samples, features]: every position other than the feature axis counts as a sample."""
    return act.movedim(axis, -1).reshape(-1, act.shape[axis]).double()


def activation_matching(
    module: nn.Module,
    spec: PermSpec,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    batches: Iterable[Tensor | Sequence[Tensor]],
    *,
    stat: str = "corr",
    sites: Sites | None = None,
    device: torch.device | str | None = None,
) -> MatchResult:
    """Permutations of b that pair each hidden unit with a's unit of most similar activations.

    Statistics stream over `batches` (inputs, or (inputs, targets) tuples): per permutation the
    cross inner product E[a_i b_j] (`stat="inner"`) or the Pearson correlation (`stat="corr"`),
    pooled over its sites. Each permutation is then an independent linear assignment, and each block
    group (attention heads) one `assign_blocks` over its permutations' similarities.
    """
    if stat not in ("corr", "inner"):
        raise ValueError(f"stat must be 'corr' or 'inner', got {stat!r}")
    sites = sites if sites is not None else perm_sites(module, spec)
    a, b = _to(a, device), _to(b, device)
    cap = _Capture(module, [p for s in sites.values() for p, _ in s])
    acc: dict[tuple[str, int], dict[str, Tensor]] = {}
    try:
        with evaluating(module), torch.no_grad():
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                x = x.to(device) if device is not None else x
                functional_call(module, a, (x,))
                acts_a = dict(cap.out)
                functional_call(module, b, (x,))
                acts_b = dict(cap.out)
                for site in {s for ss in sites.values() for s in ss}:
                    fa, fb = _features(acts_a[site[0]], site[1]), _features(acts_b[site[0]], site[1])
                    s = acc.setdefault(site, {k: 0 for k in ("n", "sa", "sb", "saa", "sbb", "sab")})
                    s["n"] += fa.shape[0]
                    s["sa"] = s["sa"] + fa.sum(0)
                    s["sb"] = s["sb"] + fb.sum(0)
                    s["saa"] = s["saa"] + (fa * fa).sum(0)
                    s["sbb"] = s["sbb"] + (fb * fb).sum(0)
                    s["sab"] = s["sab"] + fa.T @ fb
    finally:
        cap.close()
    if not acc:
        raise ValueError("activation_matching got no batches")
    sims: dict[str, np.ndarray] = {}
    for name, ss in sites.items():
        sim = None
        for site in ss:
            s = acc[site]
            n = s["n"]
            if stat == "inner":
                m = s["sab"] / n
            else:
                ma, mb = s["sa"] / n, s["sb"] / n
                cov = s["sab"] / n - ma[:, None] * mb[None, :]
                sa = (s["saa"] / n - ma**2).clamp_min(0).sqrt()
                sb = (s["sbb"] / n - mb**2).clamp_min(0).sqrt()
                m = cov / (sa[:, None] * sb[None, :] + 1e-12)
            sim = m if sim is None else sim + m
        sims[name] = sim.cpu().numpy()
    perms: Perms = {}
    total = 0.0
    for unit in _units(spec):
        unit = [name for name in unit if name in sims]  # `sites` may name some permutations only
        if not unit:
            continue
        if unit[0] in spec.blocks:  # a block group: heads paired as wholes, dimensions inside each pair
            solved, value = assign_blocks([sims[name] for name in unit], spec.blocks[unit[0]][1])
            perms.update({name: torch.from_numpy(cols).long() for name, cols in zip(unit, solved)})
            total += value
            continue
        rows, cols = linear_sum_assignment(sims[unit[0]], maximize=True)
        perms[unit[0]] = torch.from_numpy(cols).long()
        total += float(sims[unit[0]][rows, cols].sum())
    return MatchResult(perms, [total], 1)


# ---------------------------------------------------------------------------------------------------
# straight-through estimator


def ste_matching(
    module: nn.Module,
    spec: PermSpec,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    batches: Sequence[Sequence[Tensor]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    steps: int = 100,
    lr: float = 1e-3,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> MatchResult:
    """Permutations of b found by the straight-through estimator (Git Re-Basin §3.3).

    A proxy model (initialised at a) is trained so that the midpoint of a and its projection
    P(b) (weight matching of b to the proxy) has low loss: the forward pass uses P(b), the
    gradient is passed straight through to the proxy. `batches` are (x, y) pairs, cycled;
    `loss_fn(pred, y)` is e.g. `task.loss`. Returns the projection with the lowest midpoint
    loss seen; `objective` is the midpoint loss per step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    a, b = _to(a, device), _to(b, device)
    float_keys = [k for k, v in a.items() if v.is_floating_point()]
    proxy = {k: a[k].clone().requires_grad_(True) for k in float_keys}
    opt = torch.optim.Adam(list(proxy.values()), lr=lr)
    perms = spec.identity(a)
    best, best_loss, trace = perms, float("inf"), []
    with evaluating(module):
        for _, (x, y) in zip(range(steps), itertools.cycle(batches)):
            x, y = (x.to(device), y.to(device)) if device is not None else (x, y)
            target = {**a, **{k: v.detach() for k, v in proxy.items()}}
            perms = weight_matching(spec, target, b, init=perms, generator=generator, restarts=1).perms
            pb = apply_permutation(spec, b, perms)
            mid = dict(a)
            for k in float_keys:
                ste = pb[k].detach() + (proxy[k] - proxy[k].detach())
                mid[k] = 0.5 * (a[k] + ste)
            loss = loss_fn(functional_call(module, mid, (x,)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            trace.append(float(loss.detach()))
            if trace[-1] < best_loss:
                best, best_loss = perms, trace[-1]
    return MatchResult({k: v.cpu() for k, v in best.items()}, trace, len(trace))


# ---------------------------------------------------------------------------------------------------
# merging many models


def _mean(states: Sequence[Mapping[str, Tensor]]) -> State:
    """Elementwise mean of float entries; other entries (integer buffers) are taken from the first."""
    first = states[0]
    return {
        k: (torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v) for k, v in first.items()
    }


def merge_many(
    spec: PermSpec,
    states: Sequence[Mapping[str, Tensor]] | Mapping[str, Tensor],
    *,
    max_rounds: int = 50,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[list[Perms], State]:
    """MergeMany: permutations putting every model in one common basis, and the average there.

    `states` is a list of state dicts or one stacked state {key: [N, ...]}. Each round visits the
    models in random order and weight-matches each to the mean of the others (already aligned); it
    stops after a round that changes nothing. The common basis is that of the first model, so
    `perms[0]` is the identity and merging copies of one model returns it.
    """
    if isinstance(states, Mapping):
        n = next(iter(states.values())).shape[0]
        states = [{k: v[i] for k, v in states.items()} for i in range(n)]
    states = [_to(s, device) for s in states]
    if len(states) < 2:
        raise ValueError(f"merge_many needs at least 2 models, got {len(states)}")
    perms = [spec.identity(s) for s in states]
    aligned = list(states)
    for _ in range(max_rounds):
        changed = False
        for i in torch.randperm(len(states), generator=generator).tolist():
            others = _mean([aligned[j] for j in range(len(states)) if j != i])
            new = weight_matching(spec, others, states[i], init=perms[i], generator=generator, device=device,
                                  restarts=1).perms
            if any(not torch.equal(new[k], perms[i][k]) for k in new):
                changed = True
                perms[i] = new
                aligned[i] = apply_permutation(spec, states[i], new)
        if not changed:
            break
    back = invert(perms[0])
    perms = [compose(p, back) for p in perms]
    aligned = [apply_permutation(spec, s, p) for s, p in zip(states, perms)]
    return perms, _mean(aligned)


def check_same_function(
    model: nn.Module, state: Mapping[str, Tensor], permuted: Mapping[str, Tensor], x: Tensor
) -> float:
    """Max abs difference of the outputs of `state` and `permuted` on x (0 up to rounding if they match)."""
    with evaluating(model), torch.no_grad():
        ya = functional_call(model, dict(state), (x,))
        yb = functional_call(model, dict(permuted), (x,))
    return float((ya - yb).abs().max())
