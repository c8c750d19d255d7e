"""Weights that a forward only moves, gathered by one index: a population program's prologue as one op.

A group CNN builds each conv's dense kernel from its base filters every step (rotations, flips, a re-indexed
group axis, stacked) and repeats each bias over the group: tens of small ops on the weights, each a kernel
launch forward and backward, where the result is only the base weights in another order. When every op of a
population program's weight prologue (`zoos.fastpop`) moves values and computes none, the prologue is a fixed
map from positions of its outputs to positions of its inputs. `plan` finds it by running the prologue once on
the inputs' positions (float64 ids, exact) and returns a `Gather`: the prologue's outputs for N models as an
`index_select` each of the weights' concatenated rows, and in the backward each input position's gradient as the
sum of its output positions' (a fixed table and a sum in a fixed order: the same bits every run, unlike
index_add's atomics). `with vmapped():` leaves every prologue planned inside it to vmap (the benchmark's baseline);
so does SYMZOO_POPGATHER=0 for the whole process (read at import).
"""

from __future__ import annotations

import builtins
import contextlib
import operator
import os
from typing import Any, Sequence

import torch
from torch import Tensor, fx
from torch.utils._pytree import tree_flatten

from zoos.popconv.tuning import env_flag

# ops that move a tensor's values (or repeat them) without computing any: by function and by method name
_MOVES: set[Any] = {torch.rot90, torch.flip, torch.stack, torch.cat, torch.concat, torch.flatten, torch.unflatten,
                    torch.reshape, torch.permute, torch.transpose, torch.swapaxes, torch.movedim, torch.roll,
                    torch.squeeze, torch.unsqueeze, torch.repeat_interleave, torch.tile, torch.narrow, torch.t,
                    torch.chunk, torch.split, torch.unbind, operator.getitem}
_METHOD_MOVES = {"rot90", "flip", "flatten", "unflatten", "reshape", "view", "permute", "transpose", "swapaxes",
                 "movedim", "contiguous", "clone", "roll", "squeeze", "unsqueeze", "repeat_interleave", "repeat",
                 "tile", "expand", "narrow", "t", "chunk", "split", "unbind"}
_METADATA = {"shape", "ndim", "dtype", "device"}  # attributes read off a tensor that say nothing of its values
_METADATA_METHODS = {"size", "dim", "numel"}
_ID_LIMIT = 1 << 53  # float64 holds every integer below this exactly
_enabled = [env_flag(os.environ, "SYMZOO_POPGATHER", default="1")]


@contextlib.contextmanager
def vmapped():
    """Inside the block `plan` plans nothing: a population program built there runs its prologue as vmap."""
    _enabled.append(False)
    try:
        yield
    finally:
        _enabled.pop()


class _Computes(Exception):
    """An op of a prologue that computes from a tensor's values."""

    def __init__(self, node: fx.Node):
        super().__init__(f"{node.op} {node.target}")


class _MovesOnly(fx.Interpreter):
    """Runs a prologue, raising `_Computes` at the first op that computes from a tensor's values."""

    def __init__(self, prologue: fx.GraphModule):
        super().__init__(prologue)
        self.extra_traceback = False  # `_Computes` is expected: no structured log of it (its logger imports torch._dynamo)

    def run_node(self, n: fx.Node) -> Any:
        if n.op in ("placeholder", "output"):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        reads_tensor = any(isinstance(a, Tensor) for a in tree_flatten((args, kwargs))[0])
        if n.op == "call_function":
            ok = (n.target in _MOVES or not reads_tensor
                  or n.target is builtins.getattr and len(args) == 2 and args[1] in _METADATA)
        elif n.op == "call_method":
            ok = n.target in _METHOD_MOVES or n.target in _METADATA_METHODS or not reads_tensor
        else:  # a module, or a tensor that is not an input
            ok = False
        if not ok:
            raise _Computes(n)
        return super().run_node(n)


def plan(prologue: fx.GraphModule, shapes: Sequence[Sequence[int]], consts: Sequence[Any] = (),
         dtypes: Sequence[torch.dtype] = ()) -> Gather | None:
    """The `Gather` that computes `prologue` for a population, or None where one of its ops computes (arithmetic, a
    reduction, a new tensor) rather than moves. The prologue's inputs are one model's weights (of `shapes` and, if
    given, `dtypes`: the gathers concatenate the weights' rows, so they must share one floating dtype), then
    `consts` (values shared by every model, such as index tensors); its output a tuple of tensors."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    total = sum(sizes)
    if not _enabled[-1] or not sizes or total >= _ID_LIMIT:
        return None
    if dtypes and (len(set(dtypes)) != 1 or not dtypes[0].is_floating_point):
        return None

    def outputs(offset: int) -> list[Tensor] | None:
        """The prologue's outputs with the inputs' positions (plus `offset`) as the inputs' values."""
        ids = (torch.arange(total, dtype=torch.float64) + offset).split(sizes)
        try:
            out = _MovesOnly(prologue).run(*(i.reshape(s) for i, s in zip(ids, shapes)), *consts)
        except Exception:  # noqa: BLE001 - an op that computes (`_Computes`), or one that fails on float64 ids
            return None
        return list(out) if all(isinstance(o, Tensor) and o.dtype == torch.float64 for o in out) else None

    first, second = outputs(0), outputs(total)
    if first is None or second is None:
        return None
    index, shifted = (torch.cat([o.reshape(-1) for o in out]) for out in (first, second))
    # every output value one of an input's, moving with it (not a constant, not computed): a second run with every
    # input value shifted by `total` shifts every output value by it
    if not torch.equal(shifted, index + total):
        return None
    if not index.numel() or not torch.equal(index, index.round()) or index.min() < 0 or index.max() >= total:
        return None
    return Gather(index.long(), [tuple(o.shape) for o in first], len(shapes), total)


class _GatherRows(torch.autograd.Function):
    """(flat[:, index_k] for each k) as contiguous tensors, with a deterministic backward: input position t's
    gradient is the sum of the positions `inverse[t]` lists in the outputs' concatenated gradients (padded with the
    position of an appended zero column)."""

    @staticmethod
    def forward(ctx: Any, flat: Tensor, inverse: Tensor, *indices: Tensor) -> tuple[Tensor, ...]:
        ctx.save_for_backward(inverse)
        return tuple(flat.index_select(1, i) for i in indices)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        (inverse,) = ctx.saved_tensors
        padded = torch.cat([*grads, grads[0].new_zeros(grads[0].shape[0], 1)], 1)
        return (padded[:, inverse].sum(-1), None, *(None for _ in grads))


class Gather:
    """A movement-only prologue for N models: `gather(*inputs)` (its `n_inputs` weights, each [N, *its shape], then
    the constants it was planned with, which it no longer reads) -> its outputs, each [N, *shape] and contiguous,
    an index_select each of the weights' concatenated rows (`width` values a model)."""

    def __init__(self, index: Tensor, out_shapes: list[tuple[int, ...]], n_inputs: int, width: int):
        self.index, self.out_shapes, self.n_inputs = index, out_shapes, n_inputs
        counts = torch.bincount(index, minlength=width)
        order = torch.argsort(index, stable=True)  # output positions grouped by the input position they read
        slot = torch.arange(len(index)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        inverse = torch.full((width, max(1, int(counts.max()))), len(index), dtype=torch.long)
        inverse[index[order], slot] = order
        self.inverse = inverse
        self._on: dict[torch.device, tuple[Tensor, ...]] = {}  # the tables on each device, copied once

    def tables(self, device: torch.device) -> tuple[Tensor, ...]:
        """(inverse, each output's index) on `device`: copied at the first call there (before a CUDA graph's
        capture: the trainer's first steps run eagerly)."""
        if device not in self._on:
            sizes = [int(torch.Size(s).numel()) for s in self.out_shapes]
            self._on[device] = (self.inverse.to(device), *self.index.to(device).split(sizes))
        return self._on[device]

    def __call__(self, *inputs: Any) -> tuple[Tensor, ...]:
        n = inputs[0].shape[0]
        flat = torch.cat([t.reshape(n, -1) for t in inputs[:self.n_inputs]], 1)
        out = _GatherRows.apply(flat, *self.tables(flat.device))
        return tuple(o.view(n, *s) for o, s in zip(out, self.out_shapes))


__all__ = ["Gather", "plan", "vmapped"]
