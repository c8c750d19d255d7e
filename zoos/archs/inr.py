"""INR architectures: SIREN and a ReLU MLP on Fourier features, each mapping coordinates to intensities.

siren        Sitzmann et al. 2020: h = sin(omega (W h + b)) per hidden layer, linear output. The weight
             init ("siren": first layer U(-1/in, 1/in), later layers U(-sqrt(6/in)/omega_hidden, ...);
             "pytorch": nn.Linear's default), the bias init, both omegas and the output offset are
             config fields, so published variants (DWSNets' 2-32-32-1 SIREN, omega_0 = 30) are named.
fourier_mlp  Tancik et al. 2020: gamma(p) = [cos(2 pi B p), sin(2 pi B p)] with a fixed B (a buffer drawn
             from the model's seed: Gaussian of scale sigma, or positional 2^k / 2 per axis), then an MLP.

Both predict `net(p) + output_offset`; the offset is a constant of the config, not a parameter, so
the NFN / DWSNets (weights, biases) layout of a SIREN holds all of it. Hidden units permute freely
(sine and ReLU are pointwise): `perm_spec()` lists one permutation per hidden layer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tasks.base import Task
from zoos.archs.base import ArchError, SymModule, init_resets, register_arch
from zoos.archs.layers import MLPStack, check_choice, check_positive
from zoos.permspec import PermSpec

WEIGHT_INITS = ("siren", "pytorch")
BIAS_INITS = ("pytorch", "zero")
ENCODINGS = ("gaussian", "positional")


def _check_number(arch: str, field: str, value: float, positive: bool = False) -> float:
    """Refuse a non-number (or a non-positive one) with an error naming arch, field and value."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise ArchError(f"architecture {arch!r}: {field} must be a {'positive ' if positive else ''}finite number, got {value!r}")
    return float(value)


@register_arch(
    "siren",
    equivariant=False,
    symmetry="none",
    input_kinds=("vector",),
    example_task=("inr", {}),
    description="SIREN (sine activations, omega_0-scaled first layer): the INR of weight-space learning data sets",
    width=32,
    depth=2,
    omega_0=30.0,
    omega_hidden=30.0,
    weight_init="siren",
    bias_init="pytorch",
    output_offset=0.0,
)
class Siren(SymModule):
    """`depth` sine layers of `width` units, then a linear output plus `output_offset`."""

    def __init__(self, task: Task, width: int, depth: int, omega_0: float, omega_hidden: float, weight_init: str,
                 bias_init: str, output_offset: float):
        super().__init__()
        check_positive("siren", "width", width)
        check_positive("siren", "depth", depth)
        self.omega_0 = _check_number("siren", "omega_0", omega_0, positive=True)
        self.omega_hidden = _check_number("siren", "omega_hidden", omega_hidden, positive=True)
        self.output_offset = _check_number("siren", "output_offset", output_offset)
        check_choice("siren", "weight_init", weight_init, WEIGHT_INITS)
        check_choice("siren", "bias_init", bias_init, BIAS_INITS)
        self.out_shape = tuple(task.output_shape)
        dims = [math.prod(task.input_shape)] + [width] * depth + [math.prod(task.output_shape)]
        self.weight_init, self.bias_init = weight_init, bias_init
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self._siren_init()

    def _siren_init(self) -> None:
        """SIREN's weight bounds (after each layer's own init drew its weight and bias), or zero biases."""
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                fan_in = layer.in_features
                if self.weight_init == "siren":
                    bound = 1.0 / fan_in if i == 0 else math.sqrt(6.0 / fan_in) / self.omega_hidden
                    layer.weight.uniform_(-bound, bound)
                if self.bias_init == "zero":
                    layer.bias.zero_()

    def reset_parameters(self) -> None:
        """The whole model's init, in __init__'s order: every layer's own reset, then SIREN's."""
        for layer in self.layers:
            layer.reset_parameters()
        self._siren_init()

    def forward(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        for i, layer in enumerate(self.layers[:-1]):
            h = torch.sin((self.omega_0 if i == 0 else self.omega_hidden) * layer(h))
        return (self.layers[-1](h) + self.output_offset).reshape(-1, *self.out_shape)

    def perm_spec(self) -> PermSpec:
        return PermSpec({
            f"h{i}": ((f"layers.{i}.weight", 0), (f"layers.{i}.bias", 0), (f"layers.{i + 1}.weight", 1))
            for i in range(len(self.layers) - 1)
        })


@register_arch(
    "fourier_mlp",
    equivariant=False,
    symmetry="none",
    input_kinds=("vector",),
    example_task=("inr", {}),
    description="MLP on random (or positional) Fourier features of the coordinates: the INR baseline to SIREN",
    width=32,
    depth=2,
    activation="relu",
    dropout=0.0,
    n_freqs=16,
    sigma=3.0,
    encoding="gaussian",
    output_offset=0.0,
)
class FourierMLP(SymModule):
    """Fixed Fourier features [cos(2 pi B p), sin(2 pi B p)] (B a buffer), then an MLP, plus `output_offset`.

    gaussian: B [n_freqs, d] ~ N(0, sigma^2). positional: B holds 2^k / 2 on each axis, k < n_freqs
    (so 2 pi B = pi 2^k, the NeRF encoding), sigma unused.
    """

    def __init__(self, task: Task, width: int, depth: int, activation: str, dropout: float, n_freqs: int, sigma: float,
                 encoding: str, output_offset: float):
        super().__init__()
        check_positive("fourier_mlp", "width", width)
        check_positive("fourier_mlp", "depth", depth)
        check_positive("fourier_mlp", "n_freqs", n_freqs)
        sigma = _check_number("fourier_mlp", "sigma", sigma, positive=True)
        self.output_offset = _check_number("fourier_mlp", "output_offset", output_offset)
        check_choice("fourier_mlp", "encoding", encoding, ENCODINGS)
        d = math.prod(task.input_shape)
        self.encoding, self.sigma = encoding, sigma
        if encoding == "gaussian":
            freqs = self._gaussian_freqs(n_freqs, d)
        else:
            freqs = torch.kron(torch.eye(d), (2.0 ** torch.arange(n_freqs) / 2).unsqueeze(1))  # [d * n_freqs, d]
        self.register_buffer("freqs", freqs)
        self.out_shape = tuple(task.output_shape)
        self.net = MLPStack(2 * len(freqs), width, depth, math.prod(task.output_shape), activation, dropout)

    def _gaussian_freqs(self, n_freqs: int, d: int) -> Tensor:
        return torch.randn(n_freqs, d) * self.sigma  # the global generator: seeded per model by zoos.init.init_model

    def reset_parameters(self) -> None:
        """The whole model's init, in __init__'s order: the Gaussian frequencies (if drawn), then the MLP."""
        if self.encoding == "gaussian":
            self.freqs.copy_(self._gaussian_freqs(*self.freqs.shape))
        for reset in init_resets(self.net):
            reset()

    def forward(self, x: Tensor) -> Tensor:
        z = 2 * math.pi * x.flatten(1) @ self.freqs.T
        return (self.net(torch.cat([z.cos(), z.sin()], -1)) + self.output_offset).reshape(-1, *self.out_shape)

    def perm_spec(self) -> PermSpec:
        return PermSpec(self.net.perm_pairs("net."))
