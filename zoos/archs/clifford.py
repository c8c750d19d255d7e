"""Clifford group equivariant networks (Ruhe, Brandstetter & Forré, NeurIPS 2023) for O(p,q) / E(d) point tasks.

Features are multivectors of the Clifford algebra Cl(p,q) of the task's metric: tensors [..., C, 2^d] over
the blades, ordered by grade. The group acts on every grade by the outermorphism of its matrix, which
respects grades and the geometric product; so grade-wise linear maps, geometric products, per-grade
normalisation and gates by the (invariant) scalar part are all equivariant, and the network is too.

CliffordAlgebra  blades, the geometric product from a Cayley table (bit operations on blade masks), quadratic form
MVLinear         one nn.Linear per grade mixing channels (bias on the scalar part only)
MVNorm           x_g / (sigmoid(a_g) (|x_g| - 1) + 1), |x_g| = sqrt|q(x_g)| smoothed (non-Euclidean q can be < 0)
GPLayer          (left(x) + a(x) * norm(b(ctx))) / sqrt(2), * the geometric product, gated by its scalar part;
                 ctx = x, or the sum over points
cgenn            embed columns as grade-0/1 channels, `depth` GP layers with scalar gates, a scalar or vector readout

A layer's product (its left map added, then its gate) is a matmul by the right-multiplication matrix
(`product_rows`), or on a GPU one pass over the Cayley table's terms (`zoos.popbilinear`, the default; off with
SYMZOO_POPBILINEAR=0), the gate in it.

Only the grades a layer can hold get weights (vectors generate grades <= 2, their products <= 4, ...), and an
invariant readout's last layer keeps only scalars: every weight reaches the output, so every pair of the
permutation spec matters.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.base import Task
from zoos import popbilinear
from zoos.archs.base import ArchError, SymModule, register_arch
from zoos.archs.layers import check_positive
from zoos.archs.layout import point_layout
from zoos.permspec import PermSpec


def unit_stride_rows(x: Tensor) -> Tensor:
    """x itself where its last axis is unit-stride, else a contiguous copy. A leaf of torch.fx traces: it reads
    strides, which a trace does not know."""
    return x if x.stride(-1) == 1 else x.contiguous()


torch.fx.wrap("unit_stride_rows")


def _split_rows(x: Tensor, sizes: tuple[int, ...]) -> list[Tensor]:
    """x [..., C, sum(sizes)] split along its last axis, each part transposed to rows [..., n, C]."""
    return [unit_stride_rows(part.transpose(-1, -2)) for part in x.split(sizes, -1)]


class _GradeRows(torch.autograd.Function):
    """x [..., C, blades] split into its grades' rows [..., n_g, C]; the backward concatenates the parts' gradients
    along the blades of a [..., blades, C] buffer (contiguous blocks: one plain copy) and returns it transposed, in the
    layout the products write x, where autograd's split would concatenate along x's strided last axis."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
        ctx.sizes, ctx.channels = sizes, x.shape[-2]
        return tuple(_split_rows(x, sizes))

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor, None]:
        like = next(g for g in grads if g is not None)
        parts = [g if g is not None else like.new_zeros(*like.shape[:-2], n, ctx.channels)
                 for g, n in zip(grads, ctx.sizes)]
        return torch.cat(parts, -2).transpose(-1, -2), None


def grade_rows(x: Tensor, sizes: tuple[int, ...]) -> list[Tensor]:
    """x [..., C, sum(sizes)] split along its blades into parts [..., n, C] for n in `sizes` (channels last: rows a
    linear reads). Outside torch.func's transforms its backward writes x's gradient blades-major (`_GradeRows`). A leaf
    of torch.fx traces."""
    if torch._C._are_functorch_transforms_active():
        return _split_rows(x, sizes)
    return list(_GradeRows.apply(x, sizes))


torch.fx.wrap("grade_rows")


class CliffordAlgebra:
    """Cl(p,q,r) of a diagonal metric (+1/-1/0 per axis). Blade k has bit mask `masks[k]` (bit i: axis i), sorted
    by grade. Plain Python data, so a model holding one builds on any device and traces with torch.fx."""

    def __init__(self, metric: tuple[float, ...]):
        self.metric, self.d = tuple(float(m) for m in metric), len(metric)
        self.n = 1 << self.d
        self.masks = sorted(range(self.n), key=lambda m: (bin(m).count("1"), m))
        self.index = {m: k for k, m in enumerate(self.masks)}
        self.grades = [bin(m).count("1") for m in self.masks]  # the grade of every blade
        self.n_blades = [sum(g <= top for g in self.grades) for top in range(self.d + 1)]  # blades of grade <= top
        # e_i e_partner[i][k] = sign[i][k] e_k: the Cayley table as one gather and one sign per (i, k)
        self.partner = [[self.index[a ^ b] for b in self.masks] for a in self.masks]
        self.sign = [[self.blade_sign(a, a ^ b) for b in self.masks] for a in self.masks]
        self.quad = [self.blade_sign(m, m) for m in self.masks]  # q(e_A) = e_A~ e_A = prod of the metric over A
        self._tables: dict[tuple, object] = {}  # `_right_table`'s and `product_table`'s, by their arguments

    def __reduce__(self):
        """Pickled (and deep-copied) as its metric: the one algebra of that metric in the receiving process, without
        the tables, tensors and kernels this one has cached."""
        return algebra_of, (self.metric,)

    def blade_sign(self, a: int, b: int) -> float:
        """e_a e_b = s e_{a^b}: s = (-1)^(swaps to sort the axes) * the metric of every axis in both."""
        swaps, x = 0, a >> 1
        while x:
            swaps += bin(x & b).count("1")
            x >>= 1
        s = -1.0 if swaps % 2 else 1.0
        for i in range(self.d):
            if a & b & (1 << i):
                s *= self.metric[i]
        return s

    def blade(self, *axes: int) -> int:
        """Index of the blade e_{axes} (axes distinct, ascending)."""
        return self.index[sum(1 << i for i in axes)]

    def cayley(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Dense Cayley table C [i, j, k]: e_i e_j = sum_k C[i, j, k] e_k."""
        c = torch.zeros(self.n, self.n, self.n, dtype=dtype, device="cpu")
        for i in range(self.n):
            for k in range(self.n):
                c[i, self.partner[i][k], k] = self.sign[i][k]
        return c

    def geometric_product(self, x: Tensor, y: Tensor, sizes: tuple[int, int, int] | None = None,
                          shared: bool = False) -> Tensor:
        """(x y)[..., :k] for multivectors given by their first blades, x [..., a] and y [..., b] (the rest zero),
        with (a, b, k) = `sizes` (None: every blade).

        A matmul: x y = x @ R(y) (`right_multiplication`). `shared`: y is one multivector for all P points of x
        (x [..., P, C, a], y [..., 1, C, b]: a set's context), so R(y) is built once per set and channel and the
        points are the rows of one [P, a] @ [a, k] product; otherwise a product per feature."""
        a, b, k = sizes or (self.n, self.n, self.n)
        return self.times(x, self.right_multiplication(y, (a, b, k)), shared)

    def right_multiplication(self, y: Tensor, sizes: tuple[int, int, int], identity: int = 0,
                             scale: float = 1.0) -> Tensor:
        """scale * R(y) [..., a, k], (x y)[..., :k] = x @ R(y) for x [..., a], y [..., b]: R(y)[i, c] = sign[i][c]
        y_partner[i][c], built as y @ T with a constant T (a product, not a gather: its backward is a product too).
        `identity` = m > 0: scale * [I; R(y)] [..., m + a, k], so [z, x] @ it adds z [..., m] (its first m blades)
        to x y in the same product: the constant rows come from a 1 appended to y."""
        a, b, k = sizes
        if identity:
            y = torch.cat([y, torch.ones_like(y[..., :1])], -1)
        table = self._constant(("right", a, b, k, identity, scale), self._right_table, y)
        return (y @ table).unflatten(-1, (identity + a, k))

    def _constant(self, key: tuple, values, like: Tensor) -> Tensor:
        """The tensor of `values(*key[1:])` in `like`'s dtype and device, made once (a step replayed as a CUDA graph
        may copy nothing from the host); inside torch.func's transforms made anew (what they make is theirs)."""
        full = (*key, like.dtype, str(like.device))
        if torch._C._are_functorch_transforms_active():
            return torch.tensor(values(*key[1:]), dtype=like.dtype, device=like.device)
        if full not in self._tables:
            self._tables[full] = torch.tensor(values(*key[1:]), dtype=like.dtype, device=like.device)
        return self._tables[full]

    @staticmethod
    def times(x: Tensor, right: Tensor, shared: bool) -> Tensor:
        """x @ right per feature, x [..., P, C, a], right [..., P or 1 (`shared`), C, a, k] -> [..., P, C, k]."""
        if shared:
            return (x.transpose(-3, -2) @ right.squeeze(-4)).transpose(-3, -2)
        return (x.unsqueeze(-2) @ right).squeeze(-2)

    def _right_table(self, a: int, b: int, k: int, identity: int = 0, scale: float = 1.0) -> list[list[float]]:
        """`right_multiplication`'s T: [b (+ 1 with an identity), (identity + a) * k], R(y)[i, c] = (y @ T)[i * k + c],
        one signed `scale` a column (none where y's blade is zero); the identity's entries in the extra last row."""
        key = (a, b, k, identity, scale)
        if key not in self._tables:
            table = [[0.0] * ((identity + a) * k) for _ in range(b + (identity > 0))]
            for i in range(identity):
                table[b][i * k + i] = scale
            for i in range(a):
                for c in range(k):
                    if self.partner[i][c] < b:
                        table[self.partner[i][c]][(identity + i) * k + c] = self.sign[i][c] * scale
            self._tables[key] = table
        return self._tables[key]

    def product_table(self, sizes: tuple[int, int, int], identity: int = 0, scale: float = 1.0) -> popbilinear.Table:
        """`right_multiplication`'s product as `zoos.popbilinear`'s terms: z = [w, x] @ (scale * [I; R(y)]) for
        w [.., identity], x [.., a], y [.., b], z [.., k]: (m, b, m, scale) for m < identity (y's index b is a
        constant 1), and (identity + i, partner[i][c], c, scale * sign[i][c]) for each blade pair in range."""
        a, b, k = sizes
        key = ("product", a, b, k, identity, scale)
        if key not in self._tables:
            terms = [(m, b, m, scale) for m in range(identity)]
            terms += [(identity + i, self.partner[i][c], c, self.sign[i][c] * scale)
                      for i in range(a) for c in range(k) if self.partner[i][c] < b]
            self._tables[key] = popbilinear.Table(identity + a, b, k, tuple(terms))
        return self._tables[key]

    def quadratic(self, x: Tensor, top: int | None = None) -> Tensor:
        """Per-grade quadratic form [..., top + 1] of x [..., n_blades[top]] (invariant under O(p,q))."""
        top = self.d if top is None else top
        return (x * x) @ torch.tensor(self._grade_sums(top), dtype=x.dtype, device=x.device)

    def grade_parts(self, x: Tensor, top: int) -> list[Tensor]:
        """x [..., C, n_blades[top]] as its grades, channels last: [[..., n_g, C] for g <= top] (a grade-wise linear
        reads each as rows), views where x's channels are unit-stride ([.., blades, C] in memory, as
        `zoos.popbilinear` writes them: poplinear reads such rows where they lie), else copies (`grade_rows`)."""
        nb = self.n_blades
        rows = grade_rows(x, tuple(nb[g] - (nb[g - 1] if g else 0) for g in range(top + 1)))
        return [rows[g] for g in range(top + 1)]  # indexed, not iterated: a trace's proxy has no length

    def _grade_sums(self, top: int) -> list[list[float]]:
        """[n_blades[top], top + 1]: q(e_b) in row b, column grade(b), so (x * x) @ it sums q per grade in one product."""
        return [[self.quad[b] if self.grades[b] == g else 0.0 for g in range(top + 1)] for b in range(self.n_blades[top])]


@functools.lru_cache(maxsize=None)
def algebra_of(metric: tuple[float, ...]) -> CliffordAlgebra:
    """One algebra a metric, its tables built once."""
    return CliffordAlgebra(metric)


class _ScalarGate(torch.autograd.Function):
    """h * sigmoid(h_0) with a backward of one pass over h: g * s, its scalar column plus <g, h> s (1 - s)."""

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        ctx.save_for_backward(h)
        return h * torch.sigmoid(h[..., :1])

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        s = torch.sigmoid(h[..., :1])
        dh = g * s
        dh[..., :1] += (g * h).sum(-1, keepdim=True) * s * (1 - s)
        return dh


def scalar_gate(h: Tensor) -> Tensor:
    """h * sigmoid(h[..., :1]): every blade of a channel gated by its (invariant) scalar part. Outside torch.func's
    transforms its backward is one pass (`_ScalarGate`), where autograd's would add the scalar's path through a
    zero-filled slice gradient. A leaf of torch.fx traces."""
    if torch._C._are_functorch_transforms_active():
        return h * torch.sigmoid(h[..., :1])
    return _ScalarGate.apply(h)


torch.fx.wrap("scalar_gate")


def product_rows(metric: tuple[float, ...], maps: list[Tensor], y: Tensor, sizes: tuple[int, int, int],
                 identity: int, scale: float, shared: bool, gate: bool = False,
                 sums: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """x @ (scale * [I; R(y)]) per feature in Cl(`metric`) (`CliffordAlgebra.right_multiplication`, `times`), x the
    concatenation of `maps` [..., P, n, C] (blades before channels, as the grade-wise linears write them; identity +
    a blades in all), y [..., P or 1 (`shared`), C, b] -> z [..., P, C, k], gated by its scalar part with `gate`
    (`scalar_gate`); with `sums`, (z, z summed over the points [..., 1, C, k]). R(y) and a matmul per feature;
    where `zoos.popbilinear` is enabled (the default), on a GPU outside torch.func's transforms (which it has no
    rule for) and up to float32 (where it accumulates), one pass over the terms that reads the maps where they lie,
    with the gate and the sums in it. A leaf of torch.fx traces (fx.wrap), so a population program runs it on its
    stacked batch of samples."""
    algebra = algebra_of(metric)
    x0 = maps[0]
    if (popbilinear.enabled() and x0.is_cuda and popbilinear.available(x0.device) and x0.dtype != torch.float64
            and not torch._C._are_functorch_transforms_active()):
        blocks = [m.reshape(-1, *m.shape[-3:]).transpose(-1, -2) for m in maps]
        out = popbilinear.product(blocks, y.reshape(-1, *y.shape[-3:]),
                                  algebra.product_table(sizes, identity, scale), gate=gate, sums=sums)
        lead = x0.shape[:-3]
        return tuple(t.reshape(*lead, *t.shape[-3:]) for t in out) if sums else out.reshape(*lead, *out.shape[-3:])
    x = torch.cat(maps, -2).transpose(-1, -2)
    z = algebra.times(x, algebra.right_multiplication(y, sizes, identity, scale), shared)
    z = scalar_gate(z) if gate else z
    return (z, z.sum(-3, keepdim=True)) if sums else z


torch.fx.wrap("product_rows")


class MVLinear(nn.Module):
    """Grade-wise linear map of multivectors [..., c_in, n_blades[top]]: one nn.Linear per grade mixing channels."""

    def __init__(self, algebra: CliffordAlgebra, c_in: int, c_out: int, top: int, bias: bool = True):
        super().__init__()
        self.algebra, self.top = algebra, top
        self.grades = nn.ModuleList(nn.Linear(c_in, c_out, bias=bias and g == 0) for g in range(top + 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.map(self.algebra.grade_parts(x, self.top)), -2).transpose(-1, -2)

    def map(self, parts: list[Tensor]) -> list[Tensor]:
        """Each grade's part [..., n_g, c_in] (`grade_parts`; parts above `top` unread) -> [..., n_g, c_out]."""
        return [lin(part) for part, lin in zip(parts, self.grades)]

    def pairs(self, prefix: str, axis: int) -> list[tuple[str, int]]:
        """(key, axis) of every weight (and the bias, for the output axis) on the channel axis `axis`."""
        out = [(f"{prefix}grades.{g}.weight", axis) for g in range(self.top + 1)]
        return out + [(f"{prefix}grades.0.bias", 0)] if axis == 0 and self.grades[0].bias is not None else out


class MVNorm(nn.Module):
    """x_g / (sigmoid(a_g) (|x_g| - 1) + 1) per channel and grade, |x_g| = |q(x_g)|^(1/2) smoothed at 0."""

    def __init__(self, algebra: CliffordAlgebra, channels: int, top: int, eps: float = 1e-6):
        super().__init__()
        self.algebra, self.top, self.eps = algebra, top, eps
        self.scale = nn.Parameter(torch.zeros(top + 1, channels))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.scale.zero_()

    def forward(self, x: Tensor) -> Tensor:
        q = self.algebra.quadratic(x, self.top)  # [..., C, top + 1]
        norm = (q * q + self.eps).pow(0.25)
        denom = torch.sigmoid(self.scale).T * (norm - 1) + 1
        grades = torch.tensor(self.algebra.grades[: self.algebra.n_blades[self.top]], device=x.device)
        return x / (denom.index_select(-1, grades) + self.eps)  # a gather whose backward adds, not sorts


class GPLayer(nn.Module):
    """(left(x) + a(x) norm(b(ctx))) / sqrt(2) truncated to grades <= top_out, gated by its scalar part
    (`scalar_gate`); ctx is x or its sum over points."""

    def __init__(self, algebra: CliffordAlgebra, c_in: int, c_out: int, top_in: int, top_out: int,
                 set_context: bool = False):
        super().__init__()
        self.algebra, self.top_in, self.top_out = algebra, top_in, top_out
        self.set_context = set_context  # ctx [..., 1, C, blades]: one multivector for every point of a set
        self.left = MVLinear(algebra, c_in, c_out, min(top_in, top_out))
        self.a = MVLinear(algebra, c_in, c_out, top_in, bias=False)
        self.b = MVLinear(algebra, c_in, c_out, top_in, bias=False)
        self.norm = MVNorm(algebra, c_out, top_in)

    def forward(self, x: Tensor, ctx: Tensor, sums: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The layer's output h [..., P, C, blades]; with `sums`, (h, h summed over the points: the next layer's
        ctx on a set), the sum made with h."""
        alg = self.algebra
        out, n_left, a = alg.n_blades[self.top_out], alg.n_blades[self.left.top], alg.n_blades[self.top_in]
        # (left(x) + a(x) y) / sqrt(2) = [left(x), a(x)] @ [I; R(y)] / sqrt(2): one product over the points' features
        y = self.norm(self.b(ctx))
        parts = alg.grade_parts(x, self.top_in)  # read by both maps
        maps = self.left.map(parts) + self.a.map(parts)  # [..., n_g, C] each: n_left + a blades, channels last
        return product_rows(alg.metric, maps, y, (a, a, out), n_left, 1 / math.sqrt(2), self.set_context, gate=True,
                            sums=sums)


@register_arch(
    "cgenn",
    equivariant=True,
    symmetry="the task's O(d) / E(d) / O(1,3), x S_n where the task permutes points",
    input_kinds=("points",),
    example_task=("convex_hull", {}),
    description="Clifford group equivariant network (Ruhe et al. 2023): multivector linears, geometric products, gates",
    width=16,
    depth=3,
)
class CGENN(SymModule):
    """Columns become multivector channels: every vector group a grade-1 channel (positions centred on their
    centroid), every scalar and a constant 1 a grade-0 channel. On a set (the group permutes points) every
    layer runs per point with ctx = the sum over points, so it is S_n-equivariant; otherwise the points
    are channels of one multivector. Each layer is a GPLayer (its gate x * sigmoid(x_0) per channel).
    Invariant outputs: a linear of the scalar parts (averaged over points on a set). Per-point outputs
    (nbody): a linear of the grade-1 parts, plus the input positions for position outputs."""

    def __init__(self, task: Task, width: int, depth: int):
        super().__init__()
        check_positive("cgenn", "width", width)
        check_positive("cgenn", "depth", depth)
        self.layout = lay = point_layout(task, "cgenn")
        self.algebra = alg = algebra_of(tuple(float(m) for m in lay.metric))
        self.is_set = getattr(task.group, "n_perm", None) is not None
        self.out_shape = tuple(task.output_shape)
        self.points_out = lay.output == "points"
        if self.points_out:
            groups = lay.out_positions + lay.out_vectors
            if not self.is_set or sum(map(len, groups)) != self.out_shape[-1]:
                raise ArchError(f"architecture 'cgenn' outputs vectors per point of a set; task {task.name!r} has output {self.out_shape}")
            if lay.out_positions and not lay.positions:
                raise ArchError(f"architecture 'cgenn': task {task.name!r} outputs positions but has no input positions")
            self.out_groups = [(c, c in lay.out_positions) for c in sorted(groups)]
        elif lay.output != "invariant":
            raise ArchError(f"architecture 'cgenn' has invariant or per-point vector outputs; task {task.name!r} has {lay.output}")
        per_point = len(lay.vectors) + len(lay.positions) + len(lay.scalars) + 1
        c_in = per_point if self.is_set else per_point * lay.n
        top = 1 if lay.vectors or lay.positions else 0
        last = 1 if self.points_out else 0
        layers = []
        for i in range(depth):
            top_out = last if i == depth - 1 else min(alg.d, 2 * top)
            layers.append(GPLayer(alg, c_in if i == 0 else width, width, top, top_out, set_context=self.is_set))
            top = top_out
        self.layers = nn.ModuleList(layers)
        n_out = len(self.out_groups) if self.points_out else math.prod(self.out_shape)
        self.head = nn.Linear(width, n_out, bias=not self.points_out)

    def embed(self, x: Tensor) -> Tensor:
        """Per-point multivectors [B, n, channels, n_blades[1]]: scalars, 1, then vectors in grade 1."""
        lay = self.layout
        scal = torch.cat([x[..., list(lay.scalars)], torch.ones_like(x[..., :1])], -1)  # [B, n, s + 1]
        vecs = [x[..., list(c)] - x[..., list(c)].mean(-2, keepdim=True) for c in lay.positions]
        vecs += [x[..., list(c)] for c in lay.vectors]
        s = F.pad(scal.unsqueeze(-1), (0, self.algebra.d))  # grade-0 channels
        if not vecs:
            return s[..., :1]
        v = F.pad(torch.stack(vecs, -2), (1, 0))  # grade-1 channels
        return torch.cat([s, v], -2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        if not self.is_set:
            h = h.flatten(-3, -2).unsqueeze(-3)  # the points as channels of one multivector
        ctx = h.sum(-3, keepdim=True) if self.is_set else h
        for i, layer in enumerate(self.layers):
            if self.is_set and i + 1 < len(self.layers):
                h, ctx = layer(h, ctx, sums=True)  # the next layer's context made with h
            else:
                h = ctx = layer(h, ctx)
        if not self.points_out:
            return self.head(h[..., 0].mean(-2)).reshape(-1, *self.out_shape)
        vec = self.head(h[..., 1 : 1 + self.algebra.d].transpose(-1, -2))  # [B, n, d, groups]
        out = []
        for j, (_, is_pos) in enumerate(self.out_groups):
            out.append(vec[..., j] + x[..., list(self.layout.positions[0])] if is_pos else vec[..., j])
        return torch.cat(out, -1)

    def perm_spec(self) -> PermSpec:
        perms = {}
        for i, layer in enumerate(self.layers):
            p = f"layers.{i}."
            own = layer.left.pairs(p + "left.", 0) + layer.a.pairs(p + "a.", 0) + layer.b.pairs(p + "b.", 0)
            own.append((p + "norm.scale", 1))
            if i + 1 < len(self.layers):
                q = f"layers.{i + 1}."
                nxt = self.layers[i + 1]
                own += nxt.left.pairs(q + "left.", 1) + nxt.a.pairs(q + "a.", 1) + nxt.b.pairs(q + "b.", 1)
            else:
                own.append(("head.weight", 1))
            perms[f"h{i}"] = tuple(own)
        return PermSpec(perms)
