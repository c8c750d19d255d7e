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
side: the forward reads each tile of x once and runs a product a part, each part's output contiguous; the input
gradient sums the parts' products dy_j @ w_j[m] in registers and writes dx once, where autograd would write each
term and add them; the weight gradient runs a pass a part into the one weight's gradient.

A linear reading an activation of its input (`input_act`: an MLP's hidden layer, any pointwise activation) applies
it to each tile of x as it loads it, in the forward and in the weight gradient, and multiplies its input gradient
by the activation's derivative at x before storing it: the activation's output and its gradient are never written,
where the activation alone would read and write the layer's input twice (its forward and its backward).

Products take x's dtype (bf16 on tensor cores; float32 exactly), accumulate in float32; y and dx are stored in
x's dtype, as autocast's batched matmul stores them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from zoos.popconv.common import INPUT_ACTIVATIONS, available, dot_precision, population_op, triton

MAX_FEATURES = 128  # the widest input or output a program holds whole: one [in, out] weight tile
MAX_PARTS = 3  # the most linears of one input (`linears`) a program runs together

if triton is not None:
    import triton.language as tl

    from zoos.popconv.common import _act_grad_from_input, _activate_any

    @triton.jit
    def _row_at(row, INNER, OUTER_STRIDE, INNER_STRIDE):
        """Where row `row` of a two-level row layout starts (`_row_layout`)."""
        return (row // INNER) * OUTER_STRIDE + (row % INNER) * INNER_STRIDE

    @triton.jit
    def _rows(ptr, row, r_ok, c, WIDTH, INNER, OUTER_STRIDE, INNER_STRIDE):
        """The [rows, BLOCK] tile of rows `row`, columns c < WIDTH, of a [rows, WIDTH] tensor whose rows lie in a
        two-level layout (zero past them)."""
        at = _row_at(row, INNER, OUTER_STRIDE, INNER_STRIDE)
        return tl.load(ptr + at[:, None] + c[None, :], mask=r_ok[:, None] & (c < WIDTH)[None, :], other=0.0)

    @triton.jit
    def _input_rows(ptr, row, r_ok, c, WIDTH, INNER, OUTER_STRIDE, INNER_STRIDE, ACT: tl.constexpr, SLOPE: tl.constexpr):
        """`_rows` of the layer's input with the activation the layer reads it through (`input_act`) applied in
        float32 and rounded to the input's dtype, as the activation's own output would be. (Padding's act(0) is
        harmless: the weight's padding and a padded row's gradient are zero.)"""
        x = _rows(ptr, row, r_ok, c, WIDTH, INNER, OUTER_STRIDE, INNER_STRIDE)
        if ACT != "identity":
            x = _activate_any(x.to(tl.float32), ACT, SLOPE).to(ptr.dtype.element_ty)
        return x

    @triton.jit
    def _times_act_grad(acc, z_ptr, row, r_ok, c, WIDTH, INNER, OUTER_STRIDE, INNER_STRIDE, ACT: tl.constexpr,
                        SLOPE: tl.constexpr):
        """acc, the gradient of act(z) for a tile of rows of z, times act'(z): the gradient of z itself."""
        if ACT != "identity":
            z = _rows(z_ptr, row, r_ok, c, WIDTH, INNER, OUTER_STRIDE, INNER_STRIDE).to(tl.float32)
            acc = acc * _act_grad_from_input(z, ACT, SLOPE)
        return acc

    @triton.jit
    def _block(ptr, offset, r, c, ROWS, COLS, R_STRIDE, C_STRIDE, dtype: tl.constexpr):
        """The [r, c] tile (r < ROWS, c < COLS; zero elsewhere) at ptr + offset + r * R_STRIDE + c * C_STRIDE, cast
        to dtype: a model's weight, or a part of it, either way round."""
        return tl.load(ptr + offset + r[:, None] * R_STRIDE + c[None, :] * C_STRIDE,
                       mask=(r < ROWS)[:, None] & (c < COLS)[None, :], other=0.0).to(dtype)

    @triton.jit
    def _rows_times_weight(x_ptr, w_ptr, b_ptr, y_ptr, z_ptr, RPM, EACH, X_INNER, X_OUTER_STRIDE, X_INNER_STRIDE,
                           Z_INNER, Z_OUTER_STRIDE, Z_INNER_STRIDE, W_K, W_N, K: tl.constexpr, N: tl.constexpr,
                           HAS_BIAS: tl.constexpr, PREC: tl.constexpr, ACT_IN: tl.constexpr, ACT_GRAD: tl.constexpr,
                           SLOPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """y[rows] = act(x[rows]) @ W_m (+ b_m) [* act'(z[rows])] over EACH tiles of model m's rows: W_m [K, N] read
        with strides (W_K, W_N) from m's weight (the forward: w^T, ACT_IN the input's activation; the input gradient:
        w itself, ACT_GRAD the activation whose derivative at the layer's input z it applies); x's and z's rows in
        two-level layouts, y contiguous."""
        prog, m = tl.program_id(0), tl.program_id(1)
        k, n = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_N)
        w = _block(w_ptr, m.to(tl.int64) * (K * N), k, n, K, N, W_K, W_N, x_ptr.dtype.element_ty)
        if HAS_BIAS:
            bias = tl.load(b_ptr + m * N + n, mask=n < N, other=0.0).to(tl.float32)
        for t in range(prog * EACH, tl.minimum(prog * EACH + EACH, tl.cdiv(RPM, BLOCK_M))):
            r = t * BLOCK_M + tl.arange(0, BLOCK_M)
            row, r_ok = m.to(tl.int64) * RPM + r, r < RPM
            x = _input_rows(x_ptr, row, r_ok, k, K, X_INNER, X_OUTER_STRIDE, X_INNER_STRIDE, ACT_IN, SLOPE)
            acc = tl.dot(x, w, input_precision=PREC)
            if HAS_BIAS:
                acc += bias[None, :]
            acc = _times_act_grad(acc, z_ptr, row, r_ok, n, N, Z_INNER, Z_OUTER_STRIDE, Z_INNER_STRIDE, ACT_GRAD, SLOPE)
            tl.store(y_ptr + row[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty),
                     mask=r_ok[:, None] & (n < N)[None, :])

    @triton.jit
    def _rows_times_weights(x_ptr, w_ptr, b_ptr, y0, y1, y2, RPM, EACH, X_INNER, X_OUTER_STRIDE, X_INNER_STRIDE,
                            K: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
                            PARTS: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr, ACT: tl.constexpr,
                            SLOPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BN0: tl.constexpr,
                            BN1: tl.constexpr, BN2: tl.constexpr):
        """y_j[rows] = act(x[rows]) @ w_m[rows of part j]^T (+ b_m's) for 2 or 3 parts j of model m's weight w [N0
        + N1 + N2, K] (`linears`): each x tile read once, a product a part, each part's output contiguous."""
        prog, m = tl.program_id(0), tl.program_id(1)
        k = tl.arange(0, BLOCK_K)
        n0, n1, n2 = tl.arange(0, BN0), tl.arange(0, BN1), tl.arange(0, BN2)
        base = m.to(tl.int64) * ((N0 + N1 + N2) * K)
        dtype = x_ptr.dtype.element_ty
        w0 = _block(w_ptr, base, k, n0, K, N0, 1, K, dtype)  # [K, part's outputs]: its rows of w, transposed
        w1 = _block(w_ptr, base + N0 * K, k, n1, K, N1, 1, K, dtype)
        if PARTS > 2:
            w2 = _block(w_ptr, base + (N0 + N1) * K, k, n2, K, N2, 1, K, dtype)
        if HAS_BIAS:
            b_at = b_ptr + m * (N0 + N1 + N2)
            b0 = tl.load(b_at + n0, mask=n0 < N0, other=0.0).to(tl.float32)
            b1 = tl.load(b_at + N0 + n1, mask=n1 < N1, other=0.0).to(tl.float32)
            if PARTS > 2:
                b2 = tl.load(b_at + N0 + N1 + n2, mask=n2 < N2, other=0.0).to(tl.float32)
        for t in range(prog * EACH, tl.minimum(prog * EACH + EACH, tl.cdiv(RPM, BLOCK_M))):
            r = t * BLOCK_M + tl.arange(0, BLOCK_M)
            row, r_ok = m.to(tl.int64) * RPM + r, r < RPM
            x = _input_rows(x_ptr, row, r_ok, k, K, X_INNER, X_OUTER_STRIDE, X_INNER_STRIDE, ACT, SLOPE)
            acc = tl.dot(x, w0, input_precision=PREC)
            if HAS_BIAS:
                acc += b0[None, :]
            tl.store(y0 + row[:, None] * N0 + n0[None, :], acc.to(y0.dtype.element_ty), mask=r_ok[:, None] & (n0 < N0)[None, :])
            acc = tl.dot(x, w1, input_precision=PREC)
            if HAS_BIAS:
                acc += b1[None, :]
            tl.store(y1 + row[:, None] * N1 + n1[None, :], acc.to(y1.dtype.element_ty), mask=r_ok[:, None] & (n1 < N1)[None, :])
            if PARTS > 2:
                acc = tl.dot(x, w2, input_precision=PREC)
                if HAS_BIAS:
                    acc += b2[None, :]
                tl.store(y2 + row[:, None] * N2 + n2[None, :], acc.to(y2.dtype.element_ty),
                         mask=r_ok[:, None] & (n2 < N2)[None, :])

    @triton.jit
    def _parts_times_weights(d0, d1, d2, w_ptr, dx_ptr, z_ptr, RPM, EACH, D0_INNER, D0_OUTER, D0_STRIDE, D1_INNER,
                             D1_OUTER, D1_STRIDE, D2_INNER, D2_OUTER, D2_STRIDE, Z_INNER, Z_OUTER, Z_STRIDE,
                             K: tl.constexpr, N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, PARTS: tl.constexpr,
                             PREC: tl.constexpr, ACT: tl.constexpr, SLOPE: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_K: tl.constexpr, BN0: tl.constexpr, BN1: tl.constexpr, BN2: tl.constexpr):
        """dx[rows] = sum_j dy_j[rows] @ w_m[rows of part j] (* act'(z[rows])) for 2 or 3 parts (`linears`' input
        gradient): each dy_j's and z's rows in a two-level layout, a product a part summed in registers, dx
        contiguous."""
        prog, m = tl.program_id(0), tl.program_id(1)
        k = tl.arange(0, BLOCK_K)
        n0, n1, n2 = tl.arange(0, BN0), tl.arange(0, BN1), tl.arange(0, BN2)
        base = m.to(tl.int64) * ((N0 + N1 + N2) * K)
        dtype = d0.dtype.element_ty
        w0 = _block(w_ptr, base, n0, k, N0, K, K, 1, dtype)  # [part's outputs, K]: its rows of w
        w1 = _block(w_ptr, base + N0 * K, n1, k, N1, K, K, 1, dtype)
        if PARTS > 2:
            w2 = _block(w_ptr, base + (N0 + N1) * K, n2, k, N2, K, K, 1, dtype)
        for t in range(prog * EACH, tl.minimum(prog * EACH + EACH, tl.cdiv(RPM, BLOCK_M))):
            r = t * BLOCK_M + tl.arange(0, BLOCK_M)
            row, r_ok = m.to(tl.int64) * RPM + r, r < RPM
            acc = tl.dot(_rows(d0, row, r_ok, n0, N0, D0_INNER, D0_OUTER, D0_STRIDE), w0, input_precision=PREC)
            acc += tl.dot(_rows(d1, row, r_ok, n1, N1, D1_INNER, D1_OUTER, D1_STRIDE), w1, input_precision=PREC)
            if PARTS > 2:
                acc += tl.dot(_rows(d2, row, r_ok, n2, N2, D2_INNER, D2_OUTER, D2_STRIDE), w2, input_precision=PREC)
            acc = _times_act_grad(acc, z_ptr, row, r_ok, k, K, Z_INNER, Z_OUTER, Z_STRIDE, ACT, SLOPE)
            tl.store(dx_ptr + row[:, None] * K + k[None, :], acc.to(dx_ptr.dtype.element_ty),
                     mask=r_ok[:, None] & (k < K)[None, :])

    @triton.jit
    def _weight_grad_kernel(x_ptr, dy_ptr, dw_ptr, db_ptr, RPM, EACH, PROGRAMS, X_INNER, X_OUTER_STRIDE,
                            X_INNER_STRIDE, DY_INNER, DY_OUTER_STRIDE, DY_INNER_STRIDE, N_ALL, N_AT,
                            K: tl.constexpr, N: tl.constexpr, HAS_BIAS: tl.constexpr, PREC: tl.constexpr,
                            ACT: tl.constexpr, SLOPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_N: tl.constexpr):
        """dw partial [N, K] = sum over EACH tiles of model m's rows of dy^T act(x) (and db partial: dy's column sums),
        stored at rows N_AT.. of [m, program] of dw [models, PROGRAMS, N_ALL, K] and db [models, PROGRAMS, N_ALL]
        (a part of `linears`' weight, or all of it); x's and dy's rows in two-level layouts."""
        prog, m = tl.program_id(0), tl.program_id(1)
        k, n = tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # summed over rows once, after the loop
        for t in range(prog * EACH, tl.minimum(prog * EACH + EACH, tl.cdiv(RPM, BLOCK_M))):
            r = t * BLOCK_M + tl.arange(0, BLOCK_M)
            row, r_ok = m.to(tl.int64) * RPM + r, r < RPM
            x = _input_rows(x_ptr, row, r_ok, k, K, X_INNER, X_OUTER_STRIDE, X_INNER_STRIDE, ACT, SLOPE)
            g = _rows(dy_ptr, row, r_ok, n, N, DY_INNER, DY_OUTER_STRIDE, DY_INNER_STRIDE)
            acc += tl.dot(tl.trans(g), x.to(g.dtype), input_precision=PREC)
            if HAS_BIAS:
                acc_b += g.to(tl.float32)
        part = m.to(tl.int64) * PROGRAMS + prog
        tl.store(dw_ptr + (part * N_ALL + N_AT) * K + n[:, None] * K + k[None, :], acc,
                 mask=(n < N)[:, None] & (k < K)[None, :])
        if HAS_BIAS:
            tl.store(db_ptr + part * N_ALL + N_AT + n, tl.sum(acc_b, axis=0), mask=n < N)


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


def _times(x: Tensor, w: Tensor, b: Tensor | None, models: int, k: int, n: int, strides: tuple[int, int],
           act: tuple[str, float] = ("identity", 0.0), z: Tensor | None = None) -> Tensor:
    """x [models*R rows (`_row_layout`), k] times each model's [k, n] weight (+ b): y [*x.shape[:-1], n] contiguous.
    `act`: applied to x as it is read (the forward), or, given the layer's input z [*x.shape[:-1], n], its
    derivative at z multiplies y (the input gradient)."""
    grad = z is not None
    x, layout = _row_layout(x)
    z, z_layout = _row_layout(z) if grad else (x, layout)
    y = x.new_empty(*x.shape[:-1], n)
    rpm = y.numel() // n // models
    block_m, block_k, block_n, warps = _blocks(k, n)
    programs, each = _programs(triton.cdiv(rpm, block_m), models, x.device)
    name, slope = act
    if y.numel():
        _rows_times_weight[(programs, models)](
            x, w, b if b is not None else w, y, z, rpm, each, *layout, *z_layout, strides[0], strides[1], K=k, N=n,
            HAS_BIAS=b is not None, PREC=dot_precision(x.dtype), ACT_IN="identity" if grad else name,
            ACT_GRAD=name if grad else "identity", SLOPE=slope, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n,
            num_warps=warps)
    return y


def _part_blocks(k: int, widths: list[int]) -> tuple[dict, int, int]:
    """(the parts' constexprs N0..N2, BN0..BN2 and PARTS, BLOCK_M, warps) of a `linears` kernel: a part's block its
    width padded to a power of two of at least 16 (a missing third part: 0 wide, 16), the rows and warps as
    `_blocks` takes them for the whole weight."""
    padded = widths + [0] * (MAX_PARTS - len(widths))
    sizes = {f"N{j}": v for j, v in enumerate(padded)}
    sizes.update({f"BN{j}": max(16, triton.next_power_of_2(max(v, 1))) for j, v in enumerate(padded)})
    block_m, _, _, warps = _blocks(k, sum(widths))
    return {**sizes, "PARTS": len(widths)}, block_m, warps


def _times_parts(x: Tensor, w: Tensor, b: Tensor | None, models: int, widths: list[int], act: tuple[str, float]
                 ) -> list[Tensor]:
    """`linears`' forward: act(x [models*R rows (`_row_layout`), k]) times each part j of each model's weight [sum
    of widths, k] (+ b's part): one contiguous output a part."""
    x, layout = _row_layout(x)
    k = x.shape[-1]
    ys = [x.new_empty(*x.shape[:-1], width) for width in widths]
    rpm = math.prod(x.shape[:-1]) // models
    sizes, block_m, warps = _part_blocks(k, widths)
    programs, each = _programs(triton.cdiv(rpm, block_m), models, x.device)
    if rpm:
        _rows_times_weights[(programs, models)](
            x, w, b if b is not None else w, *ys, *[ys[0]] * (MAX_PARTS - len(ys)), rpm, each, *layout, K=k,
            HAS_BIAS=b is not None, PREC=dot_precision(x.dtype), ACT=act[0], SLOPE=act[1], BLOCK_M=block_m,
            BLOCK_K=max(16, triton.next_power_of_2(k)), num_warps=warps, **sizes)
    return ys


def _parts_times(dys: list[Tensor], w: Tensor, models: int, widths: list[int], z: Tensor, act: tuple[str, float]
                 ) -> Tensor:
    """`linears`' input gradient: sum_j dy_j @ (part j of each model's weight [sum of widths, k]) times act'(z),
    z the layer's input, each dy_j's and z's rows read where they lie (`_row_layout`): dx [*rows shape, k]
    contiguous, in z's dtype."""
    laid = [_row_layout(t.to(dys[0].dtype)) for t in dys]
    z, z_layout = _row_layout(z)
    k = w.shape[2]
    dx = dys[0].new_empty(*dys[0].shape[:-1], k)
    rpm = math.prod(dys[0].shape[:-1]) // models
    sizes, block_m, warps = _part_blocks(k, widths)
    programs, each = _programs(triton.cdiv(rpm, block_m), models, dx.device)
    if rpm:
        tensors = [t for t, _ in laid]
        layouts = [v for _, layout in laid for v in layout] + [1, 0, 0] * (MAX_PARTS - len(laid))
        _parts_times_weights[(programs, models)](
            *tensors, *[tensors[0]] * (MAX_PARTS - len(tensors)), w, dx, z, rpm, each, *layouts, *z_layout, K=k,
            PREC=dot_precision(dx.dtype), ACT=act[0], SLOPE=act[1], BLOCK_M=block_m,
            BLOCK_K=max(16, triton.next_power_of_2(k)), num_warps=warps, **sizes)
    return dx.to(z.dtype)


@population_op("pop_linear")
def _pop_linear(x: Tensor, w: Tensor, b: Tensor | None, widths: list[int], act: str, slope: float) -> list[Tensor]:
    n, out_f, in_f = w.shape
    w, b = w.contiguous(), b.contiguous() if b is not None else None
    if len(widths) == 1:
        return [_times(x, w, b, n, in_f, out_f, (1, in_f), (act, slope))]
    return _times_parts(x, w, b, n, widths, (act, slope))


@_pop_linear.register_fake
def _(x, w, b, widths, act, slope):
    return [x.new_empty(*x.shape[:-1], width) for width in widths]


@population_op("pop_linear_backward")
def _pop_linear_backward(x: Tensor, dys: list[Tensor], w: Tensor, input_grad: bool, weight_grad: bool, bias: bool,
                         act: str, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dx or empty, dw or empty, db or empty) from the outputs' gradients dys (one a part of w's rows), the layer
    reading act(x): dx in x's dtype, dw and db float32; x's and each dy's rows read where they lie (`_row_layout`)."""
    models, out_f, in_f = w.shape
    w = w.contiguous()
    widths = [t.shape[-1] for t in dys]
    if not input_grad:
        dx = x.new_empty(0)
    elif len(dys) == 1:
        dx = _times(dys[0], w, None, models, out_f, in_f, (in_f, 1), (act, slope), z=x).to(x.dtype)
    else:
        dx = _parts_times(dys, w, models, widths, x, (act, slope))
    if not weight_grad:
        return dx, w.new_empty(0, dtype=torch.float32), w.new_empty(0, dtype=torch.float32)  # outputs never alias
    x, x_layout = _row_layout(x)
    rpm = math.prod(dys[0].shape[:-1]) // models
    block_m, block_k, _, warps = _blocks(in_f, out_f)
    programs, each = _programs(triton.cdiv(rpm, block_m), models, x.device, least=8)
    dw = x.new_empty(models, programs, out_f, in_f, dtype=torch.float32)
    db = x.new_empty(models, programs, out_f, dtype=torch.float32) if bias else dw
    if not rpm:
        dw.zero_(), db.zero_()
    at = 0
    for dy in dys if rpm else []:  # a pass a part: each reads x and its own dy
        dy, dy_layout = _row_layout(dy)
        width = dy.shape[-1]
        _weight_grad_kernel[(programs, models)](
            x, dy, dw, db, rpm, each, programs, *x_layout, *dy_layout, out_f, at, K=in_f, N=width, HAS_BIAS=bias,
            PREC=dot_precision(dy.dtype), ACT=act, SLOPE=slope, BLOCK_M=block_m, BLOCK_K=block_k,
            BLOCK_N=max(16, triton.next_power_of_2(width)), num_warps=warps)
        at += width
    return dx, dw.sum(1), db.sum(1) if bias else w.new_empty(0, dtype=torch.float32)


@_pop_linear_backward.register_fake
def _(x, dys, w, input_grad, weight_grad, bias, act, slope):
    empty = w.new_empty(0, dtype=torch.float32)
    return (x.new_empty(x.shape) if input_grad else x.new_empty(0),
            w.new_empty(w.shape, dtype=torch.float32) if weight_grad else empty,
            w.new_empty(w.shape[:2], dtype=torch.float32) if weight_grad and bias else w.new_empty(0, dtype=torch.float32))


def _setup(ctx, inputs, output) -> None:
    x, w, b, _, act, slope = inputs
    ctx.save_for_backward(x, w)
    ctx.bias, ctx.act = b is not None, (act, slope)


def _backward(ctx, dys: list[Tensor]):
    x, w = ctx.saved_tensors
    needs = ctx.needs_input_grad
    weights = needs[1] or (ctx.bias and needs[2])
    dx, dw, db = _pop_linear_backward(x, list(dys), w, needs[0], weights, ctx.bias, *ctx.act)
    return (dx if needs[0] else None, dw.to(w.dtype) if needs[1] else None,
            db.to(w.dtype) if ctx.bias and needs[2] else None, None, None, None)


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


def _input_act(input_act: tuple[str, float] | None) -> tuple[str, float]:
    """`input_act` checked: (name, slope), ("identity", 0.0) for None; else ValueError."""
    if input_act is None:
        return "identity", 0.0
    name, slope = input_act
    if name not in INPUT_ACTIVATIONS or not isinstance(slope, (int, float)):
        raise ValueError(f"input_act = {input_act!r}: (name, slope) with a name of {', '.join(INPUT_ACTIVATIONS)}")
    return name, float(slope)


def linear(x: Tensor, w: Tensor, b: Tensor | None, input_act: tuple[str, float] | None = None) -> Tensor:
    """nn.Linear of model m on rows m*R..(m+1)*R-1 of x [N*R, ..., in] (any leading shape: its rows in order),
    w [N, out, in], b [N, out] or None, in and out up to MAX_FEATURES: y [N*R, ..., out] in x's dtype, the
    weights cast to it as they are read (autocast's linear). Gradients to x, w and b.

    `input_act` = (name, slope) (leaky_relu's slope; else ignored): the layer reads act(x), the activation
    (INPUT_ACTIVATIONS) applied to each tile of x as it is loaded, so act(x) is never written; x's gradient is then
    the activation's input's, (dy @ w) * act'(x), in the same pass."""
    _check(x, w, b)
    return _pop_linear(x, w, b, [w.shape[1]], *_input_act(input_act))[0]  # x's rows read where they lie


def linears(x: Tensor, ws: Sequence[Tensor], bs: Sequence[Tensor | None], input_act: tuple[str, float] | None = None
            ) -> tuple[Tensor, ...]:
    """`linear(x, w, b, input_act)` for each (w, b) of ws and bs (up to MAX_PARTS, their outputs together up to
    MAX_FEATURES) as one: x read once in the forward, and in the backward its gradient the sum of theirs in one
    pass (where autograd would write each and add them). Each output contiguous."""
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
    return tuple(_pop_linear(x, w, b, widths, *_input_act(input_act)))


__all__ = ["INPUT_ACTIVATIONS", "MAX_FEATURES", "MAX_PARTS", "available", "fits", "linear", "linears"]
