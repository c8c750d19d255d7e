"""Baseline architectures: no built-in symmetry beyond the permutations of their hidden units.

mlp       flattened input -> `depth` hidden layers of `width` units -> output
set_mlp   one linear embedding shared by all points, then an MLP on the concatenated embeddings
cnn_s     the 2,464-parameter "CNN-s" of the published MNIST model zoos (Schürholt et al. 2022)
cnn       `depth` 3x3 convs of `width` channels (2x2 max-pool after every second), global average pool
resnet20  ResNet-20 with GroupNorm(1, C) in place of BatchNorm (vmap-safe, permutation-equivariant)

Every module maps x [B, *task.input_shape] to [B, *task.output_shape] and lists its hidden
permutations in `perm_spec()`. Weights that feed a flatten are stored unflattened (`FlatLinear`), so
that a channel permutation before the flatten is one weight axis.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from tasks.base import Task
from zoos.archs.base import ArchError, PopDropout, SymModule, make_activation, register_arch
from zoos.archs.layers import FlatLinear, MLPStack, check_positive
from zoos.permspec import PermSpec


def _out_features(task: Task) -> int:
    return math.prod(task.output_shape)


@register_arch(
    "mlp",
    equivariant=False,
    symmetry="none",
    input_kinds=("image", "points", "vector"),
    example_task=("mnist", {}),
    description="multilayer perceptron on the flattened input",
    width=64,
    depth=2,
    activation="relu",
    dropout=0.0,
)
class MLP(SymModule):
    """Flatten, `depth` hidden layers of `width` units with activation and dropout, linear output."""

    def __init__(self, task: Task, width: int, depth: int, activation: str, dropout: float):
        super().__init__()
        check_positive("mlp", "width", width)
        check_positive("mlp", "depth", depth, minimum=0)
        self.out_shape = tuple(task.output_shape)
        self.net = MLPStack(math.prod(task.input_shape), width, depth, _out_features(task), activation, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1)).reshape(-1, *self.out_shape)

    def perm_spec(self) -> PermSpec:
        return PermSpec(self.net.perm_pairs("net."))


@register_arch(
    "set_mlp",
    equivariant=False,
    symmetry="none",
    input_kinds=("points",),
    example_task=("o5_regression", {}),
    description="per-point linear embedding, then an MLP on the concatenation (order-dependent set baseline)",
    width=64,
    depth=2,
    embed=16,
    activation="relu",
    dropout=0.0,
)
class SetMLP(SymModule):
    """Embed each point with one shared linear map + activation, concatenate in input order, then an MLP."""

    def __init__(self, task: Task, width: int, depth: int, embed: int, activation: str, dropout: float):
        super().__init__()
        check_positive("set_mlp", "width", width)
        check_positive("set_mlp", "depth", depth)
        check_positive("set_mlp", "embed", embed)
        n, d = task.input_shape
        self.out_shape = tuple(task.output_shape)
        self.embed = nn.Linear(d, embed)
        self.act = make_activation(activation)
        self.first = FlatLinear((n, embed), width)  # weight [width, n, embed]: axis 2 is the embedding
        self.first_act = make_activation(activation)
        self.first_drop = PopDropout(dropout)
        self.net = MLPStack(width, width, depth - 1, _out_features(task), activation, dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.embed(x))
        h = self.first_drop(self.first_act(self.first(h)))
        return self.net(h).reshape(-1, *self.out_shape)

    def perm_spec(self) -> PermSpec:
        perms = {
            "embed": (("embed.weight", 0), ("embed.bias", 0), ("first.weight", 2)),
            "first": (("first.weight", 0), ("first.bias", 0), ("net.layers.0.weight", 1)),
        }
        return PermSpec({**perms, **self.net.perm_pairs("net.")})


def _spatial_after(size: int, steps: list[tuple[str, int]]) -> int:
    """Spatial size after a list of ("conv", k) valid convolutions and ("pool", 2) max-pools."""
    for kind, k in steps:
        size = size - k + 1 if kind == "conv" else size // k
    return size


@register_arch(
    "cnn_s",
    equivariant=False,
    symmetry="none",
    input_kinds=("image",),
    example_task=("mnist", {}),
    description="the 2,464-parameter CNN-s of the published MNIST model zoos (valid convs 8-6-4, dense 20)",
    activation="tanh",
    dropout=0.0,
)
class CNNS(SymModule):
    """conv 8@5x5, pool, act, conv 6@5x5, pool, act, conv 4@2x2, act, flatten, dense 20, act, dense out.

    Channels are fixed as published; the first conv's in-channels and the dense layer's in-features
    follow the task's image. `fc1.weight` is stored as [20, 4, h, w] (a reshape of the published
    [20, 36] matrix on 28x28 inputs) so that conv3's channel permutation is one axis.
    """

    def __init__(self, task: Task, activation: str, dropout: float):
        super().__init__()
        c, h, w = task.input_shape
        steps = [("conv", 5), ("pool", 2), ("conv", 5), ("pool", 2), ("conv", 2)]
        sh, sw = _spatial_after(h, steps), _spatial_after(w, steps)
        if sh < 1 or sw < 1:
            raise ArchError(
                f"architecture 'cnn_s' needs images of at least 28x28 pixels for its valid convolutions; "
                f"task {task.name!r} has {h}x{w}"
            )
        self.conv1 = nn.Conv2d(c, 8, 5)
        self.conv2 = nn.Conv2d(8, 6, 5)
        self.conv3 = nn.Conv2d(6, 4, 2)
        self.fc1 = FlatLinear((4, sh, sw), 20)
        self.fc2 = nn.Linear(20, _out_features(task))
        self.pool = nn.MaxPool2d(2)
        self.acts = nn.ModuleList(make_activation(activation) for _ in range(4))
        self.drop = PopDropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        a = self.acts
        x = a[0](self.pool(self.conv1(x)))
        x = a[1](self.pool(self.conv2(x)))
        x = a[2](self.conv3(x))
        x = self.drop(a[3](self.fc1(x)))
        return self.fc2(x)

    def perm_spec(self) -> PermSpec:
        return PermSpec(
            {
                "conv1": (("conv1.weight", 0), ("conv1.bias", 0), ("conv2.weight", 1)),
                "conv2": (("conv2.weight", 0), ("conv2.bias", 0), ("conv3.weight", 1)),
                "conv3": (("conv3.weight", 0), ("conv3.bias", 0), ("fc1.weight", 1)),
                "fc1": (("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)),
            }
        )


@register_arch(
    "cnn",
    equivariant=False,
    symmetry="none",
    input_kinds=("image",),
    example_task=("mnist", {}),
    description="width-parameterised CNN: 3x3 convs, max-pool after every second, global average pool, linear head",
    width=32,
    depth=4,
    activation="relu",
    dropout=0.0,
)
class CNN(SymModule):
    """`depth` 'same' 3x3 convs of `width` channels; 2x2 max-pool after every second conv while the map is >= 4."""

    def __init__(self, task: Task, width: int, depth: int, activation: str, dropout: float):
        super().__init__()
        check_positive("cnn", "width", width)
        check_positive("cnn", "depth", depth)
        c, h, _ = task.input_shape
        self.convs = nn.ModuleList(nn.Conv2d(c if i == 0 else width, width, 3, padding=1) for i in range(depth))
        self.acts = nn.ModuleList(make_activation(activation) for _ in range(depth))
        self.drops = nn.ModuleList(PopDropout(dropout) for _ in range(depth))
        self.pool_after: list[bool] = []
        for i in range(depth):
            pool = i % 2 == 1 and i < depth - 1 and h >= 4
            self.pool_after.append(pool)
            h = h // 2 if pool else h
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(width, _out_features(task))

    def forward(self, x: Tensor) -> Tensor:
        for conv, act, drop, pool in zip(self.convs, self.acts, self.drops, self.pool_after):
            x = drop(act(conv(x)))
            if pool:
                x = self.pool(x)
        return self.head(x.mean(dim=(-2, -1)))

    def perm_spec(self) -> PermSpec:
        n = len(self.convs)
        perms = {}
        for i in range(n):
            nxt = (f"convs.{i + 1}.weight", 1) if i + 1 < n else ("head.weight", 1)
            perms[f"conv{i}"] = ((f"convs.{i}.weight", 0), (f"convs.{i}.bias", 0), nxt)
        return PermSpec(perms)


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with one group: statistics over (C, H, W) are permutation invariant, affine is per channel."""
    return nn.GroupNorm(1, channels)


class BasicBlock(nn.Module):
    """conv3x3 -> norm -> act -> conv3x3 -> norm, plus the shortcut (1x1 conv + norm when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int, activation: str, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(c_out)
        self.act1, self.act2 = make_activation(activation), make_activation(activation)
        self.drop = PopDropout(dropout)
        self.has_shortcut = stride != 1 or c_in != c_out
        if self.has_shortcut:
            self.shortcut_conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
            self.shortcut_norm = _norm(c_out)

    def forward(self, x: Tensor) -> Tensor:
        out = self.drop(self.act1(self.norm1(self.conv1(x))))
        out = self.norm2(self.conv2(out))
        skip = self.shortcut_norm(self.shortcut_conv(x)) if self.has_shortcut else x
        return self.act2(out + skip)


@register_arch(
    "resnet20",
    equivariant=False,
    symmetry="none",
    input_kinds=("image",),
    example_task=("cifar10", {}),
    description="ResNet-20 (3 stages x 3 basic blocks) with GroupNorm(1, C); channels 16/32/64 x width",
    width=1.0,
    activation="relu",
    dropout=0.0,
)
class ResNet20(SymModule):
    """The CIFAR ResNet-20 of He et al. with LayerNorm-style GroupNorm(1, C); one permutation per stage's stream."""

    def __init__(self, task: Task, width: float, activation: str, dropout: float):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
            raise ArchError(f"architecture 'resnet20': width must be a positive multiplier, got {width!r}")
        chans = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.stem = nn.Conv2d(task.input_shape[0], chans[0], 3, padding=1, bias=False)
        self.stem_norm = _norm(chans[0])
        self.stem_act = make_activation(activation)
        blocks, c_in = [], chans[0]
        for s, c in enumerate(chans):
            for b in range(3):
                blocks.append(BasicBlock(c_in, c, 2 if (s > 0 and b == 0) else 1, activation, dropout))
                c_in = c
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(chans[-1], _out_features(task))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem_act(self.stem_norm(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(-2, -1)))

    def perm_spec(self) -> PermSpec:
        stream: dict[int, list[tuple[str, int]]] = {
            0: [("stem.weight", 0), ("stem_norm.weight", 0), ("stem_norm.bias", 0)],
            1: [],
            2: [("head.weight", 1)],
        }
        perms: dict[str, tuple[tuple[str, int], ...]] = {}
        for i, block in enumerate(self.blocks):
            s, p = i // 3, f"blocks.{i}."
            src = s - 1 if block.has_shortcut and s > 0 else s  # the stream this block reads
            stream[src].append((p + "conv1.weight", 1))
            stream[s] += [(p + "conv2.weight", 0), (p + "norm2.weight", 0), (p + "norm2.bias", 0)]
            if block.has_shortcut:
                stream[src].append((p + "shortcut_conv.weight", 1))
                stream[s] += [(p + "shortcut_conv.weight", 0), (p + "shortcut_norm.weight", 0), (p + "shortcut_norm.bias", 0)]
            perms[f"block{i}"] = (
                (p + "conv1.weight", 0),
                (p + "norm1.weight", 0),
                (p + "norm1.bias", 0),
                (p + "conv2.weight", 1),
            )
        return PermSpec({**{f"stage{s}": tuple(pairs) for s, pairs in stream.items()}, **perms})
