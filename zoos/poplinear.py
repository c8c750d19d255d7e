"""A population's narrow linear layers (up to 128 inputs and outputs) as Triton kernels.

Model m's nn.Linear on its rows of the population's batch x [N*R, in] (R rows a model: its samples, or its
samples' tokens), w [N, out, in], b [N, out]:

  y[m*R + r] = x[m*R + r] @ w[m]^T + b[m]                      dx = dy @ w[m],   dw[m] = dy^T x,   db[m] = sum_r dy

A small zoo's layers are narrow (a ViT's 32 features), so each is far below the card's compute and moves its
rows once: as cuBLAS's batched matmul it runs at the card's bandwidth, but the bias costs two more passes over
the output (baddbmm first fills the output with the broadcast bias, one element a thread, then reads it back)
and its gradient a third (a sum over the rows). Here a program holds model m's whole weight ([in, out] in
registers, cast to the compute dtype as it is loaded) and streams tiles of rows through it: the forward reads x
and writes y once, the bias added to the float32 product; the input gradient is the same product with w's
transpose; the weight gradient sums dy^T x over a program's tiles with db as the column sums of the dy tiles it
already holds, one float32 partial a program, which torch sums over each model's programs.

Products take x's dtype (bf16 on tensor cores; float32 exactly), accumulate in float32; y and dx are stored in
x's dtype, as autocast's batched matmul stores them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zoos.popconv.common import available, dot_precision, triton

MAX_FEATURES = 128  # the widest input or output a program holds whole: one [in, out] weight tile

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _row_at(row, INNER, OUTER_STRIDE, INNER_STRIDE):
        """Where row `row` of a two-level row layout starts (`_row_layout`)."""
        return (row // INNER) * OUTER_STRIDE + (row % INNER) * INNER_STRIDE

    @triton.jit
    def _rows_times_weight(x_ptr, w_ptr, b_ptr, y_ptr, RPM, EACH, X_INNER, X_OUTER_STRIDE, X_INNER_STRIDE, W_K, W_N,
                           K: tl.constexpr, N: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """y[rows] = x[rows] @ W_m (+ b_m) over EACH tiles of model m's rows: W_m [K, N] read with strides (W_K, W_N)
        from m's weight (the forward: w^T; the input gradient: w itself); x's rows in a two-level layout, y
        contiguous."""
        prog, m = tl.program_id(0), tl.program_id(1)
        k, n = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_N)
        w = tl.load(w_ptr + m.to(tl.int64) * (K * N) + k[:, None] * W_K + n[None, :] * W_N,
                    mask=(k < K)[:, None] & (n < N)[None, :], other=0.0).to(x_ptr.dtype.element_ty)
        if HAS_BIAS:
            bias = tl.load(b_ptr + m * N + n, mask=n < N, other=0.0).to(tl.float32)
        for t in range(prog * EACH, tl.minimum(prog * EACH + EACH, tl.cdiv(RPM, BLOCK_M))):
            r = t * BLOCK_M + tl.arange(0, BLOCK_M)
            row = m.to(tl.int64) * RPM + r
            x_at = _row_at(row, X_INNER, X_OUTER_STRIDE, X_INNER_STRIDE)
            x = tl.load(x_ptr + x_at[:, None] + k[None, :], mask=(r < RPM)[:, None] & (k < K)[None, :], other=0.0)
            acc = tl.dot(x, w, input_precision=PREC)
            if HAS_BIAS:
                acc += bias[None, :]
            tl.store(y_ptr + row[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=(r < RPM)[:, None] & (n < N)[None, :])

    @triton.jit
    def _weight_grad_kernel(x_ptr, dy_ptr, dw_ptr, db_ptr, RPM, EACH, PROGRAMS, X_INNER, X_OUTER_STRIDE,
                            X_INNER_STRIDE, DY_INNER, DY_OUTER_STRIDE, DY_INNER_STRIDE,
                            K: tl.constexpr, N: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """dw partial [N, K] = sum over EACH tiles of model m's rows of dy^T x (and db partial: dy's column sums),
        stored at [m, program] of dw [models, PROGRAMS, N, K] and db [models, PROGRAMS, N]; x's and dy's rows
        in two-level layouts."""
        prog, m = tl.program_id(0), tl.program_id(1)
        k, n = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # summed over rows once, after the loop
        for t in range(prog * EACH, tl.minimum(prog * EACH + EACH, tl.cdiv(RPM, BLOCK_M))):
            r = t * BLOCK_M + tl.arange(0, BLOCK_M)
            row = m.to(tl.int64) * RPM + r
            x_at = _row_at(row, X_INNER, X_OUTER_STRIDE, X_INNER_STRIDE)
            dy_at = _row_at(row, DY_INNER, DY_OUTER_STRIDE, DY_INNER_STRIDE)
            x = tl.load(x_ptr + x_at[:, None] + k[None, :], mask=(r < RPM)[:, None] & (k < K)[None, :], other=0.0)
            g = tl.load(dy_ptr + dy_at[:, None] + n[None, :], mask=(r < RPM)[:, None] & (n < N)[None, :], other=0.0)
            acc += tl.dot(tl.trans(g), x.to(g.dtype), input_precision=PREC)
            if HAS_BIAS:
                acc_b += g.to(tl.float32)
        part = m.to(tl.int64) * PROGRAMS + prog
        tl.store(dw_ptr + part * (N * K) + n[:, None] * K + k[None, :], acc, mask=(n < N)[:, None] & (k < K)[None, :])
        if HAS_BIAS:
            tl.store(db_ptr + part * N + n, tl.sum(acc_b, axis=0), mask=n < N)


def fits(in_features: int, out_features: int) -> bool:
    """Whether a linear layer of these widths runs here."""
    return 1 <= in_features <= MAX_FEATURES and 1 <= out_features <= MAX_FEATURES


def _blocks(k: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_N, warps): the widths padded to powers of two of at least 16 (tl.dot's least),
    128 rows a tile (64 beside the widest weights)."""
    bk, bn = max(16, triton.next_power_of_2(k)), max(16, triton.next_power_of_2(n))
    return (64 if bk * bn > 64 * 64 else 128), bk, bn, (8 if bk * bn > 64 * 64 else 4)


def _programs(tiles: int, models: int, device: torch.device, least: int = 1) -> tuple[int, int]:
    """(programs a model, tiles a program): about 16 programs a multiprocessor in all, at least `least` tiles each."""
    if tiles == 0:
        return 1, 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    programs = max(1, min(triton.cdiv(tiles, least), triton.cdiv(16 * sms, models)))
    each = triton.cdiv(tiles, programs)
    return triton.cdiv(tiles, each), each


def _row_layout(x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """x [..., features] (features unit-stride) as rows in at most two levels: (x, (inner, outer stride, inner
    stride)), row r at (r // inner) * outer stride + (r % inner) * inner stride, so a slice of a wider tensor's
    middle axis (a Clifford layer's grade of [.., points, blades, channels]) is read where it lies; x made
    contiguous where its rows need more levels."""
    if x.stride(-1) == 1:
        merged: list[tuple[int, int]] = []  # (size, stride) of the row axes, outermost first
        for n, st in zip(x.shape[:-1], x.stride()[:-1]):
            if n == 1:
                continue
            if merged and merged[-1][1] == n * st:
                merged[-1] = (merged[-1][0] * n, st)
            else:
                merged.append((n, st))
        if len(merged) <= 1:
            return x, (1, merged[0][1] if merged else 0, 0)
        if len(merged) == 2:
            return x, (merged[1][0], merged[0][1], merged[1][1])
    x = x.contiguous()
    return x, (1, x.shape[-1], 0)


def _times(x: Tensor, w: Tensor, b: Tensor | None, models: int, k: int, n: int, strides: tuple[int, int]) -> Tensor:
    """x [models*R rows (`_row_layout`), k] times each model's [k, n] weight (+ b): y [*x.shape[:-1], n] contiguous."""
    x, layout = _row_layout(x)
    y = x.new_empty(*x.shape[:-1], n)
    rpm = y.numel() // n // models
    block_m, block_k, block_n, warps = _blocks(k, n)
    programs, each = _programs(triton.cdiv(rpm, block_m), models, x.device)
    if y.numel():
        _rows_times_weight[(programs, models)](
            x, w, b if b is not None else w, y, rpm, each, *layout, strides[0], strides[1], K=k, N=n,
            HAS_BIAS=b is not None, PREC=dot_precision(x.dtype), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n,
            num_warps=warps)
    return y


@torch.library.custom_op("symzoo::pop_linear", mutates_args=())
def _pop_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    n, out_f, in_f = w.shape
    return _times(x, w.contiguous(), b.contiguous() if b is not None else None, n, in_f, out_f, (1, in_f))


@_pop_linear.register_fake
def _(x, w, b):
    return x.new_empty(*x.shape[:-1], w.shape[1])


@torch.library.custom_op("symzoo::pop_linear_backward", mutates_args=())
def _pop_linear_backward(x: Tensor, dy: Tensor, w: Tensor, input_grad: bool, weight_grad: bool, bias: bool
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """(dx or empty, dw or empty, db or empty): dx in x's dtype, dw and db float32; x's and dy's rows read where
    they lie (`_row_layout`)."""
    models, out_f, in_f = w.shape
    dx = _times(dy, w.contiguous(), None, models, out_f, in_f, (in_f, 1)).to(x.dtype) if input_grad else x.new_empty(0)
    if not weight_grad:
        return dx, w.new_empty(0, dtype=torch.float32), w.new_empty(0, dtype=torch.float32)
    x, x_layout = _row_layout(x)
    dy, dy_layout = _row_layout(dy)
    rpm = dy.numel() // out_f // models
    block_m, block_k, block_n, warps = _blocks(in_f, out_f)
    programs, each = _programs(triton.cdiv(rpm, block_m), models, x.device, least=8)
    dw = x.new_empty(models, programs, out_f, in_f, dtype=torch.float32)
    db = x.new_empty(models, programs, out_f, dtype=torch.float32) if bias else dw
    if rpm:
        _weight_grad_kernel[(programs, models)](
            x, dy, dw, db, rpm, each, programs, *x_layout, *dy_layout, K=in_f, N=out_f, HAS_BIAS=bias,
            PREC=dot_precision(dy.dtype), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=warps)
    else:
        dw.zero_(), db.zero_()
    return dx, dw.sum(1), db.sum(1) if bias else w.new_empty(0, dtype=torch.float32)


@_pop_linear_backward.register_fake
def _(x, dy, w, input_grad, weight_grad, bias):
    empty = w.new_empty(0, dtype=torch.float32)
    return (x.new_empty(x.shape) if input_grad else x.new_empty(0),
            w.new_empty(w.shape, dtype=torch.float32) if weight_grad else empty,
            w.new_empty(w.shape[:2], dtype=torch.float32) if weight_grad and bias else w.new_empty(0, dtype=torch.float32))


def _setup(ctx, inputs, output) -> None:
    x, w, b = inputs
    ctx.save_for_backward(x, w)
    ctx.bias = b is not None


def _backward(ctx, dy: Tensor):
    x, w = ctx.saved_tensors
    needs = ctx.needs_input_grad
    weights = needs[1] or (ctx.bias and needs[2])
    dx, dw, db = _pop_linear_backward(x, dy, w, needs[0], weights, ctx.bias)
    return (dx if needs[0] else None, dw.to(w.dtype) if needs[1] else None,
            db.to(w.dtype) if ctx.bias and needs[2] else None)


_pop_linear.register_autograd(_backward, setup_context=_setup)


def linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """nn.Linear of model m on rows m*R..(m+1)*R-1 of x [N*R, ..., in] (any leading shape: its rows in order),
    w [N, out, in], b [N, out] or None, in and out up to MAX_FEATURES: y [N*R, ..., out] in x's dtype, the
    weights cast to it as they are read (autocast's linear). Gradients to x, w and b."""
    if w.dim() != 3 or (b is not None and tuple(b.shape) != tuple(w.shape[:2])) or x.shape[-1] != w.shape[2]:
        raise ValueError(f"x [N*R, ..., in], w [N, out, in] and b [N, out] disagree: x {tuple(x.shape)}, "
                         f"w {tuple(w.shape)}, b {None if b is None else tuple(b.shape)}")
    models, out_f, in_f = w.shape
    if not fits(in_f, out_f):
        raise ValueError(f"linear here takes up to {MAX_FEATURES} inputs and outputs, got {in_f} -> {out_f}")
    rows = math.prod(x.shape[:-1])
    if rows % models:
        raise ValueError(f"x has {rows} rows, not a multiple of the population size {models}")
    return _pop_linear(x, w, b)  # x's rows read where they lie (`_row_layout`)


__all__ = ["MAX_FEATURES", "available", "fits", "linear"]
