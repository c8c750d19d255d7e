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
The forward of few-channel layers (O <= 16) runs on CUDA cores in float32, one tap at a time; wider
forwards and every weight gradient run as tensor-core tiles with float32 accumulation, their inputs
in bf16 where the activations are bf16 (as autocast would) and TF32 otherwise (the choices and the
tile sizes were measured: benchmarks/popconv_bench.py). Activations are read and written in their own
dtype (bf16 in the trainer), weights are read as float32 master copies, and weight gradients come back
in float32. Layouts matter more than arithmetic at these sizes: a thread's pixels lie along the fast
axis of every tile, so inputs are loaded by the threads that use them and dy loads coalesce (the
README of benchmarks/ says how this was checked in the compiled TTGIR).

The first layer can read its input by row index: `rows[m*B + b]` names the sample of the data set
`x [S, C, H, W]` that model m sees at batch position b, so a training step indexes the resident data
set on the device instead of materialising an [N, B, C, H, W] copy, and an evaluation on a shared
batch (rows = the same B indices for every model) never expands the input N times.

`conv2d(x, w, b, padding, rows)` is a `torch.library` custom op with its backward registered, so
`torch.compile` fuses everything around it and autograd differentiates through it. Without a GPU the
kernels run in Triton's interpreter (`TRITON_INTERPRET=1`), which the tests use to check them.
"""

from __future__ import annotations

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
    """Tile sizes (pixels, reduction, output channels): tensor-core dots need every side >= 16."""
    block_n = max(16, triton.next_power_of_2(o))
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
    def _store_output(acc, b_ptr, y_ptr, m, O, HO, WO, o, r, sample, pmask, HAS_BIAS: tl.constexpr):
        """Add model m's bias to the [pixels, outputs] tile and store it into y [N*B, O, HO, WO]."""
        if HAS_BIAS:
            acc += tl.load(b_ptr + m * O + o, mask=o < O, other=0.0).to(tl.float32)[None, :]
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
                         GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        tile, m = tl.program_id(0), tl.program_id(1)
        pmask, r, i, j, sample = _pixels(tile * BLOCK_M + tl.arange(0, BLOCK_M), B * HO * WO, m, B, HO, WO)
        row = _source_row(rows_ptr, sample, pmask, GATHER)
        o = tl.arange(0, BLOCK_N)
        w_base = w_ptr + m.to(tl.int64) * (O * K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = _patch_tile(x_ptr, row, pmask, i, j, k, C, H, W, PH, PW, K, KH, KW)
            wk = tl.load(w_base + o[None, :] * K + k[:, None], mask=(k < K)[:, None] & (o < O)[None, :], other=0.0)
            acc += tl.dot(a.to(DOT), wk.to(DOT))
        _store_output(acc, b_ptr, y_ptr, m, O, HO, WO, o, r, sample, pmask, HAS_BIAS)

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
        x_base = x_ptr + row * (C * H * W) + (i - PH) * W + (j - PW)
        w_base = wt_ptr + m.to(tl.int64) * (C * KH * KW * BLOCK_N) + o
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
        _store_output(tl.trans(acc), b_ptr, y_ptr, m, O, HO, WO, o, r, sample, pmask, HAS_BIAS)

    @triton.jit
    def _conv_wgrad_dot_kernel(x_ptr, rows_ptr, dy_ptr, dw_ptr, db_ptr, B, SPLIT, PER_SPLIT,
                               C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, O: tl.constexpr,
                               HO: tl.constexpr, WO: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                               KH: tl.constexpr, KW: tl.constexpr, CHUNKS: tl.constexpr,
                               GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """dw (and db) of model m over its tiles [split * PER_SPLIT, ...): a tile is BLOCK_M pixels of one
        sample's output (CHUNKS tiles a sample), so its dy rows are contiguous runs the loads coalesce."""
        kb, split, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        K: tl.constexpr = C * KH * KW
        k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        o = tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # summed over pixels once, after the loop
        start = split * PER_SPLIT
        for t in range(start, tl.minimum(start + PER_SPLIT, B * CHUNKS)):
            sample = m * B + t // CHUNKS
            r = (t % CHUNKS) * BLOCK_M + tl.arange(0, BLOCK_M)
            pmask = r < HO * WO
            row = tl.load(rows_ptr + sample).to(tl.int64) if GATHER else sample.to(tl.int64)
            a = _patch_tile(x_ptr, row, pmask, r // WO, r % WO, k, C, H, W, PH, PW, K, KH, KW)
            g_ptrs = dy_ptr + sample.to(tl.int64) * (O * HO * WO) + (o * (HO * WO))[None, :] + r[:, None]
            g = tl.load(g_ptrs, mask=pmask[:, None] & (o < O)[None, :], other=0.0)
            acc += tl.dot(tl.trans(a.to(DOT)), g.to(DOT))
            if HAS_BIAS:
                acc_b += g.to(tl.float32)
        part = (m.to(tl.int64) * SPLIT + split) * (O * K)
        tl.store(dw_ptr + part + o[None, :] * K + k[:, None], acc, mask=(k < K)[:, None] & (o < O)[None, :])
        if HAS_BIAS:
            tl.store(db_ptr + (m.to(tl.int64) * SPLIT + split) * O + o, tl.sum(acc_b, axis=0), mask=(o < O) & (kb == 0))


# Kernel choices and tile sizes (0 = the measured default for the layer's shape): the forward on CUDA
# cores for the few-channel layers of population zoos and on tensor cores where O is large; the weight
# gradient always on tensor cores (a CUDA-core version with a [pixels, taps, outputs] accumulator was
# 1.6-3.4x slower on every CNN-s layer); "dot": bf16 or tf32 tensor-core inputs for bf16 activations.
# `benchmarks/popconv_bench.py` sweeps these on a GPU.
TUNING = {"forward": os.environ.get("SYMZOO_POPCONV_FORWARD", "auto"), "fma_block_m": 0, "fma_warps": 4,
          "wgrad_block_m": 0, "wgrad_per_sm": 16, "wgrad_stages": 0, "dot": "bf16"}


def _dot_dtype(x: Tensor):
    """The tensor-core input type: TF32 (float32 operands), or bf16 where the activations already are bf16."""
    return tl.bfloat16 if TUNING["dot"] == "bf16" and x.dtype == torch.bfloat16 else tl.float32


def _fma_forward(o: int) -> bool:
    """Whether the forward runs on CUDA cores (auto: up to 16 output channels, measured on an H100)."""
    return o <= 16 if TUNING["forward"] == "auto" else TUNING["forward"] == "fma"


def _launch_forward(x: Tensor, rows: Tensor | None, w: Tensor, b: Tensor | None, batch: int,
                    padding: tuple[int, int], out_dtype: torch.dtype) -> Tensor:
    n, o, c, kh, kw = w.shape
    h, wd = x.shape[2], x.shape[3]
    ho, wo = h + 2 * padding[0] - kh + 1, wd + 2 * padding[1] - kw + 1
    y = torch.empty(n * batch, o, ho, wo, device=x.device, dtype=out_dtype)
    rows_arg = rows if rows is not None else x  # any pointer when GATHER is off
    if _fma_forward(o):
        block_n = triton.next_power_of_2(o)
        block_m = TUNING["fma_block_m"] or min(1024, 8192 // block_n)  # 8 outputs x 8 pixels a thread (4 warps)
        wt = torch.zeros(n, c * kh * kw, block_n, device=w.device, dtype=torch.float32)
        wt[:, :, :o] = w.reshape(n, o, -1).transpose(1, 2)
        _conv_fwd_fma_kernel[(triton.cdiv(batch * ho * wo, block_m), n)](
            x, rows_arg, wt, b if b is not None else wt, y, batch, o, C=c, H=h, W=wd, HO=ho, WO=wo,
            PH=padding[0], PW=padding[1], KH=kh, KW=kw, GATHER=rows is not None, HAS_BIAS=b is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=TUNING["fma_warps"],
        )
        return y
    block_m, block_k, block_n = _blocks(c * kh * kw, o)
    _conv_fwd_dot_kernel[(triton.cdiv(batch * ho * wo, block_m), n)](
        x, rows_arg, w, b if b is not None else w, y, batch, c, h, wd, o, ho, wo, padding[0], padding[1],
        K=c * kh * kw, KH=kh, KW=kw, GATHER=rows is not None, HAS_BIAS=b is not None, DOT=_dot_dtype(y),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4,
    )
    return y


def _launch_wgrad(x: Tensor, rows: Tensor | None, dy: Tensor, w_shape: torch.Size, padding: tuple[int, int],
                  bias: bool) -> tuple[Tensor, Tensor | None]:
    n, o, c, kh, kw = w_shape
    k = c * kh * kw
    h, wd, ho, wo = x.shape[2], x.shape[3], dy.shape[2], dy.shape[3]
    batch = dy.shape[0] // n
    _, block_k, block_n = _blocks(k, o)
    # tiles of one sample's output pixels: at most the image (rounded up to 16, tl.dot's least side)
    block_m = min(TUNING["wgrad_block_m"] or (128 if k <= 32 else 64), max(16, triton.next_power_of_2(ho * wo)))
    chunks = triton.cdiv(ho * wo, block_m)
    k_blocks, tiles = triton.cdiv(k, block_k), batch * chunks
    # enough programs to fill the card (and hide load latency): split each model's tiles
    sms = torch.cuda.get_device_properties(dy.device).multi_processor_count if dy.is_cuda else 1
    target = TUNING["wgrad_per_sm"] * sms
    split = max(1, min(triton.cdiv(target, n * k_blocks), triton.cdiv(tiles, 8)))
    per_split = triton.cdiv(tiles, split)
    split = triton.cdiv(tiles, per_split)
    dw = torch.empty(n, split, o, k, device=dy.device, dtype=torch.float32)
    db = torch.empty(n, split, o, device=dy.device, dtype=torch.float32) if bias else None
    _conv_wgrad_dot_kernel[(k_blocks, split, n)](
        x, rows if rows is not None else x, dy, dw, db if db is not None else dw, batch, split, per_split,
        C=c, H=h, W=wd, O=o, HO=ho, WO=wo, PH=padding[0], PW=padding[1], KH=kh, KW=kw, CHUNKS=chunks,
        GATHER=rows is not None, HAS_BIAS=bias, DOT=_dot_dtype(dy),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4,
        **({"num_stages": TUNING["wgrad_stages"]} if TUNING["wgrad_stages"] else {}),
    )
    return dw.sum(1).view(w_shape), (db.sum(1) if db is not None else None)


# ---- the custom ops: forward, and the two backward products --------------------------------------------

@torch.library.custom_op("symzoo::pop_conv2d", mutates_args=())
def _pop_conv2d(x: Tensor, w: Tensor, b: Tensor | None, rows: Tensor | None, batch: int,
                pad_h: int, pad_w: int, out_dtype: torch.dtype) -> Tensor:
    return _launch_forward(x.contiguous(), rows, w.contiguous(), b, batch, (pad_h, pad_w), out_dtype)


@_pop_conv2d.register_fake
def _(x, w, b, rows, batch, pad_h, pad_w, out_dtype):
    n, o, _, kh, kw = w.shape
    return x.new_empty(n * batch, o, x.shape[2] + 2 * pad_h - kh + 1, x.shape[3] + 2 * pad_w - kw + 1, dtype=out_dtype)


@torch.library.custom_op("symzoo::pop_conv2d_wgrad", mutates_args=())
def _pop_conv2d_wgrad(x: Tensor, rows: Tensor | None, dy: Tensor, w: Tensor, pad_h: int, pad_w: int,
                      bias: bool) -> tuple[Tensor, Tensor]:
    dw, db = _launch_wgrad(x.contiguous(), rows, dy.contiguous(), w.shape, (pad_h, pad_w), bias)
    return dw, db if db is not None else dw.new_zeros(0)


@_pop_conv2d_wgrad.register_fake
def _(x, rows, dy, w, pad_h, pad_w, bias):
    return w.new_empty(w.shape, dtype=torch.float32), w.new_empty((w.shape[0], w.shape[1]) if bias else (0,),
                                                                  dtype=torch.float32)


def _setup(ctx, inputs, output) -> None:
    x, w, b, rows, batch, pad_h, pad_w, _ = inputs
    ctx.save_for_backward(x, w, rows)
    ctx.meta = (batch, pad_h, pad_w, b is not None, x.dtype)


def _backward(ctx, dy: Tensor):
    x, w, rows = ctx.saved_tensors
    batch, pad_h, pad_w, has_bias, x_dtype = ctx.meta
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        if rows is not None:
            raise NotImplementedError("the input gradient of a row-indexed (data-reading) convolution")
        kh, kw = w.shape[3], w.shape[4]
        w_t = w.flip(3, 4).transpose(1, 2).contiguous()  # [N, C, O, kh, kw]: the input grad is a forward conv
        dx = _pop_conv2d(dy, w_t, None, None, batch, kh - 1 - pad_h, kw - 1 - pad_w, x_dtype)
    if ctx.needs_input_grad[1] or (has_bias and ctx.needs_input_grad[2]):
        dw, db = _pop_conv2d_wgrad(x, rows, dy, w, pad_h, pad_w, has_bias)
        dw, db = dw.to(w.dtype), (db if has_bias else None)
    return dx, dw, db, None, None, None, None, None


_pop_conv2d.register_autograd(_backward, setup_context=_setup)


def conv2d(x: Tensor, w: Tensor, b: Tensor | None, padding: tuple[int, int] = (0, 0), *,
           rows: Tensor | None = None, out_dtype: torch.dtype | None = None) -> Tensor:
    """Model n's Conv2d (stride 1) on its own samples: w [N, O, C, kh, kw], b [N, O] -> y [N*B, O, Ho, Wo].

    x is [N*B, C, H, W] (model n's batch in rows n*B..(n+1)*B-1), or, with `rows` [N, B] (or [N*B])
    of indices, the data set [S, C, H, W] that those indices read. The output has x's dtype unless
    `out_dtype` is given; gradients flow to x (when not row-indexed), w and b.
    """
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
    return _pop_conv2d(x, w, b, rows, batch, int(padding[0]), int(padding[1]), out_dtype or x.dtype)


__all__ = ["available", "conv2d", "supports"]
