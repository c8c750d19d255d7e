"""zoos.poplinear: a population's narrow linear layers equal each model's F.linear, forward and backward
(Triton's interpreter on the CPU, as tests/conftest.py sets it)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from zoos import poplinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not poplinear.available(DEVICE), reason="needs Triton (GPU or TRITON_INTERPRET=1)")


def per_model(x, w, b):
    """Model i's F.linear on its rows of x, in float64."""
    n = w.shape[0]
    xs = x.double().reshape(n, -1, x.shape[-1])
    out = [F.linear(xi, w[i].double(), b[i].double() if b is not None else None) for i, xi in enumerate(xs)]
    return torch.stack(out).reshape(*x.shape[:-1], w.shape[1])


@settings(max_examples=12, deadline=None)
@example(n=2, rows=130, tokens=3, in_f=32, out_f=20, bias=True, layout="strided rows", grads="all", seed=0)
@example(n=3, rows=70, tokens=1, in_f=100, out_f=128, bias=True, layout="contiguous", grads="weights", seed=1)
@example(n=2, rows=40, tokens=3, in_f=16, out_f=16, bias=False, layout="two-level rows", grads="all", seed=2)
@example(n=2, rows=9, tokens=3, in_f=5, out_f=7, bias=True, layout="three-level rows", grads="all", seed=3)
@given(n=st.integers(1, 3), rows=st.integers(0, 200), tokens=st.sampled_from([1, 3]), in_f=st.integers(1, 130),
       out_f=st.integers(1, 130), bias=st.booleans(),
       layout=st.sampled_from(["contiguous", "strided rows", "two-level rows", "three-level rows"]),
       grads=st.sampled_from(["all", "weights", "input"]), seed=st.integers(0, 99))
def test_linear_equals_per_model_linear(n, rows, tokens, in_f, out_f, bias, layout, grads, seed):
    """Output and the gradients of x, w and b (float32, any widths up to and past a tile's 16, 64 and 128 less
    the refused, rows not a multiple of a tile, none at all, [rows, tokens, in] inputs and rows read with a stride,
    as a transformer's class token is, or in two levels, as a slice of a wider tensor's middle axis is (read where
    they lie), or more (copied first); the output's gradient strided the same way)."""
    if not poplinear.fits(in_f, out_f):
        with pytest.raises(ValueError, match=f"up to {poplinear.MAX_FEATURES} inputs and outputs, got {in_f} -> {out_f}"):
            poplinear.linear(torch.zeros(n, in_f, device=DEVICE), torch.zeros(n, out_f, in_f, device=DEVICE), None)
        return
    g = torch.Generator().manual_seed(seed)
    if layout == "two-level rows":
        x = torch.randn(n * rows, tokens + 2, in_f, generator=g).to(DEVICE)[:, 1:tokens + 1]
    elif layout == "three-level rows":
        x = torch.randn(n * rows, 3, tokens + 2, in_f, generator=g).to(DEVICE)[:, :2, 1:tokens + 1]
    else:
        full = torch.randn(n * rows, tokens, in_f + 3, generator=g).to(DEVICE)
        x = full[:, :, 1:in_f + 1] if layout == "strided rows" else full[:, :, :in_f].contiguous()
    x = x[:, 0] if tokens == 1 and layout != "three-level rows" else x
    x.requires_grad_(grads in ("all", "input"))
    w = torch.randn(n, out_f, in_f, generator=g).to(DEVICE).requires_grad_(grads != "input")
    b = torch.randn(n, out_f, generator=g).to(DEVICE).requires_grad_(grads != "input") if bias else None
    y = poplinear.linear(x, w, b)
    want = per_model(x, w, b)
    assert y.shape == want.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
    wrt = [t for t in (x, w, b) if t is not None and t.requires_grad]
    if layout == "contiguous":
        dy = torch.randn(y.shape, generator=g).to(DEVICE)
    else:  # a slice of a wider gradient: its middle axis where it has one, else its features
        wider = (*y.shape[:-2], y.shape[-2] + 1, out_f) if y.dim() > 2 else (*y.shape[:-1], out_f + 1)
        full = torch.randn(wider, generator=g).to(DEVICE)
        dy = full[..., 1:, :] if y.dim() > 2 else full[..., 1:]
    for got, ref in zip(torch.autograd.grad(y, wrt, dy), torch.autograd.grad(want, wrt, dy.double())):
        assert got.shape == ref.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref.double(), rtol=1e-4, atol=1e-4 * max(1, rows) ** 0.5)


@pytest.mark.skipif(DEVICE == "cpu", reason="bf16 products on tensor cores (the interpreter computes them in float32)")
def test_bf16_rows_match_autocasts_batched_matmul():
    """bf16 rows and float32 master weights as a population program runs them: y within bf16 rounding of
    autocast's baddbmm, the gradients within its rounding of float32 ones."""
    torch.manual_seed(0)
    n, rows, in_f, out_f = 4, 500, 32, 48
    x = torch.randn(n * rows, in_f, device=DEVICE).to(torch.bfloat16).requires_grad_()
    w = torch.randn(n, out_f, in_f, device=DEVICE, requires_grad=True)
    b = torch.randn(n, out_f, device=DEVICE, requires_grad=True)
    y = poplinear.linear(x, w, b)
    want = per_model(x, w, b)
    torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=5e-2)
    dy = torch.randn(y.shape, device=DEVICE).to(torch.bfloat16)
    for got, ref in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(want, (x, w, b), dy.double())):
        torch.testing.assert_close(got.double(), ref.double(), rtol=2e-2, atol=0.3)


@settings(max_examples=10, deadline=None)
@example(n=2, rows=130, in_f=32, widths=[32, 32, 32], biases=[True, False, True], layout="two-level rows",
         unused=-1, seed=0)
@example(n=1, rows=0, in_f=5, widths=[3, 4], biases=[False, False], layout="contiguous", unused=-1, seed=1)
@given(n=st.integers(1, 3), rows=st.integers(0, 150), in_f=st.integers(1, 70),
       widths=st.lists(st.integers(1, 42), min_size=1, max_size=poplinear.MAX_PARTS),
       biases=st.lists(st.booleans(), min_size=poplinear.MAX_PARTS, max_size=poplinear.MAX_PARTS),
       layout=st.sampled_from(["contiguous", "two-level rows"]), unused=st.integers(-1, 2), seed=st.integers(0, 99))
def test_linears_of_one_input_equal_each_linear(n, rows, in_f, widths, biases, layout, unused, seed):
    """Up to three linears of one input as one op (with and without biases, x's rows in two levels, each
    output's gradient a slice of a wider tensor, one output unused): each output and the gradients of x and
    of every weight and bias equal each model's F.linear's, float64 reference."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n * rows, 3, in_f, generator=g)[:, 1] if layout == "two-level rows"
         else torch.randn(n * rows, in_f, generator=g)).to(DEVICE).requires_grad_()
    ws = [torch.randn(n, width, in_f, generator=g).to(DEVICE).requires_grad_() for width in widths]
    bs = [torch.randn(n, width, generator=g).to(DEVICE).requires_grad_() if bias else None
          for width, bias in zip(widths, biases)]
    ys = poplinear.linears(x, ws, bs)
    wants = [per_model(x, w, b) for w, b in zip(ws, bs)]
    for y, want in zip(ys, wants):
        assert y.shape == want.shape and y.dtype == x.dtype and y.is_contiguous()
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
    dys = [torch.randn(n * rows, width + 2, generator=g).to(DEVICE)[:, 1:-1] for width in widths]
    used = [i for i in range(len(ys)) if i != unused] or [0]
    wrt = [x, *ws, *[b for b in bs if b is not None]]
    got = torch.autograd.grad([ys[i] for i in used], wrt, [dys[i] for i in used], allow_unused=True)
    ref = torch.autograd.grad([wants[i] for i in used], wrt, [dys[i].double() for i in used], allow_unused=True)
    for a, r in zip(got, ref):
        if r is None:  # an unused output's weights: no gradient, or a zero one
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a.double(), r.double(), rtol=1e-4, atol=1e-4 * max(1, rows) ** 0.5)


ACTIVATION = {"relu": F.relu, "leaky_relu": F.leaky_relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu,
              "gelu": F.gelu, "gelu_tanh": lambda z: F.gelu(z, approximate="tanh")}


@settings(max_examples=12, deadline=None)
@example(n=2, rows=130, in_f=32, widths=[32], act="silu", slope=0.0, layout="two-level rows", seed=0)
@example(n=2, rows=70, in_f=20, widths=[8, 24, 3], act="gelu", slope=0.0, layout="contiguous", seed=1)
@example(n=1, rows=9, in_f=5, widths=[7], act="leaky_relu", slope=-0.3, layout="contiguous", seed=2)
@given(n=st.integers(1, 3), rows=st.integers(0, 150), in_f=st.integers(1, 70),
       widths=st.lists(st.integers(1, 42), min_size=1, max_size=poplinear.MAX_PARTS),
       act=st.sampled_from(sorted(ACTIVATION)), slope=st.sampled_from([0.0, 0.1, -0.3]),
       layout=st.sampled_from(["contiguous", "two-level rows"]), seed=st.integers(0, 99))
def test_a_linear_reading_an_activation_equals_the_activation_then_the_linear(n, rows, in_f, widths, act, slope,
                                                                            layout, seed):
    """`input_act`: one linear or several of one input reading act(x) give each model's F.linear of act(x) and the
    gradients of x (through the activation, at 0 as torch takes relu's and leaky_relu's there), of the weights and
    of the biases, for every activation; float64 reference."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n * rows, 3, in_f, generator=g)[:, 1] if layout == "two-level rows"
         else torch.randn(n * rows, in_f, generator=g))
    x[::3, 0] = 0.0  # on relu's kink
    x = x.to(DEVICE).requires_grad_()
    ws = [torch.randn(n, width, in_f, generator=g).to(DEVICE).requires_grad_() for width in widths]
    bs = [torch.randn(n, width, generator=g).to(DEVICE).requires_grad_() for width in widths]
    input_act = (act, slope if act == "leaky_relu" else 0.0)
    fn = (lambda z: F.leaky_relu(z, slope)) if act == "leaky_relu" else ACTIVATION[act]
    ys = ([poplinear.linear(x, ws[0], bs[0], input_act=input_act)] if len(widths) == 1
          else poplinear.linears(x, ws, bs, input_act=input_act))
    wants = [per_model(fn(x.double()), w, b) for w, b in zip(ws, bs)]
    for y, want in zip(ys, wants):
        assert y.shape == want.shape and y.dtype == x.dtype
        torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)
    dys = [torch.randn(y.shape, generator=g).to(DEVICE) for y in ys]
    wrt = [x, *ws, *bs]
    got = torch.autograd.grad(ys, wrt, dys)
    ref = torch.autograd.grad(wants, wrt, [dy.double() for dy in dys])
    for a, r, name in zip(got, ref, ["x"] + ["w"] * len(ws) + ["b"] * len(bs)):
        torch.testing.assert_close(a.double(), r.double(), rtol=1e-4, atol=1e-4 * max(1, rows) ** 0.5,
                                   msg=lambda m: f"{name}: {m}")


def test_linear_passes_torch_library_opcheck():
    """The fake kernels match what the ops return, the autograd registration too (with and without a bias, one
    output and three side by side, reading the input through an activation or not)."""
    x = torch.randn(6, 5, device=DEVICE, requires_grad=True)
    for b in (torch.randn(2, 7, device=DEVICE, requires_grad=True), None):
        w = torch.randn(2, 7, 5, device=DEVICE, requires_grad=True)
        for act in (("identity", 0.0), ("silu", 0.0), ("leaky_relu", 0.2)):
            torch.library.opcheck(poplinear._pop_linear.op, (x, w, b, [7], *act))
            torch.library.opcheck(poplinear._pop_linear.op, (x, w, b, [2, 4, 1], *act))


def test_a_bias_read_through_a_view_is_read_as_its_values():
    """A bias that is a strided view (a column of a wider tensor) gives the bias it shows."""
    torch.manual_seed(1)
    x = torch.randn(6, 4, device=DEVICE)
    w = torch.randn(2, 5, 4, device=DEVICE)
    b = torch.randn(5, 2, device=DEVICE).T  # [2, 5], not contiguous
    torch.testing.assert_close(poplinear.linear(x, w, b).double(), per_model(x, w, b), rtol=1e-4, atol=1e-4)


def test_bad_shapes_are_named():
    w = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="not a multiple of the population size 2"):
        poplinear.linear(torch.randn(3, 3), w, None)
    with pytest.raises(ValueError, match=r"x \[N\*R, ..., in\], w \[N, out, in\] and b \[N, out\] disagree"):
        poplinear.linear(torch.randn(4, 5), w, None)
    with pytest.raises(ValueError, match="disagree"):
        poplinear.linear(torch.randn(4, 3), w, torch.randn(2, 3))
    with pytest.raises(ValueError, match="1 to 3 weights and as many biases, got 4 and 4"):
        poplinear.linears(torch.randn(4, 3), [w] * 4, [None] * 4)
    with pytest.raises(ValueError, match="up to 128 outputs together, got 64 \\+ 65"):
        poplinear.linears(torch.randn(4, 3), [torch.randn(2, 64, 3), torch.randn(2, 65, 3)], [None, None])
    with pytest.raises(ValueError, match="every weight is \\[N, out, in\\] of one population"):
        poplinear.linears(torch.randn(4, 3), [w, torch.randn(4, 4, 3)], [None, None])
    with pytest.raises(ValueError, match=r"input_act = \('swish', 0.0\): \(name, slope\) with a name of identity, .*silu"):
        poplinear.linear(torch.randn(4, 3), w, None, input_act=("swish", 0.0))
