"""The first layer read through its window table: the table, its forward and weight-gradient kernels, their
launchers and custom ops, and `windows_pay`."""

from __future__ import annotations

import torch
from torch import Tensor

from . import tuning
from .common import _dot_dtype, _programs_per_model, _tile_rows, _wgrad_fake, population_op, tl, triton


if triton is not None:
    from .common import _act_grad_from_output, _activate, _keep_max, _mma

    @triton.jit
    def _window_tile(t_ptr, rows_ptr, m, start, B, L: tl.constexpr, T: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
        """Model m's output positions start + [0, BLOCK_M) (flat over batch sample and position) and their
        table rows as a [positions, BLOCK_T] tile: (tile, mask, sample, position)."""
        t = start + tl.arange(0, BLOCK_M)
        pmask = t < B * L
        sample = m * B + t // L
        q = t % L
        row = tl.load(rows_ptr + sample, mask=pmask, other=0).to(tl.int64)
        k = tl.arange(0, BLOCK_T)
        ptrs = t_ptr + row[:, None] * (L * T) + (q * T)[:, None] + k[None, :]
        return tl.load(ptrs, mask=pmask[:, None] & (k < T)[None, :], other=0.0), pmask, sample, q

    @triton.jit
    def _window_weights(w_ptr, m, O, d: tl.constexpr, C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                        POOL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        """Model m's weights placed at window position d, as a [BLOCK_T, BLOCK_N] float32 tile:
        entry (c, u, v) of the (KH+POOL-1) x (KW+POOL-1) window meets w[o, c, u - du, v - dv] (else 0)."""
        UH: tl.constexpr = KH + POOL - 1
        UW: tl.constexpr = KW + POOL - 1
        k = tl.arange(0, BLOCK_T)
        o = tl.arange(0, BLOCK_N)
        c, u, v = k // (UH * UW), (k % (UH * UW)) // UW, k % UW
        ki, kj = u - d // POOL, v - d % POOL
        ok = (k < C * UH * UW) & (ki >= 0) & (ki < KH) & (kj >= 0) & (kj < KW)
        ptrs = w_ptr + m.to(tl.int64) * (O * C * KH * KW) + (o * (C * KH * KW))[None, :] + ((c * KH + ki) * KW + kj)[:, None]
        return tl.load(ptrs, mask=ok[:, None] & (o < O)[None, :], other=0.0).to(tl.float32)

    @triton.jit
    def _window_conv_kernel(t_ptr, rows_ptr, w_ptr, b_ptr, a_ptr, code_ptr, B, O, PER_PROGRAM,
                            L: tl.constexpr, T: tl.constexpr, C: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                            POOL: tl.constexpr, ACT: tl.constexpr, SLOPE: tl.constexpr, HAS_BIAS: tl.constexpr,
                            DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        """act(maxpool(conv(x) + b)) of the first layer from its window table: one [positions, window] @
        [window, outputs] product per window position (the weights placed at that position), then the max,
        which position won (`code`), bias and activation, as `_conv_pool_act_fma_kernel` writes them.
        A program takes PER_PROGRAM position tiles of model m, its placed weights loaded once."""
        group, m = tl.program_id(0), tl.program_id(1)
        o = tl.arange(0, BLOCK_N)
        w0 = _window_weights(w_ptr, m, O, 0, C, KH, KW, POOL, BLOCK_T, BLOCK_N)
        w1 = _window_weights(w_ptr, m, O, 1 % (POOL * POOL), C, KH, KW, POOL, BLOCK_T, BLOCK_N)
        w2 = _window_weights(w_ptr, m, O, 2 % (POOL * POOL), C, KH, KW, POOL, BLOCK_T, BLOCK_N)
        w3 = _window_weights(w_ptr, m, O, 3 % (POOL * POOL), C, KH, KW, POOL, BLOCK_T, BLOCK_N)
        bias = tl.load(b_ptr + m * O + o, mask=(o < O) & HAS_BIAS, other=0.0).to(tl.float32)
        start = group * PER_PROGRAM
        for tile in range(start, tl.minimum(start + PER_PROGRAM, tl.cdiv(B * L, BLOCK_M))):
            win, pmask, sample, q = _window_tile(t_ptr, rows_ptr, m, tile * BLOCK_M, B, L, T, BLOCK_M, BLOCK_T)
            best = _mma(win, w0, DOT)
            code = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
            if POOL > 1:
                best, code = _keep_max(best, code, _mma(win, w1, DOT), 1)
                best, code = _keep_max(best, code, _mma(win, w2, DOT), 2)
                best, code = _keep_max(best, code, _mma(win, w3, DOT), 3)
            best += bias[None, :]
            out = sample.to(tl.int64)[:, None] * (O * L) + (o * L)[None, :] + q[:, None]
            mask = pmask[:, None] & (o < O)[None, :]
            tl.store(a_ptr + out, _activate(best, ACT, SLOPE).to(a_ptr.dtype.element_ty), mask=mask)
            if POOL > 1:
                tl.store(code_ptr + out, code.to(tl.int8), mask=mask)

    @triton.jit
    def _window_wgrad_kernel(t_ptr, rows_ptr, da_ptr, a_ptr, code_ptr, dw_ptr, db_ptr, B, O, SPLIT, PER_SPLIT,
                             L: tl.constexpr, T: tl.constexpr, POOL: tl.constexpr, ACT: tl.constexpr,
                             SLOPE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        """The window-placed weight gradients of model m over its position tiles [split * PER_SPLIT, ...):
        g = da * act'(a) goes to the window position d the pool chose, so row (d, o) of the gradient is
        (g where code == d)^T @ window: one [(d, o), rows] @ [rows, window] product a tile for every
        position at once, not one product per position; `_launch_window_wgrad` folds the positions back onto
        the kernel."""
        split, m = tl.program_id(0), tl.program_id(1)
        D: tl.constexpr = POOL * POOL
        o = tl.arange(0, BLOCK_N)
        k = tl.arange(0, BLOCK_T)
        acc = tl.zeros((D * BLOCK_N, BLOCK_T), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
        start = split * PER_SPLIT
        for tile in range(start, tl.minimum(start + PER_SPLIT, tl.cdiv(B * L, BLOCK_M))):
            win, pmask, sample, q = _window_tile(t_ptr, rows_ptr, m, tile * BLOCK_M, B, L, T, BLOCK_M, BLOCK_T)
            src = sample.to(tl.int64)[:, None] * (O * L) + (o * L)[None, :] + q[:, None]
            mask = pmask[:, None] & (o < O)[None, :]
            g = tl.load(da_ptr + src, mask=mask, other=0.0).to(tl.float32)
            g = g * _act_grad_from_output(tl.load(a_ptr + src, mask=mask, other=0.0).to(tl.float32), ACT, SLOPE)
            if HAS_BIAS:
                acc_b += tl.sum(g, axis=0)
            if POOL > 1:
                chosen = tl.load(code_ptr + src, mask=mask, other=-1).to(tl.int32)
                placed = tl.where(chosen[:, None, :] == tl.arange(0, D)[None, :, None], g[:, None, :], 0.0)
            else:
                placed = g[:, None, :]
            acc += _mma(tl.trans(tl.reshape(placed, (BLOCK_M, D * BLOCK_N))), win, DOT)
        part = m.to(tl.int64) * SPLIT + split
        d, r = tl.arange(0, D * BLOCK_N) // BLOCK_N, tl.arange(0, D * BLOCK_N) % BLOCK_N
        ptrs = dw_ptr + part * (D * T * O) + (d * (T * O) + r)[:, None] + (k * O)[None, :]
        tl.store(ptrs, acc, mask=(r < O)[:, None] & (k < T)[None, :])
        if HAS_BIAS:
            tl.store(db_ptr + part * O + o, acc_b, mask=o < O)


def window_table(x: Tensor, kernel: tuple[int, int], padding: tuple[int, int] = (0, 0), pool: int = 1) -> Tensor:
    """The data set x [S, C, H, W] as a table [S, L, T] for a first layer's stride-1 conv (then a pool x pool
    max-pool when pool = 2): row (s, q) holds the (kh + pool - 1) x (kw + pool - 1) input window, zero padded,
    that pooled output q of sample s is computed from, channel-major, with T = C * window rounded up to a
    multiple of 8 (16-byte rows in bf16; the tail is zero). L = Hp * Wp, the pooled output's positions.

    Built once per resident data set, it turns the first layer's per-pixel gathers into contiguous rows:
    its forward (all four window positions) and weight gradient become tensor-core products over them."""
    if pool not in (1, 2):
        raise ValueError(f"pool = {pool!r} is not allowed; expected 1 or 2")
    s, c, h, w = x.shape
    (kh, kw), (ph, pw) = kernel, padding
    uh, uw = kh + pool - 1, kw + pool - 1
    hp, wp, row = _window_shape(x.shape, kernel, padding, pool)
    if hp < 1 or wp < 1:
        raise ValueError(f"a {kh}x{kw} kernel with padding {padding} does not fit {h}x{w} inputs")
    width = c * uh * uw
    table = x.new_zeros(s, hp * wp, row)
    chunk = max(1, (1 << 26) // max(1, hp * wp * width))  # ~64M elements of windows at a time
    for i in range(0, s, chunk):
        xs = torch.nn.functional.pad(x[i : i + chunk], (pw, pw, ph, ph))
        win = xs.unfold(2, uh, pool).unfold(3, uw, pool)[:, :, :hp, :wp]  # [s, C, Hp, Wp, uh, uw]
        table[i : i + chunk, :, :width] = win.permute(0, 2, 3, 1, 4, 5).reshape(len(xs), hp * wp, width)
    return table


def _window_shape(shape: torch.Size, kernel: tuple[int, int], padding: tuple[int, int], pool: int) -> tuple[int, int, int]:
    """(Hp, Wp, T) of the window table of data of `shape` [S, C, H, W]: the pooled output's size and the row
    width, C x (kh + pool - 1) x (kw + pool - 1) rounded up to a multiple of 8."""
    _, c, h, w = shape
    hp, wp = (h + 2 * padding[0] - kernel[0] + 1) // pool, (w + 2 * padding[1] - kernel[1] + 1) // pool
    return hp, wp, -(-c * (kernel[0] + pool - 1) * (kernel[1] + pool - 1) // 8) * 8


def window_table_bytes(x: Tensor, kernel: tuple[int, int], padding: tuple[int, int] = (0, 0), pool: int = 1) -> int:
    """The size `window_table` would allocate for these arguments, in bytes."""
    hp, wp, row = _window_shape(x.shape, kernel, padding, pool)
    return x.shape[0] * max(0, hp * wp) * row * x.element_size()


def _window_blocks(table: Tensor, o: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_N): a whole window row per tile (a dot's reduction: at least 16) and the outputs, at
    least 8 (the forward's n, the weight gradient's rows a window position): tl.dot pads a side under 16
    itself, so the forward's epilogue runs on no padding outputs."""
    return max(16, triton.next_power_of_2(table.shape[2])), max(8, triton.next_power_of_2(o))


def _launch_window(table: Tensor, rows: Tensor, w: Tensor, b: Tensor | None, batch: int, hp: int, wp: int,
                   pool: int, act: str, slope: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    n, o, c, kh, kw = w.shape
    a = torch.empty(n * batch, o, hp, wp, device=table.device, dtype=out_dtype)
    code = torch.empty(n * batch, o, hp, wp, device=table.device, dtype=torch.int8) if pool > 1 else a.new_empty(0, dtype=torch.int8)
    block_t, block_n = _window_blocks(table, o)
    block_m, options = _tile_rows(block_t)
    groups, per = _programs_per_model(triton.cdiv(batch * hp * wp, block_m), n, table.device)
    _window_conv_kernel[(groups, n)](
        table, rows, w, b if b is not None else w, a, code if pool > 1 else a, batch, o, per,
        L=hp * wp, T=table.shape[2], C=c, KH=kh, KW=kw, POOL=pool, ACT=act, SLOPE=slope, HAS_BIAS=b is not None,
        DOT=_dot_dtype(table), BLOCK_M=block_m, BLOCK_T=block_t, BLOCK_N=block_n, **options,
    )
    return a, code


def _launch_window_wgrad(table: Tensor, rows: Tensor, da: Tensor, a: Tensor, code: Tensor, w_shape: torch.Size,
                         bias: bool, pool: int, act: str, slope: float) -> tuple[Tensor, Tensor | None]:
    """dw, db from the window table: per window position the [T, O] sums, then `_fold_placed`."""
    n, o, c, kh, kw = w_shape
    batch, length, t = da.shape[0] // n, da.shape[2] * da.shape[3], table.shape[2]
    block_t, block_n = _window_blocks(table, o)
    block_m, options = _tile_rows(block_t)
    split, per_split = _programs_per_model(triton.cdiv(batch * length, block_m), n, da.device)
    placed = torch.empty(n, split, pool * pool, t, o, device=da.device, dtype=torch.float32)
    db = torch.empty(n, split, o, device=da.device, dtype=torch.float32) if bias else None
    _window_wgrad_kernel[(split, n)](
        table, rows, da, a, code if pool > 1 else a, placed, db if db is not None else placed, batch, o, split, per_split,
        L=length, T=t, POOL=pool, ACT=act, SLOPE=slope, HAS_BIAS=bias, DOT=_dot_dtype(table),
        BLOCK_M=block_m, BLOCK_T=block_t, BLOCK_N=block_n, **options,
    )
    return _fold_placed(placed, w_shape, pool), (db.sum(1) if db is not None else None)


_TAPS: dict[tuple, Tensor] = {}


def _placed_taps(c: int, kh: int, kw: int, pool: int, t: int, device: torch.device) -> Tensor:
    """For each window position d and kernel tap (c, ki, kj), its row d * T + (c, ki + di, kj + dj) in the
    window-placed gradient [pool^2 * T, O]: summing those rows over d gives the tap's gradient."""
    key = (c, kh, kw, pool, t, str(device))
    if key not in _TAPS:
        uh, uw = kh + pool - 1, kw + pool - 1
        ci, ki, kj = (v.reshape(-1) for v in torch.meshgrid(torch.arange(c), torch.arange(kh), torch.arange(kw), indexing="ij"))
        _TAPS[key] = torch.cat([d * t + (ci * uh + ki + d // pool) * uw + kj + d % pool for d in range(pool * pool)]).to(device)
    return _TAPS[key]


def _fold_placed(placed: Tensor, w_shape: torch.Size, pool: int) -> Tensor:
    """dw from window-placed weight gradients placed [N, splits, pool^2, T, O] (row (d, c, u, v): window entry
    (c, u, v) against the outputs' gradient at window position d): each kernel tap summed over the positions
    that place it (a gather of pool^2 rows a tap, in torch: O * K numbers a model)."""
    n, o, c, kh, kw = w_shape
    t = placed.shape[3]
    taps = _placed_taps(c, kh, kw, pool, t, placed.device)  # [pool^2 * K] rows of the flattened (position, window) axis
    dw = placed.sum(1).view(n, pool * pool * t, o).index_select(1, taps).view(n, pool * pool, c * kh * kw, o).sum(1)
    return dw.transpose(1, 2).contiguous().view(w_shape)


@population_op("pop_window_conv")
def _pop_window_conv(table: Tensor, w: Tensor, b: Tensor | None, rows: Tensor, batch: int, hp: int, wp: int,
                     pool: int, act: str, slope: float, out_dtype: torch.dtype, act_grad: bool) -> tuple[Tensor, Tensor]:
    return _launch_window(table, rows, w.contiguous(), b, batch, hp, wp, pool, act, slope, out_dtype)


@_pop_window_conv.register_fake
def _(table, w, b, rows, batch, hp, wp, pool, act, slope, out_dtype, act_grad):
    shape = (w.shape[0] * batch, w.shape[1], hp, wp)
    return table.new_empty(shape, dtype=out_dtype), table.new_empty(shape if pool > 1 else (0,), dtype=torch.int8)


@population_op("pop_window_conv_wgrad")
def _pop_window_conv_wgrad(table: Tensor, rows: Tensor, da: Tensor, a: Tensor, code: Tensor, w: Tensor, bias: bool,
                           pool: int, act: str, slope: float) -> tuple[Tensor, Tensor]:
    dw, db = _launch_window_wgrad(table, rows, da.contiguous(), a, code, w.shape, bias, pool, act, slope)
    return dw, db if db is not None else dw.new_zeros(0)


@_pop_window_conv_wgrad.register_fake
def _(table, rows, da, a, code, w, bias, pool, act, slope):
    return _wgrad_fake(w, bias)


def _setup_window(ctx, inputs, output) -> None:
    table, w, b, rows, _, _, _, pool, act, slope, _, act_grad = inputs
    a, code = output
    if not act_grad:  # the gradient arrives through the activation already (`conv2d_pool_act`)
        a, act = a.new_empty(0), "identity"
    ctx.save_for_backward(table, w, rows, a, code)
    ctx.meta = (b is not None, pool, act, slope)
    ctx.mark_non_differentiable(code)


def _backward_window(ctx, da: Tensor, _dcode: Tensor | None):
    table, w, rows, a, code = ctx.saved_tensors
    has_bias, pool, act, slope = ctx.meta
    nothing = (None,) * 9
    if not (ctx.needs_input_grad[1] or (has_bias and ctx.needs_input_grad[2])):
        return None, None, None, *nothing
    a = a if a.numel() else da  # no activation left to undo: a is not read
    dw, db = _pop_window_conv_wgrad(table, rows, da, a, code if pool > 1 else a, w, has_bias, pool, act, slope)
    return None, dw.to(w.dtype), (db if has_bias else None), *nothing


_pop_window_conv.register_autograd(_backward_window, setup_context=_setup_window)


def windows_pay(pool: int, table_bytes: int, device: torch.device | str) -> bool:
    """Whether a first layer should read a window table (`window_table`) rather than gather from the data set.

    The tuning's `windows`: "pool" (the default) for layers followed by a 2x2 max-pool, where one table row
    feeds all four window positions; "always"; "never". Either way the table must fit in its
    `window_max_fraction` of the device's memory (any size in the interpreter)."""
    if not windows_wanted(pool):
        return False
    device = torch.device(device)
    if device.type != "cuda":
        return True
    return table_bytes <= tuning.current().window_max_fraction * torch.cuda.get_device_properties(device).total_memory


def windows_wanted(pool: int) -> bool:
    """The tuning's part of `windows_pay`: whether a first layer with this pool reads a window table where it fits."""
    mode = tuning.current().windows
    if mode not in ("pool", "always", "never"):
        raise ValueError(f"SYMZOO_POPCONV_WINDOWS = {mode!r} is not allowed; expected pool, always or never")
    return mode == "always" or (mode == "pool" and pool != 1)


def _window_conv(table: Tensor, x: Tensor, w: Tensor, b: Tensor | None, padding: tuple[int, int], rows: Tensor,
                 batch: int, pool: int, act: str, slope: float, out_dtype: torch.dtype, act_grad: bool = True) -> Tensor:
    """The first layer read from `table` (built by `window_table` from x with this layer's geometry), checked."""
    kh, kw = w.shape[3], w.shape[4]
    hp, wp, row = _window_shape(x.shape, (kh, kw), padding, pool)
    want = (x.shape[0], hp * wp, row)
    if tuple(table.shape) != want:
        raise ValueError(f"window table of shape {tuple(table.shape)} does not match this layer: expected {want} "
                         f"(window_table(x, kernel=({kh}, {kw}), padding={tuple(padding)}, pool={pool}))")
    a, _ = _pop_window_conv(table, w, b, rows, batch, hp, wp, pool, act, float(slope), out_dtype, act_grad)
    return a
