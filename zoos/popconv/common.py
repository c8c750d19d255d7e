"""What the popconv kernel families share: Triton (or its absence), where the kernels run, and the device and host
helpers several families call."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch import Tensor

from . import tuning

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (a CPU-only torch): `available()` says so and the callers keep im2col
    triton = tl = None


EPILOGUE_ACTIVATIONS = ("identity", "tanh", "sigmoid", "relu", "leaky_relu")  # monotone: they commute with the max
# what a kernel may apply to an input it loads (any pointwise activation: its derivative read off its input)
INPUT_ACTIVATIONS = EPILOGUE_ACTIVATIONS + ("silu", "gelu", "gelu_tanh")


_LIBRARY = torch.library.Library("symzoo", "FRAGMENT")  # every population kernel's operator


class PopulationOp:
    """A `symzoo::` operator as `torch.library.custom_op` makes one (its schema from the function's annotations, no
    argument mutated; `register_fake`, `register_autograd`), registered through `torch.library.Library` so that its
    kernel is called as it is: custom_op's wrapper imports torch._dynamo (~1 s) at an operator's first call."""

    def __init__(self, name: str, kernel: Callable):
        _LIBRARY.define(name + torch.library.infer_schema(kernel, mutates_args=()))
        _LIBRARY.impl(name, kernel, "CompositeExplicitAutograd")
        self.op = getattr(torch.ops.symzoo, name).default  # the OpOverload (torch.library.opcheck takes it)
        functools.update_wrapper(self, kernel)

    def __call__(self, *args, **kwargs):
        return self.op(*args, **kwargs)

    def register_fake(self, fake: Callable) -> Callable:
        torch.library.register_fake(self.op, fake, lib=_LIBRARY)
        return fake

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        torch.library.register_autograd(self.op, backward, setup_context=setup_context, lib=_LIBRARY)


def population_op(name: str) -> Callable[[Callable], PopulationOp]:
    """Decorator: the function, annotated, as the operator `symzoo::name` (`PopulationOp`)."""
    return lambda kernel: PopulationOp(name, kernel)


def available(device: torch.device | str) -> bool:
    """Whether the kernels can run on `device`: Triton on a CUDA device, or its interpreter on the CPU."""
    if triton is None:
        return False
    kind = torch.device(device).type
    return kind == "cuda" or (kind == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def supports(stride: tuple[int, int], dilation: tuple[int, int] = (1, 1), groups: int = 1) -> bool:
    """Whether a Conv2d with these settings runs on popconv (no dilation, no groups; any padding): at stride 1
    on the kernels directly, at a larger stride as the stride-1 conv of `space_to_depth` (unless the tuning's
    `strided` is off)."""
    return (tuple(stride) == (1, 1) or tuning.current().strided) and tuple(dilation) == (1, 1) and groups == 1


def _act_backward(da: Tensor, a: Tensor, act: str, slope: float) -> Tensor:
    """da * act'(z) read off the activation's output a = act(z): torch's own backward kernel of the activation
    (one pass, in a's dtype)."""
    aten = torch.ops.aten
    if act == "relu":
        return aten.threshold_backward(da, a, 0)
    if act == "leaky_relu" and slope >= 0:  # the sign of a is the sign of z
        return aten.leaky_relu_backward(da, a, slope, True)
    if act == "leaky_relu":
        return torch.where(a > 0, da, da * slope)
    if act == "tanh":
        return aten.tanh_backward(da, a)
    if act == "sigmoid":
        return aten.sigmoid_backward(da, a)
    return da


def stored_channels_last(x: Tensor) -> bool:
    """Whether x [R, C, H, W] is channels-last in memory and not also NCHW (C = 1 or H = W = 1 are both):
    the kernels that take either layout read it so, else they make it contiguous NCHW."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


if triton is not None:

    @triton.jit
    def _tanh(z):
        """tanh in float32 from exp(-2|z|): no overflow at either end."""
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(z < 0, -t, t)

    @triton.jit
    def _sigmoid(z):
        """The logistic function in float32 from exp(-|z|): no overflow at either end."""
        e = tl.exp(-tl.abs(z))
        return tl.where(z < 0, e, 1.0) / (1.0 + e)

    @triton.jit
    def _activate(z, ACT: tl.constexpr, SLOPE: tl.constexpr):
        """A monotone pointwise activation in float32 (it commutes with the max of a pool)."""
        if ACT == "tanh":
            return _tanh(z)
        if ACT == "sigmoid":
            return _sigmoid(z)
        if ACT == "relu":
            return tl.maximum(z, 0.0)
        if ACT == "leaky_relu":
            return tl.where(z > 0, z, z * SLOPE)
        return z

    @triton.jit
    def _activate_any(z, ACT: tl.constexpr, SLOPE: tl.constexpr):
        """Any of INPUT_ACTIVATIONS in float32 (gelu: the exact, erf form; gelu_tanh: its tanh approximation)."""
        if ACT == "silu":
            return z * _sigmoid(z)
        if ACT == "gelu":
            return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        if ACT == "gelu_tanh":
            return 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
        return _activate(z, ACT, SLOPE)

    @triton.jit
    def _act_grad_from_input(z, ACT: tl.constexpr, SLOPE: tl.constexpr):
        """The derivative of `_activate_any` at z (float32); relu's and leaky_relu's at 0 as torch's backward takes it."""
        if ACT == "silu":
            s = _sigmoid(z)
            return s * (1.0 + z * (1.0 - s))
        if ACT == "gelu":
            return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
        if ACT == "gelu_tanh":
            t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
            return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
        if ACT == "leaky_relu":
            return tl.where(z > 0, 1.0, SLOPE)
        return _act_grad_from_output(_activate(z, ACT, SLOPE), ACT, SLOPE)

    @triton.jit
    def _keep_max(best, code, acc, d):
        """The running max of a window and where it was: the first of equal values, NaN wins (max_pool2d)."""
        take = (acc > best) | (acc != acc)
        return tl.where(take, acc, best), tl.where(take, d, code)

    @triton.jit
    def _act_grad_from_output(a, ACT: tl.constexpr, SLOPE: tl.constexpr):
        """The derivative of `_activate` at the point where it output a (float32)."""
        if ACT == "tanh":
            return 1.0 - a * a
        if ACT == "sigmoid":
            return a * (1.0 - a)
        if ACT == "relu":
            return tl.where(a > 0, 1.0, 0.0)
        if ACT == "leaky_relu":
            return tl.where(a > 0, 1.0, SLOPE)
        return tl.full(a.shape, 1.0, tl.float32)

    @triton.jit
    def _mma(a, b, DOT: tl.constexpr):
        """a @ b on tensor cores with float32 accumulation: bf16 operands, or float32 ones as 3xTF32 (float32
        accuracy, so a max-pool after a float32 layer picks the window positions a float32 conv would)."""
        if DOT == tl.float32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
        return tl.dot(a.to(DOT), b.to(DOT))


def _dot_dtype(x: Tensor):
    """The tensor-core input type: TF32 (float32 operands), or bf16 where the activations already are bf16."""
    return tl.bfloat16 if tuning.current().dot == "bf16" and x.dtype == torch.bfloat16 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for operands of `dtype`: float32 exactly ("ieee"); bf16 ignores it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _tile_rows(width: int) -> tuple[int, dict]:
    """(BLOCK_M, launch options) for a window kernel whose tiles are `width` wide: the tuning's rows, warps and
    stages (0: Triton's pipelining) up to 64, else 64 rows and one stage, so a wide float32 tile's pipeline
    fits in shared memory."""
    t = tuning.current()
    options = {"num_warps": t.window_warps}
    if width > 64:
        return 64, {**options, "num_stages": 1}
    if t.window_stages:
        options["num_stages"] = t.window_stages
    return t.window_block_m, options


def _programs_per_model(tiles: int, n: int, device: torch.device) -> tuple[int, int]:
    """(programs a model, tiles a program) for n models' worth of programs (models x other grid axes): enough
    programs to fill the card (the tuning's wgrad_per_sm a multiprocessor) and at least 8 tiles a program, so what a
    program loads once serves several tiles."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    split = max(1, min(triton.cdiv(tuning.current().wgrad_per_sm * sms, n), triton.cdiv(tiles, 8)))
    per = triton.cdiv(tiles, split)
    return triton.cdiv(tiles, per), per


def _wgrad_fake(w: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    return w.new_empty(w.shape, dtype=torch.float32), w.new_empty((w.shape[0], w.shape[1]) if bias else (0,),
                                                                  dtype=torch.float32)
