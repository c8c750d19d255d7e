"""Linear paths, barriers, REPAIR and Bezier curves between trained digits models."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from analysis.bezier import bernstein, bezier_curve, bezier_states
from analysis.connectivity import (
    activation_stats,
    barrier,
    barrier_reduction,
    interpolate,
    linear_path,
    repair_path,
    repair_sites,
    reset_norm_stats,
)
from analysis.matching import weight_matching
from tasks import get_task
from tests.analysis.test_matching import TinyCNN, TinyMLP, trained
from zoos.permspec import apply_permutation


@functools.cache
def task():
    return get_task("digits")


def own_loss(model, state, split="test"):
    x, y = task().load(split, 0)
    model.eval()
    with torch.no_grad():
        pred = functional_call(model, state, (x,))
    return float(task().loss(pred, y)), float(task().metric(pred, y))


@functools.cache
def aligned_pair():
    model, a = trained("mlp", 0)
    _, b = trained("mlp", 1)
    res = weight_matching(model.perm_spec(), a, b, generator=torch.Generator().manual_seed(0))
    return model, a, b, apply_permutation(model.perm_spec(), b, res.perms)


# --- barriers on synthetic curves -------------------------------------------------------------------


def test_barrier_formulas_on_known_curves():
    lam = torch.linspace(0, 1, 21)
    bump = 1.0 + 4 * lam * (1 - lam)  # ends 1, peak 2 at 0.5
    line = 2.0 + 3 * lam  # a straight line: no barrier
    tilt = lam + torch.sin(math.pi * lam)  # ends 0 and 1, excess over the chord = sin(pi l)
    vals = torch.stack([bump, line, tilt])
    assert torch.allclose(barrier(vals, lam, "sup"), torch.tensor([1.0, 0.0, 1.0]), atol=1e-6)
    assert torch.allclose(barrier(vals, lam, "midpoint"), torch.tensor([1.0, 0.0, 1.0]), atol=1e-6)
    skew = torch.where(lam < 0.25, 4 * lam, (1 - lam) * 4 / 3)  # peak 1 at l = 0.25, 2/3 at l = 0.5
    assert float(barrier(skew, lam, "sup")) == pytest.approx(1.0)
    assert float(barrier(skew, lam, "midpoint")) == pytest.approx(2 / 3, abs=1e-6)
    assert torch.allclose(barrier_reduction(torch.tensor([2.0, 0.0]), torch.tensor([0.5, 0.0]))[:1], torch.tensor([0.75], dtype=torch.float64))
    assert barrier_reduction(0.0, 0.0).isnan()
    with pytest.raises(ValueError, match="lambda = 0.5"):
        barrier(torch.zeros(4), torch.linspace(0, 1, 4), "midpoint")
    with pytest.raises(ValueError, match="form"):
        barrier(vals, lam, "max")
    with pytest.raises(ValueError, match="points"):
        barrier(vals, torch.linspace(0, 1, 5))


def test_interpolate_shapes_and_values():
    a = {"w": torch.zeros(3, 2), "n": torch.tensor(7)}
    b = {"w": torch.ones(3, 2), "n": torch.tensor(9)}
    s = interpolate(a, b, 5)
    assert s["w"].shape == (5, 3, 2) and torch.allclose(s["w"][:, 0, 0], torch.linspace(0, 1, 5))
    assert s["n"].tolist() == [7] * 5
    sp = interpolate({"w": torch.stack([a["w"], a["w"] + 1])}, {"w": torch.stack([b["w"], b["w"] + 1])}, 3, pairs=True)
    assert sp["w"].shape == (2, 3, 3, 2) and torch.allclose(sp["w"][1, :, 0, 0], torch.tensor([1.0, 1.5, 2.0]))


# --- linear paths -----------------------------------------------------------------------------------


def test_path_endpoints_and_vectorised_path_equal_per_model_evaluation():
    model, a, b, _ = aligned_pair()
    res = linear_path(model, a, b, task(), lambdas=7)
    assert res.loss["test"].shape == (7,) and set(res.loss) == {"train", "test"}
    la, ma = own_loss(model, a)
    lb, mb = own_loss(model, b)
    assert float(res.loss["test"][0]) == pytest.approx(la, abs=1e-5) and float(res.metric["test"][0]) == ma
    assert float(res.loss["test"][-1]) == pytest.approx(lb, abs=1e-5) and float(res.metric["test"][-1]) == mb
    for i, l in enumerate(torch.linspace(0, 1, 7).tolist()):
        loss, acc = own_loss(model, {k: (1 - l) * a[k] + l * b[k] for k in a})
        assert float(res.loss["test"][i]) == pytest.approx(loss, abs=1e-5)
        assert float(res.metric["test"][i]) == pytest.approx(acc, abs=1e-6)
    # small batches give the same means
    res_small = linear_path(model, a, b, task(), lambdas=7, splits=("test",), batch_size=64)
    assert torch.allclose(res_small.loss["test"], res.loss["test"], atol=1e-5)


def test_path_over_stacked_pairs_equals_single_pairs():
    model, a, b, pb = aligned_pair()
    stack = lambda *ss: {k: torch.stack([s[k] for s in ss]) for k in a}  # noqa: E731
    res = linear_path(model, stack(a, a), stack(b, pb), task(), lambdas=5, pairs=True, splits=("test",))
    assert res.loss["test"].shape == (2, 5)
    naive = linear_path(model, a, b, task(), lambdas=5, splits=("test",))
    aligned = linear_path(model, a, pb, task(), lambdas=5, splits=("test",), chunk=2)
    assert torch.allclose(res.loss["test"][0], naive.loss["test"], atol=1e-5)
    assert torch.allclose(res.loss["test"][1], aligned.loss["test"], atol=1e-5)


def test_default_chunk_bounds_models_per_forward(monkeypatch):
    """Without `chunk`, models x examples per vectorised forward stay within CHUNK_SAMPLES (all pairs x
    lambdas of a large zoo would not fit at once), with the same result as one big forward."""
    import analysis.connectivity as conn

    model, a, b, _ = aligned_pair()
    whole = linear_path(model, a, b, task(), lambdas=9, splits=("test",), chunk=9)
    seen = []
    forward = conn.population_forward
    monkeypatch.setattr(conn, "population_forward", lambda m, p, bf, x: seen.append(next(iter(p.values())).shape[0]) or forward(m, p, bf, x))
    monkeypatch.setattr(conn, "CHUNK_SAMPLES", 2 * 256)
    chunked = linear_path(model, a, b, task(), lambdas=9, splits=("test",), batch_size=256)
    assert max(seen) == 2 and len(seen) >= 5
    assert torch.allclose(chunked.loss["test"], whole.loss["test"], atol=1e-5)


def test_aligned_barrier_is_lower_than_naive():
    model, a, b, pb = aligned_pair()
    naive = linear_path(model, a, b, task(), lambdas=11, splits=("test",))
    aligned = linear_path(model, a, pb, task(), lambdas=11, splits=("test",))
    for form in ("sup", "midpoint"):
        bn, ba = barrier(naive.loss["test"], naive.lambdas, form), barrier(aligned.loss["test"], aligned.lambdas, form)
        assert float(ba) < float(bn), form
        assert float(barrier_reduction(bn, ba)) > 0
    en = barrier(naive.error("test"), naive.lambdas)
    ea = barrier(aligned.error("test"), aligned.lambdas)
    assert float(ea) <= float(en)


# --- normalisation statistics and REPAIR ------------------------------------------------------------


def test_repair_restores_midpoint_activation_std():
    model, a, b, pb = aligned_pair()
    spec = model.perm_spec()
    sites = repair_sites(model, spec)
    assert sites == ["net.1", "net.3"]
    x = task().load("train", 0)[0]
    batches = [x[:256], x[256:512]]
    mid = {k: v[1] for k, v in interpolate(a, pb, [0.0, 0.5, 1.0]).items()}
    fixed = {k: v[1] for k, v in repair_path(model, spec, a, pb, [0.0, 0.5, 1.0], batches).items()}
    sa, sb = activation_stats(model, a, batches, sites), activation_stats(model, pb, batches, sites)
    s_mid, s_fix = activation_stats(model, mid, batches, sites), activation_stats(model, fixed, batches, sites)
    for site in sites:
        target = (sa[site][1] + sb[site][1]) / 2
        before = (s_mid[site][1] - target).abs().mean()
        after = (s_fix[site][1] - target).abs().mean()
        assert s_mid[site][1].mean() < 0.95 * target.mean(), site  # variance collapse is there to repair
        assert after < 0.2 * before, site
    assert own_loss(model, fixed)[0] < own_loss(model, mid)[0]


def test_reset_norm_stats_recomputes_batchnorm_and_leaves_layernorm_nets():
    x = task().load("train", 0)[0][:512]
    cnn = TinyCNN()
    st = cnn.state_dict()
    assert reset_norm_stats(cnn, st, [x]).keys() == st.keys()
    assert all(torch.equal(reset_norm_stats(cnn, st, [x])[k], st[k]) for k in st)
    bn = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8))
    st = {k: v.clone() for k, v in bn.state_dict().items()}
    st["2.running_mean"] += 5.0
    new = reset_norm_stats(bn, st, [x[:256], x[256:]])
    h = bn[1](bn[0](x))
    assert torch.allclose(new["2.running_mean"], h.mean(0).detach(), atol=1e-5)
    batch_var = (h[:256].var(0) + h[256:].var(0)) / 2  # cumulative average of per-batch (unbiased) variances
    assert torch.allclose(new["2.running_var"], batch_var.detach(), rtol=1e-4)


# --- Bezier curves ----------------------------------------------------------------------------------


def test_bezier_basis_and_endpoints():
    ts = torch.linspace(0, 1, 9)
    w = bernstein(ts, 4)
    assert torch.allclose(w.sum(1), torch.ones(9)) and w[0, 0] == 1 and w[-1, -1] == 1
    a, b = {"w": torch.zeros(3)}, {"w": torch.ones(3)}
    on_line = {"w": torch.tensor([[0.25] * 3, [0.5] * 3, [0.75] * 3])}
    pts = bezier_states(a, on_line, b, ts)["w"]  # evenly spaced controls: the straight line
    assert torch.allclose(pts[:, 0], ts, atol=1e-6)


def test_bezier_curve_lowers_max_loss_below_linear_path():
    model, a = trained("mlp", 0)
    _, b = trained("mlp", 1)
    linear = linear_path(model, a, b, task(), lambdas=11, splits=("train",))
    res = bezier_curve(model, a, b, task(), bends=1, steps=150, lr=1e-2, lambdas=11, splits=("train",))
    assert res.controls["net.1.weight"].shape == (1, 32, 64)
    ends = res.path.loss["train"][[0, -1]]
    assert torch.allclose(ends, linear.loss["train"][[0, -1]], atol=1e-5)  # endpoints stay fixed
    assert float(res.path.loss["train"].max()) < float(linear.loss["train"].max())
    assert float(barrier(res.path.loss["train"], res.path.lambdas)) < 0.5 * float(barrier(linear.loss["train"], linear.lambdas))


def test_repair_renormalises_a_transformers_linear_layers_and_layernorms():
    """On a ViT, REPAIR's sites are its linear layers and its LayerNorms (the residual stream's), in execution
    order, so after it every site's per-feature std is the endpoints' interpolation, and so is its mean where the
    layer has a bias to move it (the key projection has none: a key bias is invisible through the softmax)."""
    from tests.analysis.test_matching import _vit

    model, a = _vit(0)
    _, b = _vit(1)
    spec = model.perm_spec()
    pb = apply_permutation(spec, b, weight_matching(spec, a, b, generator=torch.Generator().manual_seed(0)).perms)
    sites = repair_sites(model, spec)
    assert sites[:7] == ["embed", "blocks.0.norm1", "blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v",
                         "blocks.0.attn.o", "blocks.0.norm2"] and sites[-1] == "norm"
    batches = [task().load("train", 0)[0][:256]]
    fixed = {k: v[1] for k, v in repair_path(model, spec, a, pb, [0.0, 0.5, 1.0], batches).items()}
    sa, sb = activation_stats(model, a, batches, sites), activation_stats(model, pb, batches, sites)
    got = activation_stats(model, fixed, batches, sites)
    mods = dict(model.named_modules())
    for site in sites:
        for i in (0, 1) if mods[site].bias is not None else (1,):
            target = (sa[site][i] + sb[site][i]) / 2
            torch.testing.assert_close(got[site][i], target, atol=1e-4 * (1 + float(target.abs().max())), rtol=1e-3,
                                       msg=lambda m: f"{site}: {m}")
