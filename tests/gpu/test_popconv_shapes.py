"""popconv's compiled kernels against per-model F.conv2d over a grid of layer shapes, on a GPU.

The interpreter tests (tests/zoos/test_popconv.py) check what the kernels compute; a compiled kernel can still
go wrong for some shapes only (a float32 weight gradient on an H200 did, for padded images of several pixel
tiles: benchmarks/README.md). Here each public op (the conv, a data set read by index, the conv + pool +
activation with its two backward paths, the window table) runs on a seeded sample of channel counts, kernel
sizes, paddings, image sizes (MNIST's 28 and CIFAR's 32 among them) and activation dtypes (float32, bf16),
its inputs and output gradient with NaN in the memory before and after them (a masked-off load that reads
outside leaks into the result). Run with the other GPU tests after a kernel or a Triton change."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F

from tests.zoos.test_popconv import nan_fenced, reference
from zoos import popconv

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

N, BATCH, DATA = 2, 3, 11  # models, samples a model, rows of a data set read by index
SAMPLES = 48  # shapes a grid contributes


def _grid(channels, outputs, pools, seed):
    """A seeded sample of (c, o, k, pad, size, pool, activations' dtype) with at least one pooled output pixel,
    the dtype float32 or bf16 (the trainer's, with float32 weights) at random."""
    grid = itertools.product(channels, outputs, (1, 2, 3, 5), (0, 1, 2), (5, 8, 11, 16, 28, 32), pools)
    shapes = [(c, o, k, pad, size, pool) for c, o, k, pad, size, pool in grid if size + 2 * pad - k + 1 >= pool]
    rng = random.Random(seed)
    return [(*shape, rng.choice(["float32", "bfloat16"])) for shape in rng.sample(shapes, SAMPLES)]


def _reference(x, w, b, pad, pool=1, act=None):
    """Per-model float32 F.conv2d (`reference`: no TF32, so a max-pool picks the positions popconv's float32
    forward does), then the pool and the activation."""
    y = reference(x, w, b, pad)
    y = F.max_pool2d(y, pool) if pool > 1 else y
    return act(y) if act is not None else y


def _close(got, want, what, dtype):
    """To 1% of the reference's norm (TF32 products in the tensor-core kernels; 3% for bf16 activations), and
    finite."""
    assert torch.isfinite(got).all(), f"{what}: non-finite values (a load outside the tensor)"
    err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12)).item()
    assert err < (1e-2 if dtype == torch.float32 else 3e-2), f"{what}: relative error {err:.2e}"


def _check(got_out, want_out, wrt_got, wrt_want):
    """Output and the gradients (named) of one random output gradient, fenced, against the float32 reference's."""
    dtype = got_out.dtype
    _close(got_out, want_out, "output", dtype)
    g = torch.randn(want_out.shape, device=want_out.device).to(dtype)
    got = torch.autograd.grad(got_out, list(wrt_got.values()), nan_fenced(g))
    want = torch.autograd.grad(want_out, list(wrt_want.values()), g.float())
    for name, a, r in zip(wrt_got, got, want):
        _close(a, r, f"d{name}", dtype)


def _weights(c, o, k, seed):
    """Weights and biases at a layer's init scale (std 1 / sqrt(fan-in)). With unit weights a tanh saturates,
    and a gradient through it, taken from the bf16-stored output as any bf16 program takes it, keeps none of the
    float32 reference's tiny values: a relative error of 1 that says nothing about the kernels."""
    torch.manual_seed(seed)
    scale = (c * k * k) ** -0.5
    w = (torch.randn(N, o, c, k, k, device="cuda") * scale).requires_grad_()
    b = (torch.randn(N, o, device="cuda") * scale).requires_grad_()
    return w, b


@pytest.mark.parametrize("c,o,k,pad,size,_,dtype", _grid((1, 3, 8, 16, 20), (1, 6, 17, 40), (1,), seed=0))
def test_conv(c, o, k, pad, size, _, dtype):
    """conv2d forward and its x, w, b gradients; a wide input (16+ channels) in channels-last memory."""
    w, b = _weights(c, o, k, seed=c * 1000 + o * 10 + k)
    x = torch.randn(N * BATCH, c, size, size, device="cuda").to(getattr(torch, dtype))
    xg = nan_fenced(x, channels_last=c >= 16).requires_grad_()
    xr = x.float().clone().requires_grad_()
    _check(popconv.conv2d(xg, w, b, (pad, pad)), _reference(xr, w, b, pad), {"x": xg, "w": w, "b": b},
           {"x": xr, "w": w, "b": b})


@pytest.mark.parametrize("c,o,k,pad,size,_,dtype", _grid((1, 3, 8, 16), (1, 6, 17), (1,), seed=1))
def test_data_set_read_by_index(c, o, k, pad, size, _, dtype):
    """conv2d reading a data set by row index: forward and w, b gradients."""
    w, b = _weights(c, o, k, seed=c * 1000 + o * 10 + k)
    data = torch.randn(DATA, c, size, size, device="cuda").to(getattr(torch, dtype))
    rows = torch.randint(0, DATA, (N, BATCH), device="cuda")
    got = popconv.conv2d(nan_fenced(data), w, b, (pad, pad), rows=rows)
    _check(got, _reference(data[rows.reshape(-1)].float(), w, b, pad), {"w": w, "b": b}, {"w": w, "b": b})


@pytest.mark.parametrize("window_dx", [True, False])
@pytest.mark.parametrize("c,o,k,pad,size,pool,dtype", _grid((1, 3, 8, 20), (1, 6, 16), (1, 2), seed=2))
def test_conv_pool_act(c, o, k, pad, size, pool, dtype, window_dx):
    """conv2d_pool_act (tanh) forward and gradients: with x's gradient (the block input gradient or the padded
    conv of the rebuilt dy, as window_dx says) and without it (the weight gradient rebuilds dy in its tiles)."""
    w, b = _weights(c, o, k, seed=c * 1000 + o * 10 + k + pool)
    x = torch.randn(N * BATCH, c, size, size, device="cuda").to(getattr(torch, dtype))
    with popconv.tuned({"window_dx": window_dx}):
        for x_grad in (True, False):
            xg, xr = nan_fenced(x).requires_grad_(x_grad), x.float().clone().requires_grad_(x_grad)
            got = popconv.conv2d_pool_act(xg, w, b, (pad, pad), pool=pool, act="tanh")
            want = _reference(xr, w, b, pad, pool, torch.tanh)
            wrt = ({"x": xg} if x_grad else {}) | {"w": w, "b": b}
            _check(got, want, wrt, ({"x": xr} if x_grad else {}) | {"w": w, "b": b})


@pytest.mark.parametrize("c,o,k,pad,size,pool,dtype", _grid((1, 3), (1, 6, 16), (1, 2), seed=3))
def test_window_table(c, o, k, pad, size, pool, dtype):
    """A first layer reading its data set's window table: forward and w, b gradients. Its tensor-core products
    take bf16 weights with bf16 data (as autocast's conv does), so the reference does too: a max-pool then picks
    the same window positions (with float32 weights ~0.5% of the windows differ, ~10% of dw's norm)."""
    w, b = _weights(c, o, k, seed=c * 1000 + o * 10 + k + pool)
    operand = w.to(getattr(torch, dtype)).float()
    data = nan_fenced(torch.randn(DATA, c, size, size, device="cuda").to(getattr(torch, dtype)))
    rows = torch.randint(0, DATA, (N, BATCH), device="cuda")
    table = popconv.window_table(data, (k, k), (pad, pad), pool=pool)
    got = popconv.conv2d_pool_act(data, w, b, (pad, pad), pool=pool, act="tanh", rows=rows, windows=table)
    want = _reference(data[rows.reshape(-1)].float(), operand, b, pad, pool, torch.tanh)
    _check(got, want, {"w": w, "b": b}, {"w": w, "b": b})
