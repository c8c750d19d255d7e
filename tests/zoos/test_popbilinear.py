"""zoos.popbilinear: a product over a constant table of terms equals the dense product it stands for (a Clifford
algebra's x @ [I; R(y)]), forward and both gradients (Triton's interpreter on the CPU, as tests/conftest.py sets it)."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from zoos import popbilinear
from zoos.archs.clifford import CliffordAlgebra

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not popbilinear.available(DEVICE), reason="needs Triton (GPU or TRITON_INTERPRET=1)")

METRICS = [(1.0, 1.0, 1.0), (1.0, -1.0, -1.0, -1.0), (1.0, 1.0, 1.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0,)]


def operands(alg, sets, points, channels, sizes, identity, shared, transposed, seed, dtype=torch.float64):
    """x [S, G, C, identity + a] (a transposed view of [.., a, C] rows, as a layer's linears write it, or
    contiguous) and y [S, G or 1, C, b], both requiring grad."""
    a, b, _ = sizes
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sets, points, identity + a, channels, generator=g, dtype=dtype).to(DEVICE)
    x = x.transpose(-1, -2) if transposed else x.transpose(-1, -2).contiguous()
    y = torch.randn(sets, 1 if shared else points, channels, b, generator=g, dtype=dtype).to(DEVICE)
    return x.requires_grad_(), y.requires_grad_()


@settings(max_examples=10, deadline=None)
@example(metric=4, top_in=2, top_out=4, identity=True, sets=3, points=16, channels=16, shared=True, transposed=True,
         gate=True, blocks=3, sums=True, seed=0)
@example(metric=1, top_in=1, top_out=0, identity=False, sets=5, points=1, channels=3, shared=False, transposed=False,
         gate=False, blocks=1, sums=False, seed=1)
@example(metric=0, top_in=1, top_out=2, identity=True, sets=3, points=9, channels=20, shared=True, transposed=True,
         gate=True, blocks=2, sums=True, seed=2)  # a set's 16 padded points leave 16 channels a program: two channel blocks
@given(metric=st.integers(0, len(METRICS) - 1), top_in=st.integers(0, 2), top_out=st.integers(0, 4),
       identity=st.booleans(), sets=st.integers(0, 6), points=st.integers(1, 9), channels=st.integers(1, 20),
       shared=st.booleans(), transposed=st.booleans(), gate=st.booleans(), blocks=st.integers(1, 4),
       sums=st.booleans(), seed=st.integers(0, 99))
def test_product_equals_the_dense_right_multiplication(metric, top_in, top_out, identity, sets, points, channels,
                                                       shared, transposed, gate, blocks, sums, seed):
    """Every metric (Euclidean, Lorentzian, degenerate), grades in and out, a left map added or not, a y shared by a
    set's points (its gradient summed over them) or one a point, points and channels not powers of two, no sets,
    the scalar gate applied in the same pass or not, x whole or in blocks (slices of it, read where they lie), the
    output's sums over each set's points made in the same pass or not (their gradient added to the output's)."""
    alg = CliffordAlgebra(METRICS[metric])
    top_in, top_out = min(top_in, alg.d), min(top_out, alg.d)
    a, k = alg.n_blades[top_in], alg.n_blades[top_out]
    sizes, m = (a, a, k), (alg.n_blades[min(top_in, top_out)] if identity else 0)
    x, y = operands(alg, sets, points, channels, sizes, m, shared, transposed, seed)
    ref = alg.times(x, alg.right_multiplication(y, sizes, m, 0.7), shared)
    if gate:
        ref = ref * torch.sigmoid(ref[..., :1])
    cuts = sorted(torch.randint(0, m + a + 1, (blocks - 1,), generator=torch.Generator().manual_seed(seed)).tolist())
    parts = [x[..., lo:hi] for lo, hi in zip([0] + cuts, cuts + [m + a])] if blocks > 1 else x
    out = popbilinear.product(parts, y, alg.product_table(sizes, m, 0.7), gate=gate, sums=sums)
    z, z_sum = out if sums else (out, None)
    assert z.shape == ref.shape and z.dtype == x.dtype
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)
    outs, refs, grads = [z], [ref], [torch.randn_like(ref)]
    if sums:
        ref_sum = ref.sum(1, keepdim=True)
        assert z_sum.shape == ref_sum.shape and z_sum.dtype == x.dtype
        torch.testing.assert_close(z_sum, ref_sum, rtol=1e-5, atol=1e-5)
        outs, refs, grads = outs + [z_sum], refs + [ref_sum], grads + [torch.randn_like(ref_sum)]
    for got, want in zip(torch.autograd.grad(outs, (x, y), grads), torch.autograd.grad(refs, (x, y), grads)):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_features_give_bf16_products_and_gradients_in_each_input_dtype():
    """bf16 features and a float32 context (as autocast leaves a layer's): z and dx bf16, dy float32, all within
    bf16's rounding of the float64 product."""
    alg = CliffordAlgebra((1.0, 1.0, 1.0))
    sizes = (4, 4, 8)
    x, y = operands(alg, 4, 6, 16, sizes, 4, True, True, 3)
    xb = x.detach().bfloat16().requires_grad_()
    yf = y.detach().float().requires_grad_()
    z = popbilinear.product(xb, yf, alg.product_table(sizes, 4, 0.5))
    ref = alg.times(x, alg.right_multiplication(y, sizes, 4, 0.5), True)
    assert z.dtype == torch.bfloat16
    torch.testing.assert_close(z.double(), ref, rtol=2e-2, atol=5e-2)
    dz = torch.randn_like(ref)
    dx, dy = torch.autograd.grad(z, (xb, yf), dz.bfloat16())
    rx, ry = torch.autograd.grad(ref, (x, y), dz)
    assert dx.dtype == torch.bfloat16 and dy.dtype == torch.float32
    torch.testing.assert_close(dx.double(), rx, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(dy.double(), ry, rtol=2e-2, atol=0.3)


def test_product_passes_torch_library_opcheck():
    """The fake kernels match what the ops return, the autograd registration too (a shared y and one a point)."""
    alg = CliffordAlgebra((1.0, -1.0, 1.0))
    table = alg.product_table((4, 4, 8), 1, 1.0)
    for shared, gate, sums in ((True, False, True), (False, True, False), (True, True, True)):
        x, y = operands(alg, 3, 5, 6, (4, 4, 8), 1, shared, True, 0, dtype=torch.float32)
        for xs in ([x], [x[..., :2], x[..., 2:]]):
            torch.library.opcheck(popbilinear._pop_bilinear.op, (xs, y, table.code, gate, sums))


@pytest.mark.parametrize("gate, sums", [(False, False), (True, False), (True, True)])
def test_a_backward_differentiated_again_equals_the_dense_products(gate, sums):
    """With create_graph (a Hessian-vector product), the gradients are dense torch products, so their own gradients
    exist and equal the dense reference's (with the sets' sums, their gradient too)."""
    alg = CliffordAlgebra((1.0, -1.0, 1.0))
    sizes = (4, 4, 8)
    x, y = operands(alg, 3, 5, 6, sizes, 4, True, True, 2)

    def second(product):
        outs = product(x, y)
        outs = list(outs) if isinstance(outs, tuple) else [outs]
        vs = [torch.linspace(-1, 1, z.numel(), dtype=z.dtype, device=z.device).reshape(z.shape) for z in outs]
        dx, dy = torch.autograd.grad(outs, (x, y), vs, create_graph=True)
        return torch.autograd.grad((dx * dx).sum() + (dy * dy).sum(), (x, y))

    def dense(x, y):
        z = alg.times(x, alg.right_multiplication(y, sizes, 4, 0.5), True)
        z = z * torch.sigmoid(z[..., :1]) if gate else z
        return (z, z.sum(1, keepdim=True)) if sums else z

    got = second(lambda x, y: popbilinear.product(x, y, alg.product_table(sizes, 4, 0.5), gate=gate, sums=sums))
    for g, w in zip(got, second(dense)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_table_is_named_by_its_text_in_any_process():
    """The ops take the table as text (a compiled program that calls them names it, whatever else the process
    made): the text reads back as an equal table, made once."""
    for table in (CliffordAlgebra((1.0, -1.0, 0.0)).product_table((4, 4, 8), 2, 0.25), popbilinear.Table(2, 1, 1, ())):
        code = table.code
        popbilinear._BY_CODE.pop(code)  # as a process that never built the table sees it
        back = popbilinear.Table.of_code(code)
        assert back == table and back is not table and popbilinear.Table.of_code(code) is back


def test_refused_operands_and_terms_name_what_disagrees():
    alg = CliffordAlgebra((1.0, 1.0))
    table = alg.product_table((3, 3, 4))
    x = torch.zeros(2, 3, 5, 3, device=DEVICE)
    with pytest.raises(ValueError, match=r"x \[S, G, C, 3\] \(or blocks of it\) and y \[S, G or 1, C, 3\] disagree: x \(2, 3, 5, 3\), y \(2, 2, 5, 3\)"):
        popbilinear.product(x, torch.zeros(2, 2, 5, 3, device=DEVICE), table)
    with pytest.raises(ValueError, match=r"term \(0, 4, 0\) is outside x \[.., 3\], y \[.., 3\]"):
        popbilinear.Table(3, 3, 4, ((0, 4, 0, 1.0),))


def test_models_use_it_unless_turned_off(monkeypatch):
    """On by default (SYMZOO_POPBILINEAR unset), off with 0 or inside `using(False)`, the outer setting back after
    it; the variable takes 0 or 1 and names any other value."""
    monkeypatch.delenv("SYMZOO_POPBILINEAR", raising=False)
    assert popbilinear._from_environment() is True
    before = popbilinear.enabled()
    with popbilinear.using(False):
        assert not popbilinear.enabled()
        with popbilinear.using():
            assert popbilinear.enabled()
        assert not popbilinear.enabled()
    assert popbilinear.enabled() == before
    monkeypatch.setenv("SYMZOO_POPBILINEAR", "0")
    assert popbilinear._from_environment() is False
    monkeypatch.setenv("SYMZOO_POPBILINEAR", "yes")
    with pytest.raises(ValueError, match="SYMZOO_POPBILINEAR = 'yes' is not allowed; expected 0 or 1"):
        popbilinear._from_environment()


def test_a_model_pickles_and_copies_after_its_products_made_kernels():
    """An algebra pickles and deep-copies as its metric (the receiving process's own algebra of that metric), a
    table as its text: a cgenn whose algebra holds generated kernels and cached tensors still pickles, and the copy
    computes the same function."""
    import copy
    import pickle

    from tasks import get_task
    from zoos.archs import build_arch

    task = get_task("convex_hull", n_train=8, n_val=4, n_test=4)
    model = build_arch("cgenn", task).double()
    x = task.load("train", 0)[0][:3].double()
    want = model(x)  # the dense products cache their tables
    table = model.algebra.product_table((6, 6, 16), 6, 0.5)
    table.kernel("z", ((12,), (6,), (16,)), False, "forward", 0)  # a generated kernel on a table the algebra keeps
    back = pickle.loads(pickle.dumps(model))
    assert back.algebra is model.algebra  # this process's algebra of the metric
    torch.testing.assert_close(back(x), want, rtol=0, atol=0)
    assert copy.deepcopy(model).algebra is model.algebra
    assert pickle.loads(pickle.dumps(table)) == table
