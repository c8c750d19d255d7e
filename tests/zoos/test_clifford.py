"""The Clifford algebra of zoos.archs.clifford: known products, associativity, the quadratic form, and the
geometric product's equivariance under the outermorphism of an O(p,q) matrix."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from zoos.archs.clifford import CliffordAlgebra, MVLinear, grade_rows, scalar_gate

METRICS = [(1.0, 1.0, 1.0), (1.0, -1.0, -1.0, -1.0), (1.0, 1.0, 1.0, 1.0, 1.0), (1.0, -1.0, 0.0)]


def _basis(alg: CliffordAlgebra, k: int) -> torch.Tensor:
    e = torch.zeros(alg.n, dtype=torch.float64)
    e[k] = 1.0
    return e


@pytest.mark.parametrize("metric", METRICS)
def test_known_products(metric):
    alg = CliffordAlgebra(metric)
    gp = alg.geometric_product
    e1, e2, e12 = (_basis(alg, alg.blade(*a)) for a in ((0,), (1,), (0, 1)))
    assert torch.equal(gp(e1, e1), metric[0] * _basis(alg, 0))
    assert torch.equal(gp(e1, e2), e12)
    assert torch.equal(gp(e2, e1), -e12)
    assert torch.equal(gp(e12, e12), -metric[0] * metric[1] * _basis(alg, 0))
    table = alg.cayley()
    for i, j in itertools.product(range(alg.n), repeat=2):  # the dense table is the product of basis blades
        assert torch.equal(table[i, j], gp(_basis(alg, i), _basis(alg, j)))


@pytest.mark.parametrize("metric", METRICS)
def test_associative_and_the_quadratic_form_of_a_vector(metric):
    alg = CliffordAlgebra(metric)
    g = torch.Generator().manual_seed(0)
    x, y, z = torch.randn(3, 7, alg.n, generator=g, dtype=torch.float64)
    gp = alg.geometric_product
    torch.testing.assert_close(gp(gp(x, y), z), gp(x, gp(y, z)))
    v = torch.zeros(7, alg.n, dtype=torch.float64)
    v[:, 1 : 1 + alg.d] = torch.randn(7, alg.d, generator=g, dtype=torch.float64)
    q = (v[:, 1 : 1 + alg.d] ** 2 * torch.tensor(metric, dtype=torch.float64)).sum(-1)
    vv = gp(v, v)
    torch.testing.assert_close(vv[:, 0], q)  # v v = q(v), a scalar
    torch.testing.assert_close(vv[:, 1:], torch.zeros_like(vv[:, 1:]))
    torch.testing.assert_close(alg.quadratic(v)[:, 1], q)


@settings(max_examples=25, deadline=None)
@given(metric=st.sampled_from(METRICS), grades=st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 5)),
       points=st.integers(1, 4), shared=st.booleans(), seed=st.integers(0, 2**16))
def test_a_product_of_leading_blades_equals_the_full_product_truncated(metric, grades, points, shared, seed):
    """x y from x's first a and y's first b blades, only the first k computed (a layer's grades), with y one
    multivector for every point (a set's context) or its own per point: the full product of the zero-padded
    multivectors, truncated."""
    alg = CliffordAlgebra(metric)
    a, b, k = (alg.n_blades[min(g, alg.d)] for g in grades)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, points, 3, a, generator=g, dtype=torch.float64)
    y = torch.randn(2, 1 if shared else points, 3, b, generator=g, dtype=torch.float64)
    full = alg.geometric_product(F.pad(x, (0, alg.n - a)), F.pad(y, (0, alg.n - b)).expand(2, points, 3, alg.n))
    torch.testing.assert_close(alg.geometric_product(x, y, (a, b, k), shared=shared), full[..., :k])


@settings(max_examples=25, deadline=None)
@given(metric=st.sampled_from(METRICS), grades=st.tuples(st.integers(0, 5), st.integers(0, 5)),
       points=st.integers(1, 4), shared=st.booleans(), scale=st.floats(0.1, 2.0), seed=st.integers(0, 2**16))
def test_a_product_with_an_identity_block_adds_the_leading_features(metric, grades, points, shared, scale, seed):
    """[z, x] @ right_multiplication(y, (a, a, k), m, s) = s (z padded to k blades + (x y)[:k]): a layer's sum of
    its left map and its product as one product."""
    alg = CliffordAlgebra(metric)
    a, k = (alg.n_blades[min(g, alg.d)] for g in grades)
    m = alg.n_blades[min(*grades, alg.d)]  # the left map's grades: those of both
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, points, 3, m, generator=g, dtype=torch.float64)
    x = torch.randn(2, points, 3, a, generator=g, dtype=torch.float64)
    y = torch.randn(2, 1 if shared else points, 3, a, generator=g, dtype=torch.float64)
    right = alg.right_multiplication(y, (a, a, k), m, scale)
    expected = scale * (F.pad(z, (0, k - m)) + alg.geometric_product(x, y, (a, a, k), shared=shared))
    torch.testing.assert_close(alg.times(torch.cat([z, x], -1), right, shared), expected)


@pytest.mark.parametrize("metric", METRICS[1:3])
def test_a_grade_wise_linear_maps_each_grade_by_its_own_linear(metric):
    """MVLinear (the grades split once, channels last) equals one nn.Linear per grade's slice of blades."""
    alg = CliffordAlgebra(metric)
    torch.manual_seed(0)
    top = min(2, alg.d)
    lin = MVLinear(alg, 3, 4, top).double()
    x = torch.randn(5, 2, 3, alg.n_blades[top], dtype=torch.float64)
    nb = alg.n_blades
    expected = torch.cat([layer(x[..., nb[g - 1] if g else 0 : nb[g]].transpose(-1, -2)).transpose(-1, -2)
                          for g, layer in enumerate(lin.grades)], -1)
    torch.testing.assert_close(lin(x), expected)
    parts = alg.grade_parts(x, top)
    assert [p.shape[-2] for p in parts] == [nb[g] - (nb[g - 1] if g else 0) for g in range(top + 1)]
    assert all(p.is_contiguous() for p in parts)


def outermorphism(alg: CliffordAlgebra, m: torch.Tensor) -> torch.Tensor:
    """[n, n] matrix of the outermorphism of m [d, d]: e_A -> wedge of m's columns over A (minors)."""
    out = torch.zeros(alg.n, alg.n, dtype=m.dtype)
    for a, mask_a in enumerate(alg.masks):
        cols = [i for i in range(alg.d) if mask_a >> i & 1]
        for b, mask_b in enumerate(alg.masks):
            rows = [i for i in range(alg.d) if mask_b >> i & 1]
            if len(rows) == len(cols):
                out[b, a] = torch.linalg.det(m[rows][:, cols]) if rows else 1.0
    return out


def _form_preserving(metric: tuple[float, ...], g: torch.Generator) -> torch.Tensor:
    """A random element of O(p,q), float64: exp(eta W) for antisymmetric W (in o(p,q)), then a reflection of axis 0."""
    eta = torch.diag(torch.tensor(metric, dtype=torch.float64))
    w = torch.randn(len(metric), len(metric), generator=g, dtype=torch.float64)
    reflect = torch.ones(len(metric), dtype=torch.float64)
    reflect[0] = -1.0
    return torch.linalg.matrix_exp(eta @ (w - w.T) / 2) @ torch.diag(reflect)


@pytest.mark.parametrize("metric", METRICS[:3])
def test_geometric_product_is_equivariant_under_the_outermorphism(metric):
    alg = CliffordAlgebra(metric)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 5, alg.n, generator=g, dtype=torch.float64)
    eta = torch.diag(torch.tensor(metric, dtype=torch.float64))
    gp = alg.geometric_product
    for _ in range(4):
        m = _form_preserving(metric, g)
        torch.testing.assert_close(m.T @ eta @ m, eta)  # m preserves the quadratic form
        rho = outermorphism(alg, m)
        torch.testing.assert_close(gp(x @ rho.T, y @ rho.T), gp(x, y) @ rho.T)
        torch.testing.assert_close(alg.quadratic(x @ rho.T), alg.quadratic(x))


def test_the_scalar_gate_equals_its_expression_and_its_gradient():
    """`scalar_gate`'s one-pass backward is autograd's (gradcheck in float64; differentiable again, for a Hessian),
    and under vmap it is the plain expression (torch.func has no rule for its autograd.Function)."""
    torch.manual_seed(0)
    h = torch.randn(3, 4, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(scalar_gate, (h,))
    assert torch.autograd.gradgradcheck(scalar_gate, (h,))
    ref = h * torch.sigmoid(h[..., :1])
    g = torch.randn_like(ref)
    torch.testing.assert_close(scalar_gate(h), ref, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(scalar_gate(h), h, g)[0], torch.autograd.grad(ref, h, g)[0])
    per_row = torch.func.vmap(torch.func.grad(lambda x: (scalar_gate(x) * x).sum()))(h.detach())
    torch.testing.assert_close(per_row, torch.func.vmap(torch.func.grad(lambda x: (x * torch.sigmoid(x[..., :1]) * x).sum()))(h.detach()))


def test_the_right_multiplication_table_is_made_once_and_not_kept_from_inside_torch_func():
    """R's constant table is one tensor per dtype and device, reused by every call (a step replayed as a CUDA graph
    may not copy from the host), and a table made inside torch.func's transforms is not kept (it is theirs): a
    product after a vmapped gradient still runs, on a table made outside."""
    alg = CliffordAlgebra((1.0, -1.0, 1.0))
    y = torch.randn(4, 2, 3, dtype=torch.float64)
    p = torch.randn(4, 2, 3, dtype=torch.float64)
    torch.func.vmap(torch.func.grad(lambda p, y: alg.right_multiplication(y * p, (4, 3, 8), 4, 0.5).sum()))(p, y)
    assert not [k for k in alg._tables if k[0] == "right"]
    alg.right_multiplication(y, (4, 3, 8), 4, 0.5)
    made = [v for k, v in alg._tables.items() if k[0] == "right"]
    assert len(made) == 1
    q = p.clone().requires_grad_()
    alg.right_multiplication(y * q, (4, 3, 8), 4, 0.5).sum().backward()
    assert q.grad is not None and [v for k, v in alg._tables.items() if k[0] == "right"] == made
    alg.right_multiplication(y.float(), (4, 3, 8), 4, 0.5)
    assert len([k for k in alg._tables if k[0] == "right"]) == 2  # one a dtype


@pytest.mark.parametrize("channels_inner", [True, False])
def test_grade_rows_equal_the_split_and_its_gradient_comes_blades_major(channels_inner):
    """The grades' rows of x [.., C, blades] are the split's parts, transposed; their gradients (one part unread)
    equal autograd's for the split, in x's [.., blades, C] memory layout, and differentiate again."""
    gen = torch.Generator().manual_seed(0)
    sizes = (1, 3, 3, 1)
    memory = torch.randn(2, 5, 8, 6, dtype=torch.float64, generator=gen)  # [.., blades, C]
    x = (memory.transpose(-1, -2) if channels_inner else memory.transpose(-1, -2).contiguous()).requires_grad_()
    weights = [torch.randn(n, 6, dtype=torch.float64, generator=gen) for n in sizes]

    def loss(parts):
        return sum((p * w).pow(2).sum() for p, w in zip(parts[:3], weights))  # the top grade unread

    rows = grade_rows(x, sizes)
    plain = [part.transpose(-1, -2) for part in x.split(sizes, -1)]
    assert all(torch.equal(r, p) for r, p in zip(rows, plain))
    (dx,) = torch.autograd.grad(loss(rows), x, create_graph=True)
    (want,) = torch.autograd.grad(loss(plain), x, create_graph=True)
    torch.testing.assert_close(dx, want, rtol=0, atol=0)
    assert dx.stride(-2) == 1  # channels innermost
    (d2,) = torch.autograd.grad(dx.pow(2).sum(), x)
    (want2,) = torch.autograd.grad(want.pow(2).sum(), x)
    torch.testing.assert_close(d2, want2)
