"""A population's per-sample normalisation with each model's own affine, as Triton kernels.

GroupNorm(1, C) (ResNet-20's norm: statistics over a sample's whole [C, H, W] map, an affine per channel)
on the population's [N*B, C, ...] batch is, per sample row r of model m = r // B,

  z[r, c, p]  = (x[r, c, p] - mean_r) * rstd_r * w[m, c] + b[m, c] (+ res[r, c, p])    rstd_r = 1 / sqrt(var_r + eps)
  y           = act(z)                                                                    dz = dy * act'(z)
  dx[r, c, p] = rstd_r * (g - mean_r(g) - xhat * mean_r(g * xhat))       g = dz * w[m, c], xhat = (x - mean_r) * rstd_r
  dw[m, c]    = sum over the model's rows and pixels of dz * xhat,       db[m, c] = sum of dz,   dres = dz

`act` is the identity, ReLU or a leaky ReLU: its derivative is read off the sign of the output, so the
backward needs no copy of z, and the output may be stored in bf16 (where only a conv reads it, which would
cast it so) without changing a bit of what autocast computes. A residual add (ResNet's skip) and the
activation after it fold in, so a block's end is one pass instead of three.

One program a row. A row of up to NORM_ROW_TILE elements (a sample of ResNet-20's, 16 x 32 x 32 at most) is one
tile held in registers: the forward reads it once and writes the output once, the backward reads x, dy (and the
output's sign, from its bf16 copy where there is one) once and writes dx and the row's per-channel dw and db
partials, which torch sums over each model's rows. A larger row is read in tiles, in passes: three forward (mean,
centred variance, output), two backward. mean_r(g) and mean_r(g * xhat) are those per-channel sums dotted with w.
The row is a sample's whole map, contiguous in either memory format, so a tile is [pixels, channels]
addressed channels-last or NCHW as x is stored (the output, dx and dres keep x's layout). Statistics are
float32; the output is float32 (as autocast runs norms) unless asked otherwise.

PyTorch's eager path for the same (x.float(), F.group_norm, the affine as two broadcast ops, the add, the
activation) passes over the float32 map many times forward and backward; with `kernels=True` `zoos.fastpop`
emits this instead for GroupNorm with one group.

LayerNorm (a transformer's: statistics over each token's D features, an affine per feature) on the
[N*B, ..., D] batch is the same algebra on rows of D, with model m's rows contiguous. Its rows are narrow
(D = 32 for a small ViT), where torch's kernel, one thread block a row, runs far below the card's bandwidth,
so a program here takes a tile of many rows of one model: the forward reads the tile once and writes y, mean
and rstd; the backward reads x and dy once, writes dx, and sums dw and db over its tiles into one partial a
program, which torch sums over each model's programs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from zoos.popconv.common import available, population_op, stored_channels_last, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _offsets(p, c, C: tl.constexpr, P: tl.constexpr, CL: tl.constexpr):
        """A [pixels, channels] tile's offsets within a row: channels-last or NCHW."""
        if CL:
            return p[:, None] * C + c[None, :]
        return c[None, :] * P + p[:, None]

    @triton.jit
    def _act_slope(y, ACT: tl.constexpr, slope):
        """act'(z) read off y = act(z): 1 for the identity, else 1 where y > 0 and `slope` elsewhere."""
        if ACT == "identity":
            return 1.0
        return tl.where(y > 0, 1.0, slope)

    @triton.jit
    def _tile(p0, P: tl.constexpr, C: tl.constexpr, CL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """(offsets within the row, mask) of the [BLOCK_P, BLOCK_C] tile of pixels from p0."""
        p, c = p0 + tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_C)
        return _offsets(p, c, C, P, CL), (p < P)[:, None] & (c < C)[None, :]

    @triton.jit
    def _norm1_store(z, at, mask, res_ptr, y_ptr, y2_ptr, slope, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                     HAS_Y2: tl.constexpr):
        """act(z + res) stored in y's dtype (and y2's, rounded as a cast of y would be)."""
        if HAS_RES:
            z += tl.load(res_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if ACT != "identity":
            z = tl.where(z > 0, z, z * slope)
        tl.store(y_ptr + at, z.to(y_ptr.dtype.element_ty), mask=mask)
        if HAS_Y2:  # the same output in a second dtype (a conv's compute dtype): y rounded as a cast would
            tl.store(y2_ptr + at, z.to(y_ptr.dtype.element_ty).to(y2_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _norm1_fwd_kernel(x_ptr, w_ptr, b_ptr, res_ptr, y_ptr, y2_ptr, mean_ptr, rstd_ptr, B, eps, slope,
                          C: tl.constexpr, P: tl.constexpr, CL: tl.constexpr, HAS_W: tl.constexpr,
                          HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, HAS_Y2: tl.constexpr,
                          ONE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0)
        m = r // B
        row = r.to(tl.int64) * (C * P)
        c = tl.arange(0, BLOCK_C)
        if ONE:  # the row is one tile, read once and held
            at, mask = _tile(0, P, C, CL, BLOCK_P, BLOCK_C)
            xv = tl.load(x_ptr + row + at, mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(xv) / (C * P)
            d = tl.where(mask, xv - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d) / (C * P) + eps)
        else:  # three passes over the row: mean, centred variance, output
            acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
            for p0 in range(0, P, BLOCK_P):
                at, mask = _tile(p0, P, C, CL, BLOCK_P, BLOCK_C)
                acc += tl.load(x_ptr + row + at, mask=mask, other=0.0).to(tl.float32)
            mean = tl.sum(acc) / (C * P)
            acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
            for p0 in range(0, P, BLOCK_P):
                at, mask = _tile(p0, P, C, CL, BLOCK_P, BLOCK_C)
                d = tl.load(x_ptr + row + at, mask=mask, other=0.0).to(tl.float32) - mean
                acc += tl.where(mask, d * d, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(acc) / (C * P) + eps)
        tl.store(mean_ptr + r, mean)
        tl.store(rstd_ptr + r, rstd)
        scale = rstd * (tl.load(w_ptr + m * C + c, mask=c < C, other=0.0).to(tl.float32) if HAS_W else 1.0)
        shift = tl.load(b_ptr + m * C + c, mask=c < C, other=0.0).to(tl.float32) if HAS_B else 0.0
        if ONE:
            _norm1_store(d * scale + shift, row + at, mask, res_ptr, y_ptr, y2_ptr, slope, HAS_RES, ACT, HAS_Y2)
        else:
            for p0 in range(0, P, BLOCK_P):
                at, mask = _tile(p0, P, C, CL, BLOCK_P, BLOCK_C)
                d = tl.load(x_ptr + row + at, mask=mask, other=0.0).to(tl.float32) - mean
                _norm1_store(d * scale + shift, row + at, mask, res_ptr, y_ptr, y2_ptr, slope, HAS_RES, ACT, HAS_Y2)

    @triton.jit
    def _norm1_dz(at, mask, dy_ptr, dy2_ptr, y_ptr, dres_ptr, slope, HAS_RES: tl.constexpr, ACT: tl.constexpr,
                  HAS_DY2: tl.constexpr, STORE_DRES: tl.constexpr):
        """The gradient at z: dy (+ dy2, the copy's readers') times act'(z), read off the stored output."""
        dz = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if HAS_DY2:  # the second output's gradient (its readers') joins the first's
            dz += tl.load(dy2_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if ACT != "identity":
            dz *= _act_slope(tl.load(y_ptr + at, mask=mask, other=0.0), ACT, slope)
        if HAS_RES and STORE_DRES:
            tl.store(dres_ptr + at, dz.to(dres_ptr.dtype.element_ty), mask=mask)
        return dz

    @triton.jit
    def _norm1_bwd_kernel(x_ptr, dy_ptr, dy2_ptr, y_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dres_ptr, dw_ptr, db_ptr, B,
                          slope, C: tl.constexpr, P: tl.constexpr, CL: tl.constexpr, HAS_W: tl.constexpr,
                          HAS_RES: tl.constexpr, ACT: tl.constexpr, HAS_DY2: tl.constexpr, ONE: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0)
        m = r // B
        row = r.to(tl.int64) * (C * P)
        c = tl.arange(0, BLOCK_C)
        mean, rstd = tl.load(mean_ptr + r), tl.load(rstd_ptr + r)
        wv = tl.load(w_ptr + m * C + c, mask=c < C, other=0.0).to(tl.float32) if HAS_W else 1.0
        if ONE:  # the row is one tile: x, dy (and y) read once and held for dx
            at, mask = _tile(0, P, C, CL, BLOCK_P, BLOCK_C)
            xhat = tl.where(mask, (tl.load(x_ptr + row + at, mask=mask, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
            dz = _norm1_dz(row + at, mask, dy_ptr, dy2_ptr, y_ptr, dres_ptr, slope, HAS_RES, ACT, HAS_DY2, True)
            dw_c, db_c = tl.sum(dz * xhat, axis=0), tl.sum(dz, axis=0)
        else:  # two passes: the per-channel sums, then dx
            sum_dzx = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
            sum_dz = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
            for p0 in range(0, P, BLOCK_P):
                at, mask = _tile(p0, P, C, CL, BLOCK_P, BLOCK_C)
                xhat = tl.where(mask, (tl.load(x_ptr + row + at, mask=mask, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
                dz = _norm1_dz(row + at, mask, dy_ptr, dy2_ptr, y_ptr, dres_ptr, slope, HAS_RES, ACT, HAS_DY2, True)
                sum_dzx += dz * xhat
                sum_dz += dz
            dw_c, db_c = tl.sum(sum_dzx, axis=0), tl.sum(sum_dz, axis=0)
        tl.store(dw_ptr + r.to(tl.int64) * C + c, dw_c, mask=c < C)
        tl.store(db_ptr + r.to(tl.int64) * C + c, db_c, mask=c < C)
        mean_g, mean_gx = tl.sum(db_c * wv) / (C * P), tl.sum(dw_c * wv) / (C * P)
        if ONE:
            tl.store(dx_ptr + row + at, (rstd * (dz * wv - mean_g - xhat * mean_gx)).to(dx_ptr.dtype.element_ty),
                     mask=mask)
        else:
            for p0 in range(0, P, BLOCK_P):
                at, mask = _tile(p0, P, C, CL, BLOCK_P, BLOCK_C)
                xhat = (tl.load(x_ptr + row + at, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
                dz = _norm1_dz(row + at, mask, dy_ptr, dy2_ptr, y_ptr, dres_ptr, slope, HAS_RES, ACT, HAS_DY2, False)
                tl.store(dx_ptr + row + at, (rstd * (dz * wv - mean_g - xhat * mean_gx)).to(dx_ptr.dtype.element_ty),
                         mask=mask)

    @triton.jit
    def _ln_fwd_kernel(x_ptr, res_ptr, h_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, RPM, eps, D: tl.constexpr,
                       HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        m = tl.program_id(1)
        i = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = tl.arange(0, BLOCK_D)
        rows = m.to(tl.int64) * RPM + i
        mask = (i < RPM)[:, None] & (d < D)[None, :]
        at = rows[:, None] * D + d[None, :]
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:  # h = x + res in h's dtype (the add's), normalised as stored
            h = (x + tl.load(res_ptr + at, mask=mask, other=0.0).to(tl.float32)).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + at, h, mask=mask)
            x = h.to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
        y = xc * rstd[:, None]
        if HAS_W:
            y *= tl.load(w_ptr + m * D + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y += tl.load(b_ptr + m * D + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + rows, mean, mask=i < RPM)
        tl.store(rstd_ptr + rows, rstd, mask=i < RPM)

    @triton.jit
    def _ln_bwd_kernel(x_ptr, dy_ptr, dh_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dres_ptr, dw_ptr, db_ptr, RPM, TILES,
                       D: tl.constexpr, HAS_DH: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        j, m = tl.program_id(0), tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        wv = tl.load(w_ptr + m * D + d, mask=d < D, other=0.0).to(tl.float32)[None, :] if HAS_W else 1.0
        acc_dw = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        acc_db = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for t in range(TILES):
            i = (j * TILES + t) * BLOCK_R + tl.arange(0, BLOCK_R)
            rows = m.to(tl.int64) * RPM + i
            mask = (i < RPM)[:, None] & (d < D)[None, :]
            at = rows[:, None] * D + d[None, :]
            mean = tl.load(mean_ptr + rows, mask=i < RPM, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=i < RPM, other=0.0)
            xhat = tl.where(mask, (tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
            dy = tl.load(dy_ptr + at, mask=mask, other=0.0).to(tl.float32)
            g = dy * wv
            mean_g, mean_gx = tl.sum(g, axis=1) / D, tl.sum(g * xhat, axis=1) / D
            dx = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
            if HAS_DH:  # h's gradient from its other readers joins the norm's
                dx += tl.load(dh_ptr + at, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if HAS_RES:
                tl.store(dres_ptr + at, dx.to(dres_ptr.dtype.element_ty), mask=mask)
            acc_dw += dy * xhat
            acc_db += dy
        part = (m.to(tl.int64) * tl.num_programs(0) + j) * D + d
        tl.store(dw_ptr + part, tl.sum(acc_dw, axis=0), mask=d < D)
        tl.store(db_ptr + part, tl.sum(acc_db, axis=0), mask=d < D)


def _layout(x: Tensor) -> tuple[Tensor, bool]:
    """x contiguous in its own memory format: (x, channels-last)."""
    return (x, True) if stored_channels_last(x) else (x.contiguous(), False)


NORM_ROW_TILE = 16384  # the largest row (padded pixels x channels) a GroupNorm program holds as one tile
NORM_TILE = 2048  # elements of a tile where the row is larger, the row then read in passes


def _blocks(c: int, p: int) -> tuple[int, int, bool, int]:
    """(pixels, channels, one tile, warps) of a GroupNorm program's tile: the whole row where it fits
    NORM_ROW_TILE (read once forward and backward), else NORM_TILE elements of it."""
    block_c = triton.next_power_of_2(c)
    if block_c * triton.next_power_of_2(p) <= NORM_ROW_TILE:
        block_p = triton.next_power_of_2(p)
        return block_p, block_c, True, min(16, max(4, block_p * block_c // 1024))
    return max(1, NORM_TILE // block_c), block_c, False, 4


ACTS = {"identity": 1.0, "relu": 0.0, "leaky_relu": None}  # the activations that fold in: their slope below 0


def _like(t: Tensor, cl: bool) -> Tensor:
    return t.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


@population_op("pop_norm1")
def _pop_norm1(x: Tensor, w: Tensor | None, b: Tensor | None, res: Tensor | None, batch: int, eps: float,
               act: str, slope: float, out_dtype: torch.dtype,
               copy_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, cl = _layout(x)
    r, c = x.shape[:2]
    y = torch.empty_like(x, dtype=out_dtype)
    y2 = torch.empty_like(x, dtype=copy_dtype) if copy_dtype is not None else x.new_empty(0)
    mean, rstd = x.new_empty(r, dtype=torch.float32), x.new_empty(r, dtype=torch.float32)
    block_p, block_c, one, warps = _blocks(c, x[0, 0].numel())
    _norm1_fwd_kernel[(r,)](x, w if w is not None else x, b if b is not None else x,
                            _like(res, cl) if res is not None else x, y, y2 if copy_dtype is not None else y, mean, rstd,
                            batch, eps, slope, C=c, P=x[0, 0].numel(), CL=cl, HAS_W=w is not None,
                            HAS_B=b is not None, HAS_RES=res is not None, ACT=act, HAS_Y2=copy_dtype is not None,
                            ONE=one, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)
    return y, mean, rstd, y2


@_pop_norm1.register_fake
def _(x, w, b, res, batch, eps, act, slope, out_dtype, copy_dtype):
    x, _ = _layout(x)
    y2 = torch.empty_like(x, dtype=copy_dtype) if copy_dtype is not None else x.new_empty(0)
    return torch.empty_like(x, dtype=out_dtype), x.new_empty(x.shape[0], dtype=torch.float32), \
        x.new_empty(x.shape[0], dtype=torch.float32), y2


@population_op("pop_norm1_backward")
def _pop_norm1_backward(x: Tensor, dy: Tensor, dy2: Tensor | None, y: Tensor, w: Tensor | None, mean: Tensor,
                        rstd: Tensor, batch: int, act: str, slope: float,
                        res_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, cl = _layout(x)
    dy, y = _like(dy, cl), _like(y, cl)
    dy2 = _like(dy2, cl) if dy2 is not None else None
    r, c = x.shape[:2]
    dx = torch.empty_like(x)
    dres = torch.empty_like(x, dtype=res_dtype) if res_dtype is not None else x.new_empty(0)
    dw, db = x.new_empty(r, c, dtype=torch.float32), x.new_empty(r, c, dtype=torch.float32)
    block_p, block_c, one, warps = _blocks(c, x[0, 0].numel())
    _norm1_bwd_kernel[(r,)](x, dy, dy2 if dy2 is not None else dy, y, w if w is not None else x, mean, rstd, dx,
                            dres if res_dtype is not None else x, dw, db, batch, slope, C=c, P=x[0, 0].numel(), CL=cl,
                            HAS_W=w is not None, HAS_RES=res_dtype is not None, ACT=act, HAS_DY2=dy2 is not None,
                            ONE=one, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=warps)
    n = r // batch
    return dx, dw.view(n, batch, c).sum(1), db.view(n, batch, c).sum(1), dres


@_pop_norm1_backward.register_fake
def _(x, dy, dy2, y, w, mean, rstd, batch, act, slope, res_dtype):
    x, _ = _layout(x)
    n = x.shape[0] // batch
    dres = torch.empty_like(x, dtype=res_dtype) if res_dtype is not None else x.new_empty(0)
    return torch.empty_like(x), x.new_empty(n, x.shape[1], dtype=torch.float32), \
        x.new_empty(n, x.shape[1], dtype=torch.float32), dres


def _setup(ctx, inputs, output) -> None:
    x, w, b, res, batch, _, act, slope, _, copy_dtype = inputs
    # act' is read off the output's sign, which its copy (kept anyway by the conv reading it) has too
    sign = (output[3] if copy_dtype is not None else output[0]) if act != "identity" else None
    ctx.save_for_backward(x, w, output[1], output[2], sign)
    ctx.meta = (batch, act, slope, b is not None, None if res is None else res.dtype, copy_dtype is not None)


def _backward(ctx, dy: Tensor, _dmean, _drstd, dy2: Tensor | None):
    x, w, mean, rstd, y = ctx.saved_tensors
    batch, act, slope, has_b, res_dtype, copied = ctx.meta
    dy2 = dy2 if copied else None
    if dy is None:  # only the copy was read
        dy, dy2 = dy2, None
    dx, dw, db, dres = _pop_norm1_backward(x, dy, dy2, y if y is not None else dy, w, mean, rstd, batch, act, slope,
                                           res_dtype)
    return (dx, dw.to(w.dtype) if w is not None else None, db if has_b else None,
            dres if res_dtype is not None else None, None, None, None, None, None, None)


_pop_norm1.register_autograd(_backward, setup_context=_setup)


def group_norm1(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float = 1e-5, *, residual: Tensor | None = None,
                act: str = "identity", slope: float = 0.01, out_dtype: torch.dtype = torch.float32,
                copy_dtype: torch.dtype | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """act(F.group_norm(x, 1) of each sample with model m's affine (w, b [N, C]) + residual) on the population's
    batch x [N*B, C, ...] (either memory format), in x's layout and `out_dtype`; gradients to x, w, b and the
    residual. `act` is "identity", "relu" or "leaky_relu" (with `slope`). With `copy_dtype`, (y, y in copy_dtype):
    the cast a conv reading y would make, written in the same pass, and its gradient summed into the norm's
    backward (no cast back and no add of the two readers' gradients)."""
    v = w if w is not None else b
    if v is None:
        raise ValueError("group_norm1 needs w or b (the population's affine) to know the population size")
    if x.dim() < 2 or x.shape[0] % v.shape[0] or v.shape[1:] != x.shape[1:2]:
        raise ValueError(f"x [N*B, C, ...] and w, b [N, C] disagree: x {tuple(x.shape)}, w or b {tuple(v.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"the residual {tuple(residual.shape)} is not shaped as x {tuple(x.shape)}")
    if act not in ACTS:
        raise ValueError(f"act {act!r} does not fold into the norm; allowed: {', '.join(ACTS)}")
    if act == "leaky_relu" and not slope >= 0:
        raise ValueError(f"leaky_relu's slope must be >= 0 (its derivative is read off the output's sign), got {slope}")
    slope = float(slope if ACTS[act] is None else ACTS[act])
    y, _, _, y2 = _pop_norm1(x, w, b, residual, x.shape[0] // v.shape[0], float(eps), act, slope, out_dtype, copy_dtype)
    return y if copy_dtype is None else (y, y2)


LAYER_NORM_MAX = 16384  # the widest row layer_norm holds in one tile; a wider one runs F.layer_norm


LN_TILE = 4096  # elements of one layer_norm tile (rows x padded width)


def _ln_blocks(d: int) -> tuple[int, int, int]:
    """(rows, padded width, warps) of one tile: LN_TILE elements or one row, a power of two each."""
    block_d = triton.next_power_of_2(d)
    block_r = max(1, LN_TILE // block_d)
    return block_r, block_d, min(16, max(4, block_r * block_d // 1024))


@population_op("pop_layer_norm")
def _pop_layer_norm(x: Tensor, res: Tensor | None, w: Tensor | None, b: Tensor | None, models: int, width: int,
                    eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x = x.contiguous()
    rows = x.numel() // width
    y = torch.empty_like(x, dtype=out_dtype)
    h = torch.empty_like(x, dtype=torch.promote_types(x.dtype, res.dtype)) if res is not None else x.new_empty(0)
    mean, rstd = x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)
    block_r, block_d, warps = _ln_blocks(width)
    rpm = rows // models
    if rows:
        _ln_fwd_kernel[(triton.cdiv(rpm, block_r), models)](
            x, res.contiguous() if res is not None else x, h if res is not None else x, w if w is not None else x,
            b if b is not None else x, y, mean, rstd, rpm, eps, D=width, HAS_RES=res is not None, HAS_W=w is not None,
            HAS_B=b is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return y, h, mean, rstd


@_pop_layer_norm.register_fake
def _(x, res, w, b, models, width, eps, out_dtype):
    rows = x.numel() // width
    h = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, res.dtype), device=x.device) if res is not None \
        else x.new_empty(0)
    return (torch.empty(x.shape, dtype=out_dtype, device=x.device), h, x.new_empty(rows, dtype=torch.float32),
            x.new_empty(rows, dtype=torch.float32))


def _ln_programs(models: int, tiles: int) -> tuple[int, int]:
    """(programs a model, tiles a program) for the backward: a few thousand programs in all, each model's
    weight-gradient partials one row a program."""
    per_model = max(1, min(tiles, triton.cdiv(4096, models)))
    each = triton.cdiv(tiles, per_model)
    return triton.cdiv(tiles, each), each


@population_op("pop_layer_norm_backward")
def _pop_layer_norm_backward(x: Tensor, dy: Tensor, dh: Tensor | None, w: Tensor | None, mean: Tensor, rstd: Tensor,
                             models: int, width: int, dx_dtype: torch.dtype, dres_dtype: torch.dtype | None
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, dy = x.contiguous(), dy.contiguous()
    dx = torch.empty_like(x, dtype=dx_dtype)
    dres = torch.empty_like(x, dtype=dres_dtype) if dres_dtype is not None else x.new_empty(0)
    block_r, block_d, warps = _ln_blocks(width)
    rpm = x.numel() // width // models
    programs, tiles = _ln_programs(models, max(1, triton.cdiv(rpm, block_r)))
    dw = x.new_zeros(models, programs, width, dtype=torch.float32)
    db = x.new_zeros(models, programs, width, dtype=torch.float32)
    if x.numel():
        _ln_bwd_kernel[(programs, models)](
            x, dy, dh.contiguous() if dh is not None else x, w if w is not None else x, mean, rstd, dx,
            dres if dres_dtype is not None else x, dw, db, rpm, tiles, D=width, HAS_DH=dh is not None,
            HAS_RES=dres_dtype is not None, HAS_W=w is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return dx, dres, dw.sum(1), db.sum(1)


@_pop_layer_norm_backward.register_fake
def _(x, dy, dh, w, mean, rstd, models, width, dx_dtype, dres_dtype):
    dres = torch.empty(x.shape, dtype=dres_dtype, device=x.device) if dres_dtype is not None else x.new_empty(0)
    return torch.empty(x.shape, dtype=dx_dtype, device=x.device), dres, \
        x.new_empty(models, width, dtype=torch.float32), x.new_empty(models, width, dtype=torch.float32)


def _ln_setup(ctx, inputs, output) -> None:
    x, res, w, b, models, width, _, _ = inputs
    ctx.save_for_backward(output[1] if res is not None else x, w, output[2], output[3])  # the normalised input
    ctx.meta = (models, width, b is not None, x.shape, x.dtype, None if res is None else res.dtype)


def _ln_backward(ctx, dy: Tensor, dh: Tensor | None, _dmean, _drstd):
    x, w, mean, rstd = ctx.saved_tensors
    models, width, has_b, shape, x_dtype, res_dtype = ctx.meta
    dx, dres, dw, db = _pop_layer_norm_backward(x, dy, dh if res_dtype is not None else None, w, mean, rstd, models,
                                                width, x_dtype, res_dtype)
    return (dx.view(shape), dres.view(shape) if res_dtype is not None else None,
            dw.to(w.dtype).view(w.shape) if w is not None else None, db if has_b else None, None, None, None, None)


_pop_layer_norm.register_autograd(_ln_backward, setup_context=_ln_setup)


def _ln_args(x: Tensor, shape: Sequence[int], w: Tensor | None, b: Tensor | None):
    """(w, b as [N, width], N, width) after checking the shapes."""
    v = w if w is not None else b
    if v is None:
        raise ValueError("layer_norm needs w or b (the population's affine) to know the population size")
    shape = tuple(int(s) for s in shape)
    if v.shape[1:] != shape or x.shape[x.dim() - len(shape):] != shape or x.dim() <= len(shape) \
            or x.shape[0] % v.shape[0]:
        raise ValueError(f"x [N*B, ..., *shape] and w, b [N, *shape] disagree: x {tuple(x.shape)}, "
                         f"shape {shape}, w or b {tuple(v.shape)}")
    width = math.prod(shape)
    if width > LAYER_NORM_MAX:
        raise ValueError(f"layer_norm holds rows of up to {LAYER_NORM_MAX} elements, got {width}")
    return (w.reshape(w.shape[0], width) if w is not None else None,
            b.reshape(b.shape[0], width) if b is not None else None, v.shape[0], width)


def layer_norm(x: Tensor, shape: Sequence[int], w: Tensor | None, b: Tensor | None, eps: float = 1e-5, *,
               out_dtype: torch.dtype = torch.float32) -> Tensor:
    """F.layer_norm(x, shape) of each sample with model m's affine (w, b [N, *shape]) on the population's
    batch x [N*B, ..., *shape], in `out_dtype`; gradients to x, w and b. Statistics and the affine in float32,
    as autocast runs norms; rows of width prod(shape) up to LAYER_NORM_MAX."""
    wf, bf, models, width = _ln_args(x, shape, w, b)
    return _pop_layer_norm(x, None, wf, bf, models, width, float(eps), out_dtype)[0]


def add_layer_norm(x: Tensor, residual: Tensor, shape: Sequence[int], w: Tensor | None, b: Tensor | None,
                   eps: float = 1e-5, *, out_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(h, layer_norm(h)) for h = x + residual (in the dtype the add gives, as a pre-LN transformer's stream
    is): the add and the norm of the sum in one pass; gradients to x, residual, w and b, h's own readers' too."""
    if residual.shape != x.shape:
        raise ValueError(f"the residual {tuple(residual.shape)} is not shaped as x {tuple(x.shape)}")
    wf, bf, models, width = _ln_args(x, shape, w, b)
    y, h, _, _ = _pop_layer_norm(x, residual, wf, bf, models, width, float(eps), out_dtype)
    return h, y

__all__ = ["ACTS", "LAYER_NORM_MAX", "add_layer_norm", "available", "group_norm1", "layer_norm"]
