"""Permutation matching recovers planted permutations of trained nets, and permuted nets compute the same function."""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from analysis.matching import (
    activation_matching,
    check_same_function,
    matching_objective,
    merge_many,
    perm_sites,
    ste_matching,
    weight_matching,
)
from zoos.permspec import PermSpec, apply_permutation, invert


# --- tiny architectures with permutation specs (the registry's archs are built elsewhere) ----------


class TinyMLP(nn.Module):
    """64 -> h -> h -> 10 ReLU MLP; two hidden permutations."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def perm_spec(self) -> PermSpec:
        return PermSpec({
            "h0": (("net.1.weight", 0), ("net.1.bias", 0), ("net.3.weight", 1)),
            "h1": (("net.3.weight", 0), ("net.3.bias", 0), ("net.5.weight", 1)),
        })


class TinyCNN(nn.Module):
    """conv(1->8) GroupNorm(one group per channel) ReLU conv(8->16) ReLU, mean pool, linear(16->10).

    One group per channel, so the normalisation commutes with any channel permutation.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.norm1 = nn.GroupNorm(8, 8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.norm1(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        return self.head(h.mean((-1, -2)))

    def perm_spec(self) -> PermSpec:
        return PermSpec({
            "c1": (("conv1.weight", 0), ("conv1.bias", 0), ("norm1.weight", 0), ("norm1.bias", 0), ("conv2.weight", 1)),
            "c2": (("conv2.weight", 0), ("conv2.bias", 0), ("head.weight", 1)),
        })


@functools.cache
def digits() -> tuple[Tensor, Tensor]:
    """The digits task's train split: x [1197, 1, 8, 8] in [0, 1], y [1197]."""
    from tasks import get_task

    return get_task("digits").load("train", 0)


def train(model: nn.Module, seed: int, steps: int = 300, lr: float = 3e-3) -> dict[str, Tensor]:
    """A few hundred Adam steps on digits with a plain torch loop; returns the trained state."""
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    x, y = digits()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (128,), generator=g)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@functools.cache
def trained(kind: str, seed: int) -> tuple[nn.Module, dict[str, Tensor]]:
    """A model trained on digits: the tiny test nets ("mlp", "cnn") or a registry arch ("registry:<name>")."""
    if kind.startswith("registry:"):
        from tasks import get_task
        from zoos.archs import build_arch

        model = build_arch(kind.split(":", 1)[1], get_task("digits"))
    else:
        model = {"mlp": TinyMLP, "cnn": TinyCNN}[kind]()
    return model, train(model, seed)


def accuracy(model: nn.Module, state: dict[str, Tensor]) -> float:
    x, y = digits()
    with torch.no_grad():
        return float((torch.func.functional_call(model, state, (x,)).argmax(-1) == y).float().mean())


# --- tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "cnn", "registry:mlp", "registry:cnn"])
def test_weight_matching_recovers_planted_permutation(kind):
    model, a = trained(kind, 0)
    assert accuracy(model, a) > 0.85
    spec = model.perm_spec()
    planted = spec.random(a, torch.Generator().manual_seed(1))
    b = apply_permutation(spec, a, planted)
    x = digits()[0][:256]
    assert check_same_function(model, a, b, x) < 1e-5  # permuted model computes the same function
    assert any(not torch.equal(p, torch.arange(len(p))) for p in planted.values())

    res = weight_matching(spec, a, b, generator=torch.Generator().manual_seed(0))
    inv = invert(planted)
    for name in spec.perms:
        assert torch.equal(res.perms[name], inv[name]), name
    back = apply_permutation(spec, b, res.perms)
    assert all(torch.equal(back[k], a[k]) for k in a)
    assert all(t1 >= t0 - 1e-9 * abs(t0) for t0, t1 in zip(res.objective, res.objective[1:]))
    assert res.objective[-1] == pytest.approx(matching_objective(spec, a, a, spec.identity(a)))


def test_weight_matching_objective_non_decreasing_between_different_models():
    model, a = trained("mlp", 0)
    _, b = trained("mlp", 1)
    spec = model.perm_spec()
    res = weight_matching(spec, a, b, generator=torch.Generator().manual_seed(0))
    assert res.sweeps >= 2
    assert all(t1 >= t0 - 1e-9 * abs(t0) for t0, t1 in zip(res.objective, res.objective[1:]))
    assert res.objective[-1] > res.objective[0]
    # the matched b is the same function as b, and closer to a than b was
    x = digits()[0][:256]
    pb = apply_permutation(spec, b, res.perms)
    assert check_same_function(model, b, pb, x) < 1e-5
    dist = lambda s: sum(((a[k] - s[k]) ** 2).sum() for k in a)  # noqa: E731
    assert dist(pb) < dist(b)


def test_weight_matching_refuses_mismatched_models():
    spec = TinyMLP().perm_spec()
    a = TinyMLP(32).state_dict()
    b = TinyMLP(16).state_dict()
    with pytest.raises(ValueError, match="permutation sizes"):
        weight_matching(spec, a, b)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "registry:cnn"])
def test_activation_matching_recovers_planted_permutation(kind):
    model, a = trained(kind, 0)
    spec = model.perm_spec()
    planted = spec.random(a, torch.Generator().manual_seed(2))
    b = apply_permutation(spec, a, planted)
    x = digits()[0]
    batches = [x[i : i + 256] for i in range(0, 768, 256)]
    res = activation_matching(model, spec, a, b, batches)
    inv = invert(planted)
    for name in spec.perms:
        assert torch.equal(res.perms[name], inv[name]), name
    # inner-product statistics find it too
    res_inner = activation_matching(model, spec, a, b, batches, stat="inner")
    assert all(torch.equal(res_inner.perms[n], inv[n]) for n in spec.perms)


def test_perm_sites_inferred_and_declared():
    model = TinyCNN()
    sites = perm_sites(model, model.perm_spec())
    assert sites == {"c1": [("conv1", 1), ("norm1", 1)], "c2": [("conv2", 1)]}

    class Declared(TinyMLP):
        def perm_sites(self):
            return {"h0": "net.2", "h1": [("net.4", -1)]}

    assert perm_sites(Declared(), Declared().perm_spec()) == {"h0": [("net.2", 1)], "h1": [("net.4", -1)]}

    class NoSite(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3, 4))

    with pytest.raises(ValueError, match="perm_sites"):
        perm_sites(NoSite(), PermSpec({"p": (("w", 0),)}))


def test_activation_matching_on_post_activation_sites_of_different_models():
    """Declared post-ReLU sites: a matching between two different models is a valid permutation that helps."""
    model, a = trained("mlp", 0)
    _, b = trained("mlp", 1)
    spec = model.perm_spec()
    x = digits()[0]
    sites = {"h0": [("net.2", -1)], "h1": [("net.4", -1)]}
    res = activation_matching(model, spec, a, b, [x[:512]], sites=sites)
    for name, p in res.perms.items():
        assert torch.equal(p.sort().values, torch.arange(32)), name
    pb = apply_permutation(spec, b, res.perms)
    assert check_same_function(model, b, pb, x[:256]) < 1e-5
    mid = {k: (a[k] + pb[k]) / 2 for k in a}
    naive = {k: (a[k] + b[k]) / 2 for k in a}
    assert accuracy(model, mid) > accuracy(model, naive)


def test_ste_matching_lowers_midpoint_loss():
    model, a = trained("mlp", 0)
    _, b = trained("mlp", 1)
    spec = model.perm_spec()
    x, y = digits()
    g = torch.Generator().manual_seed(0)
    batches = [(x[i], y[i]) for i in torch.randperm(len(x), generator=g)[:1024].split(128)]
    res = ste_matching(model, spec, a, b, batches, nn.functional.cross_entropy, steps=40, lr=1e-2, generator=g)
    assert res.sweeps == 40
    for name, p in res.perms.items():
        assert torch.equal(p.sort().values, torch.arange(32)), name

    def mid_loss(perms):
        pb = apply_permutation(spec, b, perms)
        mid = {k: (a[k] + pb[k]) / 2 for k in a}
        with torch.no_grad():
            return float(nn.functional.cross_entropy(torch.func.functional_call(model, mid, (x,)), y))

    assert mid_loss(res.perms) < mid_loss(spec.identity(a))
    assert min(res.objective) < res.objective[0]


def test_merge_many_of_permuted_copies_returns_the_model():
    model, a = trained("mlp", 0)
    spec = model.perm_spec()
    g = torch.Generator().manual_seed(3)
    planted = [spec.identity(a)] + [spec.random(a, g) for _ in range(3)]
    copies = [apply_permutation(spec, a, p) for p in planted]
    perms, merged = merge_many(spec, copies, generator=g)
    assert all(torch.allclose(merged[k], a[k], atol=1e-6) for k in a)
    for p, q in zip(perms, planted):
        assert all(torch.equal(p[n], invert(q)[n]) for n in spec.perms)
    # stacked input works the same
    stacked = {k: torch.stack([c[k] for c in copies]) for k in a}
    _, merged2 = merge_many(spec, stacked, generator=torch.Generator().manual_seed(4))
    assert all(torch.allclose(merged2[k], a[k], atol=1e-6) for k in a)


def test_merge_many_of_different_models_beats_naive_average():
    model, _ = trained("mlp", 0)
    states = [trained("mlp", s)[1] for s in range(3)]
    spec = model.perm_spec()
    perms, merged = merge_many(spec, states, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(perms[0][n], torch.arange(32)) for n in spec.perms)
    naive = {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}
    dist = lambda m: sum(sum(((m[k] - s[k]) ** 2).sum() for k in m) for s in [apply_permutation(spec, st, p) for st, p in zip(states, perms)])  # noqa: E731
    assert dist(merged) <= dist(naive)
    assert accuracy(model, merged) > accuracy(model, naive)


# every registered architecture: its spec permutes to the same function, and weight matching undoes it
TASKS_TO_TRY = ("digits", "mnist", "o5_regression", "inertia", "lorentz", "convex_hull", "nbody")  # mnist: shapes only


def _arch_cases():
    from tasks import get_task
    from zoos.archs import ARCHS, build_arch

    cases = []
    for name in sorted(ARCHS):
        for task_name in TASKS_TO_TRY:
            task = get_task(task_name)
            try:
                build_arch(name, task)
            except ValueError:
                continue
            cases.append((name, task_name))
            break
    return cases


@pytest.mark.parametrize("arch,task_name", _arch_cases())
def test_every_registered_arch_planted_permutation(arch, task_name):
    from tasks import get_task
    from zoos.archs import build_arch

    task = get_task(task_name)
    model = build_arch(arch, task)
    spec = model.perm_spec()
    # jitter every float entry so that no two units are tied (zero biases, unit norm scales at init)
    a = {k: (v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    planted = spec.random(a, torch.Generator().manual_seed(1))
    b = apply_permutation(spec, a, planted)
    x = torch.rand(8, *task.input_shape) if task_name == "mnist" else task.load("test", 0)[0][:32]
    scale = float(torch.func.functional_call(model.eval(), a, (x,)).abs().max())
    assert check_same_function(model, a, b, x) < 1e-5 * max(1.0, scale)
    res = weight_matching(spec, a, b, generator=torch.Generator().manual_seed(0))
    inv = invert(planted)
    assert all(torch.equal(res.perms[n], inv[n]) for n in spec.perms)


# --- restarts --------------------------------------------------------------------------------------


def test_restarts_never_lower_the_objective_and_keep_the_function():
    from analysis.matching import RESTARTS
    from pipeline.stages.interpolation import InterpolationSettings

    assert InterpolationSettings().restarts == RESTARTS  # the stage's default is the matching default
    model, a = trained("mlp", 0)
    _, b = trained("mlp", 1)
    spec = model.perm_spec()
    x = digits()[0][:256]
    better = 0
    for seed in range(4):
        one = weight_matching(spec, a, b, generator=torch.Generator().manual_seed(seed), restarts=1)
        many = weight_matching(spec, a, b, generator=torch.Generator().manual_seed(seed), restarts=4)
        assert len(many.restart_objectives) == 4
        assert many.restart_objectives[0] == one.objective[-1]  # restart 0 is the single run
        assert many.objective[-1] == max(many.restart_objectives) >= one.objective[-1]
        assert many.objective[-1] == pytest.approx(matching_objective(spec, a, b, many.perms), rel=1e-12)
        better += many.objective[-1] > one.objective[-1]
        for name, p in many.perms.items():
            assert torch.equal(p.sort().values, torch.arange(32)), name
        assert check_same_function(model, b, apply_permutation(spec, b, many.perms), x) < 1e-5
    assert better > 0  # restarts from random permutations find better optima than the identity start
    with pytest.raises(ValueError, match="restarts"):
        weight_matching(spec, a, b, restarts=0)


def test_restarts_recover_planted_permutation():
    model, a = trained("mlp", 0)
    spec = model.perm_spec()
    planted = spec.random(a, torch.Generator().manual_seed(5))
    b = apply_permutation(spec, a, planted)
    res = weight_matching(spec, a, b, generator=torch.Generator().manual_seed(0), restarts=6)
    inv = invert(planted)
    assert all(torch.equal(res.perms[n], inv[n]) for n in spec.perms)
    assert res.objective[-1] == pytest.approx(matching_objective(spec, a, a, spec.identity(a)))


def test_restarts_reach_the_exact_optimum_at_least_as_often():
    """Width-4 MLPs at random init: the optimum over all 4! x 4! permutation pairs, found by enumeration."""
    import itertools

    spec = TinyMLP(4).perm_spec()
    every = [torch.tensor(p) for p in itertools.permutations(range(4))]
    hits, runs = {1: 0, 4: 0}, 0
    for m in range(8):
        torch.manual_seed(m)
        a, b = TinyMLP(4).state_dict(), TinyMLP(4).state_dict()
        best = max(matching_objective(spec, a, b, {"h0": p, "h1": q}) for p in every for q in every)
        for seed in range(3):
            runs += 1
            for k in hits:
                res = weight_matching(spec, a, b, generator=torch.Generator().manual_seed(seed), restarts=k)
                assert res.objective[-1] <= best + 1e-9 * abs(best)
                hits[k] += res.objective[-1] >= best - 1e-9 * abs(best)
    assert hits[1] < runs  # one descent misses the optimum here
    assert hits[4] > hits[1]


def _random_state(seed: int) -> tuple[PermSpec, dict[str, Tensor]]:
    """Random weights for a spec whose keys have no other permuted axis (biases), one (linear and conv
    weights, a square one permuted by the same permutation on both axes) or two (a 3-axis tensor)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"l0.w": (10, 5), "l0.b": (10,), "c1.w": (8, 10, 3, 3), "c1.b": (8,), "sq": (8, 8), "t3": (10, 8, 3), "l2.w": (2, 3)}
    state = {k: torch.randn(*v, generator=g, dtype=torch.float64) for k, v in shapes.items()}
    spec = PermSpec({
        "p": (("l0.w", 0), ("l0.b", 0), ("c1.w", 1), ("t3", 0)),
        "q": (("c1.w", 0), ("c1.b", 0), ("sq", 0), ("sq", 1), ("t3", 1)),
        "r": (("t3", 2), ("l2.w", 1)),
    })
    return spec, state


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.lists(st.tuples(st.sampled_from("pqr"), st.integers(0, 3)), min_size=1, max_size=12))
def test_kept_cost_matrices_equal_fresh_ones(seed, moves):
    """`_Costs` (kept between steps, updated by the positions that moved) against `_batched_cost` from scratch."""
    from analysis.matching import _batched_cost, _cost_plan, _Costs

    spec, a = _random_state(seed)
    _, b = _random_state(seed + 1)
    g = torch.Generator().manual_seed(seed)
    perms = spec.random(a, g)
    costs, axes = _Costs(_cost_plan(spec, a, b)), spec.axes_to_perm()
    for name, how in moves:
        n = len(perms[name])
        if how == 0:  # a fresh permutation
            perms[name] = torch.randperm(n, generator=g)
        elif how == 1:  # two positions swapped
            i, j = torch.randperm(n, generator=g)[:2].tolist()
            perms[name] = perms[name].clone()
            perms[name][[i, j]] = perms[name][[j, i]]
        for target in spec.perms:  # how == 2, 3: nothing moved since the last look
            fresh = _batched_cost(spec, axes, a, b, target, {k: v[None] for k, v in perms.items()})[0]
            kept = costs.get(target, perms)
            assert costs.current(target, perms)
            torch.testing.assert_close(kept, fresh, rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1), st.integers(2, 5))
def test_restart_0_is_the_single_run_and_the_result_never_below_it(weights, seed, restarts):
    torch.manual_seed(weights)
    a, b = TinyMLP(8).state_dict(), TinyMLP(8).state_dict()
    spec = TinyMLP(8).perm_spec()
    one = weight_matching(spec, a, b, generator=torch.Generator().manual_seed(seed), restarts=1)
    g = torch.Generator().manual_seed(seed)
    many = weight_matching(spec, a, b, generator=g, restarts=restarts)
    assert len(many.restart_objectives) == restarts
    assert many.restart_objectives[0] == one.objective[-1]
    assert many.objective[-1] == max(many.restart_objectives) >= many.restart_objectives[0]
    assert many.objective[-1] == pytest.approx(matching_objective(spec, a, b, many.perms), rel=1e-12)
    assert all(x <= y for x, y in zip(many.objective, many.objective[1:]))  # the kept trace never decreases
    if many.objective[-1] == one.objective[-1]:  # restart 0 is kept on ties: then the single run's permutations
        assert all(torch.equal(many.perms[k], one.perms[k]) for k in one.perms)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_restarts_on_threads_descend_as_one_after_another(seed, monkeypatch):
    """Each restart descends on a thread of its own, at its own pace, through the shared sweep orders: the same
    descents as one after another (every restart's objective, the kept permutations), and the caller's
    generator left where the longest descent leaves it."""
    import analysis.matching as matching

    torch.manual_seed(seed)
    a, b = TinyMLP(16).state_dict(), TinyMLP(16).state_dict()
    spec = TinyMLP(16).perm_spec()
    runs = {}
    for threaded_from in (10**9, 1):  # one after another; then on threads (os.cpu_count() of them, at most 5)
        monkeypatch.setattr(matching, "_THREADED_FROM", threaded_from)
        g = torch.Generator().manual_seed(seed)
        res = weight_matching(spec, a, b, generator=g, restarts=5)
        runs[threaded_from] = (res, torch.randint(0, 2**30, (4,), generator=g))
    (alone, after_alone), (threads, after_threads) = runs.values()
    assert threads.restart_objectives == alone.restart_objectives and threads.objective == alone.objective
    assert all(torch.equal(threads.perms[k], alone.perms[k]) for k in alone.perms)
    assert torch.equal(after_threads, after_alone)


def test_restarts_on_threads_share_torchs_threads_and_give_them_back(monkeypatch):
    """While restarts descend on threads, each step's work gets torch's intra-op threads // restarts (not all of
    them each); afterwards torch's count is what it was, also where matchings run at once on threads of the
    caller's own (the count is process-wide: the first sets it, the last restores it), their results unchanged."""
    import analysis.matching as matching

    monkeypatch.setattr(matching, "_THREADED_FROM", 1)
    seen, solve = [], matching._solve
    monkeypatch.setattr(matching, "_solve", lambda costs, n: (seen.append(torch.get_num_threads()), solve(costs, n))[1])
    torch.manual_seed(0)
    a, b = TinyMLP(16).state_dict(), TinyMLP(16).state_dict()
    spec = TinyMLP(16).perm_spec()

    def match(_=None):
        return weight_matching(spec, a, b, generator=torch.Generator().manual_seed(0), restarts=2)

    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        alone = match()
        assert set(seen) == {4 // min(2, os.cpu_count() or 1)} and torch.get_num_threads() == 4
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(match, range(3)))
        assert torch.get_num_threads() == 4
        assert all(r.restart_objectives == alone.restart_objectives for r in results)
    finally:
        torch.set_num_threads(before)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1), st.sampled_from([1, 2, 4]))
def test_planted_permutation_of_random_weights_is_recovered(weights, planted_seed, restarts):
    torch.manual_seed(weights)
    model = TinyMLP(12)
    spec, a = model.perm_spec(), model.state_dict()
    planted = spec.random(a, torch.Generator().manual_seed(planted_seed))
    b = apply_permutation(spec, a, planted)
    res = weight_matching(spec, a, b, generator=torch.Generator().manual_seed(planted_seed), restarts=restarts)
    inv = invert(planted)
    assert all(torch.equal(res.perms[n], inv[n]) for n in spec.perms)


# --- attention heads: block groups ----------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_assign_blocks_is_the_exact_optimum_over_block_permutations(seed):
    """Against enumeration of every (head permutation, within-head permutation of each cost) on 3 heads of 2."""
    import itertools

    import numpy as np

    from analysis.matching import assign_blocks
    from zoos.permspec import from_blocks

    rng = np.random.default_rng(seed)
    costs = [rng.normal(size=(6, 6)) for _ in range(2)]
    perms, value = assign_blocks(costs, 3)
    got = sum(c[np.arange(6), p].sum() for c, p in zip(costs, perms))
    taus = [torch.tensor(t) for t in itertools.product(*[list(itertools.permutations(range(2)))] * 3)]
    best = max(sum(c[np.arange(6), from_blocks(torch.tensor(s), t).numpy()].sum() for c, t in zip(costs, pair))
               for s in itertools.permutations(range(3)) for pair in itertools.product(taus, taus))
    assert got == pytest.approx(best, abs=1e-9) and value == pytest.approx(best, abs=1e-9)
    spec = PermSpec({"qk": (("q", 0),), "vo": (("v", 0),)}, {"qk": ("h", 3), "vo": ("h", 3)})
    spec.check({"qk": torch.from_numpy(perms[0]), "vo": torch.from_numpy(perms[1])})


@functools.cache
def _vit(seed: int = 0) -> tuple[nn.Module, dict[str, Tensor]]:
    """A small ViT (3 heads of 4 dimensions) with every weight perturbed, so no two units are alike."""
    from tasks import get_task
    from zoos.archs import build_arch

    torch.manual_seed(seed)
    model = build_arch("vit", get_task("digits"), width=12, depth=2, heads=3, patch=4).eval()
    return model, {k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()}


def _planted_heads(spec: PermSpec, state: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """A random allowed permutation whose head permutations all move heads and whose qk and vo differ inside them."""
    from zoos.permspec import to_blocks

    g = torch.Generator().manual_seed(seed)
    while True:
        planted = spec.random(state, g)
        parts = {n: to_blocks(planted[n], spec.blocks[n][1]) for n in spec.blocks}
        moved = all(not torch.equal(s, torch.arange(len(s))) for s, _ in parts.values())
        if moved and all(not torch.equal(parts[f"block{i}.qk"][1], parts[f"block{i}.vo"][1]) for i in range(2)):
            return planted


def test_head_aware_matching_recovers_a_planted_head_permutation():
    """Planted: heads moved, and within each head independent permutations of the qk and vo dimensions. Weight
    matching and activation matching both find its inverse exactly; MergeMany of permuted copies is the model."""
    model, a = _vit()
    spec = model.perm_spec()
    planted = _planted_heads(spec, a, 1)
    b = apply_permutation(spec, a, planted)
    x = digits()[0][:256]
    assert check_same_function(model, a, b, x) < 1e-5
    inv = invert(planted)
    wm = weight_matching(spec, a, b, generator=torch.Generator().manual_seed(0))
    am = activation_matching(model, spec, a, b, [x])
    for res in (wm, am):
        spec.check(res.perms)
        assert all(torch.equal(res.perms[n], inv[n]) for n in spec.perms)
    perms, merged = merge_many(spec, [a, b, apply_permutation(spec, a, _planted_heads(spec, a, 2))],
                               generator=torch.Generator().manual_seed(0))
    for p in perms:
        spec.check(p)
    assert all(torch.allclose(merged[k], a[k], atol=1e-6) for k in a)


def test_head_unaware_matching_leaves_the_symmetry_and_head_aware_keeps_the_function():
    """Between two different models: head-aware matching is an allowed permutation (b's function unchanged);
    head-unaware matching treats each attention's dimensions as one flat permutation, which moves dimensions
    across heads and so changes b's function; over its larger set it reaches a higher objective."""
    model, a = _vit(0)
    _, b = _vit(1)
    spec = model.perm_spec()
    x = digits()[0][:256]
    aware = weight_matching(spec, a, b, generator=torch.Generator().manual_seed(0))
    unaware = weight_matching(spec.unstructured(), a, b, generator=torch.Generator().manual_seed(0))
    spec.check(aware.perms)
    assert check_same_function(model, b, apply_permutation(spec, b, aware.perms), x) < 1e-5
    with pytest.raises(ValueError, match="across its 3 blocks"):
        spec.check(unaware.perms)
    assert check_same_function(model, b, apply_permutation(spec, b, unaware.perms), x) > 1e-3
    assert unaware.objective[-1] > aware.objective[-1] > aware.objective[0]
