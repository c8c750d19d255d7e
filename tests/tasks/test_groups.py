"""Groups: image groups are group actions; matrix groups sample group elements, act as actions, and
their exp(generators) are group elements with a differentiable action."""

import pytest
import torch

from tasks.groups import (MINKOWSKI, AxialO2Group, ImageGroup, LorentzGroup, MatrixGroup, OrthogonalGroup,
                          TrivialGroup, element_list, haar_orthogonal)


@pytest.mark.parametrize("name,order", [("C4", 4), ("D4", 8)])
def test_image_group_is_an_action(name, order):
    group = ImageGroup(name)
    x = torch.randn(2, 3, 6, 6)
    els = group.elements()
    assert len(els) == order and group.order == order
    assert torch.equal(group.act_in(group.identity(), x), x)
    images = [group.act_in(g, x) for g in els]
    # a faithful action: every element moves a generic image differently
    assert all(not torch.equal(images[i], images[j]) for i in range(order) for j in range(i))
    for g in els:
        assert torch.equal(group.act_in(group.inverse(g), group.act_in(g, x)), x)
        for h in els:
            assert torch.equal(group.act_in(group.compose(g, h), x), group.act_in(g, group.act_in(h, x)))
    y = torch.arange(2)
    assert all(torch.equal(group.act_out(g, y), y) for g in els)


def test_four_quarter_turns_are_the_identity():
    group = ImageGroup("C4")
    x = torch.randn(1, 1, 5, 5)
    z = x
    for _ in range(4):
        z = group.act_in((1, 0), z)
    assert torch.equal(z, x)
    assert not torch.equal(group.act_in((1, 0), x), x)


def test_bad_image_group_name():
    with pytest.raises(ValueError, match="allowed: 'C4', 'D4'"):
        ImageGroup("C8")


def test_trivial_group():
    g = TrivialGroup()
    x = torch.randn(3, 2)
    assert g.order == 1 and torch.equal(g.act_in(g.identity(), x), x)


MATRIX_GROUPS = {
    "SO(2)": lambda: OrthogonalGroup(2, "v", "invariant", special=True),
    "O(3)": lambda: OrthogonalGroup(3, "s,v", "matrix"),
    "O(5)": lambda: OrthogonalGroup(5, "v", "invariant"),
    "O(2)_z": lambda: AxialO2Group("s,v", "matrix"),
    "O(1,3)": lambda: LorentzGroup("v", "invariant", max_rapidity=1.0),
    "O(5)xS16": lambda: OrthogonalGroup(5, "v", "invariant", n_perm=16),
    "E(3)xS5": lambda: OrthogonalGroup(3, "p,v,s", "p", translations=True, n_perm=5),
}
INPUT_SHAPES = {"SO(2)": (4, 3, 2), "O(3)": (4, 5, 4), "O(5)": (4, 2, 5), "O(2)_z": (4, 5, 4), "O(1,3)": (4, 4, 4),
                "O(5)xS16": (4, 16, 5), "E(3)xS5": (4, 5, 7)}


def _metric(group: MatrixGroup) -> torch.Tensor:
    return MINKOWSKI if isinstance(group, LorentzGroup) else torch.eye(group.d)


def _linear(group: MatrixGroup, g) -> torch.Tensor:
    return group._parts(g)[0]


@pytest.mark.parametrize("name", sorted(MATRIX_GROUPS))
def test_samples_preserve_the_form(name):
    group = MATRIX_GROUPS[name]()
    eta = _metric(group)
    for g in group.sample(16, torch.Generator().manual_seed(1)):
        r = _linear(group, g)
        assert torch.allclose(r.T @ eta @ r, eta, atol=1e-4), name
    if name == "SO(2)":
        dets = torch.stack([torch.linalg.det(_linear(group, g)) for g in group.sample(16)])
        assert torch.allclose(dets, torch.ones(16), atol=1e-5)


@pytest.mark.parametrize("name", sorted(MATRIX_GROUPS))
def test_matrix_group_is_an_action(name):
    group = MATRIX_GROUPS[name]()
    x = torch.randn(INPUT_SHAPES[name], dtype=torch.float64)
    assert torch.equal(group.act_in(group.identity(), x), x)
    g, h = group.sample(2, torch.Generator().manual_seed(2))
    gh = group.compose(g, h)
    assert torch.allclose(group.act_in(gh, x), group.act_in(g, group.act_in(h, x)), atol=1e-5)
    assert torch.allclose(group.act_in(group.inverse(g), group.act_in(g, x)), x, atol=1e-4)
    assert not torch.allclose(group.act_in(g, x), x, atol=1e-3)  # it does move things


@pytest.mark.parametrize("name", sorted(MATRIX_GROUPS))
def test_exp_of_generators_are_group_elements(name):
    group = MATRIX_GROUPS[name]()
    eta = _metric(group)
    gens = group.generators()
    k = {"SO(2)": 1, "O(3)": 3, "O(5)": 10, "O(2)_z": 1, "O(1,3)": 6, "O(5)xS16": 10, "E(3)xS5": 6}[name]
    assert gens.shape[0] == k
    coeffs = torch.randn(k, generator=torch.Generator().manual_seed(3))
    for a in list(gens) + [torch.einsum("k,kij->ij", coeffs, gens)]:
        r = _linear(group, group.exp(0.7 * a))
        assert torch.allclose(r.T @ eta @ r, eta, atol=1e-4), name
        assert torch.linalg.det(r) > 0  # exp lands in the identity component


@pytest.mark.parametrize("name", sorted(MATRIX_GROUPS))
def test_lie_derivative_of_the_action_is_the_generator(name):
    """d/dt act_in(exp(tA), x) at t=0 exists through autograd and equals the infinitesimal action."""
    group = MATRIX_GROUPS[name]()
    x = torch.randn(INPUT_SHAPES[name], dtype=torch.float64)
    for a in group.generators().double():
        t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        out = group.act_in(group.exp(t * a), x)
        (grad,) = torch.autograd.grad(out, t, grad_outputs=torch.ones_like(out))
        eps = 1e-6
        fd = (group.act_in(group.exp(eps * a), x) - group.act_in(group.exp(-eps * a), x)).sum() / (2 * eps)
        assert torch.isclose(grad, fd, atol=1e-5, rtol=1e-5)


def test_euclidean_translation_generators_translate_positions_only():
    group = OrthogonalGroup(3, "p,v,s", "p", translations=True)
    x = torch.randn(2, 5, 7)
    shifted = group.act_in(group.exp(2.0 * group.generators()[3]), x)  # translation along x
    assert torch.allclose(shifted[..., 0], x[..., 0] + 2.0)
    assert torch.allclose(shifted[..., 1:], x[..., 1:])


def test_haar_orthogonal_is_unbiased():
    q = haar_orthogonal(4000, 3, torch.Generator().manual_seed(0))
    assert q.mean(0).abs().max() < 0.06  # E[Q] = 0 under Haar
    frac_reflections = (torch.linalg.det(q) < 0).float().mean()
    assert 0.45 < frac_reflections < 0.55
    # each column is uniform on the sphere: E[q q^T] = I / 3
    cols = q[:, :, 0]
    assert torch.allclose(cols.T @ cols / len(cols), torch.eye(3) / 3, atol=0.03)


def test_lorentz_sampler_covers_all_four_components_and_bounds_rapidity():
    group = LorentzGroup(max_rapidity=0.5)
    rs = torch.stack(group.sample(400, torch.Generator().manual_seed(0)))
    det_sign = torch.sign(torch.linalg.det(rs))
    time_sign = torch.sign(rs[:, 0, 0])
    assert {(int(a), int(b)) for a, b in zip(det_sign, time_sign)} == {(1, 1), (1, -1), (-1, 1), (-1, -1)}
    assert (rs[:, 0, 0].abs() <= torch.cosh(torch.tensor(0.5)) + 1e-5).all()


def test_permutation_factor_permutes_points_and_leaves_invariant_outputs():
    group = OrthogonalGroup(5, "v", "invariant", n_perm=16)
    x = torch.randn(3, 16, 5)
    r, perm = group.sample(1, torch.Generator().manual_seed(4))[0]
    assert torch.allclose(group.act_in((r, perm), x), (x @ r.T)[:, perm])
    y = torch.randn(3, 1)
    assert torch.equal(group.act_out((r, perm), y), y)


def test_element_list_enumerates_finite_and_samples_lie():
    assert len(element_list(ImageGroup("D4"), 5)) == 8
    assert len(element_list(OrthogonalGroup(3), 5)) == 5


def test_bad_layout_names_the_field():
    with pytest.raises(ValueError, match="layout='q'"):
        OrthogonalGroup(3, "q")
