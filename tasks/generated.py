"""Generated regression tasks with an exact symmetry, as in EMLP (Finzi et al. 2021), EGNN (Satorras et
al. 2021) and Clifford group equivariant networks (Ruhe et al. 2023).

Each task samples inputs from a fixed distribution, seeded per (seed, split), and computes targets
with `target(x)`, the ground-truth map, so f*(g.x) = g.f*(x) holds exactly (up to float rounding).
Invariant scalar targets are standardised by a fixed affine map (constants from a reference sample
drawn with a fixed seed), which keeps them exactly invariant; equivariant targets are left raw.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from abc import abstractmethod
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.base import Split, Task, TaskError, check_options, seeded
from tasks.groups import MINKOWSKI, AxialO2Group, Group, LorentzGroup, OrthogonalGroup
from tasks.registry import register_task

_SALT = {"train": 11, "val": 12, "test": 13}
_REFERENCE_SEED = 20_210_101
SIZE_OPTIONS = {"n_train": int, "n_val": int, "n_test": int}

_MEMO: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()  # this process's splits, most recent last
_MEMO_BYTES = 1 << 30  # the oldest splits are dropped beyond this (a long-lived Ray worker meets many tasks)
_READ_S, _READ_BYTES_PER_S = 0.02, 200e6  # what reading a kept split back costs, at the least: a file's open and load, its bytes


def _slower_than_reading(seconds: float, nbytes: int) -> bool:
    """Whether a split that took `seconds` to generate is kept on disk for other processes: it took longer than
    reading it back would (a 1000-step n-body simulation of a few hundred samples is; a large Gaussian sample is not)."""
    return seconds > _READ_S + nbytes / _READ_BYTES_PER_S


def cache_dir() -> Path | None:
    """Where slow generated splits are kept between processes (a Ray worker's next task, the next study):
    $SYMZOO_CACHE/tasks, by default ~/.cache/symzoo/tasks; SYMZOO_CACHE=off keeps none."""
    root = os.environ.get("SYMZOO_CACHE", "")
    if root.strip().lower() == "off":
        return None
    return Path(root or Path.home() / ".cache" / "symzoo").expanduser() / "tasks"


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """The generating code's identity: a cached split is used only by the code (and torch) that made it."""
    h = hashlib.sha256(torch.__version__.encode())
    for module in ("base.py", "generated.py", "groups.py"):
        h.update((Path(__file__).parent / module).read_bytes())
    return h.hexdigest()[:16]


def _read_cached(path: Path) -> tuple[Tensor, Tensor] | None:
    try:
        x, y = torch.load(path, weights_only=True)
        return x, y
    except Exception:  # absent, half-written by a killed process, or unreadable: generate it again
        return None


def _write_cached(path: Path, data: tuple[Tensor, Tensor]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        torch.save(data, tmp)
        os.replace(tmp, path)  # whole or absent: readers never see a partial file
    except OSError:  # a read-only or full disk costs the next process the generation, nothing else
        pass


class GeneratedTask(Task):
    """A regression task defined by an input distribution (`sample_x`) and a ground-truth map (`raw_target`)."""

    kind = "regression"
    metric_name = "rel_mse"
    higher_is_better = False
    standardize = False
    n_reference = 2048

    def __init__(self, name: str, group: Group, input_shape: tuple[int, ...], output_shape: tuple[int, ...],
                 input_kind: str, n_train: int, n_val: int, n_test: int):
        self.name, self.group = name, group
        self.input_shape, self.output_shape, self.input_kind = input_shape, output_shape, input_kind
        for field, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise TaskError(f"task {name!r}: {field}={v!r}; allowed: a non-negative integer")
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self._stats: tuple[float, float] | None = None

    @abstractmethod
    def sample_x(self, n: int, generator: torch.Generator) -> Tensor:
        """n inputs from the task's input distribution."""

    @abstractmethod
    def raw_target(self, x: Tensor) -> Tensor:
        """The unstandardised ground-truth map."""

    def target_stats(self) -> tuple[float, float]:
        """(mean, std) of the raw target on a fixed reference sample: the standardising affine map."""
        if self._stats is None:
            y = self.raw_target(self.sample_x(self.n_reference, torch.Generator().manual_seed(_REFERENCE_SEED)))
            self._stats = (float(y.double().mean()), float(y.double().std()))
        return self._stats

    def target(self, x: Tensor) -> Tensor:
        y = self.raw_target(x)
        if self.standardize:
            mean, std = self.target_stats()
            y = (y - mean) / std
        return y

    def load(self, split: Split, seed: int = 0) -> tuple[Tensor, Tensor]:
        if split not in _SALT:
            raise TaskError(f"task {self.name!r}: split={split!r}; allowed: 'train', 'val', 'test'")
        key = (type(self).__qualname__, self.name, split, int(seed), self.sizes[split], *self.data_options())
        if key in _MEMO:
            _MEMO.move_to_end(key)
        else:
            _MEMO[key] = self._generate(key, split, int(seed))
            while len(_MEMO) > 1 and sum(t.nbytes for xy in _MEMO.values() for t in xy) > _MEMO_BYTES:
                _MEMO.popitem(last=False)
        x, y = _MEMO[key]
        return x.clone(), y.clone()

    def data_options(self) -> tuple:
        """The options besides the split's size that change its data (a subclass with such options adds them)."""
        return ()

    def _generate(self, key: tuple, split: Split, seed: int) -> tuple[Tensor, Tensor]:
        """A split's (x, y): from the disk cache when a process has kept it, else sampled (and kept if slower than a read)."""
        where = cache_dir() if type(self).__module__ == __name__ else None  # code elsewhere is not in the digest
        path = None
        if where is not None:
            digest = hashlib.sha256(repr((key, _code_digest())).encode()).hexdigest()[:24]
            path = where / f"{self.name}-{split}-{seed}-{digest}.pt"
            cached = _read_cached(path)
            if cached is not None:
                return cached
        t0 = time.perf_counter()
        x = self.sample_x(self.sizes[split], seeded(seed, _SALT[split]))
        data = (x, self.target(x).to(torch.float32))
        if path is not None and _slower_than_reading(time.perf_counter() - t0, sum(t.nbytes for t in data)):
            _write_cached(path, data)
        return data


def _make(name: str, cls: type, options: dict, allowed: set[str]) -> GeneratedTask:
    check_options(name, options, allowed)
    return cls(**options)


# ---------------------------------------------------------------------------------------------
# O(5) regression (EMLP §7): f(x1, x2) = sin|x1| - |x2|^3 / 2 + x1.x2 / (|x1| |x2|), x1, x2 ~ N(0, I_5).


class O5Regression(GeneratedTask):
    """EMLP's O(5)-invariant synthetic regression on two vectors in R^5."""

    standardize = True

    def __init__(self, n_train: int = 1000, n_val: int = 500, n_test: int = 1000):
        super().__init__("o5_regression", OrthogonalGroup(5, "v", "invariant"), (2, 5), (1,), "points",
                         n_train, n_val, n_test)

    def sample_x(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randn(n, 2, 5, generator=generator)

    def raw_target(self, x: Tensor) -> Tensor:
        x1, x2 = x[:, 0].double(), x[:, 1].double()
        n1, n2 = x1.norm(dim=-1), x2.norm(dim=-1)
        y = torch.sin(n1) - 0.5 * n2**3 + (x1 * x2).sum(-1) / (n1 * n2)
        return y.unsqueeze(-1).to(x.dtype)


@register_task("o5_regression", description="EMLP's O(5)-invariant f(x1,x2)=sin|x1|-|x2|^3/2+cos angle",
               group="O(5)", options=dict(SIZE_OPTIONS))
def o5_regression(**options) -> GeneratedTask:
    return _make("o5_regression", O5Regression, options, set(SIZE_OPTIONS))


# ---------------------------------------------------------------------------------------------
# Inertia (EMLP §7): 5 point masses m_i = softplus(N(0,1)) at r_i ~ N(0, I_3);
# I = sum_i m_i (|r_i|^2 I_3 - r_i r_i^T), which transforms as R I R^T under O(3).


def inertia_matrix(x: Tensor) -> Tensor:
    """sum_i m_i (|r_i|^2 I - r_i r_i^T) for x [B, n, 4] = per point (mass, xyz)."""
    m, r = x[..., 0], x[..., 1:]
    eye = torch.eye(3, dtype=x.dtype, device=x.device)
    r2 = (r * r).sum(-1)
    return (m[..., None, None] * (r2[..., None, None] * eye - r[..., :, None] * r[..., None, :])).sum(-3)


class Inertia(GeneratedTask):
    """EMLP's O(3)-equivariant inertia-matrix regression."""

    def __init__(self, n_train: int = 1000, n_val: int = 500, n_test: int = 1000, name: str = "inertia",
                 group: Group | None = None):
        super().__init__(name, group or OrthogonalGroup(3, "s,v", "matrix"), (5, 4), (3, 3), "points",
                         n_train, n_val, n_test)

    def sample_x(self, n: int, generator: torch.Generator) -> Tensor:
        z = torch.randn(n, 5, 4, generator=generator)
        return torch.cat([F.softplus(z[..., :1]), z[..., 1:]], -1)

    def raw_target(self, x: Tensor) -> Tensor:
        return inertia_matrix(x.double()).to(x.dtype)


class ModifiedInertia(Inertia):
    """EMLP's symmetry-broken inertia: I + 0.3 (I e_z) e_z^T, exactly equivariant only for R with R e_z = ±e_z.

    Finzi et al. 2021 (EMLP, "ModifiedInertia" dataset): target = I + 3e-1 * v g^T with g = e_z and
    v = I g, which leaves O(2) about z (and the flip z -> -z) as the exact symmetry; the task's
    `group` is that O(2), while O(3) is the approximate symmetry a soft-equivariance study probes.
    """

    def __init__(self, n_train: int = 1000, n_val: int = 500, n_test: int = 1000):
        super().__init__(n_train, n_val, n_test, name="modified_inertia", group=AxialO2Group("s,v", "matrix"))
        self.approximate_group = OrthogonalGroup(3, "s,v", "matrix")

    def raw_target(self, x: Tensor) -> Tensor:
        inertia = inertia_matrix(x.double())
        ez = torch.tensor([0.0, 0.0, 1.0], dtype=inertia.dtype, device=x.device)
        v = inertia @ ez
        return (inertia + 0.3 * v[..., :, None] * ez).to(x.dtype)


@register_task("inertia", description="EMLP's inertia matrix of 5 point masses; O(3) acts by R I R^T",
               group="O(3)", options=dict(SIZE_OPTIONS))
def inertia(**options) -> GeneratedTask:
    return _make("inertia", Inertia, options, set(SIZE_OPTIONS))


@register_task("modified_inertia", description="EMLP's inertia + 0.3 (I e_z) e_z^T: O(3) broken to O(2) about z",
               group="O(2)_z", options=dict(SIZE_OPTIONS))
def modified_inertia(**options) -> GeneratedTask:
    return _make("modified_inertia", ModifiedInertia, options, set(SIZE_OPTIONS))


# ---------------------------------------------------------------------------------------------
# Lorentz (EMLP §7, "ParticleInteraction"): an electron-muon scattering matrix element built from
# Minkowski inner products of four 4-momenta p ~ N(0, I_4) / 4, invariant under O(1,3).


def minkowski_dot(a: Tensor, b: Tensor) -> Tensor:
    """<a, b> = a0 b0 - a.b over the last axis (time first)."""
    return a[..., 0] * b[..., 0] - (a[..., 1:] * b[..., 1:]).sum(-1)


class Lorentz(GeneratedTask):
    """EMLP's O(1,3)-invariant e-mu scattering: 4 sum_ab Le_ab Lmu_ab with
    Le = p1 p3^T - (<p1,p3> - <p1,p1>) eta and Lmu = (eta p2)(eta p4)^T - (<p2,p4> - <p2,p2>) eta."""

    standardize = True

    def __init__(self, n_train: int = 1000, n_val: int = 500, n_test: int = 1000, max_rapidity: float = 1.0):
        if not isinstance(max_rapidity, (int, float)) or max_rapidity < 0:
            raise TaskError(f"task 'lorentz': max_rapidity={max_rapidity!r}; allowed: a non-negative number")
        super().__init__("lorentz", LorentzGroup("v", "invariant", float(max_rapidity)), (4, 4), (1,), "points",
                         n_train, n_val, n_test)

    def sample_x(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randn(n, 4, 4, generator=generator) / 4

    def raw_target(self, x: Tensor) -> Tensor:
        p = x.double()
        eta = MINKOWSKI.to(p)
        p1, p2, p3, p4 = p.unbind(1)
        le = p1[:, :, None] * p3[:, None, :] - (minkowski_dot(p1, p3) - minkowski_dot(p1, p1))[:, None, None] * eta
        q2, q4 = p2 @ eta, p4 @ eta
        lmu = q2[:, :, None] * q4[:, None, :] - (minkowski_dot(p2, p4) - minkowski_dot(p2, p2))[:, None, None] * eta
        return (4 * (le * lmu).sum((-1, -2))).unsqueeze(-1).to(x.dtype)


@register_task("lorentz", description="EMLP's electron-muon scattering amplitude of four 4-momenta; O(1,3)-invariant",
               group="O(1,3)", options={**SIZE_OPTIONS, "max_rapidity": float})
def lorentz(**options) -> GeneratedTask:
    return _make("lorentz", Lorentz, options, set(SIZE_OPTIONS) | {"max_rapidity"})


# ---------------------------------------------------------------------------------------------
# Convex hull (Ruhe et al. 2023, Clifford group equivariant networks): the volume of the convex hull
# of 16 points ~ N(0, I_5); invariant under O(5) and under permutations of the points.


class ConvexHull(GeneratedTask):
    """Volume of the convex hull of 16 Gaussian points in 5-D (scipy's Qhull, one call per sample)."""

    standardize = True
    n_reference = 512

    def __init__(self, n_train: int = 1024, n_val: int = 256, n_test: int = 1024):
        super().__init__("convex_hull", OrthogonalGroup(5, "v", "invariant", n_perm=16), (16, 5), (1,), "points",
                         n_train, n_val, n_test)

    def sample_x(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randn(n, 16, 5, generator=generator)

    def raw_target(self, x: Tensor) -> Tensor:
        from scipy.spatial import ConvexHull as Hull

        pts = x.detach().double().cpu().numpy()
        vol = torch.tensor([Hull(p).volume for p in pts], dtype=torch.float64)
        return vol.unsqueeze(-1).to(dtype=x.dtype, device=x.device)


@register_task("convex_hull", description="volume of the convex hull of 16 Gaussian points in 5-D (Clifford-group paper)",
               group="O(5)xS16", options=dict(SIZE_OPTIONS))
def convex_hull(**options) -> GeneratedTask:
    return _make("convex_hull", ConvexHull, options, set(SIZE_OPTIONS))


# ---------------------------------------------------------------------------------------------
# Charged N-body (EGNN §5.2, after Kipf et al.'s NRI simulator, without the box): 5 particles with
# charges ±1, unit masses, softened Coulomb forces q_i q_j (r_i - r_j) / (|r_ij|^2 + eps^2)^(3/2)
# (like charges repel), integrated by leapfrog; predict the positions after n_steps * dt.
# Softening instead of NRI's force clipping keeps the simulator exactly E(3) x S_5 equivariant.


def coulomb_forces(pos: Tensor, charge: Tensor, softening: float) -> Tensor:
    """Softened Coulomb forces [B, n, 3] on every particle, all pairs at once."""
    diff = pos[:, :, None, :] - pos[:, None, :, :]  # r_i - r_j
    inv3 = ((diff * diff).sum(-1) + softening**2) ** -1.5
    qq = charge[:, :, None] * charge[:, None, :]
    return ((qq * inv3)[..., None] * diff).sum(2)  # the i == j term has diff = 0


def simulate_charged(x: Tensor, n_steps: int, dt: float, softening: float) -> Tensor:
    """Leapfrog (kick-drift-kick) of x [B, n, 7] = (pos, vel, charge) for n_steps, vectorised over B; float64."""
    pos, vel, charge = x[..., 0:3].double(), x[..., 3:6].double(), x[..., 6].double()
    acc = coulomb_forces(pos, charge, softening)
    for _ in range(n_steps):
        vel = vel + 0.5 * dt * acc
        pos = pos + dt * vel
        acc = coulomb_forces(pos, charge, softening)
        vel = vel + 0.5 * dt * acc
    return pos


class NBody(GeneratedTask):
    """EGNN's charged 5-body problem: positions after a fixed horizon; E(3) x S_5-equivariant."""

    def __init__(self, n_train: int = 3000, n_val: int = 2000, n_test: int = 2000, n_steps: int = 1000,
                 dt: float = 0.001, softening: float = 0.1):
        if not isinstance(n_steps, int) or n_steps < 1:
            raise TaskError(f"task 'nbody': n_steps={n_steps!r}; allowed: a positive integer")
        for field, v in (("dt", dt), ("softening", softening)):
            if not isinstance(v, (int, float)) or v <= 0:
                raise TaskError(f"task 'nbody': {field}={v!r}; allowed: a positive number")
        group = OrthogonalGroup(3, "p,v,s", "p", translations=True, n_perm=5)
        super().__init__("nbody", group, (5, 7), (5, 3), "points", n_train, n_val, n_test)
        self.n_steps, self.dt, self.softening = n_steps, float(dt), float(softening)

    def sample_x(self, n: int, generator: torch.Generator) -> Tensor:
        pos = torch.randn(n, 5, 3, generator=generator)
        vel = 0.5 * torch.randn(n, 5, 3, generator=generator)
        charge = torch.randint(0, 2, (n, 5, 1), generator=generator).float() * 2 - 1
        return torch.cat([pos, vel, charge], -1)

    def data_options(self) -> tuple:
        return self.n_steps, self.dt, self.softening

    def raw_target(self, x: Tensor) -> Tensor:
        return simulate_charged(x, self.n_steps, self.dt, self.softening).to(x.dtype)


@register_task("nbody", description="EGNN's charged 5-body system: positions after a fixed horizon; E(3)xS5",
               group="E(3)xS5", options={**SIZE_OPTIONS, "n_steps": int, "dt": float, "softening": float})
def nbody(**options) -> GeneratedTask:
    return _make("nbody", NBody, options, set(SIZE_OPTIONS) | {"n_steps", "dt", "softening"})
