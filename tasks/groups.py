"""Symmetry groups and their actions on a task's inputs and outputs.

A `Group` is the mathematics a task declares: which transformations leave the problem unchanged
and how they act on batched inputs `x` and targets `y`. Elements are opaque to callers: get them
from `elements()` (finite groups) or `sample()` (any group) and hand them back to `act_in` /
`act_out`. Lie groups also expose their Lie-algebra `generators()` and `exp()`, so that a Lie
derivative can differentiate `act_in(exp(t A), x)` at t = 0.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch
from torch import Tensor

Element = Any


class Group(ABC):
    """A group acting on batched inputs (leading batch axis) and batched targets."""

    name: str
    is_finite: bool = False

    @abstractmethod
    def act_in(self, g: Element, x: Tensor) -> Tensor:
        """The action of `g` on a batch of inputs."""

    @abstractmethod
    def act_out(self, g: Element, y: Tensor) -> Tensor:
        """The action of `g` on a batch of targets (identity for an invariant task)."""

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> list[Element]:
        """`n` elements drawn from the group's uniform (Haar) measure, or a stated proxy."""

    @abstractmethod
    def identity(self) -> Element:
        """The identity element."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class FiniteGroup(Group):
    """A finite group: every element can be enumerated, so orbit averages are exact."""

    is_finite = True

    @abstractmethod
    def elements(self) -> list[Element]:
        """All elements, identity first."""

    @property
    def order(self) -> int:
        return len(self.elements())

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[Element]:
        els = self.elements()
        idx = torch.randint(len(els), (n,), generator=generator)
        return [els[i] for i in idx.tolist()]

    def identity(self) -> Element:
        return self.elements()[0]


class LieGroup(Group):
    """A continuous matrix group (possibly times a finite factor) with a Lie algebra."""

    @abstractmethod
    def generators(self) -> Tensor:
        """A basis of the Lie algebra as a [k, d, d] tensor, in the defining representation."""

    @abstractmethod
    def exp(self, a: Tensor) -> Element:
        """The element exp(a) for a Lie-algebra matrix `a` ([d, d]); differentiable in `a`."""


def element_list(group: Group, n_samples: int, generator: torch.Generator | None = None) -> Sequence[Element]:
    """All elements of a finite group, else `n_samples` sampled ones: what an orbit average runs over."""
    if isinstance(group, FiniteGroup):
        return group.elements()
    return group.sample(n_samples, generator)


# ----------------------------------------------------------------------------------------------
# Concrete groups. Image groups act on [B, C, H, W]; matrix groups act on "layouts" of x and y
# described as plain data, so one class serves every generated task.


class TrivialGroup(FiniteGroup):
    """The one-element group: the symmetry of a task with none (a baseline)."""

    name = "trivial"

    def elements(self) -> list[Element]:
        return [0]

    def act_in(self, g: Element, x: Tensor) -> Tensor:
        return x

    def act_out(self, g: Element, y: Tensor) -> Tensor:
        return y

    def compose(self, g: Element, h: Element) -> Element:
        return 0

    def inverse(self, g: Element) -> Element:
        return 0


class ImageGroup(FiniteGroup):
    """C4 (rotations by 90 degrees) or D4 (rotations and flips) acting on the last two axes of images.

    An element is a pair (k, f): first flip the last axis if f, then rotate by k quarter turns
    (`torch.rot90` on dims (-2, -1)). Labels are invariant, so `act_out` is the identity.
    """

    def __init__(self, name: str = "C4"):
        if name not in ("C4", "D4"):
            raise ValueError(f"image group name={name!r}; allowed: 'C4', 'D4'")
        self.name = name
        flips = (0, 1) if name == "D4" else (0,)
        self._elements = [(k, f) for f in flips for k in range(4)]

    def elements(self) -> list[Element]:
        return list(self._elements)

    def act_in(self, g: Element, x: Tensor) -> Tensor:
        k, f = g
        if f:
            x = x.flip(-1)
        return torch.rot90(x, k, dims=(-2, -1)) if k % 4 else x

    def act_out(self, g: Element, y: Tensor) -> Tensor:
        return y

    def compose(self, g: Element, h: Element) -> Element:
        """The element acting as g after h: r^a s^f r^b s^e = r^(a + (-1)^f b) s^(f + e)."""
        (a, f), (b, e) = g, h
        return ((a + (-b if f else b)) % 4, (f + e) % 2)

    def inverse(self, g: Element) -> Element:
        k, f = g
        return (k, 1) if f else ((-k) % 4, 0)


def _parse_layout(layout: str) -> tuple[str, ...] | str:
    """'invariant' | 'matrix' | comma-separated per-point column kinds from s (scalar), v (vector), p (position)."""
    if layout in ("invariant", "matrix"):
        return layout
    kinds = tuple(k.strip() for k in layout.split(","))
    if not kinds or any(k not in ("s", "v", "p") for k in kinds):
        raise ValueError(
            f"layout={layout!r}; allowed: 'invariant', 'matrix', or comma-separated kinds from 's', 'v', 'p'"
        )
    return kinds


class MatrixGroup(LieGroup):
    """A matrix Lie group G in GL(d), optionally times translations of R^d and permutations S_n of points.

    How it acts is plain data, one layout for x and one for y:
      "invariant"  the tensor is unchanged
      "matrix"     [B, d, d] transforms as Y -> R Y R^T (a rank-2 tensor such as an inertia matrix)
      "s,v,p,..."  [B, n, k] points whose columns are, in order, scalars (1 column, unchanged),
                   vectors (d columns, v -> R v) and positions (d columns, r -> R r + t)
    With `n_perm` the S_n factor permutes the point axis (-2) of every point layout.
    Translations have no uniform distribution: `sample` draws t ~ N(0, translation_scale^2 I), a
    stated proxy; permutations are uniform.

    Elements: a [d, d] tensor R; (R, t) with translations; (R, perm) or ((R, t), perm) with S_n.
    Tensors so that `exp(a)` and `act_in(exp(a), x)` stay differentiable in `a`.
    """

    def __init__(self, name: str, d: int, x_layout: str, y_layout: str, *, translations: bool = False,
                 n_perm: int | None = None, translation_scale: float = 1.0):
        self.name, self.d = name, d
        self.x_layout, self.y_layout = _parse_layout(x_layout), _parse_layout(y_layout)
        self.translations, self.n_perm, self.translation_scale = translations, n_perm, translation_scale

    # --- the linear part, defined by subclasses ---
    @abstractmethod
    def _sample_linear(self, n: int, generator: torch.Generator | None) -> Tensor:
        """[n, d, d] sampled linear parts (Haar where the group is compact, else a stated proxy)."""

    @abstractmethod
    def _linear_generators(self) -> Tensor:
        """[k, d, d] basis of the linear part's Lie algebra."""

    # --- element plumbing ---
    def _parts(self, g: Element) -> tuple[Tensor, Tensor | None, Tensor | None]:
        perm = None
        if self.n_perm is not None:
            g, perm = g
        t = None
        if self.translations:
            g, t = g
        return g, t, perm

    def _pack(self, r: Tensor, t: Tensor | None, perm: Tensor | None) -> Element:
        g: Element = (r, t) if self.translations else r
        return (g, perm) if self.n_perm is not None else g

    def identity(self) -> Element:
        eye = torch.eye(self.d)
        t = torch.zeros(self.d) if self.translations else None
        perm = torch.arange(self.n_perm) if self.n_perm is not None else None
        return self._pack(eye, t, perm)

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[Element]:
        rs = self._sample_linear(n, generator)
        ts = self.translation_scale * torch.randn(n, self.d, generator=generator) if self.translations else None
        out = []
        for i in range(n):
            perm = torch.randperm(self.n_perm, generator=generator) if self.n_perm is not None else None
            out.append(self._pack(rs[i], ts[i] if ts is not None else None, perm))
        return out

    def exp(self, a: Tensor) -> Element:
        """exp of a Lie-algebra element: [d, d], or [d+1, d+1] homogeneous (rotation block + translation column)."""
        m = torch.linalg.matrix_exp(a)
        if self.translations:
            if a.shape[-1] != self.d + 1:
                raise ValueError(f"exp: a has shape {tuple(a.shape)}; {self.name} needs [{self.d + 1}, {self.d + 1}]")
            r, t = m[: self.d, : self.d], m[: self.d, self.d]
        else:
            r, t = m, None
        perm = torch.arange(self.n_perm) if self.n_perm is not None else None
        return self._pack(r, t, perm)

    def compose(self, g: Element, h: Element) -> Element:
        """The element acting as g after h."""
        (r1, t1, p1), (r2, t2, p2) = self._parts(g), self._parts(h)
        t = r1 @ t2 + t1 if self.translations else None
        perm = p2[p1] if self.n_perm is not None else None
        return self._pack(r1 @ r2, t, perm)

    def inverse(self, g: Element) -> Element:
        r, t, p = self._parts(g)
        ri = torch.linalg.inv(r)
        return self._pack(ri, -ri @ t if self.translations else None, torch.argsort(p) if p is not None else None)

    # --- actions ---
    def _act(self, layout: tuple[str, ...] | str, g: Element, x: Tensor) -> Tensor:
        if layout == "invariant":
            return x
        r, t, perm = self._parts(g)
        r = r.to(dtype=x.dtype, device=x.device)
        if layout == "matrix":
            return r @ x @ r.transpose(-1, -2)
        cols, i = [], 0
        for kind in layout:
            if kind == "s":
                cols.append(x[..., i : i + 1])
                i += 1
                continue
            v = x[..., i : i + self.d] @ r.transpose(-1, -2)
            if kind == "p" and t is not None:
                v = v + t.to(dtype=x.dtype, device=x.device)
            cols.append(v)
            i += self.d
        if i != x.shape[-1]:
            raise ValueError(f"{self.name}: layout {','.join(layout)} needs {i} columns per point, got x of shape {tuple(x.shape)}")
        out = torch.cat(cols, -1)
        if perm is not None:
            out = out.index_select(-2, perm.to(x.device))
        return out

    def act_in(self, g: Element, x: Tensor) -> Tensor:
        return self._act(self.x_layout, g, x)

    def act_out(self, g: Element, y: Tensor) -> Tensor:
        return self._act(self.y_layout, g, y)

    def generators(self) -> Tensor:
        """Lie-algebra basis [k, d, d] (or [k, d+1, d+1] homogeneous with translations)."""
        lin = self._linear_generators()
        if not self.translations:
            return lin
        d = self.d
        rot = torch.zeros(len(lin), d + 1, d + 1)
        rot[:, :d, :d] = lin
        trans = torch.zeros(d, d + 1, d + 1)
        trans[torch.arange(d), torch.arange(d), d] = 1.0
        return torch.cat([rot, trans])


def _antisymmetric_basis(d: int) -> Tensor:
    """E_ij - E_ji for i < j: a basis of so(d)."""
    pairs = [(i, j) for i in range(d) for j in range(i + 1, d)]
    out = torch.zeros(len(pairs), d, d)
    for k, (i, j) in enumerate(pairs):
        out[k, i, j], out[k, j, i] = -1.0, 1.0
    return out


def haar_orthogonal(n: int, d: int, generator: torch.Generator | None = None, special: bool = False) -> Tensor:
    """n Haar-random matrices of O(d) (SO(d) if special): QR of a Gaussian, signs fixed by diag(R) > 0."""
    q, rr = torch.linalg.qr(torch.randn(n, d, d, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(rr, dim1=-2, dim2=-1)).unsqueeze(-2)
    if special:
        q[:, :, 0] *= torch.sign(torch.linalg.det(q)).unsqueeze(-1)
    return q.float()


class OrthogonalGroup(MatrixGroup):
    """O(d) (or SO(d) with special=True), optionally with translations (E(d)) and S_n on points."""

    def __init__(self, d: int, x_layout: str = "v", y_layout: str = "invariant", *, special: bool = False,
                 translations: bool = False, n_perm: int | None = None, name: str | None = None):
        base = f"{'SO' if special else 'O'}({d})"
        if translations:
            base = f"{'SE' if special else 'E'}({d})"
        if name is None:
            name = base + (f"xS{n_perm}" if n_perm is not None else "")
        super().__init__(name, d, x_layout, y_layout, translations=translations, n_perm=n_perm)
        self.special = special

    def _sample_linear(self, n: int, generator: torch.Generator | None) -> Tensor:
        return haar_orthogonal(n, self.d, generator, self.special)

    def _linear_generators(self) -> Tensor:
        return _antisymmetric_basis(self.d)


class AxialO2Group(MatrixGroup):
    """O(2) about the z axis inside O(3): rotations about z and reflections of the xy plane, z fixed."""

    def __init__(self, x_layout: str = "v", y_layout: str = "invariant"):
        super().__init__("O(2)_z", 3, x_layout, y_layout)

    def _sample_linear(self, n: int, generator: torch.Generator | None) -> Tensor:
        theta = 2 * torch.pi * torch.rand(n, generator=generator, dtype=torch.float64)
        c, s = torch.cos(theta), torch.sin(theta)
        r = torch.zeros(n, 3, 3, dtype=torch.float64)
        r[:, 0, 0], r[:, 0, 1], r[:, 1, 0], r[:, 1, 1], r[:, 2, 2] = c, -s, s, c, 1.0
        reflect = torch.rand(n, generator=generator) < 0.5
        r[reflect, :, 1] *= -1  # R diag(1, -1, 1): a reflection of the xy plane
        return r.float()

    def _linear_generators(self) -> Tensor:
        return _antisymmetric_basis(3)[[0]]  # E_01 - E_10: rotation about z


MINKOWSKI = torch.diag(torch.tensor([1.0, -1.0, -1.0, -1.0]))


class LorentzGroup(MatrixGroup):
    """O(1,3) acting on 4-vectors (time first, metric diag(1,-1,-1,-1)).

    O(1,3) is not compact, so there is no uniform distribution. `sample` uses a stated proxy:
    Λ = B(n, η) · diag(±1, Q) with Q Haar on O(3), the time sign ±1 with probability 1/2 each,
    and a boost B along a uniform direction n with rapidity η uniform in [0, max_rapidity].
    Generators: the 3 rotations L_ij, then the 3 boosts K_i = E_0i + E_i0.
    """

    def __init__(self, x_layout: str = "v", y_layout: str = "invariant", max_rapidity: float = 1.0):
        super().__init__("O(1,3)", 4, x_layout, y_layout)
        self.max_rapidity = max_rapidity

    def _sample_linear(self, n: int, generator: torch.Generator | None) -> Tensor:
        q = haar_orthogonal(n, 3, generator).double()
        time_sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
        direction = torch.randn(n, 3, generator=generator, dtype=torch.float64)
        direction = direction / direction.norm(dim=-1, keepdim=True)
        rapidity = self.max_rapidity * torch.rand(n, generator=generator, dtype=torch.float64)
        k = torch.zeros(n, 4, 4, dtype=torch.float64)
        k[:, 0, 1:], k[:, 1:, 0] = direction, direction
        boost = torch.linalg.matrix_exp(rapidity[:, None, None] * k)
        lin = torch.zeros(n, 4, 4, dtype=torch.float64)
        lin[:, 0, 0], lin[:, 1:, 1:] = time_sign, q
        return (boost @ lin).float()

    def _linear_generators(self) -> Tensor:
        rot = torch.zeros(3, 4, 4)
        rot[:, 1:, 1:] = _antisymmetric_basis(3)
        boost = torch.zeros(3, 4, 4)
        for i in range(3):
            boost[i, 0, i + 1] = boost[i, i + 1, 0] = 1.0
        return torch.cat([rot, boost])
