"""The interpolation stage's attention-head settings, on stacked ViT pairs without Ray: head-aware paths keep
b's function, head-unaware ones are charged against the true endpoints, REPAIR adds its own path."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from analysis.connectivity import barrier
from pipeline.stages.interpolation import InterpolationSettings, _barrier_between, connect_pairs
from tasks import get_task
from tests.analysis.test_matching import _planted_heads, _vit
from zoos.permspec import apply_permutation


def test_barrier_between_the_curves_own_ends_is_the_barrier_and_a_broken_end_is_charged():
    g = torch.Generator().manual_seed(0)
    curves, lam = torch.rand(3, 9, generator=g, dtype=torch.float64), torch.linspace(0, 1, 9, dtype=torch.float64)
    own = curves[:, [0, -1]]
    torch.testing.assert_close(_barrier_between(curves, lam, own), barrier(curves, lam))
    torch.testing.assert_close(_barrier_between(curves, lam, own, "midpoint"), barrier(curves, lam, "midpoint"))
    broken = curves.clone()
    broken[:, -1] += 1.0  # the path ends at a model 1.0 worse than the true endpoint b
    assert (_barrier_between(broken, lam, own) >= 1.0 - 1e-12).all()


def test_heads_and_repair_columns_on_a_planted_and_a_different_pair():
    model, a = _vit(0)
    _, other = _vit(1)
    spec = model.perm_spec()
    planted = apply_permutation(spec, a, _planted_heads(spec, a, 1))
    stack = lambda *states: {k: torch.stack([s[k] for s in states]) for k in a}  # noqa: E731
    task = get_task("digits")
    settings = InterpolationSettings(lambdas=5, samples=128, restarts=1, heads="both", repair=True,
                                     repair_samples=128).model_dump()
    rows = connect_pairs(model, task, stack(a, a), stack(planted, other), settings, "cpu")
    same, diff = rows
    assert same["barrier_loss_aligned"] == pytest.approx(0.0, abs=1e-5)  # the planted permutation is undone
    for row in rows:  # head-aware matching keeps b's function: the aligned path ends where the naive one does
        assert row["test_loss_aligned"][-1] == pytest.approx(row["test_loss_naive"][-1], abs=1e-5)
        assert row["unaware_endpoint_loss"] == pytest.approx(row["test_loss_unaware"][-1] - row["test_loss_naive"][-1])
        assert len(row["test_loss_repair"]) == 5 and row["barrier_loss_repair"] == row["barrier_loss_repair"]
    assert abs(diff["unaware_endpoint_loss"]) > 1e-4  # a flat permutation across heads is another function
    default = InterpolationSettings(lambdas=5, samples=128, restarts=1).model_dump()
    plain = connect_pairs(model, task, stack(a), stack(other), default, "cpu")
    assert plain[0]["barrier_loss_aligned"] == pytest.approx(diff["barrier_loss_aligned"])  # 'both' adds, changes nothing
    assert not any(k.endswith(("_unaware", "_repair")) for k in plain[0])
    flat = connect_pairs(model, task, stack(a), stack(other), dict(settings, heads="unaware", repair=False), "cpu")[0]
    assert flat["unaware_endpoint_loss"] == pytest.approx(flat["test_loss_aligned"][-1] - flat["test_loss_naive"][-1])
    assert flat["barrier_loss_aligned"] >= flat["unaware_endpoint_loss"] - 1e-6  # charged at l = 1 against b itself


def test_heads_setting_is_validated_by_name():
    with pytest.raises(ValidationError, match=r"heads\n.*'aware', 'unaware' or 'both'"):
        InterpolationSettings(heads="partly")


def test_activation_matching_undoes_a_planted_head_permutation_and_keeps_b_its_function():
    """`matching: activation` aligns by hidden activations on training inputs: a planted head and within-head
    permutation is undone (zero barrier), and another model's aligned path still ends at b's own loss."""
    model, a = _vit(0)
    _, other = _vit(1)
    spec = model.perm_spec()
    planted = apply_permutation(spec, a, _planted_heads(spec, a, 1))
    stack = lambda *states: {k: torch.stack([s[k] for s in states]) for k in a}  # noqa: E731
    settings = InterpolationSettings(lambdas=5, samples=128, matching="activation", match_samples=256).model_dump()
    same, diff = connect_pairs(model, get_task("digits"), stack(a, a), stack(planted, other), settings, "cpu")
    assert same["barrier_loss_aligned"] == pytest.approx(0.0, abs=1e-5)
    assert diff["test_loss_aligned"][-1] == pytest.approx(diff["test_loss_naive"][-1], abs=1e-5)
    assert same["matching_restart_spread"] is None  # activation matching has no restarts
    with pytest.raises(ValidationError, match=r"matching\n.*'weight' or 'activation'"):
        InterpolationSettings(matching="gradients")


def test_a_pairs_matching_does_not_depend_on_the_pairs_beside_it():
    """Each pair's weight matching draws from a generator of its own (the stage's seed and the pair's ids): the
    pair alone, or second in a stack, gets the same permutations and barriers (a resumed run reproduces it)."""
    model, a = _vit(0)
    _, b = _vit(1)
    _, c = _vit(2)
    stack = lambda *states: {k: torch.stack([s[k] for s in states]) for k in a}  # noqa: E731
    settings = InterpolationSettings(lambdas=5, samples=64, restarts=2).model_dump()
    task = get_task("digits")
    alone = connect_pairs(model, task, stack(a), stack(b), settings, "cpu", pairs=[("a", "b")])[0]
    both = connect_pairs(model, task, stack(a, a), stack(c, b), settings, "cpu", pairs=[("a", "c"), ("a", "b")])[1]
    for key in ("matching_objective", "matching_restart_spread", "barrier_loss_aligned", "test_loss_aligned"):
        assert both[key] == pytest.approx(alone[key], rel=1e-9, abs=1e-12), key
