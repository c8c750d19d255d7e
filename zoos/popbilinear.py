"""Bilinear products with a constant sparse table, as Triton kernels: a geometric product (or any tensor product
written as a table) over a whole population's features in one pass.

For x [S, G, C, A] (S sets of G points, C channels, A components) and y [S, G or 1, C, B] (one y for every point
of a set: a set's context), and a table of terms (i, j, k, c):

  z[s, g, c, k] = sum over the terms (i, j, k, c) of  c * x[s, g, c, i] * y[s, g, c, j]      (y[..., B] = 1)

A Clifford algebra's geometric product x y is such a table (k = the blade of e_i e_j, c its sign); the index
j = B stands for a constant 1, so x's first components can be added to the product in the same pass (a layer's
left map). As dense products the same z is x @ R(y), with R(y) [.., A, K] built from y per set and channel and a
batched matmul per feature: R, its gradient and the layout copies around a product of tiny matrices are each a
pass over memory as large as the features. Here one program holds a tile of sets, points and channels and, for each
output component, reads the components its terms name (a few terms at a time, one gather each, from cache); the
backward is the same kernel on two more tables,

  dx[.., i] = sum over (i, j, k, c) of c * dz[.., k] * y[.., j]      dy[.., j] = sum of c * dz[.., k] * x[.., i]

the latter summed over a set's points where y is shared. Products accumulate in float32; z and dx take x's dtype,
dy y's.

Models route their products here only where `enabled()` (SYMZOO_POPBILINEAR=1, or inside `using()`): off by
default until it is timed against the dense product on a GPU (benchmarks/README.md says where that stands).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from zoos.popconv.common import available, triton
from zoos.popconv.tuning import env_flag


def _from_environment() -> bool:
    return env_flag(os.environ, "SYMZOO_POPBILINEAR", default="0")


_enabled = [_from_environment()]


def enabled() -> bool:
    """Whether models run their bilinear products here (SYMZOO_POPBILINEAR=1, or inside `using`)."""
    return _enabled[-1]


@contextlib.contextmanager
def using(on: bool = True) -> Iterator[None]:
    """`enabled()` is `on` inside the block (a population program reads it each step: keep the block around it)."""
    _enabled.append(bool(on))
    try:
        yield
    finally:
        _enabled.pop()


TILE = 256  # (sets x points x channels) elements a program holds, the points and channels padded to powers of two
GATHER = 2048  # elements of one gathered [tile, terms] block: TILE x TERMS terms read at once

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _sum_of_products(p_ptr, q_ptr, out_ptr, idx_ptr, coef_ptr, S, G, C, N_OUT, N_Q, T,
                         sps, spg, spc, spa, sqs, sqg, sqc, sqa, sos, sog, soc, soa, REDUCE_G: tl.constexpr,
                         BS: tl.constexpr, BG: tl.constexpr, BC: tl.constexpr, TERMS: tl.constexpr):
        """out[s, g, c, o] = sum over terms t of output o of coef[t] p[s, g, c, pi[t]] q[s, g, c, qi[t]] (q = 1 where
        qi[t] == N_Q), summed over g into out[s, 0, c, o] with REDUCE_G. idx: the terms' offsets by output [N_OUT + 1],
        then pi [T], then qi [T]. An output's terms are read TERMS at a time: their indices as one vector load, the
        components they name as one gather each over the tile's [BS * BG * BC] elements."""
        r = tl.arange(0, BS * BG * BC)
        s = tl.program_id(0) * BS + r // (BG * BC)
        g = (r // BC) % BG
        c = r % BC
        mask = (s < S) & (g < G) & (c < C)
        p_at = s.to(tl.int64) * sps + g * spg + c * spc
        q_at = s.to(tl.int64) * sqs + g * sqg + c * sqc
        if REDUCE_G:  # [BS, BC]: a set's sum over its points
            s2 = tl.program_id(0) * BS + tl.arange(0, BS)[:, None]
            c2 = tl.arange(0, BC)[None, :]
            o_at = s2.to(tl.int64) * sos + c2 * soc
            o_mask = (s2 < S) & (c2 < C)
        else:
            o_at = s.to(tl.int64) * sos + g * sog + c * soc
            o_mask = mask
        k = tl.arange(0, TERMS)
        for o in range(N_OUT):
            acc = tl.zeros((BS * BG * BC,), dtype=tl.float32)
            end = tl.load(idx_ptr + o + 1)
            for t0 in range(tl.load(idx_ptr + o), end, TERMS):
                t = t0 + k
                live = t < end
                pi = tl.load(idx_ptr + N_OUT + 1 + t, mask=live, other=0)
                qi = tl.load(idx_ptr + N_OUT + 1 + T + t, mask=live, other=N_Q)
                w = tl.load(coef_ptr + t, mask=live, other=0.0)
                both = mask[:, None] & live[None, :]
                pv = tl.load(p_ptr + p_at[:, None] + pi[None, :] * spa, mask=both, other=0.0).to(tl.float32)
                qv = tl.load(q_ptr + q_at[:, None] + qi[None, :] * sqa, mask=both & (qi < N_Q)[None, :],
                             other=1.0).to(tl.float32)
                acc += tl.sum(pv * qv * w[None, :], axis=1)
            if REDUCE_G:
                total = tl.sum(tl.reshape(acc, (BS, BG, BC)), axis=1)
                tl.store(out_ptr + o_at + o * soa, total.to(out_ptr.dtype.element_ty), mask=o_mask)
            else:
                tl.store(out_ptr + o_at + o * soa, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


@dataclass(frozen=True)
class Table:
    """The terms (i, j, k, coef) of z[k] = sum coef x[i] y[j] for x [.., a], y [.., b] (j == b: a constant 1),
    z [.., k_out]. Built once per product (a layer's), its device copies made once per device."""

    a: int
    b: int
    k_out: int
    terms: tuple[tuple[int, int, int, float], ...]
    _device: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        for i, j, k, _ in self.terms:
            if not (0 <= i < self.a and 0 <= j <= self.b and 0 <= k < self.k_out):
                raise ValueError(f"term ({i}, {j}, {k}) is outside x [.., {self.a}], y [.., {self.b}] (+ the constant "
                                 f"{self.b}) and z [.., {self.k_out}]")

    def on(self, device: torch.device) -> tuple[Tensor, ...]:
        """(idx, coef) of the forward, the x gradient and the y gradient (`_sum_of_products`' layout) on `device`."""
        key = str(device)
        if key not in self._device:
            forward = _grouped([(k, i, j, c) for i, j, k, c in self.terms], self.k_out)
            dx = _grouped([(i, k, j, c) for i, j, k, c in self.terms], self.a)
            dy = _grouped([(j, k, i, c) for i, j, k, c in self.terms if j < self.b], self.b)
            self._device[key] = tuple(torch.tensor(t, dtype=d, device=device)
                                      for idx, coef in (forward, dx, dy) for t, d in ((idx, torch.int32), (coef, torch.float32)))
        return self._device[key]


def _grouped(terms: list[tuple[int, int, int, float]], n_out: int) -> tuple[list[int], list[float]]:
    """(out, p index, q index, coef) terms -> (offsets by out [n_out + 1] + p indices + q indices, coefs), by out."""
    terms = sorted(terms, key=lambda t: t[0])
    offsets = [0] * (n_out + 1)
    for out, *_ in terms:
        offsets[out + 1] += 1
    for o in range(n_out):
        offsets[o + 1] += offsets[o]
    return offsets + [t[1] for t in terms] + [t[2] for t in terms], [float(t[3]) for t in terms]


def _blocks(g: int, c: int) -> tuple[int, int, int, int]:
    """(sets, points, channels, terms) a program: a tile of about TILE elements, gathers of about GATHER."""
    bg, bc = triton.next_power_of_2(g), triton.next_power_of_2(c)
    bs = max(1, TILE // (bg * bc))
    return bs, bg, bc, max(1, min(16, GATHER // (bs * bg * bc)))


def _launch(p: Tensor, q: Tensor, out: Tensor, idx: Tensor, coef: Tensor, n_q: int, reduce_g: bool) -> None:
    """`_sum_of_products` over p [S, G, C, *], q [S, G or 1, C, *] into out [S, G or 1, C, n_out]."""
    s, g, c, n_out = p.shape[0], p.shape[1], p.shape[2], out.shape[3]
    if not out.numel():
        return
    bs, bg, bc, terms = _blocks(g, c)
    sq = list(q.stride())
    if q.shape[1] == 1:
        sq[1] = 0
    _sum_of_products[(triton.cdiv(s, bs),)](
        p, q, out, idx, coef, s, g, c, n_out, n_q, coef.numel(), *p.stride(), *sq, *out.stride(),
        REDUCE_G=reduce_g, BS=bs, BG=bg, BC=bc, TERMS=terms, num_warps=4)


def _check(x: Tensor, y: Tensor, a: int, b: int) -> None:
    if x.dim() != 4 or y.dim() != 4 or x.shape[-1] != a or y.shape[-1] != b or y.shape[0] != x.shape[0] \
            or y.shape[2] != x.shape[2] or y.shape[1] not in (1, x.shape[1]):
        raise ValueError(f"x [S, G, C, {a}] and y [S, G or 1, C, {b}] disagree: x {tuple(x.shape)}, y {tuple(y.shape)}")


@torch.library.custom_op("symzoo::pop_bilinear", mutates_args=())
def _pop_bilinear(x: Tensor, y: Tensor, idx: Tensor, coef: Tensor, dx_idx: Tensor, dx_coef: Tensor, dy_idx: Tensor,
                  dy_coef: Tensor, k_out: int) -> Tensor:
    s, g, c, _ = x.shape
    z = x.new_empty(s, g, k_out, c).transpose(-1, -2)  # channels innermost, as x's components are read
    _launch(x, y, z, idx, coef, y.shape[-1], reduce_g=False)
    return z


@_pop_bilinear.register_fake
def _(x, y, idx, coef, dx_idx, dx_coef, dy_idx, dy_coef, k_out):
    return x.new_empty(x.shape[0], x.shape[1], k_out, x.shape[2]).transpose(-1, -2)


@torch.library.custom_op("symzoo::pop_bilinear_backward", mutates_args=())
def _pop_bilinear_backward(x: Tensor, y: Tensor, dz: Tensor, dx_idx: Tensor, dx_coef: Tensor, dy_idx: Tensor,
                           dy_coef: Tensor, x_grad: bool, y_grad: bool) -> tuple[Tensor, Tensor]:
    """(dx or empty, dy or empty), in x's and y's dtypes."""
    dx, dy = x.new_empty(0), y.new_empty(0)
    if x_grad:
        dx = torch.empty_like(x)
        _launch(dz, y, dx, dx_idx, dx_coef, y.shape[-1], reduce_g=False)
    if y_grad:
        dy = torch.empty_like(y)
        _launch(dz, x, dy, dy_idx, dy_coef, x.shape[-1], reduce_g=y.shape[1] == 1 and x.shape[1] > 1)
    return dx, dy


@_pop_bilinear_backward.register_fake
def _(x, y, dz, dx_idx, dx_coef, dy_idx, dy_coef, x_grad, y_grad):
    return (torch.empty_like(x) if x_grad else x.new_empty(0)), (torch.empty_like(y) if y_grad else y.new_empty(0))


def _setup(ctx, inputs, output) -> None:
    x, y, _, _, dx_idx, dx_coef, dy_idx, dy_coef, _ = inputs
    ctx.save_for_backward(x, y, dx_idx, dx_coef, dy_idx, dy_coef)


def _backward(ctx, dz: Tensor):
    x, y, *tables = ctx.saved_tensors
    dx, dy = _pop_bilinear_backward(x, y, dz, *tables, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
    return (dx if ctx.needs_input_grad[0] else None, dy if ctx.needs_input_grad[1] else None) + (None,) * 7


_pop_bilinear.register_autograd(_backward, setup_context=_setup)


def product(x: Tensor, y: Tensor, table: Table) -> Tensor:
    """z [S, G, C, table.k_out] of x [S, G, C, table.a] and y [S, G or 1, C, table.b] (any strides; a y of one
    point is every point's): z[.., k] = sum over the table's terms (i, j, k, coef) of coef x[.., i] y[.., j], with
    y[.., table.b] = 1. Gradients to x and y."""
    _check(x, y, table.a, table.b)
    return _pop_bilinear(x, y, *table.on(x.device), table.k_out)


__all__ = ["Table", "available", "enabled", "product", "using"]
