"""Transformers: a small ViT for the image tasks and a set transformer for the point tasks.

vit              patches -> linear embedding + learned positions (+ class token) -> pre-LN blocks -> pool -> head
set_transformer  points -> linear embedding (no positions) -> pre-LN blocks -> mean/sum over points -> head

A block is x + Attention(LN(x)), then x + MLP(LN(x)). Attention is written with four explicit Linear
projections and `attend` (no nn.MultiheadAttention, no data-dependent control flow in the traced forward), so
that a stacked population runs the projections as batched matmuls and attention over its whole batch of
samples, and vmap alike.

Symmetries, as `perm_spec()` lists them:
  stream      the residual stream's features, shared by every block through the LayerNorms (statistics over
              all features are permutation invariant, the affine is per feature)
  block{i}.mlp    the MLP's hidden units
  block{i}.qk     query/key dimensions: a head permutation moving whole heads, and inside each head one
                  permutation of its dimensions applied to Q and K rows alike (scores sum q_j k_j over a head)
  block{i}.vo     value/output dimensions: the same head permutation, and per head one permutation of V's
                  rows and O's columns
qk and vo are one block group (`block{i}.heads`): they move the heads together and permute inside the heads
independently. The set transformer has no positions, so attention (equivariant to permuting tokens) followed
by a pool over points is invariant to permuting the points by construction.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.base import Task
from zoos.archs.base import ArchError, PopDropout, SymModule, make_activation, register_arch
from zoos.archs.layers import check_choice, check_positive
from zoos import popattn
from zoos.permspec import PermSpec


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale) v over the last two axes. On a GPU: `zoos.popattn`'s kernel for a zoo's short
    sequences and narrow heads (one program holds whole problems; outside torch.func's transforms, which it
    has no rule for), else one fused flash kernel where the [.., T, T] scores would outweigh q, k and v
    (T > 3 head_dim; it never stores them). Otherwise the plain products (which vmap batches; the CPU's fused
    kernel has no batching rule). A leaf of torch.fx traces (fx.wrap), so a population program runs it on its
    stacked batch of samples."""
    if q.is_cuda:
        if (popattn.fits(q.shape[-2], q.shape[-1]) and popattn.available(q.device) and q.dtype == k.dtype == v.dtype
                and q.shape == k.shape == v.shape and not torch._C._are_functorch_transforms_active()):
            return popattn.attention(q, k, v, scale)
        if q.shape[-2] > 3 * q.shape[-1]:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return (q @ k.transpose(-2, -1) * scale).softmax(-1) @ v


torch.fx.wrap("attend")


class Attention(nn.Module):
    """Multi-head self-attention over the token axis of x [B, T, D]: softmax(q k^T / sqrt(head_dim)) v per head, then o."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width, bias=False)  # a key bias adds q . b_k to all of a query's scores: softmax ignores it
        self.v = nn.Linear(width, width)
        self.o = nn.Linear(width, width)

    def _split(self, t: Tensor) -> Tensor:
        """[B, T, H * hd] -> [B, H, T, hd]: head h is the h-th block of head_dim features."""
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(-3, -2)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        return self.o(attend(q, k, v, self.scale).transpose(-3, -2).flatten(-2))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(norm1(x)), then x + fc2(drop(act(fc1(norm2(x)))))."""

    def __init__(self, width: int, heads: int, mlp_width: int, activation: str, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_width)
        self.act = make_activation(activation)
        self.drop = PopDropout(dropout)
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.drop(self.act(self.fc1(self.norm2(x)))))


class TransformerBase(SymModule):
    """The shared trunk: `embed` (set by the subclass), `depth` blocks, a final LayerNorm, a linear head.

    Construction draws in module order (token parameters first, then every Linear); `reset_parameters`
    redraws the same way, so a population's init replays it.
    """

    def _trunk(self, task: Task, width: int, depth: int, heads: int, mlp_ratio: float, activation: str, dropout: float,
               in_features: int) -> None:
        name = self.arch_name
        check_positive(name, "width", width)
        check_positive(name, "depth", depth)
        check_positive(name, "heads", heads)
        if width % heads:
            raise ArchError(f"architecture {name!r}: width {width} is not a multiple of heads {heads} "
                            f"(each head takes width / heads features)")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise ArchError(f"architecture {name!r}: mlp_ratio must be a positive number, got {mlp_ratio!r}")
        self.heads, self.out_shape = heads, tuple(task.output_shape)
        self.embed = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(
            Block(width, heads, max(1, round(width * mlp_ratio)), activation, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, math.prod(self.out_shape))

    def _reset_tokens(self) -> None:
        """Draw the token parameters (positions, class token): none here."""

    def reset_parameters(self) -> None:
        """The whole model's init in construction order: token parameters, then every Linear / LayerNorm."""
        self._reset_tokens()
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.LayerNorm)):
                m.reset_parameters()

    def _trunk_forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def _stream(self, own: list[tuple[str, int]]) -> dict[str, tuple[tuple[str, int], ...]]:
        """The permutations of the trunk: the residual stream (with `own` pairs of the subclass), and per block
        its MLP units and its attention's qk / vo permutations."""
        stream = [("embed.weight", 0), ("embed.bias", 0), *own]
        perms: dict[str, tuple[tuple[str, int], ...]] = {}
        for i in range(len(self.blocks)):
            p, a = f"blocks.{i}.", f"blocks.{i}.attn."
            stream += [(p + "norm1.weight", 0), (p + "norm1.bias", 0), (a + "q.weight", 1), (a + "k.weight", 1),
                       (a + "v.weight", 1), (a + "o.weight", 0), (a + "o.bias", 0), (p + "norm2.weight", 0),
                       (p + "norm2.bias", 0), (p + "fc1.weight", 1), (p + "fc2.weight", 0), (p + "fc2.bias", 0)]
            perms[f"block{i}.qk"] = ((a + "q.weight", 0), (a + "q.bias", 0), (a + "k.weight", 0))
            perms[f"block{i}.vo"] = ((a + "v.weight", 0), (a + "v.bias", 0), (a + "o.weight", 1))
            perms[f"block{i}.mlp"] = ((p + "fc1.weight", 0), (p + "fc1.bias", 0), (p + "fc2.weight", 1))
        stream += [("norm.weight", 0), ("norm.bias", 0), ("head.weight", 1)]
        return {"stream": tuple(stream), **perms}

    def _spec(self, own: list[tuple[str, int]]) -> PermSpec:
        blocks = {f"block{i}.{kind}": (f"block{i}.heads", self.heads) for i in range(len(self.blocks)) for kind in ("qk", "vo")}
        return PermSpec(self._stream(own), blocks)


_TRUNK_DEFAULTS = dict(width=32, depth=2, heads=4, mlp_ratio=2.0, activation="gelu", dropout=0.0)


@register_arch(
    "vit",
    equivariant=False,
    symmetry="none",
    input_kinds=("image",),
    example_task=("mnist", {}),
    description="small Vision Transformer: patch embedding, learned positions, pre-LN attention blocks, class token or mean pool",
    patch=4,
    pool="cls",
    **_TRUNK_DEFAULTS,
)
class ViT(TransformerBase):
    """Non-overlapping `patch` x `patch` patches, flattened and embedded by one Linear; learned positions;
    `pool="cls"` reads a class token, `pool="mean"` averages the patch tokens.

    The class token enters as a zero token prepended to the patches whose position row is `cls + pos[0]`:
    the same function as concatenating a learned token, with no per-sample copy of a weight.
    """

    def __init__(self, task: Task, width: int, depth: int, heads: int, mlp_ratio: float, activation: str,
                 dropout: float, patch: int, pool: str):
        super().__init__()
        check_positive("vit", "patch", patch)
        self.pool = check_choice("vit", "pool", pool, ("cls", "mean"))
        c, h, w = task.input_shape
        if h % patch or w % patch:
            raise ArchError(f"architecture 'vit': patch {patch} does not divide the {h}x{w} images of task {task.name!r}")
        self.patch, self.grid = patch, (h // patch, w // patch)
        tokens = self.grid[0] * self.grid[1] + (pool == "cls")
        self.pos = nn.Parameter(torch.empty(tokens, width))
        self.cls = nn.Parameter(torch.empty(width)) if pool == "cls" else None
        self._reset_tokens()
        self._trunk(task, width, depth, heads, mlp_ratio, activation, dropout, c * patch * patch)

    def _reset_tokens(self) -> None:
        with torch.no_grad():
            nn.init.normal_(self.pos, std=0.02)
            if self.cls is not None:
                nn.init.normal_(self.cls, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        p = self.patch
        x = x.unflatten(2, (self.grid[0], p)).unflatten(4, (self.grid[1], p))  # [B, C, gh, p, gw, p]
        x = self.embed(x.permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2))  # [B, T, D], patches row-major
        if self.cls is None:
            x = self._trunk_forward(x + self.pos)
            return self.head(x.mean(1))
        first = F.pad(self.cls.unsqueeze(0), (0, 0, 0, self.pos.shape[0] - 1))
        x = self._trunk_forward(F.pad(x, (0, 0, 1, 0)) + (self.pos + first))
        return self.head(x[:, 0])

    def perm_spec(self) -> PermSpec:
        own = [("pos", 1)] + ([("cls", 0)] if self.cls is not None else [])
        return self._spec(own)


@register_arch(
    "set_transformer",
    equivariant=True,
    symmetry="S_n (point permutations)",
    input_kinds=("points",),
    example_task=("convex_hull", {}),
    description="set transformer: per-point embedding, pre-LN self-attention blocks without positions, mean/sum pool",
    pool="mean",
    **_TRUNK_DEFAULTS,
)
class SetTransformer(TransformerBase):
    """Each point's features embedded by one Linear; attention blocks (equivariant to permuting the points);
    a mean or sum over the points (invariant), then the head."""

    def __init__(self, task: Task, width: int, depth: int, heads: int, mlp_ratio: float, activation: str,
                 dropout: float, pool: str):
        super().__init__()
        self.pool = check_choice("set_transformer", "pool", pool, ("mean", "sum"))
        self._trunk(task, width, depth, heads, mlp_ratio, activation, dropout, task.input_shape[-1])

    def forward(self, x: Tensor) -> Tensor:
        x = self._trunk_forward(self.embed(x))
        x = x.mean(1) if self.pool == "mean" else x.sum(1)
        return self.head(x).reshape(-1, *self.out_shape)

    def perm_spec(self) -> PermSpec:
        return self._spec([])
