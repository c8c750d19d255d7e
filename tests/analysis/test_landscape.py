"""Hessian eigenvalue / trace against known quadratics; CKA and functional dimension against known facts."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

from analysis.landscape import hessian_top_eigenvalue, hessian_trace
from analysis.representation import cka, cka_matrix, functional_dimension, layer_cka, relu_mlp_bound
from zoos.functional import stack_states, template


class Quadratic(nn.Module):
    """Loss 1/2 θ^T A θ: its Hessian is A (a buffer, so each model of a population has its own)."""

    def __init__(self, eigs, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
        self.register_buffer("a", q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T)
        self.theta = nn.Parameter(torch.randn(len(eigs), generator=g, dtype=torch.float64))

    def forward(self, x):
        return 0.5 * self.theta @ self.a @ self.theta


def value(pred, y):
    return pred


def population(models):
    params, buffers = stack_states(models)
    return template(models[0]), params, buffers


def test_quadratic_gives_its_eigenvalue_and_trace():
    eigs = [[5.0, 2.0, 1.0, -1.0, 0.5], [-7.0, 3.0, 0.1, 0.2, 0.3]]
    pop = population([Quadratic(e, seed=i) for i, e in enumerate(eigs)])
    x = y = torch.zeros(1, dtype=torch.float64)
    top = hessian_top_eigenvalue(*pop, x, y, value, iters=500, tol=1e-12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(top.value, torch.tensor([5.0, -7.0], dtype=torch.float64), rtol=1e-6, atol=0)
    tr = hessian_trace(*pop, x, y, value, n_samples=400, generator=torch.Generator().manual_seed(0))
    truth = torch.tensor([7.5, -3.4], dtype=torch.float64)
    assert ((tr.mean - truth).abs() < 4 * tr.se).all() and (tr.se > 0).all()


def test_small_network_matches_explicit_hessian():
    nets = [nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double() for _ in range(2)]
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    mse = lambda p, t: ((p - t) ** 2).mean()  # noqa: E731
    pop = population(nets)
    top = hessian_top_eigenvalue(*pop, x, y, mse, iters=2000, tol=1e-12, generator=torch.Generator().manual_seed(0))
    tr = hessian_trace(*pop, x, y, mse, n_samples=300, generator=torch.Generator().manual_seed(0))
    for i, net in enumerate(nets):
        params = {k: v.detach() for k, v in net.named_parameters()}
        keys = list(params)
        h = hessian(lambda p: mse(functional_call(net, p, (x,)), y))(params)
        sizes = [params[k].numel() for k in keys]
        full = torch.cat([torch.cat([h[a][b].reshape(sa, sb) for b, sb in zip(keys, sizes)], 1)
                          for a, sa in zip(keys, sizes)])
        ev = torch.linalg.eigvalsh(full)
        dominant = ev[ev.abs().argmax()]
        assert top.value[i].item() == pytest.approx(dominant.item(), rel=1e-4)
        assert abs(tr.mean[i] - full.trace()) < 4 * tr.se[i]


@pytest.mark.parametrize("rel_se", [0.2, 0.05, 0.01])
def test_trace_probes_stop_where_the_precision_rule_says(rel_se):
    """Each model stops at the first probe count >= 8 whose standard error is at most rel_se of |mean|, or at the cap;
    models with a spread-out spectrum (off-diagonal Hessian mass) need more probes than near-diagonal ones."""
    eigs = [[5.0, 2.0, 1.0, -1.0, 0.5], [-7.0, 3.0, 0.1, 0.2, 0.3], [1.0, 1.0, 1.0, 1.0, 1.01], [9.0, -8.0, 0.5, 0.1, 0.2]]
    pop = population([Quadratic(e, seed=i) for i, e in enumerate(eigs)])
    x = y = torch.zeros(1, dtype=torch.float64)
    cap = 300
    tr = hessian_trace(*pop, x, y, value, n_samples=cap, rel_se=rel_se, generator=torch.Generator().manual_seed(1))
    assert tr.samples.shape[1] == int(tr.n_samples.max())
    for i in range(len(eigs)):
        s = tr.samples[i]
        n = int(tr.n_samples[i])
        assert not s[:n].isnan().any() and s[n:].isnan().all()

        def precise(k):
            return bool(s[:k].std() / k**0.5 <= rel_se * s[:k].mean().abs())

        assert not any(precise(k) for k in range(8, n)), "stopped late"
        assert precise(n) or n == cap, "stopped early"
        torch.testing.assert_close(tr.mean[i], s[:n].mean())
        torch.testing.assert_close(tr.se[i], s[:n].std() / n**0.5)
    assert tr.precise(rel_se).tolist() == [bool(tr.se[i] <= rel_se * tr.mean[i].abs()) for i in range(len(eigs))]
    assert int(tr.n_samples[2]) == 8, "a near-isotropic Hessian is exact from the first probes"
    truth = torch.tensor([sum(e) for e in eigs], dtype=torch.float64)
    assert ((tr.mean - truth).abs() < 5 * tr.se.clamp_min(1e-9)).all()


def test_trace_without_a_target_takes_every_probe():
    pop = population([Quadratic([3.0, 1.0, -2.0], seed=i) for i in range(2)])
    x = y = torch.zeros(1, dtype=torch.float64)
    tr = hessian_trace(*pop, x, y, value, n_samples=12, generator=torch.Generator().manual_seed(0))
    assert tr.n_samples.tolist() == [12, 12] and tr.samples.shape == (2, 12)
    with pytest.raises(ValueError, match="rel_se"):
        hessian_trace(*pop, x, y, value, n_samples=12, rel_se=0.0)


def test_cka_identity_orthogonal_and_scaling_invariance():
    x = torch.randn(64, 20, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    for debiased in (False, True):
        assert cka(x, x, debiased=debiased).item() == pytest.approx(1.0, abs=1e-12)
        assert cka(x, 3.7 * x @ q, debiased=debiased).item() == pytest.approx(1.0, abs=1e-10)
        assert cka(x, x[:, :5], debiased=debiased).item() < 0.9  # a projection loses information


def test_cka_of_independent_features_is_near_zero_when_debiased():
    x, y = torch.randn(2, 100, 2000, dtype=torch.float64)  # features wider than the batch
    assert abs(cka(x, y, debiased=True).item()) < 0.05
    assert cka(x, y).item() > 0.5  # the standard estimator is biased upward in this regime
    a, b = torch.randn(2, 2000, 10, dtype=torch.float64)  # batch much larger than the width
    assert cka(a, b).item() < 0.05


def test_debiased_cka_equals_unbiased_hsic_formula():
    """Song et al. (2012): HSIC_1 = [tr(KL) + 1'K1 1'L1/((n-1)(n-2)) - 2/(n-2) 1'KL1] / (n(n-3)), zero diagonals."""
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 6, dtype=torch.float64)

    def hsic(k, l):  # noqa: E741
        n = k.shape[0]
        k, l = k - torch.diag(torch.diag(k)), l - torch.diag(torch.diag(l))  # noqa: E741
        one = torch.ones(n, dtype=k.dtype)
        return (torch.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))

    k, l = x @ x.T, y @ y.T  # noqa: E741
    expected = hsic(k, l) / (hsic(k, k) * hsic(l, l)).sqrt()
    torch.testing.assert_close(cka(x, y, debiased=True), expected)


def test_layer_cka_between_populations():
    nets = [nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)) for _ in range(3)]
    pop = population(nets)
    x = torch.randn(50, 4)
    out = layer_cka(pop[0], pop[1:], pop[0], pop[1:], x, ["0", "2"])
    assert out["0"].shape == (3, 3)
    torch.testing.assert_close(torch.diagonal(out["0"]), torch.ones(3))
    assert (out["0"] - out["0"].T).abs().max() < 1e-5
    assert out["0"][0, 1] < 0.999
    torch.testing.assert_close(cka_matrix(torch.randn(2, 50, 8), torch.randn(3, 50, 5)).shape, torch.Size([2, 3]))


def test_functional_dimension_of_relu_net_is_params_minus_hidden_units():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    x = torch.randn(200, 3, dtype=torch.float64)
    fd = functional_dimension(net, net.state_dict(), x)
    assert fd.n_params == 32 and relu_mlp_bound(net) == 27
    assert fd.rank == 27
    # too few samples: the rank is limited by the number of outputs instead
    assert functional_dimension(net, net.state_dict(), x[:4]).rank <= 8
    # tanh has no positive-scaling symmetry (only sign flips, which are discrete): full rank
    smooth = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    assert functional_dimension(smooth, smooth.state_dict(), x).rank == 32


def test_regression_task_loss_takes_hessian_vector_products():
    """The tasks' own regression loss is differentiable forward-over-reverse (F.mse_loss's backward is not)."""
    from tasks import get_task

    task = get_task("o5_regression", n_train=8, n_val=8, n_test=16)
    x, y = (t.double() for t in task.load("test"))
    nets = [nn.Sequential(nn.Flatten(), nn.Linear(10, 4), nn.Tanh(), nn.Linear(4, 1)).double() for _ in range(2)]
    mse = lambda p, t: ((p - t) ** 2).mean()  # noqa: E731
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    ours = hessian_top_eigenvalue(*population(nets), x, y, task.loss, iters=50, tol=0, generator=gen())
    ref = hessian_top_eigenvalue(*population(nets), x, y, mse, iters=50, tol=0, generator=gen())
    torch.testing.assert_close(ours.value, ref.value)


def test_a_models_estimates_with_its_own_generator_do_not_depend_on_the_models_beside_it():
    """With one generator a model, each model's power iteration (stopping at its own convergence) and its trace
    probes are its own: model 1 alone, or stacked after two others, gives the same numbers."""
    nets = [nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double() for _ in range(3)]
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    mse = lambda p, t: ((p - t) ** 2).mean()  # noqa: E731
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    alone = population([nets[1]])
    stacked = population([nets[2], nets[0], nets[1]])
    top1 = hessian_top_eigenvalue(*alone, x, y, mse, iters=300, tol=1e-6, generator=gens(11))
    top3 = hessian_top_eigenvalue(*stacked, x, y, mse, iters=300, tol=1e-6, generator=gens(12, 10, 11))
    assert top1.iterations[0] == top3.iterations[2] and top3.iterations.unique().numel() > 1
    torch.testing.assert_close(top3.value[2], top1.value[0], rtol=1e-12, atol=0)
    tr1 = hessian_trace(*alone, x, y, mse, n_samples=40, rel_se=0.05, generator=gens(11))
    tr3 = hessian_trace(*stacked, x, y, mse, n_samples=40, rel_se=0.05, generator=gens(12, 10, 11))
    assert tr1.n_samples[0] == tr3.n_samples[2]
    torch.testing.assert_close(tr3.mean[2], tr1.mean[0], rtol=1e-12, atol=0)


def test_the_probes_do_not_depend_on_the_order_the_parameters_come_in():
    """Parameters reach the estimators in whatever order a mapping was built in (a set's order varies with
    Python's hash seed from process to process): the draws follow the sorted names, so a model gets the same
    probes in every process; and split_state keeps the module's own order."""
    from analysis.landscape import _draw, _rademacher
    from zoos.functional import split_state

    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = {k: v.detach()[None].expand(2, *v.shape) for k, v in net.named_parameters()}
    backwards = dict(reversed(list(params.items())))
    for draw in (lambda p, g: _draw(p, g, torch.randn), _rademacher):
        for gens in (lambda: torch.Generator().manual_seed(3), lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]):
            a, b = draw(params, gens()), draw(backwards, gens())
            assert all(torch.equal(a[k], b[k]) for k in params)
    split, _ = split_state(net, dict(reversed(list(net.state_dict().items()))))
    assert list(split) == [k for k, _ in net.named_parameters()]
