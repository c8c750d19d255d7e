"""zoos.popmessage: an edge MLP's messages on fully connected graphs, summed at each node, equal each model's torch
ops, forward and backward (Triton's interpreter on the CPU, as tests/conftest.py sets it); EGNN's population program
runs its layers on them and equals vmap."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad, stack_module_state, vmap

from tasks import get_task
from zoos import popmessage
from zoos.archs import build_arch
from zoos.fastpop import FastStep

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not popmessage.available(DEVICE), reason="needs Triton (GPU or TRITON_INTERPRET=1)")


def _layer(models, graphs, n, hidden, features, coord, dtype=torch.float32, seed=0):
    """Inputs of a population's layer: (s, d, geo, wg, w2, b2, wc, bc, wo), each requiring grad."""
    g = torch.Generator().manual_seed(seed)
    rows = models * graphs

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE).requires_grad_()

    data = [r(rows, n, hidden).to(dtype), r(rows, n, hidden).to(dtype), r(rows, n, n, features).to(dtype)]
    weights = [r(models, hidden, features), r(models, hidden, hidden, scale=hidden ** -0.5), r(models, hidden)]
    weights += [r(models, hidden, hidden, scale=hidden ** -0.5), r(models, hidden), r(models, 1, hidden)] if coord \
        else [None] * 3
    return [t.detach().requires_grad_() if t is not None else None for t in data + weights]


def _per_model(inputs, act, slope):
    """Each model's `reference` (F.linear on its own weights) in float64, stacked as the population's outputs."""
    s, d, geo, *weights = [t.double() if t is not None else None for t in inputs]
    models = weights[0].shape[0]
    split = lambda t: t.reshape(models, -1, *t.shape[1:])  # noqa: E731
    outs = [popmessage.reference(si, di, gi, *[w[m] if w is not None else None for w in weights], act, slope)
            for m, (si, di, gi) in enumerate(zip(split(s), split(d), split(geo)))]
    msum = torch.cat([o[0] for o in outs])
    return msum, (torch.cat([o[1] for o in outs]) if weights[3] is not None else None)


def _loss(msum, c, gm, gc):
    return (msum.double() * gm).sum() + ((c.double() * gc).sum() if c is not None else 0.0)


@settings(max_examples=10, deadline=None)
@example(models=2, graphs=3, n=5, hidden=32, features=2, coord=True, act="silu", seed=0)  # EGNN on n-body
@example(models=1, graphs=1, n=16, hidden=32, features=16, coord=True, act="gelu", seed=1)  # float32's largest
@example(models=3, graphs=0, n=3, hidden=8, features=1, coord=False, act="relu", seed=2)  # no graphs
@example(models=2, graphs=9, n=2, hidden=5, features=3, coord=True, act="leaky_relu", seed=3)  # a tile of many graphs
@given(models=st.integers(1, 3), graphs=st.integers(0, 5), n=st.integers(2, popmessage.MAX_NODES),
       hidden=st.integers(1, popmessage.MAX_HIDDEN_FLOAT32), features=st.integers(1, 4), coord=st.booleans(),
       act=st.sampled_from(popmessage.INPUT_ACTIVATIONS), seed=st.integers(0, 99))
def test_messages_equal_each_models_torch_ops(models, graphs, n, hidden, features, coord, act, seed):
    """msum and c and the gradients of every input and weight (float32 against float64 per model; any node count,
    width and edge features up to the kernels' limits, with and without the coordinate MLP, every activation, a
    population without graphs)."""
    slope = 0.1 if act == "leaky_relu" else 0.0
    inputs = _layer(models, graphs, n, hidden, features, coord, seed=seed)
    leaves = [t for t in inputs if t is not None]
    g = torch.Generator().manual_seed(seed + 1)
    gm = torch.randn(models * graphs, n, hidden, generator=g, dtype=torch.float64).to(DEVICE)
    gc = torch.randn(models * graphs, n, n, 1, generator=g, dtype=torch.float64).to(DEVICE)
    got = popmessage.messages(*inputs, act, slope)
    want = _per_model(inputs, act, slope)
    assert (got[1] is None) == (not coord)
    for a, b in zip(got, want):
        if b is not None:
            torch.testing.assert_close(a.double(), b, atol=1e-4, rtol=1e-4)
    got_grads = torch.autograd.grad(_loss(*got, gm, gc), leaves, allow_unused=True)
    want_grads = torch.autograd.grad(_loss(*want, gm, gc), leaves, allow_unused=True)
    for name, a, b in zip("s d geo wg w2 b2 wc bc wo".split(), got_grads, want_grads):
        assert a.dtype == b.dtype == torch.float32, name
        scale = b.abs().max().item() if b.numel() else 1.0
        torch.testing.assert_close(a, b, atol=1e-4 * max(1.0, scale), rtol=1e-4, msg=name)


@pytest.mark.skipif(DEVICE == "cpu", reason="bf16 products on tensor cores (the interpreter does not hold bf16)")
@pytest.mark.parametrize("models,graphs,n,hidden,features,act", [(2, 4, 5, 32, 2, "silu"),  # EGNN on n-body
                                                                 (1, 2, 16, 64, 16, "gelu")])  # the largest
def test_bf16_messages_track_float64(models, graphs, n, hidden, features, act):
    """In bf16 (products on tensor cores, everything else float32) the outputs and gradients are within bf16's
    rounding of each model's float64 ops: a relative error of a few 1e-3, where a broken kernel is off by O(1)."""
    inputs = _layer(models, graphs, n, hidden, features, True)
    half = [t.detach().to(torch.bfloat16).requires_grad_() if i < 3 else t for i, t in enumerate(inputs)]
    exact = _per_model(inputs, act, 0.0)
    rounded = popmessage.messages(*half, act)
    assert rounded[0].dtype == rounded[1].dtype == torch.bfloat16
    for a, b in zip(rounded, exact):
        assert ((a.float() - b).norm() / b.norm()).item() < 2e-2
    gm, gc = torch.randn_like(exact[0]), torch.randn_like(exact[1])
    leaves = lambda ts: [t for t in ts if t is not None]  # noqa: E731
    want = torch.autograd.grad(_loss(*exact, gm.double(), gc.double()), leaves(inputs))
    got = torch.autograd.grad(_loss(*rounded, gm.double(), gc.double()), leaves(half))
    for name, a, b in zip("s d geo wg w2 b2 wc bc wo".split(), got, want):
        assert ((a.float() - b).norm() / b.norm()).item() < 3e-2, name


def test_messages_pass_torch_library_opcheck():
    inputs = [t.detach() for t in _layer(2, 3, 4, 8, 2, True) if t is not None]
    torch.library.opcheck(popmessage._messages.op, (*inputs, "silu", 0.0))


def test_bad_shapes_and_sizes_are_named():
    s, d, geo, wg, w2, b2, wc, bc, wo = _layer(2, 3, 5, 8, 2, True)
    with pytest.raises(ValueError, match=r"disagree: s \(6, 5, 8\), d \(6, 5, 8\), geo \(6, 5, 4, 2\)"):
        popmessage.messages(s, d, geo[:, :, :4], wg, w2, b2, wc, bc, wo, "silu")
    with pytest.raises(ValueError, match="come together or not at all"):
        popmessage.messages(s, d, geo, wg, w2, b2, wc, None, wo, "silu")
    with pytest.raises(ValueError, match=r"2 to 16 nodes, .* got 5 nodes, 8 hidden, 2 edge features, 'softplus'"):
        popmessage.messages(s, d, geo, wg, w2, b2, wc, bc, wo, "softplus")
    wide = _layer(1, 1, 5, 64, 2, True)
    with pytest.raises(ValueError, match=r"up to 32 hidden \(in torch.float32\) .* got 5 nodes, 64 hidden"):
        popmessage.messages(*wide, "silu")
    with pytest.raises(ValueError, match="not a multiple of the population size 4"):
        popmessage.messages(s, d, geo, *[t.repeat(2, *[1] * (t.dim() - 1)) for t in (wg, w2, b2, wc, bc, wo)], "silu")


@pytest.mark.parametrize("config,task_name", [({}, "nbody"), ({"activation": "tanh", "width": 12}, "nbody"),
                                              ({"depth": 2}, "convex_hull")])
def test_egnn_on_the_kernels_equals_vmap(config, task_name):
    """EGNN's population program runs every layer's edge MLP as popmessage and gives vmap's loss and gradients (float32;
    coordinates out with velocities on n-body, an invariant output on convex hulls)."""
    task = get_task(task_name)
    n, b = 3, 8
    models = [build_arch("egnn", task, **config).to(DEVICE) for _ in range(n)]
    params, buffers = stack_module_state(models)
    params = {k: v.detach() for k, v in params.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, b, *task.input_shape, generator=g).to(DEVICE)
    y = torch.randn(n, b, *task.output_shape, generator=g).to(DEVICE) if task.output_shape else \
        torch.randn(n, b, generator=g).to(DEVICE)
    template = models[0]

    def one(p, bu, xb, yb):
        return task.loss(functional_call(template, (p, bu), (xb,)), yb)

    want = vmap(grad(one), randomness="different")(params, buffers, x, y)  # the head's dropout: rate 0
    step = FastStep(template, task.loss, task.input_shape, kernels=True, dropout=False)
    layers = [p for name, p, _ in step.pop.choices if "edge_messages" in name]
    assert layers == ["popmessage"] * len(template.layers)
    got, _ = step(params, buffers, x, y)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=2e-5 * max(1.0, want[k].abs().max().item()), rtol=1e-4, msg=k)


def test_egnn_off_the_kernels_says_why():
    task = get_task("nbody")
    step = FastStep(build_arch("egnn", task), task.loss, task.input_shape, kernels=False, dropout=False)
    assert {(p, why) for name, p, why in step.pop.choices if "edge_messages" in name} == {
        ("bmm", "popmessage kernels off here (no CUDA, or not asked for)")}
    wide = build_arch("egnn", task, width=80)
    step = FastStep(wide, task.loss, task.input_shape, kernels=True, dropout=False)
    assert {why for name, p, why in step.pop.choices if "edge_messages" in name} == {
        "5 nodes, 80 hidden, 2 edge features, silu: popmessage holds up to 16 nodes, 32 hidden (in torch.float32) and "
        "16 edge features"}
