"""Architectures of published model zoos, so that imported weights load and compute what their authors' code did.

small_cnn_zoo    Unterthiner et al. 2020 (google-research `dnn_predict_accuracy`, `build_cnn`): `depth` Keras
                 Conv2D(width, 3x3, stride, 'valid', activation) [+ Dropout], GlobalAveragePooling2D, Dense
model_zoos_cnn   Schürholt et al. 2022 (ModelZoos/ModelZooDataset `def_net.py`): CNN (CNN-s), CNN2 and CNN3 (CNN-m)
resnet18_width   the ResNet-18 of the Phase-Transition model zoo (ModelZoos/PhaseTransitionModelZoo `ResNet18_width`,
                 also the Model Zoos' "Resnet18" at width 64): torchvision BasicBlocks, a 3x3 stride-1 stem without
                 max-pool, channels width x (1, 2, 4, 8), BatchNorm

The input pipeline the publication applied (grayscale, crop, resize, scaling) is part of the architecture's
config as `preprocess`, since symzoo's image tasks give images in [0, 1]: see `Preprocess`. Parameter names
follow the publications where they are torch (torchvision names for the ResNet); the Sequential CNNs get
named layers, and the dense layer after a flatten keeps its input unflattened (`FlatLinear`) so that the last
conv's channel permutation is one weight axis.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.base import Task
from zoos.archs.base import ArchError, SymModule, register_arch
from zoos.archs.layers import FlatLinear, check_choice, check_positive
from zoos.permspec import PermSpec

# Activations by the names the publications' configs use, and symzoo's `leaky_relu` (the name a study's grid
# allows). LeakyReLU is torch's default slope 0.01 (Model Zoos).
CONFIG_ACTIVATIONS: dict[str, Any] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "selu": nn.SELU, "elu": nn.ELU, "gelu": nn.GELU,
    "silu": nn.SiLU, "leakyrelu": nn.LeakyReLU, "leaky_relu": nn.LeakyReLU, "softplus": nn.Softplus,
    "linear": nn.Identity,
}  # fmt: skip
GRAYSCALE = ("mean", "luma")
PREPROCESS_KEYS = ("grayscale", "crop", "resize", "mean", "std")


def _activation(arch: str, name: str) -> nn.Module:
    return CONFIG_ACTIVATIONS[check_choice(arch, "activation", str(name).lower(), tuple(CONFIG_ACTIVATIONS))]()


class Preprocess(nn.Module):
    """The publication's input pipeline on [0, 1] images, in this order: grayscale ("mean": channel mean as
    TF's `reduce_mean`; "luma": 0.299 R + 0.587 G + 0.114 B as torchvision's Grayscale), centre crop to `crop`
    pixels, bilinear antialiased resize to `resize` (torchvision's Resize of a PIL image, up to its uint8
    rounding), then (x - mean) / std per channel. Holds no state: nothing in it is trained or permuted."""

    def __init__(self, arch: str, input_shape: tuple[int, ...], spec: dict[str, Any] | None):
        super().__init__()
        spec = dict(spec or {})
        unknown = sorted(set(spec) - set(PREPROCESS_KEYS))
        if unknown:
            raise ArchError(f"architecture {arch!r}: preprocess has no field {unknown[0]!r}; allowed: {', '.join(PREPROCESS_KEYS)}")
        c, h, w = input_shape
        self.grayscale = spec.get("grayscale")
        if self.grayscale is not None:
            check_choice(arch, "preprocess.grayscale", self.grayscale, GRAYSCALE)
            c = 1
        self.crop = spec.get("crop")
        self.crop_at = (0, 0)
        if self.crop is not None:
            check_positive(arch, "preprocess.crop", self.crop)
            if self.crop > min(h, w):
                raise ArchError(f"architecture {arch!r}: preprocess.crop {self.crop} exceeds the {h}x{w} images")
            self.crop_at = (int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0)))
            h = w = self.crop
        self.resize = None  # decided here from the task's image size, so that forward has no shape-dependent branch
        if spec.get("resize") is not None:
            size = tuple(spec["resize"])
            if len(size) != 2:
                raise ArchError(f"architecture {arch!r}: preprocess.resize must be [height, width], got {spec['resize']!r}")
            size = tuple(check_positive(arch, "preprocess.resize", int(s)) for s in size)
            self.resize = size if size != (h, w) else None
            h, w = size
        self.mean = [float(m) for m in spec.get("mean", [0.0])]
        self.std = [float(s) for s in spec.get("std", [1.0])]
        for field, v in (("mean", self.mean), ("std", self.std)):
            if len(v) not in (1, c):
                raise ArchError(f"architecture {arch!r}: preprocess.{field} has {len(v)} values for {c}-channel inputs")
        if any(s <= 0 for s in self.std):
            raise ArchError(f"architecture {arch!r}: preprocess.std must be positive, got {self.std}")
        self.out_shape = (c, h, w)

    def forward(self, x: Tensor) -> Tensor:
        if self.grayscale == "mean":
            x = x.mean(dim=-3, keepdim=True)
        elif self.grayscale == "luma":
            weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
            x = (x * weights[:, None, None]).sum(dim=-3, keepdim=True)
        if self.crop is not None:
            top, left = self.crop_at
            x = x[..., top : top + self.crop, left : left + self.crop]
        if self.resize is not None:
            x = F.interpolate(x, size=self.resize, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return (x - mean) / std


def _classes(arch: str, task: Task) -> int:
    if len(task.output_shape) != 1:
        raise ArchError(f"architecture {arch!r} is a classifier; task {task.name!r} has outputs of shape {task.output_shape}")
    return int(task.output_shape[0])


@register_arch(
    "small_cnn_zoo",
    equivariant=False,
    symmetry="none",
    input_kinds=("image",),
    example_task=("mnist", {}),
    description="Small CNN Zoo (Unterthiner et al. 2020): 3x3 stride-2 valid convs, global average pool, dense",
    depth=3,
    width=16,
    stride=2,
    activation="relu",
    dropout=0.0,
    preprocess={"grayscale": "mean", "mean": [0.5], "std": [0.5]},
)
class SmallCNNZoo(SymModule):
    """x -> [-1, 1] -> grayscale -> `depth` x (conv 3x3/`stride` valid + activation [+ dropout]) -> spatial mean -> dense.

    The published zoo: depth 3, width 16, stride 2, 4,970 parameters on 1-channel images. Its default
    `preprocess` is the zoo's own: scale [0, 1] to [-1, 1], then average the channels (identity on MNIST).
    """

    def __init__(self, task: Task, depth: int, width: int, stride: int, activation: str, dropout: float,
                 preprocess: dict[str, Any]):
        super().__init__()
        check_positive("small_cnn_zoo", "depth", depth)
        check_positive("small_cnn_zoo", "width", width)
        check_positive("small_cnn_zoo", "stride", stride)
        if not 0.0 <= dropout < 1.0:
            raise ArchError(f"architecture 'small_cnn_zoo': dropout must be in [0, 1), got {dropout}")
        self.pre = Preprocess("small_cnn_zoo", tuple(task.input_shape), preprocess)
        c, h, w = self.pre.out_shape
        for _ in range(depth):
            h, w = (h - 3) // stride + 1, (w - 3) // stride + 1
        if h < 1 or w < 1:
            raise ArchError(f"architecture 'small_cnn_zoo': {depth} valid 3x3 convs of stride {stride} need larger "
                            f"images than task {task.name!r} gives ({self.pre.out_shape[1]}x{self.pre.out_shape[2]})")
        self.convs = nn.ModuleList(nn.Conv2d(c if i == 0 else width, width, 3, stride=stride) for i in range(depth))
        self.acts = nn.ModuleList(_activation("small_cnn_zoo", activation) for _ in range(depth))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, _classes("small_cnn_zoo", task))

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre(x)
        for conv, act in zip(self.convs, self.acts):
            x = self.drop(act(conv(x)))
        return self.head(x.mean(dim=(-2, -1)))

    def perm_spec(self) -> PermSpec:
        n = len(self.convs)
        return PermSpec({
            f"conv{i}": ((f"convs.{i}.weight", 0), (f"convs.{i}.bias", 0),
                         (f"convs.{i + 1}.weight", 1) if i + 1 < n else ("head.weight", 1))
            for i in range(n)
        })  # fmt: skip


# Model Zoos CNNs: (out channels, kernel, max-pool after) of the three convs, then the hidden dense width.
MODEL_ZOOS_CNNS: dict[str, tuple[tuple[tuple[int, int, bool], ...], int]] = {
    "CNN": (((8, 5, True), (6, 5, True), (4, 2, False)), 20),
    "CNN2": (((6, 5, True), (9, 5, True), (6, 2, False)), 20),
    "CNN3": (((16, 3, True), (32, 3, True), (15, 3, True)), 20),
}


def model_zoos_indices(variant: str, dropout: float) -> list[int]:
    """The published `module_list` indices of the five weight layers (conv1-3, dense1-2). Dropout modules shift
    them: CNN and CNN2 add one after each of conv1, conv2 and dense1 when dropout > 0; CNN3 always has four."""
    convs, _ = MODEL_ZOOS_CNNS[variant]
    with_drop = variant == "CNN3" or dropout > 0
    out, i = [], 0
    for _, _, pool in convs:
        out.append(i)
        i += 1 + int(pool) + 1  # conv, [pool], activation
        if with_drop and (pool or variant == "CNN3"):
            i += 1
    i += 1  # flatten
    out.append(i)
    i += 2 + int(with_drop)  # dense1, activation, [dropout]
    out.append(i)
    return out


@register_arch(
    "model_zoos_cnn",
    equivariant=False,
    symmetry="none",
    input_kinds=("image",),
    example_task=("mnist", {}),
    description="the CNNs of the Model Zoos (Schürholt et al. 2022): CNN (CNN-s), CNN2, CNN3 (CNN-m), with their dropout",
    variant="CNN",
    activation="tanh",
    dropout=0.0,
    preprocess={},
)
class ModelZoosCNN(SymModule):
    """conv [-> max-pool 2] -> act [-> dropout], three times; flatten; dense 20 -> act [-> dropout]; dense out.

    Dropout sits where `def_net.py` puts it (CNN, CNN2: after conv1, conv2 and dense1 when dropout > 0; CNN3:
    after every conv block and dense1, always). `fc1.weight` is [20, C, h, w], the published [20, C*h*w].
    """

    def __init__(self, task: Task, variant: str, activation: str, dropout: float, preprocess: dict[str, Any]):
        super().__init__()
        check_choice("model_zoos_cnn", "variant", variant, tuple(MODEL_ZOOS_CNNS))
        if not 0.0 <= dropout < 1.0:
            raise ArchError(f"architecture 'model_zoos_cnn': dropout must be in [0, 1), got {dropout}")
        self.pre = Preprocess("model_zoos_cnn", tuple(task.input_shape), preprocess)
        convs, hidden = MODEL_ZOOS_CNNS[variant]
        c, h, w = self.pre.out_shape
        self.pools: list[bool] = []
        for i, (out, k, pool) in enumerate(convs):
            setattr(self, f"conv{i + 1}", nn.Conv2d(c, out, k))
            h, w = h - k + 1, w - k + 1
            h, w = (h // 2, w // 2) if pool else (h, w)
            self.pools.append(pool)
            c = out
        if h < 1 or w < 1:
            raise ArchError(f"architecture 'model_zoos_cnn' {variant} needs larger images than {self.pre.out_shape[1:]}"
                            f" (task {task.name!r} after preprocess)")
        self.fc1 = FlatLinear((c, h, w), hidden)
        self.fc2 = nn.Linear(hidden, _classes("model_zoos_cnn", task))
        self.acts = nn.ModuleList(_activation("model_zoos_cnn", activation) for _ in range(4))
        p = dropout if (variant == "CNN3" or dropout > 0) else 0.0
        self.drops = nn.ModuleList(nn.Dropout(p) for _ in range(4))
        self.drop_after = [True, True, variant == "CNN3", True]

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre(x)
        for i, conv in enumerate((self.conv1, self.conv2, self.conv3)):
            x = conv(x)
            if self.pools[i]:
                x = F.max_pool2d(x, 2, 2)
            x = self.acts[i](x)
            if self.drop_after[i]:
                x = self.drops[i](x)
        x = self.drops[3](self.acts[3](self.fc1(x)))
        return self.fc2(x)

    def perm_spec(self) -> PermSpec:
        return PermSpec({
            "conv1": (("conv1.weight", 0), ("conv1.bias", 0), ("conv2.weight", 1)),
            "conv2": (("conv2.weight", 0), ("conv2.bias", 0), ("conv3.weight", 1)),
            "conv3": (("conv3.weight", 0), ("conv3.bias", 0), ("fc1.weight", 1)),
            "fc1": (("fc1.weight", 0), ("fc1.bias", 0), ("fc2.weight", 1)),
        })  # fmt: skip


BN_KEYS = ("weight", "bias", "running_mean", "running_var")


class EvalBatchNorm2d(nn.Module):
    """BatchNorm2d as evaluated: (x - running_mean) / sqrt(running_var + eps) * weight + bias, always. The state
    dict is torch's (num_batches_tracked included), so published checkpoints load strictly; the forward is plain
    elementwise ops, which population programs trace and vmap batches (batch statistics do not vmap)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x)), names as torchvision's."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = EvalBatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = EvalBatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), EvalBatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


@register_arch(
    "resnet18_width",
    equivariant=False,
    symmetry="none",
    input_kinds=("image",),
    example_task=("cifar10", {}),
    description="ResNet-18 of the Phase-Transition model zoo: CIFAR stem (3x3, no max-pool), BatchNorm, width x (1,2,4,8)",
    width=64,
    preprocess={},
)
class ResNet18Width(SymModule):
    """conv1 3x3 -> bn1 -> relu -> layer1..4 (2 BasicBlocks each, stride 1, 2, 2, 2) -> global average pool -> fc.

    BatchNorm normalises with its running statistics (`EvalBatchNorm2d`), as the publication evaluated its models;
    training this architecture here would not update them.
    """

    def __init__(self, task: Task, width: int, preprocess: dict[str, Any]):
        super().__init__()
        check_positive("resnet18_width", "width", width)
        self.pre = Preprocess("resnet18_width", tuple(task.input_shape), preprocess)
        self.conv1 = nn.Conv2d(self.pre.out_shape[0], width, 3, padding=1, bias=False)
        self.bn1 = EvalBatchNorm2d(width)
        c_in = width
        for s, mult in enumerate((1, 2, 4, 8)):
            c = width * mult
            blocks = [BasicBlock(c_in, c, 1 if s == 0 else 2), BasicBlock(c, c, 1)]
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
            c_in = c
        self.fc = nn.Linear(c_in, _classes("resnet18_width", task))

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(self.pre(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(-2, -1)))

    def perm_spec(self) -> PermSpec:
        """One permutation per stage's residual stream (stem and layer1 share one), one inside each block."""

        def bn(prefix: str) -> list[tuple[str, int]]:
            return [(f"{prefix}.{k}", 0) for k in BN_KEYS]

        stream: dict[int, list[tuple[str, int]]] = {1: [("conv1.weight", 0), *bn("bn1")], 2: [], 3: [], 4: []}
        perms: dict[str, tuple[tuple[str, int], ...]] = {}
        for s in range(1, 5):
            for b in range(2):
                p = f"layer{s}.{b}"
                block: BasicBlock = getattr(self, f"layer{s}")[b]
                src = s - 1 if (b == 0 and s > 1) else s
                stream[src].append((f"{p}.conv1.weight", 1))
                stream[s] += [(f"{p}.conv2.weight", 0), *bn(f"{p}.bn2")]
                if block.downsample is not None:
                    stream[src].append((f"{p}.downsample.0.weight", 1))
                    stream[s] += [(f"{p}.downsample.0.weight", 0), *bn(f"{p}.downsample.1")]
                perms[f"{p}.inner"] = ((f"{p}.conv1.weight", 0), *bn(f"{p}.bn1"), (f"{p}.conv2.weight", 1))
        stream[4].append(("fc.weight", 1))
        return PermSpec({**{f"stage{s}": tuple(v) for s, v in stream.items()}, **perms})
