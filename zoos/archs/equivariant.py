"""Equivariant architectures: the symmetry is built in, exactly, by weight sharing or by construction.

p4cnn, p4mcnn  group CNNs for C4 / D4 (Cohen & Welling 2016): lifting conv, group convs, group pool
deepsets       S_n-invariant: phi per point, sum/mean pool, rho (Zaheer et al. 2017)
egnn           E(n)-equivariant graph network on a fully connected graph (Satorras et al. 2021)
scalar_mlp     invariant MLP on all pairwise inner products of the input vectors (Villar et al. 2021)
inertia_head   O(3)-equivariant matrix output sum_i a_i |r_i|^2 I + b_i r_i r_i^T from invariant a_i, b_i
frame_avg      an MLP averaged over the PCA frames of the point cloud (Puny et al. 2022)

The point models read how each input column transforms from the task's group (`zoos.archs.layout`).
Every module keeps permutable axes separate (group axis apart from channels, concatenated inputs as
separate weights), so each hidden permutation is a list of single (key, axis) pairs.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.base import Task
from zoos import popgeometry, popmessage
from zoos.archs.base import (ArchError, PopDropout, SymModule, activation_slope, make_activation, population_form,
                             register_arch)
from zoos.archs.layers import MLPStack, check_choice, check_positive, linalg_eigh
from zoos.archs.layout import PointLayout, point_layout
from zoos.permspec import PermSpec

torch.fx.wrap("linalg_eigh")  # one call of the population program on its stacked batch (chunked on a GPU)

# ----------------------------------------------------------------------------------------------
# Group CNNs on the square grid. An element (k, f) acts on a k x k kernel (or an image) by
# flipping the last axis if f, then rotating by k quarter turns: the convention of tasks.groups.ImageGroup.


def _transform(g: tuple[int, int], a: Tensor) -> Tensor:
    k, f = g
    if f:
        a = a.flip(-1)
    return torch.rot90(a, k, dims=(-2, -1)) if k else a


def _group_tables(elements: list[tuple[int, int]]) -> tuple[list[list[int]], list[int]]:
    """Multiplication table (index of g*h) and inverses, found by acting on a generic array."""
    probe = torch.arange(9.0, device="cpu").reshape(3, 3)  # plain data, also when built on the meta device
    images = [_transform(g, probe) for g in elements]

    def index(a: Tensor) -> int:
        return next(i for i, b in enumerate(images) if torch.equal(a, b))

    mul = [[index(_transform(g, _transform(h, probe))) for h in elements] for g in elements]
    inv = [row.index(0) for row in mul]
    return mul, inv


class GroupConvNet(SymModule):
    """Lifting conv, `depth - 1` group convs, group pooling, global spatial average pool, linear head.

    Feature maps are [B, C, |G|, H, W]. Lifting weight [C, C_in, k, k]; group-conv weight
    [C_out, C_in, |G|, k, k]; one bias per channel (shared over the group axis, as equivariance needs).
    The kernel for output element g is T_g applied to the weight with its group axis re-indexed by
    g^-1 h, so f(T_h x) = T_h . (shift of the group axis by h) f(x) exactly, for any odd k and 'same'
    padding. A 2x2 max-pool after every second layer keeps this exact when the map's side is even.
    """

    elements: list[tuple[int, int]] = []

    def __init__(self, task: Task, width: int, depth: int, kernel: int, activation: str, dropout: float, group_pool: str,
                 *, out_features: int | None = None, head_bias: bool = True):
        super().__init__()
        name = self.arch_name
        check_positive(name, "width", width)
        check_positive(name, "depth", depth)
        check_positive(name, "kernel", kernel)
        check_choice(name, "group_pool", group_pool, ("max", "mean"))
        if kernel % 2 == 0:
            raise ArchError(f"architecture {name!r}: kernel must be odd for exact equivariance with 'same' padding, got {kernel}")
        c_in, h, w = task.input_shape
        if h != w:
            raise ArchError(f"architecture {name!r} needs square images for rotations; task {task.name!r} has {h}x{w}")
        n_g = len(self.elements)
        mul, inv = _group_tables(self.elements)
        # index[g][h] = g^-1 h: the group-axis gather for output element g
        self.gather = [[mul[inv[g]][h] for h in range(n_g)] for g in range(n_g)]  # plain data, not a buffer
        self.kernel, self.group_pool = kernel, group_pool
        self.lift = nn.Parameter(torch.empty(width, c_in, kernel, kernel))
        self.lift_bias = nn.Parameter(torch.zeros(width))
        self.convs = nn.ParameterList(nn.Parameter(torch.empty(width, width, n_g, kernel, kernel)) for _ in range(depth - 1))
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(width)) for _ in range(depth - 1))
        self._reset_group_weights()
        self.acts = nn.ModuleList(make_activation(activation) for _ in range(depth))
        self.drops = nn.ModuleList(PopDropout(dropout) for _ in range(depth))
        self.pool_after = []
        for i in range(depth):
            pool = i % 2 == 1 and i < depth - 1 and h % 2 == 0 and h >= 4
            self.pool_after.append(pool)
            h = h // 2 if pool else h
        self.head = nn.Linear(width, math.prod(task.output_shape) if out_features is None else out_features, bias=head_bias)

    def _reset_group_weights(self) -> None:
        """Kaiming-uniform group kernels (nn.Linear's rule on the flattened kernel), zero biases."""
        with torch.no_grad():
            for wgt in [self.lift, *self.convs]:
                nn.init.kaiming_uniform_(wgt.view(wgt.shape[0], -1), a=math.sqrt(5))
            for b in [self.lift_bias, *self.biases]:
                b.zero_()

    def reset_parameters(self) -> None:
        """The whole model's init, in __init__'s order: the group kernels, then the head."""
        self._reset_group_weights()
        self.head.reset_parameters()

    def _lift_kernel(self) -> Tensor:
        w = torch.stack([_transform(g, self.lift) for g in self.elements], 1)  # [C, G, C_in, k, k]
        return w.flatten(0, 1)

    def _group_kernel(self, w: Tensor) -> Tensor:
        c_out, c_in, n_g, k, _ = w.shape
        w = torch.stack([_transform(g, w[:, :, self.gather[i]]) for i, g in enumerate(self.elements)], 1)
        return w.reshape(c_out * n_g, c_in * n_g, k, k)  # [C_out, G_out, C_in, G_in, k, k] flattened

    def features(self, x: Tensor) -> Tensor:
        """[B, C, |G|]: the spatially pooled group feature maps, before group pooling (their group axis is equivariant).

        The maps stay [B, C*|G|, H, W] throughout (channel-major, as the kernels are flattened), so each conv
        carries its bias (one per channel, repeated over the group) and its activation and pool are plain
        ops on its output: a population program folds them into the conv.
        """
        n_g, pad = len(self.elements), self.kernel // 2
        x = F.conv2d(x, self._lift_kernel(), self.lift_bias.repeat_interleave(n_g), padding=pad)
        for i in range(len(self.acts)):
            if i > 0:
                conv, bias = self.convs[i - 1], self.biases[i - 1]
                x = F.conv2d(x, self._group_kernel(conv), bias.repeat_interleave(n_g), padding=pad)
            x = self.drops[i](self.acts[i](x))
            if self.pool_after[i]:
                x = F.max_pool2d(x, 2)
        return x.mean(dim=(-2, -1)).unflatten(1, (-1, n_g))

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # [B, C, G]
        x = x.max(-1).values if self.group_pool == "max" else x.mean(-1)  # max: the gradient goes to one element, as in a max-pool
        return self.head(x.reshape(x.shape[0], -1))

    def perm_spec(self) -> PermSpec:
        n = len(self.acts)
        perms = {}
        for i in range(n):
            own = (("lift", 0), ("lift_bias", 0)) if i == 0 else ((f"convs.{i - 1}", 0), (f"biases.{i - 1}", 0))
            nxt = (f"convs.{i}", 1) if i + 1 < n else ("head.weight", 1)
            perms[f"layer{i}"] = (*own, nxt)
        return PermSpec(perms)


_GCNN_DEFAULTS = dict(width=8, depth=3, kernel=3, activation="relu", dropout=0.0, group_pool="max")


@register_arch(
    "p4cnn",
    equivariant=True,
    symmetry="C4 (rot90)",
    input_kinds=("image",),
    example_task=("mnist", {}),
    description="p4 group CNN (Cohen & Welling 2016): invariant to 90-degree rotations",
    **_GCNN_DEFAULTS,
)
class P4CNN(GroupConvNet):
    """Group CNN over C4 = rotations by multiples of 90 degrees."""

    elements = [(k, 0) for k in range(4)]


@register_arch(
    "p4mcnn",
    equivariant=True,
    symmetry="D4 (rot90 + flip)",
    input_kinds=("image",),
    example_task=("mnist", {"group": "D4"}),
    description="p4m group CNN (Cohen & Welling 2016): invariant to 90-degree rotations and flips",
    **_GCNN_DEFAULTS,
)
class P4MCNN(GroupConvNet):
    """Group CNN over D4 = rotations by multiples of 90 degrees and reflections."""

    elements = [(k, f) for f in (0, 1) for k in range(4)]


# ----------------------------------------------------------------------------------------------
# Point clouds.


@register_arch(
    "deepsets",
    equivariant=True,
    symmetry="S_n (point permutations)",
    input_kinds=("points",),
    example_task=("convex_hull", {}),
    description="DeepSets (Zaheer et al. 2017): rho(pool_i phi(x_i)), invariant to permuting points",
    width=64,
    depth=2,
    rho_depth=1,
    pool="sum",
    activation="relu",
    dropout=0.0,
)
class DeepSets(SymModule):
    """phi: `depth` layers per point (last one activated), sum or mean over points, rho: MLP to the output."""

    def __init__(self, task: Task, width: int, depth: int, rho_depth: int, pool: str, activation: str, dropout: float):
        super().__init__()
        check_positive("deepsets", "width", width)
        check_positive("deepsets", "depth", depth)
        check_positive("deepsets", "rho_depth", rho_depth, minimum=0)
        self.pool = check_choice("deepsets", "pool", pool, ("sum", "mean"))
        self.out_shape = tuple(task.output_shape)
        self.phi = MLPStack(task.input_shape[-1], width, depth - 1, width, activation, dropout)
        self.phi_act = make_activation(activation)
        self.rho = MLPStack(width, width, rho_depth, math.prod(self.out_shape), activation, dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.phi_act(self.phi(x))  # [B, n, width]
        h = h.sum(-2) if self.pool == "sum" else h.mean(-2)
        return self.rho(h).reshape(-1, *self.out_shape)

    def perm_spec(self) -> PermSpec:
        last = len(self.phi.layers) - 1
        pooled = ((f"phi.layers.{last}.weight", 0), (f"phi.layers.{last}.bias", 0), ("rho.layers.0.weight", 1))
        return PermSpec({**self.phi.perm_pairs("phi.", "phi_"), "pooled": pooled, **self.rho.perm_pairs("rho.", "rho_")})


@register_arch(
    "scalar_mlp",
    equivariant=True,
    symmetry="the task's O(d) / O(1,3) (invariant outputs)",
    input_kinds=("points",),
    example_task=("o5_regression", {}),
    description="MLP on all pairwise inner products of the input vectors (Euclidean or Minkowski) and the scalars",
    width=64,
    depth=2,
    activation="relu",
    dropout=0.0,
)
class ScalarMLP(SymModule):
    """Invariant features <v_a, v_b> for every pair of input vectors (a <= b) under the group's metric, then an MLP.

    Positions of a group with translations enter centred on their centroid. The outputs are invariant,
    so the task's target must be invariant. Not invariant to permuting points (the features are ordered).
    """

    def __init__(self, task: Task, width: int, depth: int, activation: str, dropout: float):
        super().__init__()
        check_positive("scalar_mlp", "width", width)
        check_positive("scalar_mlp", "depth", depth, minimum=0)
        self.layout = lay = point_layout(task, "scalar_mlp")
        if lay.output != "invariant":
            raise ArchError(f"architecture 'scalar_mlp' has invariant outputs; task {task.name!r} has {lay.output} outputs")
        m = lay.n * (len(lay.vectors) + len(lay.positions))
        self.triu = torch.triu_indices(m, m, device="cpu").tolist()  # plain data: no index buffers, any build device
        self.out_shape = tuple(task.output_shape)
        n_feat = len(self.triu[0]) + lay.n * len(lay.scalars)
        self.net = MLPStack(n_feat, width, depth, math.prod(self.out_shape), activation, dropout)

    def features(self, x: Tensor) -> Tensor:
        """[B, n_features]: upper triangle of the Gram matrix of all vectors, then the scalar columns."""
        lay = self.layout
        vs = [x[..., list(c)] - x[..., list(c)].mean(-2, keepdim=True) for c in lay.positions]
        vs += [x[..., list(c)] for c in lay.vectors]
        v = torch.cat(vs, -2)  # [B, m, d]
        gram = (v * lay.metric_tensor(x)) @ v.transpose(-1, -2)
        feats = gram[..., self.triu[0], self.triu[1]]
        return torch.cat([feats, x[..., list(lay.scalars)].flatten(-2)], -1)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.features(x)).reshape(-1, *self.out_shape)

    def perm_spec(self) -> PermSpec:
        return PermSpec(self.net.perm_pairs("net."))


@register_arch(
    "inertia_head",
    equivariant=True,
    symmetry="O(3) x S_n (matrix outputs Y -> R Y R^T)",
    input_kinds=("points",),
    example_task=("inertia", {}),
    description="sum_i a_i |r_i|^2 I + b_i r_i r_i^T with (a_i, b_i) from an invariant MLP of (scalars_i, |r_i|^2)",
    width=32,
    depth=2,
    activation="relu",
    dropout=0.0,
)
class InertiaHead(SymModule):
    """Equivariant by construction: |r|^2 I and r r^T transform as R Y R^T, and a_i, b_i are invariant.

    The per-point MLP is shared over points and the sum makes the output invariant to their order.
    The exact inertia matrix is the case a_i = m_i, b_i = -m_i.
    """

    def __init__(self, task: Task, width: int, depth: int, activation: str, dropout: float):
        super().__init__()
        check_positive("inertia_head", "width", width)
        check_positive("inertia_head", "depth", depth, minimum=0)
        self.layout = lay = point_layout(task, "inertia_head")
        if lay.output != "matrix" or len(lay.vectors) != 1 or lay.positions or not lay.euclidean:
            raise ArchError(
                f"architecture 'inertia_head' needs one Euclidean vector per point and a matrix output; "
                f"task {task.name!r} has layout {lay}"
            )
        self.net = MLPStack(len(lay.scalars) + 1, width, depth, 2, activation, dropout)

    def forward(self, x: Tensor) -> Tensor:
        lay = self.layout
        r = x[..., list(lay.vectors[0])]
        r2 = (r * r).sum(-1, keepdim=True)
        ab = self.net(torch.cat([x[..., list(lay.scalars)], r2], -1))  # [B, n, 2]
        a, b = ab[..., 0:1] * r2, ab[..., 1]
        eye = torch.eye(lay.d, dtype=x.dtype, device=x.device)
        return a.sum(-2)[..., None] * eye + torch.einsum("bn,bni,bnj->bij", b, r, r)

    def perm_spec(self) -> PermSpec:
        return PermSpec(self.net.perm_pairs("net."))


@register_arch(
    "frame_avg",
    equivariant=True,
    symmetry="the task's O(d) / E(d), not S_n (Euclidean; exact where the PCA spectrum is simple)",
    input_kinds=("points",),
    example_task=("inertia", {}),
    description="frame averaging (Puny et al. 2022): an MLP averaged over the 2^d sign-flipped PCA frames",
    width=64,
    depth=2,
    activation="relu",
    dropout=0.0,
)
class FrameAvg(SymModule):
    """f(x) = mean over frames F of  rho_out(F) . MLP(x expressed in F).

    The frames are the eigenvectors E of C = sum_i v_i v_i^T over every input vector (positions centred
    when the group translates), with all 2^d sign choices: rotating x by R rotates C, so E -> R E up to
    signs, which the average over signs absorbs. Exact O(d)-invariance/equivariance therefore holds
    when C has d distinct eigenvalues. Where eigenvalues coincide (fewer than d points, e.g. two
    vectors in R^5, or a symmetric cloud) eigh picks an arbitrary basis of the eigenspace and the
    average is only approximately equivariant, with no error bound: use another family for such tasks.
    Gradients through eigh also grow as eigenvalue gaps shrink. Outputs: invariant, matrix
    (Y -> F Y F^T), or per-point vectors/positions (positions get the input centroid added back).
    """

    def __init__(self, task: Task, width: int, depth: int, activation: str, dropout: float):
        super().__init__()
        name = self.arch_name  # "frame_avg", or a subclass's name in its errors
        check_positive(name, "width", width)
        check_positive(name, "depth", depth, minimum=0)
        self.layout = lay = point_layout(task, name)
        if not lay.euclidean:
            raise ArchError(f"architecture {name!r} builds orthonormal frames; task {task.name!r} has a non-Euclidean metric")
        if lay.output == "points" and (lay.out_positions and not lay.positions):
            raise ArchError(f"architecture {name!r}: task {task.name!r} outputs positions but has no input positions")
        self.signs = list(itertools.product((1.0, -1.0), repeat=lay.d))  # the 2^d sign choices
        self.columns = task.input_shape[-1]
        self.out_shape = tuple(task.output_shape)
        self.net = MLPStack(math.prod(task.input_shape), width, depth, math.prod(self.out_shape), activation, dropout)

    def frames(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Frames [B, 2^d, d, d] (columns are the axes) and the centroid of the first position group."""
        lay = self.layout
        vs = [x[..., list(c)] - x[..., list(c)].mean(-2, keepdim=True) for c in lay.positions]
        vs += [x[..., list(c)] for c in lay.vectors]
        v = torch.cat(vs, -2)
        gram = (v.unsqueeze(-1) * v.unsqueeze(-2)).sum(-3)  # v^T v as products, not a matmul: autocast keeps its float32 (eigh has no bf16)
        _, e = linalg_eigh(gram)  # [B, d, d]
        centroid = x[..., list(lay.positions[0])].mean(-2) if lay.positions else None
        signs = torch.tensor(self.signs, dtype=x.dtype, device=x.device)
        return e[:, None] * signs[None, :, None, :], centroid

    def forward(self, x: Tensor) -> Tensor:
        lay = self.layout
        frames, centroid = self.frames(x)  # [B, K, d, d]
        k = len(self.signs)
        cols = []  # x in each frame, column by column in the input's order: [B, K, n, cols]
        groups = {c[0]: ("p", c) for c in lay.positions} | {c[0]: ("v", c) for c in lay.vectors}
        i = 0
        while i < self.columns:  # a Python int: the forward's structure does not depend on the data
            if i in groups:
                kind, c = groups[i]
                v = x[..., list(c)]
                if kind == "p":
                    v = v - centroid[:, None] if c == lay.positions[0] else v - v.mean(-2, keepdim=True)
                cols.append(v[:, None] @ frames)
                i += len(c)
            else:
                cols.append(x[:, None, :, i : i + 1].expand(-1, k, -1, -1))
                i += 1
        y = self.net(torch.cat(cols, -1).flatten(-2)).reshape(x.shape[0], k, *self.out_shape)
        if lay.output == "invariant":
            return y.mean(1)
        if lay.output == "matrix":
            return (frames @ y @ frames.transpose(-1, -2)).mean(1)
        out = []  # per-point outputs: rotate each vector group back; positions also get the centroid
        for j in range(self.out_shape[-1]):
            starts = [c for c in lay.out_positions + lay.out_vectors if c[0] == j]
            if starts:
                c = starts[0]
                v = (y[..., list(c)] @ frames.transpose(-1, -2)).mean(1)
                out.append(v + centroid[:, None] if c in lay.out_positions else v)
            elif not any(j in c for c in lay.out_positions + lay.out_vectors):
                out.append(y[..., j : j + 1].mean(1))
        return torch.cat(out, -1)

    def perm_spec(self) -> PermSpec:
        return PermSpec(self.net.perm_pairs("net."))


def edge_messages(s: Tensor, d: Tensor, x: Tensor, attr: Tensor, wg: Tensor, w2: Tensor, b2: Tensor, wc: Tensor | None,
                  bc: Tensor | None, wo: Tensor | None, act: str, slope: float) -> tuple[Tensor, Tensor | None]:
    """An EGNN layer's edges on its fully connected graphs of points x [..., n, D]: the edge features [|x_i - x_j|^2,
    attr_ij] (`zoos.popgeometry.pair_reference`), the edge MLP summed at each node (`zoos.popmessage.reference`:
    msum [..., n, H]) and the coordinate step its edges' weights make (`zoos.popgeometry.step_reference`: [..., n, D];
    None without the coordinate MLP). A leaf of torch.fx traces, so a population program runs it as three ops
    (`_edge_messages_population`) and never writes the edge tensors."""
    geo = popgeometry.pair_reference(x, attr)
    msum, c = popmessage.reference(s, d, geo, wg, w2, b2, wc, bc, wo, act, slope)
    return msum, (popgeometry.step_reference(x, c) if c is not None else None)


torch.fx.wrap("edge_messages")


@population_form(edge_messages)
def _edge_messages_population(kernels: bool, dtype: torch.dtype, args: tuple, kwargs: dict):
    """`edge_messages` for a population: the pair geometry and popmessage's kernels where their sizes fit, else the
    torch ops with batched matmuls; the edge MLP's data in the compute dtype (autocast's linears'), the coordinates
    in theirs."""
    s, _, x, attr, wg, *_, act, _ = args
    nodes, (hidden, features) = s.shape[-2], wg.shape[-2:]
    fits = (kernels and popmessage.fits(nodes, hidden, features, act, dtype)
            and popgeometry.fits(nodes, x.shape[-1], attr.shape[-1]))

    def run(s, d, x, attr, wg, w2, b2, wc, bc, wo, act, slope):
        s, d = s.to(dtype), d.to(dtype)
        if fits:
            geo = popgeometry.pair_features(x, attr, dtype)
            messages, step = popmessage.messages, popgeometry.coordinate_step
        else:
            from zoos.fastpop import pop_linear

            geo = popgeometry.pair_reference(x, attr).to(dtype)
            messages = functools.partial(popmessage.reference, linear=pop_linear)
            step = popgeometry.step_reference
        msum, c = messages(s, d, geo, wg, w2, b2, wc, bc, wo, act, slope)
        return msum, (step(x, c) if c is not None else None)

    if fits:
        return run, "popmessage", "the pair geometry, the edge MLP and its sums in three passes: no edge tensor written"
    why = ("popmessage kernels off here (no CUDA, or not asked for)" if not kernels else
           f"{nodes} nodes, {hidden} hidden, {features} edge features, {act}: popmessage holds up to "
           f"{popmessage.MAX_NODES} nodes, {popmessage.max_hidden(dtype)} hidden (in {dtype}) and "
           f"{popmessage.MAX_EDGE_FEATURES} edge features")
    return run, "bmm", why


class EGNNLayer(nn.Module):
    """One E(n)-equivariant message-passing layer (Satorras et al. 2021, eqs. 3-6, with the velocity variant 7).

    The first edge linear is split into separate weights for h_i, h_j and the geometric edge
    features (the same map as one linear on their concatenation), so that the hidden-feature
    permutation of h is one axis of each weight. The pair geometry, the edge MLP (edge_geo, edge_out and
    the coordinate MLP coord_in, coord_out) and the coordinate step run as `edge_messages`, on the weights of
    those linears.
    """

    def __init__(self, hidden: int, n_edge: int, activation: str, update_x: bool, update_h: bool, velocity: bool):
        super().__init__()
        self.update_x, self.update_h, self.velocity = update_x, update_h, velocity
        self.activation, self.slope = activation, activation_slope(activation)
        act = lambda: make_activation(activation)  # noqa: E731
        self.edge_src = nn.Linear(hidden, hidden)
        self.edge_dst = nn.Linear(hidden, hidden, bias=False)
        self.edge_geo = nn.Linear(n_edge, hidden, bias=False)
        self.edge_out = nn.Linear(hidden, hidden)
        if update_x:
            self.coord_in = nn.Linear(hidden, hidden)
            self.coord_out = nn.Linear(hidden, 1, bias=False)
            self._shrink_coord_out()
        if update_x and velocity:
            self.vel_in = nn.Linear(hidden, hidden)
            self.vel_out = nn.Linear(hidden, 1)
            self.act_v = act()
        if update_h:
            self.node_h = nn.Linear(hidden, hidden)
            self.node_m = nn.Linear(hidden, hidden, bias=False)
            self.node_out = nn.Linear(hidden, hidden)
            self.act_n = act()

    def _shrink_coord_out(self) -> None:
        with torch.no_grad():
            self.coord_out.weight.mul_(0.01)  # small initial coordinate steps, as in the reference

    def reset_parameters(self) -> None:
        """Every linear's own reset in __init__'s order, then the coordinate head shrunk."""
        for layer in self.children():
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        if self.update_x:
            self._shrink_coord_out()

    def forward(self, h: Tensor, x: Tensor, v: Tensor | None, edge_attr: Tensor) -> tuple[Tensor, Tensor]:
        n = h.shape[-2]
        coord = (self.coord_in.weight, self.coord_in.bias, self.coord_out.weight) if self.update_x else (None,) * 3
        msum, step = edge_messages(self.edge_src(h), self.edge_dst(h), x, edge_attr, self.edge_geo.weight,
                                   self.edge_out.weight, self.edge_out.bias, *coord, self.activation, self.slope)
        if self.update_x:
            if self.velocity:
                step = step + self.vel_out(self.act_v(self.vel_in(h))) * v
            x = x + step
        if self.update_h:
            h = h + self.node_out(self.act_n(self.node_h(h) + self.node_m(msum / (n - 1))))
        return h, x


@register_arch(
    "egnn",
    equivariant=True,
    symmetry="E(d) x S_n (or O(d) x S_n without positions)",
    input_kinds=("points",),
    example_task=("nbody", {}),
    description="E(n)-equivariant GNN (Satorras et al. 2021) on the fully connected graph; positions or invariant outputs",
    width=32,
    depth=3,
    activation="silu",
)
class EGNN(SymModule):
    """EGNN on a fully connected graph of the task's points.

    Coordinates are the first position column group (E(d)), else the first vector group (O(d)). Node
    features start from the invariant scalars, the squared norms of the other vectors, and |x_i|^2
    when coordinates are not translated; edge features are |x_i - x_j|^2 and products s_i s_j of the
    scalars (charges). With a second vector group (velocities) and per-point outputs, each layer
    moves x by phi_v(h_i) v_i as in the paper's N-body model; the output is the final coordinates. For
    invariant outputs the readout is an MLP of sum_i h_i.
    """

    def __init__(self, task: Task, width: int, depth: int, activation: str):
        super().__init__()
        check_positive("egnn", "width", width)
        check_positive("egnn", "depth", depth)
        self.layout = lay = point_layout(task, "egnn")
        if not lay.euclidean:
            raise ArchError(f"architecture 'egnn' uses Euclidean distances; task {task.name!r} has a non-Euclidean metric")
        groups = lay.positions + lay.vectors
        self.coords, self.others = groups[0], groups[1:]
        self.translated = bool(lay.positions)
        if lay.output == "points":
            out_groups = lay.out_positions + lay.out_vectors
            if len(out_groups) != 1 or math.prod(task.output_shape[1:]) != lay.d:
                raise ArchError(f"architecture 'egnn' predicts one coordinate per point; task {task.name!r} outputs {task.output_shape}")
            if bool(lay.out_positions) != self.translated:
                raise ArchError(f"architecture 'egnn': task {task.name!r} output and coordinates differ in translation behaviour")
        elif lay.output != "invariant":
            raise ArchError(f"architecture 'egnn' has invariant or per-point coordinate outputs; task {task.name!r} has {lay.output}")
        self.points_out = lay.output == "points"
        velocity = self.points_out and len(self.others) > 0
        n_node = len(lay.scalars) + len(self.others) + (0 if self.translated else 1)
        self.constant_nodes = n_node == 0  # nothing invariant per point: every node starts from the same constant
        self.embed = nn.Linear(max(n_node, 1), width)
        self.layers = nn.ModuleList(
            EGNNLayer(
                width,
                1 + len(lay.scalars),
                activation,
                update_x=self.points_out or i < depth - 1,
                update_h=not (self.points_out and i == depth - 1),
                velocity=velocity,
            )
            for i in range(depth)
        )
        self.velocity = velocity
        self.out_shape = tuple(task.output_shape)
        if not self.points_out:
            self.head = MLPStack(width, width, 1, math.prod(self.out_shape), activation, 0.0)

    def forward(self, x: Tensor) -> Tensor:
        lay = self.layout
        pos = x[..., list(self.coords)]
        s = x[..., list(lay.scalars)]
        others = [x[..., list(c)] for c in self.others]
        feats = [s] + [(o * o).sum(-1, keepdim=True) for o in others]
        if not self.translated:
            feats.append((pos * pos).sum(-1, keepdim=True))
        node = torch.ones_like(pos[..., :1]) if self.constant_nodes else torch.cat(feats, -1)
        h = self.embed(node)
        edge_attr = s[..., :, None, :] * s[..., None, :, :]
        vel = others[0] if self.velocity else None
        for layer in self.layers:
            h, pos = layer(h, pos, vel, edge_attr)
        if self.points_out:
            return pos.reshape(-1, *self.out_shape)
        return self.head(h.sum(-2)).reshape(-1, *self.out_shape)

    def perm_spec(self) -> PermSpec:
        h_stream = [("embed.weight", 0), ("embed.bias", 0)]
        perms: dict[str, tuple[tuple[str, int], ...]] = {}
        for i, layer in enumerate(self.layers):
            p = f"layers.{i}."
            h_stream += [(p + "edge_src.weight", 1), (p + "edge_dst.weight", 1)]
            perms[f"l{i}_edge"] = (
                (p + "edge_src.weight", 0), (p + "edge_src.bias", 0), (p + "edge_dst.weight", 0),
                (p + "edge_geo.weight", 0), (p + "edge_out.weight", 1),
            )  # fmt: skip
            msg = [(p + "edge_out.weight", 0), (p + "edge_out.bias", 0)]
            if layer.update_x:
                msg.append((p + "coord_in.weight", 1))
                perms[f"l{i}_coord"] = ((p + "coord_in.weight", 0), (p + "coord_in.bias", 0), (p + "coord_out.weight", 1))
            if layer.update_x and layer.velocity:
                h_stream.append((p + "vel_in.weight", 1))
                perms[f"l{i}_vel"] = ((p + "vel_in.weight", 0), (p + "vel_in.bias", 0), (p + "vel_out.weight", 1))
            if layer.update_h:
                msg.append((p + "node_m.weight", 1))
                h_stream += [(p + "node_h.weight", 1), (p + "node_out.weight", 0), (p + "node_out.bias", 0)]
                perms[f"l{i}_node"] = ((p + "node_h.weight", 0), (p + "node_h.bias", 0), (p + "node_m.weight", 0), (p + "node_out.weight", 1))
            perms[f"l{i}_msg"] = tuple(msg)
        if not self.points_out:
            h_stream.append(("head.layers.0.weight", 1))
            perms.update(self.head.perm_pairs("head.", "head_"))
        return PermSpec({"h": tuple(h_stream), **perms})
