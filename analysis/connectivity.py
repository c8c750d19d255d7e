"""Linear mode connectivity: loss and metric along the straight line between two models, barriers, REPAIR.

The path between models a and b is a population: the L interpolated states are stacked into one
{key: [L, ...]} state and evaluated as one vectorised program (`zoos.functional.population_forward`),
so 25 points of a path, or P pairs x 25 points, cost one forward per data batch.

Normalisation. symzoo's architectures use LayerNorm / GroupNorm, which compute their statistics per
sample: they hold no running statistics, so the "statistics reset" used for BatchNorm networks is
the identity for them (`reset_norm_stats` recomputes BatchNorm buffers if a network has any).
What does apply to every network is REPAIR (Jordan et al. 2022): interpolated networks suffer
variance collapse (hidden units' activations shrink towards their mean); `repair_path` rescales
each hidden channel of a linear/conv layer so its mean and std over data match the interpolation
of the endpoints' statistics, folding the correction into that layer's weight and bias.
A LayerNorm whose features the spec permutes (a transformer's residual stream) is a site too: its
per-sample statistics stay, and the per-feature correction of its output folds into its affine
weight and bias, the analogue of a BatchNorm statistics reset for a LayerNorm network.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from zoos.functional import evaluating, population_forward, split_state
from zoos.permspec import PermSpec

State = dict[str, Tensor]



# default cap on model-examples per vectorised forward (2^19: ~10 GB of activations for a CNN-s in
# float32): all pairs x lambdas of a large zoo are evaluated in chunks of this many, never all at once
CHUNK_SAMPLES = 1 << 19

def as_lambdas(lambdas: int | Sequence[float] | Tensor) -> Tensor:
    """Interpolation coefficients: an int n means n evenly spaced points in [0, 1], ends included."""
    if isinstance(lambdas, int):
        if lambdas < 2:
            raise ValueError(f"lambdas must be >= 2 points (both ends), got {lambdas}")
        return torch.linspace(0.0, 1.0, lambdas)
    return torch.as_tensor(lambdas, dtype=torch.float32).flatten()


def interpolate(
    a: Mapping[str, Tensor], b: Mapping[str, Tensor], lambdas: int | Sequence[float] | Tensor, *, pairs: bool = False
) -> State:
    """(1 - l) a + l b for every l, stacked: [L, *shape], or [P, L, *shape] for stacked pairs (`pairs=True`).

    Float entries are interpolated; other entries (integer buffers) are a's, repeated.
    """
    lam = as_lambdas(lambdas)
    out = {}
    for k, va in a.items():
        vb = b[k]
        if va.shape != vb.shape:
            raise ValueError(f"cannot interpolate {k!r}: shapes {tuple(va.shape)} and {tuple(vb.shape)} differ")
        lead = va.shape[:1] if pairs else ()
        rest = va.shape[1:] if pairs else va.shape
        if not va.is_floating_point():
            out[k] = va.unsqueeze(len(lead)).expand(*lead, len(lam), *rest).clone()
            continue
        l = lam.to(va.device, va.dtype).view(*([1] * len(lead)), -1, *([1] * len(rest)))
        out[k] = (1 - l) * va.unsqueeze(len(lead)) + l * vb.unsqueeze(len(lead))
    return out


def evaluate_states(
    module: nn.Module,
    states: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    metric_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    batch_size: int = 1024,
    chunk: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """(loss [N], metric [N]) of N stacked models on (x, y), in eval mode, as one vectorised population.

    Per-batch means are averaged with batch-size weights: exact for losses and accuracy (means over
    examples); a ratio metric such as rel_mse is the weighted mean of per-batch ratios. `chunk` caps
    how many models run at once; by default models x examples per forward stay within CHUNK_SAMPLES.
    """
    first = next(iter(states.values()))
    n, device = first.shape[0], device if device is not None else first.device
    chunk = chunk or max(1, CHUNK_SAMPLES // max(1, min(batch_size, len(x))))
    losses, metrics = [], []
    with evaluating(module), torch.no_grad():
        for lo in range(0, n, chunk):
            st = {k: v[lo : lo + chunk] for k, v in states.items()}
            st = {k: v.to(device) for k, v in st.items()}
            params, buffers = split_state(module, st)
            tot_l = tot_m = 0.0
            for i in range(0, len(x), batch_size):
                xb, yb = x[i : i + batch_size], y[i : i + batch_size]
                xb, yb = xb.to(device), yb.to(device)
                pred = population_forward(module, params, buffers, xb)
                w = len(xb) / len(x)
                tot_l = tot_l + w * vmap(loss_fn, in_dims=(0, None))(pred, yb).double()
                tot_m = tot_m + w * vmap(metric_fn, in_dims=(0, None))(pred, yb).double()
            losses.append(tot_l.float().cpu())
            metrics.append(tot_m.float().cpu())
    return torch.cat(losses), torch.cat(metrics)


@dataclass
class PathResult:
    """Loss and metric along a path: `loss[split]` is [L] (one pair) or [P, L] (stacked pairs)."""

    lambdas: Tensor
    loss: dict[str, Tensor]
    metric: dict[str, Tensor]
    metric_name: str = "metric"
    higher_is_better: bool = True

    def error(self, split: str) -> Tensor:
        """The metric turned into "lower is better" (1 - acc for accuracy), for error barriers."""
        m = self.metric[split]
        return 1 - m if self.higher_is_better else m


def evaluate_path(
    module: nn.Module,
    states: Mapping[str, Tensor],
    lambdas: Tensor,
    task: Any,
    *,
    pairs: bool = False,
    splits: Sequence[str] = ("train", "test"),
    seed: int = 0,
    max_examples: int | None = None,
    batch_size: int = 1024,
    chunk: int | None = None,
    device: torch.device | str | None = None,
) -> PathResult:
    """Evaluate stacked path states [L, ...] (or [P, L, ...] with `pairs=True`) on the task's splits."""
    n_lam = len(lambdas)
    flat = {k: v.flatten(0, 1) for k, v in states.items()} if pairs else dict(states)
    loss, metric = {}, {}
    for split in splits:
        x, y = task.load(split, seed)
        if max_examples is not None:
            x, y = x[:max_examples], y[:max_examples]
        l, m = evaluate_states(module, flat, x, y, task.loss, task.metric, batch_size=batch_size, chunk=chunk, device=device)
        shape = (-1, n_lam) if pairs else (n_lam,)
        loss[split], metric[split] = l.view(shape), m.view(shape)
    return PathResult(lambdas, loss, metric, getattr(task, "metric_name", "metric"), getattr(task, "higher_is_better", True))


def linear_path(
    module: nn.Module,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    task: Any,
    *,
    lambdas: int | Sequence[float] | Tensor = 25,
    pairs: bool = False,
    splits: Sequence[str] = ("train", "test"),
    seed: int = 0,
    max_examples: int | None = None,
    batch_size: int = 1024,
    chunk: int | None = None,
    device: torch.device | str | None = None,
) -> PathResult:
    """Loss and metric of (1 - l) a + l b for every l, on each split, all points as one population.

    With `pairs=True`, a and b are stacked states [P, ...] and the result is [P, L] per split.
    `task` needs `load(split, seed)`, `loss`, `metric` (a `tasks.Task`).
    """
    lam = as_lambdas(lambdas)
    states = interpolate(a, b, lam, pairs=pairs)
    return evaluate_path(
        module, states, lam, task, pairs=pairs, splits=splits, seed=seed, max_examples=max_examples,
        batch_size=batch_size, chunk=chunk, device=device,
    )


# ---------------------------------------------------------------------------------------------------
# barriers


def barrier(values: Tensor, lambdas: int | Sequence[float] | Tensor, form: str = "sup") -> Tensor:
    """The barrier of a curve `values[..., L]` of a lower-is-better quantity (loss, or error = 1 - acc).

    sup:      max_l [ v(l) - ((1 - l) v(0) + l v(1)) ]   (Frankle et al. / Entezari et al.)
    midpoint: v(0.5) - (v(0) + v(1)) / 2                 (needs l = 0.5 among the lambdas)
    The first and last lambdas must be 0 and 1.
    """
    lam = as_lambdas(lambdas).to(values.device, values.dtype)
    if values.shape[-1] != len(lam):
        raise ValueError(f"values have {values.shape[-1]} points along the last axis but there are {len(lam)} lambdas")
    if float(lam[0]) != 0.0 or float(lam[-1]) != 1.0:
        raise ValueError(f"lambdas must start at 0 and end at 1, got {float(lam[0])} .. {float(lam[-1])}")
    v0, v1 = values[..., :1], values[..., -1:]
    if form == "sup":
        return (values - ((1 - lam) * v0 + lam * v1)).amax(-1)
    if form == "midpoint":
        mid = (lam - 0.5).abs() < 1e-6
        if not mid.any():
            raise ValueError("midpoint barrier needs lambda = 0.5 among the lambdas (use an odd number of points)")
        return values[..., mid.nonzero()[0, 0]] - (v0[..., 0] + v1[..., 0]) / 2
    raise ValueError(f"barrier form must be 'sup' or 'midpoint', got {form!r}")


def barrier_reduction(naive: Tensor | float, aligned: Tensor | float) -> Tensor:
    """Relative barrier reduction (naive - aligned) / naive; NaN where the naive barrier is not positive."""
    naive, aligned = torch.as_tensor(naive, dtype=torch.float64), torch.as_tensor(aligned, dtype=torch.float64)
    return torch.where(naive > 0, (naive - aligned) / naive.clamp_min(1e-30), torch.full_like(naive, float("nan")))


# ---------------------------------------------------------------------------------------------------
# normalisation statistics and REPAIR


def reset_norm_stats(module: nn.Module, state: Mapping[str, Tensor], batches: Iterable[Tensor | Sequence[Tensor]]) -> State:
    """Recompute BatchNorm running statistics of `state` on `batches` (cumulative average).

    LayerNorm / GroupNorm networks have no running statistics: their state comes back unchanged.
    """
    bns = [n for n, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return dict(state)
    device = next(iter(state.values())).device
    net = copy.deepcopy(module).to(device)
    net.load_state_dict(dict(state))
    for n, m in net.named_modules():
        if n in bns:
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        for batch in batches:
            net((batch[0] if isinstance(batch, (tuple, list)) else batch).to(device))
    new = net.state_dict()
    return {k: (new[k].to(v.device) if k in new else v) for k, v in state.items()}


_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _foldable(m: nn.Module) -> bool:
    """A layer whose output channels an affine correction folds into: linear/conv, or a LayerNorm over one
    feature axis with its affine (a per-feature weight and bias)."""
    if isinstance(m, nn.LayerNorm):
        return len(m.normalized_shape) == 1 and m.elementwise_affine and m.bias is not None
    return isinstance(m, _FOLDABLE)


def repair_sites(module: nn.Module, spec: PermSpec) -> list[str]:
    """Hidden linear/conv layers and LayerNorms (output axis permuted by the spec), in module order: where REPAIR corrects."""
    hidden = {key.rpartition(".")[0] for pairs in spec.perms.values() for key, axis in pairs if axis == 0 and key.endswith(".weight")}
    return [n for n, m in module.named_modules() if n in hidden and _foldable(m)]


def activation_stats(
    module: nn.Module, state: Mapping[str, Tensor], batches: Iterable[Tensor | Sequence[Tensor]], sites: Sequence[str]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-channel (mean, std) of the outputs of the named linear/conv/LayerNorm modules over `batches`."""
    mods = dict(module.named_modules())
    sums: dict[str, list] = {s: [0, 0.0, 0.0] for s in sites}

    def hook_for(site: str):
        axis = -1 if isinstance(mods[site], (nn.Linear, nn.LayerNorm)) else 1

        def hook(_m, _i, out):
            f = out.movedim(axis, -1).reshape(-1, out.shape[axis]).double()
            acc = sums[site]
            acc[0] += f.shape[0]
            acc[1] = acc[1] + f.sum(0)
            acc[2] = acc[2] + (f * f).sum(0)

        return hook

    handles = [mods[s].register_forward_hook(hook_for(s)) for s in sites]
    try:
        with evaluating(module), torch.no_grad():
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                functional_call(module, dict(state), (x.to(next(iter(state.values())).device),))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for s, (n, s1, s2) in sums.items():
        if n == 0:
            raise ValueError("activation_stats got no batches")
        mean = s1 / n
        out[s] = (mean, (s2 / n - mean**2).clamp_min(0).sqrt())
    return out


def repair(
    module: nn.Module,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    lam: float,
    batches: Sequence[Tensor | Sequence[Tensor]],
    sites: Sequence[str],
    *,
    eps: float = 1e-5,
    endpoint_stats: tuple[dict, dict] | None = None,
) -> State:
    """REPAIR one interpolated `state` = (1 - lam) a + lam b: per-channel affine correction folded into weights.

    Site by site in module order, the interpolated net's channel mean/std (measured after the
    corrections made so far) are mapped to (1 - lam) * endpoints' mean/std, i.e.
    out' = (out - mu) * sigma_target / sigma + mu_target, folded into the layer's weight and bias
    (a layer without bias gets only the scale).
    """
    sa, sb = endpoint_stats or (activation_stats(module, a, batches, sites), activation_stats(module, b, batches, sites))
    out = {k: v.clone() for k, v in state.items()}
    for site in sites:
        mu, sd = activation_stats(module, out, batches, [site])[site]
        mu_t = (1 - lam) * sa[site][0] + lam * sb[site][0]
        sd_t = (1 - lam) * sa[site][1] + lam * sb[site][1]
        scale = sd_t / (sd + eps)
        w = out[f"{site}.weight"]
        out[f"{site}.weight"] = w * scale.to(w.dtype).view(-1, *([1] * (w.dim() - 1)))
        if f"{site}.bias" in out:
            bias = out[f"{site}.bias"].double()
            out[f"{site}.bias"] = ((bias - mu) * scale + mu_t).to(w.dtype)
    return out


def repair_path(
    module: nn.Module,
    spec: PermSpec,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    lambdas: int | Sequence[float] | Tensor,
    batches: Sequence[Tensor | Sequence[Tensor]],
    *,
    sites: Sequence[str] | None = None,
) -> State:
    """The interpolated states [L, ...] between a and b, each REPAIRed on `batches` (a few suffice)."""
    lam = as_lambdas(lambdas)
    sites = list(sites) if sites is not None else repair_sites(module, spec)
    stats = (activation_stats(module, a, batches, sites), activation_stats(module, b, batches, sites))
    path = interpolate(a, b, lam)
    fixed = [repair(module, a, b, {k: v[i] for k, v in path.items()}, float(l), batches, sites, endpoint_stats=stats) for i, l in enumerate(lam.tolist())]
    return {k: torch.stack([f[k] for f in fixed]) for k in path}
