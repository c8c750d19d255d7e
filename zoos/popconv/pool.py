"""The 2x2 max-pool in either memory format: its output and the winning position, the backward a scatter by that
position."""

from __future__ import annotations

import torch
from torch import Tensor

from .common import EPILOGUE_ACTIVATIONS, population_op, stored_channels_last, tl, triton


if triton is not None:
    from .common import _act_grad_from_output, _keep_max

    @triton.jit
    def _pool_coords(e, C: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, CL: tl.constexpr):
        """(row, channel, pooled row, pooled column) of pooled element e, counted in memory order."""
        if CL:
            return e // (HP * WP * C), e % C, (e // (WP * C)) % HP, (e // C) % WP
        return e // (C * HP * WP), (e // (HP * WP)) % C, (e // WP) % HP, e % WP

    @triton.jit
    def _max_pool_kernel(x_ptr, y_ptr, code_ptr, total, C: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
                         HP: tl.constexpr, WP: tl.constexpr, CL: tl.constexpr, BLOCK: tl.constexpr):
        """y = max_pool2d(x, 2) and which window position (row-major) won, NaN and ties as `_keep_max`."""
        e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = e < total
        r, c, pi, pj = _pool_coords(e, C, HP, WP, CL)
        if CL:
            at = r * (H * W * C) + ((2 * pi) * W + 2 * pj) * C + c
            right, down = C, W * C
        else:
            at = r * (C * H * W) + c * (H * W) + (2 * pi) * W + 2 * pj
            right, down = 1, W
        best = tl.load(x_ptr + at, mask=mask, other=0.0)
        code = tl.zeros((BLOCK,), dtype=tl.int32)
        best, code = _keep_max(best, code, tl.load(x_ptr + at + right, mask=mask, other=0.0), 1)
        best, code = _keep_max(best, code, tl.load(x_ptr + at + down, mask=mask, other=0.0), 2)
        best, code = _keep_max(best, code, tl.load(x_ptr + at + down + right, mask=mask, other=0.0), 3)
        tl.store(y_ptr + e, best, mask=mask)
        tl.store(code_ptr + e, code.to(tl.int8), mask=mask)

    @triton.jit
    def _max_unpool_kernel(dy_ptr, code_ptr, y_ptr, dx_ptr, total, C: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
                           HP: tl.constexpr, WP: tl.constexpr, CL: tl.constexpr, ACT: tl.constexpr, SLOPE: tl.constexpr,
                           BLOCK: tl.constexpr):
        """dx of the max-pool: dy where the window position won, 0 elsewhere and in rows or columns the floor
        dropped; times act'(y) at the pooled output y when the pool's input is that activation's output (ACT).
        Input elements in memory order (dx has x's layout, dy, code and y the output's)."""
        e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = e < total
        r, c, i, j = _pool_coords(e, C, H, W, CL)
        pi, pj = i // 2, j // 2
        ok = mask & (pi < HP) & (pj < WP)
        src = (r * (HP * WP) + pi * WP + pj) * C + c if CL else ((r * C + c) * HP + pi) * WP + pj
        g = tl.load(dy_ptr + src, mask=ok, other=0.0).to(tl.float32)
        if ACT != "identity":
            g = g * _act_grad_from_output(tl.load(y_ptr + src, mask=ok, other=0.0).to(tl.float32), ACT, SLOPE)
        won = tl.load(code_ptr + src, mask=ok, other=-1).to(tl.int32) == (i % 2) * 2 + j % 2
        tl.store(dx_ptr + e, tl.where(won, g, 0.0).to(dx_ptr.dtype.element_ty), mask=mask)


_POOL_BLOCK = 1024


def _pool_outputs(x: Tensor) -> tuple[Tensor, Tensor]:
    r, c, h, w = x.shape
    fmt = torch.channels_last if stored_channels_last(x) else torch.contiguous_format
    y = torch.empty((r, c, h // 2, w // 2), device=x.device, dtype=x.dtype, memory_format=fmt)
    return y, torch.empty(y.shape, device=x.device, dtype=torch.int8, memory_format=fmt)


@population_op("pop_max_pool2x2")
def _pop_max_pool2x2(x: Tensor, act: str, slope: float) -> tuple[Tensor, Tensor]:
    cl = stored_channels_last(x)
    x = x if cl else x.contiguous()
    y, code = _pool_outputs(x)
    r, c, h, w = x.shape
    if y.numel():
        _max_pool_kernel[(triton.cdiv(y.numel(), _POOL_BLOCK),)](
            x, y, code, y.numel(), C=c, H=h, W=w, HP=h // 2, WP=w // 2, CL=cl, BLOCK=_POOL_BLOCK)
    return y, code


@_pop_max_pool2x2.register_fake
def _(x, act, slope):
    return _pool_outputs(x)


@population_op("pop_max_unpool2x2")
def _pop_max_unpool2x2(dy: Tensor, code: Tensor, y: Tensor, x_shape: list[int], channels_last: bool, act: str,
                       slope: float) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dx = torch.empty(x_shape, device=dy.device, dtype=dy.dtype, memory_format=fmt)
    dy = dy.contiguous(memory_format=fmt)
    r, c, h, w = x_shape
    if dx.numel():
        _max_unpool_kernel[(triton.cdiv(dx.numel(), _POOL_BLOCK),)](
            dy, code, y if act != "identity" else dy, dx, dx.numel(), C=c, H=h, W=w, HP=h // 2, WP=w // 2,
            CL=channels_last, ACT=act, SLOPE=slope, BLOCK=_POOL_BLOCK)
    return dx


@_pop_max_unpool2x2.register_fake
def _(dy, code, y, x_shape, channels_last, act, slope):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(x_shape, device=dy.device, dtype=dy.dtype, memory_format=fmt)


def _setup_pool(ctx, inputs, output) -> None:
    x, act, slope = inputs
    y, code = output
    ctx.save_for_backward(code, y if act != "identity" else code.new_empty(0))
    ctx.meta = (list(x.shape), stored_channels_last(x), act, slope)
    ctx.mark_non_differentiable(code)


def _backward_pool(ctx, dy: Tensor, _dcode: Tensor | None):
    code, y = ctx.saved_tensors
    return _pop_max_unpool2x2(dy, code, y, *ctx.meta), None, None


_pop_max_pool2x2.register_autograd(_backward_pool, setup_context=_setup_pool)


def max_pool2x2(x: Tensor, act: str = "identity", slope: float = 0.0) -> Tensor:
    """F.max_pool2d(x, 2) for x [R, C, H, W] in either memory format (the output in x's): one pass that
    keeps a byte per output for the backward, which writes every input gradient once (PyTorch's channels-last
    pooling is slow on the population's [N*B, C, H, W] maps).

    `act` (one of `EPILOGUE_ACTIVATIONS`, `slope` leaky_relu's): x is that activation's output, and the
    backward returns the gradient w.r.t. the activation's input, act'(z) = act'(a) read off the pooled output
    at the winning position (a monotone activation commutes with the max): for a conv that folded the
    activation and leaves its derivative to this pool (`conv2d_pool_act(.., act_grad=False)`), so the
    full-resolution map's own activation pass is never run."""
    if x.dim() != 4:
        raise ValueError(f"max_pool2x2 takes x [R, C, H, W]; got shape {tuple(x.shape)}")
    if act not in EPILOGUE_ACTIVATIONS:
        raise ValueError(f"act = {act!r} is not allowed; expected one of {', '.join(EPILOGUE_ACTIVATIONS)}")
    return _pop_max_pool2x2(x, act, float(slope))[0]
