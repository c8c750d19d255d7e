"""Fast population programs: N small models as batched matrix multiplies instead of vmapped convolutions.

`torch.func.vmap` over a population turns every Conv2d into one grouped convolution (groups = N) with
1-8 channels per group, where cuDNN is slow; that is the wall the population trainer hits on a GPU.
Here the model's forward is traced once with `torch.fx` and re-emitted with each parametric layer
replaced by a population version that keeps the model axis explicit:

  Conv2d      im2col on a channels-last view (x.unfold over H and W), then one bmm over models:
              [N, B*Ho*Wo, C*k*k] @ [N, C*k*k, O] -> [N, B*Ho*Wo, O], which is already channels-last
  Linear      one bmm over models, [N, B, in] @ [N, in, out]
  FlatLinear  the same on the flattened trailing axes

Activations between layers are [N*B, ...] tensors, so every op without parameters (pooling,
activations, flatten, reshape, residual adds) runs unchanged, as it would on one big batch. Autograd
gives the backward (unfold's backward is the col2im scatter), so it is exact for any layer shapes.
Weights stay float32 (the optimizer's master copy); `dtype` is the compute dtype of activations and
matmuls (bf16 on a GPU), and the logits come back in float32.

With `kernels=True` (the trainer's choice where `zoos.popconv.available`), every stride-1 Conv2d runs
as popconv's Triton implicit-GEMM kernels instead of im2col + bmm: no patch matrix in memory, forward
and backward. A first convolution that reads the input directly also takes the batch as row indices
into the resident data set (`forward(..., rows=idx)`), and a shared evaluation batch becomes the same
indices for every model, so the input is never gathered or expanded per model in memory. A kernel conv
(up to 16 output channels) whose output only feeds a 2x2 max-pool and/or a monotone activation (tanh,
sigmoid, relu, leaky_relu; a dropout that is off may sit between) becomes one `popconv.conv2d_pool_act`:
the full-resolution conv output is never written. Where `popconv.windows_pay` says so (a first conv
followed by a 2x2 max-pool, by default), that first conv reads a window table of the data set instead
(`popconv.window_table`, built once per resident data set and kept while the data set lives): its
forward and weight gradient become tensor-core products over contiguous whole-window rows.

`FastPopulation.supports(module)` says whether a module can run this way and why not: only the layer
types above carry parameters, buffers belong to `PopDropout` only, and the traced forward reads no
parameter directly. The trainer uses it where it applies and keeps `vmap` otherwise.
"""

from __future__ import annotations

import weakref
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import vmap

from zoos import popconv
from zoos.archs.base import PopDropout
from zoos.archs.layers import FlatLinear

PARAMETRIC = (nn.Conv2d, nn.Linear, FlatLinear)
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


def pop_flat_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """FlatLinear per model: w [N, out, *in_shape] applied to the trailing len(in_shape) axes of x."""
    k = w.dim() - 2
    return pop_linear(x.flatten(-k), w.flatten(2), b)


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


# ---- tracing ----------------------------------------------------------------------------------------

class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (FlatLinear, PopDropout)) or super().is_leaf_module(m, qualname)


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    if isinstance(m.padding, str):  # "valid" or "same" (stride 1)
        return (0, 0) if m.padding == "valid" else tuple((k - 1) // 2 for k in m.kernel_size)  # type: ignore[return-value]
    return tuple(m.padding)  # type: ignore[return-value]


def _pool2(m: nn.MaxPool2d) -> bool:
    """Whether m is a plain 2x2 max-pool with stride 2 (what popconv.conv2d_pool_act folds in)."""
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    return (pair(m.kernel_size) == (2, 2) and pair(m.stride) == (2, 2) and pair(m.padding) == (0, 0)
            and pair(m.dilation) == (1, 1) and not m.ceil_mode and not m.return_indices)


def _monotone_activation(m: nn.Module) -> tuple[str, float] | None:
    """(name, slope) for the non-decreasing activations popconv applies in its epilogue, else None."""
    if isinstance(m, nn.LeakyReLU) and m.negative_slope >= 0:
        return "leaky_relu", float(m.negative_slope)
    kinds = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ReLU: "relu"}
    return (kinds[type(m)], 0.0) if type(m) in kinds else None


def _why_not(m: nn.Module, name: str) -> str | None:
    """Why the leaf module `name` cannot run as a population layer, or None when it can."""
    if isinstance(m, nn.Conv2d):
        if m.groups != 1 or tuple(m.dilation) != (1, 1) or m.padding_mode != "zeros":
            return f"{name}: Conv2d with groups={m.groups}, dilation={m.dilation}, padding_mode={m.padding_mode!r}"
        if isinstance(m.padding, str) and m.padding == "same" and any(k % 2 == 0 for k in m.kernel_size):
            return f"{name}: Conv2d padding='same' with an even kernel"
        return None
    if isinstance(m, (nn.Linear, FlatLinear, PopDropout)):
        return None
    if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
        return f"{name}: {type(m).__name__} has parameters or buffers of its own"
    return None


class FastPopulation:
    """A module's forward re-emitted for N stacked models: `forward(params, buffers, x) -> [N, B, ...]`."""

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.float32, compile: bool = False,
                 dropout: bool = True, kernels: bool = False):
        reason = self.why_not(module)
        if reason:
            raise ValueError(f"module {type(module).__name__} cannot run as a fast population: {reason}")
        self.module, self.dtype, self.dropout = module, dtype, dropout  # dropout=False: every rate is 0, skip the masks
        self.kernels = kernels  # stride-1 convs as popconv's Triton kernels
        self.param_keys = [k for k, _ in module.named_parameters()]
        self.buffer_keys = [k for k, _ in module.named_buffers()]
        self.window_geometry: tuple[tuple[int, int], tuple[int, int], int] | None = None  # set by _emit
        self.graph_module = self._emit(module)
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
    def why_not(module: nn.Module) -> str | None:
        """None when `module` can run as a fast population, else the first reason it cannot."""
        try:
            graph = _Tracer().trace(module)
        except Exception as e:  # noqa: BLE001 - any tracing failure means: use vmap
            return f"torch.fx cannot trace its forward ({type(e).__name__}: {e})"
        mods = dict(module.named_modules())
        for node in graph.nodes:
            if node.op == "get_attr":
                return f"its forward reads {node.target!r} directly"
            if node.op == "call_module":
                reason = _why_not(mods[node.target], node.target)
                if reason:
                    return reason
        return None

    @staticmethod
    def supports(module: nn.Module) -> bool:
        """Whether `module` can run as a fast population (see `why_not`)."""
        return FastPopulation.why_not(module) is None

    def _emit(self, module: nn.Module) -> fx.GraphModule:
        """The traced graph with each leaf module replaced by its population op; inputs (x, rows, windows,
        training, *params, *buffers), windows being the data set's window table for the first conv or None."""
        src = _Tracer().trace(module)
        mods = dict(module.named_modules())
        g = fx.Graph()
        x_in = g.placeholder("x")
        rows_in = g.placeholder("rows")
        windows_in = g.placeholder("windows")
        training = g.placeholder("training")
        state = {k: g.placeholder("p_" + k.replace(".", "_")) for k in self.param_keys + self.buffer_keys}
        env: dict[fx.Node, fx.Node] = {}
        reads_input: set[fx.Node] = set()  # kernel convs that read the raw input (by row index) themselves
        fused: set[fx.Node] = set()  # pool / activation nodes folded into the kernel conv before them
        for node in src.nodes:
            if node in fused:
                continue
            if node.op == "placeholder":
                users = list(node.users)
                if len(users) == 1 and users[0].args == (node,) and not users[0].kwargs and self._kernel_conv(users[0], mods):
                    env[node] = x_in
                    reads_input.add(users[0])
                else:
                    env[node] = g.call_function(rows_input, (x_in, rows_in, self.dtype))
                continue
            if node.op == "output":
                if not isinstance(node.args[0], fx.Node):
                    raise ValueError("a fast population needs a forward that returns one tensor")
                g.output(g.call_method("float", (env[node.args[0]],)))
                continue
            if node.op != "call_module":
                env[node] = g.node_copy(node, lambda n: env[n])
                continue
            m, name = mods[node.target], node.target
            args = [env[a] if isinstance(a, fx.Node) else a for a in node.args]
            w = state.get(f"{name}.weight")
            b = state.get(f"{name}.bias")
            epilogue = self._epilogue(node, mods) if self._kernel_conv(node, mods) else None
            if epilogue is not None:  # conv, max-pool and activation as one kernel: the chain's last node is its output
                chain, options = epilogue
                if node in reads_input:
                    options.update(rows=rows_in, out_dtype=self.dtype, windows=windows_in)
                    self.window_geometry = (tuple(m.kernel_size), _conv_padding(m), options["pool"])
                fused.update(chain)
                env[chain[-1]] = g.call_function(popconv.conv2d_pool_act, (args[0], w, b, _conv_padding(m)), options)
            elif node in reads_input:
                env[node] = g.call_function(popconv.conv2d, (args[0], w, b, _conv_padding(m)),
                                            {"rows": rows_in, "out_dtype": self.dtype, "windows": windows_in})
                self.window_geometry = (tuple(m.kernel_size), _conv_padding(m), 1)
            elif self._kernel_conv(node, mods):
                env[node] = g.call_function(popconv.conv2d, (args[0], w, b, _conv_padding(m)))
            elif isinstance(m, nn.Conv2d):
                env[node] = g.call_function(pop_conv2d, (args[0], w, b, tuple(m.stride), _conv_padding(m)))
            elif isinstance(m, FlatLinear):
                env[node] = g.call_function(pop_flat_linear, (args[0], w, b))
            elif isinstance(m, nn.Linear):
                env[node] = g.call_function(pop_linear, (args[0], w, b))
            elif isinstance(m, PopDropout) and not self.dropout:
                env[node] = args[0]
            elif isinstance(m, PopDropout):
                env[node] = g.call_function(pop_dropout, (args[0], state[f"{name}.p"], training))
            else:  # a stateless per-sample module: run it on the [N*B, ...] batch as it is
                env[node] = g.call_module(name, tuple(args), {k: env[v] if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()})
        g.lint()
        root = nn.Module()
        for node in g.nodes:
            if node.op == "call_module":
                parent, _, leaf = node.target.rpartition(".")
                holder = root
                for part in filter(None, parent.split(".")):
                    if not hasattr(holder, part):
                        holder.add_module(part, nn.Module())
                    holder = getattr(holder, part)
                holder.add_module(leaf, mods[node.target])
        return fx.GraphModule(root, g)

    def _kernel_conv(self, node: fx.Node, mods: Mapping[str, nn.Module]) -> bool:
        """Whether the traced node is a Conv2d that runs as popconv's kernels."""
        m = mods.get(node.target) if node.op == "call_module" else None
        return self.kernels and isinstance(m, nn.Conv2d) and popconv.supports(m.stride, m.dilation, m.groups)

    def _epilogue(self, conv: fx.Node, mods: Mapping[str, nn.Module]) -> tuple[list[fx.Node], dict] | None:
        """The 2x2 max-pool and monotone activation (either order, each at most once) that alone consume
        the kernel conv's output, as (their nodes, conv2d_pool_act's options); None when there are none."""
        if not popconv.fuses(mods[conv.target].out_channels):
            return None
        chain: list[fx.Node] = []
        options: dict = {"pool": 1, "act": "identity", "window_dx": popconv.TUNING["window_dx"]}  # explicit in the program
        cur = conv
        while len(cur.users) == 1:
            (user,) = cur.users
            m = mods.get(user.target) if user.op == "call_module" else None
            if m is None or user.args != (cur,) or user.kwargs:
                break
            act = _monotone_activation(m)
            if isinstance(m, nn.MaxPool2d) and options["pool"] == 1 and _pool2(m):
                options["pool"] = 2
            elif act is not None and options["act"] == "identity":
                options["act"], options["slope"] = act
            elif not (isinstance(m, PopDropout) and not self.dropout):  # a skipped dropout is the identity
                break
            chain.append(user)
            cur = user
        while chain and isinstance(mods[chain[-1].target], PopDropout):  # nothing to fold after the last op
            chain.pop()
        return (chain, options) if chain else None

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


class FastStep:
    """One training step's gradients for a population: `step(params, buffers, x, y) -> (grads, per-model loss)`.

    The loss is the sum of per-model mean losses, so each model's gradient is its own loss's gradient,
    exactly what `vmap(grad(loss))` computes; `loss_fn(pred, y)` is the task's single-model loss.
    """

    def __init__(self, module: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], *,
                 dtype: torch.dtype = torch.float32, compile: bool = False, dropout: bool = True,
                 kernels: bool = False):
        self.pop = FastPopulation(module, dtype=dtype, compile=compile, dropout=dropout, kernels=kernels)
        self.loss_per_model = vmap(loss_fn, in_dims=(0, 0))

    def __call__(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, y: Tensor,
                 rows: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
        """Gradients for batch x [N, B, ...], or for the data set x [S, ...] read at rows [N, B]."""
        grads, loss, _ = self.with_outputs(params, buffers, x, y, rows)
        return grads, loss

    def with_outputs(self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor, y: Tensor,
                     rows: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """As calling the step, plus the models' outputs on the batch [N, B, ...] (float32, detached)."""
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
            pred = self.pop(leaves, buffers, x, rows=rows, x_per_model=True, training=True)
            loss = self.loss_per_model(pred, y)
            grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
        return dict(zip(leaves, grads)), loss.detach(), pred.detach()


__all__ = ["FastPopulation", "FastStep", "dropout_active", "pop_conv2d", "pop_linear", "pop_flat_linear", "pop_dropout"]
