"""Fast population programs: N small models as batched matrix multiplies instead of vmapped convolutions.

`torch.func.vmap` over a population turns every Conv2d into one grouped convolution (groups = N) with
1-8 channels per group, where cuDNN is slow; that is the wall the population trainer hits on a GPU.
Here the model's forward is traced once with `torch.fx` and re-emitted with each parametric layer
replaced by a population version that keeps the model axis explicit:

  Conv2d      im2col on a channels-last view (x.unfold over H and W), then one bmm over models:
              [N, B*Ho*Wo, C*k*k] @ [N, C*k*k, O] -> [N, B*Ho*Wo, O], which is already channels-last;
              on the CPU (`grouped_convs`) one convolution with a group per model, as vmap runs it, where
              oneDNN's grouped kernels beat the patch matrix (all but the shortest patches); its input and
              output are in the model-groups layout [B, N*C, H, W], kept while only plane ops (activations,
              pools, dropout, a spatial mean) read them, so consecutive grouped convs transpose no maps
  Linear      one bmm over models, [N, B, in] @ [N, in, out]
  FlatLinear  the same on the flattened trailing axes

Activations between layers are [N*B, ...] tensors, so every op without parameters (pooling,
activations, flatten, reshape, residual adds) runs unchanged, as it would on one big batch. Autograd
gives the backward (unfold's backward is the col2im scatter), so it is exact for any layer shapes.
Weights stay float32 (the optimizer's master copy); `dtype` is the compute dtype of activations and
matmuls (bf16 on a GPU), and the logits come back in float32.

With `kernels=True` (the trainer's choice where `zoos.popconv.available`), every Conv2d runs as popconv's Triton
implicit-GEMM kernels instead of im2col + bmm: no patch matrix in memory, forward and backward (a strided conv at
its stride where it reads channels-last, else as the stride-1 conv of its input's stride x stride blocks,
`popconv.space_to_depth`). A first convolution that reads
the input directly also takes the batch as row indices into the resident data set (`forward(..., rows=idx)`), and
a shared evaluation batch becomes the same indices for every model, so the input is never gathered or expanded per
model in memory. A kernel conv (up to 16 output channels) whose output only feeds a 2x2 max-pool and/or a monotone
activation (tanh, sigmoid, relu, leaky_relu, as modules or functions; a dropout that is off may sit between)
becomes one `popconv.conv2d_pool_act`: the full-resolution conv output is never written. A scale and shift of one
value per output channel right after any conv (an eval-mode batch norm, `fold_affine`) are folded into its stacked
weights and bias, where that keeps every value's dtype (always in float32). Where `popconv.windows_pay` says so (a
first conv followed by a 2x2 max-pool, by default), that first conv reads a window table of the data set instead
(`popconv.window_table`, built once per resident data set and kept while the data set lives): its forward and
weight gradient become tensor-core products over contiguous whole-window rows. Wide kernel convs write
channels-last maps, and any other plain 2x2 max-pool of a map runs as `popconv.max_pool2x2` (PyTorch's
channels-last pooling is several times slower on these maps); where such a pool alone reads a wide conv's folded
activation, the pool's backward applies the activation's derivative (`act_grad=False`), where a stride-1 kernel
conv alone reads it, that conv's input gradient does (`input_act`), and where a mean over the map does, its
backward (`popconv.spatial_mean`). A Linear (or F.linear) of up to `poplinear.MAX_FEATURES` inputs and outputs
runs as `poplinear.linear`: the bias in the product's epilogue and its gradient in the weight gradient's pass,
where a batched matmul spends two more passes on each; Linears that read one value run as one `poplinear.linears`
(`_linears_of_one_input`). A pointwise activation (of poplinear.INPUT_ACTIVATIONS: an MLP's ReLU, EGNN's SiLU; not
the exact GELU, whose erf costs the kernels more than they save) that only such linears read, past reshapes and
skipped dropouts, is applied by them as they load their input, its derivative in their input gradient
(`input_act`): it is never written (`_activation_into_linears`).

`FastPopulation.supports(module)` says whether a module can run this way and why not: only the layer
types above carry parameters, buffers belong to `PopDropout` only, and the traced forward reads no
parameter directly. The trainer uses it where it applies and keeps `vmap` otherwise.
"""

from __future__ import annotations

import copy
import math
import operator
import os
import re
import sys
import weakref
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from zoos import popconv, popgather, poplinear, popnorm
from zoos.archs.base import ACTIVATIONS, POPULATION_FORMS, PopDropout
from zoos.archs.layers import FlatLinear, linalg_eigh

_COMPILED: dict[tuple, Callable] = {}  # one compiled program per (code, modules, dtype), shared by later populations


# ---- population layers: x is [N*B, ...], weights are stacked [N, ...] -------------------------------

def pop_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """nn.Linear of model n on rows n*B..(n+1)*B-1 of x [N*B, ..., in]; w [N, out, in], b [N, out]."""
    n, out_f, in_f = w.shape
    lead = x.shape[:-1]
    xs = x.reshape(n, -1, in_f)
    wt = w.to(x.dtype).transpose(1, 2)
    y = torch.bmm(xs, wt) if b is None else torch.baddbmm(b.to(x.dtype).unsqueeze(1), xs, wt)
    return y.reshape(*lead, out_f)


BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "matmul": torch.matmul}


def pop_broadcast(op: str, x: Tensor, w: Tensor, data_first: bool, dtype: torch.dtype | None = None) -> Tensor:
    """BINARY[op](x_n, w_n) (or (w_n, x_n)) of model n's samples and its own weight, broadcast as each model's op
    would: x [N*B, ...], w [N, ...] of a rank no higher than a sample batch's. `dtype`: both cast first (autocast's
    matmul)."""
    fn, n = BINARY[op], w.shape[0]
    xs = x.unflatten(0, (n, -1))
    ws = w.reshape(n, *[1] * (xs.dim() - w.dim()), *w.shape[1:])
    if dtype is not None:
        xs, ws = xs.to(dtype), ws.to(dtype)
    return (fn(xs, ws) if data_first else fn(ws, xs)).flatten(0, 1)


def pop_conv2d(x: Tensor, w: Tensor, b: Tensor | None, stride: tuple[int, int], padding: tuple[int, int]) -> Tensor:
    """nn.Conv2d (groups 1, dilation 1, zero padding) per model, as im2col + bmm; x [N*B, C, H, W], w [N, O, C, kh, kw]."""
    n, o, c, kh, kw = w.shape
    if padding != (0, 0):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    patches = x.permute(0, 2, 3, 1).unfold(1, kh, stride[0]).unfold(2, kw, stride[1])  # [NB, Ho, Wo, C, kh, kw]
    nb, ho, wo = patches.shape[:3]
    cols = patches.reshape(n, (nb // n) * ho * wo, c * kh * kw)
    wt = w.to(x.dtype).reshape(n, o, c * kh * kw).transpose(1, 2)
    y = torch.bmm(cols, wt) if b is None else torch.baddbmm(b.to(x.dtype).unsqueeze(1), cols, wt)
    return y.view(nb, ho, wo, o).permute(0, 3, 1, 2)  # logical NCHW, channels-last in memory


def _to_groups(x: Tensor, n: int) -> Tensor:
    """[N*B, C, ...] -> [B, N*C, ...] for n models, as reshapes and a transpose."""
    return x.reshape(n, x.shape[0] // n, *x.shape[1:]).transpose(0, 1).reshape(x.shape[0] // n, -1, *x.shape[2:])


class _ToModelGroups(torch.autograd.Function):
    """`to_model_groups` whose backward hands x's gradient back in x's own memory layout (an im2col conv's
    channels-last output): an activation's backward before it then reads its gradient and its saved output alike,
    where operands of mixed layouts run a strided loop instead of a vectorised one."""

    @staticmethod
    def forward(ctx, x: Tensor, n: int) -> Tensor:
        dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
        ctx.n, ctx.shape, ctx.stride = n, x.shape, x.stride() if dense else None
        return _to_groups(x, n)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        dx = _from_groups(g, ctx.n)
        if ctx.stride is None:
            return dx.contiguous(), None
        return torch.empty_strided(ctx.shape, ctx.stride, dtype=g.dtype, device=g.device).copy_(dx), None


def to_model_groups(x: Tensor, w: Tensor) -> Tensor:
    """[N*B, C, ...] -> [B, N*C, ...]: the models as channel groups (N = w.shape[0]), the layout of a grouped conv;
    x's gradient comes back in x's layout (`_ToModelGroups`)."""
    if torch._C._are_functorch_transforms_active() or not x.requires_grad:
        return _to_groups(x, w.shape[0])
    return _ToModelGroups.apply(x, w.shape[0])


def _from_groups(y: Tensor, n: int) -> Tensor:
    """[B, N*C, ...] -> [N*B, C, ...] for n models, `_to_groups` undone."""
    b_ = y.shape[0]
    return y.reshape(b_, n, -1, *y.shape[2:]).transpose(0, 1).reshape(n * b_, -1, *y.shape[2:])


def from_model_groups(y: Tensor, w: Tensor) -> Tensor:
    """[B, N*C, ...] -> [N*B, C, ...], `to_model_groups` undone (N = w.shape[0])."""
    return _from_groups(y, w.shape[0])


def grouped_conv(xs: Tensor, w: Tensor, b: Tensor | None, stride: tuple[int, int], padding: tuple[int, int]) -> Tensor:
    """Every model's conv as one convolution with a group per model, in the model-groups layout: xs [B, N*C, H, W],
    w [N, O, C, kh, kw] -> [B, N*O, Ho, Wo]."""
    n, o, c, kh, kw = w.shape
    bias = None if b is None else b.to(xs.dtype).reshape(n * o)
    return F.conv2d(xs, w.to(xs.dtype).reshape(n * o, c, kh, kw), bias, stride, padding, groups=n)


def pop_conv2d_grouped(x: Tensor, w: Tensor, b: Tensor | None, stride: tuple[int, int], padding: tuple[int, int]) -> Tensor:
    """`pop_conv2d` as one convolution with a group per model (what vmap makes of a conv): the CPU's program, where
    oneDNN's grouped kernels beat a patch matrix and a batched matmul; x [N*B, C, H, W], w [N, O, C, kh, kw]."""
    return from_model_groups(grouped_conv(to_model_groups(x, w), w, b, stride, padding), w)


def fold_affine(w: Tensor, b: Tensor | None, op: str, v: Tensor) -> tuple[Tensor, Tensor | None]:
    """A conv's stacked filters w [N, O, ...] and bias b [N, O] (or None) with `y op v` after it folded in, for v
    [N, ...] one value per model and output channel (or per model): mul scales both, add and sub shift the bias."""
    n, o = w.shape[:2]
    v = v.reshape(n, -1)  # [N, O] or [N, 1]
    if op == "mul":
        return w * v.reshape(n, -1, *[1] * (w.dim() - 2)), None if b is None else b * v
    shift = v if op == "add" else -v
    return w, shift.expand(n, o) if b is None else b + shift


IM2COL_PATCH_MAX = 12  # where grouped convs run, a conv with patches this short (C * kh * kw; a 3x3 conv of one channel) runs as im2col + bmm


def _affine(y: Tensor, w: Tensor | None, b: Tensor | None, trailing: int) -> Tensor:
    """y [N*B, ...] times w [N, *s] plus b [N, *s], s aligned with y's dims from `trailing` dims before its end
    on (a channel axis: trailing = number of spatial dims; normalized_shape: trailing = 0)."""
    n = (w if w is not None else b).shape[0]
    ys = y.reshape(n, -1, *y.shape[1:])
    def shaped(v: Tensor) -> Tensor:
        lead = ys.dim() - (v.dim() - 1) - trailing - 1
        return v.to(y.dtype).reshape(n, *([1] * lead), *v.shape[1:], *([1] * trailing))
    if w is not None:
        ys = ys * shaped(w)
    if b is not None:
        ys = ys + shaped(b)
    return ys.reshape(y.shape)


def pop_group_norm(x: Tensor, groups: int, w: Tensor | None, b: Tensor | None, eps: float) -> Tensor:
    """F.group_norm per model: the statistics are per sample, so one group_norm of the [N*B, C, ...]
    batch, then each model's affine (w, b [N, C]); in float32, as autocast runs norms."""
    return _affine(F.group_norm(x.float(), groups, None, None, eps), w, b, x.dim() - 2)


def pop_layer_norm(x: Tensor, shape: Sequence[int], w: Tensor | None, b: Tensor | None, eps: float) -> Tensor:
    """F.layer_norm per model: per-sample statistics over the trailing `shape`, then each model's affine (float32)."""
    return _affine(F.layer_norm(x.float(), list(shape), None, None, eps), w, b, 0)


def rows_input(x: Tensor, rows: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The population's input batch [N*B, ...] in the compute dtype: x itself, or x[rows] when indexed."""
    return (x if rows is None else x[rows.reshape(-1)]).to(dtype)


def pop_dropout(x: Tensor, p: Tensor, training: bool) -> Tensor:
    """PopDropout with each model's own rate p [N]: inverted dropout, a fresh mask per element."""
    if not training:
        return x
    keep = (1.0 - p).to(x.dtype).view(-1, *([1] * x.dim()))
    xs = x.reshape(p.shape[0], -1, *x.shape[1:])
    return (xs * (torch.rand_like(xs) < keep).to(x.dtype) / keep).reshape(x.shape)


def pop_dropout_groups(x: Tensor, p: Tensor, training: bool) -> Tensor:
    """`pop_dropout` on the model-groups layout [B, N*C, ...] (`to_model_groups`)."""
    if not training:
        return x
    keep = (1.0 - p).to(x.dtype).view(1, -1, 1)
    xs = x.reshape(x.shape[0], p.shape[0], -1)
    return (xs * (torch.rand_like(xs) < keep).to(x.dtype) / keep).reshape(x.shape)


# ---- tracing: which values carry the batch, which the weights ---------------------------------------

DATA, WEIGHT, CONST, SIZE = "data", "weight", "const", "size"  # the kind of every traced value (see _kinds)
SHAPE_PROBES = (2, 3)  # batch sizes of the two shape propagations that find the batch axis
INDEX_LIMIT = 2**31 - 1  # elements a tensor may hold for CUDA kernels that index with 32-bit offsets


class Unsupported(ValueError):
    """The module cannot run as a fast population; the message says which layer or op and why."""


def _state(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))


def _layer(m: nn.Module) -> bool:
    """Whether m is a layer with a population op of its own (kept whole in the trace)."""
    if isinstance(m, nn.Conv2d):
        return m.groups == 1 and tuple(m.dilation) == (1, 1) and m.padding_mode == "zeros" and not (
            isinstance(m.padding, str) and m.padding == "same" and any(k % 2 == 0 for k in m.kernel_size))
    return isinstance(m, (nn.Linear, FlatLinear, PopDropout))


class _Tracer(fx.Tracer):
    """Keeps the population layers and stateless torch.nn modules whole; traces through any other module,
    so a layer with weights of another type (GroupNorm, LayerNorm, a custom layer) becomes functional ops."""

    proxy_buffer_attributes = True

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        """A node that names the line of the forward it came from (`_what`): read off the caller's frames, not by
        torch's record_stack_traces, which captures and symbolises the whole stack for every node."""
        node = super().create_node(*args, **kwargs)
        node.stack_trace = _calling_line()
        return node

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _layer(m):
            return True
        return not any(True for _ in m.parameters()) and not any(True for _ in m.buffers()) and super().is_leaf_module(m, qualname)


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _calling_line() -> str | None:
    """The innermost frame of the caller's stack outside torch and this module, as a traceback prints it."""
    frame = sys._getframe(2)
    while frame is not None:
        file = frame.f_code.co_filename
        if not file.startswith(_TORCH_DIR) and file != __file__:
            return f'File "{file}", line {frame.f_lineno}, in {frame.f_code.co_name}'
        frame = frame.f_back
    return None


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    return _padding(m.padding, m.kernel_size)


def _padding(padding: Any, kernel: tuple[int, int]) -> tuple[int, int]:
    """A Conv2d padding argument as (pad_h, pad_w): ints, pairs, 'valid' or 'same' (odd kernels, stride 1)."""
    if isinstance(padding, str):
        return (0, 0) if padding == "valid" else tuple((k - 1) // 2 for k in kernel)  # type: ignore[return-value]
    return tuple(padding) if isinstance(padding, (tuple, list)) else (int(padding), int(padding))  # type: ignore[return-value]


def _pair(v: Any) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))  # type: ignore[return-value]


def _pool2(m: nn.MaxPool2d) -> bool:
    """Whether m is a plain 2x2 max-pool with stride 2 (what popconv.conv2d_pool_act folds in)."""
    return (_pair(m.kernel_size) == (2, 2) and _pair(m.stride) == (2, 2) and _pair(m.padding) == (0, 0)
            and _pair(m.dilation) == (1, 1) and not m.ceil_mode and not m.return_indices)


_ACTIVATION_MODULES = {a.module: name for name, a in ACTIVATIONS.items()}
_ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid",
                         F.sigmoid: "sigmoid", F.leaky_relu: "leaky_relu", F.silu: "silu", F.gelu: "gelu", "relu": "relu",
                         "tanh": "tanh", "sigmoid": "sigmoid"}
_ACTIVATION_ARGS = {"leaky_relu": ("negative_slope", "inplace"), "gelu": ("approximate",)}  # after the input
_GELU = {"none": "gelu", "tanh": "gelu_tanh"}
_KEPT_APART = {"gelu"}  # erf costs a linear's kernels more than the pass over its input that folding it saves


def _activation(node: fx.Node, mods: Mapping[str, nn.Module]) -> tuple[str, float, bool] | None:
    """(name, slope, in place) where `node` applies a pointwise activation (a name of poplinear.INPUT_ACTIVATIONS;
    leaky_relu's slope, else 0) to its first argument alone: a module, F.silu / torch.tanh / ... or the tensor
    method; else None."""
    if node.op == "call_module":
        m = mods[node.target]
        name = _ACTIVATION_MODULES.get(type(m))
        if name is None or len(node.args) != 1 or node.kwargs:
            return None
        if name == "gelu":
            name = _GELU.get(m.approximate)
        return (name, float(getattr(m, "negative_slope", 0.0)), bool(getattr(m, "inplace", False))) if name else None
    if node.op not in ("call_function", "call_method") or node.target not in _ACTIVATION_FUNCTIONS or not node.args:
        return None
    name = _ACTIVATION_FUNCTIONS[node.target]
    positional = _ACTIVATION_ARGS.get(name, ("inplace",))
    if len(node.args) - 1 > len(positional):
        return None
    extra = {**dict(zip(positional, node.args[1:])), **node.kwargs}
    slope = extra.pop("negative_slope", 0.01) if name == "leaky_relu" else 0.0
    if name == "gelu":
        name = _GELU.get(extra.pop("approximate", "none"))
    inplace = extra.pop("inplace", False)
    if extra or name is None or not isinstance(slope, (int, float)) or not isinstance(inplace, bool):
        return None
    return name, float(slope), inplace


def _activation_of(node: fx.Node, source: fx.Node, mods: Mapping[str, nn.Module]) -> tuple[str, float] | None:
    """(name, slope) where `node` applies a non-decreasing activation (one popconv and popnorm apply in their
    epilogue) to `source` alone; else None. (In place or not: `source` feeds only it.)"""
    act = _activation(node, mods)
    if act is None or node.args[:1] != (source,) or act[0] not in popconv.EPILOGUE_ACTIVATIONS or act[1] < 0:
        return None
    return act[:2]


def _what(node: fx.Node) -> str:
    """A node as a reader knows it: the module path, or the op and the line of the architecture it came from."""
    if node.op == "call_module":
        return str(node.target)
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.stack_trace or "")
    ours = [f"{os.path.basename(f)}:{line}" for f, line in frames if f"{os.sep}torch{os.sep}" not in f]
    inside = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values() if path]
    where = ", ".join([str(name)] * bool(inside) + ours[-1:])
    return f"{inside[-1] if inside else name} ({where})" if where else str(name)


class _Recorder(fx.Interpreter):
    """Runs a graph, keeping every node's value in `seen`."""

    def __init__(self, module: nn.Module, graph: fx.Graph):
        super().__init__(module, graph=graph)
        self.extra_traceback = False  # a forward that fails here is a finding (Unsupported): no structured log of it
        self.seen: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.seen[n] = out = super().run_node(n)
        return out


def _probe_runs(gm: fx.GraphModule, input_shape: tuple[int, ...]) -> list[dict[fx.Node, Any]]:
    """Every node's value at each batch size of SHAPE_PROBES, on the weights' device. A template's (weights on the
    meta device) run on the CPU with zero weights, since the meta device's kernels import torch._dynamo and sympy
    (~1 s of a first population), and on the meta device only where zeros fail (a solve with a singular matrix)."""
    where = next((t.device for t in [*gm.parameters(), *gm.buffers()]), torch.device("cpu"))
    tries = [(gm, where)]
    if where.type == "meta":
        tries.insert(0, (copy.deepcopy(gm)._apply(lambda t: torch.zeros(t.shape, dtype=t.dtype)), torch.device("cpu")))
    for runner, device in tries:
        runs = []
        try:
            with torch.no_grad():
                for b in SHAPE_PROBES:
                    recorder = _Recorder(runner, gm.graph)
                    recorder.run(torch.zeros(b, *input_shape, device=device))
                    runs.append(recorder.seen)
        except Exception as e:  # noqa: BLE001 - an op without a meta kernel, or a shape the forward refuses
            failed = f"its forward does not run on a batch of shape {(b, *input_shape)} " \
                     f"({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        else:
            return runs
    raise Unsupported(failed)


def _kinds(gm: fx.GraphModule, input_shape: tuple[int, ...], state: set[str]) -> dict[fx.Node, str]:
    """The kind of every node's value, from two shape propagations (`_probe_runs`): DATA (a tensor whose leading axis
    is the batch: per sample), WEIGHT (computed from the parameters and buffers alone: per model), CONST (neither),
    SIZE (a number or shape that grows with the batch). Unsupported where the batch axis moves off the front or a
    value sums over the batch."""
    runs = _probe_runs(gm, input_shape)
    kinds: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        # one model's (or sample batch's) value, shape and dtype only
        node.meta["probe"] = tree_map(lambda v: v.to("meta") if isinstance(v, Tensor) else v, runs[0][node])
        inputs = [kinds[n] for n in node.all_input_nodes]
        small, large = runs[0][node], runs[1][node]
        tensors = [(a, b) for a, b in zip(tree_flatten(small)[0], tree_flatten(large)[0]) if isinstance(a, Tensor)]
        if node.op == "placeholder":
            kinds[node] = DATA
        elif node.op == "get_attr":
            if node.target not in state:
                raise Unsupported(f"its forward reads {node.target!r}, a tensor that is neither a parameter nor a "
                                  f"buffer (register it as a buffer)")
            kinds[node] = WEIGHT
        elif DATA not in inputs and SIZE not in inputs:
            kinds[node] = WEIGHT if WEIGHT in inputs else CONST
        elif tensors:  # a tensor, or a tuple of them (eigh's)
            moved = [(a, b) for a, b in tensors if a.shape[1:] != b.shape[1:]]
            if moved:
                raise Unsupported(f"{_what(node)} moves the batch axis off the front (shape {tuple(moved[0][0].shape)} "
                                  f"at batch {SHAPE_PROBES[0]}, {tuple(moved[0][1].shape)} at {SHAPE_PROBES[1]})")
            if any(a.shape[:1] != b.shape[:1] for a, b in tensors):
                kinds[node] = DATA
            elif any(kinds[n] == DATA and isinstance(runs[0][n], Tensor) for n in node.all_input_nodes):
                raise Unsupported(f"{_what(node)} reduces over the batch (shape {tuple(tensors[0][0].shape)} at every batch size)")
            else:
                kinds[node] = CONST  # e.g. torch.eye(n) with n a per-sample size
        else:
            kinds[node] = SIZE if small != large else CONST
    return kinds


def _flat_kinds(args: Any, kinds: Mapping[fx.Node, str]) -> tuple[list[Any], Any, list[str | None]]:
    """(leaves, spec, kind of each leaf or None) of an op's (args, kwargs)."""
    leaves, spec = tree_flatten(args)
    return leaves, spec, [kinds.get(leaf) if isinstance(leaf, fx.Node) else None for leaf in leaves]


_SIGNATURES = {  # the functional ops with population versions: their parameters, in order, and defaults
    F.conv2d: (("input", "weight", "bias", "stride", "padding", "dilation", "groups"), dict(bias=None, stride=1, padding=0, dilation=1, groups=1)),
    F.linear: (("input", "weight", "bias"), dict(bias=None)),
    F.group_norm: (("input", "num_groups", "weight", "bias", "eps"), dict(weight=None, bias=None, eps=1e-5)),
    F.layer_norm: (("input", "normalized_shape", "weight", "bias", "eps"), dict(weight=None, bias=None, eps=1e-5)),
}
_SIGNATURES[torch.conv2d] = _SIGNATURES[F.conv2d]
_SIGNATURES[F.max_pool2d] = _SIGNATURES[torch.max_pool2d] = (
    ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    dict(stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False))


def _bind(node: fx.Node) -> dict[str, Any]:
    """A call of one of `_SIGNATURES`'s ops as {parameter: argument}, defaults filled in."""
    names, defaults = _SIGNATURES[node.target]
    return {**defaults, **dict(zip(names, node.args)), **node.kwargs}


def _normalized_shape(node: fx.Node) -> tuple[Any, ...]:
    """A layer_norm call's normalized_shape as a tuple (an int is one axis)."""
    shape = _bind(node)["normalized_shape"]
    return (shape,) if isinstance(shape, int) else tuple(shape)


def _named_op(name: str, fn: Callable) -> Callable:
    fn.__name__ = fn.__qualname__ = name
    return fn


def _per_model(node: fx.Node, target: Callable, spec: Any, leaf_kinds: list[str | None]) -> Callable:
    """An op mixing data and weights as `vmap` over the models: data leaves viewed [N, B, ...], weight
    leaves [N, ...], the rest shared; the output folded back to [N*B, ...]."""
    data = [i for i, k in enumerate(leaf_kinds) if k == DATA]
    dims = [0 if k in (DATA, WEIGHT) else None for k in leaf_kinds]
    weight = leaf_kinds.index(WEIGHT)

    def run(*leaves: Any) -> Tensor:
        n = leaves[weight].shape[0]
        leaves = list(leaves)
        for i in data:  # weights keep their float32: type promotion as under autocast
            leaves[i] = leaves[i].reshape(n, -1, *leaves[i].shape[1:])

        def one(*ls: Any) -> Tensor:
            args, kwargs = tree_unflatten(list(ls), spec)
            return target(*args, **kwargs)

        out = vmap(one, in_dims=tuple(dims))(*leaves)
        return out.reshape(-1, *out.shape[2:])

    return _named_op(f"per_model_{node.name}", run)


# ops that read their result on the host (a solver's status, a data-dependent size): functions and methods
_HOST_SYNC_FUNCTIONS = {linalg_eigh, torch.linalg.eigh, torch.linalg.eigvalsh, torch.linalg.eig, torch.linalg.svd,
                        torch.linalg.svdvals, torch.linalg.inv, torch.linalg.solve, torch.linalg.cholesky,
                        torch.linalg.lstsq, torch.nonzero, torch.masked_select, torch.unique}
_HOST_SYNC_METHODS = {"nonzero", "item", "tolist", "unique", "masked_select"}


def _syncs_host(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _HOST_SYNC_FUNCTIONS
            or node.op == "call_method" and node.target in _HOST_SYNC_METHODS)


def _index_tensors(graph: fx.Graph) -> None:
    """Every list of ints indexing a tensor (`a[..., [0, 2], idx]`) as a tensor made on the input's device:
    indexed with a list, torch copies it from host memory at each call, which a CUDA graph cannot capture."""
    x = next((n for n in graph.nodes if n.op == "placeholder"), None)
    start = next((n for n in graph.nodes if n.op != "placeholder"), None)
    for node in list(graph.nodes):
        if x is None or node.op != "call_function" or node.target is not operator.getitem:
            continue
        index = node.args[1]
        parts = index if isinstance(index, tuple) else (index,)
        if not any(_int_list(p) for p in parts):
            continue
        with graph.inserting_before(start):  # at the top: the weights' prologue may read them
            device = graph.call_function(getattr, (x, "device"))
            parts = tuple(graph.call_function(torch.tensor, (p,), {"dtype": torch.long, "device": device}) if _int_list(p) else p
                          for p in parts)
        node.args = (node.args[0], parts if isinstance(index, tuple) else parts[0])


def _literal_tensor(node: fx.Node) -> Tensor | None:
    """The value of a `torch.tensor(list, dtype=...)` node (on the CPU; its device argument is left out), else None."""
    if node.op != "call_function" or node.target is not torch.tensor or len(node.args) != 1 or not _int_list(node.args[0]):
        return None
    return torch.tensor(node.args[0], dtype=node.kwargs.get("dtype"))


def _int_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)


_RANDOM = {torch.rand, torch.randn, torch.randint, torch.randperm, torch.rand_like, torch.randn_like,
           torch.randint_like, torch.normal, torch.bernoulli, torch.multinomial}


def _constant_tensor(node: fx.Node) -> bool:
    """Whether a constant node makes a tensor that is the same at every call (not a random draw)."""
    return (node.op == "call_function" and isinstance(node.meta.get("probe"), Tensor) and node.target not in _RANDOM
            and not any(u.op == "call_method" and str(u.target).endswith("_") for u in node.users))  # kept unchanged


_HASHED = (int, float, bool, str, type(None), torch.dtype, torch.device)  # argument values keyed as they are


class _Constants:
    """The constant tensors of an eager program (an index list as a tensor, `torch.tensor(signs)`), each made
    once per device and arguments and then reused: a CUDA graph cannot capture the host-to-device copy that
    making them costs. A compiled program folds them itself."""

    def __init__(self) -> None:
        self.made: dict[tuple, Tensor] = {}
        self.kept: set[int] = set()  # ids of the tensors in `made`

    def op(self, name: str, target: Callable) -> Callable:
        """`target` as an op of the program that makes its tensor once for each device and arguments."""
        def make(*args: Any, **kwargs: Any) -> Tensor:
            leaves = tree_flatten((args, kwargs))[0]
            if any(isinstance(a, Tensor) and id(a) not in self.kept for a in leaves):  # made from a tensor not kept
                return target(*args, **kwargs)
            # the node fixes the arguments' structure; the type keeps 1, 1.0 and True apart
            key = (name, *(id(a) if isinstance(a, Tensor) else (type(a), a if isinstance(a, _HASHED) else repr(a))
                           for a in leaves))
            made = self.made.get(key)
            if made is None:
                made = self.made[key] = target(*args, **kwargs)
                self.kept.add(id(made))
            return made

        return _named_op(f"constant_{name}", make)


def _method(name: str) -> Callable:
    return lambda self, *args, **kwargs: getattr(self, name)(*args, **kwargs)


# ops that act on each (sample, channel) plane alike: they give the same values in the model-groups layout
_PLANE_MODULES = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus,
                  nn.Hardtanh, nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                  nn.Dropout)
_PLANE_FUNCTIONS = {F.relu, torch.relu, F.relu6, torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.gelu, F.silu,
                    F.leaky_relu, F.elu, F.softplus, F.hardtanh, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                    F.dropout}
_PLANE_METHODS = {"relu", "tanh", "sigmoid"}
_SPATIAL = ({-2, -1}, {2, 3})  # the dims of a [B, C, H, W] map's planes


def _plane_op(node: fx.Node, x: fx.Node, mods: Mapping[str, nn.Module]) -> str | None:
    """How `node` treats x, a [*, C, H, W] map, if it acts on each plane alike and reads no other tensor: "plane"
    (the result is a map again), "reduce" (a mean or sum over the planes: [*, C]), else None."""
    if not node.args or node.args[0] is not x or any(isinstance(a, fx.Node) for a in [*node.args[1:], *node.kwargs.values()]):
        return None
    if node.op == "call_module":
        m = mods.get(node.target)
        return "plane" if isinstance(m, _PLANE_MODULES) and not getattr(m, "return_indices", False) else None
    if node.op == "call_function":
        indices = node.kwargs.get("return_indices") or node.target is F.max_pool2d and len(node.args) > 6 and node.args[6]
        return "plane" if node.target in _PLANE_FUNCTIONS and not indices else None
    if node.op == "call_method" and node.target in _PLANE_METHODS:
        return "plane"
    if node.op == "call_method" and node.target in ("mean", "sum"):
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        dims = set(dims) if isinstance(dims, (tuple, list)) else None
        if dims in _SPATIAL and len(node.args) <= 2 and set(node.kwargs) <= {"dim", "keepdim"}:
            return "plane" if node.kwargs.get("keepdim") else "reduce"
    return None


def _model_group_chains(g: fx.Graph, mods: Mapping[str, nn.Module]) -> None:
    """Keep grouped convs' outputs in the model-groups layout while only plane ops read them: each
    `from_model_groups` moves past the single-user chain of plane ops after it (activations, pools, a dropout, a
    spatial mean), and a grouped conv's `to_model_groups` of what the chain ends in reads the chain itself."""
    for f in [n for n in g.nodes if n.op == "call_function" and n.target is from_model_groups]:
        y, w = f.args
        members: list[fx.Node] = []
        end = f
        while len(end.users) == 1:
            (u,) = end.users
            if u.op == "call_function" and u.target is pop_dropout and u.args[0] is end and end not in u.args[1:]:
                how = "plane"
            else:
                how = _plane_op(u, end, mods)
            if how is None:
                break
            members.append(u)
            end = u
            if how == "reduce":
                break
        grouped = members[-1] if members else y  # the chain's end in the model-groups layout
        tos = [u for u in end.users if u.op == "call_function" and u.target is to_model_groups and u.args[0] is end]
        if not members and not tos:
            continue
        if members:
            for m in members:
                if m.target is pop_dropout:
                    m.target = pop_dropout_groups
            members[0].replace_input_with(f, y)
            if len(end.users) > len(tos):  # read elsewhere in the [N*B, ...] layout
                with g.inserting_after(end):
                    back = g.call_function(from_model_groups, (end, w))
                end.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back and u not in tos)
        for t in tos:
            t.replace_all_uses_with(grouped)
            g.erase_node(t)
        if not f.users:
            g.erase_node(f)


class _Emitter:
    """Re-emits a traced forward as a population program: population layers for the layers and convs that
    have one, the weight-only ops as one prologue (gathers where they only move values, `zoos.popgather`, else
    vmapped), ops of data alone on the [N*B, ...] batch as they are, and any other op that mixes data and
    weights as a per-op vmap over the models."""

    def __init__(self, pop: "FastPopulation", module: nn.Module, input_shape: tuple[int, ...]):
        self.pop = pop
        self.src = fx.GraphModule(module, _Tracer().trace(module))
        _index_tensors(self.src.graph)
        self.mods = dict(module.named_modules())
        self.kinds = _kinds(self.src, input_shape, set(pop.param_keys) | set(pop.buffer_keys))
        self.choices: list[tuple[str, str, str]] = []  # (layer, program, why not a faster one)
        self.added: list[int] = []  # elements a sample of each per-sample value the program adds (not in the trace)

    _SHAPE_ONLY = {"flatten", "reshape", "view", "unsqueeze", "squeeze", "permute", "transpose", "contiguous", "unflatten"}

    def input_dtype(self, placeholder: fx.Node) -> torch.dtype:
        """The compute dtype where the input reaches only convs and linears (through reshapes): they would cast
        it so under autocast; float32 where any other op reads it (eigh has no bf16, a Gram matrix loses digits)."""
        return self.pop.dtype if self._read_by_weighted_only(placeholder) else torch.float32

    def _transparent(self, n: fx.Node) -> bool:
        """Whether n passes its input on as it is: a reshape or view, or a dropout this program skips."""
        return n.op == "call_method" and n.target in self._SHAPE_ONLY or self._skipped_dropout(n)

    def _skipped_dropout(self, n: fx.Node) -> bool:
        """Whether n is a dropout this program skips (every rate 0: the identity)."""
        return n.op == "call_module" and isinstance(self.mods[n.target], PopDropout) and not self.pop.dropout

    def _read_by_weighted_only(self, node: fx.Node) -> bool:
        """Whether only convs and linears read `node`'s value (through reshapes and skipped dropouts) as their
        input, so that it may be stored in the compute dtype they cast it to."""
        todo, ends = [(u, node) for u in node.users], []
        while todo:
            n, via = todo.pop()
            if self._transparent(n):
                todo += [(u, n) for u in n.users]
            else:
                ends.append((n, via))
        return bool(ends) and all(self._weighted_reader(n, via) for n, via in ends)

    def _weighted_reader(self, n: fx.Node, via: fx.Node) -> bool:
        """Whether n is a conv or linear reading `via` as its input (which it casts to the compute dtype)."""
        return (n.op == "call_module" and isinstance(self.mods[n.target], (nn.Conv2d, nn.Linear, FlatLinear))
                or n.op == "call_function" and n.target in (F.conv2d, torch.conv2d, F.linear)) and n.args[0] is via

    def activation_elements(self) -> int:
        """Elements of every per-sample value of one sample together (reshapes and views not counted), from the
        shape probe, and of the values the program adds (a strided conv's blocks): what a training step may keep
        for its backward, at most."""
        return sum(t.numel() // SHAPE_PROBES[0] for node, kind in self.kinds.items()
                   if kind == DATA and not (node.op == "call_method" and node.target in self._SHAPE_ONLY)  # views
                   for t in tree_flatten(node.meta.get("probe"))[0] if isinstance(t, Tensor)) + sum(self.added)

    def sample_elements(self) -> int:
        """Elements of the largest per-sample value (an activation of one sample, or a value the program adds
        that a kernel reads), from the shape probe."""
        sizes = [t.numel() // SHAPE_PROBES[0] for node, kind in self.kinds.items() if kind == DATA
                 for t in tree_flatten(node.meta.get("probe"))[0] if isinstance(t, Tensor)]
        return max(sizes + self.added, default=1)

    def choose(self, node: fx.Node, program: str, why: str = "") -> None:
        self.choices.append((_what(node), program, why))

    def emit(self) -> fx.GraphModule:
        pop, kinds = self.pop, self.kinds
        src = self.src.graph
        g = fx.Graph()
        self.g = g
        x_in, self.rows_in, self.windows_in, self.training = (g.placeholder(n) for n in ("x", "rows", "windows", "training"))
        self.state = state = {k: g.placeholder("p_" + k.replace(".", "_")) for k in pop.param_keys + pop.buffer_keys}
        self.env = env = {}  # traced node -> its value in the new graph
        self.reads_input = reads_input = set()  # kernel convs that read the raw input (by row index) themselves
        self.fused = fused = set()  # pool / activation / add nodes folded into the kernel op before them
        self.deferred: dict[fx.Node, Callable[[], None]] = {}  # node -> the folded op emitted in its place
        self.pool_act: dict[fx.Node, tuple[str, float]] = {}  # max-pool -> the activation whose derivative it applies
        self.conv_act: dict[fx.Node, tuple[str, float]] = {}  # conv -> the same, in its input gradient
        self.mean_act: dict[fx.Node, tuple[tuple[str, float], bool]] = {}  # spatial mean -> the same, and its keepdim
        self.copies: dict[fx.Node, fx.Node] = {}  # emitted value -> its copy in the compute dtype, written with it
        self.linear_act: dict[fx.Node, tuple[str, float]] = {}  # activation -> itself, applied by the linears reading it
        self.applied: set[fx.Node] = set()  # those that a linear applied
        weights = self._prologue(state, env)  # weight node -> its value in the new graph (on first use)
        self.pre_add = self._adds_before_norms()  # LayerNorm -> the add it emits with itself
        fused.update(self.pre_add.values())
        self.siblings = self._linears_of_one_input()  # Linear -> the linears of its input emitted as one op with it
        self.sibling_out: dict[fx.Node, fx.Node] = {}  # a Linear emitted with the first of its group -> its output

        def value(a: Any) -> Any:
            return fx.node.map_arg(a, lambda n: weights(n) if kinds.get(n) == WEIGHT else env[n])

        self.value = value

        for node in src.nodes:
            if node in self.deferred:
                self.deferred.pop(node)()
                continue
            if node in fused or kinds.get(node) == WEIGHT:
                continue
            if node.op == "placeholder":
                users = list(node.users)
                if len(users) == 1 and users[0].args[:1] == (node,) and self._reads_input(users[0]):
                    env[node] = x_in
                    reads_input.add(users[0])
                else:
                    env[node] = g.call_function(rows_input, (x_in, self.rows_in, self.input_dtype(node)))
                continue
            if node.op == "output":
                out = node.args[0]
                if not isinstance(out, fx.Node) or kinds.get(out) != DATA:
                    raise Unsupported("its forward must return one tensor per sample")
                g.output(g.call_method("float", (env[out],)))
                continue
            if node.op == "call_module" and _layer(self.mods[node.target]):
                self._layer(node)
                continue
            leaves, _, leaf_kinds = _flat_kinds((node.args, node.kwargs), kinds)
            if WEIGHT in leaf_kinds and kinds[node] == DATA:
                env[node] = self._mixed(node)
            elif WEIGHT in leaf_kinds:
                raise Unsupported(f"{_what(node)} combines the weights with a per-sample size")
            elif kinds.get(node) == CONST and pop.constants is not None and _constant_tensor(node):
                env[node] = g.call_function(pop.constants.op(node.name, node.target), value(node.args), value(node.kwargs))
            elif pop.kernels and kinds.get(node) == DATA and self._plain_max_pool(node):
                act = self.pool_act.pop(node, None)  # the derivative of the activation its conv folded, in its backward
                options = {} if act is None else {"act": act[0], "slope": act[1]}
                env[node] = g.call_function(popconv.max_pool2x2, (value(node.args[0]),), options)
                self.choose(node, "popconv max-pool" + ("" if act is None else f" (+{act[0]}')"))
            elif (act := self._activation_into_linears(node)) is not None:
                env[node] = value(node.args[0])  # its readers apply it to this as they load it
                self.linear_act[node] = act
            elif node in self.mean_act:
                act, keepdim = self.mean_act.pop(node)
                env[node] = g.call_function(popconv.spatial_mean, (value(node.args[0]),),
                                            {"act": act[0], "slope": act[1], "keepdim": keepdim})
                self.choose(node, f"spatial mean (+{act[0]}')")
            else:  # data alone (or constants): the [N*B, ...] batch is one big batch of samples
                env[node] = g.node_copy(node, value)
        # derivatives (activations) left to readers that did not take them
        unpaired = [*self.pool_act, *self.conv_act, *self.mean_act, *(n for n in self.linear_act if n not in self.applied)]
        if unpaired:
            raise AssertionError(f"unpaired activation derivatives: {[_what(n) for n in unpaired]}")
        _model_group_chains(g, self.mods)
        g.lint()
        return fx.GraphModule(self.src, g)

    def _prologue(self, state: Mapping[str, fx.Node], env: Mapping[fx.Node, Any]) -> Callable[[fx.Node], fx.Node]:
        """The weight-only ops (kernel expansions, reshaped biases, ...) as one function of the stacked
        state called once per forward: an index_select an output where they only move the weights'
        values (`popgather.plan`), else vmapped over the models; returns node -> its output node."""
        kinds, needed = self.kinds, []
        produced: dict[fx.Node, fx.Node] = {}
        for node in self.src.graph.nodes:
            if kinds.get(node) == WEIGHT and any(kinds.get(u) != WEIGHT for u in node.users):
                if node.op == "get_attr":  # a parameter or buffer read as it is
                    produced[node] = state[node.target]
                else:
                    needed.append(node)
        if not needed:
            return lambda n: produced[n]
        sub = fx.Graph()
        inner: dict[fx.Node, fx.Node] = {}
        keys = [k for k in state if any(n.op == "get_attr" and n.target == k for n in self.src.graph.nodes)]
        inputs = {k: sub.placeholder("p_" + k.replace(".", "_")) for k in keys}
        consts: list[fx.Node] = []
        n_ops = 0
        for node in self.src.graph.nodes:
            if kinds.get(node) != WEIGHT:
                continue
            if node.op == "get_attr":
                inner[node] = inputs[node.target]
                continue
            if node.op == "call_module" and _state(self.mods[node.target]):
                raise Unsupported(f"{_what(node)} is applied to weights (a layer of weights computed from weights)")

            def arg(n: fx.Node) -> fx.Node:
                if n in inner:
                    return inner[n]
                consts.append(n)  # a constant computed in the main graph, shared by every model
                inner[n] = sub.placeholder(f"c{len(consts)}")
                return inner[n]

            inner[node] = sub.node_copy(node, arg)
            n_ops += 1
        sub.output(tuple(inner[n] for n in needed))
        prologue = fx.GraphModule(self.src, sub)
        tensors = {**dict(self.src.named_parameters()), **dict(self.src.named_buffers())}
        literal = [_literal_tensor(c) for c in consts]  # index tensors made from lists (`_index_tensors`)
        gather = None if None in literal else popgather.plan(prologue, [tensors[k].shape for k in keys], literal,
                                                               dtypes=[tensors[k].dtype for k in keys])
        dims = (0,) * len(keys)

        def weights_of(*args: Any) -> tuple[Tensor, ...]:
            return vmap(prologue, in_dims=dims + (None,) * (len(args) - len(dims)))(*args)

        op = _named_op("weight_gather" if gather else "weight_prologue", gather or weights_of)
        how = (f"{n_ops} ops that only move the weights (kernel expansions, repeated biases), as one gather a step"
               if gather else f"{n_ops} ops on the weights alone (kernel expansions, reshapes), vmapped over the models "
               "once a step")
        call: list[fx.Node] = []

        def get(n: fx.Node) -> fx.Node:
            if n not in produced and not call:  # emitted where first used, after the constants it reads
                missing = [c for c in consts if c not in env]
                if missing:
                    raise Unsupported(f"{_what(missing[0])}: a weight computation reads a value computed later in the forward")
                call.append(self.g.call_function(op, (*(state[k] for k in keys), *(env[c] for c in consts))))
                self.choices.append(("weights", "prologue", how))
                for i, m in enumerate(needed):
                    produced[m] = self.g.call_function(operator.getitem, (call[0], i))
            return produced[n]

        return get

    def _reads_input(self, node: fx.Node) -> bool:
        """Whether a conv reading the raw input runs as popconv's kernels (which then index the data set): at stride 1."""
        if node.op == "call_module":
            return self._kernel_conv(node) and tuple(self.mods[node.target].stride) == (1, 1)
        if node.target in (F.conv2d, torch.conv2d) and self.pop.kernels:
            kw = _bind(node)
            weights = self.kinds.get(kw["weight"]) == WEIGHT and (kw["bias"] is None or self.kinds.get(kw["bias"]) == WEIGHT)
            return weights and _pair(kw["stride"]) == (1, 1) and popconv.supports((1, 1), _pair(kw["dilation"]), kw["groups"])
        return False

    def _plain_max_pool(self, node: fx.Node) -> bool:
        """Whether the traced node is a plain 2x2, stride-2 max-pool of a [N*B, C, H, W] map."""
        probe = node.args[0].meta.get("probe") if node.args and isinstance(node.args[0], fx.Node) else None
        if not isinstance(probe, Tensor) or probe.dim() != 4:
            return False
        if node.op == "call_module":
            return isinstance(self.mods[node.target], nn.MaxPool2d) and _pool2(self.mods[node.target])
        if node.op != "call_function" or node.target not in (F.max_pool2d, torch.max_pool2d):
            return False
        kw = _bind(node)
        if any(isinstance(v, fx.Node) for v in kw.values() if v is not kw["input"]):
            return False
        return (_pair(kw["kernel_size"]) == (2, 2) and _pair(kw["stride"] or 2) == (2, 2) and _pair(kw["padding"]) == (0, 0)
                and _pair(kw["dilation"]) == (1, 1) and not kw["ceil_mode"] and not kw["return_indices"])

    def _kernel_conv(self, node: fx.Node) -> bool:
        """Whether the traced node is a Conv2d module that runs as popconv's kernels."""
        m = self.mods.get(node.target) if node.op == "call_module" else None
        return self.pop.kernels and isinstance(m, nn.Conv2d) and popconv.supports(m.stride, m.dilation, m.groups)

    def _layer(self, node: fx.Node) -> None:
        """A population layer module (Conv2d, Linear, FlatLinear, PopDropout) on the [N*B, ...] batch."""
        g, pop, env, state = self.g, self.pop, self.env, self.state
        m, name = self.mods[node.target], node.target
        if self.kinds.get(node.args[0]) != DATA:
            raise Unsupported(f"{name} is applied to something other than the per-sample activations")
        args = [self.value(a) for a in node.args]
        w, b = state.get(f"{name}.weight"), state.get(f"{name}.bias")
        if isinstance(m, nn.Conv2d):
            affine = self._foldable_affine(node)
            for n, op, v in affine:  # y * scale + shift after the conv (an eval-mode batch norm): into its weights
                folded = g.call_function(fold_affine, (w, b, op, self.value(v)))
                w, b = g.call_function(operator.getitem, (folded, 0)), g.call_function(operator.getitem, (folded, 1))
                self.fused.add(n)
            if self._kernel_conv(node):
                self._popconv(node, args[0], w, b, tuple(m.kernel_size), _conv_padding(m), tuple(m.stride), affine)
                return
            patch = m.in_channels * math.prod(m.kernel_size)
            env[affine[-1][0] if affine else node] = self._plain_conv(node, self._compute(args[0]), w, b, tuple(m.stride),
                                                                      _conv_padding(m), patch, affine)
            return
        if node in self.siblings and node is not self.siblings[node][0]:
            env[node] = self._sibling_linear(node, None)  # emitted with the first of its group
            return
        if not isinstance(m, PopDropout):
            args[0] = self._compute(args[0])
        if node in self.siblings:
            env[node] = self._sibling_linear(node, args[0])
        elif isinstance(m, FlatLinear):
            k = len(m.in_shape)
            env[node] = self._linear(node, g.call_method("flatten", (args[0], -k)), g.call_method("flatten", (w, 2)), b,
                                     math.prod(m.in_shape), m.weight.shape[0])
        elif isinstance(m, nn.Linear):
            env[node] = self._linear(node, args[0], w, b, m.in_features, m.out_features)
        elif not pop.dropout:
            env[node] = args[0]
        else:
            env[node] = g.call_function(pop_dropout, (args[0], state[f"{name}.p"], self.training))

    def _popconv(self, node: fx.Node, x: fx.Node, w: fx.Node, b: fx.Node | None, kernel: tuple[int, int],
                 pad: tuple[int, int], stride: tuple[int, int] = (1, 1), affine: Sequence[tuple] = ()) -> fx.Node:
        """A conv on popconv's kernels, with the max-pool and activation that alone consume it folded in;
        returns the node that stands for the traced conv (the chain's last node when one is folded). A strided
        conv with no pool folded into it runs at its stride where `popconv.strided_reads_directly`, any other as
        the stride-1 conv of its input's blocks (`popconv.strided`). `affine`: the per-channel ops after it already
        folded into w and b (`_foldable_affine`)."""
        g, pop, env = self.g, self.pop, self.env
        reads = node in self.reads_input
        options = {"rows": self.rows_in, "out_dtype": pop.dtype, "windows": self.windows_in} if reads else {}
        why = ""
        if not reads:
            x = self._compute(x)
        tail = affine[-1][0] if affine else node
        epilogue = self._epilogue(node, tail)
        source = node.args[0] if node.op == "call_module" else _bind(node)["input"]
        outputs = node.meta["probe"].shape[1]
        direct = (stride != (1, 1) and (epilogue is None or epilogue[1]["pool"] == 1) and not reads
                  and popconv.strided_reads_directly(source.meta["probe"].shape[1], outputs))
        if direct:
            why = f"stride {stride[0]}x{stride[1]}: read at its stride by the channels-last kernels"
        elif stride != (1, 1):
            channels = source.meta["probe"].shape[1] * (math.prod(stride) if kernel != (1, 1) else 1)
            wide = popconv.reads_channels_last(channels, outputs)
            x = g.call_function(popconv.space_to_depth, (x, stride, pad, kernel, wide))
            w = g.call_function(popconv.strided_weight, (w, stride))
            ho, wo = node.meta["probe"].shape[2:]
            blocks = tuple(-(-k // s) for k, s in zip(kernel, stride))  # the kernel over the blocks: ceil(k / s)
            self.added.append(channels * (ho + blocks[0] - 1) * (wo + blocks[1] - 1))
            why = (f"stride {stride[0]}x{stride[1]}: " + ("a 1x1 conv of its subsampled input" if kernel == (1, 1) else
                   f"the stride-1 conv of its {stride[0]}x{stride[1]} blocks, a {blocks[0]}x{blocks[1]} kernel over "
                   f"{channels} channels"))
            kernel, pad, stride = blocks, (0, 0), (1, 1)
        chain, pool = ([], 1) if epilogue is None else (epilogue[0], epilogue[1]["pool"])
        if reads:
            pop.window_geometry = (kernel, pad, pool)
            why = ("reads the data set's window table where it fits in memory" if popconv.windows_wanted(pool)
                   else "reads the data set by row index")
        folded = [n for n, _, _ in affine] + chain
        through = self.conv_act.pop(node, None)  # its input is an activation whose derivative its input gradient applies
        if through is not None:
            assert pool == 1 and stride == (1, 1) and not reads, "paired with a conv whose input gradient is not plain"
            options["input_act"] = through
            why = (why + "; " if why else "") + f"its input gradient times {through[0]}' of its input"
        self.choose(node, "popconv" + "".join(f"{' conv' * (i == 0)}+{self._op_name(c)}" for i, c in enumerate(folded)), why)
        if not chain:
            env[tail] = g.call_function(popconv.conv2d, (x, w, b, pad), {**options, "stride": stride} if direct else options)
            return env[tail]
        self.fused.update(chain)
        act = (epilogue[1]["act"], epilogue[1].get("slope", 0.0))
        # the one reader's backward applies act': no pass over the map for it
        reader = self._sole_reader(chain[-1])
        if reader is not None and pool == 1 and act[0] != "identity" and popconv.tuning.current().act_in_reader:
            if self._plain_max_pool(reader):
                self.pool_act[reader] = act
            elif self._plain_input_grad(reader):
                self.conv_act[reader] = act
            elif (keepdim := self._spatial_mean(reader)) is not None:
                self.mean_act[reader] = (act, keepdim)
            else:
                reader = None
            if reader is not None:
                options["act_grad"] = False
        options = {**options, "stride": stride} if direct else options
        env[chain[-1]] = out = g.call_function(popconv.conv2d_pool_act, (x, w, b, pad), {**epilogue[1], **options})
        return out

    def _sole_reader(self, node: fx.Node) -> fx.Node | None:
        """The op that alone reads `node` as its first argument, past dropouts this program skips."""
        cur = node
        while len(cur.users) == 1:
            (user,) = cur.users
            if user.args[:1] != (cur,) and not (user.kwargs.get("input") is cur and not user.args):
                return None
            if not self._skipped_dropout(user):
                return user
            cur = user
        return None

    @staticmethod
    def _spatial_mean(node: fx.Node) -> bool | None:
        """Its keepdim where `node` is a mean of a [R, C, H, W] map over its last two axes, else None."""
        if not (node.op == "call_method" and node.target == "mean" or node.op == "call_function" and node.target is torch.mean):
            return None
        probe = node.args[0].meta.get("probe") if isinstance(node.args[0], fx.Node) else None
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if not isinstance(probe, Tensor) or probe.dim() != 4 or set(node.kwargs) - {"dim", "keepdim"}:
            return None
        if not isinstance(dims, (tuple, list)) or set(dims) not in _SPATIAL or not isinstance(keepdim, bool):
            return None
        return keepdim

    def _plain_input_grad(self, node: fx.Node) -> bool:
        """Whether `node` is a popconv conv whose backward takes its input gradient as the plain transposed conv
        (stride 1, no pool folded in)."""
        if self._popconv_stride(node) != (1, 1):
            return False
        affine = self._foldable_affine(node)
        epilogue = self._epilogue(node, affine[-1][0] if affine else None)
        return epilogue is None or epilogue[1]["pool"] == 1

    def _popconv_stride(self, node: fx.Node) -> tuple[int, int] | None:
        """The stride of a conv node that `_popconv` will emit, else None."""
        if node.op == "call_module":
            return tuple(self.mods[node.target].stride) if self._kernel_conv(node) else None
        if node.op != "call_function" or node.target not in (F.conv2d, torch.conv2d) or not self.pop.kernels:
            return None
        kw = _bind(node)
        weights = self.kinds.get(kw["weight"]) == WEIGHT and (kw["bias"] is None or self.kinds.get(kw["bias"]) == WEIGHT)
        settings = (kw["stride"], kw["dilation"], kw["groups"], kw["padding"])
        if not weights or self.kinds.get(kw["input"]) != DATA or any(isinstance(v, fx.Node) for v in settings):
            return None
        stride = _pair(kw["stride"])
        return stride if popconv.supports(stride, _pair(kw["dilation"]), kw["groups"]) else None

    def _foldable_affine(self, conv: fx.Node) -> list[tuple[fx.Node, str, fx.Node]]:
        """`_affine_after`, where folding it keeps every value's dtype: in a float32 program, or where only convs and
        linears read the result (after any activation the kernel folds too), which cast it to the compute dtype the
        conv then writes; elsewhere the ops would promote the conv's output to float32."""
        affine = self._affine_after(conv)
        if not affine or self.pop.dtype == torch.float32:
            return affine
        end = affine[-1][0]
        if self._kernel_conv(conv):
            epilogue = self._epilogue(conv, end)
            end = epilogue[0][-1] if epilogue else end
        return affine if self._read_by_weighted_only(end) else []

    def _affine_after(self, conv: fx.Node) -> list[tuple[fx.Node, str, fx.Node]]:
        """The ops that alone consume the conv's output in a chain and multiply it by, add or subtract a weight of
        one value per output channel or per model (an eval-mode batch norm's scale and shift): [(node, op, weight)]."""
        out_c = conv.meta["probe"].shape[1]
        chain, cur = [], conv
        while len(cur.users) == 1:
            (user,) = cur.users
            op = self._BINARY_OPS.get(user.target) if user.op in ("call_function", "call_method") else None
            if op not in ("mul", "add", "sub") or user.kwargs or len(user.args) != 2 or cur not in user.args:
                break
            v = user.args[1] if user.args[0] is cur else user.args[0]
            probe = v.meta.get("probe") if isinstance(v, fx.Node) and self.kinds.get(v) == WEIGHT else None
            if not isinstance(probe, Tensor) or probe.dim() > 4 or (op == "sub" and v is user.args[0]):
                break
            shape = (1,) * (4 - probe.dim()) + tuple(probe.shape)  # right-aligned against [B, O, H, W]
            if shape[0] != 1 or shape[1] not in (1, out_c) or shape[2:] != (1, 1) or not probe.is_floating_point():
                break
            chain.append((user, op, v))
            cur = user
        return chain

    _BINARY_OPS = {operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
                   torch.add: "add", torch.sub: "sub", torch.mul: "mul", torch.div: "div",
                   "add": "add", "sub": "sub", "mul": "mul", "div": "div",
                   operator.matmul: "matmul", torch.matmul: "matmul", "matmul": "matmul"}

    def _broadcast(self, node: fx.Node) -> tuple[str, bool] | None:
        """(the op, whether data comes first) for a binary elementwise op or matmul of per-sample data and a
        per-model weight that broadcasts over the model's batch; None for any other op."""
        if node.op not in ("call_function", "call_method") or node.kwargs or len(node.args) != 2:
            return None
        fn = self._BINARY_OPS.get(node.target)
        a, b = node.args
        if fn is None or not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            return None
        kinds = (self.kinds.get(a), self.kinds.get(b))
        if kinds not in ((DATA, WEIGHT), (WEIGHT, DATA)):
            return None
        data, weight = (a, b) if kinds[0] == DATA else (b, a)
        x, w = data.meta.get("probe"), weight.meta.get("probe")
        if not (isinstance(x, Tensor) and isinstance(w, Tensor)):
            return None
        if fn == "matmul":  # [B, ..., k] @ [k, m]: a weight matrix on the right
            return (fn, True) if data is a and w.dim() == 2 and x.dim() >= 2 else None
        fits = w.dim() < x.dim() or (w.dim() == x.dim() and w.shape[0] == 1)  # the batch axis is the data's alone
        return (fn, data is a) if fits else None

    def _popnorm(self, node: fx.Node, x: fx.Node, w: fx.Node | None, b: fx.Node | None, eps: float) -> fx.Node | None:
        """GroupNorm(1) as popnorm, with the residual add and the activation that alone consume it folded in
        (the op then emitted where the add is, after both its operands), stored in the compute dtype where only
        convs and linears read it. Returns its value, or None when it is emitted later in the add's place."""
        chain, residual, act, slope = [], None, "identity", 0.0
        cur = node
        user = next(iter(cur.users)) if len(cur.users) == 1 else None
        if (user is not None and user.op == "call_function" and user.target in (operator.add, torch.add)
                and len(user.args) == 2 and not user.kwargs and user not in self.deferred and user not in self.fused):
            other = user.args[1] if user.args[0] is cur else user.args[0]
            probe = node.meta.get("probe")
            if (isinstance(other, fx.Node) and other is not cur and self.kinds.get(other) == DATA
                    and isinstance(other.meta.get("probe"), Tensor) and other.meta["probe"].shape == probe.shape):
                chain, residual, cur = [user], other, user
        user = next(iter(cur.users)) if len(cur.users) == 1 else None
        fold = _activation_of(user, cur, self.mods) if user is not None else None
        if fold is not None and fold[0] in popnorm.ACTS:
            (act, slope), cur = fold, user
            chain.append(user)
        out_dtype = self.pop.dtype if self._read_by_weighted_only(cur) else torch.float32
        # float32 for some readers, and a conv or linear among them: the cast it would make, written in the same pass
        copy = out_dtype != self.pop.dtype and any(self._weighted_reader(u, cur) for u in cur.users)
        name = "+".join(["popnorm", *(["add"] if residual is not None else []), *([self._op_name(cur)] if act != "identity" else [])])
        self.fused.update(chain)

        def emit() -> fx.Node:
            why = ("stored in the compute dtype: only convs read it" if out_dtype != torch.float32 else
                   "stored in float32 and, for the convs reading it, in the compute dtype too" if copy else "")
            self.choose(node, name, why)
            out = self.g.call_function(popnorm.group_norm1, (self.value(x), self.value(w), self.value(b), eps),
                                       {"residual": self.value(residual), "act": act, "slope": slope,
                                        "out_dtype": out_dtype, **({"copy_dtype": self.pop.dtype} if copy else {})})
            if copy:  # (the output, its copy in the compute dtype)
                pair, out = out, self.g.call_function(operator.getitem, (out, 0))
                self.copies[out] = self.g.call_function(operator.getitem, (pair, 1))
            self.env[cur] = out
            return out

        if residual is None:
            return emit()
        self.fused.discard(chain[0])
        self.deferred[chain[0]] = emit
        return None

    def _kernel_layer_norm(self, node: fx.Node) -> bool:
        """Whether `node` is a LayerNorm popnorm runs: data in, a per-model affine, rows it holds."""
        if not (self.pop.kernels and node.op == "call_function" and node.target is F.layer_norm):
            return False
        kw = _bind(node)
        shape = _normalized_shape(node)
        return (self.kinds.get(kw["input"]) == DATA and (kw["weight"] is not None or kw["bias"] is not None)
                and all(v is None or self.kinds.get(v) == WEIGHT for v in (kw["weight"], kw["bias"]))
                and all(isinstance(s, int) for s in shape) and math.prod(shape) <= popnorm.LAYER_NORM_MAX)

    def _adds_before_norms(self) -> dict[fx.Node, fx.Node]:
        """{LayerNorm: the add of two per-sample values it normalises} where the add folds into the norm (a pre-LN
        block's stream): the add's other readers all come after the norm, which then gives them the sum."""
        order = {n: i for i, n in enumerate(self.src.graph.nodes)}
        folds = {}
        for node in self.src.graph.nodes:
            if not self._kernel_layer_norm(node):
                continue
            add = _bind(node)["input"]
            if not (isinstance(add, fx.Node) and add.op == "call_function" and add.target in (operator.add, torch.add)
                    and len(add.args) == 2 and not add.kwargs and add not in folds.values()):
                continue
            probe = add.meta.get("probe")
            if (isinstance(probe, Tensor) and all(isinstance(a, fx.Node) and self.kinds.get(a) == DATA and isinstance(a.meta.get("probe"), Tensor)
                    and a.meta["probe"].shape == probe.shape for a in add.args)
                    and all(order[u] > order[node] for u in add.users if u is not node)):
                folds[node] = add
        return folds

    def _linears_of_one_input(self) -> dict[fx.Node, tuple[fx.Node, ...]]:
        """{Linear module node: its group} for the Linears that read one per-sample value and run together as one
        `poplinear.linears` (a transformer's query, key and value maps; a Clifford layer's two grade-wise maps):
        up to poplinear.MAX_PARTS of them a group, their outputs together within poplinear.MAX_FEATURES, in
        graph order."""
        if not self.pop.kernels:
            return {}
        readers: dict[fx.Node, list[fx.Node]] = {}
        for node in self.src.graph.nodes:
            m = self.mods.get(node.target) if node.op == "call_module" else None
            if (type(m) is nn.Linear and poplinear.fits(m.in_features, m.out_features)
                    and self.kinds.get(node.args[0]) == DATA):
                readers.setdefault(node.args[0], []).append(node)
        groups: dict[fx.Node, tuple[fx.Node, ...]] = {}
        for nodes in readers.values():
            group: list[fx.Node] = []
            for node in nodes + [None]:  # None: the end, closing the last group
                width = sum(self.mods[n.target].out_features for n in group)
                if node is not None and len(group) < poplinear.MAX_PARTS and (
                        width + self.mods[node.target].out_features <= poplinear.MAX_FEATURES):
                    group.append(node)
                    continue
                if len(group) > 1:
                    groups.update(dict.fromkeys(group, tuple(group)))
                group = [node]
        return groups

    def _sibling_linear(self, node: fx.Node, x: fx.Node | None) -> fx.Node:
        """A Linear of a `_linears_of_one_input` group: the first emits the group's one op (x: its input in the
        compute dtype); every member's output is its part."""
        group = self.siblings[node]
        act = self._input_act(group[0])
        if node is group[0]:
            ws = tuple(self.state[f"{n.target}.weight"] for n in group)
            bs = tuple(self.state.get(f"{n.target}.bias") for n in group)
            both = self.g.call_function(poplinear.linears, (x, ws, bs), act)
            for i, n in enumerate(group):
                self.sibling_out[n] = self.g.call_function(operator.getitem, (both, i))
        self.choose(node, f"{act['input_act'][0]}+poplinear (input shared)" if act else "poplinear (input shared)",
                    f"one op with {len(group) - 1} more linear(s) of its input")
        return self.sibling_out.pop(node)

    def _layer_norm(self, node: fx.Node, x: fx.Node, w: fx.Node | None, b: fx.Node | None, eps: float) -> fx.Node:
        """LayerNorm as popnorm, with the add before it folded in where `_adds_before_norms` found one; stored in
        the compute dtype where only linears read it."""
        shape = _normalized_shape(node)
        out_dtype = self.pop.dtype if self._read_by_weighted_only(node) else torch.float32
        add = self.pre_add.get(node)
        why = "" if out_dtype == torch.float32 else "stored in the compute dtype: only linears read it"
        self.choose(node, "add+popnorm" if add is not None else "popnorm", why)
        if add is None:
            return self.g.call_function(popnorm.layer_norm, (self.value(x), shape, self.value(w), self.value(b), eps),
                                        {"out_dtype": out_dtype})
        both = self.g.call_function(popnorm.add_layer_norm, (*map(self.value, add.args), shape, self.value(w),
                                                             self.value(b), eps), {"out_dtype": out_dtype})
        self.env[add] = self.g.call_function(operator.getitem, (both, 0))
        return self.g.call_function(operator.getitem, (both, 1))

    def _op_name(self, node: fx.Node) -> str:
        return type(self.mods[node.target]).__name__ if node.op == "call_module" else getattr(node.target, "__name__", str(node.target))

    def _input_act(self, node: fx.Node) -> dict:
        """poplinear's `input_act` option for a linear whose input (past reshapes and skipped dropouts) is an
        activation it applies (`_activation_into_linears`), else no option."""
        source = node.args[0] if node.op == "call_module" else _bind(node)["input"]
        while self._transparent(source):
            source = source.args[0]
        act = self.linear_act.get(source)
        if act is None:
            return {}
        self.applied.add(source)
        return {"input_act": act}

    def _activation_into_linears(self, node: fx.Node) -> tuple[str, float] | None:
        """(name, slope) where `node` is a pointwise activation of per-sample values that only linears on
        poplinear's kernels read, as their input: they apply it to each tile as they load it (`input_act`), and
        its derivative in their input gradient, so it is never written; else None."""
        act = _activation(node, self.mods) if self.pop.kernels and self.kinds.get(node) == DATA else None
        source = node.args[0] if act is not None else None
        if act is None or not isinstance(source, fx.Node) or self.kinds.get(source) != DATA:
            return None
        name, slope, inplace = act
        if name in _KEPT_APART or inplace and len(source.users) > 1:  # in place: the others read the activated value
            return None
        return (name, slope) if self._only_poplinears_read(node) else None

    def _only_poplinears_read(self, node: fx.Node) -> bool:
        """Whether `node` has readers, past reshapes and the dropouts this program skips (which an activation
        commutes with), and each is a linear of it alone on poplinear's kernels (`_poplinear_reading`)."""
        return bool(node.users) and all(self._only_poplinears_read(u) if self._transparent(u) else
                                        self._poplinear_reading(u, node) for u in node.users)

    def _poplinear_reading(self, node: fx.Node, x: fx.Node) -> bool:
        """Whether `node` is a linear of x alone that runs on poplinear's kernels (an nn.Linear, FlatLinear or
        F.linear)."""
        if node.op == "call_module":
            m = self.mods[node.target]
            widths = ((m.in_features, m.out_features) if type(m) is nn.Linear else
                      (math.prod(m.in_shape), m.weight.shape[0]) if isinstance(m, FlatLinear) else None)
            return widths is not None and node.args == (x,) and not node.kwargs and poplinear.fits(*widths)
        if node.op != "call_function" or node.target is not F.linear:
            return False
        kw = _bind(node)
        w, b = kw["weight"], kw["bias"]
        return (kw["input"] is x and x not in (w, b) and self.kinds.get(w) == WEIGHT
                and (b is None or self.kinds.get(b) == WEIGHT) and poplinear.fits(*w.meta["probe"].shape[-2:][::-1]))

    def _linear(self, node: fx.Node, x: fx.Node, w: fx.Node, b: fx.Node | None, in_f: int, out_f: int) -> fx.Node:
        """A linear layer of x (in the compute dtype) and w [N, out, in]: poplinear's kernels where they hold its
        widths (applying the activation that x is, where it is one only linears read), else one batched matmul."""
        if self.pop.kernels and poplinear.fits(in_f, out_f):
            act = self._input_act(node)
            self.choose(node, f"{act['input_act'][0]}+poplinear" if act else "poplinear")
            return self.g.call_function(poplinear.linear, (x, w, b), act)
        why = "poplinear kernels off here (no CUDA, or not asked for)" if not self.pop.kernels else \
            f"{in_f} -> {out_f} features: poplinear holds up to {poplinear.MAX_FEATURES}"
        self.choose(node, "bmm", why)
        return self.g.call_function(pop_linear, (x, w, b))

    def _compute(self, x: fx.Node) -> fx.Node:
        """x in the compute dtype, as autocast casts a conv's or linear's input (a no-op when it is already; the
        copy an op wrote in that dtype, where it did)."""
        if x in self.copies:
            return self.copies[x]
        return x if self.pop.dtype == torch.float32 else self.g.call_method("to", (x, self.pop.dtype))

    def _plain_conv(self, node: fx.Node, x: fx.Node, w: fx.Node, b: fx.Node | None, stride: tuple[int, int],
                    padding: tuple[int, int], patch: int, affine: Sequence[tuple] = ()) -> fx.Node:
        """A conv off popconv's kernels (x in the compute dtype): a grouped convolution where `grouped_convs`
        asks for them (unless its patches are short), else im2col + bmm. `affine`: the ops folded into w and b."""
        folded = f"; the {', '.join(self._op_name(n) for n, _, _ in affine)} after it folded into its weights" if affine else ""
        if self.pop.grouped_convs and patch > IM2COL_PATCH_MAX:
            self.choose(node, "grouped conv", "one convolution with a group per model: the CPU's fastest" + folded)
            groups = self.g.call_function(to_model_groups, (x, w))  # `_model_group_chains` drops what cancels
            y = self.g.call_function(grouped_conv, (groups, w, b, stride, padding))
            return self.g.call_function(from_model_groups, (y, w))
        why = (f"{patch}-long patches: a batched matmul beats a grouped conv" if self.pop.grouped_convs
               else "strided convs left to im2col (popconv's tuning: strided off)" if self.pop.kernels
               else "popconv kernels off here (no CUDA, or not asked for)")
        self.choose(node, "im2col + bmm", why + folded)
        return self.g.call_function(pop_conv2d, (x, w, b, stride, padding))

    def _mixed(self, node: fx.Node) -> fx.Node:
        """An op of data and weights: a population conv for F.conv2d, a batched matmul for F.linear, an
        architecture's population form for its function (`archs.base.POPULATION_FORMS`), else vmap."""
        g, pop, value = self.g, self.pop, self.value
        if node.op == "call_function" and node.target in (F.conv2d, torch.conv2d, F.linear):
            kw = _bind(node)
            x, w, b = kw["input"], kw["weight"], kw["bias"]
            plain = (self.kinds.get(x) == DATA and self.kinds.get(w) == WEIGHT
                     and (b is None or self.kinds.get(b) == WEIGHT))
            if plain and node.target is F.linear:
                out_f, in_f = w.meta["probe"].shape[-2:]
                return self._linear(node, self._compute(value(x)), value(w), value(b), in_f, out_f)
            stride, dilation, groups, padding = _pair(kw["stride"]), _pair(kw["dilation"]), kw["groups"], kw["padding"]
            if plain and not any(isinstance(v, fx.Node) for v in (stride, dilation, groups, padding)):
                kernel = tuple(w.meta["probe"].shape[-2:])
                pad = _padding(padding, kernel)
                if pop.kernels and popconv.supports(stride, dilation, groups):
                    return self._popconv(node, value(x), value(w), value(b), kernel, pad, stride)
                if groups == 1 and dilation == (1, 1):
                    return self._plain_conv(node, self._compute(value(x)), value(w), value(b), stride, pad,
                                            math.prod(w.meta["probe"].shape[-3:]))
        if node.op == "call_function" and node.target in (F.group_norm, F.layer_norm):
            kw = _bind(node)
            x, w, b = kw["input"], kw["weight"], kw["bias"]
            if self.kinds.get(x) == DATA and all(v is None or self.kinds.get(v) == WEIGHT for v in (w, b)):
                eps = kw["eps"]
                if node.target is F.group_norm and kw["num_groups"] == 1 and (w is not None or b is not None) and pop.kernels:
                    return self._popnorm(node, x, w, b, eps)
                if self._kernel_layer_norm(node):
                    return self._layer_norm(node, x, w, b, eps)
                self.choose(node, "population norm", "statistics per sample, affine per model")
                if node.target is F.group_norm:
                    return g.call_function(pop_group_norm, (value(x), kw["num_groups"], value(w), value(b), eps))
                return g.call_function(pop_layer_norm, (value(x), kw["normalized_shape"], value(w), value(b), eps))
        form = POPULATION_FORMS.get(node.target) if node.op == "call_function" else None
        if form is not None:  # an architecture's function with a population form of its own
            probes = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["probe"])
            run, program, why = form(pop.kernels, pop.dtype, *probes)
            self.choose(node, program, why)
            return g.call_function(_named_op(f"{program}_{node.name}", run), value(node.args), value(node.kwargs))
        broadcast = self._broadcast(node)
        if broadcast is not None:
            fn, data_first = broadcast
            a, b = node.args
            self.choose(node, "broadcast", "each model's weight against its own samples")
            dtype = pop.dtype if fn == "matmul" and pop.dtype != torch.float32 else None
            data, weight = (a, b) if data_first else (b, a)
            return g.call_function(pop_broadcast, (fn, value(data), value(weight), data_first, dtype))
        leaves, spec, leaf_kinds = _flat_kinds((node.args, node.kwargs), self.kinds)
        if SIZE in leaf_kinds:
            raise Unsupported(f"{_what(node)} mixes the weights with a size that grows with the batch")
        target = _method(node.target) if node.op == "call_method" else node.target
        if node.op == "call_module":
            target = self.mods[node.target]
        self.choose(node, "vmap op", "no population op of its own: vmapped over the models")
        return g.call_function(_per_model(node, target, spec, leaf_kinds), tuple(value(leaf) for leaf in leaves))

    def _epilogue(self, conv: fx.Node, start: fx.Node | None = None) -> tuple[list[fx.Node], dict] | None:
        """The 2x2 max-pool and monotone activation (either order, each at most once) that alone consume
        the kernel conv's output (or `start`'s, the last op folded into it), as (their nodes, conv2d_pool_act's
        options); None when there are none. A conv whose outputs are too many for the pool's kernel folds a
        directly following activation alone."""
        outputs = conv.meta["probe"].shape[1]
        start = start or conv
        pools = popconv.fuses(outputs)
        if not (pools or popconv.fuses(outputs, pool=1)):
            return None
        chain: list[fx.Node] = []
        # window_dx read now, at emit, and explicit in the program
        options: dict = {"pool": 1, "act": "identity", "window_dx": popconv.tuning.current().window_dx}
        cur = start
        while len(cur.users) == 1:
            (user,) = cur.users
            if user.args[:1] != (cur,):
                break
            act = _activation_of(user, cur, self.mods)
            if options["pool"] == 1 and pools and self._plain_max_pool(user):
                options["pool"] = 2
            elif act is not None and options["act"] == "identity":
                options["act"], options["slope"] = act
            elif not self._skipped_dropout(user):  # a skipped dropout is the identity
                break
            chain.append(user)
            cur = user
        while chain and isinstance(self.mods.get(chain[-1].target), PopDropout):  # nothing to fold after the last op
            chain.pop()
        return (chain, options) if chain else None


class FastPopulation:
    """A module's forward re-emitted for N stacked models: `forward(params, buffers, x) -> [N, B, ...]`.

    `input_shape` is one sample's shape (the task's): the trace is shape-propagated at two batch sizes
    to find which values carry the batch. `choices` lists what runs each layer: [(layer, program, why)]."""

    def __init__(self, module: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 compile: bool = False, dropout: bool = True, kernels: bool = False, grouped_convs: bool = False):
        self.module, self.dtype, self.dropout = module, dtype, dropout  # dropout=False: every rate is 0, skip the masks
        self.kernels = kernels  # stride-1 convs as popconv's Triton kernels
        self.grouped_convs = grouped_convs and not kernels  # the other convs as grouped convolutions (the CPU's choice)
        self.param_keys = [k for k, _ in module.named_parameters()]
        self.buffer_keys = [k for k, _ in module.named_buffers()]
        self.window_geometry: tuple[tuple[int, int], tuple[int, int], int] | None = None  # set by _emit
        self.constants = None if compile else _Constants()  # an eager program makes its constant tensors once
        try:
            emitter = _Emitter(self, module, tuple(input_shape))
            self.graph_module = emitter.emit()
        except Unsupported as e:
            raise Unsupported(f"module {type(module).__name__} cannot run as a fast population: {e}") from None
        except Exception as e:  # noqa: BLE001 - the tracer's own errors (data-dependent control flow, ...)
            raise Unsupported(f"module {type(module).__name__} cannot run as a fast population: torch.fx cannot "
                              f"trace its forward ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        self.choices = emitter.choices
        # a CUDA graph cannot hold an op that reads its result on the host: the steps then run eagerly
        self.not_capturable = next((f"{_what(n)} checks its result on the host" for n in emitter.src.graph.nodes
                                    if _syncs_host(n)), None)
        inputs = [n for n in emitter.src.graph.nodes if n.op == "placeholder"]
        self.input_dtype = emitter.input_dtype(inputs[0]) if inputs else torch.float32  # what the resident data may be stored as
        # the largest activation of one sample: CUDA's kernels index a tensor with 32-bit offsets, so one
        # program holds at most max_rows samples (models x batch) of it
        self.sample_elements = emitter.sample_elements()
        self.max_rows = INDEX_LIMIT // max(1, self.sample_elements)
        self.activation_elements = emitter.activation_elements()
        self._tables: dict[int, tuple[weakref.ref, int, Tensor | None]] = {}  # id(data set) -> its window table
        self._compiled: Callable | None = None
        if compile:
            import torch._dynamo

            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
            key = (self.graph_module.code, repr(self.graph_module), dtype, kernels)  # same program: reuse its compiled kernels
            if key not in _COMPILED:
                _COMPILED[key] = torch.compile(self.graph_module, dynamic=False)
            self._compiled = _COMPILED[key]

    @staticmethod
    def why_not(module: nn.Module, input_shape: Sequence[int], kernels: bool = False) -> str | None:
        """None when `module` can run as a fast population, else the first reason it cannot."""
        try:
            FastPopulation(module, input_shape, kernels=kernels)
        except Unsupported as e:
            return str(e).split(": ", 1)[1]
        return None

    @staticmethod
    def supports(module: nn.Module, input_shape: Sequence[int]) -> bool:
        """Whether `module` can run as a fast population (see `why_not`)."""
        return FastPopulation.why_not(module, input_shape) is None

    def forward(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, *,
                rows: Tensor | None = None, x_per_model: bool = True, training: bool = False, bucket: int = 1) -> Tensor:
        """Outputs [N, B, ...] in float32 for x [N, B, ...] (each model its own batch), x [B, ...] shared,
        or x the data set [S, ...] with rows [N, B] the samples each model sees.

        Compiled, a batch runs padded to the next power of two, at least `bucket` (so an evaluation
        whose last batch is short reuses the program of its full batches)."""
        n = params[self.param_keys[0]].shape[0]
        if rows is None and not x_per_model:
            if self.kernels:  # the same indices for every model: nothing expanded in memory
                rows = torch.arange(x.shape[0], device=x.device).expand(n, x.shape[0])
            else:
                x = x.unsqueeze(0).expand(n, *x.shape)
        if rows is not None and not self.kernels:
            x, rows = x[rows], None
        b = rows.shape[1] if rows is not None else x.shape[1]
        run, padded = self.graph_module, b
        if self._compiled is not None:  # a compiled program per batch bucket, not per batch size
            run, padded = self._compiled, 1 << (max(b, bucket) - 1).bit_length()
            if padded != b and rows is not None:  # every op is per sample: extra rows change nothing in the real ones
                rows = torch.cat([rows, rows.new_zeros(n, padded - b)], 1)
            elif padded != b:
                x = torch.cat([x, x.new_zeros(n, padded - b, *x.shape[2:])], 1)
        windows = None
        if rows is None:
            x = x.reshape(n * padded, *x.shape[2:])
        else:
            windows = self.window_table(x)
            if self._compiled is not None:  # one program for every data set it reads by index (train, val, test)
                torch._dynamo.maybe_mark_dynamic(x, 0)
                if windows is not None:
                    torch._dynamo.maybe_mark_dynamic(windows, 0)
        state = [params[k] for k in self.param_keys] + [buffers[k] for k in self.buffer_keys]
        with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):  # op dtypes as vmap's
            out = run(x, rows, windows, training, *state)
        return out.reshape(n, padded, *out.shape[1:])[:, :b]

    __call__ = forward

    def window_table(self, x: Tensor) -> Tensor | None:
        """The window table of the data set x for the first conv, built on first use and kept while x lives
        unchanged; None where the first conv gathers from x itself (`popconv.windows_pay`)."""
        if self.window_geometry is None:
            return None
        hit = self._tables.get(id(x))
        if hit is not None and hit[0]() is x and hit[1] == x._version:
            return hit[2]
        kernel, padding, pool = self.window_geometry
        pays = popconv.windows_pay(pool, popconv.window_table_bytes(x, kernel, padding, pool), x.device)
        table = popconv.window_table(x.detach(), kernel, padding, pool) if pays else None
        self._tables = {k: v for k, v in self._tables.items() if v[0]() is not None}  # drop freed data sets' tables
        self._tables[id(x)] = (weakref.ref(x), x._version, table)
        return table


def dropout_active(module: nn.Module, buffers: Mapping[str, Tensor]) -> bool:
    """Whether any model of the population has a PopDropout rate above 0 (else the masks can be skipped)."""
    names = [name for name, m in module.named_modules() if isinstance(m, PopDropout)]
    return any(bool((buffers[f"{name}.p"] > 0).any()) for name in names)


def prior_view(module: nn.Module) -> nn.Module | None:
    """The module with its `prior_terms(x) -> [B]` as forward (the same parameters), or None where it has no
    such prior or its `prior_weight` is 0: a data-dependent penalty a population traces like a forward."""
    if not callable(getattr(module, "prior_terms", None)) or not getattr(module, "prior_weight", 0):
        return None
    view = copy.copy(module)  # shares parameters and submodules; only the class differs
    view.__class__ = type(f"{type(module).__name__}Prior", (type(module),), {"forward": type(module).prior_terms})
    return view


class FastStep:
    """One training step's gradients for a population: `step(params, buffers, x, y) -> (grads, per-model loss)`.

    The loss is the sum of per-model mean losses, so each model's gradient is its own loss's gradient,
    exactly what `vmap(grad(loss))` computes; `loss_fn(pred, y)` is the task's single-model loss. With a
    `regulariser` (stacked params -> [N] per-model penalties), model i minimises loss_i + reg[i] * penalty_i;
    a module with a prior (`prior_view`) adds prior_weight * the batch mean of its prior terms, traced as a
    second population program over the same parameters.
    """

    def __init__(self, module: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], input_shape: Sequence[int], *,
                 dtype: torch.dtype = torch.float32, compile: bool = False, dropout: bool = True,
                 kernels: bool = False, grouped_convs: bool = False,
                 regulariser: Callable[[dict[str, Tensor]], Tensor] | None = None):
        options = dict(dtype=dtype, compile=compile, dropout=dropout, kernels=kernels, grouped_convs=grouped_convs)
        self.pop = FastPopulation(module, input_shape, **options)
        self.loss_per_model = vmap(loss_fn, in_dims=(0, 0))
        self.regulariser = regulariser
        view = prior_view(module)
        self.prior = None if view is None else (FastPopulation(view, input_shape, **options), float(module.prior_weight))

    def __call__(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, y: Tensor,
                 rows: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
        """Gradients for batch x [N, B, ...], or for the data set x [S, ...] read at rows [N, B]."""
        grads, loss, _, _ = self.with_outputs(params, buffers, x, y, rows)
        return grads, loss

    def with_outputs(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, y: Tensor,
                     rows: Tensor | None = None, reg: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        """(gradients, per-model loss, per-model total = loss + reg * penalty, outputs [N, B, ...] (float32, detached))."""
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
            pred = self.pop(leaves, buffers, x, rows=rows, x_per_model=True, training=True)
            loss = self.loss_per_model(pred, y)
            total = loss if self.regulariser is None or reg is None else loss + reg * self.regulariser(leaves)
            if self.prior is not None:
                terms = self.prior[0](leaves, buffers, x, rows=rows, x_per_model=True, training=True)
                total = total + self.prior[1] * terms.flatten(1).mean(1)
            grads = torch.autograd.grad(total.sum(), list(leaves.values()))
        return dict(zip(leaves, grads)), loss.detach(), total.detach(), pred.detach()


__all__ = ["FastPopulation", "FastStep", "Unsupported", "prior_view", "pop_group_norm", "pop_layer_norm", "dropout_active", "pop_conv2d", "pop_conv2d_grouped", "pop_linear", "pop_dropout"]
