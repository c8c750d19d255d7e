"""Bilinear products with a constant sparse table, as Triton kernels: a geometric product (or any tensor product
written as a table) over a whole population's features in one pass.

For x [S, G, C, A] (S sets of G points, C channels, A components) and y [S, G or 1, C, B] (one y for every point
of a set: a set's context), and a table of terms (i, j, k, c):

  z[s, g, c, k] = sum over the terms (i, j, k, c) of  c * x[s, g, c, i] * y[s, g, c, j]      (y[..., B] = 1)

A Clifford algebra's geometric product x y is such a table (k = the blade of e_i e_j, c its sign); the index
j = B stands for a constant 1, so x's first components can be added to the product in the same pass (a layer's
left map). As dense products the same z is x @ R(y), with R(y) [.., A, K] built from y per set and channel and a
batched matmul per feature: R, its gradient and the layout copies around a product of tiny matrices are each a
pass over memory as large as the features. Here the table is written into a kernel's code (generated once per
table and process, compiled and cached by Triton like any kernel): one program holds a tile of sets, points and
channels, loads each component its terms name once and computes every output as one sum of products in
registers. x may come in blocks of its components (a layer's maps, read where its linears wrote them). The
backward is the same kind of kernel on two more tables,

  dx[.., i] = sum over (i, j, k, c) of c * dz[.., k] * y[.., j]      dy[.., j] = sum of c * dz[.., k] * x[.., i]

the latter summed over a set's points where y is shared. With `gate`, the output is gated by its first component
(z * sigmoid(z[.., 0]), an equivariant network's scalar gate) in the same pass, and the backward reads the gated
output and the gate to form dz in registers. Products accumulate in float32; z and dx take x's dtype, dy y's. A
backward differentiated again (a Hessian-vector product) runs as dense torch products.

Models route their products here where `enabled()`: on by default, off with SYMZOO_POPBILINEAR=0 or inside
`using(False)` (benchmarks/bilinear_bench.py times it against the dense product).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import linecache
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from zoos.popconv.common import available, population_op, triton
from zoos.popconv.tuning import env_flag


def _from_environment() -> bool:
    return env_flag(os.environ, "SYMZOO_POPBILINEAR", default="1")


_enabled = [_from_environment()]


def enabled() -> bool:
    """Whether models run their bilinear products here (unless SYMZOO_POPBILINEAR=0, or inside `using(False)`)."""
    return _enabled[-1]


@contextlib.contextmanager
def using(on: bool = True) -> Iterator[None]:
    """`enabled()` is `on` inside the block (a population program reads it each step: keep the block around it)."""
    _enabled.append(bool(on))
    try:
        yield
    finally:
        _enabled.pop()


TILE = 256  # (sets x points x channels) elements a program holds, padded to powers of two (more: sets of > 256 points)

if triton is not None:
    import triton.language as tl

_KERNEL_HEAD = """
@triton.jit
def {name}({operands}h_ptr, gate_ptr, u_ptr, S, G, C, {strides}shs, shg, shc, sha, sgs, sgg, sgc, sus, suc, sua,
           BS: tl.constexpr, BG: tl.constexpr, BC: tl.constexpr):
    r = tl.arange(0, BS * BG * BC)
    s = tl.program_id(0) * BS + r // (BG * BC)
    g = (r // BC) % BG
    c = tl.program_id(1) * BC + r % BC
    mask = (s < S) & (g < G) & (c < C)
"""
_AT = "    {v}{b}_at = s.to(tl.int64) * s{v}{b}s + g * s{v}{b}g + c * s{v}{b}c\n"
_AT_SETS = """    s2 = tl.program_id(0) * BS + tl.arange(0, BS)[:, None]
    c2 = tl.program_id(1) * BC + tl.arange(0, BC)[None, :]
    o_mask = (s2 < S) & (c2 < C)
"""
_GATE_AT = "    gate_at = s.to(tl.int64) * sgs + g * sgg + c * sgc\n"


def _place(blocks: tuple[int, ...], i: int) -> tuple[int, int]:
    """(block, index in it) of component i of an operand given in blocks of these sizes."""
    for b, n in enumerate(blocks):
        if i < n:
            return b, i
        i -= n
    raise IndexError(i)


def _sum_of_terms(terms: tuple[tuple[int, int, float], ...], n_q: int) -> str:
    """An output's terms as code, one multiply by each distinct coefficient magnitude (a Clifford product's are all
    +-scale): (p1 * q2 - p3 * q4 + ..) * 0.707.."""
    by_size: dict[float, list[str]] = {}
    for i, j, c in terms:
        term = f"p{i}" + (f" * q{j}" if j < n_q else "")
        by_size.setdefault(abs(float(c)), []).append(("- " if c < 0 else "+ ") + term)
    sums = []
    for size, parts in by_size.items():
        text = " ".join(parts)
        text = text[2:] if text.startswith("+ ") else "-" + text[2:]
        sums.append(f"({text}) * {size!r}" if size != 1.0 else f"({text})")
    return " + ".join(sums)


def _kernel(outputs: tuple[tuple[tuple[int, int, float], ...], ...], blocks: tuple[tuple[int, ...], ...], n_q: int,
            reduce_g: bool, gate: str, n_p: int = 0, sums: str = ""):
    """A Triton kernel with a table's terms written into its code: out[s, g, c, o] = sum over outputs[o]'s terms
    (pi, qi, coef) of coef p[s, g, c, pi] q[s, g, c, qi] (q = 1 where qi == n_q), summed over g into out[s, 0, c, o]
    with `reduce_g`. Every component a term names is loaded once (channels innermost: coalesced), every output is
    one straight sum of products in registers and one store: no index is read at run time. p, q and out each come
    in blocks (`blocks`: their sizes, for p, q, out), a tensor and four strides a block (`_launch`'s order).

    `gate` "forward": out = z * sigmoid(z[.., 0]) for the products z (output 0 first), the gate stored at gate_ptr
    [S, G, C] (float32). "backward": p is the gradient of such a gated output h (at h_ptr, `n_p` components) and
    the products read the product's gradient, p * gate plus (1 - gate) <p, h> in component 0.

    `sums` "write": each output (gated) also summed over a set's points into u [S, C, k] (u_ptr: the set's sums);
    "read": p is an output's gradient, plus that of its sums u [S, C, k], every point of a set reading its set's."""
    names = [(v, b) for v, sizes in zip("pqo", blocks) for b in range(len(sizes))]
    lines = [_AT.format(v=v, b=b) for v, b in names if v != "o" or not reduce_g]
    if reduce_g or sums == "write":
        lines.append(_AT_SETS + "".join(f"    o{b}_at = s2.to(tl.int64) * so{b}s + c2 * so{b}c\n"
                                        for b in range(len(blocks[2])) if reduce_g))
    if sums:
        s_at, c_at = ("s2", "c2") if sums == "write" else ("s", "c")
        lines.append(f"    u_at = {s_at}.to(tl.int64) * sus + {c_at} * suc\n")

    def load(v: str, i: int) -> str:
        b, at = _place(blocks["pq".index(v)], i) if v in "pq" else (0, i)
        ptr = f"{v}{b}_ptr + {v}{b}_at + {at} * s{v}{b}a" if v in "pq" else f"h_ptr + h_at + {i} * sha"
        line = f"    {v}{i} = tl.load({ptr}, mask=mask, other=0.0).to(tl.float32)\n"
        if v == "p" and sums == "read":
            line += f"    {v}{i} += tl.load(u_ptr + u_at + {i} * sua, mask=mask, other=0.0).to(tl.float32)\n"
        return line

    if gate == "backward":
        lines.append(_GATE_AT + "    h_at = s.to(tl.int64) * shs + g * shg + c * shc\n"
                     "    gate = tl.load(gate_ptr + gate_at, mask=mask, other=0.0)\n")
        lines += [load("p", i) + load("h", i) for i in range(n_p)]
        lines.append(f"    inner = {' + '.join(f'p{i} * h{i}' for i in range(n_p))}\n")
        lines += [f"    p{i} = p{i} * gate\n" for i in range(n_p)]
        lines.append("    p0 += (1.0 - gate) * inner\n")
    else:
        lines += [load("p", i) for i in sorted({t[0] for terms in outputs for t in terms})]
    lines += [load("q", j) for j in sorted({t[1] for terms in outputs for t in terms if t[1] < n_q})]
    for o, terms in enumerate(outputs):
        lines.append(f"    acc = {_sum_of_terms(terms, n_q) or 'tl.zeros((BS * BG * BC,), dtype=tl.float32)'}\n")
        if gate == "forward":
            if o == 0:
                lines.append(_GATE_AT + "    gate = tl.sigmoid(acc)\n"
                             "    tl.store(gate_ptr + gate_at, gate, mask=mask)\n")
            lines.append("    acc = acc * gate\n")
        if sums == "write":
            lines.append("    tl.store(u_ptr + u_at + {o} * sua, tl.sum(tl.reshape(acc, (BS, BG, BC)), axis=1)"
                         ".to(u_ptr.dtype.element_ty), mask=o_mask)\n".format(o=o))
        if reduce_g:
            lines.append("    acc = tl.sum(tl.reshape(acc, (BS, BG, BC)), axis=1)\n")
        b, at = _place(blocks[2], o)
        lines.append(f"    tl.store(o{b}_ptr + o{b}_at + {at} * so{b}a, acc.to(o{b}_ptr.dtype.element_ty), "
                     f"mask={'o_mask' if reduce_g else 'mask'})\n")
    head = _KERNEL_HEAD.format(name="{name}", operands="".join(f"{v}{b}_ptr, " for v, b in names),
                               strides="".join(f"s{v}{b}s, s{v}{b}g, s{v}{b}c, s{v}{b}a, " for v, b in names))
    source = head + "".join(lines)
    name = f"_products_{hashlib.sha1(source.encode()).hexdigest()[:16]}"
    if name not in _KERNELS:
        _KERNELS[name] = _compiled(name, source.replace("{name}", name, 1))
    return _KERNELS[name]


_KERNELS: dict[str, object] = {}  # by name: a hash of the kernel's code


def _compiled(name: str, source: str):
    """`source`'s kernel `name`, its text registered with linecache under a file name of its own (Triton reads a
    kernel's source to compile it, and keys its on-disk cache by it)."""
    filename = f"<symzoo.popbilinear {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    scope = {"triton": triton, "tl": tl, "__name__": __name__}
    exec(compile(source, filename, "exec"), scope)
    return scope[name]


@dataclass(frozen=True)
class Table:
    """The terms (i, j, k, coef) of z[k] = sum coef x[i] y[j] for x [.., a], y [.., b] (j == b: a constant 1),
    z [.., k_out]. Built once per product (a layer's); its kernels (the product and its two gradients, for each
    layout of blocks) are generated once per process."""

    a: int
    b: int
    k_out: int
    terms: tuple[tuple[int, int, int, float], ...]
    _kernels: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        for i, j, k, _ in self.terms:
            if not (0 <= i < self.a and 0 <= j <= self.b and 0 <= k < self.k_out):
                raise ValueError(f"term ({i}, {j}, {k}) is outside x [.., {self.a}], y [.., {self.b}] (+ the constant "
                                 f"{self.b}) and z [.., {self.k_out}]")

    def __reduce__(self):
        """Pickled as its text (`code`): the receiving process makes its own kernels."""
        return Table.of_code, (self.code,)

    def dense(self, like: Tensor) -> Tensor:
        """The terms as a dense coefficient tensor [a, b + 1, k_out] in `like`'s dtype and device."""
        t = torch.zeros(self.a, self.b + 1, self.k_out, dtype=torch.float64)
        for i, j, k, c in self.terms:
            t[i, j, k] += c
        return t.to(like)

    def grouped(self, part: str) -> tuple[tuple[tuple[int, int, float], ...], ...]:
        """The terms of `part`'s outputs: "z" (p = x, q = y), "dx" (p = dz, q = y) or "dy" (p = dz, q = x)."""
        if part == "z":
            return _grouped([(k, i, j, c) for i, j, k, c in self.terms], self.k_out)
        if part == "dx":
            return _grouped([(i, k, j, c) for i, j, k, c in self.terms], self.a)
        return _grouped([(j, k, i, c) for i, j, k, c in self.terms if j < self.b], self.b)

    def kernel(self, part: str, blocks: tuple[tuple[int, ...], ...], reduce_g: bool, gate: str, n_p: int,
               sums: str = ""):
        """`part`'s generated kernel (`_kernel`) for operands in these blocks, made at its first use."""
        key = (part, blocks, reduce_g, gate, n_p, sums)
        if key not in self._kernels:
            n_q = self.a if part == "dy" else self.b
            self._kernels[key] = _kernel(self.grouped(part), blocks, n_q, reduce_g, gate, n_p, sums)
        return self._kernels[key]

    @functools.cached_property
    def code(self) -> str:
        """The table as text, which the ops take (`of_code` reads it back): a traced or compiled program that calls
        them names the table itself, valid in any process."""
        text = f"{self.a} {self.b} {self.k_out}|" + ";".join(f"{i},{j},{k},{float(c)!r}" for i, j, k, c in self.terms)
        _BY_CODE.setdefault(text, self)
        return text

    @staticmethod
    def of_code(code: str) -> Table:
        """The table `code` names (`Table.code`), built once per process."""
        if code not in _BY_CODE:
            sizes, terms = code.split("|")
            rows = [t.split(",") for t in terms.split(";")] if terms else []
            table = Table(*map(int, sizes.split()), tuple((int(i), int(j), int(k), float(c)) for i, j, k, c in rows))
            _BY_CODE[code] = table
        return _BY_CODE[code]


_BY_CODE: dict[str, Table] = {}


def _grouped(terms: list[tuple[int, int, int, float]], n_out: int) -> tuple[tuple[tuple[int, int, float], ...], ...]:
    """(out, p index, q index, coef) terms -> each output's (p index, q index, coef), in the given order."""
    out: list[list[tuple[int, int, float]]] = [[] for _ in range(n_out)]
    for o, pi, qi, c in terms:
        out[o].append((pi, qi, float(c)))
    return tuple(tuple(t) for t in out)


def _blocks(g: int, c: int) -> tuple[int, int, int]:
    """(sets, points, channels) a program: a tile of about TILE elements, all of a set's points (a shared y's
    gradient sums over them), its channels split over programs where a set's points and channels are more."""
    bg = triton.next_power_of_2(g)
    bc = min(triton.next_power_of_2(c), max(1, TILE // bg))
    return max(1, TILE // (bg * bc)), bg, bc


def _launch(table: Table, part: str, p: list[Tensor], q: list[Tensor], out: list[Tensor], reduce_g: bool,
            gate: str = "", h: Tensor | None = None, gate_t: Tensor | None = None, sums: str = "",
            u: Tensor | None = None) -> None:
    """`table`'s kernel for `part` (`Table.kernel`) over p's blocks [S, G, C, *], q's [S, G or 1, C, *] into out's
    [S, G or 1, C, *]; with `gate`, the gate gate_t [S, G, C] (and for the backward the gated output h [S, G, C, *]);
    with `sums`, the sets' sums u [S, 1, C, *] (written, or read as the sums' gradient)."""
    s, g, c = p[0].shape[0], p[0].shape[1], p[0].shape[2]
    if not sum(t.numel() for t in out):
        return
    bs, bg, bc = _blocks(g, c)
    strides = []
    for t in p + q + out:
        st = list(t.stride())
        if t.shape[1] == 1:  # one point for every point of a set
            st[1] = 0
        strides += st
    blocks = tuple(tuple(t.shape[-1] for t in ts) for ts in (p, q, out))
    kernel = table.kernel(part, blocks, reduce_g, gate, h.shape[-1] if h is not None else 0, sums)
    kernel[(triton.cdiv(s, bs), triton.cdiv(c, bc))](
        *p, *q, *out, h if h is not None else p[0], gate_t if gate_t is not None else p[0],
        u if u is not None else p[0], s, g, c, *strides,
        *(h.stride() if h is not None else (0,) * 4), *(gate_t.stride() if gate_t is not None else (0,) * 3),
        *((u.stride(0), u.stride(2), u.stride(3)) if u is not None else (0,) * 3),
        BS=bs, BG=bg, BC=bc, num_warps=4)


def _check(xs: list[Tensor], y: Tensor, a: int, b: int) -> None:
    x = xs[0]
    if any(t.dim() != 4 or t.shape[:3] != x.shape[:3] for t in xs) or y.dim() != 4 \
            or sum(t.shape[-1] for t in xs) != a or y.shape[-1] != b or y.shape[0] != x.shape[0] \
            or y.shape[2] != x.shape[2] or y.shape[1] not in (1, x.shape[1]):
        shapes = ", ".join(str(tuple(t.shape)) for t in xs)
        raise ValueError(f"x [S, G, C, {a}] (or blocks of it) and y [S, G or 1, C, {b}] disagree: x {shapes}, "
                         f"y {tuple(y.shape)}")


@population_op("pop_bilinear")
def _pop_bilinear(xs: list[Tensor], y: Tensor, table: str, gate: bool, sums: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(z, the gate [S, G, C] float32 or empty, z summed over each set's points [S, 1, C, k] or empty); x in blocks
    of components, `table` a `Table.code`."""
    t = Table.of_code(table)
    z, gate_t, z_sum = _outputs(xs[0], t.k_out, gate, sums)
    _launch(t, "z", list(xs), [y], [z], False, "forward" if gate else "",
            gate_t=gate_t if gate else None, sums="write" if sums else "", u=z_sum if sums else None)
    return z, gate_t, z_sum


def _outputs(x: Tensor, k: int, gate: bool, sums: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The forward's outputs, allocated: z and its sums channels innermost, as x's components are read."""
    s, g, c, _ = x.shape
    return (x.new_empty(s, g, k, c).transpose(-1, -2), x.new_empty((s, g, c) if gate else (0,), dtype=torch.float32),
            x.new_empty(s, 1, k, c).transpose(-1, -2) if sums else x.new_empty(0))


@_pop_bilinear.register_fake
def _(xs, y, table, gate, sums):
    return _outputs(xs[0], Table.of_code(table).k_out, gate, sums)


@population_op("pop_bilinear_backward")
def _pop_bilinear_backward(xs: list[Tensor], y: Tensor, dz: Tensor, dz_sum: Tensor, z: Tensor, gate_t: Tensor,
                           table: str, gate: bool, x_grad: bool, y_grad: bool) -> list[Tensor]:
    """[dx block for each x block, dy] (empty where not asked for), in x's and y's dtypes; dz the gradient of the
    (gated, with `gate`) output z, dz_sum that of its sets' sums (or empty)."""
    t = Table.of_code(table)
    dxs, dy = [x.new_empty(0) for x in xs], y.new_empty(0)
    gated = {"gate": "backward", "h": z, "gate_t": gate_t} if gate else {}
    if dz_sum.numel():
        gated.update(sums="read", u=dz_sum)
    if x_grad:
        dxs = [torch.empty_like(x) for x in xs]
        _launch(t, "dx", [dz], [y], dxs, False, **gated)
    if y_grad:
        dy = torch.empty_like(y)
        _launch(t, "dy", [dz], list(xs), [dy], y.shape[1] == 1 and xs[0].shape[1] > 1, **gated)
    return dxs + [dy]


@_pop_bilinear_backward.register_fake
def _(xs, y, dz, dz_sum, z, gate_t, table, gate, x_grad, y_grad):
    return ([torch.empty_like(x) if x_grad else x.new_empty(0) for x in xs]
            + [torch.empty_like(y) if y_grad else y.new_empty(0)])


def _setup(ctx, inputs, output) -> None:
    xs, y, table, gate, _ = inputs
    z, gate_t, _ = output
    ctx.save_for_backward(y, z if gate else y.new_empty(0), gate_t, *xs)
    ctx.table, ctx.gate, ctx.z_shape = table, gate, z.shape


def _backward(ctx, dz: Tensor | None, _dgate: Tensor, dz_sum: Tensor | None):
    y, z, gate_t, *xs = ctx.saved_tensors
    x_needs, y_needs = ctx.needs_input_grad[:2]  # x's: one flag a block
    if dz is None:  # only the sums were read
        dz = xs[0].new_zeros(ctx.z_shape)
    if dz_sum is None:
        dz_sum = dz.new_empty(0)
    if torch.is_grad_enabled():  # a backward that is differentiated again (create_graph: a Hessian-vector product)
        dz = dz + dz_sum if dz_sum.numel() else dz
        dx, dy = _dense_backward(torch.cat(xs, -1), y, dz, Table.of_code(ctx.table), ctx.gate)
        dxs = list(dx.split([x.shape[-1] for x in xs], -1))
    else:
        *dxs, dy = _pop_bilinear_backward(xs, y, dz, dz_sum, z, gate_t, ctx.table, ctx.gate, any(x_needs), y_needs)
    return [dx if need else None for dx, need in zip(dxs, x_needs)], dy if y_needs else None, None, None, None


_pop_bilinear.register_autograd(_backward, setup_context=_setup)


def _dense_backward(x: Tensor, y: Tensor, dz: Tensor, table: Table, gate: bool) -> tuple[Tensor, Tensor]:
    """The gradients as dense torch products (differentiable again), from x, y and the output's gradient dz."""
    coef = table.dense(torch.empty(0, dtype=torch.float32, device=x.device))
    xf, dz = x.float(), dz.float()
    yf = torch.cat([y.float(), torch.ones_like(y[..., :1], dtype=torch.float32)], -1).expand(*xf.shape[:-1], -1)
    if gate:
        z = torch.einsum("sgci,sgcj,ijk->sgck", xf, yf, coef)
        gate_t = torch.sigmoid(z[..., :1])
        dz = dz * gate_t + F.pad((1 - gate_t) * (dz * z * gate_t).sum(-1, keepdim=True), (0, dz.shape[-1] - 1))
    dx = torch.einsum("sgck,sgcj,ijk->sgci", dz, yf, coef)
    dy = torch.einsum("sgck,sgci,ijk->sgcj", dz, xf, coef)[..., :-1]
    if y.shape[1] == 1:
        dy = dy.sum(1, keepdim=True)
    return dx.to(x.dtype), dy.to(y.dtype)


def product(x: Tensor | list[Tensor], y: Tensor, table: Table, gate: bool = False,
            sums: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """z [S, G, C, table.k_out] of x [S, G, C, table.a] and y [S, G or 1, C, table.b] (any strides; a y of one
    point is every point's): z[.., k] = sum over the table's terms (i, j, k, coef) of coef x[.., i] y[.., j], with
    y[.., table.b] = 1; `gate`: z * sigmoid(z[.., :1]) (every component gated by the first, as an equivariant
    network's scalar gate), in the same pass. x may come in blocks of its components (a list of [S, G, C, *]
    tensors, read where they lie: no concatenation). `sums`: (z, z summed over each set's points [S, 1, C, k]), the
    sum in the same pass (a set's context for the next layer) and its gradient added where z's is read. Gradients to
    x (each block) and y."""
    xs = [x] if isinstance(x, Tensor) else list(x)
    _check(xs, y, table.a, table.b)
    z, _, z_sum = _pop_bilinear(xs, y, table.code, bool(gate), bool(sums))
    return (z, z_sum) if sums else z


__all__ = ["Table", "available", "enabled", "product", "using"]
