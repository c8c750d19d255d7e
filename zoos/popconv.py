"""Per-model 2-D convolutions for a population as Triton implicit-GEMM kernels (forward and backward).

A population of N small CNNs, each with its own weights and its own batch, is a grouped convolution
with 1-8 channels per group: cuDNN runs it far below the card's limit, and im2col + bmm (the portable
path in `zoos.fastpop`) spends as much time writing and reading the patch matrix as multiplying.
Here each program owns one model and a tile of its output pixels and builds the patch tile in
registers straight from the input (no patch matrix in memory):

  forward     y[m, p, o]  = sum_k  patch(x)[m, p, k] * w[m, o, k] + b[m, o]     tiles [pixels, K] @ [K, O]
  input grad  dx          = the forward on dy, zero-padded by k-1-pad, with w flipped and in/out swapped
  weight grad dw[m, o, k] = sum_p  patch(x)[m, p, k] * dy[m, p, o]             tiles [K, pixels] @ [pixels, O]
              db[m, o]    = sum_p  dy[m, p, o]                                 (same pass)

with p running over (sample, output row, output column) and k over (in-channel, kernel row, kernel
column). Any channel counts, kernel size and zero padding at stride 1 (what `supports` checks).
The forward of few-channel layers (O <= 16 from C < 16) runs on CUDA cores in float32, one tap at a
time; other forwards and every weight gradient run as tensor-core tiles with float32 accumulation, their
inputs in bf16 where the activations are bf16 (as autocast would) and TF32 otherwise (the choices and
the tile sizes were measured: benchmarks/popconv_bench.py, benchmarks/zoo_bench.py). Activations are
read and written in their own dtype (bf16 in the trainer), weights are read as float32 master copies,
and weight gradients come back in float32. Layouts matter more than arithmetic at these sizes: in the
few-channel kernels a thread's pixels lie along the fast axis of every tile, so inputs are loaded by the
threads that use them and dy loads coalesce. Wide layers (16 or more inputs) are channels-last instead:
k runs over (kernel row, kernel column, in-channel), so a tap's channels are one contiguous run per pixel
and every [pixels, channels] tile loads whole rows. A tensor-core forward writes its output channels-last
(logical NCHW, `torch.channels_last` memory), which the next wide layer, PyTorch's pointwise ops and
`max_pool2x2` keep; `TUNING["channels_last"] = False` keeps every tensor NCHW.

The first layer can read its input by row index: `rows[m*B + b]` names the sample of the data set
`x [S, C, H, W]` that model m sees at batch position b, so a training step indexes the resident data
set on the device instead of materialising an [N, B, C, H, W] copy, and an evaluation on a shared
batch (rows = the same B indices for every model) never expands the input N times.

`conv2d_pool_act(x, w, b, padding, pool=2, act="tanh")` is the CUDA-core forward with a 2x2 max-pool
and a monotone activation folded in (what `zoos.fastpop` emits for conv -> pool -> act chains): a
thread computes all four window positions of its pooled pixels, each input value and weight loaded
once for the positions that share it, and writes only the pooled, activated output and a byte per
output saying which position won. Its backward rebuilds the conv's output gradient from those
(act'(a) * da at the winning position): inside the weight-gradient kernel's dy tile when the input
needs no gradient (the first layer), else once in memory for the input-gradient conv to share.

A first layer that reads the data set by index can instead read its window table (`window_table`, built
once per resident data set): row (s, q) is the whole (k + pool - 1)^2 input window of pooled output q,
so the forward is one [positions, window] @ [window, outputs] tensor-core product per window position (the
weights placed at that position; max, code, bias and activation after) and the weight gradient one
[(window position, output), pooled outputs] @ [pooled outputs, window] product (each output's gradient
placed at the position the pool chose), with contiguous rows instead of per-pixel gathers. A pooled
layer's input gradient is likewise a sum of tensor-core products, a row per POOL x POOL block of input
pixels: each pooled output whose window covers the block, its gradient placed at the position the pool
chose, times the weights shifted to that block (`window_dx`).

`conv2d(x, w, b, padding, rows)` is a `torch.library` custom op with its backward registered, so
`torch.compile` fuses everything around it and autograd differentiates through it. Without a GPU the
kernels run in Triton's interpreter (`TRITON_INTERPRET=1`), which the tests use to check them.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (a CPU-only torch): `available()` says so and the callers keep im2col
    triton = None


def available(device: torch.device | str) -> bool:
    """Whether the kernels can run on `device`: Triton on a CUDA device, or its interpreter on the CPU."""
    if triton is None:
        return False
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def supports(stride: tuple[int, int], dilation: tuple[int, int] = (1, 1), groups: int = 1) -> bool:
    """Whether a Conv2d with these settings runs here (stride 1, no dilation, no groups; any padding)."""
    return tuple(stride) == (1, 1) and tuple(dilation) == (1, 1) and groups == 1


def _blocks(k: int, o: int) -> tuple[int, int, int]:
    """Tile sizes (pixels, reduction, output channels): tensor-core dots need a reduction >= 16; fewer than 16
    outputs are padded to 16 (8, which tl.dot allows, made the weight gradient 1.03-1.4x slower)."""
    block_n = min(128, max(16, triton.next_power_of_2(o)))  # more outputs: several output tiles
    block_k = 16 if k <= 16 else 32 if k <= 32 else 64
    block_m = 128 if block_n <= 32 else 64
    return block_m, block_k, block_n


if triton is not None:

    @triton.jit
    def _pixels(p, end, m, B, HO, WO):
        """Model m's output pixels p (flat over sample, row, column) below `end`: (mask, r, i, j, sample)."""
        r = p % (HO * WO)
        return p < end, r, r // WO, r % WO, m * B + p // (HO * WO)

    @triton.jit
    def _store_output(acc, b_ptr, y_ptr, m, O, HO, WO, o, r, sample, pmask, HAS_BIAS: tl.constexpr,
                      CL: tl.constexpr = False):
        """Add model m's bias to the [pixels, outputs] tile and store it into y [N*B, O, HO, WO] (CL: its
        memory channels-last, [N*B, HO, WO, O])."""
        if HAS_BIAS:
            acc += tl.load(b_ptr + m * O + o, mask=o < O, other=0.0).to(tl.float32)[None, :]
        if CL:
            out = y_ptr + (sample.to(tl.int64) * (HO * WO) + r)[:, None] * O + o[None, :]
        else:
            out = y_ptr + sample.to(tl.int64)[:, None] * (O * HO * WO) + (o * (HO * WO))[None, :] + r[:, None]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=pmask[:, None] & (o < O)[None, :])

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
    def _conv_fwd_dot_kernel(x_ptr, rows_ptr, w_ptr, b_ptr, y_ptr,
                         B, C, H, W, O, HO, WO, PH, PW,
                         K: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                         GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr, CL: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
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
        _store_output(acc, b_ptr, y_ptr, m, O, HO, WO, o, r, sample, pmask, HAS_BIAS, CL)

    @triton.jit
    def _conv_fwd_fma_kernel(x_ptr, rows_ptr, wt_ptr, b_ptr, y_ptr, B, O,
                             C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, HO: tl.constexpr, WO: tl.constexpr,
                             PH: tl.constexpr, PW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                             GATHER: tl.constexpr, HAS_BIAS: tl.constexpr,
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
        _store_output(tl.trans(acc), b_ptr, y_ptr, m, O, HO, WO, o, r, sample, pmask, HAS_BIAS)

    @triton.jit
    def _activate(z, ACT: tl.constexpr, SLOPE: tl.constexpr):
        """A monotone pointwise activation in float32 (it commutes with the max of a pool)."""
        if ACT == "tanh":
            e = tl.exp(-2.0 * tl.abs(z))
            t = (1.0 - e) / (1.0 + e)
            return tl.where(z < 0, -t, t)
        if ACT == "sigmoid":
            return 1.0 / (1.0 + tl.exp(-z))
        if ACT == "relu":
            return tl.maximum(z, 0.0)
        if ACT == "leaky_relu":
            return tl.where(z > 0, z, z * SLOPE)
        return z

    @triton.jit
    def _keep_max(best, code, acc, d):
        """The running max of a window and where it was: the first of equal values, NaN wins (max_pool2d)."""
        take = (acc > best) | (acc != acc)
        return tl.where(take, acc, best), tl.where(take, d, code)

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
    def _act_grad_from_output(a, ACT: tl.constexpr, SLOPE: tl.constexpr):
        """The derivative of `_activate` at the point where it output a (float32)."""
        if ACT == "tanh":
            return 1.0 - a * a
        if ACT == "sigmoid":
            return a * (1.0 - a)
        if ACT == "relu":
            return tl.where(a > 0, 1.0, 0.0)
        if ACT == "leaky_relu":
            return tl.where(a > 0, 1.0, SLOPE)
        return tl.full(a.shape, 1.0, tl.float32)

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
            a = _patch_tile(x_ptr, row, pmask, r // WO, r % WO, k, C, H, W, PH, PW, K, KH, KW)
            g = _output_grad_tile(dy_ptr, a_ptr, code_ptr, sample, r, o, pmask, O, WO, POOL, HP, WP, ACT, SLOPE, DY_CL)
            acc += tl.dot(tl.trans(a.to(DOT)), g.to(DOT))
            if HAS_BIAS:
                acc_b += g.to(tl.float32)
        part = (m.to(tl.int64) * SPLIT + split) * (O * K)
        tl.store(dw_ptr + part + o[None, :] * K + k[:, None], acc, mask=(k < K)[:, None] & (o < O)[None, :])
        if HAS_BIAS:
            tl.store(db_ptr + (m.to(tl.int64) * SPLIT + split) * O + o, tl.sum(acc_b, axis=0), mask=(o < O) & (kb == 0))


    # ---- wide layers channels-last: every tap a [pixels, channels] tile of contiguous rows ----------------

    @triton.jit
    def _cl_patch(x_ptr, row, i, j, pmask, t, c, C: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
                  PH: tl.constexpr, PW: tl.constexpr, KW: tl.constexpr):
        """Tap t's input channels c at output pixels (i, j) of x [rows, H, W, C] as a [pixels, channels] tile."""
        ii, jj = i + t // KW - PH, j + t % KW - PW
        ok = pmask
        if (PH > 0) | (PW > 0):  # zero padding: taps outside the image read 0
            ok = ok & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
        at = row * (H * W * C) + (ii * W + jj) * C
        return tl.load(x_ptr + at[:, None] + c[None, :], mask=ok[:, None] & (c < C)[None, :], other=0.0)

    @triton.jit
    def _conv_fwd_cl_kernel(x_ptr, rows_ptr, w_ptr, b_ptr, y_ptr, B, O,
                            C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, HO: tl.constexpr, WO: tl.constexpr,
                            PH: tl.constexpr, PW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                            GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
        """The forward of a wide layer, x [rows, H, W, C] and y [N*B, HO, WO, O] channels-last, w as
        [N, KH, KW, C, O]: one loop over (tap, channel block), each a [pixels, channels] @ [channels, outputs]
        product whose loads are contiguous channel runs (the NCHW gather loads an element a lane)."""
        tile, ob, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        pmask, r, i, j, sample = _pixels(tile * BLOCK_M + tl.arange(0, BLOCK_M), B * HO * WO, m, B, HO, WO)
        row = _source_row(rows_ptr, sample, pmask, GATHER)
        o = ob * BLOCK_N + tl.arange(0, BLOCK_N)
        w_base = w_ptr + m.to(tl.int64) * (KH * KW * C * O)
        CB: tl.constexpr = (C + BLOCK_C - 1) // BLOCK_C
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(KH * KW * CB):
            t, c = step // CB, (step % CB) * BLOCK_C + tl.arange(0, BLOCK_C)
            a = _cl_patch(x_ptr, row, i, j, pmask, t, c, C, H, W, PH, PW, KW)
            wk = tl.load(w_base + (t * C + c)[:, None] * O + o[None, :], mask=(c < C)[:, None] & (o < O)[None, :], other=0.0)
            acc += tl.dot(a.to(DOT), wk.to(DOT))
        if HAS_BIAS:
            acc += tl.load(b_ptr + m * O + o, mask=o < O, other=0.0).to(tl.float32)[None, :]
        out = y_ptr + (sample.to(tl.int64) * (HO * WO) + r)[:, None] * O + o[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=pmask[:, None] & (o < O)[None, :])

    @triton.jit
    def _conv_wgrad_cl_kernel(x_ptr, rows_ptr, dy_ptr, dw_ptr, db_ptr, B, SPLIT, PER_SPLIT,
                              C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, O: tl.constexpr,
                              HO: tl.constexpr, WO: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                              KH: tl.constexpr, KW: tl.constexpr, GATHER: tl.constexpr, HAS_BIAS: tl.constexpr,
                              DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
        """dw (and db) of a wide layer, channels-last: program (tap, channel block and output block; split;
        model) sums [channels, pixels] @ [pixels, outputs] over its pixel tiles [split * PER_SPLIT, ...) of
        model m, pixels flat over (sample, row, column), so the dy [N*B, HO, WO, O] rows of a tile are one run.
        dw is [N, SPLIT, KH, KW, C, O], db [N, SPLIT, O]."""
        kb, split, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        CB: tl.constexpr = (C + BLOCK_C - 1) // BLOCK_C
        OB: tl.constexpr = (O + BLOCK_N - 1) // BLOCK_N
        t, cb, ob = kb // (CB * OB), (kb // OB) % CB, kb % OB
        c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        o = ob * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # summed over pixels once, after the loop
        start = split * PER_SPLIT
        for tile in range(start, tl.minimum(start + PER_SPLIT, tl.cdiv(B * HO * WO, BLOCK_M))):
            pmask, r, i, j, sample = _pixels(tile * BLOCK_M + tl.arange(0, BLOCK_M), B * HO * WO, m, B, HO, WO)
            row = _source_row(rows_ptr, sample, pmask, GATHER)
            a = _cl_patch(x_ptr, row, i, j, pmask, t, c, C, H, W, PH, PW, KW)
            g_at = dy_ptr + (sample.to(tl.int64) * (HO * WO) + r)[:, None] * O + o[None, :]
            g = tl.load(g_at, mask=pmask[:, None] & (o < O)[None, :], other=0.0)
            acc += tl.dot(tl.trans(a.to(DOT)), g.to(DOT))
            if HAS_BIAS:
                acc_b += g.to(tl.float32)
        part = m.to(tl.int64) * SPLIT + split
        at = dw_ptr + part * (KH * KW * C * O) + (t * C + c)[:, None] * O + o[None, :]
        tl.store(at, acc, mask=(c < C)[:, None] & (o < O)[None, :])
        if HAS_BIAS:
            tl.store(db_ptr + part * O + o, tl.sum(acc_b, axis=0), mask=(o < O) & (t == 0) & (cb == 0))

    # ---- a 2x2 max-pool in either memory format: elements in memory order, so loads and stores coalesce ---

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
    def _max_unpool_kernel(dy_ptr, code_ptr, dx_ptr, total, C: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
                           HP: tl.constexpr, WP: tl.constexpr, CL: tl.constexpr, BLOCK: tl.constexpr):
        """dx of the max-pool: dy where the window position won, 0 elsewhere and in rows or columns the floor
        dropped. Input elements in memory order (dx has x's layout, dy and code the output's)."""
        e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = e < total
        r, c, i, j = _pool_coords(e, C, H, W, CL)
        pi, pj = i // 2, j // 2
        ok = mask & (pi < HP) & (pj < WP)
        src = (r * (HP * WP) + pi * WP + pj) * C + c if CL else ((r * C + c) * HP + pi) * WP + pj
        g = tl.load(dy_ptr + src, mask=ok, other=0.0)
        won = tl.load(code_ptr + src, mask=ok, other=-1).to(tl.int32) == (i % 2) * 2 + j % 2
        tl.store(dx_ptr + e, tl.where(won, g, 0.0).to(dx_ptr.dtype.element_ty), mask=mask)

    # ---- the first layer through a window table: whole-window rows, tensor-core products ------------------

    @triton.jit
    def _mma(a, b, DOT: tl.constexpr):
        """a @ b on tensor cores with float32 accumulation: bf16 operands, or float32 ones as 3xTF32 (float32
        accuracy, so a max-pool after a float32 layer picks the window positions a float32 conv would)."""
        if DOT == tl.float32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
        return tl.dot(a.to(DOT), b.to(DOT))

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
        position at once (a product per position, each [window, rows] @ [rows, outputs] padded to 16
        outputs, was 1.30x slower); `_launch_window_wgrad` folds the positions back onto the kernel."""
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


    # ---- the input gradient of a pooled layer: a POOL x POOL block of input pixels per row ------------------

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
        ws built by `_shifted_weights` (gathering them here through a tap map made this kernel 2.5x slower).
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


# Kernel choices and tile sizes (0 = the measured default for the layer's shape): the forward on CUDA
# cores for the few-channel layers of population zoos and on tensor cores where O is large; the weight
# gradient always on tensor cores (a CUDA-core version with a [pixels, taps, outputs] accumulator was
# 1.6-3.4x slower on every CNN-s layer); "dot": bf16 or tf32 tensor-core inputs for bf16 activations;
# "fuse": whether FastPopulation folds a following max-pool and activation into the CUDA-core forward;
# "windows": when a first layer reads a window table (`windows_pay`), "window_max_fraction" of the card
# a table may take; "window_dx": a pooled layer's input gradient as products per block of input pixels
# (else the padded conv of its unpooled gradient), "window_dx_block_n" block values (channels x pool^2) a
# tile and "window_dx_stages" its pipeline stages (each stage holds a tile's 9 loads for CNN-s: 3 stages of
# 128 rows asked 377 KB of shared memory); "window_block_m", "window_warps", "window_stages": rows a tile,
# warps and pipeline stages (0: Triton's default) of every window kernel (default 128 rows and 2 stages, the
# fastest set measured; figures in benchmarks/README.md, train_bench section);
# "wgrad_block_k": taps a weight-gradient tile (0: `_blocks`' choice). `benchmarks/step_kernels_bench.py`
# times the step's kernels under TUNING sets side by side, `benchmarks/popconv_bench.py` sweeps the conv
# tiles, `benchmarks/train_bench.py --step-kinds` times the step with each choice off, `--tuning` with
# other TUNING values.
TUNING = {"forward": os.environ.get("SYMZOO_POPCONV_FORWARD", "auto"), "fma_block_m": 0, "fused_block_m": 0, "fma_warps": 4,
          "wgrad_block_m": 0, "wgrad_block_k": 0, "wgrad_per_sm": 16, "wgrad_stages": 0, "dot": "bf16",
          "fuse": os.environ.get("SYMZOO_POPCONV_FUSE", "1") != "0",
          "windows": os.environ.get("SYMZOO_POPCONV_WINDOWS", "pool"), "window_max_fraction": 0.125,
          "window_dx": os.environ.get("SYMZOO_POPCONV_WINDOW_DX", "1") != "0", "window_dx_block_n": 64,
          "window_dx_stages": 1, "window_block_m": 128, "window_warps": 4, "window_stages": 2,
          "channels_last": True}


def parse_tuning(text: str) -> list[dict]:
    """TUNING sets from `text`: ';'-separated sets of ','-separated key=value pairs, each value cast to its
    entry's type (a flag: 0/1/false/true); an empty set is the defaults (";window_block_m=64": the defaults,
    then 64 rows). Raises ValueError naming the pair, for a key that is no entry or a value not of its type."""
    sets = []
    for part in text.split(";"):
        one = {}
        for pair in filter(None, (p.strip() for p in part.split(","))):
            key, _, value = pair.partition("=")
            if key not in TUNING:
                raise ValueError(f"tuning {pair!r}: {key!r} is not a popconv.TUNING entry; allowed: {', '.join(sorted(TUNING))}")
            kind = type(TUNING[key])
            flags = {"0": False, "false": False, "1": True, "true": True}
            try:
                one[key] = flags[value.lower()] if kind is bool else kind(value)
            except (KeyError, ValueError):
                raise ValueError(f"tuning {pair!r}: {key} takes {kind.__name__} values (now {TUNING[key]!r})") from None
        sets.append(one)
    return sets


@contextlib.contextmanager
def tuned(changes: dict):
    """TUNING with `changes` inside the block, as it was after (an exception included)."""
    saved = dict(TUNING)
    TUNING.update(changes)
    try:
        yield
    finally:
        TUNING.clear()
        TUNING.update(saved)


def _dot_dtype(x: Tensor):
    """The tensor-core input type: TF32 (float32 operands), or bf16 where the activations already are bf16."""
    return tl.bfloat16 if TUNING["dot"] == "bf16" and x.dtype == torch.bfloat16 else tl.float32


def _fma_forward(c: int, o: int) -> bool:
    """Whether the forward runs on CUDA cores (auto: up to 16 outputs from fewer than 16 inputs; a wider
    input fills tensor-core tiles a tap at a time)."""
    return o <= 16 and c < 16 if TUNING["forward"] == "auto" else TUNING["forward"] == "fma"


def _writes_channels_last(c: int, o: int) -> bool:
    """Whether the forward of a layer of c inputs and o outputs writes channels-last (the tensor-core forward)."""
    return TUNING["channels_last"] and not _fma_forward(c, o)


def _reads_channels_last(x: Tensor, rows: Tensor | None, o: int) -> bool:
    """Whether a tensor-core kernel reads x channels-last: 16 or more channels (a tap's channels fill a
    tile's reduction), and, when x is a data set read by index, only if it is stored so (never copied)."""
    c = x.shape[1]
    return (_writes_channels_last(c, o) and c >= 16
            and (rows is None or x.is_contiguous(memory_format=torch.channels_last)))


def _output(shape: tuple[int, ...], c: int, like: Tensor, dtype: torch.dtype) -> Tensor:
    """The forward's output [N*B, O, HO, WO] from c inputs, channels-last where `_writes_channels_last` says."""
    cl = _writes_channels_last(c, shape[1])
    return torch.empty(shape, device=like.device, dtype=dtype,
                       memory_format=torch.channels_last if cl else torch.contiguous_format)


def _cl_blocks(c: int, o: int) -> tuple[int, int, int]:
    """Tile sizes (pixels, channels, outputs) of the channels-last kernels: a tap's channels per step (at
    least 16, tl.dot's least reduction), the outputs up to 128 a program."""
    block_c = 16 if c <= 16 else 32 if c <= 32 else 64
    block_n = min(128, max(16, triton.next_power_of_2(o)))
    return (128 if block_n <= 64 else 64), block_c, block_n


def _launch_forward(x: Tensor, rows: Tensor | None, w: Tensor, b: Tensor | None, batch: int,
                    padding: tuple[int, int], out_dtype: torch.dtype) -> Tensor:
    n, o, c, kh, kw = w.shape
    h, wd = x.shape[2], x.shape[3]
    ho, wo = h + 2 * padding[0] - kh + 1, wd + 2 * padding[1] - kw + 1
    y = _output((n * batch, o, ho, wo), c, x, out_dtype)
    rows_arg = rows if rows is not None else x  # any pointer when GATHER is off
    if _reads_channels_last(x, rows, o):
        x = x.contiguous(memory_format=torch.channels_last)
        block_m, block_c, block_n = _cl_blocks(c, o)
        wt = w.permute(0, 3, 4, 2, 1).contiguous()  # [N, kh, kw, C, O]: a tap's channels are rows of outputs
        _conv_fwd_cl_kernel[(triton.cdiv(batch * ho * wo, block_m), triton.cdiv(o, block_n), n)](
            x, rows_arg, wt, b if b is not None else wt, y, batch, o, C=c, H=h, W=wd, HO=ho, WO=wo,
            PH=padding[0], PW=padding[1], KH=kh, KW=kw, GATHER=rows is not None, HAS_BIAS=b is not None,
            DOT=_dot_dtype(y), BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_N=block_n, num_warps=4,
        )
        return y
    x = x.contiguous()
    if _fma_forward(c, o):
        block_n = triton.next_power_of_2(o)
        block_m = TUNING["fma_block_m"] or min(1024, 8192 // block_n)  # 8 outputs x 8 pixels a thread (4 warps)
        wt = _fma_weights(w, block_n)
        _conv_fwd_fma_kernel[(triton.cdiv(batch * ho * wo, block_m), n)](
            x, rows_arg, wt, b if b is not None else wt, y, batch, o, C=c, H=h, W=wd, HO=ho, WO=wo,
            PH=padding[0], PW=padding[1], KH=kh, KW=kw, GATHER=rows is not None, HAS_BIAS=b is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=TUNING["fma_warps"],
        )
        return y
    block_m, block_k, block_n = _blocks(c * kh * kw, o)
    _conv_fwd_dot_kernel[(triton.cdiv(batch * ho * wo, block_m), triton.cdiv(o, block_n), n)](
        x, rows_arg, w, b if b is not None else w, y, batch, c, h, wd, o, ho, wo, padding[0], padding[1],
        K=c * kh * kw, KH=kh, KW=kw, GATHER=rows is not None, HAS_BIAS=b is not None, DOT=_dot_dtype(y),
        CL=_writes_channels_last(c, o), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4,
    )
    return y


def _fma_weights(w: Tensor, block_n: int) -> Tensor:
    """w [N, O, C, kh, kw] as [N, C*kh*kw, block_n] float32: tap-major, outputs zero-padded (one vector a tap)."""
    n, o = w.shape[:2]
    wt = torch.zeros(n, w[0, 0].numel(), block_n, device=w.device, dtype=torch.float32)
    wt[:, :, :o] = w.reshape(n, o, -1).transpose(1, 2)
    return wt


def _launch_pool_act(x: Tensor, rows: Tensor | None, w: Tensor, b: Tensor | None, batch: int, padding: tuple[int, int],
                     pool: int, act: str, slope: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    n, o, c, kh, kw = w.shape
    h, wd = x.shape[2], x.shape[3]
    hp, wp = (h + 2 * padding[0] - kh + 1) // pool, (wd + 2 * padding[1] - kw + 1) // pool
    a = torch.empty(n * batch, o, hp, wp, device=x.device, dtype=out_dtype)
    code = torch.empty(n * batch, o, hp, wp, device=x.device, dtype=torch.int8) if pool > 1 else a.new_empty(0, dtype=torch.int8)
    block_n = triton.next_power_of_2(o)
    block_m = TUNING["fused_block_m"] or min(1024, 8192 // block_n) // (pool * pool)  # a tile per window position live
    wt = _fma_weights(w, block_n)
    _conv_pool_act_fma_kernel[(triton.cdiv(batch * hp * wp, block_m), n)](
        x, rows if rows is not None else x, wt, b if b is not None else wt, a, code if pool > 1 else a, batch, o,
        C=c, H=h, W=wd, HP=hp, WP=wp, POOL=pool, PH=padding[0], PW=padding[1], KH=kh, KW=kw, ACT=act, SLOPE=slope,
        GATHER=rows is not None, HAS_BIAS=b is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=TUNING["fma_warps"],
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
    # 128-tap x 32-pixel tiles stay off by default: they gave a wrong float32 dw on the GPU for a padded 3x3
    # layer (test_popconv's test_pooled_layer_gradients_either_way); TUNING wgrad_block_k / wgrad_block_m
    # select them for measuring.
    block_k = TUNING["wgrad_block_k"] or block_k
    # tiles of one sample's output pixels: at most the image (rounded up to 16, tl.dot's least side)
    block_m = min(TUNING["wgrad_block_m"] or (128 if k <= 32 else 64), max(16, triton.next_power_of_2(ho * wo)))
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
        **({"num_stages": TUNING["wgrad_stages"]} if TUNING["wgrad_stages"] else {}),
    )
    return dw.sum(1).view(w_shape), (db.sum(1) if db is not None else None)


def _launch_wgrad_cl(x: Tensor, rows: Tensor | None, dy: Tensor, w_shape: torch.Size, padding: tuple[int, int],
                     bias: bool, batch: int, ho: int, wo: int) -> tuple[Tensor, Tensor | None]:
    """dw, db of a wide layer from x and dy channels-last (`_conv_wgrad_cl_kernel`)."""
    n, o, c, kh, kw = w_shape
    x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    block_m, block_c, block_n = _cl_blocks(c, o)
    blocks = kh * kw * triton.cdiv(c, block_c) * triton.cdiv(o, block_n)
    split, per_split = _programs_per_model(triton.cdiv(batch * ho * wo, block_m), n * blocks, dy.device)
    dw = torch.empty(n, split, kh, kw, c, o, device=dy.device, dtype=torch.float32)
    db = torch.empty(n, split, o, device=dy.device, dtype=torch.float32) if bias else None
    _conv_wgrad_cl_kernel[(blocks, split, n)](
        x, rows if rows is not None else x, dy, dw, db if db is not None else dw, batch, split, per_split,
        C=c, H=x.shape[2], W=x.shape[3], O=o, HO=ho, WO=wo, PH=padding[0], PW=padding[1], KH=kh, KW=kw,
        GATHER=rows is not None, HAS_BIAS=bias, DOT=_dot_dtype(dy),
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_N=block_n, num_warps=4,
    )
    return dw.sum(1).permute(0, 4, 3, 1, 2).contiguous(), (db.sum(1) if db is not None else None)


# ---- the first layer's window table -----------------------------------------------------------------------

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
    least 8 (the forward's n, the weight gradient's rows a window position; tl.dot pads a smaller side, and
    16 for CNN-s's 8 outputs made the forward 1.25x slower)."""
    return max(16, triton.next_power_of_2(table.shape[2])), max(8, triton.next_power_of_2(o))


def _tile_rows(width: int) -> tuple[int, dict]:
    """(BLOCK_M, launch options) for a window kernel whose tiles are `width` wide: TUNING's rows, warps and
    stages (0: Triton's pipelining) up to 64, else 64 rows and one stage (a float32 [128, 128] tile at 3
    stages asked 458 KB of shared memory on an H200, twice its limit)."""
    options = {"num_warps": TUNING["window_warps"]}
    if width > 64:
        return 64, {**options, "num_stages": 1}
    if TUNING["window_stages"]:
        options["num_stages"] = TUNING["window_stages"]
    return TUNING["window_block_m"], options


def _programs_per_model(tiles: int, n: int, device: torch.device) -> tuple[int, int]:
    """(programs a model, tiles a program) for n models' worth of programs (models x other grid axes): enough
    programs to fill the card (TUNING wgrad_per_sm a multiprocessor) and at least 8 tiles a program, so what a
    program loads once serves several tiles."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    split = max(1, min(triton.cdiv(TUNING["wgrad_per_sm"] * sms, n), triton.cdiv(tiles, 8)))
    per = triton.cdiv(tiles, split)
    return triton.cdiv(tiles, per), per


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


def _launch_pooled_grads(da: Tensor, a: Tensor, code: Tensor, w: Tensor, x: Tensor, padding: tuple[int, int], pool: int,
                         act: str, slope: float, bias: bool, weights: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """dx, dw, db of act(maxpool(conv(x))) from its output gradient da: each pooled output's gradient placed at
    the window position the pool chose (`_placed_grad_kernel`), then dx a POOL x POOL block of input pixels at
    a time, the sum of its covering outputs' products with the shifted weights (`_block_dx_kernel`, tensor
    cores); with `weights`, dw and db by the weight-gradient kernel, which rebuilds the conv's dy in its tiles.
    (dw from the placed rows against whole input windows gathered from x measured the same as that kernel:
    1.42 ms a step for conv2 at 1,024 models, H200; not kept.)"""
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
    block_n = min(TUNING["window_dx_block_n"], max(16, triton.next_power_of_2(c * pool * pool)))
    block_m, options = _tile_rows(max(block_k, block_n))  # its NH x NW loads a tile: TUNING's own stages
    options["num_stages"] = TUNING["window_dx_stages"]
    groups, per = _programs_per_model(triton.cdiv(batch * bh * bw, block_m), n, da.device)
    dx = torch.empty(nb, c, h, wd, device=da.device, dtype=x.dtype)
    _block_dx_kernel[(groups, triton.cdiv(c * pool * pool, block_n), n)](
        g, ws, dx, batch, per, C=c, H=h, W=wd, PH=padding[0], PW=padding[1], HP=hp, WP=wp, BH=bh, BW=bw, NH=nh, NW=nw,
        POOL=pool, DOT=dot, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, **options,
    )
    if not weights:
        return dx, None, None
    return (dx, *_launch_wgrad(x, None, da, w.shape, padding, bias, fused=(a, code if pool > 1 else a, pool, act, slope)))


def _fold_placed(placed: Tensor, w_shape: torch.Size, pool: int) -> Tensor:
    """dw from window-placed weight gradients placed [N, splits, pool^2, T, O] (row (d, c, u, v): window entry
    (c, u, v) against the outputs' gradient at window position d): each kernel tap summed over the positions
    that place it (a gather of pool^2 rows a tap, in torch: O * K numbers a model)."""
    n, o, c, kh, kw = w_shape
    t = placed.shape[3]
    taps = _placed_taps(c, kh, kw, pool, t, placed.device)  # [pool^2 * K] rows of the flattened (position, window) axis
    dw = placed.sum(1).view(n, pool * pool * t, o).index_select(1, taps).view(n, pool * pool, c * kh * kw, o).sum(1)
    return dw.transpose(1, 2).contiguous().view(w_shape)


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


# ---- the custom ops: forward, and the two backward products --------------------------------------------

@torch.library.custom_op("symzoo::pop_conv2d", mutates_args=())
def _pop_conv2d(x: Tensor, w: Tensor, b: Tensor | None, rows: Tensor | None, batch: int,
                pad_h: int, pad_w: int, out_dtype: torch.dtype) -> Tensor:
    return _launch_forward(x, rows, w.contiguous(), b, batch, (pad_h, pad_w), out_dtype)


@_pop_conv2d.register_fake
def _(x, w, b, rows, batch, pad_h, pad_w, out_dtype):
    n, o, _, kh, kw = w.shape
    return _output((n * batch, o, x.shape[2] + 2 * pad_h - kh + 1, x.shape[3] + 2 * pad_w - kw + 1), x.shape[1], x, out_dtype)


@torch.library.custom_op("symzoo::pop_conv2d_wgrad", mutates_args=())
def _pop_conv2d_wgrad(x: Tensor, rows: Tensor | None, dy: Tensor, w: Tensor, pad_h: int, pad_w: int,
                      bias: bool) -> tuple[Tensor, Tensor]:
    dw, db = _launch_wgrad(x, rows, dy, w.shape, (pad_h, pad_w), bias)
    return dw, db if db is not None else dw.new_zeros(0)


def _wgrad_fake(w: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    return w.new_empty(w.shape, dtype=torch.float32), w.new_empty((w.shape[0], w.shape[1]) if bias else (0,),
                                                                  dtype=torch.float32)


@_pop_conv2d_wgrad.register_fake
def _(x, rows, dy, w, pad_h, pad_w, bias):
    return _wgrad_fake(w, bias)


@torch.library.custom_op("symzoo::pop_conv2d_pool_act_wgrad", mutates_args=())
def _pop_conv2d_pool_act_wgrad(x: Tensor, rows: Tensor | None, da: Tensor, a: Tensor, code: Tensor, w: Tensor,
                               pad_h: int, pad_w: int, bias: bool, pool: int, act: str, slope: float) -> tuple[Tensor, Tensor]:
    dw, db = _launch_wgrad(x, rows, da.contiguous(), w.shape, (pad_h, pad_w), bias,
                           fused=(a, code if pool > 1 else a, pool, act, slope))
    return dw, db if db is not None else dw.new_zeros(0)


@_pop_conv2d_pool_act_wgrad.register_fake
def _(x, rows, da, a, code, w, pad_h, pad_w, bias, pool, act, slope):
    return _wgrad_fake(w, bias)


def _setup(ctx, inputs, output) -> None:
    x, w, b, rows, batch, pad_h, pad_w, _ = inputs
    ctx.save_for_backward(x, w, rows)
    ctx.meta = (batch, pad_h, pad_w, b is not None, x.dtype)


def _backward(ctx, dy: Tensor):
    x, w, rows = ctx.saved_tensors
    batch, pad_h, pad_w, has_bias, x_dtype = ctx.meta
    return (*_conv_grads(ctx.needs_input_grad, dy, x, w, rows, batch, pad_h, pad_w, has_bias, x_dtype),
            None, None, None, None, None)


def _conv_grads(needs: tuple[bool, ...], dy: Tensor, x: Tensor, w: Tensor, rows: Tensor | None, batch: int,
                pad_h: int, pad_w: int, has_bias: bool, x_dtype: torch.dtype):
    """(dx, dw, db) of the convolution for its output gradient dy; None where `needs` says not needed."""
    dx = dw = db = None
    if needs[0]:
        if rows is not None:
            raise NotImplementedError("the input gradient of a row-indexed (data-reading) convolution")
        kh, kw = w.shape[3], w.shape[4]
        w_t = w.flip(3, 4).transpose(1, 2).contiguous()  # [N, C, O, kh, kw]: the input grad is a forward conv
        dx = _pop_conv2d(dy, w_t, None, None, batch, kh - 1 - pad_h, kw - 1 - pad_w, x_dtype)
    if needs[1] or (has_bias and needs[2]):
        dw, db = _pop_conv2d_wgrad(x, rows, dy, w, pad_h, pad_w, has_bias)
        dw, db = dw.to(w.dtype), (db if has_bias else None)
    return dx, dw, db


_pop_conv2d.register_autograd(_backward, setup_context=_setup)


# ---- the fused op: act(maxpool(conv)) with the pool's choice kept for the backward ----------------------

EPILOGUE_ACTIVATIONS = ("identity", "tanh", "sigmoid", "relu", "leaky_relu")  # monotone: they commute with the max


@torch.library.custom_op("symzoo::pop_conv2d_pool_act", mutates_args=())
def _pop_conv2d_pool_act(x: Tensor, w: Tensor, b: Tensor | None, rows: Tensor | None, batch: int, pad_h: int,
                         pad_w: int, pool: int, act: str, slope: float, out_dtype: torch.dtype,
                         window_dx: bool) -> tuple[Tensor, Tensor]:
    return _launch_pool_act(x.contiguous(), rows, w.contiguous(), b, batch, (pad_h, pad_w), pool, act, slope, out_dtype)


@_pop_conv2d_pool_act.register_fake
def _(x, w, b, rows, batch, pad_h, pad_w, pool, act, slope, out_dtype, window_dx):
    n, o, _, kh, kw = w.shape
    shape = (n * batch, o, (x.shape[2] + 2 * pad_h - kh + 1) // pool, (x.shape[3] + 2 * pad_w - kw + 1) // pool)
    return x.new_empty(shape, dtype=out_dtype), x.new_empty(shape if pool > 1 else (0,), dtype=torch.int8)


def _setup_pool_act(ctx, inputs, output) -> None:
    x, w, b, rows, batch, pad_h, pad_w, pool, act, slope, _, window_dx = inputs
    a, code = output
    ctx.save_for_backward(x, w, rows, a, code)
    ctx.meta = (batch, pad_h, pad_w, b is not None, x.dtype, pool, act, slope, window_dx)
    ctx.mark_non_differentiable(code)


def _act_grad(a: Tensor, act: str, slope: float) -> Tensor:
    """The activation's derivative from its output a (float32)."""
    a = a.float()
    if act == "tanh":
        return 1.0 - a * a
    if act == "sigmoid":
        return a * (1.0 - a)
    if act == "relu":
        return (a > 0).float()
    if act == "leaky_relu":
        return torch.where(a > 0, 1.0, slope)
    return torch.ones_like(a)


def _unpool(dz: Tensor, code: Tensor, pool: int, out_hw: tuple[int, int]) -> Tensor:
    """max_pool2d's backward: each pooled gradient to the window position `code` chose, zeros elsewhere."""
    nb, o, hp, wp = dz.shape
    hit = code.unsqueeze(-1) == torch.arange(pool * pool, device=code.device, dtype=code.dtype)  # [..., hp, wp, k*k]
    dy = (dz.unsqueeze(-1) * hit).view(nb, o, hp, wp, pool, pool).permute(0, 1, 2, 4, 3, 5).reshape(nb, o, hp * pool, wp * pool)
    if (hp * pool, wp * pool) != out_hw:  # rows/columns the pool's floor dropped get no gradient
        dy = torch.nn.functional.pad(dy, (0, out_hw[1] - wp * pool, 0, out_hw[0] - hp * pool))
    return dy


@torch.library.custom_op("symzoo::pop_pooled_grads", mutates_args=())
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
    batch, pad_h, pad_w, has_bias, x_dtype, pool, act, slope, window_dx = ctx.meta
    nothing = (None,) * 9
    window_dx = ctx.needs_input_grad[0] and pool > 1 and window_dx
    if window_dx and rows is None:  # dx per block of input pixels and dw, db in one op
        weights = ctx.needs_input_grad[1] or (has_bias and ctx.needs_input_grad[2])
        dx, dw, db = _pop_pooled_grads(da, a, code, w, x, pad_h, pad_w, pool, act, slope, has_bias, weights)
        dw = dw.to(w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, (db if has_bias and ctx.needs_input_grad[2] else None), *nothing
    if not ctx.needs_input_grad[0]:  # the weight-gradient kernel rebuilds the conv's dy itself
        if not (ctx.needs_input_grad[1] or (has_bias and ctx.needs_input_grad[2])):
            return None, None, None, *nothing
        dw, db = _pop_conv2d_pool_act_wgrad(x, rows, da, a, code, w, pad_h, pad_w, has_bias, pool, act, slope)
        return None, dw.to(w.dtype), (db if has_bias else None), *nothing
    dz = (da.float() * _act_grad(a, act, slope)).to(a.dtype)
    if pool > 1:
        out_hw = (x.shape[2] + 2 * pad_h - w.shape[3] + 1, x.shape[3] + 2 * pad_w - w.shape[4] + 1)
        dz = _unpool(dz, code, pool, out_hw)
    return (*_conv_grads(ctx.needs_input_grad, dz, x, w, rows, batch, pad_h, pad_w, has_bias, x_dtype), *nothing)


_pop_conv2d_pool_act.register_autograd(_backward_pool_act, setup_context=_setup_pool_act)


# ---- the first layer from a window table: act(maxpool(conv)) with the data set read by row index ---------

@torch.library.custom_op("symzoo::pop_window_conv", mutates_args=())
def _pop_window_conv(table: Tensor, w: Tensor, b: Tensor | None, rows: Tensor, batch: int, hp: int, wp: int,
                     pool: int, act: str, slope: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return _launch_window(table, rows, w.contiguous(), b, batch, hp, wp, pool, act, slope, out_dtype)


@_pop_window_conv.register_fake
def _(table, w, b, rows, batch, hp, wp, pool, act, slope, out_dtype):
    shape = (w.shape[0] * batch, w.shape[1], hp, wp)
    return table.new_empty(shape, dtype=out_dtype), table.new_empty(shape if pool > 1 else (0,), dtype=torch.int8)


@torch.library.custom_op("symzoo::pop_window_conv_wgrad", mutates_args=())
def _pop_window_conv_wgrad(table: Tensor, rows: Tensor, da: Tensor, a: Tensor, code: Tensor, w: Tensor, bias: bool,
                           pool: int, act: str, slope: float) -> tuple[Tensor, Tensor]:
    dw, db = _launch_window_wgrad(table, rows, da.contiguous(), a, code, w.shape, bias, pool, act, slope)
    return dw, db if db is not None else dw.new_zeros(0)


@_pop_window_conv_wgrad.register_fake
def _(table, rows, da, a, code, w, bias, pool, act, slope):
    return _wgrad_fake(w, bias)


def _setup_window(ctx, inputs, output) -> None:
    table, w, b, rows, _, _, _, pool, act, slope, _ = inputs
    a, code = output
    ctx.save_for_backward(table, w, rows, a, code)
    ctx.meta = (b is not None, pool, act, slope)
    ctx.mark_non_differentiable(code)


def _backward_window(ctx, da: Tensor, _dcode: Tensor | None):
    table, w, rows, a, code = ctx.saved_tensors
    has_bias, pool, act, slope = ctx.meta
    nothing = (None,) * 8
    if not (ctx.needs_input_grad[1] or (has_bias and ctx.needs_input_grad[2])):
        return None, None, None, *nothing
    dw, db = _pop_window_conv_wgrad(table, rows, da, a, code if pool > 1 else a, w, has_bias, pool, act, slope)
    return None, dw.to(w.dtype), (db if has_bias else None), *nothing


_pop_window_conv.register_autograd(_backward_window, setup_context=_setup_window)


def windows_pay(pool: int, table_bytes: int, device: torch.device | str) -> bool:
    """Whether a first layer should read a window table (`window_table`) rather than gather from the data set.

    TUNING["windows"]: "pool" (the default) for layers followed by a 2x2 max-pool, where one table row feeds
    all four window positions (measured on CNN-s: benchmarks/README.md); "always"; "never". Either way the
    table must fit in TUNING["window_max_fraction"] of the device's memory (any size in the interpreter)."""
    mode = TUNING["windows"]
    if mode not in ("pool", "always", "never"):
        raise ValueError(f"SYMZOO_POPCONV_WINDOWS = {mode!r} is not allowed; expected pool, always or never")
    if mode == "never" or (mode == "pool" and pool == 1):
        return False
    device = torch.device(device)
    if device.type != "cuda":
        return True
    return table_bytes <= TUNING["window_max_fraction"] * torch.cuda.get_device_properties(device).total_memory


def _window_conv(table: Tensor, x: Tensor, w: Tensor, b: Tensor | None, padding: tuple[int, int], rows: Tensor,
                 batch: int, pool: int, act: str, slope: float, out_dtype: torch.dtype) -> Tensor:
    """The first layer read from `table` (built by `window_table` from x with this layer's geometry), checked."""
    kh, kw = w.shape[3], w.shape[4]
    hp, wp, row = _window_shape(x.shape, (kh, kw), padding, pool)
    want = (x.shape[0], hp * wp, row)
    if tuple(table.shape) != want:
        raise ValueError(f"window table of shape {tuple(table.shape)} does not match this layer: expected {want} "
                         f"(window_table(x, kernel=({kh}, {kw}), padding={tuple(padding)}, pool={pool}))")
    a, _ = _pop_window_conv(table, w, b, rows, batch, hp, wp, pool, act, float(slope), out_dtype)
    return a


# ---- the 2x2 max-pool: its output and the winning position, the backward a scatter by that position -----

_POOL_BLOCK = 1024


def stored_channels_last(x: Tensor) -> bool:
    """Whether x [R, C, H, W] is channels-last in memory and not also NCHW (C = 1 or H = W = 1 are both):
    the kernels that take either layout read it so, else they make it contiguous NCHW."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _pool_outputs(x: Tensor) -> tuple[Tensor, Tensor]:
    r, c, h, w = x.shape
    fmt = torch.channels_last if stored_channels_last(x) else torch.contiguous_format
    y = torch.empty((r, c, h // 2, w // 2), device=x.device, dtype=x.dtype, memory_format=fmt)
    return y, torch.empty(y.shape, device=x.device, dtype=torch.int8, memory_format=fmt)


@torch.library.custom_op("symzoo::pop_max_pool2x2", mutates_args=())
def _pop_max_pool2x2(x: Tensor) -> tuple[Tensor, Tensor]:
    cl = stored_channels_last(x)
    x = x if cl else x.contiguous()
    y, code = _pool_outputs(x)
    r, c, h, w = x.shape
    if y.numel():
        _max_pool_kernel[(triton.cdiv(y.numel(), _POOL_BLOCK),)](
            x, y, code, y.numel(), C=c, H=h, W=w, HP=h // 2, WP=w // 2, CL=cl, BLOCK=_POOL_BLOCK)
    return y, code


@_pop_max_pool2x2.register_fake
def _(x):
    return _pool_outputs(x)


@torch.library.custom_op("symzoo::pop_max_unpool2x2", mutates_args=())
def _pop_max_unpool2x2(dy: Tensor, code: Tensor, x_shape: list[int], channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dx = torch.empty(x_shape, device=dy.device, dtype=dy.dtype, memory_format=fmt)
    dy = dy.contiguous(memory_format=fmt)
    r, c, h, w = x_shape
    if dx.numel():
        _max_unpool_kernel[(triton.cdiv(dx.numel(), _POOL_BLOCK),)](
            dy, code, dx, dx.numel(), C=c, H=h, W=w, HP=h // 2, WP=w // 2, CL=channels_last, BLOCK=_POOL_BLOCK)
    return dx


@_pop_max_unpool2x2.register_fake
def _(dy, code, x_shape, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(x_shape, device=dy.device, dtype=dy.dtype, memory_format=fmt)


def _setup_pool(ctx, inputs, output) -> None:
    x, = inputs
    ctx.save_for_backward(output[1])
    ctx.meta = (list(x.shape), stored_channels_last(x))


def _backward_pool(ctx, dy: Tensor, _dcode: Tensor | None):
    code, = ctx.saved_tensors
    return _pop_max_unpool2x2(dy, code, *ctx.meta)


_pop_max_pool2x2.register_autograd(_backward_pool, setup_context=_setup_pool)


def max_pool2x2(x: Tensor) -> Tensor:
    """F.max_pool2d(x, 2) for x [R, C, H, W] in either memory format (the output in x's): one pass that
    keeps a byte per output for the backward, which writes every input gradient once (PyTorch's channels-last
    pooling runs several times slower on the population's [N*B, C, H, W] maps)."""
    if x.dim() != 4:
        raise ValueError(f"max_pool2x2 takes x [R, C, H, W]; got shape {tuple(x.shape)}")
    return _pop_max_pool2x2(x)[0]


def fuses(out_channels: int) -> bool:
    """Whether `conv2d_pool_act` runs as one kernel for a conv with this many outputs: the CUDA-core forward
    with the pool and activation folded in, for up to 16 outputs (from any number of inputs)."""
    return TUNING["fuse"] and (out_channels <= 16 if TUNING["forward"] == "auto" else TUNING["forward"] == "fma")


def conv2d(x: Tensor, w: Tensor, b: Tensor | None, padding: tuple[int, int] = (0, 0), *,
           rows: Tensor | None = None, out_dtype: torch.dtype | None = None, windows: Tensor | None = None) -> Tensor:
    """Model n's Conv2d (stride 1) on its own samples: w [N, O, C, kh, kw], b [N, O] -> y [N*B, O, Ho, Wo].

    x is [N*B, C, H, W] (model n's batch in rows n*B..(n+1)*B-1), or, with `rows` [N, B] (or [N*B])
    of indices, the data set [S, C, H, W] that those indices read. The output has x's dtype unless
    `out_dtype` is given; gradients flow to x (when not row-indexed), w and b. With `rows`, `windows` may
    be x's `window_table(x, (kh, kw), padding, pool=1)`: the same result from tensor-core products.
    """
    x, w, rows, batch = _checked(x, w, rows)
    if windows is not None:
        return _window_conv(windows, x, w, b, padding, _need_rows(rows), batch, 1, "identity", 0.0, out_dtype or x.dtype)
    return _pop_conv2d(x, w, b, rows, batch, int(padding[0]), int(padding[1]), out_dtype or x.dtype)


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


def conv2d_pool_act(x: Tensor, w: Tensor, b: Tensor | None, padding: tuple[int, int] = (0, 0), *,
                    pool: int = 2, act: str = "identity", slope: float = 0.0, rows: Tensor | None = None,
                    out_dtype: torch.dtype | None = None, windows: Tensor | None = None,
                    window_dx: bool | None = None) -> Tensor:
    """act(max_pool2d(conv2d(x, w, b), pool)) per model in one kernel (pool 1: no pool), as `conv2d`'s arguments.

    `act` is one of EPILOGUE_ACTIVATIONS (`slope`: leaky_relu's negative slope); the max is taken before the
    activation, which for these monotone functions is the same as after it. Only the pooled output
    and a byte per output (which window position was the max) are written; gradients flow as through
    the unfused layers. With `rows`, `windows` may be x's `window_table(x, (kh, kw), padding, pool)`: the
    first layer as tensor-core products over whole-window rows, the same result. `window_dx` (default
    TUNING["window_dx"]) picks how a pooled layer's input gradient is computed (both exact; the choice is an
    argument so a compiled program records it).
    """
    if pool not in (1, 2) or act not in EPILOGUE_ACTIVATIONS:
        raise ValueError(f"pool = {pool!r}, act = {act!r}: allowed pool 1 or 2 and act one of {', '.join(EPILOGUE_ACTIVATIONS)}")
    x, w, rows, batch = _checked(x, w, rows)
    if windows is not None:
        return _window_conv(windows, x, w, b, padding, _need_rows(rows), batch, pool, act, slope, out_dtype or x.dtype)
    a, _ = _pop_conv2d_pool_act(x, w, b, rows, batch, int(padding[0]), int(padding[1]), pool, act, float(slope),
                                out_dtype or x.dtype, TUNING["window_dx"] if window_dx is None else bool(window_dx))
    return a


__all__ = ["EPILOGUE_ACTIVATIONS", "available", "conv2d", "conv2d_pool_act", "fuses", "max_pool2x2", "supports", "window_table",
           "window_table_bytes", "windows_pay"]
