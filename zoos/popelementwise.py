"""A population's broadcasting elementwise ops (add, sub, mul, div of two tensors of different shapes) as one
Triton kernel.

A population's per-sample tensors broadcast against each other and against constants: an EGNN layer sums its
nodes' maps over every pair, h_i + h_j ([N*B, n, 1, C] + [N*B, 1, n, C]), and masks its messages, m * off
([N*B, n, n, C] * [n, n, 1]). PyTorch runs an elementwise op whose operands are not all contiguous and of the
output's shape on its generic kernel, which computes each element's offset in every operand from its index, one
division and remainder an axis, and loads it alone: on such bf16 edge tensors it writes its output at a fraction
of the card's bandwidth. Here the output is rows of its last (coalesced) axis: a program takes a tile of rows,
computes each row's offset in each operand once (at most three outer axes), and reads and writes the row's
elements together (vectorised where an operand's last axis is contiguous).

The result is PyTorch's: the operands promoted as torch promotes them, the op in float32 (PyTorch's opmath for
bf16 and float16; division rounded to nearest, as PyTorch divides), the result rounded to the promoted dtype once.
The gradients are PyTorch's: the output's gradient (times the other operand, through this op again, for a
product or a quotient) summed over each operand's broadcast axes.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

from zoos.popconv.common import available, population_op, triton

OPS = ("add", "sub", "mul", "div")
MAX_AXES = 4  # the most axes of the output, once coalesced, a program's row offsets handle (three outer, one last)
LEAST_ELEMENTS = 1 << 16  # below this an output is left to PyTorch: launches, not bytes, bound it
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # computed in float32: float64 stays PyTorch's

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _row_offsets(r, S1, S2, X0, X1, X2):
        """Where row r (of rows over three outer axes of sizes [., S1, S2]) starts in an operand of strides X."""
        i2 = r % S2
        rest = r // S2
        return (rest // S1) * X0 + (rest % S1) * X1 + i2 * X2

    @triton.jit
    def _binary_kernel(a_ptr, b_ptr, y_ptr, ROWS, S1, S2, WIDTH, A0, A1, A2, AC, B0, B1, B2, BC, OP: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """y[r, c] = a[r, c] OP b[r, c] for a tile of rows r and columns c of the contiguous output [ROWS, WIDTH],
        the operands read through strides (0 where they broadcast): rows over three outer axes, then the last."""
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (r < ROWS)[:, None] & (c < WIDTH)[None, :]
        a_at = _row_offsets(r, S1, S2, A0, A1, A2)[:, None] + c[None, :] * AC
        b_at = _row_offsets(r, S1, S2, B0, B1, B2)[:, None] + c[None, :] * BC
        a = tl.load(a_ptr + a_at, mask=mask, other=1.0).to(tl.float32)
        b = tl.load(b_ptr + b_at, mask=mask, other=1.0).to(tl.float32)
        if OP == "add":
            y = a + b
        elif OP == "sub":
            y = a - b
        elif OP == "mul":
            y = a * b
        else:
            y = tl.math.div_rn(a, b)
        tl.store(y_ptr + r[:, None] * WIDTH + c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


_TORCH = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}


def _layout(shape: tuple[int, ...], *strides: tuple[int, ...]) -> tuple[list[int], list[list[int]]]:
    """The output's shape (contiguous) and each operand's strides for it, its axes of size 1 dropped and its
    neighbours merged wherever every tensor steps over both as over one axis: (sizes, [strides a tensor])."""
    axes = [(n, [s[i] for s in strides]) for i, n in enumerate(shape) if n != 1]
    out = [math.prod(n for n, _ in axes[i + 1:]) for i in range(len(axes))]
    sizes: list[int] = []
    merged: list[list[int]] = [[] for _ in strides]
    outer: list[int] = []  # the output's stride of each merged axis
    for (n, st), o in zip(axes, out):
        if sizes and outer[-1] == o * n and all(m[-1] == s * n for m, s in zip(merged, st)):
            sizes[-1] *= n
            outer[-1] = o
            for m, s in zip(merged, st):
                m[-1] = s
            continue
        sizes.append(n)
        outer.append(o)
        for m, s in zip(merged, st):
            m.append(s)
    return sizes, merged


def _expanded_strides(x: Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    """x's strides for the broadcast shape: 0 on every axis it broadcasts along."""
    lead = len(shape) - x.dim()
    return tuple(0 if i < lead or x.shape[i - lead] == 1 and n != 1 else x.stride(i - lead) for i, n in enumerate(shape))


def _launch(op: str, a: Tensor, b: Tensor) -> Tensor:
    shape = torch.broadcast_shapes(a.shape, b.shape)
    y = torch.empty(shape, dtype=torch.result_type(a, b), device=a.device)
    if not y.numel():
        return y
    sizes, (ya, yb) = _layout(tuple(shape), _expanded_strides(a, shape), _expanded_strides(b, shape))
    if len(sizes) > MAX_AXES:
        raise ValueError(f"{tuple(a.shape)} and {tuple(b.shape)} broadcast over {len(sizes)} axes that do not merge; "
                         f"the kernel takes up to {MAX_AXES} (`runs_here` says where it runs)")
    sizes, ya, yb = [1] * (MAX_AXES - len(sizes)) + sizes, [0] * (MAX_AXES - len(ya)) + ya, [0] * (MAX_AXES - len(yb)) + yb
    width = sizes[-1]
    rows = y.numel() // width
    block_c = min(128, triton.next_power_of_2(width))
    block_r = max(1, 4096 // block_c)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(width, block_c))
    _binary_kernel[grid](a, b, y, rows, sizes[1], sizes[2], width, *ya, *yb, OP=op, BLOCK_R=block_r, BLOCK_C=block_c,
                         num_warps=4)
    return y


@population_op("pop_binary")
def _pop_binary(a: Tensor, b: Tensor, op: str) -> Tensor:
    return _launch(op, a, b)


@_pop_binary.register_fake
def _(a, b, op):
    return a.new_empty(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.result_type(a, b))


def _setup(ctx, inputs, output) -> None:
    a, b, op = inputs
    ctx.op = op
    ctx.save_for_backward(a if op in ("mul", "div") else None, b if op in ("mul", "div") else None,
                          output if op == "div" else None)
    ctx.shapes = (a.shape, b.shape)
    ctx.dtypes = (a.dtype, b.dtype)


def _backward(ctx, dy: Tensor):
    a, b, y = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[:2]
    op = ctx.op
    da = db = None
    if need_a:
        da = dy if op in ("add", "sub") else binary("mul" if op == "mul" else "div", dy, b)
        da = da.sum_to_size(ctx.shapes[0]).to(ctx.dtypes[0])
    if need_b:
        if op == "add":
            db = dy
        elif op == "sub":
            db = -dy
        elif op == "mul":
            db = binary("mul", dy, a)
        else:  # d(a / b)/db = -y / b
            db = -binary("div", binary("mul", dy, y), b)
        db = db.sum_to_size(ctx.shapes[1]).to(ctx.dtypes[1])
    return da, db, None


_pop_binary.register_autograd(_backward, setup_context=_setup)


def runs_here(a: Tensor, b: Tensor) -> bool:
    """Whether `binary` runs a and b on the kernel: tensors of DTYPES on one device it runs on, of different shapes
    (a same-shape op is PyTorch's contiguous, vectorised one already), an output of at least LEAST_ELEMENTS whose
    axes coalesce to MAX_AXES or fewer."""
    if a.device != b.device or a.dtype not in DTYPES or b.dtype not in DTYPES or a.shape == b.shape:
        return False
    if a.dim() == 0 or b.dim() == 0 or not available(a.device):
        return False
    shape = torch.broadcast_shapes(a.shape, b.shape)
    if math.prod(shape) < LEAST_ELEMENTS:
        return False
    sizes, _ = _layout(tuple(shape), _expanded_strides(a, shape), _expanded_strides(b, shape))
    return len(sizes) <= MAX_AXES


def binary(op: str, a: Tensor, b: Tensor) -> Tensor:
    """a OP b (`OPS`: +, -, *, /) broadcast as PyTorch broadcasts them, with PyTorch's result and gradients: on
    the kernel where `runs_here`, else PyTorch's own op."""
    if op not in OPS:
        raise ValueError(f"op = {op!r}: one of {', '.join(OPS)}")
    if not runs_here(a, b):
        return _TORCH[op](a, b)
    return _pop_binary(a, b, op)


__all__ = ["DTYPES", "LEAST_ELEMENTS", "MAX_AXES", "OPS", "binary", "runs_here"]
