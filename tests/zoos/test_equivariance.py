"""Weight-space projection onto the equivariant subspace: idempotent, equivariant, orthogonal, vmappable."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from tasks.groups import ImageGroup, OrthogonalGroup
from zoos.equivariance import distance, input_projection, kernel_projection, projections, regulariser, total_distance


class FlatLinear(nn.Module):
    """A linear layer keeping its input's [C, h, w] shape in its weight, like zoos.archs.layers.FlatLinear."""

    def __init__(self, in_shape, out_features):
        super().__init__()
        self.in_shape = in_shape
        self.weight = nn.Parameter(torch.randn(out_features, *in_shape) / 12)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return x.flatten(1) @ self.weight.flatten(1).T + self.bias


class SmallCNN(nn.Module):
    """conv -> relu -> conv -> FlatLinear head on the whole feature map: every layer is constrained."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = FlatLinear((4, 6, 6), 3)

    def forward(self, x):
        return self.head(F.relu(self.c2(F.relu(self.c1(x)))))


class SmallMLP(nn.Module):
    def __init__(self, input_shape=(2, 5, 5)):
        super().__init__()
        self.input_shape = input_shape
        self.l1 = nn.Linear(50, 8)
        self.l2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x.flatten(1))))


@pytest.mark.parametrize("name", ["C4", "D4"])
def test_kernel_projection_idempotent_and_equivariant(name):
    group = ImageGroup(name)
    project = kernel_projection(group, (3, 3))
    w = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    pw = project(w)
    torch.testing.assert_close(project(pw), pw)
    x = torch.randn(4, 2, 7, 7, dtype=torch.float64)
    for g in group.elements():
        lhs = F.conv2d(group.act_in(g, x), pw, padding=1)
        torch.testing.assert_close(lhs, group.act_in(g, F.conv2d(x, pw, padding=1)))
    # the raw kernel does not commute with a quarter turn
    g = group.elements()[1]
    assert (F.conv2d(group.act_in(g, x), w, padding=1) - group.act_in(g, F.conv2d(x, w, padding=1))).abs().max() > 1e-2


def test_projection_is_orthogonal_so_regulariser_gradient_is_residual():
    project = kernel_projection(ImageGroup("D4"), (3, 3))
    a, b = torch.randn(2, 6, 3, 3, 3, dtype=torch.float64)
    # self-adjoint: <P a, b> = <a, P b>, hence the gradient of ||W - P W||^2 is 2 (W - P W)
    torch.testing.assert_close((project(a) * b).sum(), (a * project(b)).sum())
    w = a.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(regulariser({"w": w}, {"w": project}), w)
    torch.testing.assert_close(grad, 2 * (a - project(a)))


def test_first_linear_of_mlp_becomes_invariant():
    group = ImageGroup("D4")
    model = SmallMLP().double()
    projs = projections(model, group)
    assert set(projs) == {"l1.weight"}
    with torch.no_grad():
        model.l1.weight.copy_(projs["l1.weight"](model.l1.weight))
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    for g in group.elements():
        torch.testing.assert_close(model(group.act_in(g, x)), model(x))
    torch.testing.assert_close(projs["l1.weight"](model.l1.weight), input_projection(group, (2, 5, 5))(model.l1.weight))


def test_distance_zero_after_projection_positive_before_and_per_model():
    group = ImageGroup("C4")
    model = SmallCNN().double()
    projs = projections(model, group, input_shape=(1, 6, 6))
    assert set(projs) == {"c1.weight", "c2.weight", "head.weight"}
    state = {k: torch.stack([v, 2 * v]) for k, v in model.state_dict().items()}  # a population of 2
    d = distance(state, projs, batch_dims=1)
    for key, value in d.items():
        assert value.shape == (2,)
        assert (value > 0.3).all(), key  # random weights are far from the invariant subspace
        torch.testing.assert_close(value[0], value[1])  # relative: scaling a model does not change it
    projected = {k: projs[k](v) if k in projs else v for k, v in state.items()}
    assert all((v < 1e-12).all() for v in distance(projected, projs, batch_dims=1).values())
    # all layers as one vector: between the per-layer extremes, and 0 once projected
    total = total_distance(state, projs, batch_dims=1)
    per_layer = torch.stack(list(d.values()))
    assert total.shape == (2,) and (per_layer.min(0).values <= total).all() and (total <= per_layer.max(0).values).all()
    assert (total_distance(projected, projs, batch_dims=1) < 1e-12).all()
    torch.testing.assert_close(total_distance({k: v[0] for k, v in state.items()}, projs), total[0])
    # the projected network is invariant end to end
    model.load_state_dict({k: v[0] for k, v in projected.items()})
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    for g in group.elements():
        torch.testing.assert_close(model(group.act_in(g, x)), model(x))


def test_vmap_over_population_matches_direct():
    project = kernel_projection(ImageGroup("D4"), (3, 3))
    w = torch.randn(7, 4, 2, 3, 3)
    torch.testing.assert_close(vmap(project)(w), project(w))


def test_regulariser_descent_reaches_subspace():
    group = ImageGroup("C4")
    model = SmallCNN()
    projs = projections(model, group, input_shape=(1, 6, 6))
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    before = regulariser(params, projs).item()
    opt = torch.optim.SGD(params.values(), lr=0.25)
    for _ in range(3):  # P is orthogonal: lr 0.25 on ||(I-P)W||^2 halves the residual (I-P)W each step
        opt.zero_grad()
        regulariser(params, projs).backward()
        opt.step()
    assert regulariser(params, projs).item() == pytest.approx(before / 4**3, rel=1e-4)


def test_continuous_group_refused_with_reason():
    with pytest.raises(ValueError, match="continuous"):
        projections(SmallMLP(), OrthogonalGroup(3))


def test_real_architectures_projected_become_invariant_and_group_cnns_are_already():
    from tasks.registry import get_task
    from zoos.archs import build_arch

    mnist = get_task("mnist")  # building the task reads no files
    x = torch.rand(3, 1, 28, 28)
    for name in ["cnn_s", "mlp"]:
        model = build_arch(name, mnist).eval()
        projs = projections(model, mnist.group, input_shape=mnist.input_shape)
        state = {k: v.detach() for k, v in model.state_dict().items()}
        assert all(v > 0.3 for v in distance(state, projs).values())
        model.load_state_dict({k: projs[k](v) if k in projs else v for k, v in state.items()})
        for g in mnist.group.elements():
            torch.testing.assert_close(model(mnist.group.act_in(g, x)), model(x), atol=1e-5, rtol=1e-4)
    digits = get_task("digits")
    for name in ["p4cnn", "p4mcnn"]:
        model = build_arch(name, digits)
        d = distance(model.state_dict(), projections(model, digits.group))
        assert d and all(v == 0 for v in d.values())


@pytest.mark.parametrize("arch", ["canon_cnn", "fa_cnn"])
def test_a_wrapper_invariant_by_construction_is_measured_by_its_backbones_weights(arch):
    """canon_cnn and fa_cnn are invariant whatever their backbone's weights, so their distance to the equivariant
    subspace is their backbone's against its own (not a 0 by definition): the backbone's layers, prefixed, the
    backbone's own distance, and 0 once the backbone is projected."""
    from tasks import get_task
    from zoos.archs import build_arch

    task = get_task("digits", variant="rotated")
    torch.manual_seed(0)
    model = build_arch(arch, task).double()
    projs = projections(model, task.group)
    own = projections(model.backbone, task.group)
    assert set(projs) == {f"backbone.{k}" for k in own}
    state = {k: v[None] for k, v in model.state_dict().items()}
    inner = {k: v[None] for k, v in model.backbone.state_dict().items()}
    total = total_distance(state, projs, batch_dims=1)
    torch.testing.assert_close(total, total_distance(inner, own, batch_dims=1))
    assert (total > 0.3).all()
    projected = {k: projs[k](v) if k in projs else v for k, v in state.items()}
    assert (total_distance(projected, projs, batch_dims=1) < 1e-12).all()
