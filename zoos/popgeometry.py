"""The pair geometry of an EGNN layer (Satorras et al. 2021, eqs. 3-4) on fully connected graphs, as Triton kernels:
each graph's edge features from its points, and the coordinate step its edges' weights make.

For each graph of n points x [n, D] (every ordered pair i != j an edge):

  geo_ij  = [|x_i - x_j|^2, attr_ij]                                     the edge MLP's input features
  step_i  = sum_{j != i} (x_i - x_j) / (|x_i - x_j| + 1) * c_ij / (n - 1)  the points' update from c [n, n, 1]

Written as torch ops (`pair_reference`, `step_reference`: the architecture's own forward) each is a chain of
broadcasting ops on [graphs, n, n, D] edge tensors (the differences, their squares and sums, the concatenation, the
distances, the quotient, the products and the sums over j), about a dozen launches a layer forward and twice as
many backward, each a pass over an edge tensor. Here a program holds a block of whole graphs as [graphs, n, n] tiles
(points padded to a power of two), one coordinate at a time, computes in float32 and writes only what the op
returns: geo in the caller's dtype, the step in x's; the backwards recompute the differences and write the points'
gradient (each edge's sum over j, less its sum over i) and c's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zoos.popconv.common import available, population_op, triton

MAX_NODES = 64  # a program holds at least one graph's padded n x n edges
MAX_DIMS = 16  # coordinates a point, unrolled in the kernels
MAX_ATTRS = 15  # edge attributes besides the squared distance

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _block(G, n, NP: tl.constexpr, BLOCK: tl.constexpr):
        """This program's graphs g [BLOCK, 1, 1] (their first point at g * n), points i [1, NP, 1] and j [1, 1, NP]:
        (node0, i, j, rows_i, rows_j, edges) with the masks of real points i, j and of real edges."""
        g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)[:, None, None]
        i = tl.arange(0, NP)[None, :, None]
        j = tl.arange(0, NP)[None, None, :]
        node0 = g.to(tl.int64) * n
        return node0, i, j, (g < G) & (i < n), (g < G) & (j < n), (g < G) & (i < n) & (j < n)

    @triton.jit
    def _points(G, n, NP: tl.constexpr, BLOCK: tl.constexpr):
        """This program's points as [BLOCK, NP]: (their rows in x, the real ones)."""
        g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)[:, None]
        i = tl.arange(0, NP)[None, :]
        return g.to(tl.int64) * n + i, (g < G) & (i < n)

    @triton.jit
    def _diff(x_ptr, node0, i, j, ok_i, ok_j, k, D: tl.constexpr):
        """x_i - x_j of coordinate k, [BLOCK, NP, NP] float32 (zero at padding)."""
        xi = tl.load(x_ptr + (node0 + i) * D + k, mask=ok_i, other=0.0).to(tl.float32)
        xj = tl.load(x_ptr + (node0 + j) * D + k, mask=ok_j, other=0.0).to(tl.float32)
        return xi - xj

    @triton.jit
    def _squared(x_ptr, node0, i, j, ok_i, ok_j, D: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
        d2 = tl.zeros((BLOCK, NP, NP), dtype=tl.float32)
        for k in tl.static_range(D):
            diff = _diff(x_ptr, node0, i, j, ok_i, ok_j, k, D)
            d2 += diff * diff
        return d2

    @triton.jit
    def _pair_kernel(x_ptr, a_ptr, geo_ptr, G, n, D: tl.constexpr, A: tl.constexpr, NP: tl.constexpr,
                     BLOCK: tl.constexpr):
        node0, i, j, ok_i, ok_j, ok = _block(G, n, NP, BLOCK)
        edge = (node0 + i) * n + j
        d2 = _squared(x_ptr, node0, i, j, ok_i, ok_j, D, NP, BLOCK)
        out = geo_ptr.dtype.element_ty
        tl.store(geo_ptr + edge * (A + 1), d2.to(out), mask=ok)
        for k in tl.static_range(A):
            a = tl.load(a_ptr + edge * A + k, mask=ok, other=0.0)
            tl.store(geo_ptr + edge * (A + 1) + 1 + k, a.to(out), mask=ok)

    @triton.jit
    def _pair_backward_kernel(x_ptr, gg_ptr, dx_ptr, G, n, D: tl.constexpr, A: tl.constexpr, NP: tl.constexpr,
                              BLOCK: tl.constexpr):
        """dx_i = 2 sum_j (g_ij + g_ji) (x_i - x_j), g the squared distances' gradient (geo's column 0)."""
        node0, i, j, ok_i, ok_j, ok = _block(G, n, NP, BLOCK)
        g = tl.load(gg_ptr + ((node0 + i) * n + j) * (A + 1), mask=ok, other=0.0).to(tl.float32)
        g += tl.load(gg_ptr + ((node0 + j) * n + i) * (A + 1), mask=ok, other=0.0).to(tl.float32)
        node_i, ok_node = _points(G, n, NP, BLOCK)
        for k in tl.static_range(D):
            dx = 2.0 * tl.sum(g * _diff(x_ptr, node0, i, j, ok_i, ok_j, k, D), axis=2)
            tl.store(dx_ptr + node_i * D + k, dx.to(dx_ptr.dtype.element_ty), mask=ok_node)

    @triton.jit
    def _weights(x_ptr, c_ptr, node0, i, j, ok_i, ok_j, ok, n, D: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
        """(c masked off the diagonal, 1 / (|x_i - x_j| + 1) / (n - 1), |x_i - x_j|) in float32; the distance is 1 on
        the diagonal (as the torch ops make it)."""
        c = tl.load(c_ptr + (node0 + i) * n + j, mask=ok & (i != j), other=0.0).to(tl.float32)
        dist = tl.sqrt(_squared(x_ptr, node0, i, j, ok_i, ok_j, D, NP, BLOCK) + (i == j).to(tl.float32))
        return c, 1.0 / ((dist + 1.0) * (n - 1)), dist

    @triton.jit
    def _step_kernel(x_ptr, c_ptr, step_ptr, G, n, D: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
        node0, i, j, ok_i, ok_j, ok = _block(G, n, NP, BLOCK)
        c, inv, _ = _weights(x_ptr, c_ptr, node0, i, j, ok_i, ok_j, ok, n, D, NP, BLOCK)
        coef = c * inv
        node_i, ok_node = _points(G, n, NP, BLOCK)
        for k in tl.static_range(D):
            step = tl.sum(coef * _diff(x_ptr, node0, i, j, ok_i, ok_j, k, D), axis=2)
            tl.store(step_ptr + node_i * D + k, step.to(step_ptr.dtype.element_ty), mask=ok_node)

    @triton.jit
    def _step_backward_kernel(x_ptr, c_ptr, gs_ptr, dx_ptr, dc_ptr, G, n, D: tl.constexpr, NP: tl.constexpr,
                              BLOCK: tl.constexpr):
        """With e_ij = <gs_i, x_i - x_j>: dc_ij = e_ij / (|x_i - x_j| + 1) / (n - 1) off the diagonal, and x's gradient
        dx_m = sum_j G_mj - sum_i G_im of G_ij = coef_ij gs_i + 2 dd2_ij (x_i - x_j), dd2 the gradient of the squared
        distance through the denominator: -e c / (|x_i - x_j| + 1)^2 / (n - 1) / (2 |x_i - x_j|)."""
        node0, i, j, ok_i, ok_j, ok = _block(G, n, NP, BLOCK)
        c, inv, dist = _weights(x_ptr, c_ptr, node0, i, j, ok_i, ok_j, ok, n, D, NP, BLOCK)
        e = tl.zeros((BLOCK, NP, NP), dtype=tl.float32)
        for k in tl.static_range(D):
            gs = tl.load(gs_ptr + (node0 + i) * D + k, mask=ok_i, other=0.0).to(tl.float32)
            e += gs * _diff(x_ptr, node0, i, j, ok_i, ok_j, k, D)
        off = ok & (i != j)
        tl.store(dc_ptr + (node0 + i) * n + j, (e * inv).to(dc_ptr.dtype.element_ty), mask=off)
        # off the edges (the diagonal, the padding) the term is zero, without dividing by their distance
        dd2 = tl.where(off, -e * c * inv * (n - 1) * inv / (2.0 * tl.where(off, dist, 1.0)), 0.0)
        coef = c * inv
        node_i, ok_node = _points(G, n, NP, BLOCK)
        for k in tl.static_range(D):
            gs = tl.load(gs_ptr + (node0 + i) * D + k, mask=ok_i, other=0.0).to(tl.float32)
            grad = coef * gs + 2.0 * dd2 * _diff(x_ptr, node0, i, j, ok_i, ok_j, k, D)
            dx = tl.sum(grad, axis=2) - tl.sum(grad, axis=1)
            tl.store(dx_ptr + node_i * D + k, dx.to(dx_ptr.dtype.element_ty), mask=ok_node)


def fits(nodes: int, dims: int, attrs: int = 0) -> bool:
    """Whether graphs of `nodes` points of `dims` coordinates and `attrs` edge attributes run here."""
    return 2 <= nodes <= MAX_NODES and 1 <= dims <= MAX_DIMS and 0 <= attrs <= MAX_ATTRS


def _launch(kernel, x: Tensor, *args, **constexprs) -> None:
    """Runs a kernel over x [..., n, D]'s graphs, BLOCK whole graphs a program as [BLOCK, NP, NP] tiles of about
    2,048 edges: kernel(x, *args, graphs, n, D=D, NP=NP, BLOCK=BLOCK, **constexprs)."""
    nodes, dims = x.shape[-2:]
    graphs = x.numel() // (nodes * dims)
    if graphs:
        np2 = triton.next_power_of_2(nodes)
        block = max(1, 2048 // (np2 * np2))
        kernel[(triton.cdiv(graphs, block),)](x, *args, graphs, nodes, D=dims, NP=np2, BLOCK=block, num_warps=4,
                                              **constexprs)


@population_op("pair_features")
def _pair(x: Tensor, attr: Tensor, dtype: torch.dtype) -> Tensor:
    nodes, attrs = x.shape[-2], attr.shape[-1]
    x, attr = x.contiguous(), attr.contiguous()
    geo = x.new_empty(*x.shape[:-1], nodes, attrs + 1, dtype=dtype)
    _launch(_pair_kernel, x, attr, geo, A=attrs)
    return geo


@_pair.register_fake
def _(x, attr, dtype):
    return x.new_empty(*x.shape[:-1], x.shape[-2], attr.shape[-1] + 1, dtype=dtype)


@population_op("pair_features_backward")
def _pair_backward(x: Tensor, ggeo: Tensor) -> Tensor:
    x, ggeo = x.contiguous(), ggeo.contiguous()
    dx = torch.empty_like(x)
    _launch(_pair_backward_kernel, x, ggeo, dx, A=ggeo.shape[-1] - 1)
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
    _launch(_step_kernel, x, c, step)
    return step


@_step.register_fake
def _(x, c):
    return torch.empty_like(x)


@population_op("coordinate_step_backward")
def _step_backward(x: Tensor, c: Tensor, gs: Tensor) -> list[Tensor]:
    x, c, gs = x.contiguous(), c.contiguous(), gs.contiguous()
    dx, dc = torch.empty_like(x), torch.zeros_like(c)  # dc's diagonal stays zero
    _launch(_step_backward_kernel, x, c, gs, dx, dc)
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
        raise ValueError(f"pair geometry here takes 2 to {MAX_NODES} points of 1 to {MAX_DIMS} coordinates and up to "
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


__all__ = ["MAX_ATTRS", "MAX_DIMS", "MAX_NODES", "available", "coordinate_step", "fits", "pair_features",
           "pair_reference", "step_reference"]
