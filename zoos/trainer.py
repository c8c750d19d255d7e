"""The population trainer: N models of one population trained as one vectorised program.

Every model is built from its own seed and the models' states are stacked into {key: [N, *shape]}.
One training step gathers each model's own mini-batch on the device (x[idx] with idx [N, B]), runs
`vmap(grad_and_value(loss))` over the stacked parameters (`randomness="different"`, so dropout
draws its own mask per model), and updates all models at once with an optimizer written on stacked
tensors, whose hyperparameters (lr, weight decay, momentum) are [N] tensors broadcast over each
parameter. There is no Python loop over models inside a step. On a GPU a step updates its tensors in
place and replays as one CUDA graph (`_StepGraph`), and a population's models are initialised by
replaying their layers' draws (`zoos.init.init_population`): the same weights as building each.

Optimizer semantics, so a single-model run equals a `torch.optim` loop on the same data order:
  sgd   torch.optim.SGD(momentum=m, weight_decay=wd): L2 decay added to the gradient, dampening 0.
  adam  torch.optim.AdamW(betas=(m, 0.999), eps=1e-8, weight_decay=wd): decoupled weight decay;
        the `momentum` factor is Adam's beta1.
Learning-rate schedules are per step (`lr_factor`), as `torch.optim.lr_scheduler.LambdaLR` would.

A model whose loss or parameters become NaN/inf is frozen at its last finite state (its updates are
masked from then on) and reported "diverged"; the other models compute exactly what they would
without it. A model whose training loss ends above DIVERGED x its loss at init (lr 1e4: losses of 20,000,
weights of 1e10, all finite) is reported "diverged" too. Random streams (init, training subset, data order, augmentation) derive from each
model's own seed, so a model trains the same in any population; dropout masks are the exception
(vmap draws them from one generator), so with dropout > 0 a run is reproducible but depends on
the population it runs in.

Curves hold every split's loss and metric at epoch 0 (the init) and after every epoch. The train
split's are a pass over each model's whole training subset in eval mode, or, with the zoo's
`train_metrics: running`, the size-weighted mean over the epoch's own training batches as they were
stepped (train mode; augmented batches where augmentation is on; for a non-additive metric such as
PSNR, the mean of the batches' values), which costs no extra pass over the training set.

Per-model data: a task with `per_model` set (tasks.inr: each model fits its own image) gives shared
inputs x [P, ...] and each model's own targets y [N, P, ...] (`task.load_models`, keyed by that
factor); a step gathers y[model, idx] on the device, and evaluation computes each model's metric
over all its samples at once (exact for non-additive metrics such as PSNR).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap

from tasks.base import Task
from zoos import popconv
from zoos.archs import ARCHS
from zoos.fastpop import dropout_active, prior_view
from zoos.functional import population_forward, template
from zoos.population import PopulationResult
from zoos.program import choose_program, models_in_memory, split_evenly
from zoos.init import AUGMENT_STREAM, ORDER_STREAM, SUBSET_STREAM, init_population, stream_seed
from zoos.spec import ModelSpec, PopulationSpec

PRECISIONS = ("float32", "bf16")
SPLITS = ("train", "val", "test")
DATA_SEED = 0  # the seed of the task's data split, the same for every model of a zoo
ADAM_BETA2, ADAM_EPS = 0.999, 1e-8
LIE_AUGMENT_POOL = 16  # group elements drawn per epoch to augment with, for continuous groups
LEARNED = 0.95  # a model learned when its final training loss is below this fraction of its loss at init
DIVERGED = 10.0  # a model diverged when its loss became non-finite, or ended above this multiple of its loss at init


class TrainError(ValueError):
    """A population that cannot be trained as asked; the message names the setting and what is allowed."""


def _gen(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, salt))


def subset_size(n_train: int, fraction: float) -> int:
    """How many training samples a model sees: round(fraction * n_train), at least 1."""
    return max(1, round(fraction * n_train))


def train_subset(seed: int, n_train: int, fraction: float) -> Tensor:
    """The training indices a model sees (`subset_size` of them), from its seed."""
    return torch.randperm(n_train, generator=_gen(seed, SUBSET_STREAM))[: subset_size(n_train, fraction)]


def epoch_order(seed: int, epoch: int, n: int) -> Tensor:
    """The order (a permutation of range(n)) in which a model visits its training subset in `epoch` (1-based)."""
    return torch.randperm(n, generator=_gen(seed, ORDER_STREAM + epoch))


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """The learning-rate multiplier before step `step` (0-based) of `total_steps`.

    constant: 1; cosine: 0.5 (1 + cos(pi t / T)); warmup_cosine: linear warm-up over the first 5% of
    steps (at least one), then cosine over the rest.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    if schedule == "warmup_cosine":
        warm = max(1, math.ceil(0.05 * total_steps))
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total_steps - warm)))
    raise TrainError(f"lr_schedule {schedule!r} is not known; allowed: constant, cosine, warmup_cosine")


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Mini-batches per epoch over n samples; the last one may be smaller (as a DataLoader without drop_last)."""
    return math.ceil(n / min(batch_size, n))


def make_task(pop: PopulationSpec, data_dir: str | None = None) -> Task:
    """The population's task; `data_dir` is handed to tasks that read files and were not given one."""
    from tasks import task_with_data

    return task_with_data(pop.first.task, pop.first.task_options, data_dir)


def _per_model(values: list, device: torch.device) -> Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """An [N] tensor shaped to broadcast against a stacked [N, *shape] tensor."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def _all_finite(state: dict[str, Tensor]) -> Tensor:
    """[N] bool: every entry of model i's state is finite."""
    return torch.stack([torch.isfinite(v).flatten(1).all(1) for v in state.values()]).all(0)


class Augmenter:
    """Moves each training sample by its own random group element: one masked act per element, no loop over models."""

    def __init__(self, task: Task, models: tuple[ModelSpec, ...], n: int, device: torch.device):
        self.task, self.models, self.n, self.device = task, models, n, device
        self.finite = hasattr(task.group, "elements")

    def epoch(self, epoch: int) -> tuple[list, Tensor]:
        """The group elements used this epoch and [N, n] indices into them, one per sample of each model."""
        if self.finite:
            els = self.task.group.elements()
        else:
            els = self.task.group.sample(LIE_AUGMENT_POOL, torch.Generator().manual_seed(AUGMENT_STREAM + epoch))
        which = torch.stack([
            torch.randint(len(els), (self.n,), generator=_gen(m.factors["seed"], AUGMENT_STREAM + epoch))
            for m in self.models
        ])
        return els, which.to(self.device)

    def __call__(self, els: list, which: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        n, b = which.shape
        xf, yf, w = x.flatten(0, 1), y.flatten(0, 1), which.flatten()
        out_x, out_y = xf, yf
        for k, g in enumerate(els):
            mask = w == k
            out_x = torch.where(mask.view(-1, *[1] * (xf.dim() - 1)), self.task.group.act_in(g, xf), out_x)
            out_y = torch.where(mask.view(-1, *[1] * (yf.dim() - 1)), self.task.group.act_out(g, yf), out_y)
        return out_x.reshape(x.shape), out_y.reshape(y.shape)


def train_population(
    pop: PopulationSpec,
    *,
    device: str | torch.device = "cpu",
    precision: str = "float32",
    progress: Callable[[int, int], None] | None = None,
    status: Callable[[str], None] | None = None,
    data_dir: str | None = None,
    eval_batch: int = 512,
    fast: bool | None = None,
    kernels: bool | None = None,
    graphs: bool | None = None,
    compile: bool | None = None,
) -> PopulationResult:
    """Train every model of `pop` as one vectorised program; curves every epoch, weights at checkpoints.

    fast: run the population program (`zoos.program`: population layers, batched matmuls) where the architecture
        allows, instead of vmap; None = on CUDA.
    kernels: in the population program, run stride-1 convs as `zoos.popconv`'s Triton kernels; None = where available.
    compile: torch.compile the population program's forward and the optimizer's update; None = no (steps replay
        as CUDA graphs instead; a compile costs tens of seconds up front and pays only in long runs of some
        families: benchmarks/README.md).
    progress(epoch, epochs) after every epoch; status(phase) when a phase starts: "building", "first step"
        (compiling, on a GPU), "training".
    graphs: replay each training step as a CUDA graph (one launch instead of ~100; the same kernels, the
        same run); None = on CUDA with the fast program and no augmentation.
    """
    if precision not in PRECISIONS:
        raise TrainError(f"precision {precision!r} is not known; allowed: {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # helper threads copy to this device, not their own current one
        device = torch.device("cuda", torch.cuda.current_device())
    limit = memory_limit(pop, device, data_dir) if fast is not False else None
    parts = split_evenly(pop, limit) if limit is not None and limit < len(pop.models) else [pop]
    if len(parts) > 1 and status is not None:  # more models than the device holds: in parts, one after another
        status(f"training in {len(parts)} parts of <= {limit} models (the device's free memory)")
    results, done = [], 0
    for part in parts:
        at = progress  # in epochs of the whole population: model-epochs done over its size
        if len(parts) > 1 and progress is not None:
            at = lambda e, n, done=done, k=len(part.models): progress((done * n + k * e) // len(pop.models), n)  # noqa: E731
        done += len(part.models)
        results.append(_train_threads(part, device, precision, at, status or (lambda _: None), data_dir, eval_batch,
                                      fast, kernels, graphs, compile))
        if len(parts) > 1 and device.type == "cuda":
            torch.cuda.empty_cache()  # the next part sees the memory this one held as free
    return results[0] if len(parts) == 1 else PopulationResult.concat(results)


def _train_threads(pop: PopulationSpec, device: torch.device, precision: str, progress, status, data_dir,
                   eval_batch: int, fast, kernels, graphs, compile) -> PopulationResult:
    """`_train` with its helper threads and the population's own dropout stream around it."""
    # helper threads: one reads the data and asks for the index streams in order, a few draw them
    streams = ThreadPoolExecutor(1, thread_name_prefix="symzoo-orders")
    draws = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="symzoo-draws")
    try:
        with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []):
            torch.manual_seed(int(pop.shard.removeprefix("pop-"), 16))  # dropout masks: one stream per population
            return _train(pop, device, precision, progress, status, data_dir, eval_batch, fast,
                          kernels, graphs, compile, streams, draws)
    finally:  # also on an error: no helper left reading or copying once this returns
        streams.shutdown(cancel_futures=True)
        draws.shutdown(cancel_futures=True)


def memory_limit(pop: PopulationSpec, device: torch.device, data_dir: str | None = None) -> int | None:
    """The most models of `pop` that train at once in the CUDA device's free memory (`zoos.program.models_in_memory`);
    None off CUDA or where the population runs as vmap."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return models_in_memory(pop, make_task(pop, data_dir), free)


def _train(pop: PopulationSpec, device: torch.device, precision: str, progress, status, data_dir, eval_batch: int,
           fast: bool | None, kernels: bool | None, graphs: bool | None, compile: bool | None,
           streams: ThreadPoolExecutor, draws: ThreadPoolExecutor) -> PopulationResult:
    clock = _Clock(device)
    status("building")
    specs, first = pop.models, pop.first
    n_models, epochs, checkpoints = len(specs), first.epochs, list(first.checkpoints)
    batch_size, optimizer, schedule = (pop.shared(k) for k in ("batch_size", "optimizer", "lr_schedule"))
    task = make_task(pop, data_dir)
    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16))
        if precision == "bf16"
        else contextlib.nullcontext
    )

    # -- data: every split on the device once; each model's subset and order are index tensors
    per_model = task.per_model
    if per_model is not None:
        if pop.shared("augmentation"):
            raise TrainError(f"augmentation = true is not allowed for task {task.name!r} (one target per model); use false")
        keys = [m.factors.get(per_model) for m in specs]
        if None in keys:
            raise TrainError(f"task {task.name!r} fits each model to its own data: every model needs the factor {per_model!r}")

    def load_data() -> dict[str, tuple[Tensor, Tensor]]:
        if per_model is None:
            return {s: tuple(t.to(device) for t in task.load(s, seed=DATA_SEED)) for s in SPLITS}
        data = {}
        for s in SPLITS:
            xs, ys = task.load_models(s, DATA_SEED, keys)
            same = next((d for d in data.values() if torch.equal(d[0].cpu(), xs) and torch.equal(d[1].cpu(), ys)), None)
            data[s] = same or (xs.to(device), ys.to(device))  # identical splits (inr: the full grid) are evaluated once
        return data

    fraction = pop.shared("train_fraction")
    # A helper thread reads the data, then draws the index streams (each model's training subset, then its
    # order in every epoch) on the CPU from the model's own seed, one randperm per model on a few draw
    # threads (torch and numpy release the GIL; 1,024 randperms of 60,000 took ~1 s on one thread), while
    # this one builds the models and the GPU trains the previous epoch. A stream reaches the GPU by a copy
    # on a side stream, issued by the helper (the copy engine runs it beside the step kernels): copied on
    # the main stream (0.5 GB at 1,024 models) it held the step loop ~0.08 s an epoch.
    copies = torch.cuda.Stream(device) if device.type == "cuda" else None

    def drawn(draw: Callable[[ModelSpec], Tensor]) -> tuple[Tensor, torch.cuda.Event | None]:
        t = torch.stack(list(draws.map(draw, specs)))
        if copies is None:
            return t.to(device), None
        with torch.cuda.stream(copies):
            t = t.to(device, non_blocking=True)  # from pageable memory: the helper waits, the main stream does not
            return t, copies.record_event()

    def arrived(ahead) -> Tensor:
        """A drawn stream on the device, once its copy is done (in stream order: the host does not wait)."""
        t, copied = ahead.result()
        if copied is not None:
            main = torch.cuda.current_stream(device)
            main.wait_event(copied)
            t.record_stream(main)  # allocated on the copy stream: not reused before the main stream is done with it
        return t

    data_ahead = streams.submit(load_data)

    def n_train() -> int:
        return len(data_ahead.result()["train"][0])

    def orders_of(epoch: int) -> tuple[Tensor, torch.cuda.Event | None]:
        return drawn(lambda m: epoch_order(m.factors["seed"], epoch, subset_size(n_train(), fraction)))

    subsets_ahead = streams.submit(drawn, lambda m: train_subset(m.factors["seed"], n_train(), fraction))
    orders_ahead = streams.submit(orders_of, 1)

    # -- models: each from its own seed, stacked; the template holds the code, no weights
    first_model, params, buffers = init_population(specs, task)
    data = data_ahead.result()
    model_rows = torch.arange(n_models, device=device).unsqueeze(1)

    def targets(y: Tensor, idx: Tensor) -> Tensor:
        """The targets at indices idx [N, B]: y[idx] when shared, y[model, idx] when each model has its own."""
        return y[idx] if per_model is None else y[model_rows, idx]

    x_train, y_train = data["train"]
    n_sub = subset_size(len(x_train), fraction)
    bs = min(batch_size, n_sub)
    n_steps = steps_per_epoch(n_sub, batch_size)
    total_steps = epochs * n_steps
    augmenter = Augmenter(task, specs, n_sub, device) if pop.shared("augmentation") else None

    params = {k: v.detach().to(device=device, dtype=torch.float32) for k, v in params.items()}  # plain tensors: no graph
    buffers = {k: v.to(device) for k, v in buffers.items()}
    module = template(first_model)
    n_params = first_model.num_params

    lr = _per_model([m.factors["lr"] for m in specs], device)
    wd = _per_model([m.factors["weight_decay"] for m in specs], device)
    mom = _per_model([m.factors["momentum"] for m in specs], device)
    reg = _per_model([m.factors["equiv_reg"] for m in specs], device)
    projections = _projections(first_model, task) if bool((reg > 0).any()) else {}
    penalty = vmap(functools.partial(_regulariser, projections=projections)) if projections else None

    prior = prior_view(module)  # a data-dependent penalty (learned canonicalization's prior), if any

    def loss_fn(p, b, x, y, r):
        with autocast():
            pred = functional_call(module, (p, b), (x,)).float()
            terms = functional_call(prior, (p, b), (x,)).float() if prior is not None else None
        loss = task.loss(pred, y)
        total = loss + r * _regulariser(p, projections) if projections else loss
        if terms is not None:
            total = total + module.prior_weight * terms.mean()
        return total, (loss, pred.detach())

    step_fn = vmap(grad_and_value(loss_fn, has_aux=True), in_dims=(0, 0, 0, 0, 0), randomness="different")
    program = choose_program(module, task, device, precision, arch=first.arch, fast=fast, kernels=kernels,
                             compile=compile, dropout=dropout_active(module, buffers), regulariser=penalty)
    fast_forward = None
    if program.fast:
        fast_step = program.step
        fast_forward = fast_step.pop
        limit = fast_forward.max_rows  # samples of all models one program holds (32-bit indexing of its largest activation)
        if n_models * (1 << (bs - 1).bit_length()) > limit:  # a compiled step pads its batch to a power of two
            raise TrainError(
                f"population of {n_models} models x batch {bs}: {n_models * bs:,} samples in one program, but its largest "
                f"activation ({fast_forward.sample_elements:,} values a sample) allows at most {limit:,} (CUDA indexes a "
                f"tensor with 32-bit offsets); set population_size <= {max(1, limit // bs)}")
        if n_models * eval_batch > limit:  # evaluation batches shrink to fit the same limit (a power of two: its bucket)
            eval_batch = 1 << ((limit // n_models).bit_length() - 1)

        def step_fn(p, b, x, y, r, rows=None):
            grads, loss, total, pred = fast_step.with_outputs(p, b, x, y, rows=rows, reg=r)
            return grads, (total, (loss, pred))

        if fast_forward.input_dtype == torch.bfloat16 and per_model is None:  # resident inputs as the first layers read them
            data = {s: (x.to(torch.bfloat16) if x.is_floating_point() else x, y) for s, (x, y) in data.items()}
            x_train = data["train"][0]
    state = {k: torch.zeros_like(v) for k, v in params.items()}  # SGD momentum buffer / Adam first moment
    state2 = {k: torch.zeros_like(v) for k, v in params.items()} if optimizer == "adam" else {}
    alive = torch.ones(n_models, dtype=torch.bool, device=device)
    compiled = bool(compile)
    update = _compiled_update(optimizer) if compiled else functools.partial(_update_in_place, optimizer)
    step_t = torch.zeros((), dtype=torch.float64, device=device)  # the step count the update reads (a tensor: one program)

    # -- evaluation: eval mode, population_forward in batches, per-model loss and metric
    loss_per_model = vmap(task.loss, in_dims=(0, 0))
    metric_per_model = vmap(task.metric, in_dims=(0, 0))

    @torch.no_grad()
    def evaluate(split: str) -> tuple[Tensor, Tensor]:
        x, y = data[split]
        own = split == "train" and n_sub < len(x_train)  # a model's train metrics cover its own subset
        n = n_sub if own else len(x)
        loss_sum = torch.zeros(n_models, device=device)
        metric_sum = torch.zeros(n_models, device=device)
        preds, ys = [], []  # per-model data: every batch kept, the metric taken over all samples at once
        module.eval()
        for i in range(0, n, eval_batch):
            rows = None
            if own:
                idx = subsets[:, i : i + eval_batch]
                yb = targets(y, idx)
                if fast_forward is not None:  # the fast program reads the data set by index
                    xb, rows = x, idx
                else:
                    xb = x[idx]
            elif per_model is None:
                yb = y[i : i + eval_batch].expand(n_models, *y[i : i + eval_batch].shape)
                if fast_forward is not None and fast_forward.kernels:  # every model reads the same rows of the split
                    xb, rows = x, torch.arange(i, i + yb.shape[1], device=device).expand(n_models, -1)
                else:
                    xb = x[i : i + eval_batch]
            else:
                xb, yb = x[i : i + eval_batch], y[:, i : i + eval_batch]
            with autocast():
                if fast_forward is not None:
                    pred = fast_forward(params, buffers, xb, rows=rows, x_per_model=own, bucket=eval_batch).float()
                else:
                    pred = population_forward(module, params, buffers, xb, x_per_model=own).float()
            if per_model is not None:
                preds.append(pred)
                ys.append(yb)
                continue
            k = yb.shape[1]
            loss_sum += loss_per_model(pred, yb) * k
            metric_sum += metric_per_model(pred, yb) * k
        module.train()
        if per_model is not None:
            pred, yb = torch.cat(preds, 1), torch.cat(ys, 1)
            return loss_per_model(pred, yb), metric_per_model(pred, yb)
        return loss_sum / n, metric_sum / n

    names = [f"{s}_{what}" for s in SPLITS for what in ("loss", task.metric_name)]
    curves = {name: np.full((n_models, epochs + 1), np.nan) for name in names}
    ckpt_metrics = {name: np.full((n_models, len(checkpoints)), np.nan) for name in names}
    weights: dict[str, np.ndarray] = {}

    running = first.train_metrics == "running"  # the train split's metrics from the epoch's own batches
    run_loss = torch.zeros(n_models, device=device)
    run_metric = torch.zeros(n_models, device=device)

    def record(epoch: int) -> None:
        done: dict[int, tuple[Tensor, Tensor]] = {}
        for s in SPLITS:
            key = id(data[s])
            if s == "train" and running and epoch > 0:
                loss, metric = run_loss / n_sub, run_metric / n_sub
            else:
                loss, metric = done[key] = done[key] if key in done else evaluate(s)
            curves[f"{s}_loss"][:, epoch] = loss.cpu().numpy()
            curves[f"{s}_{task.metric_name}"][:, epoch] = metric.cpu().numpy()
        if epoch in checkpoints:
            c = checkpoints.index(epoch)
            for name in names:
                ckpt_metrics[name][:, c] = curves[name][:, epoch]
            for k, v in {**params, **buffers}.items():
                if k not in weights:
                    weights[k] = np.zeros((n_models, len(checkpoints), *v.shape[1:]), dtype=np.float32)
                weights[k][:, c] = v.detach().float().cpu().numpy()

    subsets = arrived(subsets_ahead)
    # the schedule's factor of every step, on the device: a step reads its own (the same float32 product as
    # lr * a Python float), so the step is one program whatever its count
    factors = None if schedule == "constant" else torch.tensor(
        [lr_factor(schedule, i, total_steps) for i in range(total_steps)], device=device, dtype=lr.dtype)

    def train_step(idx: Tensor, aug: tuple | None = None) -> None:
        """One step of every model on the batches idx [N, B], in place: parameters, optimizer state, alive,
        the step count and the running sums. The same code runs eagerly or is replayed as a CUDA graph."""
        yb = targets(y_train, idx)
        if aug is None and fast_forward is not None:  # the fast program reads the data set by index
            grads, (total, (loss, pred)) = step_fn(params, buffers, x_train, yb, reg, rows=idx)
        else:
            xb = x_train[idx]
            if aug is not None:
                xb, yb = augmenter(*aug, xb, yb)
            grads, (total, (loss, pred)) = step_fn(params, buffers, xb, yb, reg)
        if running:  # each batch's mean weighted by its size: the epoch's mean over its samples
            run_loss.add_(loss.detach(), alpha=idx.shape[1])
            run_metric.add_(metric_per_model(pred, yb), alpha=idx.shape[1])
        lr_t = lr if factors is None else lr * factors.index_select(0, step_t.long().view(1))
        step_t.add_(1)
        update(params, grads, state, state2, lr_t, wd, mom, step_t, alive, total)

    can_graph = (device.type == "cuda" and fast_forward is not None and augmenter is None
                 and fast_forward.not_capturable is None)
    if graphs and not can_graph:
        raise TrainError("graphs = true needs a CUDA device, an architecture the population program runs "
                         f"({program.reason or 'it does'}) with no op that syncs the host "
                         f"({getattr(fast_forward, 'not_capturable', None) or 'it has none'}) and no augmentation "
                         "(a step's group elements change every epoch)")
    use_graphs = can_graph if graphs is None else graphs
    program.graphs = bool(use_graphs)
    run_step = _StepGraph(train_step, (n_models, bs), device) if use_graphs else train_step

    # -- training
    clock.lap("setup")
    status("first step" + (" (compiling)" if program.compile else ""))
    module.train()
    record(0)
    clock.lap("evaluation")
    for epoch in range(1, epochs + 1):
        orders = torch.gather(subsets, 1, arrived(orders_ahead))
        if epoch < epochs:
            orders_ahead = streams.submit(orders_of, epoch + 1)
        if augmenter is not None:
            els, which = augmenter.epoch(epoch)
        run_loss.zero_()
        run_metric.zero_()
        for s in range(n_steps):
            idx = orders[:, s * bs : (s + 1) * bs]
            if augmenter is None:
                run_step(idx)
            else:
                run_step(idx, (els, which[:, s * bs : (s + 1) * bs]))
            if epoch == 1 and s == 0:
                clock.lap("first_step")
                status("training")
        clock.lap("steps")
        record(epoch)
        clock.lap("evaluation")
        if progress is not None:
            progress(epoch, epochs)

    alive_list = alive.cpu().tolist()
    start, end = curves["train_loss"][:, 0], curves["train_loss"][:, -1]
    exploded = (end > DIVERGED * np.maximum(start, 1e-12)).tolist()  # finite, but far above where it began
    # per-model data: each row's task_config names its own data, plus the task's columns (inr: split, label)
    own_option = [{per_model: m.factors[per_model]} if per_model else {} for m in specs]
    own_columns = task.model_columns([m.factors[per_model] for m in specs]) if per_model else [{} for _ in specs]
    rows = []
    for i, m in enumerate(specs):
        rows.append({
            "model_id": m.model_id,
            "study": m.study,
            "zoo": m.zoo,
            "task": m.task,
            "task_config": json.dumps({"name": m.task, **m.task_options, **own_option[i]}, sort_keys=True),
            "arch": m.arch,
            "arch_config": json.dumps({**ARCHS[m.arch].defaults, **m.arch_config}, sort_keys=True),  # as built
            **m.factors,
            **own_columns[i],
            "status": "ok" if alive_list[i] and not exploded[i] else "diverged",
            "learned": bool(alive_list[i] and curves["train_loss"][i, -1] < LEARNED * curves["train_loss"][i, 0]),
            **{name: float(curves[name][i, -1]) for name in names},
            "n_params": n_params,
            "epochs": epochs,
            "train_metrics": first.train_metrics,
        })
    result = PopulationResult(models=rows, epochs=checkpoints, metrics=ckpt_metrics, weights=weights, curves=curves,
                              timings=clock.totals, program=program.as_dict())
    result.validate()
    return result


class _Clock:
    """Wall time by phase; on a GPU each lap first waits for the queued kernels (a few syncs a population)."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.t = self.start = time.perf_counter()
        self.totals: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self.t
        self.t = now
        if phase == "first_step":  # seconds from the call to the end of the first step: what a user waits for
            self.totals["first_step_at"] = now - self.start


def _update(optimizer: str, params, grads, state, state2, lr, wd, mom, step, alive, total):
    """One optimizer step of every model, then the divergence check: a model whose loss or new parameters
    are not finite keeps its last finite state from now on (alive [N] bool, returned updated).

    step is the 1-based step count (an int, or a 0-d float64 tensor so that a compiled update is one
    program for every step). Returns (params, state, state2, alive)."""
    if optimizer == "sgd":
        new_p, new_s, new_s2 = _sgd(params, grads, state, lr, wd, mom)
    else:
        new_p, new_s, new_s2 = _adamw(params, grads, state, state2, lr, wd, mom, step)
    alive = alive & torch.isfinite(total) & _all_finite(new_p)

    def keep(new: dict[str, Tensor], old: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: torch.where(_bcast(alive, v), v, old[k]) for k, v in new.items()}

    return keep(new_p, params), keep(new_s, state), keep(new_s2, state2), alive


def _update_in_place(optimizer: str, params, grads, state, state2, lr, wd, mom, step, alive, total) -> None:
    """`_update` written back into params, state, state2 and alive (the tensors a captured step reads)."""
    new = _update(optimizer, params, grads, state, state2, lr, wd, mom, step, alive, total)
    for old, fresh in zip((params, state, state2), new):
        for k, v in fresh.items():
            old[k].copy_(v)
    alive.copy_(new[3])


_COMPILED_UPDATES: dict[str, Callable] = {}


def _compiled_update(optimizer: str) -> Callable:
    """`_update_in_place` for `optimizer` as one compiled program (a handful of fused kernels that write
    the new values in place, instead of ~15 small ones per parameter tensor a step), shared by every
    population of the process (pointwise code: after a second population size it compiles once for any size)."""
    if optimizer not in _COMPILED_UPDATES:
        _COMPILED_UPDATES[optimizer] = torch.compile(functools.partial(_update_in_place, optimizer))
    return _COMPILED_UPDATES[optimizer]


class _StepGraph:
    """A training step (`step(idx)`, which updates its tensors in place) replayed as one CUDA graph.

    A step is ~100 kernel launches; at 1,024 CNN-s in a Ray task the eager loop ran 6.39 ms a step, the
    replays 6.09 (the GPU's own pace): a replay is one launch. The first WARMUP calls run eagerly
    on a side stream (compiles, autotuning, the window table: nothing that allocates or loads code may run
    inside a capture), the next is captured and every later one replays it after copying its indices into
    the captured index tensor. A batch of another shape (an epoch's short last batch) runs eagerly; the
    eager and replayed steps compute the same kernels on the same tensors, so either order is the same run.
    """

    WARMUP = 3

    def __init__(self, step: Callable[[Tensor], None], idx_shape: tuple[int, int], device: torch.device):
        self.step, self.device = step, device
        self.idx = torch.zeros(idx_shape, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_calls = 0

    def __call__(self, idx: Tensor) -> None:
        if idx.shape != self.idx.shape:
            self.step(idx)
            return
        self.idx.copy_(idx)
        if self.graph is not None:
            self.graph.replay()
            return
        with torch.cuda.device(self.device):  # the side and capture streams on the population's GPU
            if self.eager_calls < self.WARMUP:
                side, main = torch.cuda.Stream(), torch.cuda.current_stream()
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    self.step(self.idx)
                main.wait_stream(side)
                self.eager_calls += 1
                return
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads draw index streams
                self.step(self.idx)
            self.graph = graph
            graph.replay()


def _sgd(params, grads, buf, lr, wd, mom):
    """torch.optim.SGD on stacked tensors: g += wd p; buf = m buf + g; p -= lr buf (buf starts at 0)."""
    new_p, new_b = {}, {}
    for k, p in params.items():
        g = grads[k] + _bcast(wd, p) * p
        b = _bcast(mom, p) * buf[k] + g
        new_b[k] = b
        new_p[k] = p - _bcast(lr, p) * b
    return new_p, new_b, {}


def _adamw(params, grads, m1, m2, lr, wd, beta1, step):
    """torch.optim.AdamW on stacked tensors, with per-model lr, weight decay and beta1; step an int or a
    0-d float64 tensor (the bias corrections then computed on the device in float64)."""
    new_p, new_m1, new_m2 = {}, {}, {}
    bc1 = 1 - beta1**step
    bc2_sqrt = math.sqrt(1 - ADAM_BETA2**step) if isinstance(step, int) else torch.sqrt(1 - ADAM_BETA2**step)
    for k, p in params.items():
        g = grads[k]
        b1 = _bcast(beta1, p)
        p = p * (1 - _bcast(lr * wd, p))
        m = m1[k] + (1 - b1) * (g - m1[k])
        v = m2[k] * ADAM_BETA2 + (1 - ADAM_BETA2) * g * g
        denom = v.sqrt() / bc2_sqrt + ADAM_EPS
        new_p[k] = p - _bcast(lr / bc1, p) * m / denom
        new_m1[k], new_m2[k] = m, v
    return new_p, new_m1, new_m2


def _projections(model, task: Task) -> dict:
    """The equivariant-subspace projections of the model's constrained weights (finite groups only)."""
    from zoos.equivariance import projections

    try:
        return projections(model, task.group, tuple(task.input_shape))
    except ValueError as e:
        raise TrainError(f"equiv_reg > 0 needs weight projections for task {task.name!r}: {e}") from None


def _regulariser(p: dict[str, Tensor], projections: dict) -> Tensor:
    from zoos.equivariance import regulariser

    return regulariser(p, projections)
