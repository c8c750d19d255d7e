"""A population's per-sample normalisation with each model's own affine, as Triton kernels.

GroupNorm(1, C) (ResNet-20's norm: statistics over a sample's whole [C, H, W] map, an affine per channel)
on the population's [N*B, C, ...] batch is, per sample row r of model m = r // B,

  y[r, c, p]  = (x[r, c, p] - mean_r) * rstd_r * w[m, c] + b[m, c]       rstd_r = 1 / sqrt(var_r + eps)
  dx[r, c, p] = rstd_r * (g - mean_r(g) - xhat * mean_r(g * xhat))       g = dy * w[m, c], xhat = (x - mean_r) * rstd_r
  dw[m, c]    = sum over the model's rows and pixels of dy * xhat,       db[m, c] = sum of dy

One program a row: the forward reads the row three times (mean, centred variance, output) and writes the
output once; the backward reads x and dy twice and writes dx and a row's per-channel dw and db partials,
which torch sums over each model's rows. The row is a sample's whole map, contiguous in either memory
format, so a tile is [pixels, channels] addressed channels-last or NCHW as x is stored (the output and dx
keep x's layout). The output is float32, as autocast runs norms; statistics are float32.

PyTorch's eager path for the same (x.float(), F.group_norm, then the affine as two broadcast ops) passes over
the float32 map five times forward and as often backward; with `kernels=True` `zoos.fastpop` emits this
instead for GroupNorm with one group.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zoos.popconv import available, stored_channels_last, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _offsets(p, c, C: tl.constexpr, P: tl.constexpr, CL: tl.constexpr):
        """A [pixels, channels] tile's offsets within a row: channels-last or NCHW."""
        if CL:
            return p[:, None] * C + c[None, :]
        return c[None, :] * P + p[:, None]

    @triton.jit
    def _norm1_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, B, eps,
                          C: tl.constexpr, P: tl.constexpr, CL: tl.constexpr, HAS_W: tl.constexpr,
                          HAS_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0)
        m = r // B
        row = r.to(tl.int64) * (C * P)
        c = tl.arange(0, BLOCK_C)
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = (p < P)[:, None] & (c < C)[None, :]
            acc += tl.load(x_ptr + row + _offsets(p, c, C, P, CL), mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(acc) / (C * P)
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = (p < P)[:, None] & (c < C)[None, :]
            d = tl.load(x_ptr + row + _offsets(p, c, C, P, CL), mask=mask, other=0.0).to(tl.float32) - mean
            acc += tl.where(mask, d * d, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(acc) / (C * P) + eps)
        tl.store(mean_ptr + r, mean)
        tl.store(rstd_ptr + r, rstd)
        scale = rstd * (tl.load(w_ptr + m * C + c, mask=c < C, other=0.0).to(tl.float32) if HAS_W else 1.0)
        shift = tl.load(b_ptr + m * C + c, mask=c < C, other=0.0).to(tl.float32) if HAS_B else 0.0
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = (p < P)[:, None] & (c < C)[None, :]
            at = row + _offsets(p, c, C, P, CL)
            xv = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + at, (xv - mean) * scale + shift, mask=mask)

    @triton.jit
    def _norm1_bwd_kernel(x_ptr, dy_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, B,
                          C: tl.constexpr, P: tl.constexpr, CL: tl.constexpr, HAS_W: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0)
        m = r // B
        row = r.to(tl.int64) * (C * P)
        c = tl.arange(0, BLOCK_C)
        mean, rstd = tl.load(mean_ptr + r), tl.load(rstd_ptr + r)
        wv = tl.load(w_ptr + m * C + c, mask=c < C, other=0.0).to(tl.float32) if HAS_W else 1.0
        sum_g = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        sum_gx = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        sum_dyx = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        sum_dy = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = (p < P)[:, None] & (c < C)[None, :]
            at = row + _offsets(p, c, C, P, CL)
            xhat = tl.where(mask, (tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
            dy = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
            sum_g += dy * wv
            sum_gx += dy * wv * xhat
            sum_dyx += dy * xhat
            sum_dy += dy
        tl.store(dw_ptr + r.to(tl.int64) * C + c, tl.sum(sum_dyx, axis=0), mask=c < C)
        tl.store(db_ptr + r.to(tl.int64) * C + c, tl.sum(sum_dy, axis=0), mask=c < C)
        mean_g, mean_gx = tl.sum(sum_g) / (C * P), tl.sum(sum_gx) / (C * P)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            mask = (p < P)[:, None] & (c < C)[None, :]
            at = row + _offsets(p, c, C, P, CL)
            xhat = (tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            g = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32) * wv
            tl.store(dx_ptr + at, (rstd * (g - mean_g - xhat * mean_gx)).to(dx_ptr.dtype.element_ty), mask=mask)


def _layout(x: Tensor) -> tuple[Tensor, bool]:
    """x contiguous in its own memory format: (x, channels-last)."""
    return (x, True) if stored_channels_last(x) else (x.contiguous(), False)


def _blocks(c: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(c)
    return max(1, 2048 // block_c), block_c


@torch.library.custom_op("symzoo::pop_norm1", mutates_args=())
def _pop_norm1(x: Tensor, w: Tensor | None, b: Tensor | None, batch: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    x, cl = _layout(x)
    r, c = x.shape[:2]
    y = torch.empty_like(x, dtype=torch.float32)
    mean, rstd = x.new_empty(r, dtype=torch.float32), x.new_empty(r, dtype=torch.float32)
    block_p, block_c = _blocks(c)
    _norm1_fwd_kernel[(r,)](x, w if w is not None else x, b if b is not None else x, y, mean, rstd, batch, eps,
                            C=c, P=x[0, 0].numel(), CL=cl, HAS_W=w is not None, HAS_B=b is not None,
                            BLOCK_P=block_p, BLOCK_C=block_c)
    return y, mean, rstd


@_pop_norm1.register_fake
def _(x, w, b, batch, eps):
    x, _ = _layout(x)
    return torch.empty_like(x, dtype=torch.float32), x.new_empty(x.shape[0], dtype=torch.float32), \
        x.new_empty(x.shape[0], dtype=torch.float32)


@torch.library.custom_op("symzoo::pop_norm1_backward", mutates_args=())
def _pop_norm1_backward(x: Tensor, dy: Tensor, w: Tensor | None, mean: Tensor, rstd: Tensor,
                        batch: int) -> tuple[Tensor, Tensor, Tensor]:
    x, cl = _layout(x)
    dy = dy.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    r, c = x.shape[:2]
    dx = torch.empty_like(x)
    dw, db = x.new_empty(r, c, dtype=torch.float32), x.new_empty(r, c, dtype=torch.float32)
    block_p, block_c = _blocks(c)
    _norm1_bwd_kernel[(r,)](x, dy, w if w is not None else x, mean, rstd, dx, dw, db, batch,
                            C=c, P=x[0, 0].numel(), CL=cl, HAS_W=w is not None, BLOCK_P=block_p, BLOCK_C=block_c)
    n = r // batch
    return dx, dw.view(n, batch, c).sum(1), db.view(n, batch, c).sum(1)


@_pop_norm1_backward.register_fake
def _(x, dy, w, mean, rstd, batch):
    x, _ = _layout(x)
    n = x.shape[0] // batch
    return torch.empty_like(x), x.new_empty(n, x.shape[1], dtype=torch.float32), x.new_empty(n, x.shape[1], dtype=torch.float32)


def _setup(ctx, inputs, output) -> None:
    x, w, b, batch, _ = inputs
    ctx.save_for_backward(x, w, output[1], output[2])
    ctx.meta = (batch, w is not None, b is not None)


def _backward(ctx, dy: Tensor, _dmean, _drstd):
    x, w, mean, rstd = ctx.saved_tensors
    batch, has_w, has_b = ctx.meta
    dx, dw, db = _pop_norm1_backward(x, dy, w, mean, rstd, batch)
    return dx, (dw.to(w.dtype) if has_w else None), (db if has_b else None), None, None


_pop_norm1.register_autograd(_backward, setup_context=_setup)


def group_norm1(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float = 1e-5) -> Tensor:
    """F.group_norm(x, 1) of each sample with model m's affine (w, b [N, C]) on the population's batch
    x [N*B, C, ...] (either memory format): float32 out, in x's layout; gradients to x, w and b."""
    v = w if w is not None else b
    if v is None:
        raise ValueError("group_norm1 needs w or b (the population's affine) to know the population size")
    if x.dim() < 2 or x.shape[0] % v.shape[0] or v.shape[1:] != x.shape[1:2]:
        raise ValueError(f"x [N*B, C, ...] and w, b [N, C] disagree: x {tuple(x.shape)}, w or b {tuple(v.shape)}")
    return _pop_norm1(x, w, b, x.shape[0] // v.shape[0], float(eps))[0]


__all__ = ["available", "group_norm1"]
