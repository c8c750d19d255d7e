"""A conv followed by a max-pool and a monotone activation as one op (`conv2d_pool_act`): its custom ops and
backward, and the pooled layer's input gradient a POOL x POOL block of input pixels at a time (window_dx)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import tuning
from .common import (EPILOGUE_ACTIVATIONS, _act_backward, _dot_dtype, _programs_per_model, _tile_rows, _wgrad_fake,
                     population_op, tl, triton)
from .conv import (_as_blocks, _checked, _conv_grads, _input_act, _launch_pool_act, _launch_wgrad, _need_rows, _output,
                   _plain, _pool_act_kernel, _pop_conv2d_strided, _stride, strided_reads_directly)
from .window import _window_conv


if triton is not None:
    from .common import _act_grad_from_output, _mma

    @triton.jit
    def _placed_grad_kernel(da_ptr, a_ptr, code_ptr, g_ptr, total, O, L: tl.constexpr, POOL: tl.constexpr,
                            ACT: tl.constexpr, SLOPE: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
        """g[s, q, (d, o)] = da * act'(a) of output o at pooled position q if the pool chose window position d
        there, else 0 (columns past POOL^2 * O too): each pooled output's gradient as one K-wide row."""
        e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = e < total
        kk, q, s = e % K, (e // K) % L, e // (K * L)
        d, o = kk // O, kk % O
        ok = mask & (kk < POOL * POOL * O)
        src = s * (O * L) + o * L + q
        g = tl.load(da_ptr + src, mask=ok, other=0.0).to(tl.float32)
        g = g * _act_grad_from_output(tl.load(a_ptr + src, mask=ok, other=0.0).to(tl.float32), ACT, SLOPE)
        if POOL > 1:
            g = tl.where(tl.load(code_ptr + src, mask=ok, other=-1).to(tl.int32) == d, g, 0.0)
        tl.store(g_ptr + e, g.to(g_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _block_dx_kernel(g_ptr, ws_ptr, dx_ptr, B, PER_PROGRAM, C: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
                         PH: tl.constexpr, PW: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, BH: tl.constexpr,
                         BW: tl.constexpr, NH: tl.constexpr, NW: tl.constexpr, POOL: tl.constexpr, DOT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """dx of a pooled layer, a row per (sample, block): block (bi, bj) is the POOL x POOL input pixels at
        padded rows POOL*bi + [0, POOL), columns likewise, and the pooled outputs whose windows cover it are
        (bi - e, bj - f) for e < NH, f < NW. So the block's C * POOL^2 values are sum over (e, f) of
        g[that output] @ ws[m, e, f]: NH * NW tensor-core products of [rows, (d, o)] @ [(d, o), (c, r, t)],
        the window positions the pool did not choose zeros in g (`_placed_grad_kernel`), the shifted weights
        ws built by `_shifted_weights` before the launch (gathered here through a tap map they cost more).
        Every value of dx is written once: no window columns, no fold."""
        group, nb, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        L: tl.constexpr = HP * WP
        NT: tl.constexpr = C * POOL * POOL
        k = tl.arange(0, BLOCK_K)
        n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        c, r, t = n // (POOL * POOL), (n % (POOL * POOL)) // POOL, n % POOL
        ws_ptr += m.to(tl.int64) * (NH * NW * BLOCK_K * NT) + k[:, None] * NT + n[None, :]
        start = group * PER_PROGRAM
        for tile in range(start, tl.minimum(start + PER_PROGRAM, tl.cdiv(B * BH * BW, BLOCK_M))):
            idx = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            pmask = idx < B * BH * BW
            sample = (m * B + idx // (BH * BW)).to(tl.int64)
            bi, bj = (idx % (BH * BW)) // BW, idx % BW
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for e in tl.static_range(NH):
                for f in tl.static_range(NW):
                    qi, qj = bi - e, bj - f
                    ok = pmask & (qi >= 0) & (qi < HP) & (qj >= 0) & (qj < WP)
                    rows = g_ptr + (sample * L + qi * WP + qj)[:, None] * BLOCK_K + k[None, :]
                    g = tl.load(rows, mask=ok[:, None], other=0.0)
                    ws = tl.load(ws_ptr + (e * NW + f) * (BLOCK_K * NT), mask=(n < NT)[None, :], other=0.0)
                    acc += _mma(g, ws, DOT)
            i = (bi * POOL - PH)[:, None] + r[None, :]
            j = (bj * POOL - PW)[:, None] + t[None, :]
            ok = pmask[:, None] & (n < NT)[None, :] & (i >= 0) & (i < H) & (j >= 0) & (j < W)
            tl.store(dx_ptr + sample[:, None] * (C * H * W) + (c * (H * W))[None, :] + i * W + j,
                     acc.to(dx_ptr.dtype.element_ty), mask=ok)


def _launch_pooled_grads(da: Tensor, a: Tensor, code: Tensor, w: Tensor, x: Tensor, padding: tuple[int, int], pool: int,
                         act: str, slope: float, bias: bool, weights: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """dx, dw, db of act(maxpool(conv(x))) from its output gradient da: each pooled output's gradient placed at
    the window position the pool chose (`_placed_grad_kernel`), then dx a POOL x POOL block of input pixels at
    a time, the sum of its covering outputs' products with the shifted weights (`_block_dx_kernel`, tensor
    cores); with `weights`, dw and db by the weight-gradient kernel, which rebuilds the conv's dy in its tiles."""
    n, o, c, kh, kw = w.shape
    nb, _, hp, wp = da.shape
    batch, length = nb // n, hp * wp
    dot = _dot_dtype(da)
    block_k = max(16, triton.next_power_of_2(pool * pool * o))
    g = torch.empty(nb, length, block_k, device=da.device, dtype=torch.bfloat16 if dot == tl.bfloat16 else torch.float32)
    _placed_grad_kernel[(triton.cdiv(g.numel(), 1024),)](
        da, a, code if pool > 1 else a, g, g.numel(), o, L=length, POOL=pool, ACT=act, SLOPE=slope, K=block_k,
        BLOCK=1024, num_warps=4,
    )
    h, wd = x.shape[2], x.shape[3]
    bh, bw = triton.cdiv(h + padding[0], pool), triton.cdiv(wd + padding[1], pool)
    nh, nw = triton.cdiv(kh + pool - 1, pool), triton.cdiv(kw + pool - 1, pool)
    ws = _shifted_weights(w, pool, block_k).to(g.dtype)
    t = tuning.current()
    block_n = min(t.window_dx_block_n, max(16, triton.next_power_of_2(c * pool * pool)))
    block_m, options = _tile_rows(max(block_k, block_n))  # its NH x NW loads a tile: its own stages
    options["num_stages"] = t.window_dx_stages
    groups, per = _programs_per_model(triton.cdiv(batch * bh * bw, block_m), n, da.device)
    dx = torch.empty(nb, c, h, wd, device=da.device, dtype=x.dtype)
    _block_dx_kernel[(groups, triton.cdiv(c * pool * pool, block_n), n)](
        g, ws, dx, batch, per, C=c, H=h, W=wd, PH=padding[0], PW=padding[1], HP=hp, WP=wp, BH=bh, BW=bw, NH=nh, NW=nw,
        POOL=pool, DOT=dot, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, **options,
    )
    if not weights:
        return dx, None, None
    return (dx, *_launch_wgrad(x, None, da, w.shape, padding, bias, fused=(a, code if pool > 1 else a, pool, act, slope)))


_SHIFTS: dict[tuple, Tensor] = {}


def _shifted_weights(w: Tensor, pool: int, block_k: int) -> Tensor:
    """ws[m, e, f, (d, o), (c, r, t)] = w[m, o, c, r + pool*e - di, t + pool*f - dj] where that tap exists, else 0
    (rows (d, o) padded to block_k): what output o of the pooled output e rows and f columns above a block
    sends, through window position d = (di, dj), to pixel (r, t) of the block in channel c."""
    n, o, c, kh, kw = w.shape
    key = (o, c, kh, kw, pool, block_k, str(w.device))
    if key not in _SHIFTS:
        nh, nw = -(-(kh + pool - 1) // pool), -(-(kw + pool - 1) // pool)
        e, f, kk, ci, r, t = torch.meshgrid(*(torch.arange(v) for v in (nh, nw, block_k, c, pool, pool)), indexing="ij")
        d, oi = kk // o, kk % o
        u, v = r + pool * e - d // pool, t + pool * f - d % pool
        ok = (kk < pool * pool * o) & (u >= 0) & (u < kh) & (v >= 0) & (v < kw)
        tap = ((oi * c + ci) * kh + u) * kw + v
        _SHIFTS[key] = torch.where(ok, tap, o * c * kh * kw).reshape(-1).to(w.device)  # the last column: a zero
    return torch.cat([w.reshape(n, -1), w.new_zeros(n, 1)], 1).index_select(1, _SHIFTS[key])


@population_op("pop_conv2d_pool_act_wgrad")
def _pop_conv2d_pool_act_wgrad(x: Tensor, rows: Tensor | None, da: Tensor, a: Tensor, code: Tensor, w: Tensor,
                               pad_h: int, pad_w: int, bias: bool, pool: int, act: str, slope: float) -> tuple[Tensor, Tensor]:
    dw, db = _launch_wgrad(x, rows, da.contiguous(), w.shape, (pad_h, pad_w), bias,
                           fused=(a, code if pool > 1 else a, pool, act, slope))
    return dw, db if db is not None else dw.new_zeros(0)


@_pop_conv2d_pool_act_wgrad.register_fake
def _(x, rows, da, a, code, w, pad_h, pad_w, bias, pool, act, slope):
    return _wgrad_fake(w, bias)


# ---- the fused op: act(maxpool(conv)) with the pool's choice kept for the backward ----------------------


@population_op("pop_conv2d_pool_act")
def _pop_conv2d_pool_act(x: Tensor, w: Tensor, b: Tensor | None, rows: Tensor | None, batch: int, pad_h: int,
                         pad_w: int, pool: int, act: str, slope: float, out_dtype: torch.dtype,
                         window_dx: bool, act_grad: bool, input_act: str, input_slope: float) -> tuple[Tensor, Tensor]:
    return _launch_pool_act(x, rows, w.contiguous(), b, batch, (pad_h, pad_w), pool, act, slope, out_dtype)


@_pop_conv2d_pool_act.register_fake
def _(x, w, b, rows, batch, pad_h, pad_w, pool, act, slope, out_dtype, window_dx, act_grad, input_act, input_slope):
    n, o, _, kh, kw = w.shape
    shape = (n * batch, o, (x.shape[2] + 2 * pad_h - kh + 1) // pool, (x.shape[3] + 2 * pad_w - kw + 1) // pool)
    if _plain(x.shape[1], o, pool):  # the plain forward's output, in its memory format
        return _output(shape, x.shape[1], x, out_dtype), x.new_empty(0, dtype=torch.int8)
    return x.new_empty(shape, dtype=out_dtype), x.new_empty(shape if pool > 1 else (0,), dtype=torch.int8)


def _setup_pool_act(ctx, inputs, output) -> None:
    x, w, b, rows, batch, pad_h, pad_w, pool, act, slope, _, window_dx, act_grad, input_act, input_slope = inputs
    a, code = output
    if not act_grad:  # the gradient arrives through the activation already: the output is not read again
        a, act = a.new_empty(0), "identity"
    ctx.save_for_backward(x, w, rows, a, code)
    plain = _plain(w.shape[2], w.shape[1], pool)
    ctx.meta = (batch, pad_h, pad_w, b is not None, x.dtype, pool, act, slope, window_dx, plain, (input_act, input_slope))
    ctx.mark_non_differentiable(code)


def _unpool(dz: Tensor, code: Tensor, pool: int, out_hw: tuple[int, int]) -> Tensor:
    """max_pool2d's backward: each pooled gradient to the window position `code` chose, zeros elsewhere."""
    nb, o, hp, wp = dz.shape
    hit = code.unsqueeze(-1) == torch.arange(pool * pool, device=code.device, dtype=code.dtype)  # [..., hp, wp, k*k]
    dy = (dz.unsqueeze(-1) * hit).view(nb, o, hp, wp, pool, pool).permute(0, 1, 2, 4, 3, 5).reshape(nb, o, hp * pool, wp * pool)
    if (hp * pool, wp * pool) != out_hw:  # rows/columns the pool's floor dropped get no gradient
        dy = torch.nn.functional.pad(dy, (0, out_hw[1] - wp * pool, 0, out_hw[0] - hp * pool))
    return dy


@population_op("pop_pooled_grads")
def _pop_pooled_grads(da: Tensor, a: Tensor, code: Tensor, w: Tensor, x: Tensor, pad_h: int, pad_w: int, pool: int,
                      act: str, slope: float, bias: bool, weights: bool) -> tuple[Tensor, Tensor, Tensor]:
    """dx, and dw, db where `weights` (else empty: an input gradient through frozen weights)."""
    dx, dw, db = _launch_pooled_grads(da.contiguous(), a, code, w.contiguous(), x.contiguous(), (pad_h, pad_w), pool, act,
                                      slope, bias, weights)
    def empty() -> Tensor:  # a fresh one each: outputs of a custom op may not alias
        return w.new_zeros(0, dtype=torch.float32)

    return dx, dw if dw is not None else empty(), db if db is not None else empty()


@_pop_pooled_grads.register_fake
def _(da, a, code, w, x, pad_h, pad_w, pool, act, slope, bias, weights):
    dw, db = _wgrad_fake(w, bias) if weights else (w.new_empty(0, dtype=torch.float32), w.new_empty(0, dtype=torch.float32))
    return torch.empty_like(x), dw, db


def _backward_pool_act(ctx, da: Tensor, _dcode: Tensor | None):
    x, w, rows, a, code = ctx.saved_tensors
    batch, pad_h, pad_w, has_bias, x_dtype, pool, act, slope, window_dx, plain, through = ctx.meta
    nothing = (None,) * 12
    window_dx = ctx.needs_input_grad[0] and pool > 1 and window_dx
    if window_dx and rows is None:  # dx per block of input pixels and dw, db in one op
        weights = ctx.needs_input_grad[1] or (has_bias and ctx.needs_input_grad[2])
        dx, dw, db = _pop_pooled_grads(da, a, code, w, x, pad_h, pad_w, pool, act, slope, has_bias, weights)
        dw = dw.to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, (db if has_bias and ctx.needs_input_grad[2] else None), *nothing
    if not ctx.needs_input_grad[0] and not plain:  # the weight-gradient kernel rebuilds the conv's dy itself
        if not (ctx.needs_input_grad[1] or (has_bias and ctx.needs_input_grad[2])):
            return None, None, None, *nothing
        a = a if a.numel() else da  # no activation left to undo (act_grad off): a is not read
        dw, db = _pop_conv2d_pool_act_wgrad(x, rows, da, a, code, w, pad_h, pad_w, has_bias, pool, act, slope)
        return None, dw.to(w.dtype), (db if has_bias else None), *nothing
    dz = _act_backward(da, a, act, slope)
    if pool > 1:
        out_hw = (x.shape[2] + 2 * pad_h - w.shape[3] + 1, x.shape[3] + 2 * pad_w - w.shape[4] + 1)
        dz = _unpool(dz, code, pool, out_hw)
    return (*_conv_grads(ctx.needs_input_grad, dz, x, w, rows, batch, pad_h, pad_w, has_bias, x_dtype, through),
            *nothing)


_pop_conv2d_pool_act.register_autograd(_backward_pool_act, setup_context=_setup_pool_act)


class _SpatialMean(torch.autograd.Function):
    """a.mean over (H, W), whose backward returns the gradient w.r.t. the input of the activation that wrote a:
    (dy / HW) broadcast times act'(a), one pass where the mean's own backward and the activation's were two."""

    @staticmethod
    def forward(ctx, a: Tensor, act: str, slope: float, keepdim: bool) -> Tensor:
        ctx.save_for_backward(a)
        ctx.meta = (act, slope, keepdim)
        return a.mean(dim=(-2, -1), keepdim=keepdim)

    @staticmethod
    def backward(ctx, dy: Tensor):
        (a,), (act, slope, keepdim) = ctx.saved_tensors, ctx.meta
        g = dy / (a.shape[-2] * a.shape[-1])
        g = (g if keepdim else g[..., None, None]).expand_as(a)
        return _act_backward(g, a, act, slope), None, None, None


def spatial_mean(a: Tensor, act: str = "identity", slope: float = 0.0, keepdim: bool = False) -> Tensor:
    """a.mean(dim=(-2, -1)) of a [R, C, H, W] map; `act` (one of EPILOGUE_ACTIVATIONS, `slope` leaky_relu's): a is
    that activation's output, written by a conv that leaves the derivative to this mean (`conv2d_pool_act(..,
    act_grad=False)`), and the backward returns the gradient w.r.t. the activation's input."""
    if act not in EPILOGUE_ACTIVATIONS:
        raise ValueError(f"act = {act!r} is not allowed; expected one of {', '.join(EPILOGUE_ACTIVATIONS)}")
    return _SpatialMean.apply(a, act, float(slope), bool(keepdim))


def fuses(out_channels: int, pool: int = 2) -> bool:
    """Whether `conv2d_pool_act` runs as one kernel for a conv with this many outputs and this pool: the
    CUDA-core forward with the pool and activation folded in, for up to 16 outputs (from any number of
    inputs); without a pool (1), any conv, a wider one with the activation in its own forward's epilogue."""
    return tuning.current().fuse and (pool == 1 or _pool_act_kernel(out_channels))


def conv2d_pool_act(x: Tensor, w: Tensor, b: Tensor | None, padding: tuple[int, int] = (0, 0), *,
                    pool: int = 2, act: str = "identity", slope: float = 0.0, rows: Tensor | None = None,
                    out_dtype: torch.dtype | None = None, windows: Tensor | None = None,
                    window_dx: bool | None = None, act_grad: bool = True,
                    input_act: tuple[str, float] | None = None, stride: tuple[int, int] = (1, 1)) -> Tensor:
    """act(max_pool2d(conv2d(x, w, b), pool)) per model in one kernel (pool 1: no pool), as `conv2d`'s arguments.

    `act` is one of EPILOGUE_ACTIVATIONS (`slope`: leaky_relu's negative slope); the max is taken before the
    activation, which for these monotone functions is the same as after it. Only the pooled output
    and a byte per output (which window position was the max) are written; gradients flow as through
    the unfused layers. With `rows`, `windows` may be x's `window_table(x, (kh, kw), padding, pool)`: the
    first layer as tensor-core products over whole-window rows, the same result. `window_dx` (default
    the tuning's window_dx) picks how a pooled layer's input gradient is computed (both exact; the choice is an
    argument so a compiled program records it). `act_grad=False` (no pool only): the output's one reader applies
    the activation's derivative in its own backward (`max_pool2x2(.., act=act)`, `spatial_mean`, a conv's
    `input_act`), so the gradient arriving here
    is w.r.t. the activation's input and the full output's activation pass is not run. `input_act` (no pool
    only) as `conv2d`'s: x is the output of an activation whose derivative this conv's input gradient applies.
    A `stride` as `conv2d`'s: without a pool, at that stride with the activation in the epilogue where
    `strided_reads_directly`; else the stride-1 conv of the input's blocks, pooled and activated as asked.
    """
    if pool not in (1, 2) or act not in EPILOGUE_ACTIVATIONS:
        raise ValueError(f"pool = {pool!r}, act = {act!r}: allowed pool 1 or 2 and act one of {', '.join(EPILOGUE_ACTIVATIONS)}")
    if not act_grad and pool != 1:
        raise ValueError(f"act_grad=False with pool = {pool!r} is not allowed: the activation's derivative is left to the "
                         "output's reader only without a pool (pool=1)")
    if input_act is not None and pool != 1:
        raise ValueError(f"input_act = {input_act!r} with pool = {pool!r} is not allowed: the input activation's "
                         "derivative is applied in the plain input gradient, only without a pool (pool=1)")
    x, w, rows, batch = _checked(x, w, rows)
    stride = _stride(stride, rows, windows, input_act)
    if stride != (1, 1):
        padding = (int(padding[0]), int(padding[1]))
        if pool == 1 and strided_reads_directly(x.shape[1], w.shape[1]):
            return _pop_conv2d_strided(x, w, b, batch, *stride, *padding, act, float(slope), bool(act_grad),
                                       out_dtype or x.dtype)
        return conv2d_pool_act(*_as_blocks(x, w, stride, padding), b, pool=pool, act=act, slope=slope,
                               out_dtype=out_dtype, window_dx=window_dx, act_grad=act_grad)
    through = _input_act(input_act, rows, windows)
    if windows is not None:
        return _window_conv(windows, x, w, b, padding, _need_rows(rows), batch, pool, act, slope, out_dtype or x.dtype,
                            act_grad)
    window_dx = tuning.current().window_dx if window_dx is None else bool(window_dx)
    a, _ = _pop_conv2d_pool_act(x, w, b, rows, batch, int(padding[0]), int(padding[1]), pool, act, float(slope),
                                out_dtype or x.dtype, window_dx, bool(act_grad), *through)
    return a
