"""zoos.popnorm: GroupNorm with one group and each model's affine equals per-model F.group_norm, forward and
backward, in either memory format (Triton's interpreter on the CPU, as tests/conftest.py sets it)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from zoos import popnorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not popnorm.available(DEVICE), reason="needs Triton (GPU or TRITON_INTERPRET=1)")


ROWS = ["one tile", "in passes"]


@contextlib.contextmanager
def rows_read(how: str, c: int, pixels: int):
    """GroupNorm's rows as one tile each (the default for these shapes, checked) or "in passes" of 32-element tiles."""
    saved = popnorm.NORM_ROW_TILE, popnorm.NORM_TILE
    if how == "in passes":
        popnorm.NORM_ROW_TILE, popnorm.NORM_TILE = 0, 32
    try:
        assert popnorm._blocks(c, pixels)[2] == (how == "one tile")
        yield
    finally:
        popnorm.NORM_ROW_TILE, popnorm.NORM_TILE = saved


def per_model(x, w, b, n, eps):
    """Model i's F.group_norm(., 1) with its own affine, in float32, on its rows of x (the affine applied by
    hand: torch's group_norm backward fails for a bias without a weight)."""
    out = []
    for i, xi in enumerate(x.float().chunk(n)):
        shape = (1, -1, *[1] * (x.dim() - 2))
        yi = F.group_norm(xi, 1, None, None, eps)
        yi = yi * w[i].view(shape) if w is not None else yi
        out.append(yi + b[i].view(shape) if b is not None else yi)
    return torch.cat(out)


@pytest.mark.parametrize("rows", ROWS)
@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 3), batch=st.integers(1, 3), c=st.integers(1, 20), h=st.integers(2, 6), w_=st.integers(1, 6),
       cl=st.booleans(), affine=st.sampled_from(["both", "weight", "bias"]), seed=st.integers(0, 99))
def test_group_norm1_equals_per_model_group_norm(rows, n, batch, c, h, w_, cl, affine, seed):
    """Output (float32, in x's layout) and the gradients of x, w and b; shifted inputs (a mean far from 0)."""
    with rows_read(rows, c, h * w_):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(n * batch, c, h, w_, generator=g) * 3 + 5).to(DEVICE)
        x = (x.contiguous(memory_format=torch.channels_last) if cl else x).requires_grad_()
        w = torch.randn(n, c, generator=g).to(DEVICE).requires_grad_() if affine != "bias" else None
        b = torch.randn(n, c, generator=g).to(DEVICE).requires_grad_() if affine != "weight" else None
        y = popnorm.group_norm1(x, w, b, 1e-5)
        assert y.dtype == torch.float32 and y.stride() == torch.empty_like(x).stride()
        want = per_model(x, w, b, n, 1e-5)
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
        dy = torch.randn(want.shape, generator=g).to(DEVICE)
        wrt = [t for t in (x, w, b) if t is not None]
        for got, ref in zip(torch.autograd.grad(y, wrt, dy), torch.autograd.grad(want, wrt, dy)):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("rows", ROWS)
@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 3), batch=st.integers(1, 3), c=st.integers(1, 20), hw=st.integers(2, 30), cl=st.booleans(),
       act=st.sampled_from(["identity", "relu", "leaky_relu"]), residual=st.booleans(),
       out_dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 99))
def test_group_norm1_with_residual_and_activation_folded_in(rows, n, batch, c, hw, cl, act, residual, out_dtype, seed):
    """act(norm(x) + residual), stored in float32 or bf16, equals the unfused ops computed in float32 and cast
    (what autocast gives a conv reading it); the gradients of x, w, b and the residual equal theirs."""
    with rows_read(rows, c, hw * 2):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(n * batch, c, hw, 2, generator=g) * 3 + 5).to(DEVICE)
        x = (x.contiguous(memory_format=torch.channels_last) if cl else x).requires_grad_()
        w, b = (torch.randn(n, c, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
        res = torch.randn(x.shape, generator=g).to(DEVICE).requires_grad_() if residual else None
        slope = 0.1 if act == "leaky_relu" else 0.0
        y = popnorm.group_norm1(x, w, b, 1e-5, residual=res, act=act, slope=slope, out_dtype=out_dtype)
        assert y.dtype == out_dtype and y.stride() == torch.empty_like(x).stride()
        z = per_model(x, w, b, n, 1e-5) + (res if residual else 0)
        want = (z if act == "identity" else F.leaky_relu(z, slope)).to(out_dtype)
        torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4 if out_dtype == torch.float32 else 1e-2)
        dy = torch.randn(want.shape, generator=g).to(DEVICE).to(out_dtype)
        wrt = [t for t in (x, w, b, res) if t is not None]
        for got, ref in zip(torch.autograd.grad(y, wrt, dy), torch.autograd.grad(want, wrt, dy)):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("rows", ROWS)
@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 3), batch=st.integers(1, 3), c=st.integers(1, 20), hw=st.integers(2, 6), cl=st.booleans(),
       act=st.sampled_from(["identity", "relu", "leaky_relu"]), read=st.sampled_from(["both", "y", "copy"]),
       seed=st.integers(0, 99))
def test_group_norm1_writes_a_copy_in_the_compute_dtype_and_sums_both_gradients(rows, n, batch, c, hw, cl, act, read, seed):
    """copy_dtype=bf16: (y, y.to(bf16)) from one pass, y equal to the float32 output without a copy (to float32
    rounding: the two are compiled apart) and the copy y's cast; the gradients of x, w, b and the residual equal
    those of the output and the cast read by two readers (either alone too)."""
    with rows_read(rows, c, hw * 3):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(n * batch, c, hw, 3, generator=g) * 3 + 5).to(DEVICE)
        x = (x.contiguous(memory_format=torch.channels_last) if cl else x).requires_grad_()
        w, b = (torch.randn(n, c, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
        res = torch.randn(x.shape, generator=g).to(DEVICE).requires_grad_()
        slope = 0.1 if act == "leaky_relu" else 0.0
        y, y2 = popnorm.group_norm1(x, w, b, 1e-5, residual=res, act=act, slope=slope, copy_dtype=torch.bfloat16)
        ref = popnorm.group_norm1(x, w, b, 1e-5, residual=res, act=act, slope=slope)
        ref2 = ref.to(torch.bfloat16)
        assert y2.dtype == torch.bfloat16 and y2.stride() == torch.empty_like(x).stride()
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y2, y.to(torch.bfloat16), atol=0, rtol=0 if DEVICE == "cuda" else 1e-2)  # the interpreter truncates
        d1 = torch.randn(y.shape, generator=g).to(DEVICE)
        d2 = torch.randn(y.shape, generator=g).to(DEVICE).to(torch.bfloat16)
        outs, refs, grads = {"both": ([y, y2], [ref, ref2], [d1, d2]), "y": ([y], [ref], [d1]),
                             "copy": ([y2], [ref2], [d2])}[read]
        wrt = (x, w, b, res)
        for got, want in zip(torch.autograd.grad(outs, wrt, grads), torch.autograd.grad(refs, wrt, grads)):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


class _Block(torch.nn.Module):
    """A residual block's end: h = relu(norm(conv(x))) read by a conv and by the next norm's residual add."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1)
        self.norm1, self.norm2 = torch.nn.GroupNorm(1, 4), torch.nn.GroupNorm(1, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        h = F.relu(self.norm1(self.conv1(x)))
        return self.head(F.relu(self.norm2(self.conv2(h)) + h).mean(dim=(-2, -1)))


def test_a_bf16_program_reads_the_norms_copy_where_a_conv_and_an_add_read_it():
    """In a bf16 program a norm read by a conv and by an add is stored in float32 with a bf16 copy the conv reads
    (no cast of its own); float32 programs make no copy; on a GPU the bf16 program's gradients follow vmap's under
    autocast."""
    from torch.func import functional_call, grad, vmap

    from zoos.fastpop import FastPopulation, FastStep
    from zoos.functional import stack_states, template

    module = template(_Block())
    calls = lambda pop: [(n.target.__name__, n.kwargs) for n in pop.graph_module.graph.nodes if n.op == "call_function"]
    bf16 = FastPopulation(module, (3, 6, 6), kernels=True, dtype=torch.bfloat16, dropout=False)
    norms = [kw for name, kw in calls(bf16) if name == "group_norm1"]
    assert [(kw["out_dtype"], kw.get("copy_dtype")) for kw in norms] == [(torch.float32, torch.bfloat16), (torch.float32, None)]
    assert not [n for n in bf16.graph_module.graph.nodes if n.op == "call_method" and n.target == "to"
                and n.args[0].target is __import__("operator").getitem]
    f32 = FastPopulation(module, (3, 6, 6), kernels=True, dropout=False)
    assert all("copy_dtype" not in kw for name, kw in calls(f32) if name == "group_norm1")
    if DEVICE != "cuda":  # the interpreter's bf16 products are not a GPU's (the op's own test checks the copy here)
        return
    params, buffers = stack_states([_Block().to(DEVICE) for _ in range(2)])
    x, y = torch.randn(2, 3, 3, 6, 6, device=DEVICE), torch.randint(0, 2, (2, 3), device=DEVICE)
    grads, _ = FastStep(module, F.cross_entropy, (3, 6, 6), dtype=torch.bfloat16, dropout=False, kernels=True)(
        params, buffers, x, y)

    def one(p, b, xb, yb):
        return F.cross_entropy(functional_call(module, (p, b), (xb,)).float(), yb)

    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        want = vmap(grad(one))(params, buffers, x, y)
    for k in want:  # bf16 products (the interpreter's are not a GPU's): to a few percent of each gradient's norm
        assert (grads[k] - want[k]).norm() <= 0.05 * want[k].norm() + 1e-6, k


def test_group_norm1_refuses_an_activation_it_cannot_fold_and_a_residual_of_another_shape():
    x, w = torch.randn(4, 3, 2, 2, device=DEVICE), torch.ones(2, 3, device=DEVICE)
    with pytest.raises(ValueError, match="act 'tanh' does not fold into the norm; allowed: identity, relu, leaky_relu"):
        popnorm.group_norm1(x, w, None, act="tanh")
    with pytest.raises(ValueError, match=r"the residual \(4, 3, 2\) is not shaped as x \(4, 3, 2, 2\)"):
        popnorm.group_norm1(x, w, None, residual=x[..., 0])


def test_group_norm1_on_rows_of_any_rank_and_bf16_input():
    """[N*B, C, L] rows and a bf16 input (dx comes back bf16, the output float32)."""
    x = torch.randn(4, 6, 10, device=DEVICE).to(torch.bfloat16).requires_grad_()
    w, b = torch.randn(2, 6, device=DEVICE, requires_grad=True), torch.randn(2, 6, device=DEVICE, requires_grad=True)
    y = popnorm.group_norm1(x, w, b)
    want = per_model(x.detach().float().requires_grad_(), w, b, 2, 1e-5)
    torch.testing.assert_close(y, want, atol=2e-3, rtol=2e-3)
    dx, = torch.autograd.grad(y.sum(), [x])
    assert dx.dtype == torch.bfloat16


def test_group_norm1_names_shapes_that_disagree():
    x = torch.randn(5, 3, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"x \[N\*B, C, \.\.\.\] and w, b \[N, C\] disagree: x \(5, 3, 4, 4\)"):
        popnorm.group_norm1(x, torch.ones(2, 3, device=DEVICE), None)
    with pytest.raises(ValueError, match="needs w or b"):
        popnorm.group_norm1(x, None, None)


def per_model_layer_norm(x, shape, w, b, n, eps):
    """Model i's F.layer_norm with its own affine, in float32 (float64 for a float64 x), on its rows of x."""
    return torch.cat([F.layer_norm(xi, shape, None if w is None else w[i], None if b is None else b[i], eps)
                      for i, xi in enumerate(x.to(torch.promote_types(x.dtype, torch.float32)).chunk(n))])


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 4), batch=st.integers(1, 3), tokens=st.sampled_from([(), (1,), (5,), (3, 2), (70,)]),
       shape=st.sampled_from([(1,), (7,), (32,), (3, 5), (130,), (600,)]), affine=st.sampled_from(["both", "weight", "bias"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), out_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 99))
def test_layer_norm_equals_per_model_layer_norm(n, batch, tokens, shape, affine, dtype, out_dtype, seed):
    """Rows of any width (one to several tiles of rows, a tile wider than 512), inputs far from 0, in float32 or
    bf16, stored in float32 or bf16: the output and the gradients of x, w and b equal per-model F.layer_norm's
    in float32 (then cast, as autocast's linear reading it casts it)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n * batch, *tokens, *shape, generator=g) * 3 + 5).to(DEVICE).to(dtype).requires_grad_()
    w = torch.randn(n, *shape, generator=g).to(DEVICE).requires_grad_() if affine != "bias" else None
    b = torch.randn(n, *shape, generator=g).to(DEVICE).requires_grad_() if affine != "weight" else None
    y = popnorm.layer_norm(x, shape, w, b, 1e-5, out_dtype=out_dtype)
    assert y.dtype == out_dtype and y.shape == x.shape
    # the reference in float64: a one-feature row's x - mean is 0, which float32 rounding times rstd = 316 is not
    xd, wd, bd = (t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b))
    want = per_model_layer_norm(xd, list(shape), wd, bd, n, 1e-5)
    torch.testing.assert_close(y, want.to(out_dtype), atol=1e-4, rtol=1e-4 if out_dtype == torch.float32 else 1e-2)
    dy = torch.randn(want.shape, generator=g).to(DEVICE).to(out_dtype)
    got = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], dy)
    ref = torch.autograd.grad(want, [t for t in (xd, wd, bd) if t is not None], dy.double())
    assert got[0].dtype == dtype
    torch.testing.assert_close(got[0], ref[0].to(dtype), atol=1e-4, rtol=1e-3 if dtype == torch.float32 else 1e-2)
    for a, r in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a, r.float(), atol=1e-4 * (1 + r.abs().max().item()), rtol=1e-3)


def test_layer_norm_names_shapes_that_disagree_and_rows_too_wide():
    x = torch.randn(6, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"x \[N\*B, \.\.\., \*shape\] and w, b \[N, \*shape\] disagree: x \(6, 4, 8\), "
                                         r"shape \(8,\), w or b \(4, 8\)"):
        popnorm.layer_norm(x, (8,), torch.ones(4, 8, device=DEVICE), None)
    with pytest.raises(ValueError, match=r"disagree: x \(6, 4, 8\), shape \(4, 8\), w or b \(2, 8\)"):
        popnorm.layer_norm(x, (4, 8), torch.ones(2, 8, device=DEVICE), None)
    with pytest.raises(ValueError, match="needs w or b"):
        popnorm.layer_norm(x, (8,), None, None)
    wide = popnorm.LAYER_NORM_MAX + 1
    with pytest.raises(ValueError, match=f"rows of up to {popnorm.LAYER_NORM_MAX} elements, got {wide}"):
        popnorm.layer_norm(torch.zeros(2, wide, device=DEVICE), (wide,), torch.ones(2, wide, device=DEVICE), None)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 3), batch=st.integers(1, 3), tokens=st.sampled_from([(), (5,), (70,)]),
       shape=st.sampled_from([(7,), (32,), (3, 5)]),
       dtypes=st.sampled_from([(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                               (torch.bfloat16, torch.bfloat16)]),
       h_read=st.booleans(), seed=st.integers(0, 99))
def test_add_layer_norm_equals_the_add_then_the_norm(n, batch, tokens, shape, dtypes, h_read, seed):
    """A pre-LN block's x + residual (the stream in the add's dtype: float32 + bf16 is float32) and the norm of
    the sum, as stored: h bit for bit, the norm and the gradients of x, the residual, w and b (with and without
    h read elsewhere, as the next block's residual add reads it) equal the unfused ops'."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n * batch, *tokens, *shape, generator=g) * 3 + 5).to(DEVICE).to(dtypes[0]).requires_grad_()
    res = torch.randn(x.shape, generator=g).to(DEVICE).to(dtypes[1]).requires_grad_()
    w, b = (torch.randn(n, *shape, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    h, y = popnorm.add_layer_norm(x, res, shape, w, b, 1e-5)
    want_h = x + res
    assert h.dtype == want_h.dtype
    if DEVICE == "cuda" or h.dtype == torch.float32:
        assert torch.equal(h, want_h)
    else:  # Triton's interpreter rounds float32 to bf16 toward zero, the GPU (and torch) to nearest
        torch.testing.assert_close(h, want_h, atol=0, rtol=2**-7)
        want_h = h.detach() + (want_h - want_h.detach())  # the sum as stored, its gradient the add's
    want = per_model_layer_norm(want_h, list(shape), w, b, n, 1e-5)
    torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)
    dy = torch.randn(want.shape, generator=g).to(DEVICE)
    dh = torch.randn(want.shape, generator=g).to(DEVICE).to(h.dtype)
    outs, ref_outs, grads = ((y, h), (want, want_h), (dy, dh)) if h_read else ((y,), (want,), (dy,))
    got = torch.autograd.grad(outs, (x, res, w, b), grads)
    ref = torch.autograd.grad(ref_outs, (x, res, w, b), grads)
    for a, r in zip(got, ref):
        assert a.dtype == r.dtype
        tol = 1e-4 if a.dtype == h.dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a, r, atol=tol * (1 + r.abs().max().item()), rtol=tol)


def test_add_layer_norm_names_a_residual_of_another_shape():
    x = torch.randn(4, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"the residual \(4, 8\) is not shaped as x \(4, 3, 8\)"):
        popnorm.add_layer_norm(x, x[:, 0], (8,), torch.ones(2, 8, device=DEVICE), None)
