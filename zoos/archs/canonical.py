"""Learned canonicalization (Kaba et al., ICML 2023): a small equivariant network picks a group element per
input, the input is moved back by it, and any unconstrained backbone reads the result.

canon_cnn  images (C4 / D4): a p4 / p4m group CNN scores every element, the argmax g* is the canonical
           element, the backbone (cnn, mlp, ...) reads T_{g*}^-1 x: exactly invariant (labels are)
fa_cnn     images (C4 / D4): frame averaging with the whole group as the frame, the mean of a backbone's
           outputs over the |G| transformed copies of the input: exactly invariant, |G| times the backbone's cost
canon_mlp  points (O(d) / E(d)): d equivariant vectors sum_i w_i r_i with invariant weights, Gram-Schmidt
           into a frame F, an MLP on x in F, outputs mapped back by F: exactly invariant / equivariant

The symmetry is exact by construction: if x -> g.x moves the canonicalizer's choice to g.c(x), the
backbone sees the same canonical input. Everything is tensor ops without control flow on the data, so the
population program (`zoos.fastpop`) traces it. `prior_weight` is the paper's canonicalization prior as a
zoo factor: `prior_terms(x)` says per sample how far the canonicalizer is from the identity on (upright)
data, and the trainer adds prior_weight times their batch mean to each model's loss (`prior_loss`), on
the population program and on vmap alike (`zoos.trainer`, any architecture with `prior_terms`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.base import Task
from zoos.archs.base import ARCHS, ArchError, SymModule, build_arch, register_arch
from zoos.archs.equivariant import FrameAvg, GroupConvNet, _group_tables, _transform
from zoos.archs.layers import MLPStack, check_positive
from zoos.permspec import PermSpec

_ELEMENTS = {"C4": [(k, 0) for k in range(4)], "D4": [(k, f) for f in (0, 1) for k in range(4)]}


def _check_prior(arch: str, prior_weight: float) -> float:
    if isinstance(prior_weight, bool) or not isinstance(prior_weight, (int, float)) or not prior_weight >= 0:
        raise ArchError(f"architecture {arch!r}: prior_weight must be a number >= 0, got {prior_weight!r}")
    return float(prior_weight)


_WRAPPERS = ("canon_cnn", "fa_cnn")  # image families that wrap a backbone: not a backbone themselves


def _check_backbone(arch: str, backbone: str) -> None:
    if backbone not in ARCHS or backbone in _WRAPPERS:
        allowed = ", ".join(n for n, a in sorted(ARCHS.items()) if "image" in a.input_kinds and n not in _WRAPPERS)
        raise ArchError(f"architecture {arch!r}: backbone {backbone!r} is not allowed; choose one of {allowed}")


def _backbone_projections(model: SymModule, group) -> dict:
    """A wrapper's weights the group constrains: its backbone's, against the backbone's own equivariant subspace.
    The wrapper is invariant by construction whatever its backbone's weights; this is how equivariant the
    backbone's learned weights are (a canonicalizer's group convolutions are equivariant for any weights)."""
    from zoos.equivariance import projections

    return {f"backbone.{k}": p for k, p in projections(model.backbone, group).items()}


def _joined(**parts: PermSpec) -> PermSpec:
    """The sub-modules' specs as one: each part's state-dict prefix (its keyword) on every key, permutation and
    block-group name, so a transformer backbone keeps its heads."""
    perms, blocks = {}, {}
    for prefix, spec in parts.items():
        perms.update({f"{prefix}.{name}": tuple((f"{prefix}.{key}", axis) for key, axis in pairs)
                      for name, pairs in spec.perms.items()})
        blocks.update({f"{prefix}.{name}": (f"{prefix}.{group}", n) for name, (group, n) in spec.blocks.items()})
    return PermSpec(perms, blocks)


class GroupScores(GroupConvNet):
    """A group CNN whose bias-free head reads each group element's pooled features: one score per element,
    [B, |G|]. Rotating the input permutes the scores (score_g(T_h x) = score_{h^-1 g}(x)), so argmax -> h g*."""

    arch_name = "canon_cnn"

    def __init__(self, task: Task, group: str, width: int, depth: int, kernel: int):
        self.elements = _ELEMENTS[group]
        super().__init__(task, width, depth, kernel, "relu", 0.0, "max", out_features=1, head_bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).transpose(1, 2))[..., 0]


@register_arch(
    "canon_cnn",
    equivariant=True,
    symmetry="the task's C4 / D4 (rot90, flips), by canonicalization",
    input_kinds=("image",),
    example_task=("digits", {"group": "C4", "variant": "rotated"}),
    description="learned canonicalization (Kaba et al. 2023): a group CNN picks the pose, a backbone classifies the un-rotated image",
    width=4,
    depth=2,
    kernel=3,
    backbone="cnn",
    backbone_config={},
    prior_weight=0.0,
)
class CanonCNN(SymModule):
    """f(x) = backbone(T_{g*}^-1 x), g* = argmax_g canon(x)_g over the task's group's elements.

    In the forward, the canonical image is sum_g w_g T_g^-1 x over all |G| transformed copies, with w the
    one-hot of the argmax (so exactly invariant, in training too). In training w is straight-through: its
    gradient is that of softmax(scores), which trains the canonicalizer; in eval mode it is the plain one-hot,
    so derivatives with respect to the input (the Lie derivative) are the function's own: the argmax is
    locally constant.
    """

    def __init__(self, task: Task, width: int, depth: int, kernel: int, backbone: str, backbone_config: dict,
                 prior_weight: float):
        super().__init__()
        group = getattr(task.group, "name", None)
        if group not in _ELEMENTS:
            raise ArchError(f"architecture 'canon_cnn' canonicalizes for C4 or D4; task {task.name!r} has group {group}")
        _check_backbone("canon_cnn", backbone)
        self.prior_weight = _check_prior("canon_cnn", prior_weight)
        self.elements = _ELEMENTS[group]
        self.inverse = _group_tables(self.elements)[1]  # plain data: index of g^-1 for each g
        self.canon = GroupScores(task, group, width, depth, kernel)
        self.backbone = build_arch(backbone, task, **dict(backbone_config))

    def scores(self, x: Tensor) -> Tensor:
        """[B, |G|]: the canonicalizer's score for each group element."""
        return self.canon(x)

    def canonicalize(self, x: Tensor) -> Tensor:
        """T_{g*}^-1 x, as a one-hot weighted sum over the |G| transformed copies (straight-through in training)."""
        s = self.scores(x)
        soft = s.softmax(-1)
        hard = (torch.arange(s.shape[-1], device=s.device) == s.argmax(-1, keepdim=True)).to(x.dtype)  # one-hot (vmap-safe)
        w = hard + (soft - soft.detach()) if self.training else hard  # exactly the one-hot; in training softmax's gradient
        copies = torch.stack([_transform(self.elements[i], x) for i in self.inverse], 1)  # [B, G, C, H, W]
        return (w[:, :, None, None, None] * copies).sum(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(self.canonicalize(x))

    def prior_terms(self, x: Tensor) -> Tensor:
        """Each sample's cross-entropy of the scores against the identity [B]: on upright data, prefer no rotation."""
        target = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # the identity is element 0
        return F.cross_entropy(self.scores(x).float(), target, reduction="none")

    def prior_loss(self, x: Tensor) -> Tensor:
        """prior_weight * the mean of `prior_terms`: what training adds to the task's loss."""
        return self.prior_weight * self.prior_terms(x).mean()

    def perm_spec(self) -> PermSpec:
        return _joined(canon=self.canon.perm_spec(), backbone=self.backbone.perm_spec())

    def equivariance_projections(self, group) -> dict:
        return _backbone_projections(self, group)


@register_arch(
    "fa_cnn",
    equivariant=True,
    symmetry="the task's C4 / D4 (rot90, flips), by averaging over the group",
    input_kinds=("image",),
    example_task=("digits", {"group": "C4", "variant": "rotated"}),
    description="frame averaging (Puny et al. 2022) on images: a backbone's outputs averaged over the group's copies of the input",
    backbone="cnn",
    backbone_config={},
)
class FrameAvgCNN(SymModule):
    """f(x) = mean_g backbone(T_g x) over the task's finite group (C4: 4 rotations, D4: with flips).

    For a finite group the frame is the whole group, so frame averaging is the symmetrisation: the copies of
    g.x are those of x in another order, and their mean is exactly invariant. The copies run through the
    backbone as one batch of |G| B images; the outputs are invariant (class scores), as the image tasks' are.
    """

    def __init__(self, task: Task, backbone: str, backbone_config: dict):
        super().__init__()
        group = getattr(task.group, "name", None)
        if group not in _ELEMENTS:
            raise ArchError(f"architecture 'fa_cnn' averages over C4 or D4; task {task.name!r} has group {group}")
        _check_backbone("fa_cnn", backbone)
        self.elements = _ELEMENTS[group]
        self.backbone = build_arch(backbone, task, **dict(backbone_config))

    def forward(self, x: Tensor) -> Tensor:
        copies = torch.stack([_transform(g, x) for g in self.elements], 1)  # [B, G, C, H, W]
        y = self.backbone(copies.flatten(0, 1))
        return y.unflatten(0, (x.shape[0], len(self.elements))).mean(1)

    def perm_spec(self) -> PermSpec:
        return _joined(backbone=self.backbone.perm_spec())

    def equivariance_projections(self, group) -> dict:
        return _backbone_projections(self, group)


@register_arch(
    "canon_mlp",
    equivariant=True,
    symmetry="the task's O(d) / E(d), not S_n (Euclidean; exact where the d predicted vectors are independent)",
    input_kinds=("points",),
    example_task=("inertia", {}),
    description="learned canonicalization (Kaba et al. 2023): a Gram-Schmidt frame of learned equivariant vectors, an MLP in it",
    width=64,
    depth=2,
    activation="relu",
    dropout=0.0,
    canon_width=16,
    canon_depth=1,
    prior_weight=0.0,
)
class CanonMLP(FrameAvg):
    """frame_avg with one learned frame in place of the 2^d PCA frames: f(x) = rho_out(F) . MLP(x expressed in F).

    The canonicalizer predicts d vectors u_k = sum_i sum_c w_ikc v_ic over the input vectors v_ic (positions
    centred) with invariant weights w from a per-point MLP of the point's scalars and squared norms, so
    u_k -> R u_k (the MLP also reads the point's index: the model is not S_n-invariant anyway, and the weights
    then differ per point from the start, so the u_k are well conditioned). Gram-Schmidt of u_1..u_d-1 and the
    orthogonal complement signed by u_d keep that: F -> R F for every orthogonal R (reflections included), and x
    in F is invariant. Exact wherever the u_k are linearly independent. u_d enters through a sign only, so the
    weights producing it get no gradient: they choose the handedness and stay as drawn.
    """

    def __init__(self, task: Task, width: int, depth: int, activation: str, dropout: float, canon_width: int,
                 canon_depth: int, prior_weight: float):
        super().__init__(task, width, depth, activation, dropout)
        check_positive("canon_mlp", "canon_width", canon_width)
        check_positive("canon_mlp", "canon_depth", canon_depth, minimum=0)
        self.prior_weight = _check_prior("canon_mlp", prior_weight)
        lay = self.layout
        self.signs = [(1.0,) * lay.d]  # one frame: FrameAvg's average is over this one
        n_vec = len(lay.positions) + len(lay.vectors)
        if lay.n * n_vec < lay.d:
            raise ArchError(f"architecture 'canon_mlp' needs at least d = {lay.d} input vectors to span a frame; "
                            f"task {task.name!r} has {lay.n * n_vec}")
        self.canon = MLPStack(len(lay.scalars) + n_vec + lay.n, canon_width, canon_depth, lay.d * n_vec, activation, 0.0)

    def frames(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The learned frame [B, 1, d, d] (columns are the axes) and the centroid of the first position group."""
        lay = self.layout
        vs = [x[..., list(c)] - x[..., list(c)].mean(-2, keepdim=True) for c in lay.positions]
        vs += [x[..., list(c)] for c in lay.vectors]
        v = torch.stack(vs, -2)  # [B, n, groups, d]
        where = torch.eye(lay.n, dtype=x.dtype, device=x.device).expand(x.shape[0], -1, -1)  # which point: the frame
        feats = torch.cat([x[..., list(lay.scalars)], (v * v).sum(-1), where], -1)  # is well conditioned from the start
        w = self.canon(feats).unflatten(-1, (v.shape[-2], lay.d))  # [B, n, groups, d]: invariant weights
        u = torch.einsum("bngk,bngi->bki", w, v)  # [B, d, d]: d equivariant vectors (rows)
        d, axes = lay.d, []
        for k in range(d - 1):  # Gram-Schmidt
            a = u[:, k]
            for e in axes:
                a = a - (a * e).sum(-1, keepdim=True) * e
            axes.append(a / a.norm(dim=-1, keepdim=True))
        # The last axis is fixed up to its sign by the others: their generalised cross product c (c_j = det[e_1..e_d-1,
        # E_j], so R e_i -> det(R) R c), signed by u_d. Not GS on u_d, whose gradient would be rounding noise only.
        a = torch.stack(axes, -1) if axes else u.new_zeros(u.shape[0], d, 0)  # [B, d, d-1]
        unit = torch.eye(d, dtype=u.dtype, device=u.device)[:, :, None].expand(u.shape[0], d, d, 1)
        c = torch.linalg.det(torch.cat([a[:, None].expand(-1, d, -1, -1), unit], -1))  # [B, d]
        last = torch.sign((u[:, d - 1] * c).sum(-1, keepdim=True)) * c
        centroid = x[..., list(lay.positions[0])].mean(-2) if lay.positions else None
        return torch.cat([a, last[..., None]], -1)[:, None], centroid

    def prior_terms(self, x: Tensor) -> Tensor:
        """Each sample's ||F - I||^2 [B]: on upright data, prefer the identity frame."""
        f = self.frames(x)[0][:, 0].float()
        return (f - torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)).square().sum((-2, -1))

    def prior_loss(self, x: Tensor) -> Tensor:
        """prior_weight * the mean of `prior_terms`: what training adds to the task's loss."""
        return self.prior_weight * self.prior_terms(x).mean()

    def perm_spec(self) -> PermSpec:
        return PermSpec({**self.net.perm_pairs("net."), **self.canon.perm_pairs("canon.", "canon_")})
