"""Orbit equivariance error: ~0 for models equivariant by construction, clearly > 0 for baselines."""

import torch
import torch.nn.functional as F
from torch import nn

from analysis.symmetry import feature_error, orbit_error
from tasks.groups import ImageGroup, OrthogonalGroup
from zoos.equivariance import kernel_projection
from zoos.functional import stack_states, template

C4 = ImageGroup("C4")


class CNN(nn.Module):
    """A plain CNN; with `pool_orbit` its logits are averaged over the C4 orbit of the input (invariant)."""

    def __init__(self, pool_orbit=False):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 3)
        self.pool_orbit = pool_orbit

    def body(self, x):
        return self.head(F.relu(self.conv(x)).flatten(1))

    def forward(self, x):
        if not self.pool_orbit:
            return self.body(x)
        return torch.stack([self.body(torch.rot90(x, k, (-2, -1))) for k in range(4)]).mean(0)


def population(models):
    params, buffers = stack_states(models)
    return template(models[0]), params, buffers


def test_invariant_by_construction_scores_zero_baseline_does_not():
    x = torch.rand(16, 1, 8, 8)
    for pool, lo, hi in [(True, 0.0, 1e-5), (False, 0.05, 1.0)]:
        err = orbit_error(*population([CNN(pool) for _ in range(3)]), x, C4)
        assert err.exact and err.mean.shape == (3,) and err.per_element.shape == (3, 4)
        assert ((err.mean >= lo) & (err.mean <= hi)).all(), (pool, err.mean)
        assert (err.ci == 0).all()
        assert err.per_element[:, 0].abs().max() < 1e-6  # the identity element
    # C4-invariant is not D4-invariant: the flips show up
    d4 = orbit_error(*population([CNN(True)]), x, ImageGroup("D4"))
    assert d4.per_element[0, :4].max() < 1e-5 and d4.per_element[0, 4:].min() > 0.01


def test_population_values_equal_one_model_at_a_time():
    models = [CNN() for _ in range(3)]
    x = torch.rand(8, 1, 8, 8)
    together = orbit_error(*population(models), x, C4)
    for i, m in enumerate(models):
        alone = orbit_error(*population([m]), x, C4)
        torch.testing.assert_close(together.per_element[i], alone.per_element[0], rtol=1e-5, atol=1e-6)


class PointModel(nn.Module):
    """x [B, n, 3] -> [B, 2]: output 0 depends on norms only (O(3)-invariant), output 1 on raw coordinates."""

    def __init__(self):
        super().__init__()
        self.inv = nn.Linear(5, 1)
        self.raw = nn.Linear(15, 1)

    def forward(self, x):
        return torch.cat([self.inv(x.norm(dim=-1)), self.raw(x.flatten(1))], -1)


class VectorModel(nn.Module):
    """x [B, n, 3] -> [B, 1, 3]: sum_i phi(|x_i|) x_i, O(3)-equivariant; `bias` adds a fixed vector (breaks it)."""

    def __init__(self, bias=False):
        super().__init__()
        self.phi = nn.Linear(1, 1)
        self.b = nn.Parameter(torch.randn(3) if bias else torch.zeros(3))

    def forward(self, x):
        w = torch.tanh(self.phi(x.norm(dim=-1, keepdim=True)))
        return (w * x).sum(1, keepdim=True) + self.b


def test_lie_group_monte_carlo_with_interval_and_per_output():
    group = OrthogonalGroup(3, "v", "invariant")
    x = torch.randn(32, 5, 3)
    err = orbit_error(*population([PointModel(), PointModel()]), x, group, n_samples=24,
                      generator=torch.Generator().manual_seed(1))
    assert not err.exact and err.per_element.shape == (2, 24)
    assert err.per_output.shape == (2, 2)
    assert err.per_output[:, 0].max() < 1e-5 and err.per_output[:, 1].min() > 0.1
    assert (err.ci > 0).all() and (err.ci < err.mean).all()


def test_equivariant_vector_output_uses_the_output_action():
    group = OrthogonalGroup(3, "v", "v")
    x = torch.randn(16, 5, 3)
    gen = torch.Generator().manual_seed(2)
    good = orbit_error(*population([VectorModel()]), x, group, n_samples=8, generator=gen)
    bad = orbit_error(*population([VectorModel(bias=True)]), x, group, n_samples=8, generator=gen)
    assert good.mean.item() < 1e-5 and bad.mean.item() > 0.05


def test_feature_invariance_and_equivariance_of_a_hidden_layer():
    model = CNN()
    with torch.no_grad():  # a C4-invariant kernel makes the conv layer commute with rot90
        model.conv.weight.copy_(kernel_projection(C4, (3, 3))(model.conv.weight))
    pop = population([model])
    x = torch.rand(8, 1, 8, 8)
    equi = feature_error(*pop, x, C4, "conv", feature_action=C4.act_in)
    inv = feature_error(*pop, x, C4, "conv")
    assert equi.mean.item() < 1e-5
    assert inv.mean.item() > 0.05
    assert equi.per_output.shape == (1, 4, 8, 8)


def test_group_cnn_scores_zero_plain_cnn_does_not_on_digits():
    from tasks.registry import get_task
    from zoos.archs import build_arch

    task = get_task("digits")
    x, _ = task.load("test", 0)
    x = x[:32]
    errs = {}
    for name in ["p4cnn", "cnn"]:
        errs[name] = orbit_error(*population([build_arch(name, task, width=8) for _ in range(2)]), x, task.group).mean
    assert errs["p4cnn"].max() < 1e-6
    assert errs["cnn"].min() > 1e-3
