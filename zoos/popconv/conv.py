"""The direct implicit-GEMM convolution: forwards on CUDA cores and tensor cores (NCHW and channels-last), the
conv + pool + activation forward, weight gradients, their launchers and custom ops, and `conv2d`."""

from __future__ import annotations

import torch
from torch import Tensor

from . import tuning
from .common import (EPILOGUE_ACTIVATIONS, _act_backward, _dot_dtype, _programs_per_model, _wgrad_fake, population_op,
                     stored_channels_last, tl, triton)
from .strided import space_to_depth, strided_weight
from .window import _window_conv


def _blocks(k: int, o: int) -> tuple[int, int, int]:
    """Tile sizes (pixels, reduction, output channels): tensor-core dots need a reduction >= 16; fewer than 16
    outputs are padded to 16 (faster for the weight gradient than the 8 tl.dot allows)."""
    block_n = min(128, max(16, triton.next_power_of_2(o)))  # more outputs: several output tiles
    block_k = 16 if k <= 16 else 32 if k <= 32 else 64
    block_m = 128 if block_n <= 32 else 64
    return block_m, block_k, block_n


if triton is not None:
    from .common import _act_grad_from_output, _activate, _keep_max

    @triton.jit
    def _pixels(p, end, m, B, HO, WO):
        """Model m's output pixels p (flat over sample, row, column) below `end`: (mask, r, i, j, sample)."""
        r = p % (HO * WO)
        return p < end, r, r // WO, r % WO, m * B + p // (HO * WO)

    @triton.jit
    def _at(O, HO, WO, o, r, sample, CL: tl.constexpr):
        """Offsets of the [pixels, outputs] tile in a [N*B, O, HO, WO] map (CL: channels-last in memory)."""
        if CL:
            return (sample.to(tl.int64) * (HO * WO) + r)[:, None] * O + o[None, :]
        return sample.to(tl.int64)[:, None] * (O * HO * WO) + (o * (HO * WO))[None, :] + r[:, None]

    @triton.jit
    def _store_output(acc, b_ptr, y_ptr, m, O, HO, WO, o, r, sample, pmask, HAS_BIAS: tl.constexpr,
                      ACT: tl.constexpr, SLOPE: tl.constexpr, CL: tl.constexpr, g_ptr, GRAD: tl.constexpr,
                      GRAD_SLOPE: tl.constexpr, G_CL: tl.constexpr):
        """Add model m's bias to the [pixels, outputs] tile, apply the activation and store it into
        y [N*B, O, HO, WO] (CL: its memory channels-last, [N*B, HO, WO, O]). GRAD: the tile is an input gradient
        through the activation GRAD whose output g (y's shape; G_CL its memory) was this conv's input, so it is
        multiplied by act'(g) first: the gradient w.r.t. that activation's input."""
        if HAS_BIAS:
            acc += tl.load(b_ptr + m * O + o, mask=o < O, other=0.0).to(tl.float32)[None, :]
        acc = _activate(acc, ACT, SLOPE)
        mask = pmask[:, None] & (o < O)[None, :]
        if GRAD != "identity":
            g = tl.load(g_ptr + _at(O, HO, WO, o, r, sample, G_CL), mask=mask, other=0.0).to(tl.float32)
            acc = acc * _act_grad_from_output(g, GRAD, GRAD_SLOPE)
        tl.store(y_ptr + _at(O, HO, WO, o, r, sample, CL), acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _source_row(rows_ptr, sample, pmask, GATHER: tl.constexpr):
        """The row of x that `sample` reads: rows[sample] when the input is read by index, else sample."""
        if GATHER:
            return tl.load(rows_ptr + sample, mask=pmask, other=0).to(tl.int64)
        return sample.to(tl.int64)

    @triton.jit
    def _patch_tile(x_ptr, row, pmask, i, j, k, C, H, W, PH, PW, K: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr):
        """The patch values x[row, c, i + ki - PH, j + kj - PW] as a [pixels, k] tile (row: per pixel or one)."""
        c = k // (KH * KW)
        ki = (k % (KH * KW)) // KW
        kj = k % KW
        base = row * (C * H * W) + (i - PH) * W + (j - PW)  # per pixel
        offset = c * (H * W) + ki * W + kj  # per tap
        mask = pmask[:, None] & (k < K)[None, :]
        if (PH > 0) | (PW > 0):  # zero padding: taps outside the image read 0
            ii = i[:, None] + ki[None, :] - PH
            jj = j[:, None] + kj[None, :] - PW
            mask = mask & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
        return tl.load(x_ptr + base[:, None] + offset[None, :], mask=mask, other=0.0)

    @triton.jit
    def _patch_tile_taps_first(x_ptr, row, pmask, i, j, k, C, H, W, PH, PW, K: tl.constexpr, KH: tl.constexpr,
                               KW: tl.constexpr):
        """`_patch_tile` as a [k, pixels] tile, the weight gradient's left operand as tl.dot takes it. Here `row`
        is one sample's, so the offsets are int32 from one scalar pointer, and every part of a valid element's
        offset must be >= 0: with zero padding each address is built from the element's own image row and
        column, as a per-pixel base (i - PH) * W + (j - PW) below 0 beside a per-tap offset gave a wrong dw on
        an H200 (test_wgrad_equals_cudnn_on_padded_multi_tile_images)."""
        c = k // (KH * KW)
        ki = (k % (KH * KW)) // KW
        kj = k % KW
        mask = (k < K)[:, None] & pmask[None, :]
        if (PH > 0) | (PW > 0):
            ii = ki[:, None] + i[None, :] - PH
            jj = kj[:, None] + j[None, :] - PW
            mask = mask & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
            return tl.load(x_ptr + row * (C * H * W) + (c * (H * W))[:, None] + ii * W + jj, mask=mask, other=0.0)
        offset = c * (H * W) + ki * W + kj  # per tap
        return tl.load(x_ptr + row * (C * H * W) + offset[:, None] + (i * W + j)[None, :], mask=mask, other=0.0)

    @triton.jit
    def _conv_fwd_dot_kernel(x_ptr, rows_ptr, w_ptr, b_ptr, y_ptr, g_ptr,
                         B, C, H, W, O, HO, WO, PH, PW,
                         K: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                         GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr, CL: tl.constexpr,
                         ACT: tl.constexpr, SLOPE: tl.constexpr, GRAD: tl.constexpr, GRAD_SLOPE: tl.constexpr,
                         G_CL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """The forward of a few-channel input read in NCHW (a first layer), into y channels-last when CL."""
        tile, ob, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        pmask, r, i, j, sample = _pixels(tile * BLOCK_M + tl.arange(0, BLOCK_M), B * HO * WO, m, B, HO, WO)
        row = _source_row(rows_ptr, sample, pmask, GATHER)
        o = ob * BLOCK_N + tl.arange(0, BLOCK_N)
        w_base = w_ptr + m.to(tl.int64) * (O * K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = _patch_tile(x_ptr, row, pmask, i, j, k, C, H, W, PH, PW, K, KH, KW)
            wk = tl.load(w_base + o[None, :] * K + k[:, None], mask=(k < K)[:, None] & (o < O)[None, :], other=0.0)
            acc += tl.dot(a.to(DOT), wk.to(DOT))
        _store_output(acc, b_ptr, y_ptr, m, O, HO, WO, o, r, sample, pmask, HAS_BIAS, ACT, SLOPE, CL, g_ptr, GRAD,
                      GRAD_SLOPE, G_CL)

    @triton.jit
    def _conv_fwd_fma_kernel(x_ptr, rows_ptr, wt_ptr, b_ptr, y_ptr, g_ptr, B, O,
                             C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, HO: tl.constexpr, WO: tl.constexpr,
                             PH: tl.constexpr, PW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                             GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SLOPE: tl.constexpr,
                             GRAD: tl.constexpr, GRAD_SLOPE: tl.constexpr, G_CL: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The forward as outer products on CUDA cores: each thread owns pixels and all O outputs.

        wt is [N, K, BLOCK_N]: the weights tap-major with the outputs zero-padded, one vector load a tap.
        The tile is [outputs, pixels], so a thread's pixels run along the fast axis of the default
        layout: each input value is loaded by the thread that uses it (no exchange through shared
        memory), and the image shape is constexpr, so every tap's offset is an immediate."""
        tile, m = tl.program_id(0), tl.program_id(1)
        pmask, r, i, j, sample = _pixels(tile * BLOCK_M + tl.arange(0, BLOCK_M), B * HO * WO, m, B, HO, WO)
        row = _source_row(rows_ptr, sample, pmask, GATHER)
        o = tl.arange(0, BLOCK_N)
        w_base = wt_ptr + m.to(tl.int64) * (C * KH * KW * BLOCK_N) + o
        acc = _conv_tile(x_ptr, row, i, j, pmask, w_base, C, H, W, PH, PW, KH, KW, BLOCK_M, BLOCK_N)
        _store_output(tl.trans(acc), b_ptr, y_ptr, m, O, HO, WO, o, r, sample, pmask, HAS_BIAS, ACT, SLOPE, False,
                      g_ptr, GRAD, GRAD_SLOPE, G_CL)

    @triton.jit
    def _conv_tile(x_ptr, row, i, j, pmask, w_base, C: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
                   PH: tl.constexpr, PW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The conv's [outputs, pixels] sums at output pixels (i, j) as outer products, one tap at a time."""
        x_base = x_ptr + row * (C * H * W) + (i - PH) * W + (j - PW)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for c in range(C):
            for ki in tl.static_range(KH):
                row_ok = pmask
                if PH > 0:  # only padded convs read outside the image
                    row_ok = row_ok & (i + ki - PH >= 0) & (i + ki - PH < H)
                for kj in tl.static_range(KW):
                    ok = row_ok
                    if PW > 0:
                        ok = ok & (j + kj - PW >= 0) & (j + kj - PW < W)
                    xv = tl.load(x_base + (c * (H * W) + ki * W + kj), mask=ok, other=0.0)
                    wv = tl.load(w_base + ((c * KH + ki) * KW + kj) * BLOCK_N)
                    acc += wv[:, None] * xv.to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _conv_pool_act_fma_kernel(x_ptr, rows_ptr, wt_ptr, b_ptr, a_ptr, code_ptr, B, O,
                                  C: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
                                  HP: tl.constexpr, WP: tl.constexpr, POOL: tl.constexpr,
                                  PH: tl.constexpr, PW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                                  ACT: tl.constexpr, SLOPE: tl.constexpr,
                                  GATHER: tl.constexpr, HAS_BIAS: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """act(maxpool(conv(x) + b)) in one pass: a thread owns pooled pixels and computes every position
        of their POOL x POOL windows itself, then keeps the max and which position gave it (`code`,
        row-major in the window, the first of equal values as max_pool2d), so the full-resolution conv
        output never reaches memory. Layout as `_conv_fwd_fma_kernel`: a [outputs, pixels] tile."""
        tile, m = tl.program_id(0), tl.program_id(1)
        pmask, r, pi, pj, sample = _pixels(tile * BLOCK_M + tl.arange(0, BLOCK_M), B * HP * WP, m, B, HP, WP)
        row = _source_row(rows_ptr, sample, pmask, GATHER)
        o = tl.arange(0, BLOCK_N)
        w_base = wt_ptr + m.to(tl.int64) * (C * KH * KW * BLOCK_N) + o
        if POOL == 1:
            best = _conv_tile(x_ptr, row, pi, pj, pmask, w_base, C, H, W, PH, PW, KH, KW, BLOCK_M, BLOCK_N)
            code = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
        else:  # 2x2 windows: the four positions' sums at once, each weight and input value loaded once for
            # a kernel row (an input value serves two positions, a weight vector two more)
            i, j = pi * 2, pj * 2
            x_base = x_ptr + row * (C * H * W) + (i - PH) * W + (j - PW)
            acc0 = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # window position (0, 0)
            acc1 = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # (0, 1)
            acc2 = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # (1, 0)
            acc3 = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # (1, 1)
            for c in range(C):
                for ki in tl.static_range(KH):  # kernel row ki meets input rows i + ki (window row 0) and i + ki + 1
                    ok0, ok1 = pmask, pmask
                    if PH > 0:
                        ok0 = ok0 & (i + ki - PH >= 0) & (i + ki - PH < H)
                        ok1 = ok1 & (i + ki + 1 - PH >= 0) & (i + ki + 1 - PH < H)
                    w_prev = tl.zeros((BLOCK_N,), dtype=tl.float32)
                    for v in tl.static_range(KW + 1):  # input column j + v: kernel column v (window column 0) or v - 1
                        m0, m1 = ok0, ok1
                        if PW > 0:
                            inside = (j + v - PW >= 0) & (j + v - PW < W)
                            m0, m1 = m0 & inside, m1 & inside
                        at = x_base + (c * (H * W) + ki * W + v)
                        x0 = tl.load(at, mask=m0, other=0.0).to(tl.float32)[None, :]
                        x1 = tl.load(at + W, mask=m1, other=0.0).to(tl.float32)[None, :]
                        if v < KW:
                            w_v = tl.load(w_base + ((c * KH + ki) * KW + v) * BLOCK_N)
                            acc0 += w_v[:, None] * x0
                            acc2 += w_v[:, None] * x1
                        if v > 0:
                            acc1 += w_prev[:, None] * x0
                            acc3 += w_prev[:, None] * x1
                        if v < KW:
                            w_prev = w_v
            best, code = acc0, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
            best, code = _keep_max(best, code, acc1, 1)
            best, code = _keep_max(best, code, acc2, 2)
            best, code = _keep_max(best, code, acc3, 3)
        if HAS_BIAS:  # a per-channel constant: adding it after the max changes nothing
            best += tl.load(b_ptr + m * O + o, mask=o < O, other=0.0).to(tl.float32)[:, None]
        a = _activate(best, ACT, SLOPE)
        out = sample.to(tl.int64)[None, :] * (O * HP * WP) + (o * (HP * WP))[:, None] + r[None, :]
        mask = pmask[None, :] & (o < O)[:, None]
        tl.store(a_ptr + out, a.to(a_ptr.dtype.element_ty), mask=mask)
        if POOL > 1:
            tl.store(code_ptr + out, code.to(tl.int8), mask=mask)

    @triton.jit
    def _output_grad_tile(dy_ptr, a_ptr, code_ptr, sample, r, o, pmask, O: tl.constexpr, WO: tl.constexpr,
                          POOL: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, ACT: tl.constexpr, SLOPE: tl.constexpr,
                          DY_CL: tl.constexpr = False):
        """The conv's output gradient at pixels r of `sample` as a [pixels, outputs] float32 tile. Unfused
        (ACT identity, POOL 1) dy itself; behind `conv2d_pool_act`, rebuilt from the gradient of its output
        da [.., HP, WP], that output a and the pool's choice `code`: da * act'(a) at the chosen window
        position, 0 at the others and at pixels the pool's floor dropped (max_pool2d's backward).
        DY_CL: an unfused dy is channels-last in memory."""
        if (POOL == 1) & (ACT == "identity") & DY_CL:
            ptrs = dy_ptr + (sample.to(tl.int64) * (HP * WP) + r)[:, None] * O + o[None, :]
            return tl.load(ptrs, mask=pmask[:, None] & (o < O)[None, :], other=0.0).to(tl.float32)
        if (POOL == 1) & (ACT == "identity"):
            ptrs = dy_ptr + sample.to(tl.int64) * (O * HP * WP) + (o * (HP * WP))[None, :] + r[:, None]
            return tl.load(ptrs, mask=pmask[:, None] & (o < O)[None, :], other=0.0).to(tl.float32)
        i, j = r // WO, r % WO
        pi, pj = i // POOL, j // POOL
        ok = pmask & (pi < HP) & (pj < WP)
        src = sample.to(tl.int64) * (O * HP * WP) + (o * (HP * WP))[None, :] + (pi * WP + pj)[:, None]
        mask = ok[:, None] & (o < O)[None, :]
        g = tl.load(dy_ptr + src, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + src, mask=mask, other=0.0).to(tl.float32)
        g = g * _act_grad_from_output(a, ACT, SLOPE)
        if POOL > 1:
            chosen = tl.load(code_ptr + src, mask=mask, other=-1).to(tl.int32)
            g = tl.where(chosen == ((i % POOL) * POOL + j % POOL)[:, None], g, 0.0)
        return g

    @triton.jit
    def _conv_wgrad_dot_kernel(x_ptr, rows_ptr, dy_ptr, a_ptr, code_ptr, dw_ptr, db_ptr, B, SPLIT, PER_SPLIT,
                               C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, O: tl.constexpr,
                               HO: tl.constexpr, WO: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                               KH: tl.constexpr, KW: tl.constexpr, CHUNKS: tl.constexpr,
                               POOL: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, ACT: tl.constexpr,
                               SLOPE: tl.constexpr, GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                               DY_CL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """dw (and db) of model m over its tiles [split * PER_SPLIT, ...): a tile is BLOCK_M pixels of one
        sample's output (CHUNKS tiles a sample), so its dy rows are contiguous runs the loads coalesce.
        dy is read through `_output_grad_tile` (HP, WP = HO, WO when unfused)."""
        kob, split, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        K: tl.constexpr = C * KH * KW
        OB: tl.constexpr = (O + BLOCK_N - 1) // BLOCK_N
        kb = kob // OB
        k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        o = (kob % OB) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # summed over pixels once, after the loop
        start = split * PER_SPLIT
        for t in range(start, tl.minimum(start + PER_SPLIT, B * CHUNKS)):
            sample = m * B + t // CHUNKS
            r = (t % CHUNKS) * BLOCK_M + tl.arange(0, BLOCK_M)
            pmask = r < HO * WO
            row = tl.load(rows_ptr + sample).to(tl.int64) if GATHER else sample.to(tl.int64)
            a = _patch_tile_taps_first(x_ptr, row, pmask, r // WO, r % WO, k, C, H, W, PH, PW, K, KH, KW)
            g = _output_grad_tile(dy_ptr, a_ptr, code_ptr, sample, r, o, pmask, O, WO, POOL, HP, WP, ACT, SLOPE, DY_CL)
            acc += tl.dot(a.to(DOT), g.to(DOT))
            if HAS_BIAS:
                acc_b += g.to(tl.float32)
        part = (m.to(tl.int64) * SPLIT + split) * (O * K)
        tl.store(dw_ptr + part + o[None, :] * K + k[:, None], acc, mask=(k < K)[:, None] & (o < O)[None, :])
        if HAS_BIAS:
            tl.store(db_ptr + (m.to(tl.int64) * SPLIT + split) * O + o, tl.sum(acc_b, axis=0), mask=(o < O) & (kb == 0))


    # ---- wide layers channels-last: im2col columns (tap, channel) as runs of contiguous channels ---------

    @triton.jit
    def _cl_patch(x_ptr, row, i, j, pmask, k, C: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
                  PH: tl.constexpr, PW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                  SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr):
        """Columns k, flat over (tap, channel), of the im2col rows at output pixels (i, j) of x [rows, H, W, C]:
        a [pixels, len(k)] tile whose columns run over several taps where C is narrower than the tile. The
        output grid has stride (SH, SW) over the padded input; with (DH, DW) the input is dilated by it (a
        strided conv's input gradient: the rows and columns between its pixels read 0)."""
        t, c = k // C, k % C
        di, dj = t // KW - PH, t % KW - PW
        ok = pmask[:, None] & (k < KH * KW * C)[None, :]
        if (DH > 1) | (DW > 1):
            ri, rj = (i * SH)[:, None] + di[None, :], (j * SW)[:, None] + dj[None, :]
            ok = ok & (ri >= 0) & (rj >= 0) & (ri % DH == 0) & (rj % DW == 0) & (ri < H * DH) & (rj < W * DW)
            at = row[:, None] * (H * W * C) + ((ri // DH) * W + rj // DW) * C + c[None, :]
            return tl.load(x_ptr + at, mask=ok, other=0.0)
        if (PH > 0) | (PW > 0):  # zero padding: taps outside the image read 0
            ii, jj = (i * SH)[:, None] + di[None, :], (j * SW)[:, None] + dj[None, :]
            ok = ok & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
        at = (row * (H * W * C) + (i * SH * W + j * SW) * C)[:, None] + ((di * W + dj) * C + c)[None, :]
        return tl.load(x_ptr + at, mask=ok, other=0.0)

    @triton.jit
    def _conv_fwd_cl_kernel(x_ptr, rows_ptr, w_ptr, b_ptr, y_ptr, g_ptr, B, O,
                            C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, HO: tl.constexpr, WO: tl.constexpr,
                            PH: tl.constexpr, PW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                            GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                            ACT: tl.constexpr, SLOPE: tl.constexpr, GRAD: tl.constexpr, GRAD_SLOPE: tl.constexpr,
                            G_CL: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, DH: tl.constexpr,
                            DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """The forward of a wide layer, x [rows, H, W, C] and y [N*B, HO, WO, O] channels-last, w as
        [N, KH*KW*C, O]: one loop over blocks of im2col columns (tap, channel), each a [pixels, columns] @
        [columns, outputs] product whose loads are contiguous channel runs (the NCHW gather loads an element a lane).
        Stride (SH, SW); the input dilated by (DH, DW) (`_cl_patch`)."""
        tile, ob, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        pmask, r, i, j, sample = _pixels(tile * BLOCK_M + tl.arange(0, BLOCK_M), B * HO * WO, m, B, HO, WO)
        row = _source_row(rows_ptr, sample, pmask, GATHER)
        o = ob * BLOCK_N + tl.arange(0, BLOCK_N)
        w_base = w_ptr + m.to(tl.int64) * (KH * KW * C * O)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, KH * KW * C, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = _cl_patch(x_ptr, row, i, j, pmask, k, C, H, W, PH, PW, KH, KW, SH, SW, DH, DW)
            wk = tl.load(w_base + k[:, None] * O + o[None, :], mask=(k < KH * KW * C)[:, None] & (o < O)[None, :],
                         other=0.0)
            acc += tl.dot(a.to(DOT), wk.to(DOT))
        _store_output(acc, b_ptr, y_ptr, m, O, HO, WO, o, r, sample, pmask, HAS_BIAS, ACT, SLOPE, True, g_ptr, GRAD,
                      GRAD_SLOPE, G_CL)

    @triton.jit
    def _conv_wgrad_cl_kernel(x_ptr, rows_ptr, dy_ptr, dw_ptr, db_ptr, B, SPLIT, PER_SPLIT,
                              C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, O: tl.constexpr,
                              HO: tl.constexpr, WO: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                              KH: tl.constexpr, KW: tl.constexpr, GATHER: tl.constexpr, HAS_BIAS: tl.constexpr,
                              DOT: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """dw (and db) of a wide layer, channels-last: program (block of im2col columns (tap, channel) and of
        outputs; split; model) sums [columns, pixels] @ [pixels, outputs] over its pixel tiles [split * PER_SPLIT,
        ...) of model m, pixels flat over (sample, row, column), so the dy [N*B, HO, WO, O] rows of a tile are one
        run. dw is [N, SPLIT, KH*KW*C, O], db [N, SPLIT, O]. Stride (SH, SW)."""
        kb, split, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        OB: tl.constexpr = (O + BLOCK_N - 1) // BLOCK_N
        k = (kb // OB) * BLOCK_K + tl.arange(0, BLOCK_K)
        o = (kb % OB) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # summed over pixels once, after the loop
        start = split * PER_SPLIT
        for tile in range(start, tl.minimum(start + PER_SPLIT, tl.cdiv(B * HO * WO, BLOCK_M))):
            pmask, r, i, j, sample = _pixels(tile * BLOCK_M + tl.arange(0, BLOCK_M), B * HO * WO, m, B, HO, WO)
            row = _source_row(rows_ptr, sample, pmask, GATHER)
            a = _cl_patch(x_ptr, row, i, j, pmask, k, C, H, W, PH, PW, KH, KW, SH, SW, 1, 1)
            g_at = dy_ptr + (sample.to(tl.int64) * (HO * WO) + r)[:, None] * O + o[None, :]
            g = tl.load(g_at, mask=pmask[:, None] & (o < O)[None, :], other=0.0)
            acc += tl.dot(tl.trans(a.to(DOT)), g.to(DOT))
            if HAS_BIAS:
                acc_b += g.to(tl.float32)
        part = m.to(tl.int64) * SPLIT + split
        at = dw_ptr + part * (KH * KW * C * O) + k[:, None] * O + o[None, :]
        tl.store(at, acc, mask=(k < KH * KW * C)[:, None] & (o < O)[None, :])
        if HAS_BIAS:
            tl.store(db_ptr + part * O + o, tl.sum(acc_b, axis=0), mask=(o < O) & (kb < OB))


def _fma_forward(c: int, o: int) -> bool:
    """Whether the forward runs on CUDA cores (auto: fewer than 16 outputs from fewer than 16 inputs; a wider
    input fills tensor-core tiles a tap at a time). The CUDA-core forward writes NCHW, so auto keeps it to outputs
    that the next conv also reads NCHW (`reads_channels_last`: under 16 channels): no layout copy between them."""
    forward = tuning.forward(tuning.current())
    return o < 16 and c < 16 if forward == "auto" else forward == "fma"


def _writes_channels_last(c: int, o: int) -> bool:
    """Whether the forward of a layer of c inputs and o outputs writes channels-last (the tensor-core forward)."""
    return tuning.current().channels_last and not _fma_forward(c, o)


def reads_channels_last(c: int, o: int) -> bool:
    """Whether the forward of a layer of c inputs and o outputs reads its input channels-last (copied so if it is
    not): a tensor-core forward of 16 or more channels (a tap's channels fill a tile's reduction)."""
    return _writes_channels_last(c, o) and c >= 16


def _reads_channels_last(x: Tensor, rows: Tensor | None, o: int) -> bool:
    """`reads_channels_last` for x, but a data set read by index only if it is stored so (never copied)."""
    return reads_channels_last(x.shape[1], o) and (rows is None or x.is_contiguous(memory_format=torch.channels_last))


def _output(shape: tuple[int, ...], c: int, like: Tensor, dtype: torch.dtype) -> Tensor:
    """The forward's output [N*B, O, HO, WO] from c inputs, channels-last where `_writes_channels_last` says."""
    cl = _writes_channels_last(c, shape[1])
    return torch.empty(shape, device=like.device, dtype=dtype,
                       memory_format=torch.channels_last if cl else torch.contiguous_format)


def _cl_blocks(c: int, o: int, taps: int, wgrad: bool = False) -> tuple[int, int, int]:
    """Tile sizes (pixels, im2col columns, outputs) of the channels-last kernels. Columns run flat over (tap,
    channel), at least 16 a step (tl.dot's least reduction): the forward's a tap's channels (16, 32 or 64), the
    weight gradient's 64 (a narrow layer's step spans several taps: fewer passes over dy). Outputs up to 128."""
    t = tuning.current()
    if wgrad:
        block_k = t.cl_wgrad_block_k or min(64, max(16, triton.next_power_of_2(c * taps)))
    else:
        block_k = t.cl_block_k or (16 if c <= 16 else 32 if c <= 32 else 64)
    block_n = min(128, max(16, triton.next_power_of_2(o)))
    block_m = (t.cl_wgrad_block_m if wgrad else 0) or t.cl_block_m or (128 if block_n <= 64 else 64)
    return block_m, block_k, block_n


def _out_size(size: tuple[int, int], kernel: tuple[int, int], padding: tuple[int, int],
              stride: tuple[int, int] = (1, 1), dilation: tuple[int, int] = (1, 1)) -> tuple[int, int]:
    """A conv's output rows and columns: its input `size` dilated by `dilation`, zero-padded, at `stride`."""
    return tuple((d * (s - 1) + 1 + 2 * p - k) // st + 1 for s, k, p, st, d in zip(size, kernel, padding, stride, dilation))


def strided_reads_directly(c: int, o: int) -> bool:
    """Whether a strided conv of c inputs and o outputs runs on the channels-last kernels as it is (forward and
    weight gradient at its stride, input gradient over the dilated output gradient), not as the stride-1 conv of
    its input's blocks: both it and its input gradient read channels-last (and the tuning's strided_direct)."""
    return tuning.current().strided_direct and reads_channels_last(c, o) and reads_channels_last(o, c)


def _launch_forward(x: Tensor, rows: Tensor | None, w: Tensor, b: Tensor | None, batch: int,
                    padding: tuple[int, int], out_dtype: torch.dtype, act: str = "identity", slope: float = 0.0,
                    through: tuple[Tensor, str, float] | None = None, stride: tuple[int, int] = (1, 1),
                    dilation: tuple[int, int] = (1, 1), size: tuple[int, int] | None = None) -> Tensor:
    """The forward's launch. `through` = (g, act, slope): the output (an input gradient, y's shape) times act'(g).
    A `stride`, an input `dilation` (a strided conv's input gradient) and an output `size` other than the conv's
    own (None) run on the channels-last kernel only (`strided_reads_directly`)."""
    n, o, c, kh, kw = w.shape
    h, wd = x.shape[2], x.shape[3]
    ho, wo = size or _out_size((h, wd), (kh, kw), padding, stride, dilation)
    y = _output((n * batch, o, ho, wo), c, x, out_dtype)
    rows_arg = rows if rows is not None else x  # any pointer when GATHER is off
    g, grad, grad_slope = through if through is not None else (y, "identity", 0.0)
    g_cl = stored_channels_last(g)
    g = g if g_cl else g.contiguous()
    epilogue = dict(GRAD=grad, GRAD_SLOPE=float(grad_slope), G_CL=g_cl)
    if _reads_channels_last(x, rows, o):
        x = x.contiguous(memory_format=torch.channels_last)
        block_m, block_k, block_n = _cl_blocks(c, o, kh * kw)
        wt = w.permute(0, 3, 4, 2, 1).contiguous()  # [N, kh, kw, C, O]: im2col column (tap, channel) a row of outputs
        _conv_fwd_cl_kernel[(triton.cdiv(batch * ho * wo, block_m), triton.cdiv(o, block_n), n)](
            x, rows_arg, wt, b if b is not None else wt, y, g, batch, o, C=c, H=h, W=wd, HO=ho, WO=wo,
            PH=padding[0], PW=padding[1], KH=kh, KW=kw, GATHER=rows is not None, HAS_BIAS=b is not None,
            DOT=_dot_dtype(y), ACT=act, SLOPE=slope, **epilogue, SH=stride[0], SW=stride[1], DH=dilation[0],
            DW=dilation[1], BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=tuning.current().cl_warps,
        )
        return y
    assert stride == dilation == (1, 1) and size is None, "a strided conv on the NCHW kernels: run its blocks' conv"
    x = x.contiguous()
    if _fma_forward(c, o):
        block_n = triton.next_power_of_2(o)
        t = tuning.current()
        block_m = t.fma_block_m or min(1024, 8192 // block_n)  # 8 outputs x 8 pixels a thread (4 warps)
        wt = _fma_weights(w, block_n)
        _conv_fwd_fma_kernel[(triton.cdiv(batch * ho * wo, block_m), n)](
            x, rows_arg, wt, b if b is not None else wt, y, g, batch, o, C=c, H=h, W=wd, HO=ho, WO=wo,
            PH=padding[0], PW=padding[1], KH=kh, KW=kw, GATHER=rows is not None, HAS_BIAS=b is not None,
            ACT=act, SLOPE=slope, **epilogue, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=t.fma_warps,
        )
        return y
    block_m, block_k, block_n = _blocks(c * kh * kw, o)
    _conv_fwd_dot_kernel[(triton.cdiv(batch * ho * wo, block_m), triton.cdiv(o, block_n), n)](
        x, rows_arg, w, b if b is not None else w, y, g, batch, c, h, wd, o, ho, wo, padding[0], padding[1],
        K=c * kh * kw, KH=kh, KW=kw, GATHER=rows is not None, HAS_BIAS=b is not None, DOT=_dot_dtype(y),
        CL=_writes_channels_last(c, o), ACT=act, SLOPE=slope, **epilogue, BLOCK_M=block_m, BLOCK_K=block_k,
        BLOCK_N=block_n, num_warps=4,
    )
    return y


def _fma_weights(w: Tensor, block_n: int) -> Tensor:
    """w [N, O, C, kh, kw] as [N, C*kh*kw, block_n] float32: tap-major, outputs zero-padded (one vector a tap)."""
    n, o = w.shape[:2]
    wt = torch.zeros(n, w[0, 0].numel(), block_n, device=w.device, dtype=torch.float32)
    wt[:, :, :o] = w.reshape(n, o, -1).transpose(1, 2)
    return wt


def _pool_act_kernel(o: int) -> bool:
    """Whether `conv2d_pool_act` with a pool runs the CUDA-core forward with the pool and activation folded in: up
    to 16 outputs (any number under the tuning's forward "fma"). Without a pool, `_plain` decides."""
    forward = tuning.forward(tuning.current())
    return o <= 16 if forward == "auto" else forward == "fma"


def _plain(c: int, o: int, pool: int) -> bool:
    """Whether `conv2d_pool_act` of c inputs and o outputs runs the plain forward, the activation in its epilogue:
    no pool, and a layer `_fma_forward` leaves to tensor cores (the CUDA-core kernel, reading a tap's channels
    one at a time, pays only for fewer than 16 inputs)."""
    return pool == 1 and not _fma_forward(c, o)


def _launch_pool_act(x: Tensor, rows: Tensor | None, w: Tensor, b: Tensor | None, batch: int, padding: tuple[int, int],
                     pool: int, act: str, slope: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    n, o, c, kh, kw = w.shape
    if _plain(c, o, pool):  # reads x in its own memory format
        return _launch_forward(x, rows, w, b, batch, padding, out_dtype, act, slope), x.new_empty(0, dtype=torch.int8)
    x = x.contiguous()
    h, wd = x.shape[2], x.shape[3]
    hp, wp = (h + 2 * padding[0] - kh + 1) // pool, (wd + 2 * padding[1] - kw + 1) // pool
    a = torch.empty(n * batch, o, hp, wp, device=x.device, dtype=out_dtype)
    code = torch.empty(n * batch, o, hp, wp, device=x.device, dtype=torch.int8) if pool > 1 else a.new_empty(0, dtype=torch.int8)
    block_n = triton.next_power_of_2(o)
    t = tuning.current()
    block_m = t.fused_block_m or min(1024, 8192 // block_n) // (pool * pool)  # a tile per window position live
    wt = _fma_weights(w, block_n)
    _conv_pool_act_fma_kernel[(triton.cdiv(batch * hp * wp, block_m), n)](
        x, rows if rows is not None else x, wt, b if b is not None else wt, a, code if pool > 1 else a, batch, o,
        C=c, H=h, W=wd, HP=hp, WP=wp, POOL=pool, PH=padding[0], PW=padding[1], KH=kh, KW=kw, ACT=act, SLOPE=slope,
        GATHER=rows is not None, HAS_BIAS=b is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=t.fma_warps,
    )
    return a, code


def _launch_wgrad(x: Tensor, rows: Tensor | None, dy: Tensor, w_shape: torch.Size, padding: tuple[int, int],
                  bias: bool, fused: tuple[Tensor, Tensor, int, str, float] | None = None) -> tuple[Tensor, Tensor | None]:
    """dw, db for the output gradient dy; with `fused` = (a, code, pool, act, slope), dy is the gradient of
    conv2d_pool_act's output a, and the conv's own output gradient is rebuilt tile by tile in the kernel."""
    n, o, c, kh, kw = w_shape
    k = c * kh * kw
    h, wd = x.shape[2], x.shape[3]
    ho, wo = h + 2 * padding[0] - kh + 1, wd + 2 * padding[1] - kw + 1
    batch = dy.shape[0] // n
    if fused is None and _reads_channels_last(x, rows, o):
        return _launch_wgrad_cl(x, rows, dy, w_shape, padding, bias, batch, ho, wo)
    x = x.contiguous()
    dy_cl = fused is None and dy.is_contiguous(memory_format=torch.channels_last)
    dy = dy if dy_cl else dy.contiguous()
    a, code, pool, act, slope = fused if fused is not None else (dy, dy, 1, "identity", 0.0)
    _, block_k, block_n = _blocks(k, o)
    t = tuning.current()
    block_k = t.wgrad_block_k or block_k
    # tiles of one sample's output pixels: at most the image (rounded up to 16, tl.dot's least side)
    block_m = min(t.wgrad_block_m or (128 if k <= 32 else 64), max(16, triton.next_power_of_2(ho * wo)))
    chunks = triton.cdiv(ho * wo, block_m)
    k_blocks, tiles = triton.cdiv(k, block_k) * triton.cdiv(o, block_n), batch * chunks  # (taps, outputs) tiles
    split, per_split = _programs_per_model(tiles, n * k_blocks, dy.device)  # each model's tiles split to fill the card
    dw = torch.empty(n, split, o, k, device=dy.device, dtype=torch.float32)
    db = torch.empty(n, split, o, device=dy.device, dtype=torch.float32) if bias else None
    _conv_wgrad_dot_kernel[(k_blocks, split, n)](
        x, rows if rows is not None else x, dy, a, code, dw, db if db is not None else dw, batch, split, per_split,
        C=c, H=h, W=wd, O=o, HO=ho, WO=wo, PH=padding[0], PW=padding[1], KH=kh, KW=kw, CHUNKS=chunks,
        POOL=pool, HP=dy.shape[2], WP=dy.shape[3], ACT=act, SLOPE=slope,
        GATHER=rows is not None, HAS_BIAS=bias, DOT=_dot_dtype(dy), DY_CL=dy_cl,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4,
        **({"num_stages": t.wgrad_stages} if t.wgrad_stages else {}),
    )
    return dw.sum(1).view(w_shape), (db.sum(1) if db is not None else None)


def _launch_wgrad_cl(x: Tensor, rows: Tensor | None, dy: Tensor, w_shape: torch.Size, padding: tuple[int, int],
                     bias: bool, batch: int, ho: int, wo: int,
                     stride: tuple[int, int] = (1, 1)) -> tuple[Tensor, Tensor | None]:
    """dw, db of a wide layer from x and dy channels-last (`_conv_wgrad_cl_kernel`), the conv at `stride`."""
    n, o, c, kh, kw = w_shape
    x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    block_m, block_k, block_n = _cl_blocks(c, o, kh * kw, wgrad=True)
    blocks = triton.cdiv(kh * kw * c, block_k) * triton.cdiv(o, block_n)
    split, per_split = _programs_per_model(triton.cdiv(batch * ho * wo, block_m), n * blocks, dy.device)
    dw = torch.empty(n, split, kh, kw, c, o, device=dy.device, dtype=torch.float32)
    db = torch.empty(n, split, o, device=dy.device, dtype=torch.float32) if bias else None
    _conv_wgrad_cl_kernel[(blocks, split, n)](
        x, rows if rows is not None else x, dy, dw, db if db is not None else dw, batch, split, per_split,
        C=c, H=x.shape[2], W=x.shape[3], O=o, HO=ho, WO=wo, PH=padding[0], PW=padding[1], KH=kh, KW=kw,
        GATHER=rows is not None, HAS_BIAS=bias, DOT=_dot_dtype(dy), SH=stride[0], SW=stride[1],
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=tuning.current().cl_warps,
    )
    return dw.sum(1).permute(0, 4, 3, 1, 2).contiguous(), (db.sum(1) if db is not None else None)


# ---- the custom ops: forward, and the two backward products --------------------------------------------

@population_op("pop_conv2d")
def _pop_conv2d(x: Tensor, w: Tensor, b: Tensor | None, rows: Tensor | None, batch: int,
                pad_h: int, pad_w: int, out_dtype: torch.dtype, input_act: str, input_slope: float) -> Tensor:
    return _launch_forward(x, rows, w.contiguous(), b, batch, (pad_h, pad_w), out_dtype)


@_pop_conv2d.register_fake
def _(x, w, b, rows, batch, pad_h, pad_w, out_dtype, input_act, input_slope):
    n, o, _, kh, kw = w.shape
    return _output((n * batch, o, x.shape[2] + 2 * pad_h - kh + 1, x.shape[3] + 2 * pad_w - kw + 1), x.shape[1], x, out_dtype)


@population_op("pop_conv2d_dx_through")
def _pop_conv2d_dx_through(dy: Tensor, w_t: Tensor, g: Tensor, batch: int, pad_h: int, pad_w: int,
                           out_dtype: torch.dtype, act: str, slope: float) -> Tensor:
    """The input gradient (the forward of dy with the flipped, transposed weights w_t) times act'(g), g the
    conv's input and the output of `act`: the gradient w.r.t. that activation's input, in one pass."""
    return _launch_forward(dy, None, w_t.contiguous(), None, batch, (pad_h, pad_w), out_dtype, through=(g, act, slope))


@_pop_conv2d_dx_through.register_fake
def _(dy, w_t, g, batch, pad_h, pad_w, out_dtype, act, slope):
    n, o, _, kh, kw = w_t.shape
    return _output((n * batch, o, dy.shape[2] + 2 * pad_h - kh + 1, dy.shape[3] + 2 * pad_w - kw + 1), dy.shape[1], dy,
                   out_dtype)


@population_op("pop_conv2d_wgrad")
def _pop_conv2d_wgrad(x: Tensor, rows: Tensor | None, dy: Tensor, w: Tensor, pad_h: int, pad_w: int,
                      bias: bool) -> tuple[Tensor, Tensor]:
    dw, db = _launch_wgrad(x, rows, dy, w.shape, (pad_h, pad_w), bias)
    return dw, db if db is not None else dw.new_zeros(0)


@_pop_conv2d_wgrad.register_fake
def _(x, rows, dy, w, pad_h, pad_w, bias):
    return _wgrad_fake(w, bias)


def _setup(ctx, inputs, output) -> None:
    x, w, b, rows, batch, pad_h, pad_w, _, input_act, input_slope = inputs
    ctx.save_for_backward(x, w, rows)
    ctx.meta = (batch, pad_h, pad_w, b is not None, x.dtype, (input_act, input_slope))


def _backward(ctx, dy: Tensor):
    x, w, rows = ctx.saved_tensors
    batch, pad_h, pad_w, has_bias, x_dtype, through = ctx.meta
    return (*_conv_grads(ctx.needs_input_grad, dy, x, w, rows, batch, pad_h, pad_w, has_bias, x_dtype, through),
            *(None,) * 7)


def _flipped_transposed(w: Tensor) -> Tensor:
    """w [N, O, C, kh, kw] flipped in space with inputs and outputs swapped, [N, C, O, kh, kw]: the weights of the
    forward conv that is a conv's input gradient."""
    return w.flip(3, 4).transpose(1, 2).contiguous()


def _conv_grads(needs: tuple[bool, ...], dy: Tensor, x: Tensor, w: Tensor, rows: Tensor | None, batch: int,
                pad_h: int, pad_w: int, has_bias: bool, x_dtype: torch.dtype,
                through: tuple[str, float] = ("identity", 0.0)):
    """(dx, dw, db) of the convolution for its output gradient dy; None where `needs` says not needed.
    `through` = (act, slope): x is that activation's output, and dx is w.r.t. the activation's input."""
    dx = dw = db = None
    if needs[0]:
        if rows is not None:
            raise NotImplementedError("the input gradient of a row-indexed (data-reading) convolution")
        kh, kw = w.shape[3], w.shape[4]
        w_t = _flipped_transposed(w)
        if through[0] == "identity":
            dx = _pop_conv2d(dy, w_t, None, None, batch, kh - 1 - pad_h, kw - 1 - pad_w, x_dtype, "identity", 0.0)
        else:
            dx = _pop_conv2d_dx_through(dy, w_t, x, batch, kh - 1 - pad_h, kw - 1 - pad_w, x_dtype, *through)
    if needs[1] or (has_bias and needs[2]):
        dw, db = _pop_conv2d_wgrad(x, rows, dy, w, pad_h, pad_w, has_bias)
        dw, db = dw.to(w.dtype), (db if has_bias else None)
    return dx, dw, db


_pop_conv2d.register_autograd(_backward, setup_context=_setup)


# ---- a strided conv read as it is: the channels-last kernels at its stride -----------------------------

@population_op("pop_conv2d_strided")
def _pop_conv2d_strided(x: Tensor, w: Tensor, b: Tensor | None, batch: int, stride_h: int, stride_w: int,
                        pad_h: int, pad_w: int, act: str, slope: float, act_grad: bool, out_dtype: torch.dtype) -> Tensor:
    """act(conv(x, w, b)) at the stride, the activation in the forward's epilogue; act_grad as `conv2d_pool_act`'s."""
    return _launch_forward(x, None, w.contiguous(), b, batch, (pad_h, pad_w), out_dtype, act, slope,
                           stride=(stride_h, stride_w))


@_pop_conv2d_strided.register_fake
def _(x, w, b, batch, stride_h, stride_w, pad_h, pad_w, act, slope, act_grad, out_dtype):
    n, o, c, kh, kw = w.shape
    ho, wo = _out_size((x.shape[2], x.shape[3]), (kh, kw), (pad_h, pad_w), (stride_h, stride_w))
    return _output((n * batch, o, ho, wo), c, x, out_dtype)


@population_op("pop_conv2d_strided_dx")
def _pop_conv2d_strided_dx(dy: Tensor, w_t: Tensor, batch: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
                           h: int, w: int, out_dtype: torch.dtype) -> Tensor:
    """A strided conv's input gradient [N*B, C, h, w]: the stride-1 conv, with the flipped, transposed weights w_t
    [N, C, O, kh, kw], of dy dilated by the stride and padded by kernel - 1 - pad (rows past dy's reach get 0)."""
    kh, kw = w_t.shape[3], w_t.shape[4]
    return _launch_forward(dy, None, w_t.contiguous(), None, batch, (kh - 1 - pad_h, kw - 1 - pad_w), out_dtype,
                           dilation=(stride_h, stride_w), size=(h, w))


@_pop_conv2d_strided_dx.register_fake
def _(dy, w_t, batch, stride_h, stride_w, pad_h, pad_w, h, w, out_dtype):
    return _output((w_t.shape[0] * batch, w_t.shape[1], h, w), dy.shape[1], dy, out_dtype)


@population_op("pop_conv2d_strided_wgrad")
def _pop_conv2d_strided_wgrad(x: Tensor, dy: Tensor, w: Tensor, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
                              bias: bool) -> tuple[Tensor, Tensor]:
    batch = dy.shape[0] // w.shape[0]
    dw, db = _launch_wgrad_cl(x, None, dy, w.shape, (pad_h, pad_w), bias, batch, dy.shape[2], dy.shape[3],
                              (stride_h, stride_w))
    return dw, db if db is not None else dw.new_zeros(0)


@_pop_conv2d_strided_wgrad.register_fake
def _(x, dy, w, stride_h, stride_w, pad_h, pad_w, bias):
    return _wgrad_fake(w, bias)


def _setup_strided(ctx, inputs, output) -> None:
    x, w, b, batch, stride_h, stride_w, pad_h, pad_w, act, slope, act_grad, _ = inputs
    act = act if act_grad else "identity"  # else the output's reader applies act' (the gradient arrives past it)
    ctx.save_for_backward(x, w, output if act != "identity" else None)
    ctx.meta = (batch, (stride_h, stride_w), (pad_h, pad_w), b is not None, x.dtype, (x.shape[2], x.shape[3]),
                act, slope)


def _backward_strided(ctx, da: Tensor):
    x, w, a = ctx.saved_tensors
    batch, stride, pad, has_bias, x_dtype, size, act, slope = ctx.meta
    dy = da if act == "identity" else _act_backward(da, a, act, slope)
    needs = ctx.needs_input_grad
    dx = dw = db = None
    if needs[0]:
        w_t = _flipped_transposed(w)
        dx = _pop_conv2d_strided_dx(dy, w_t, batch, *stride, *pad, *size, x_dtype)
    if needs[1] or (has_bias and needs[2]):
        dw, db = _pop_conv2d_strided_wgrad(x, dy, w, *stride, *pad, has_bias)
        dw, db = dw.to(w.dtype), (db if has_bias else None)
    return dx, dw, db, *(None,) * 9


_pop_conv2d_strided.register_autograd(_backward_strided, setup_context=_setup_strided)


def conv2d(x: Tensor, w: Tensor, b: Tensor | None, padding: tuple[int, int] = (0, 0), *,
           rows: Tensor | None = None, out_dtype: torch.dtype | None = None, windows: Tensor | None = None,
           input_act: tuple[str, float] | None = None, stride: tuple[int, int] = (1, 1)) -> Tensor:
    """Model n's Conv2d on its own samples: w [N, O, C, kh, kw], b [N, O] -> y [N*B, O, Ho, Wo].

    x is [N*B, C, H, W] (model n's batch in rows n*B..(n+1)*B-1), or, with `rows` [N, B] (or [N*B])
    of indices, the data set [S, C, H, W] that those indices read. The output has x's dtype unless
    `out_dtype` is given; gradients flow to x (when not row-indexed), w and b. With `rows`, `windows` may
    be x's `window_table(x, (kh, kw), padding, pool=1)`: the same result from tensor-core products.
    `input_act` = (act, slope): x is the output of that activation, folded into the conv that wrote it with
    `act_grad=False`, and the gradient this op returns for x is w.r.t. the activation's input (act' applied in
    the input gradient's store, so the producer's backward has no pass of its own over x for it).
    A `stride` other than 1 (not with rows, windows or input_act) runs on the channels-last kernels at that stride
    where `strided_reads_directly`, else as the stride-1 conv of the input's blocks (`space_to_depth`).
    """
    x, w, rows, batch = _checked(x, w, rows)
    stride = _stride(stride, rows, windows, input_act)
    if stride != (1, 1):
        padding = (int(padding[0]), int(padding[1]))
        if strided_reads_directly(x.shape[1], w.shape[1]):
            return _pop_conv2d_strided(x, w, b, batch, *stride, *padding, "identity", 0.0, True, out_dtype or x.dtype)
        return conv2d(*_as_blocks(x, w, stride, padding), b, out_dtype=out_dtype)
    act, slope = _input_act(input_act, rows, windows)
    if windows is not None:
        return _window_conv(windows, x, w, b, padding, _need_rows(rows), batch, 1, "identity", 0.0, out_dtype or x.dtype)
    return _pop_conv2d(x, w, b, rows, batch, int(padding[0]), int(padding[1]), out_dtype or x.dtype, act, slope)


def _as_blocks(x: Tensor, w: Tensor, stride: tuple[int, int], padding: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """A strided conv's input and weights as those of the stride-1 conv of the input's blocks (`space_to_depth`)."""
    kernel = (w.shape[3], w.shape[4])
    blocks = space_to_depth(x, stride, padding, kernel, channels_last=reads_channels_last(x.shape[1], w.shape[1]))
    return blocks, strided_weight(w, stride)


def _stride(stride: tuple[int, int], rows: Tensor | None, windows: Tensor | None,
            input_act: tuple[str, float] | None) -> tuple[int, int]:
    """`stride` checked: two positive integers, and 1 where the conv reads the data set or an activation's output."""
    if len(stride) != 2 or any(int(s) != s or s < 1 for s in stride):
        raise ValueError(f"stride = {stride!r}: expected two positive integers (rows, columns)")
    stride = (int(stride[0]), int(stride[1]))
    if stride != (1, 1) and (rows is not None or windows is not None or input_act is not None):
        raise ValueError(f"stride = {stride} with rows, windows or input_act is not allowed: those run at stride 1")
    return stride


def _input_act(input_act: tuple[str, float] | None, rows: Tensor | None, windows: Tensor | None) -> tuple[str, float]:
    """`input_act` checked: (act, slope), ("identity", 0.0) for None; a data-reading conv has no input gradient."""
    if input_act is None:
        return "identity", 0.0
    act, slope = input_act
    if act not in EPILOGUE_ACTIVATIONS:
        raise ValueError(f"input_act = {input_act!r}: the activation must be one of {', '.join(EPILOGUE_ACTIVATIONS)}")
    if rows is not None or windows is not None:
        raise ValueError(f"input_act = {input_act!r} with rows or windows is not allowed: input_act applies to an input "
                         "gradient, and a conv reading the data set by row index has none")
    return act, float(slope)


def _need_rows(rows: Tensor | None) -> Tensor:
    if rows is None:
        raise ValueError("windows = a window table needs rows (the table is of a data set read by index); got rows = None")
    return rows


def _checked(x: Tensor, w: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, int]:
    """The arguments checked (shapes named in the errors), rows flat int32, and the per-model batch."""
    if w.dim() != 5:
        raise ValueError(f"w must be [N, O, C, kh, kw]; got shape {tuple(w.shape)}")
    n = w.shape[0]
    if rows is not None:
        rows = rows.reshape(-1).to(torch.int32).contiguous()
        if rows.numel() % n:
            raise ValueError(f"rows has {rows.numel()} entries, not a multiple of the population size {n}")
        batch = rows.numel() // n
    else:
        if x.shape[0] % n:
            raise ValueError(f"x has {x.shape[0]} rows, not a multiple of the population size {n}")
        batch = x.shape[0] // n
    if x.shape[1] != w.shape[2]:
        raise ValueError(f"x has {x.shape[1]} channels but w expects {w.shape[2]}")
    return x, w, rows, batch
