"""Messages of an edge MLP on fully connected graphs, summed at each node, as Triton kernels: a population's EGNN
layers (Satorras et al. 2021, eqs. 3-5) without their edge tensors.

For each graph of n nodes (every ordered pair i != j an edge) and the model's weights:

  pre_ij = s_i + d_j + geo_ij @ wg^T          s, d [n, H]: the edge MLP's first linear of h_i and of h_j
  m_ij   = act(act(pre_ij) @ w2^T + b2)       zero for i == j (no self-messages)
  msum_i = sum_j m_ij
  c_ij   = act(m_ij @ wc^T + bc) @ wo^T       each edge's coordinate weight (optional; its diagonal is the caller's)

Written as torch ops (`reference`, the architecture's own forward) each [graphs, n, n, H] edge tensor is written and
read back: the pre-activation's sums, each linear's output, each activation, the mask's product, and as many again
in the backward; a population's EGNN steps at the memory's speed over those n x node-sized tensors. Here a program
holds a tile of whole graphs' edges in registers (128 rows (graph, i, j), j innermost), runs the edge MLP's products
on tensor cores, sums the rows at their nodes as a product with a one-hot [nodes, rows] matrix (the segments are n
rows, which no reshape of a power-of-two tile cuts), and writes only msum and c; the backward recomputes the edges
from s, d and geo and writes the gradients of s and d (their sums over j and over i, the same products), of geo,
and each model's weight gradients as float32 partials a program. Products take s's dtype (bf16 on tensor cores;
float32 exactly), everything else float32 but the backward's recomputed edges, held in s's dtype; msum and c are
stored in s's dtype.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from zoos.popconv.common import INPUT_ACTIVATIONS, available, dot_precision, population_op, triton
from zoos.poplinear import _programs

MAX_NODES = 16  # the most nodes a graph may have here: a program holds a graph's padded n x n edges
MAX_HIDDEN = 64  # the widest hidden layer: [rows, H] float32 tiles in registers
# float32 products (exact, on FMA units) stage their operands in shared memory: 64-wide tiles would need more than an
# H100's 227 KB a program
MAX_HIDDEN_FLOAT32 = 32
MAX_EDGE_FEATURES = 16

if triton is not None:
    import triton.language as tl

    from zoos.popconv.common import _act_grad_from_input, _activate_any

    @triton.jit
    def _weight(ptr, m, r, c, R, C, ROW_STRIDE, COL_STRIDE):
        """Model m's [R, C] weight block (zero past it) of a [models, R * C] tensor, element (r, c) at
        r * ROW_STRIDE + c * COL_STRIDE: a transposed view by the strides."""
        at = m.to(tl.int64) * R * C + r[:, None] * ROW_STRIDE + c[None, :] * COL_STRIDE
        return tl.load(ptr + at, mask=(r < R)[:, None] & (c < C)[None, :], other=0.0)

    @triton.jit
    def _tile(m, t, n, GB, B, R: tl.constexpr):
        """Tile t of model m: (node0, r, i, j, ok): its rows r the edges (graph, i, j) of its GB whole graphs, j
        innermost, the first graph's first node at row node0 of the node tensors (its first edge at node0 * n of the
        edge tensors: row r is edge node0 * n + r); `ok` the rows of real graphs (self-pairs included). Offsets
        within a tile are int32, the tile's base int64."""
        # adding t >> 30 (zero: t < 2**30) makes the rows' offsets depend on t, so that a loop over tiles recomputes
        # them each iteration rather than holding tile-sized offsets and masks in registers across it
        r = tl.arange(0, R) + (t >> 30)
        nn = n * n
        graphs = tl.minimum(GB, B - t * GB)
        return (m.to(tl.int64) * B + t * GB) * n, r, (r // n) % n, r % n, r < graphs * nn

    @triton.jit
    def _rows_of(ptr, at, ok, h, H):
        """The [rows, BH] tile of rows `at` of a [.., H] tensor (ptr at the tile's first row), zero past H and where
        not ok."""
        return tl.load(ptr + at[:, None] * H + h[None, :], mask=ok[:, None] & (h < H)[None, :], other=0.0)

    @triton.jit
    def _geo(geo_ptr, edge0, r, ok, G, BG: tl.constexpr):
        """The tile's edge features [rows, BG] (zero past G), in their dtype."""
        q = tl.arange(0, BG)
        return tl.load(geo_ptr + edge0 * G + r[:, None] * G + q[None, :], mask=ok[:, None] & (q < G)[None, :],
                       other=0.0)

    @triton.jit
    def _edges(s_ptr, d_ptr, geo_ptr, wg_ptr, w2_ptr, b2_ptr, m, node0, r, i, j, ok, h, n, H, G,
               BG: tl.constexpr, ACT: tl.constexpr, SLOPE: tl.constexpr, PREC: tl.constexpr):
        """A tile's edges: (pre, e = act(pre) @ w2^T + b2, m = act(e) masked) in float32."""
        dt = s_ptr.dtype.element_ty
        s = _rows_of(s_ptr + node0 * H, r // n, ok, h, H)
        d = _rows_of(d_ptr + node0 * H, (r // (n * n)) * n + j, ok, h, H)
        geo = _geo(geo_ptr, node0 * n, r, ok, G, BG)
        wgt = _weight(wg_ptr, m, tl.arange(0, BG), h, G, H, 1, G)  # [BG, BH]: wg^T
        pre = s.to(tl.float32) + d.to(tl.float32) + tl.dot(geo.to(dt), wgt.to(dt), input_precision=PREC)
        w2t = _weight(w2_ptr, m, h, h, H, H, 1, H)  # [in, out]: w2^T
        b2 = tl.load(b2_ptr + m.to(tl.int64) * H + h, mask=h < H, other=0.0).to(tl.float32)
        e = tl.dot(_activate_any(pre, ACT, SLOPE).to(dt), w2t.to(dt), input_precision=PREC) + b2[None, :]
        msg = _activate_any(e, ACT, SLOPE) * (ok & (i != j)).to(tl.float32)[:, None]
        return pre, e, msg

    @triton.jit
    def _node_sums(x, group, k, dt: tl.constexpr, PREC: tl.constexpr):
        """[KP, BH]: row k the sum of x's rows r (a tile's edges) with group[r] == k, as a product with the one-hot
        [KP, rows] (the groups are nodes: a row's (graph, i) or (graph, j), segments tl.reshape cannot cut)."""
        onehot = (group[None, :] == k[:, None]).to(dt)
        return tl.dot(onehot, x.to(dt), input_precision=PREC)

    @triton.jit
    def _side_by_side(x, y):
        """[rows, 2 * C]: x's columns, then y's."""
        return tl.reshape(tl.permute(tl.join(x, y), (0, 2, 1)), (x.shape[0], 2 * x.shape[1]))

    @triton.jit
    def _store_block(ptr, acc, at, H):
        """acc's rows and columns `at` (where 0 <= at < H) as an [H, H] float32 tensor at ptr."""
        inside = (at >= 0) & (at < H)
        tl.store(ptr + at[:, None] * H + at[None, :], acc, mask=inside[:, None] & inside[None, :])

    @triton.jit
    def _forward_kernel(s_ptr, d_ptr, geo_ptr, wg_ptr, w2_ptr, b2_ptr, wc_ptr, bc_ptr, wo_ptr, msum_ptr, c_ptr,
                        B, n, H, G, GB, COORD: tl.constexpr, R: tl.constexpr, KP: tl.constexpr, BH: tl.constexpr,
                        BG: tl.constexpr, ACT: tl.constexpr, SLOPE: tl.constexpr, PREC: tl.constexpr):
        t, m = tl.program_id(0), tl.program_id(1)
        dt = s_ptr.dtype.element_ty
        node0, r, i, j, ok = _tile(m, t, n, GB, B, R)
        h = tl.arange(0, BH)
        hm = h < H
        _, _, msg = _edges(s_ptr, d_ptr, geo_ptr, wg_ptr, w2_ptr, b2_ptr, m, node0, r, i, j, ok, h, n, H, G, BG, ACT,
                           SLOPE, PREC)
        k = tl.arange(0, KP)  # the tile's nodes, (graph, i)
        total = _node_sums(msg, r // n, k, dt, PREC)
        k_ok = (k < tl.minimum(GB, B - t * GB) * n)[:, None] & hm[None, :]
        tl.store(msum_ptr + node0 * H + k[:, None] * H + h[None, :], total.to(dt), mask=k_ok)
        if COORD:
            wct = _weight(wc_ptr, m, h, h, H, H, 1, H)
            bc = tl.load(bc_ptr + m.to(tl.int64) * H + h, mask=hm, other=0.0).to(tl.float32)
            wo = tl.load(wo_ptr + m.to(tl.int64) * H + h, mask=hm, other=0.0).to(tl.float32)
            u = tl.dot(msg.to(dt), wct.to(dt), input_precision=PREC) + bc[None, :]
            c = tl.sum(_activate_any(u, ACT, SLOPE) * wo[None, :], axis=1)
            tl.store(c_ptr + node0 * n + r, c.to(dt), mask=ok)

    @triton.jit
    def _backward_kernel(s_ptr, d_ptr, geo_ptr, wg_ptr, w2_ptr, b2_ptr, wc_ptr, bc_ptr, wo_ptr, gm_ptr, gc_ptr,
                         ds_ptr, dd_ptr, dgeo_ptr, dwg_ptr, dw2_ptr, db2_ptr, dwc_ptr, dbc_ptr, dwo_ptr,
                         B, n, H, G, GB, EACH, PROGRAMS, COORD: tl.constexpr, R: tl.constexpr, KP: tl.constexpr,
                         BH: tl.constexpr, BG: tl.constexpr, ACT: tl.constexpr, SLOPE: tl.constexpr,
                         PREC: tl.constexpr):
        """Tiles prog * EACH .. of model m: the edges recomputed, the gradients of s, d and geo stored, the weights'
        summed into float32 partials [models, PROGRAMS, ...]. Products over a tile's rows run with 64 result rows or
        more (tensor cores' warp-group products; with 32 rows every warp would hold the whole [rows, H] operand):
        the node sums over j and over i as one product, and below 64 hidden units the two hidden weights' gradients
        as one twice as wide, its off-diagonal blocks unused. The edges are held in the products' dtype."""
        prog, m = tl.program_id(0), tl.program_id(1)
        dt = s_ptr.dtype.element_ty
        h = tl.arange(0, BH)
        hm = h < H
        q = tl.arange(0, BG)
        k2 = tl.arange(0, 2 * KP)  # the tile's nodes twice: (graph, i) for the sums over j, then (graph, j) over i
        k = tl.where(k2 < KP, k2, k2 - KP)
        w2 = _weight(w2_ptr, m, h, h, H, H, H, 1).to(dt)  # [out, in]
        wg = _weight(wg_ptr, m, h, q, H, G, G, 1).to(dt)  # [H, BG]
        acc_w2 = tl.zeros((BH, BH), dtype=tl.float32)
        acc_b2 = tl.zeros((BH,), dtype=tl.float32)
        acc_wg = tl.zeros((BH, BG), dtype=tl.float32)
        acc_wc = tl.zeros((BH, BH), dtype=tl.float32)
        acc_2 = tl.zeros((2 * BH, 2 * BH), dtype=tl.float32)  # [w2 | wc] while BH < 64
        acc_bc = tl.zeros((BH,), dtype=tl.float32)
        acc_wo = tl.zeros((BH,), dtype=tl.float32)
        for t in range(prog * EACH, tl.minimum(prog * EACH + EACH, tl.cdiv(B, GB))):
            node0, r, i, j, ok = _tile(m, t, n, GB, B, R)
            pre, e, msg = _edges(s_ptr, d_ptr, geo_ptr, wg_ptr, w2_ptr, b2_ptr, m, node0, r, i, j, ok, h, n, H, G, BG,
                                 ACT, SLOPE, PREC)
            pre, e, msg = pre.to(dt), e.to(dt), msg.to(dt)
            dm = _rows_of(gm_ptr + node0 * H, r // n, ok, h, H).to(tl.float32)
            if COORD:
                wc = _weight(wc_ptr, m, h, h, H, H, H, 1).to(dt)  # [out, in]
                bc = tl.load(bc_ptr + m.to(tl.int64) * H + h, mask=hm, other=0.0).to(tl.float32)
                wo = tl.load(wo_ptr + m.to(tl.int64) * H + h, mask=hm, other=0.0).to(tl.float32)
                gc = tl.load(gc_ptr + node0 * n + r, mask=ok, other=0.0).to(tl.float32)
                u = tl.dot(msg, tl.trans(wc), input_precision=PREC) + bc[None, :]
                acc_wo += tl.sum(gc[:, None] * _activate_any(u, ACT, SLOPE), axis=0)
                du = gc[:, None] * wo[None, :] * _act_grad_from_input(u, ACT, SLOPE)
                acc_bc += tl.sum(du, axis=0)
                dm += tl.dot(du.to(dt), wc, input_precision=PREC)
            de = dm * (ok & (i != j)).to(tl.float32)[:, None] * _act_grad_from_input(e.to(tl.float32), ACT, SLOPE)
            acc_b2 += tl.sum(de, axis=0)
            a = _activate_any(pre.to(tl.float32), ACT, SLOPE).to(dt)
            if COORD and BH < 64:
                acc_2 += tl.dot(tl.trans(_side_by_side(de.to(dt), du.to(dt))), _side_by_side(a, msg),
                                input_precision=PREC)
            else:
                acc_w2 += tl.dot(tl.trans(de.to(dt)), a, input_precision=PREC)
                if COORD:
                    acc_wc += tl.dot(tl.trans(du.to(dt)), msg, input_precision=PREC)
            dpre = tl.dot(de.to(dt), w2, input_precision=PREC) * _act_grad_from_input(pre.to(tl.float32), ACT, SLOPE)
            dpre = dpre * ok.to(tl.float32)[:, None]  # a padded row's act'(pre) times nothing, kept out of the sums
            geo = _geo(geo_ptr, node0 * n, r, ok, G, BG)  # read again (a cache hit) rather than held in registers
            acc_wg += tl.dot(tl.trans(dpre.to(dt)), geo.to(dt), input_precision=PREC)
            dgeo = tl.dot(dpre.to(dt), wg, input_precision=PREC)
            tl.store(dgeo_ptr + node0 * n * G + r[:, None] * G + q[None, :], dgeo.to(dgeo_ptr.dtype.element_ty),
                     mask=ok[:, None] & (q < G)[None, :])
            node = tl.where(k2[:, None] < KP, (r // n)[None, :], ((r // (n * n)) * n + j)[None, :])
            sums = tl.dot((node == k[:, None]).to(dt), dpre.to(dt), input_precision=PREC)  # [ds; dd]
            k_ok = (k < tl.minimum(GB, B - t * GB) * n)[:, None] & hm[None, :]
            tl.store(tl.where(k2 < KP, ds_ptr, dd_ptr)[:, None] + node0 * H + k[:, None] * H + h[None, :],
                     sums.to(dt), mask=k_ok)
        part = m.to(tl.int64) * PROGRAMS + prog
        h2 = tl.arange(0, 2 * BH)
        if COORD and BH < 64:
            _store_block(dw2_ptr + part * H * H, acc_2, h2, H)
            _store_block(dwc_ptr + part * H * H, acc_2, h2 - BH, H)
        else:
            _store_block(dw2_ptr + part * H * H, acc_w2, h, H)
            if COORD:
                _store_block(dwc_ptr + part * H * H, acc_wc, h, H)
        tl.store(db2_ptr + part * H + h, acc_b2, mask=hm)
        tl.store(dwg_ptr + part * H * G + h[:, None] * G + q[None, :], acc_wg, mask=hm[:, None] & (q < G)[None, :])
        if COORD:
            tl.store(dbc_ptr + part * H + h, acc_bc, mask=hm)
            tl.store(dwo_ptr + part * H + h, acc_wo, mask=hm)


def max_hidden(dtype: torch.dtype) -> int:
    """The widest hidden layer that runs here with data of `dtype`."""
    return MAX_HIDDEN_FLOAT32 if dtype == torch.float32 else MAX_HIDDEN


def fits(nodes: int, hidden: int, edge_features: int, activation: str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether layers of these sizes run here with data of `dtype`."""
    return (2 <= nodes <= MAX_NODES and 1 <= hidden <= max_hidden(dtype) and 1 <= edge_features <= MAX_EDGE_FEATURES
            and activation in INPUT_ACTIVATIONS)


def _sizes(nodes: int, hidden: int, edge_features: int) -> tuple[int, dict]:
    """(GB, the kernels' block constexprs): a tile's rows R (128, or one graph's edges padded to a power of two) hold
    GB whole graphs; KP their nodes padded, BH and BG the widths, each at least tl.dot's 16."""
    rows = max(128, triton.next_power_of_2(nodes * nodes))
    graphs = rows // (nodes * nodes)
    return graphs, {"R": rows, "KP": max(16, triton.next_power_of_2(graphs * nodes)),
                    "BH": max(16, triton.next_power_of_2(hidden)), "BG": max(16, triton.next_power_of_2(edge_features))}


def _warps(sizes: dict) -> int:
    """Warps a program: 8 for a tile of 128 rows of 32 (4 would spill the forward's registers for sm_90), 4 below."""
    return 8 if sizes["R"] * sizes["BH"] >= 128 * 32 else 4


@population_op("edge_messages")
def _messages(s: Tensor, d: Tensor, geo: Tensor, wg: Tensor, w2: Tensor, b2: Tensor, wc: Tensor | None,
              bc: Tensor | None, wo: Tensor | None, act: str, slope: float) -> list[Tensor]:
    models, hidden, edge_features = wg.shape
    nodes = s.shape[-2]
    graphs = s.numel() // (hidden * nodes * models)
    per_tile, sizes = _sizes(nodes, hidden, edge_features)
    s, d, geo = s.contiguous(), d.contiguous(), geo.contiguous()
    msum = torch.empty_like(s)
    c = s.new_empty(*s.shape[:-1], nodes, 1)
    coord = wc is not None
    w = [t.contiguous() if t is not None else wg for t in (wg, w2, b2, wc, bc, wo)]
    if msum.numel():
        _forward_kernel[(triton.cdiv(graphs, per_tile), models)](
            s, d, geo, *w, msum, c, graphs, nodes, hidden, edge_features, per_tile, COORD=coord, ACT=act, SLOPE=slope,
            PREC=dot_precision(s.dtype), num_warps=_warps(sizes), **sizes)
    return [msum, c]


@_messages.register_fake
def _(s, d, geo, wg, w2, b2, wc, bc, wo, act, slope):
    return [torch.empty_like(s), s.new_empty(*s.shape[:-1], s.shape[-2], 1)]


@population_op("edge_messages_backward")
def _messages_backward(s: Tensor, d: Tensor, geo: Tensor, wg: Tensor, w2: Tensor, b2: Tensor, wc: Tensor | None,
                       bc: Tensor | None, wo: Tensor | None, gm: Tensor, gc: Tensor, act: str,
                       slope: float) -> list[Tensor]:
    """[ds, dd, dgeo, dwg, dw2, db2] (+ [dwc, dbc, dwo] with the coordinate weights): the inputs' gradients in their
    dtypes, the weights' float32."""
    models, hidden, edge_features = wg.shape
    nodes = s.shape[-2]
    graphs = s.numel() // (hidden * nodes * models)
    per_tile, sizes = _sizes(nodes, hidden, edge_features)
    s, d, geo, gm, gc = (t.contiguous() for t in (s, d, geo, gm, gc))
    programs, each = _programs(triton.cdiv(graphs, per_tile), models, s.device, least=8)
    ds, dd, dgeo = torch.empty_like(s), torch.empty_like(d), torch.empty_like(geo)
    f32 = dict(dtype=torch.float32, device=s.device)
    dwg = torch.zeros(models, programs, hidden, edge_features, **f32)
    dw2 = torch.zeros(models, programs, hidden, hidden, **f32)
    db2 = torch.zeros(models, programs, hidden, **f32)
    coord = wc is not None
    dwc = torch.zeros(models, programs, hidden, hidden, **f32) if coord else dw2
    dbc = torch.zeros(models, programs, hidden, **f32) if coord else db2
    dwo = torch.zeros(models, programs, hidden, **f32) if coord else db2
    w = [t.contiguous() if t is not None else wg for t in (wg, w2, b2, wc, bc, wo)]
    if s.numel():
        _backward_kernel[(programs, models)](
            s, d, geo, *w, gm, gc, ds, dd, dgeo, dwg, dw2, db2, dwc, dbc, dwo, graphs, nodes, hidden, edge_features,
            per_tile, each, programs, COORD=coord, ACT=act, SLOPE=slope, PREC=dot_precision(s.dtype),
            num_warps=_warps(sizes),
            **sizes)
    else:
        ds.zero_(), dd.zero_(), dgeo.zero_()
    out = [ds, dd, dgeo, dwg.sum(1), dw2.sum(1), db2.sum(1)]
    return out + ([dwc.sum(1), dbc.sum(1), dwo.sum(1).unsqueeze(1)] if coord else [])


@_messages_backward.register_fake
def _(s, d, geo, wg, w2, b2, wc, bc, wo, gm, gc, act, slope):
    f32 = dict(dtype=torch.float32)
    out = [torch.empty_like(s), torch.empty_like(d), torch.empty_like(geo), wg.new_empty(wg.shape, **f32),
           w2.new_empty(w2.shape, **f32), b2.new_empty(b2.shape, **f32)]
    if wc is None:
        return out
    return out + [wc.new_empty(wc.shape, **f32), bc.new_empty(bc.shape, **f32), wo.new_empty(wo.shape, **f32)]


def _setup(ctx, inputs, output) -> None:
    s, d, geo, wg, w2, b2, wc, bc, wo, act, slope = inputs
    ctx.save_for_backward(s, d, geo, wg, w2, b2, wc, bc, wo)
    ctx.act = (act, slope)


def _backward(ctx, grads: list[Tensor | None]):
    s, d, geo, wg, w2, b2, wc, bc, wo = ctx.saved_tensors
    gm, gc = grads
    gm = torch.zeros_like(s) if gm is None else gm
    gc = torch.zeros(*s.shape[:-1], s.shape[-2], 1, dtype=s.dtype, device=s.device) if gc is None else gc
    grads = _messages_backward(s, d, geo, wg, w2, b2, wc, bc, wo, gm.to(s.dtype), gc.to(s.dtype), *ctx.act)
    ds, dd, dgeo, dwg, dw2, db2 = grads[:6]
    weights = [dwg.to(wg.dtype), dw2.to(w2.dtype), db2.to(b2.dtype)]
    weights += [g.to(t.dtype) for g, t in zip(grads[6:], (wc, bc, wo))] if wc is not None else [None] * 3
    return (ds, dd, dgeo.to(geo.dtype), *weights, None, None)


_messages.register_autograd(_backward, setup_context=_setup)


@functools.cache
def _torch_activation(act: str, slope: float) -> Callable[[Tensor], Tensor]:
    return {"identity": lambda x: x, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": F.relu, "silu": F.silu,
            "leaky_relu": lambda x: F.leaky_relu(x, slope), "gelu": F.gelu,
            "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[act]


def reference(s: Tensor, d: Tensor, geo: Tensor, wg: Tensor, w2: Tensor, b2: Tensor | None, wc: Tensor | None,
              bc: Tensor | None, wo: Tensor | None, act: str, slope: float = 0.0,
              linear: Callable = F.linear) -> tuple[Tensor, Tensor | None]:
    """(msum, c) as torch ops: one model's layer (`linear` F.linear, weights [out, in]), or a population's
    (`fastpop.pop_linear`, weights [N, out, in], the data's rows N*B)."""
    f = _torch_activation(act, slope)
    n = s.shape[-2]
    off = 1.0 - torch.eye(n, dtype=s.dtype, device=s.device)[..., None]  # no self-messages
    pre = s[..., :, None, :] + d[..., None, :, :] + linear(geo, wg, None)
    msg = f(linear(f(pre), w2, b2)) * off
    c = linear(f(linear(msg, wc, bc)), wo, None) if wc is not None else None
    return msg.sum(-2), c


def messages(s: Tensor, d: Tensor, geo: Tensor, wg: Tensor, w2: Tensor, b2: Tensor, wc: Tensor | None,
             bc: Tensor | None, wo: Tensor | None, act: str, slope: float = 0.0) -> tuple[Tensor, Tensor | None]:
    """A population's (msum, c) on the kernels: s, d [N*B, n, H], geo [N*B, n, n, G] (the data's rows, model by
    model), wg [N, H, G], w2 [N, H, H], b2 [N, H]; the coordinate weights wc [N, H, H], bc [N, H], wo [N, 1, H], or
    all three None (no c). msum [N*B, n, H] and c [N*B, n, n, 1] in s's dtype (the weights cast to it as they are
    read); gradients to every tensor."""
    models, hidden, features = wg.shape
    n = s.shape[-2]
    if (d.shape != s.shape or s.shape[-1] != hidden or tuple(geo.shape) != (*s.shape[:-1], n, features)
            or w2.shape != (models, hidden, hidden) or b2.shape != (models, hidden)):
        raise ValueError(f"s, d [N*B, n, H], geo [N*B, n, n, G], wg [N, H, G], w2 [N, H, H], b2 [N, H] disagree: "
                         f"s {tuple(s.shape)}, d {tuple(d.shape)}, geo {tuple(geo.shape)}, wg {tuple(wg.shape)}, "
                         f"w2 {tuple(w2.shape)}, b2 {tuple(b2.shape)}")
    if (wc is None) != (bc is None) or (wc is None) != (wo is None) or (
            wc is not None and (wc.shape != w2.shape or bc.shape != b2.shape or wo.shape != (models, 1, hidden))):
        raise ValueError("the coordinate weights wc [N, H, H], bc [N, H], wo [N, 1, H] come together or not at all")
    if not fits(n, hidden, features, act, s.dtype):
        raise ValueError(f"messages here take 2 to {MAX_NODES} nodes, up to {max_hidden(s.dtype)} hidden (in "
                         f"{s.dtype}) and {MAX_EDGE_FEATURES} edge features, an activation of "
                         f"{', '.join(INPUT_ACTIVATIONS)}: got {n} nodes, {hidden} hidden, {features} edge features, "
                         f"{act!r}")
    if s.numel() % (models * n * hidden):
        raise ValueError(f"s has {s.numel() // (n * hidden)} graphs, not a multiple of the population size {models}")
    msum, c = _messages(s, d.to(s.dtype), geo, wg, w2, b2, wc, bc, wo, act, float(slope))
    return msum, (c if wc is not None else None)


__all__ = ["MAX_EDGE_FEATURES", "MAX_HIDDEN", "MAX_HIDDEN_FLOAT32", "MAX_NODES", "available", "fits", "max_hidden",
           "messages", "reference"]
