"""Lie derivative: ~0 for exactly invariant models, analytic and finite-difference values otherwise."""

import torch
from torch import nn

from analysis.lie import (IMAGE_FLOWS, finite_difference, group_flow, group_lie_derivatives, image_flow,
                          layerwise_lie_derivative, lie_derivative, lie_norm, resample)
from tasks.groups import LorentzGroup, OrthogonalGroup
from zoos.functional import stack_states, template


def population(models):
    params, buffers = stack_states(models)
    return template(models[0]), params, buffers


class NormMLP(nn.Module):
    """x [B, n, d] -> [B, 1] through per-point norms: O(d)-invariant exactly."""

    def __init__(self, n=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x.norm(dim=-1))


class RawLinear(nn.Module):
    """f(x) = <w, x>: not invariant; its Lie derivative along A is <w, x A^T>."""

    def __init__(self, n=4, d=3):
        super().__init__()
        self.lin = nn.Linear(n * d, 1)

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_invariant_model_has_zero_lie_derivative_along_every_generator():
    group = OrthogonalGroup(3, "v", "invariant")
    x = torch.randn(16, 4, 3, dtype=torch.float64)
    norms = group_lie_derivatives(*population([NormMLP().double(), NormMLP().double()]), x, group)
    assert norms.shape == (2, 3) and norms.max() < 1e-10


def test_linear_model_matches_analytic_and_finite_difference():
    group = OrthogonalGroup(3, "v", "invariant")
    model = RawLinear().double()
    pop = population([model])
    x = torch.randn(8, 4, 3, dtype=torch.float64)
    a = group.generators()[1].double()
    flow = group_flow(group, a, "in")
    lie = lie_derivative(*pop, x, flow)
    analytic = model.lin((x @ a.T).flatten(1)) - model.lin.bias
    torch.testing.assert_close(lie[0], analytic.detach())
    torch.testing.assert_close(lie, finite_difference(*pop, x, flow, h=1e-5), rtol=1e-6, atol=1e-8)


def test_lorentz_invariant_is_zero_and_euclidean_norm_is_not():
    group = LorentzGroup("v", "invariant")
    eta = torch.diag(torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=torch.float64))

    class Minkowski(nn.Module):
        def __init__(self, metric):
            super().__init__()
            self.register_buffer("metric", metric)
            self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

        def forward(self, p):
            return self.scale * torch.einsum("bni,ij,bnj->bn", p, self.metric, p).sum(-1, keepdim=True)

    x = torch.randn(8, 4, 4, dtype=torch.float64)
    inv = group_lie_derivatives(*population([Minkowski(eta)]), x, group)
    euc = group_lie_derivatives(*population([Minkowski(torch.eye(4, dtype=torch.float64))]), x, group)
    assert inv.max() < 1e-9
    assert euc[0, :3].max() < 1e-9 and euc[0, 3:].min() > 1e-2  # rotations preserve |p|^2, boosts do not


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                                 nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.net(x)


def test_image_flows_match_finite_difference():
    models = [SmallCNN().double() for _ in range(2)]
    pop = population(models)
    x = torch.randn(4, 1, 10, 10, dtype=torch.float64)
    for kind in ["rotation", "translate_x", "scale"]:
        flow = image_flow(kind)
        lie = lie_derivative(*pop, x, flow)
        fd = finite_difference(*pop, x, flow, h=1e-5)
        assert lie.shape == (2, 4, 3)
        torch.testing.assert_close(lie, fd, rtol=1e-3, atol=1e-4 * fd.abs().max().item())
        assert lie_norm(lie).min() > 1e-4


def test_layerwise_contributions_sum_to_the_total_for_a_chain():
    pop = population([SmallCNN().double()])
    x = torch.randn(4, 1, 10, 10, dtype=torch.float64)
    res = layerwise_lie_derivative(*pop, x, image_flow("rotation"))
    assert list(res.contributions) == [f"net.{i}" for i in range(7)]
    norms = res.norms()
    assert norms["unattributed"].item() < 1e-8 * norms["total"].item() + 1e-12
    assert norms["net.0"].item() > 0  # a 3x3 kernel does not commute with small rotations
    assert norms["net.6"].item() < 1e-12  # the linear head reads invariant (pooled) features


def _grid(batch: int, h: int, w: int, generator: torch.Generator) -> torch.Tensor:
    """Sampling grids of random affine maps near the identity, reaching past the image border."""
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    theta = eye + 0.4 * torch.randn(batch, 2, 3, generator=generator, dtype=torch.float64)
    return torch.nn.functional.affine_grid(theta, [batch, 1, h, w], align_corners=False)


def test_resample_equals_grid_sample():
    """The plain-op resampler computes grid_sample's values (bicubic and bilinear, zeros padding)."""
    g = torch.Generator().manual_seed(0)
    for b, c, h, w, ho, wo in [(3, 2, 9, 11, 7, 8), (1, 1, 8, 8, 8, 8), (2, 3, 5, 12, 10, 4)]:
        x = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
        grid = _grid(b, ho, wo, g)
        for mode in ("bicubic", "bilinear"):
            ref = torch.nn.functional.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
            torch.testing.assert_close(resample(x, grid, mode), ref, rtol=1e-12, atol=1e-12)


def test_image_flows_take_forward_mode_derivatives():
    """Every image flow has a forward-mode derivative (no double-vjp through grid_sample's backward,
    which has none on CUDA), and it matches a central difference of the flow itself (to O(h): the
    cubic kernel's second derivative jumps where a sample crosses a pixel, so the difference is first order)."""
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    t0 = torch.zeros((), dtype=torch.float64)
    for kind in IMAGE_FLOWS:
        flow = image_flow(kind)
        _, tangent = torch.func.jvp(lambda t: flow(t, x), (t0,), (torch.ones_like(t0),))
        h = torch.tensor(1e-7, dtype=torch.float64)
        scale = tangent.abs().max().item()
        torch.testing.assert_close(tangent, (flow(h, x) - flow(-h, x)) / (2 * h), rtol=0, atol=1e-6 * scale)
        assert tangent.abs().max() > 1e-3, kind
