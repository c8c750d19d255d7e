"""The pair geometry of an EGNN layer (Satorras et al. 2021, eqs. 3-4) on fully connected graphs, as Triton kernels:
each graph's edge features from its points, and the coordinate step its edges' weights make.

For each graph of n points x [n, D] (every ordered pair i != j an edge):

  geo_ij  = [|x_i - x_j|^2, attr_ij]                                     the edge MLP's input features
  step_i  = sum_{j != i} (x_i - x_j) / (|x_i - x_j| + 1) * c_ij / (n - 1)  the points' update from c [n, n, 1]

Written as torch ops (`pair_reference`, `step_reference`: the architecture's own forward) each is a chain of
broadcasting ops on [graphs, n, n, D] edge tensors (the differences, their squares and sums, the concatenation, the
distances, the quotient, the products and the sums over j), about twenty launches a layer forward and twice as many
backward, each a pass over an edge tensor. Here each thread holds one row, an edge (geo) or a point (the step and
the points' gradients, looping over the point's n edges out and in), so that a warp's loads and stores are of
adjacent rows; everything is computed in float32 and only what the op returns is written: geo in the caller's
dtype, the step in x's, the gradients in their inputs' dtypes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zoos.popconv.common import available, population_op, triton

MAX_DIMS = 16  # coordinates a point: [rows, D] tiles
MAX_ATTRS = 15  # edge attributes besides the squared distance: geo's [rows, 1 + A] tiles

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _rows(ptr, rows, ok, WIDTH, BW: tl.constexpr):
        """The [len(rows), BW] float32 tile of rows `rows` of a [.., WIDTH] tensor (zero past WIDTH and where not ok)."""
        col = tl.arange(0, BW)[None, :]
        return tl.load(ptr + rows[:, None] * WIDTH + col, mask=ok[:, None] & (col < WIDTH), other=0.0).to(tl.float32)

    @triton.jit
    def _pair_kernel(x_ptr, a_ptr, geo_ptr, edges, n, D, A, BD: tl.constexpr, BA: tl.constexpr,
                     BLOCK: tl.constexpr):
        """Edges e = (graph, i, j) of a block, one a row: geo's row e [d2, attr's row e], stored whole."""
        e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = e < edges
        node_i = e // n
        node_j = node_i - node_i % n + e % n
        diff = _rows(x_ptr, node_i, ok, D, BD) - _rows(x_ptr, node_j, ok, D, BD)
        d2 = tl.sum(diff * diff, axis=1)
        col = tl.arange(0, BA)[None, :]  # geo's columns: d2, then the attributes
        a = tl.load(a_ptr + e[:, None] * A + col - 1, mask=ok[:, None] & (col >= 1) & (col <= A), other=0.0)
        geo = tl.where(col == 0, d2[:, None], a.to(tl.float32))
        tl.store(geo_ptr + e[:, None] * (A + 1) + col, geo.to(geo_ptr.dtype.element_ty),
                 mask=ok[:, None] & (col <= A))

    @triton.jit
    def _points(nodes, n, BLOCK: tl.constexpr):
        """A block's points m, one a row: (m, its index i in its graph, its graph's first point, the real ones)."""
        m = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        i = m % n
        return m, i, m - i, m < nodes

    @triton.jit
    def _pair_backward_kernel(x_ptr, gg_ptr, dx_ptr, nodes, n, D, A, BD: tl.constexpr, BLOCK: tl.constexpr):
        """dx_m = 2 sum_j (g_mj + g_jm) (x_m - x_j), g the squared distances' gradient (geo's column 0)."""
        m, i, first, ok = _points(nodes, n, BLOCK)
        xm = _rows(x_ptr, m, ok, D, BD)
        dx = tl.zeros_like(xm)
        for j in range(n):
            g = tl.load(gg_ptr + (m * n + j) * (A + 1), mask=ok, other=0.0).to(tl.float32)
            g += tl.load(gg_ptr + ((first + j) * n + i) * (A + 1), mask=ok, other=0.0).to(tl.float32)
            dx += (2.0 * g)[:, None] * (xm - _rows(x_ptr, first + j, ok, D, BD))
        col = tl.arange(0, BD)[None, :]
        tl.store(dx_ptr + m[:, None] * D + col, dx.to(dx_ptr.dtype.element_ty), mask=ok[:, None] & (col < D))

    @triton.jit
    def _pair_weight(x_ptr, c_ptr, xm, m, i, first, ok, j, n, D, BD: tl.constexpr):
        """For the edges (m, j) of a block's points: (x_m - x_j, c_mj and c_jm (zero on the diagonal),
        1 / (|x_m - x_j| + 1) / (n - 1), |x_m - x_j| (1 on the diagonal), whether an edge)."""
        xj = _rows(x_ptr, first + j, ok, D, BD)
        diff = xm - xj
        edge = ok & (i != j)
        c_mj = tl.load(c_ptr + m * n + j, mask=edge, other=0.0).to(tl.float32)
        c_jm = tl.load(c_ptr + (first + j) * n + i, mask=edge, other=0.0).to(tl.float32)
        dist = tl.where(edge, tl.sqrt(tl.sum(diff * diff, axis=1)), 1.0)
        return xj, diff, c_mj, c_jm, 1.0 / ((dist + 1.0) * (n - 1)), dist, edge

    @triton.jit
    def _step_kernel(x_ptr, c_ptr, step_ptr, nodes, n, D, BD: tl.constexpr, BLOCK: tl.constexpr):
        """step_m = sum_j c_mj (x_m - x_j) / (|x_m - x_j| + 1) / (n - 1), a point a row."""
        m, i, first, ok = _points(nodes, n, BLOCK)
        xm = _rows(x_ptr, m, ok, D, BD)
        step = tl.zeros_like(xm)
        for j in range(n):
            _, diff, c_mj, _, inv, _, _ = _pair_weight(x_ptr, c_ptr, xm, m, i, first, ok, j, n, D, BD)
            step += (c_mj * inv)[:, None] * diff
        col = tl.arange(0, BD)[None, :]
        tl.store(step_ptr + m[:, None] * D + col, step.to(step_ptr.dtype.element_ty), mask=ok[:, None] & (col < D))

    @triton.jit
    def _step_backward_kernel(x_ptr, c_ptr, gs_ptr, dx_ptr, dc_ptr, nodes, n, D, BD: tl.constexpr,
                              BLOCK: tl.constexpr):
        """A point m a row, over its edges (m, j) and (j, m): dc_mj = e_mj / (|x_m - x_j| + 1) / (n - 1) with
        e_mj = <gs_m, x_m - x_j> (zero on the diagonal), and dx_m = sum_j (G_mj - G_jm), where G_ab = coef_ab gs_a +
        2 dd2_ab (x_a - x_b) and dd2_ab = -e_ab c_ab / (|x_a - x_b| + 1)^2 / (n - 1) / (2 |x_a - x_b|) is the gradient
        of the squared distance through the denominator."""
        m, i, first, ok = _points(nodes, n, BLOCK)
        xm = _rows(x_ptr, m, ok, D, BD)
        gm = _rows(gs_ptr, m, ok, D, BD)
        dx = tl.zeros_like(xm)
        for j in range(n):
            _, diff, c_mj, c_jm, inv, dist, edge = _pair_weight(x_ptr, c_ptr, xm, m, i, first, ok, j, n, D, BD)
            gj = _rows(gs_ptr, first + j, ok, D, BD)
            e_mj = tl.sum(gm * diff, axis=1)
            e_jm = -tl.sum(gj * diff, axis=1)
            tl.store(dc_ptr + m * n + j, (e_mj * inv).to(dc_ptr.dtype.element_ty), mask=ok)  # zero on the diagonal
            shrink = inv * (n - 1) * inv / (2.0 * dist)  # d(1 / ((dist + 1)(n - 1))) / d(dist^2), negated
            grad_mj = (c_mj * inv)[:, None] * gm - (2.0 * e_mj * c_mj * shrink)[:, None] * diff
            grad_jm = (c_jm * inv)[:, None] * gj + (2.0 * e_jm * c_jm * shrink)[:, None] * diff
            dx += tl.where(edge[:, None], grad_mj - grad_jm, 0.0)
        col = tl.arange(0, BD)[None, :]
        tl.store(dx_ptr + m[:, None] * D + col, dx.to(dx_ptr.dtype.element_ty), mask=ok[:, None] & (col < D))


def fits(nodes: int, dims: int, attrs: int = 0) -> bool:
    """Whether graphs of `nodes` points of `dims` coordinates and `attrs` edge attributes run here."""
    return 2 <= nodes and 1 <= dims <= MAX_DIMS and 0 <= attrs <= MAX_ATTRS


BLOCK = 256  # rows (edges, or points) a program: one a thread at 8 warps, the loads of a warp's rows adjacent


def _grid(rows: int) -> tuple[int]:
    return (triton.cdiv(rows, BLOCK),)


def _per_point(kernel, x: Tensor, *tensors: Tensor, extra: tuple = ()) -> None:
    """Runs a kernel of a point a row over x [..., n, D]'s points: kernel(x, *tensors, points, n, D, *extra)."""
    nodes, dims = x.shape[-2:]
    points = x.numel() // dims
    if points:
        kernel[_grid(points)](x, *tensors, points, nodes, dims, *extra, BD=triton.next_power_of_2(dims), BLOCK=BLOCK,
                              num_warps=8)


@population_op("pair_features")
def _pair(x: Tensor, attr: Tensor, dtype: torch.dtype) -> Tensor:
    nodes, dims = x.shape[-2:]
    attrs = attr.shape[-1]
    x, attr = x.contiguous(), attr.contiguous()
    geo = x.new_empty(*x.shape[:-1], nodes, attrs + 1, dtype=dtype)
    edges = geo.numel() // (attrs + 1)
    if edges:
        _pair_kernel[_grid(edges)](x, attr, geo, edges, nodes, dims, attrs, BD=triton.next_power_of_2(dims),
                                   BA=triton.next_power_of_2(attrs + 1), BLOCK=BLOCK, num_warps=8)
    return geo


@_pair.register_fake
def _(x, attr, dtype):
    return x.new_empty(*x.shape[:-1], x.shape[-2], attr.shape[-1] + 1, dtype=dtype)


@population_op("pair_features_backward")
def _pair_backward(x: Tensor, ggeo: Tensor) -> Tensor:
    x, ggeo = x.contiguous(), ggeo.contiguous()
    dx = torch.empty_like(x)
    _per_point(_pair_backward_kernel, x, ggeo, dx, extra=(ggeo.shape[-1] - 1,))
    return dx


@_pair_backward.register_fake
def _(x, ggeo):
    return torch.empty_like(x)


def _pair_setup(ctx, inputs, output) -> None:
    x, attr, _ = inputs
    ctx.save_for_backward(x)
    ctx.attr_dtype = attr.dtype


def _pair_grad(ctx, ggeo: Tensor):
    (x,) = ctx.saved_tensors
    dx = _pair_backward(x, ggeo) if ctx.needs_input_grad[0] else None
    dattr = ggeo[..., 1:].to(ctx.attr_dtype) if ctx.needs_input_grad[1] else None
    return dx, dattr, None


_pair.register_autograd(_pair_grad, setup_context=_pair_setup)


@population_op("coordinate_step")
def _step(x: Tensor, c: Tensor) -> Tensor:
    x, c = x.contiguous(), c.contiguous()
    step = torch.empty_like(x)
    _per_point(_step_kernel, x, c, step)
    return step


@_step.register_fake
def _(x, c):
    return torch.empty_like(x)


@population_op("coordinate_step_backward")
def _step_backward(x: Tensor, c: Tensor, gs: Tensor) -> list[Tensor]:
    x, c, gs = x.contiguous(), c.contiguous(), gs.contiguous()
    dx, dc = torch.empty_like(x), torch.empty_like(c)
    _per_point(_step_backward_kernel, x, c, gs, dx, dc)
    return [dx, dc]


@_step_backward.register_fake
def _(x, c, gs):
    return [torch.empty_like(x), torch.empty_like(c)]


def _step_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _step_grad(ctx, gs: Tensor):
    x, c = ctx.saved_tensors
    dx, dc = _step_backward(x, c, gs.to(x.dtype))
    return dx, dc


_step.register_autograd(_step_grad, setup_context=_step_setup)


def pair_reference(x: Tensor, attr: Tensor) -> Tensor:
    """geo [..., n, n, 1 + A] = [|x_i - x_j|^2, attr_ij] as torch ops, for x [..., n, D] and attr [..., n, n, A]."""
    diff = x[..., :, None, :] - x[..., None, :, :]
    return torch.cat([(diff * diff).sum(-1, keepdim=True), attr.to(x.dtype)], -1)


def step_reference(x: Tensor, c: Tensor) -> Tensor:
    """step [..., n, D]: sum_{j != i} (x_i - x_j) / (|x_i - x_j| + 1) c_ij / (n - 1) as torch ops, c [..., n, n, 1]."""
    n = x.shape[-2]
    diff = x[..., :, None, :] - x[..., None, :, :]
    off = 1.0 - torch.eye(n, dtype=c.dtype, device=c.device)[..., None]  # no self-messages
    dist = ((diff * diff).sum(-1, keepdim=True) + (1.0 - off)).sqrt()  # 1 on the diagonal: sqrt(0)'s gradient is NaN
    return (diff / (dist + 1.0) * (c * off)).sum(-2) / (n - 1)


def _check(x: Tensor, edge: Tensor, name: str, width: int | None) -> None:
    """x [..., n, D] and an edge tensor `name` [..., n, n, width] (any width when None) in the kernels' limits."""
    n = x.shape[-2] if x.dim() >= 2 else 0
    if x.dim() < 2 or tuple(edge.shape[:-1]) != (*x.shape[:-1], n) or (width is not None and edge.shape[-1] != width):
        form = f"{name} [..., n, n, {width or 'A'}]"
        raise ValueError(f"x [..., n, D] and {form} disagree: x {tuple(x.shape)}, {name} {tuple(edge.shape)}")
    if not fits(n, x.shape[-1], edge.shape[-1] if width is None else 0):
        raise ValueError(f"pair geometry here takes 2 points or more of 1 to {MAX_DIMS} coordinates and up to "
                         f"{MAX_ATTRS} edge attributes: got {n} points of {x.shape[-1]}"
                         + (f", {edge.shape[-1]} attributes" if width is None else ""))


def pair_features(x: Tensor, attr: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """`pair_reference` on the kernels: geo [..., n, n, 1 + A] in `dtype` (x's by default), computed in float32;
    gradients to x and attr."""
    _check(x, attr, "attr", None)
    return _pair(x, attr, dtype or x.dtype)


def coordinate_step(x: Tensor, c: Tensor) -> Tensor:
    """`step_reference` on the kernels: the step [..., n, D] in x's dtype, computed in float32; gradients to x and
    c (in their dtypes)."""
    _check(x, c, "c", 1)
    return _step(x, c)


__all__ = ["MAX_ATTRS", "MAX_DIMS", "available", "coordinate_step", "fits", "pair_features",
           "pair_reference", "step_reference"]
