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

Linears of one input (`linears`: a transformer's query, key and value maps) run as one, their weights side by
side: the forward reads x once and writes each output, and the backward's input gradient reads every output's
gradient in one product, dx = sum_i dy_i @ w_i[m], where autograd would write each term and add them.

Products take x's dtype (bf16 on tensor cores; float32 exactly), accumulate in float32; y and dx are stored in
x's dtype, as autocast's batched matmul stores them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from zoos.popconv.common import available, dot_precision, triton

MAX_FEATURES = 128  # the widest input or output a program holds whole: one [in, out] weight tile
MAX_PARTS = 3  # the most linears of one input (`linears`) a program runs together

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _row_at(row, INNER, OUTER_STRIDE, INNER_STRIDE):
        """Where row `row` of a two-level row layout starts (`_row_layout`)."""
        return (row // INNER) * OUTER_STRIDE + (row % INNER) * INNER_STRIDE

    @triton.jit
    def _load_part(tile, ptr, row, r_ok, c, START, WIDTH, INNER, OUTER_STRIDE, INNER_STRIDE):
        """tile plus columns START..START+WIDTH of rows `row` of one part ([rows, WIDTH], its rows in a two-level
        layout), zero elsewhere."""
        at = _row_at(row, INNER, OUTER_STRIDE, INNER_STRIDE)
        ok = r_ok[:, None] & ((c >= START) & (c < START + WIDTH))[None, :]
        return tile + tl.load(ptr + at[:, None] + (c - START)[None, :], mask=ok, other=0.0)

    @triton.jit
    def _load_parts(ptr0, ptr1, ptr2, row, r_ok, c, W0, W1, W2, L0_INNER, L0_OUTER, L0_STRIDE, L1_INNER, L1_OUTER,
                    L1_STRIDE, L2_INNER, L2_OUTER, L2_STRIDE, PARTS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_C: tl.constexpr):
        """A [BLOCK_M, BLOCK_C] tile of rows `row` of the columns of up to three parts side by side (widths W0, W1,
        W2; each its own two-level row layout), zero past them."""
        tile = _load_part(tl.zeros((BLOCK_M, BLOCK_C), ptr0.dtype.element_ty), ptr0, row, r_ok, c, 0, W0, L0_INNER,
                          L0_OUTER, L0_STRIDE)
        if PARTS > 1:
            tile = _load_part(tile, ptr1, row, r_ok, c, W0, W1, L1_INNER, L1_OUTER, L1_STRIDE)
        if PARTS > 2:
            tile = _load_part(tile, ptr2, row, r_ok, c, W0 + W1, W2, L2_INNER, L2_OUTER, L2_STRIDE)
        return tile

    @triton.jit
    def _store_part(ptr, row, r_ok, c, tile, START, WIDTH):
        """Columns START..START+WIDTH of tile into rows `row` of a contiguous [rows, WIDTH] part."""
        ok = r_ok[:, None] & ((c >= START) & (c < START + WIDTH))[None, :]
        tl.store(ptr + row[:, None] * WIDTH + (c - START)[None, :], tile.to(ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _rows_times_weight(x0, x1, x2, w_ptr, b_ptr, y0, y1, y2, RPM, EACH, XW0, XW1, XW2, X0_INNER, X0_OUTER,
                           X0_STRIDE, X1_INNER, X1_OUTER, X1_STRIDE, X2_INNER, X2_OUTER, X2_STRIDE, YW0, YW1, YW2,
                           W_K, W_N, K: tl.constexpr, N: tl.constexpr, X_PARTS: tl.constexpr, Y_PARTS: tl.constexpr,
                           HAS_BIAS: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_N: tl.constexpr):
        """y[rows] = x[rows] @ W_m (+ b_m) over EACH tiles of model m's rows: W_m [K, N] read with strides (W_K, W_N)
        from m's weight (the forward: w^T; the input gradient: w itself); x's K columns in up to three parts side
        by side, each its rows in a two-level layout; y's N columns written to up to three contiguous parts."""
        prog, m = tl.program_id(0), tl.program_id(1)
        k, n = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_N)
        w = tl.load(w_ptr + m.to(tl.int64) * (K * N) + k[:, None] * W_K + n[None, :] * W_N,
                    mask=(k < K)[:, None] & (n < N)[None, :], other=0.0).to(x0.dtype.element_ty)
        if HAS_BIAS:
            bias = tl.load(b_ptr + m * N + n, mask=n < N, other=0.0).to(tl.float32)
        for t in range(prog * EACH, tl.minimum(prog * EACH + EACH, tl.cdiv(RPM, BLOCK_M))):
            r = t * BLOCK_M + tl.arange(0, BLOCK_M)
            row, r_ok = m.to(tl.int64) * RPM + r, r < RPM
            x = _load_parts(x0, x1, x2, row, r_ok, k, XW0, XW1, XW2, X0_INNER, X0_OUTER, X0_STRIDE, X1_INNER,
                            X1_OUTER, X1_STRIDE, X2_INNER, X2_OUTER, X2_STRIDE, X_PARTS, BLOCK_M, BLOCK_K)
            acc = tl.dot(x, w, input_precision=PREC)
            if HAS_BIAS:
                acc += bias[None, :]
            _store_part(y0, row, r_ok, n, acc, 0, YW0)
            if Y_PARTS > 1:
                _store_part(y1, row, r_ok, n, acc, YW0, YW1)
            if Y_PARTS > 2:
                _store_part(y2, row, r_ok, n, acc, YW0 + YW1, YW2)

    @triton.jit
    def _weight_grad_kernel(x_ptr, dy0, dy1, dy2, dw_ptr, db_ptr, RPM, EACH, PROGRAMS, X_INNER, X_OUTER_STRIDE,
                            X_INNER_STRIDE, DW0, DW1, DW2, D0_INNER, D0_OUTER, D0_STRIDE, D1_INNER, D1_OUTER,
                            D1_STRIDE, D2_INNER, D2_OUTER, D2_STRIDE, K: tl.constexpr, N: tl.constexpr,
                            DY_PARTS: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """dw partial [N, K] = sum over EACH tiles of model m's rows of dy^T x (and db partial: dy's column sums),
        stored at [m, program] of dw [models, PROGRAMS, N, K] and db [models, PROGRAMS, N]; x's rows in a
        two-level layout, dy's N columns in up to three parts side by side, each its rows in one."""
        prog, m = tl.program_id(0), tl.program_id(1)
        k, n = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # summed over rows once, after the loop
        for t in range(prog * EACH, tl.minimum(prog * EACH + EACH, tl.cdiv(RPM, BLOCK_M))):
            r = t * BLOCK_M + tl.arange(0, BLOCK_M)
            row, r_ok = m.to(tl.int64) * RPM + r, r < RPM
            x_at = _row_at(row, X_INNER, X_OUTER_STRIDE, X_INNER_STRIDE)
            x = tl.load(x_ptr + x_at[:, None] + k[None, :], mask=r_ok[:, None] & (k < K)[None, :], other=0.0)
            g = _load_parts(dy0, dy1, dy2, row, r_ok, n, DW0, DW1, DW2, D0_INNER, D0_OUTER, D0_STRIDE, D1_INNER,
                            D1_OUTER, D1_STRIDE, D2_INNER, D2_OUTER, D2_STRIDE, DY_PARTS, BLOCK_M, BLOCK_N)
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


def _padded(items: list, fill: Any) -> list:
    """items, up to MAX_PARTS of them, padded to MAX_PARTS with `fill` (a kernel's unused part arguments)."""
    return list(items) + [fill] * (MAX_PARTS - len(items))


def _parts_args(parts: list[Tensor]) -> tuple[list[Tensor], list]:
    """Up to MAX_PARTS row tensors read side by side (`_load_parts`): (the tensors as read, the kernel's
    arguments after their pointers: widths, then each part's two-level row layout)."""
    laid = [_row_layout(t) for t in parts]
    tensors = [t for t, _ in laid]
    layouts = [v for _, layout in laid for v in layout] + [1, 0, 0] * (MAX_PARTS - len(parts))
    return tensors, _padded([t.shape[-1] for t in tensors], 0) + layouts


def _times(xs: list[Tensor], w: Tensor, b: Tensor | None, models: int, strides: tuple[int, int],
           widths: list[int]) -> list[Tensor]:
    """The rows of xs (up to MAX_PARTS tensors [models*R rows (`_row_layout`), k_i] read as one [rows, k] side by
    side) times each model's [k, n] weight (+ b), written to len(widths) contiguous parts [*rows shape, width]."""
    xs, x_args = _parts_args([t.to(xs[0].dtype) for t in xs])
    k, n = sum(t.shape[-1] for t in xs), sum(widths)
    lead = xs[0].shape[:-1]
    ys = [xs[0].new_empty(*lead, width) for width in widths]
    rpm = math.prod(lead) // models
    block_m, block_k, block_n, warps = _blocks(k, n)
    programs, each = _programs(triton.cdiv(rpm, block_m), models, xs[0].device)
    if rpm:
        _rows_times_weight[(programs, models)](
            *_padded(xs, xs[0]), w, b if b is not None else w, *_padded(ys, ys[0]), rpm, each, *x_args,
            *_padded(widths, 0), strides[0], strides[1], K=k, N=n, X_PARTS=len(xs), Y_PARTS=len(ys),
            HAS_BIAS=b is not None, PREC=dot_precision(xs[0].dtype), BLOCK_M=block_m, BLOCK_K=block_k,
            BLOCK_N=block_n, num_warps=warps)
    return ys


@torch.library.custom_op("symzoo::pop_linear", mutates_args=())
def _pop_linear(x: Tensor, w: Tensor, b: Tensor | None, widths: list[int]) -> list[Tensor]:
    n, out_f, in_f = w.shape
    return _times([x], w.contiguous(), b.contiguous() if b is not None else None, n, (1, in_f), widths)


@_pop_linear.register_fake
def _(x, w, b, widths):
    return [x.new_empty(*x.shape[:-1], width) for width in widths]


@torch.library.custom_op("symzoo::pop_linear_backward", mutates_args=())
def _pop_linear_backward(x: Tensor, dys: list[Tensor], w: Tensor, input_grad: bool, weight_grad: bool, bias: bool
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """(dx or empty, dw or empty, db or empty) from the outputs' gradients dys (side by side: w's rows): dx in
    x's dtype, dw and db float32; x's and each dy's rows read where they lie (`_row_layout`)."""
    models, out_f, in_f = w.shape
    empty = w.new_empty(0, dtype=torch.float32)
    dx = _times(dys, w.contiguous(), None, models, (in_f, 1), [in_f])[0].to(x.dtype) if input_grad else x.new_empty(0)
    if not weight_grad:
        return dx, empty, w.new_empty(0, dtype=torch.float32)  # outputs never alias each other
    x, x_layout = _row_layout(x)
    dys, dy_args = _parts_args([t.to(dys[0].dtype) for t in dys])
    rpm = math.prod(dys[0].shape[:-1]) // models
    block_m, block_k, block_n, warps = _blocks(in_f, out_f)
    programs, each = _programs(triton.cdiv(rpm, block_m), models, x.device, least=8)
    dw = x.new_empty(models, programs, out_f, in_f, dtype=torch.float32)
    db = x.new_empty(models, programs, out_f, dtype=torch.float32) if bias else dw
    if rpm:
        _weight_grad_kernel[(programs, models)](
            x, *_padded(dys, dys[0]), dw, db, rpm, each, programs, *x_layout, *dy_args, K=in_f, N=out_f,
            DY_PARTS=len(dys), HAS_BIAS=bias, PREC=dot_precision(dys[0].dtype), BLOCK_M=block_m, BLOCK_K=block_k,
            BLOCK_N=block_n, num_warps=warps)
    else:
        dw.zero_(), db.zero_()
    return dx, dw.sum(1), db.sum(1) if bias else empty


@_pop_linear_backward.register_fake
def _(x, dys, w, input_grad, weight_grad, bias):
    empty = w.new_empty(0, dtype=torch.float32)
    return (x.new_empty(x.shape) if input_grad else x.new_empty(0),
            w.new_empty(w.shape, dtype=torch.float32) if weight_grad else empty,
            w.new_empty(w.shape[:2], dtype=torch.float32) if weight_grad and bias else empty)


def _setup(ctx, inputs, output) -> None:
    x, w, b, _ = inputs
    ctx.save_for_backward(x, w)
    ctx.bias = b is not None


def _backward(ctx, dys: list[Tensor]):
    x, w = ctx.saved_tensors
    needs = ctx.needs_input_grad
    weights = needs[1] or (ctx.bias and needs[2])
    dx, dw, db = _pop_linear_backward(x, list(dys), w, needs[0], weights, ctx.bias)
    return (dx if needs[0] else None, dw.to(w.dtype) if needs[1] else None,
            db.to(w.dtype) if ctx.bias and needs[2] else None, None)


_pop_linear.register_autograd(_backward, setup_context=_setup)


def _check(x: Tensor, w: Tensor, b: Tensor | None) -> None:
    """x [N*R, ..., in], w [N, out, in] and b [N, out] or None agree, within MAX_FEATURES; else ValueError."""
    if w.dim() != 3 or (b is not None and tuple(b.shape) != tuple(w.shape[:2])) or x.shape[-1] != w.shape[2]:
        raise ValueError(f"x [N*R, ..., in], w [N, out, in] and b [N, out] disagree: x {tuple(x.shape)}, "
                         f"w {tuple(w.shape)}, b {None if b is None else tuple(b.shape)}")
    models, out_f, in_f = w.shape
    if not fits(in_f, out_f):
        raise ValueError(f"linear here takes up to {MAX_FEATURES} inputs and outputs, got {in_f} -> {out_f}")
    rows = math.prod(x.shape[:-1])
    if rows % models:
        raise ValueError(f"x has {rows} rows, not a multiple of the population size {models}")


def linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """nn.Linear of model m on rows m*R..(m+1)*R-1 of x [N*R, ..., in] (any leading shape: its rows in order),
    w [N, out, in], b [N, out] or None, in and out up to MAX_FEATURES: y [N*R, ..., out] in x's dtype, the
    weights cast to it as they are read (autocast's linear). Gradients to x, w and b."""
    _check(x, w, b)
    return _pop_linear(x, w, b, [w.shape[1]])[0]  # x's rows read where they lie (`_row_layout`)


def linears(x: Tensor, ws: Sequence[Tensor], bs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """`linear(x, w, b)` for each (w, b) of ws and bs (up to MAX_PARTS, their outputs together up to MAX_FEATURES)
    as one: x read once in the forward, and in the backward its gradient the sum of theirs in one pass (where
    autograd would write each and add them). Each output contiguous."""
    if not 1 <= len(ws) <= MAX_PARTS or len(bs) != len(ws):
        raise ValueError(f"linears takes 1 to {MAX_PARTS} weights and as many biases, got {len(ws)} and {len(bs)}")
    for w, b in zip(ws, bs):
        if w.dim() != 3 or w.shape[0] != ws[0].shape[0]:
            raise ValueError(f"every weight is [N, out, in] of one population: got {[tuple(v.shape) for v in ws]}")
        _check(x, w, b)
    widths = [w.shape[1] for w in ws]
    if sum(widths) > MAX_FEATURES:
        raise ValueError(f"linears here take up to {MAX_FEATURES} outputs together, got {' + '.join(map(str, widths))}")
    w = torch.cat(list(ws), 1) if len(ws) > 1 else ws[0]
    if all(b is None for b in bs):
        b = None
    else:
        b = torch.cat([v if v is not None else w.new_zeros(w.shape[0], width) for v, width in zip(bs, widths)], 1)
    return tuple(_pop_linear(x, w, b, widths))


__all__ = ["MAX_FEATURES", "MAX_PARTS", "available", "fits", "linear", "linears"]
