"""zoos.popgeometry: an EGNN layer's pair features and coordinate step equal the torch ops, forward and backward
(Triton's interpreter on the CPU, as tests/conftest.py sets it), and stay E(n)-equivariant."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from zoos import popgeometry

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not popgeometry.available(DEVICE), reason="needs Triton (GPU or TRITON_INTERPRET=1)")


def _inputs(graphs, n, dims, attrs, seed):
    """(x, attr, c) in float64 on the CPU: points apart from each other (the distance's gradient is finite)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(graphs, n, dims, generator=g, dtype=torch.float64)
    return x, torch.randn(graphs, n, n, attrs, generator=g, dtype=torch.float64), \
        torch.randn(graphs, n, n, 1, generator=g, dtype=torch.float64)


def _leaves(*ts):
    """float32 copies on the device, requiring grad."""
    return [t.to(DEVICE, torch.float32).requires_grad_() for t in ts]


@settings(max_examples=12, deadline=None)
@example(graphs=6, n=5, dims=3, attrs=1, seed=0)  # EGNN on n-body
@example(graphs=1, n=popgeometry.MAX_NODES, dims=2, attrs=0, seed=1)  # one graph a program, no attributes
@example(graphs=0, n=4, dims=3, attrs=2, seed=2)  # no graphs
@example(graphs=3, n=2, dims=popgeometry.MAX_DIMS, attrs=popgeometry.MAX_ATTRS, seed=3)
@given(graphs=st.integers(0, 9), n=st.integers(2, 20), dims=st.integers(1, 5), attrs=st.integers(0, 3),
       seed=st.integers(0, 99))
def test_pair_features_and_step_equal_the_torch_ops(graphs, n, dims, attrs, seed):
    """geo and the step and the gradients of x, attr and c (float32 kernels against float64 torch ops; any point
    count, dimension and attribute count within the limits, graphs blocked many or one a program, none)."""
    x, attr, c = _inputs(graphs, n, dims, attrs, seed)
    xk, ak, ck = _leaves(x, attr, c)
    xr, ar, cr = (t.clone().requires_grad_() for t in (x, attr, c))
    got = popgeometry.pair_features(xk, ak), popgeometry.coordinate_step(xk, ck)
    want = popgeometry.pair_reference(xr, ar), popgeometry.step_reference(xr, cr)
    assert got[0].dtype == got[1].dtype == torch.float32
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double().cpu(), b, atol=1e-5 * max(1.0, b.abs().max().item() if b.numel() else 1),
                                   rtol=1e-5)
    g = torch.Generator().manual_seed(seed + 1)
    weights = [torch.randn(b.shape, generator=g, dtype=torch.float64) for b in want]
    loss = lambda outs: sum((o.double().cpu() * w).sum() for o, w in zip(outs, weights))  # noqa: E731
    got_grads = torch.autograd.grad(loss(got), [xk, ak, ck])
    want_grads = torch.autograd.grad(loss(want), [xr, ar, cr])
    for name, a, b in zip(("x", "attr", "c"), got_grads, want_grads):
        assert a.dtype == torch.float32, name
        scale = b.abs().max().item() if b.numel() else 1.0
        torch.testing.assert_close(a.double().cpu(), b, atol=1e-5 * max(1.0, scale), rtol=1e-5, msg=name)


def test_pair_features_in_the_callers_dtype_and_c_gradient_in_its_own():
    """geo in the dtype asked for (the edge MLP's bf16) from float32 points; c's gradient in c's dtype, x's in x's."""
    x, attr, c = _inputs(4, 5, 3, 1, 0)
    xk, ak = _leaves(x, attr)
    ck = c.to(DEVICE, torch.bfloat16).requires_grad_()
    geo = popgeometry.pair_features(xk, ak, torch.bfloat16)
    assert geo.dtype == torch.bfloat16
    # within a bf16 rounding (the interpreter truncates: 2**-7)
    torch.testing.assert_close(geo.float().cpu(), popgeometry.pair_reference(x, attr).float(), atol=0, rtol=2 ** -7)
    step = popgeometry.coordinate_step(xk, ck)
    assert step.dtype == torch.float32
    dx, dc = torch.autograd.grad(step.sum(), [xk, ck])
    assert (dx.dtype, dc.dtype) == (torch.float32, torch.bfloat16)
    assert (dc[:, range(5), range(5)] == 0).all()  # no self-messages


def test_step_is_equivariant_and_features_invariant():
    """Rotating and translating the points rotates the step and leaves the pair features unchanged (float32)."""
    x, attr, c = _inputs(5, 6, 3, 2, 4)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    moved = x @ q.T + torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    on = lambda t: t.to(DEVICE, torch.float32)  # noqa: E731
    geo, step = popgeometry.pair_features(on(x), on(attr)), popgeometry.coordinate_step(on(x), on(c))
    geo2, step2 = popgeometry.pair_features(on(moved), on(attr)), popgeometry.coordinate_step(on(moved), on(c))
    torch.testing.assert_close(geo2, geo, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(step2.double().cpu(), step.double().cpu() @ q.T, atol=1e-5, rtol=1e-5)


def test_ops_pass_torch_library_opcheck():
    x, attr, c = (t.to(DEVICE, torch.float32) for t in _inputs(3, 4, 3, 2, 0))
    torch.library.opcheck(popgeometry._pair.op, (x, attr, torch.float32))
    torch.library.opcheck(popgeometry._step.op, (x, c))


def test_bad_shapes_and_sizes_are_named():
    x, attr, c = (t.float() for t in _inputs(2, 5, 3, 1, 0))
    with pytest.raises(ValueError, match=r"x \[\.\.\., n, D\] and attr \[\.\.\., n, n, A\] disagree: x \(2, 5, 3\), "
                                         r"attr \(2, 5, 4, 1\)"):
        popgeometry.pair_features(x, attr[:, :, :4])
    with pytest.raises(ValueError, match=r"and c \[\.\.\., n, n, 1\] disagree: x \(2, 5, 3\), c \(2, 5, 5, 2\)"):
        popgeometry.coordinate_step(x, c.expand(2, 5, 5, 2))
    with pytest.raises(ValueError, match=r"2 to 64 points of 1 to 16 coordinates .* got 65 points of 3"):
        popgeometry.coordinate_step(torch.zeros(1, 65, 3), torch.zeros(1, 65, 65, 1))
    with pytest.raises(ValueError, match=r"got 5 points of 3, 16 attributes"):
        popgeometry.pair_features(x, torch.zeros(2, 5, 5, 16))
