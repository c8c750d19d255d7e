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
import gc
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap

from tasks.base import Task
from zoos import popoptim, precompile
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
LEARNED = 0.95  # a model learned when its final training loss is below this fraction of its loss at init, or
LEARNED_METRIC = 0.1  # its training metric (higher is better: accuracy) at least doubled, by this much or more
GRAPH_WARMUP = 3  # eager steps before a step is captured as a CUDA graph (the capture is the next)
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
    return torch.stack([torch.isfinite(v).reshape(len(v), -1).all(1) for v in state.values()]).all(0)


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
        allows, instead of vmap; None = yes (on the CPU too, its convs as grouped convolutions).
    kernels: run the population's Triton kernels (`zoos.popconv`'s stride-1 convs, poplinear's narrow linears,
        popnorm's norms, popattn's attention in the population program; `zoos.popoptim`'s optimizer update);
        None = on CUDA, where available.
    compile: torch.compile the population program's forward and the optimizer's update; None = no (steps replay
        as CUDA graphs instead; a compile costs tens of seconds up front and pays only in long runs of some
        families: benchmarks/README.md).
    progress(epoch, epochs) after every epoch; status(phase) when a phase starts: "building", "compiling kernels"
        (on a GPU: the population's Triton kernels at once, `zoos.precompile`), "first step", "training".
    graphs: replay each training step as a CUDA graph (one launch instead of ~100; the same kernels, the
        same run); None = on CUDA with the fast program and no augmentation.
    """
    called = time.perf_counter()
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
                                      fast, kernels, graphs, compile, called if not results else None))
        if len(parts) > 1 and device.type == "cuda":
            torch.cuda.empty_cache()  # the next part sees the memory this one held as free
    return results[0] if len(parts) == 1 else PopulationResult.concat(results)


def _train_threads(pop: PopulationSpec, device: torch.device, precision: str, progress, status, data_dir,
                   eval_batch: int, fast, kernels, graphs, compile, called: float | None) -> PopulationResult:
    """`_train` with its helper threads and the population's own dropout stream around it."""
    # helper threads: one reads the data and asks for the index streams in order, a few draw them
    streams = ThreadPoolExecutor(1, thread_name_prefix="symzoo-orders")
    draws = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="symzoo-draws")
    try:
        with torch.random.fork_rng(devices=[device.index] if device.type == "cuda" else []), _collector_spares_the_old():
            torch.manual_seed(int(pop.shard.removeprefix("pop-"), 16))  # dropout masks: one stream per population
            return _train(pop, device, precision, progress, status, data_dir, eval_batch, fast,
                          kernels, graphs, compile, streams, draws, called)
    finally:  # also on an error: no helper left reading or copying once this returns
        streams.shutdown(cancel_futures=True)
        draws.shutdown(cancel_futures=True)


@contextlib.contextmanager
def _collector_spares_the_old() -> Iterator[None]:
    """The objects alive on entry (torch's and the imported modules', hundreds of thousands) left out of the
    garbage collector's passes until exit: a full pass walks them all (tens of ms), and a population's setup (its
    program's trace) and eager steps make enough short-lived objects to start one every few steps. What was frozen
    before stays frozen."""
    frozen_before = gc.get_freeze_count()
    gc.freeze()
    try:
        yield
    finally:
        if not frozen_before:  # the collector cannot unfreeze a part: another freeze's objects stay with it
            gc.unfreeze()


def memory_limit(pop: PopulationSpec, device: torch.device, data_dir: str | None = None) -> int | None:
    """The most models of `pop` that train at once in the CUDA device's free memory (`zoos.program.models_in_memory`);
    None off CUDA or where the population runs as vmap."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return models_in_memory(pop, make_task(pop, data_dir), free)


def _train(pop: PopulationSpec, device: torch.device, precision: str, progress, status, data_dir, eval_batch: int,
           fast: bool | None, kernels: bool | None, graphs: bool | None, compile: bool | None,
           streams: ThreadPoolExecutor, draws: ThreadPoolExecutor, called: float | None = None) -> PopulationResult:
    """One population, top to bottom: data, models, program, optimizer, evaluation, step, then the epochs.
    `called`: when train_population was called (its planning before this: the population's first part)."""
    clock = _Clock(device, called)
    status("building")
    first, epochs = pop.first, pop.first.epochs
    task = make_task(pop, data_dir)
    data = _Data(pop, task, device, streams, draws)  # read and drawn on helper threads while the models are built
    first_model, params, buffers = init_population(pop.models, task, device)
    params = {k: v.detach().to(device=device, dtype=torch.float32) for k, v in params.items()}  # plain tensors: no graph
    buffers = {k: v.to(device) for k, v in buffers.items()}
    clock.lap("init")
    program = _Program(pop, task, first_model, buffers, data, device, precision, fast, kernels, compile, eval_batch)
    schedule = pop.shared("lr_schedule")
    total_steps = epochs * data.n_steps
    lr_factors = None if schedule == "constant" else [lr_factor(schedule, i, total_steps) for i in range(total_steps)]
    optimizer = Optimizer.of(pop, params, lr_factors, update=program.choice.optimizer)
    evaluation = _Evaluation(task, program, data, params, buffers)
    recorder = _Recorder(pop, task, data, evaluation, params, buffers)
    augmenter = Augmenter(task, pop.models, data.n_sub, device) if pop.shared("augmentation") else None
    step = _step(program, data, optimizer, recorder, params, buffers, augmenter)
    run_step = _replayed(step, program, augmenter, graphs, data, device)

    # -- the epochs
    gc.freeze()  # what the setup made (the program, the modules its trace imported) is old now too; see _train_threads
    clock.lap("setup")
    if precompile.supported(device) and not program.choice.compile:
        status("compiling kernels")
        ahead = _compile_ahead(program, data, optimizer, evaluation, params, buffers, augmenter)
        program.choice.compiled_ahead = {"kernels": ahead.kernels, "threads": ahead.threads, "failed": ahead.failed,
                                         "processes": ahead.processes,
                                         "seconds": round(ahead.seconds, 3)}  # the compile; the lap: the dry run too
        clock.lap("compile")
    status("first step" + (" (compiling)" if program.choice.compile else ""))
    program.module.train()
    recorder.record(0)
    clock.lap("evaluation")
    bs = data.batch
    capturing = isinstance(run_step, _StepGraph)  # until its first replay: eager warm-up steps, then the capture
    for epoch in range(1, epochs + 1):
        orders = data.orders(epoch, epochs)
        els, which = augmenter.epoch(epoch) if augmenter is not None else (None, None)
        recorder.begin_epoch()
        for s in range(data.n_steps):
            idx = orders[:, s * bs : (s + 1) * bs]
            if augmenter is None:
                run_step(idx)
            else:
                run_step(idx, (els, which[:, s * bs : (s + 1) * bs]))
            if epoch == 1 and s == 0:
                clock.lap("first_step")
                status("training")
            elif capturing and run_step.graph is not None:
                clock.lap("graph_warmup")  # the GRAPH_WARMUP steps after the first: once a population, not its steady state
                capturing = False
        clock.lap("steps")
        recorder.record(epoch)
        clock.lap("evaluation")
        if progress is not None:
            progress(epoch, epochs)

    rows = _model_rows(pop, task, first_model.num_params, recorder.curves, optimizer.state.alive.cpu().tolist())
    result = PopulationResult(models=rows, epochs=list(first.checkpoints), metrics=recorder.checkpoint_metrics,
                              weights=recorder.weights, curves=recorder.curves, timings=clock.totals,
                              program=program.choice.as_dict())
    result.validate()
    return result


class _Data:
    """The population's data on the device: every split resident once, and each model's training subset and its
    order in every epoch as [N, n] index tensors (a step reads x[idx], or the program reads x by row).

    A helper thread (`streams`) reads the splits, then draws the index streams on the CPU from each model's own
    seed, one randperm a model on the `draws` threads (torch releases the GIL), while the caller builds the
    models and the GPU trains the epoch before. A stream reaches the GPU by a copy on a side stream, so the copy
    engine runs it beside the step's kernels and the step loop never waits for it (but once: a CUDA graph's capture
    waits for the draws under way, `settle`)."""

    def __init__(self, pop: PopulationSpec, task: Task, device: torch.device, streams: ThreadPoolExecutor,
                 draws: ThreadPoolExecutor):
        self.task, self.device, self.specs = task, device, pop.models
        self.fraction, self.batch_size = pop.shared("train_fraction"), pop.shared("batch_size")
        self.per_model = task.per_model
        self.keys = _own_data_keys(pop, task)
        self._streams, self._draws = streams, draws
        self._copies = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._splits = streams.submit(self._load)
        self._subsets = streams.submit(self._subsets_of)
        self._orders = streams.submit(self._orders_of, 1)
        self._model_rows = torch.arange(len(self.specs), device=device).unsqueeze(1)
        self._arrived_subsets: Tensor | None = None

    @functools.cached_property
    def splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        """{split: (x, y)} on the device; per-model data has y [N, n, ...]. Waits for the helper's read."""
        return self._splits.result()

    def store_inputs(self, dtype: torch.dtype) -> None:
        """Keep the resident floating-point inputs in `dtype` (the dtype the program's first layers read)."""
        self.splits = {s: (x.to(dtype) if x.is_floating_point() else x, y) for s, (x, y) in self.splits.items()}

    @property
    def n_sub(self) -> int:
        """Training samples a model sees (`subset_size`)."""
        return subset_size(len(self.splits["train"][0]), self.fraction)

    @property
    def batch(self) -> int:
        return min(self.batch_size, self.n_sub)

    @property
    def n_steps(self) -> int:
        return steps_per_epoch(self.n_sub, self.batch_size)

    @property
    def subsets(self) -> Tensor:
        """[N, n_sub]: the training samples each model sees."""
        if self._arrived_subsets is None:
            self._arrived_subsets = self._arrived(self._subsets)
        return self._arrived_subsets

    def orders(self, epoch: int, epochs: int) -> Tensor:
        """[N, n_sub]: the samples each model visits in `epoch`, in order; the next epoch's are drawn meanwhile."""
        orders = torch.gather(self.subsets, 1, self._arrived(self._orders))
        if epoch < epochs:
            self._orders = self._streams.submit(self._orders_of, epoch + 1)
        return orders

    def targets(self, y: Tensor, idx: Tensor) -> Tensor:
        """The targets at indices idx [N, B]: y[idx] when shared, y[model, idx] when each model has its own."""
        return y[idx] if self.per_model is None else y[self._model_rows, idx]

    def _load(self) -> dict[str, tuple[Tensor, Tensor]]:
        if self.per_model is None:
            return {s: tuple(t.to(self.device) for t in self.task.load(s, seed=DATA_SEED)) for s in SPLITS}
        data: dict[str, tuple[Tensor, Tensor]] = {}
        for s in SPLITS:
            xs, ys = self.task.load_models(s, DATA_SEED, self.keys)
            same = next((d for d in data.values() if torch.equal(d[0].cpu(), xs) and torch.equal(d[1].cpu(), ys)), None)
            data[s] = same or (xs.to(self.device), ys.to(self.device))  # identical splits (inr: the full grid) evaluate once
        return data

    def _n_train(self) -> int:
        return len(self._splits.result()["train"][0])

    # the splits' size is read once, before the draws: a failed read then fails once, not in every draw (each
    # re-raise of the one exception would add its frames to the traceback)
    def _subsets_of(self) -> tuple[Tensor, torch.cuda.Event | None]:
        n = self._n_train()
        return self._drawn(lambda m: train_subset(m.factors["seed"], n, self.fraction))

    def _orders_of(self, epoch: int) -> tuple[Tensor, torch.cuda.Event | None]:
        size = subset_size(self._n_train(), self.fraction)
        return self._drawn(lambda m: epoch_order(m.factors["seed"], epoch, size))

    def _drawn(self, draw: Callable[[ModelSpec], Tensor]) -> tuple[Tensor, torch.cuda.Event | None]:
        t = torch.stack(list(self._draws.map(draw, self.specs)))
        if self._copies is None:
            return t.to(self.device), None
        with torch.cuda.stream(self._copies):
            t = t.to(self.device, non_blocking=True)  # from pageable memory: the helper waits, the main stream does not
            return t, self._copies.record_event()

    def settle(self) -> None:
        """Wait for the helper's draws under way: a CUDA graph's capture must overlap no other thread's copy (torch
        refuses a pageable host-to-device copy while a capture is under way, whichever thread asks)."""
        for ahead in (self._subsets, self._orders):
            ahead.result()

    def _arrived(self, ahead) -> Tensor:
        """A drawn stream on the device, once its copy is done (in stream order: the host does not wait)."""
        t, copied = ahead.result()
        if copied is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(copied)
            t.record_stream(main)  # allocated on the copy stream: not reused before the main stream is done with it
        return t


def _own_data_keys(pop: PopulationSpec, task: Task) -> list | None:
    """Each model's key into a per-model task's data (its `per_model` factor); None for a shared data set."""
    if task.per_model is None:
        return None
    if pop.shared("augmentation"):
        raise TrainError(f"augmentation = true is not allowed for task {task.name!r} (one target per model); use false")
    keys = [m.factors.get(task.per_model) for m in pop.models]
    if None in keys:
        raise TrainError(f"task {task.name!r} fits each model to its own data: every model needs the factor {task.per_model!r}")
    return keys


class _Program:
    """What computes a step's gradients and an evaluation's outputs: the population program
    (`zoos.program.choose_program`) where the architecture allows, else vmap of the single-model loss. The other
    pieces call `gradients`, `forward` and `inputs` and never ask which."""

    def __init__(self, pop: PopulationSpec, task: Task, model: torch.nn.Module, buffers: dict[str, Tensor],
                 data: _Data, device: torch.device, precision: str, fast, kernels, compile, eval_batch: int):
        module = template(model)
        self.module, self.task = module, task
        self.autocast = ((lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16))
                         if precision == "bf16" else contextlib.nullcontext)
        self.reg = _per_model([m.factors["equiv_reg"] for m in pop.models], device)
        projections = _projections(model, task) if bool((self.reg > 0).any()) else {}
        self._projections = projections
        penalty = vmap(functools.partial(_regulariser, projections=projections)) if projections else None
        self._prior = prior_view(module)  # a data-dependent penalty (learned canonicalization's prior), if any
        self._vmap_step = vmap(grad_and_value(self._loss, has_aux=True), in_dims=(0, 0, 0, 0, 0), randomness="different")
        self.choice = choose_program(module, task, device, precision, arch=pop.first.arch, fast=fast, kernels=kernels,
                                     compile=compile, dropout=dropout_active(module, buffers), regulariser=penalty)
        self.fast = self.choice.step  # the population program's step, or None for vmap
        self.eval_batch = eval_batch
        if self.fast is not None:
            self._check_rows(len(pop.models), data, eval_batch)
            if self.fast.pop.input_dtype == torch.bfloat16 and data.per_model is None:
                data.store_inputs(torch.bfloat16)  # resident inputs as the first layers read them

    def _check_rows(self, n_models: int, data: _Data, eval_batch: int) -> None:
        """Whether one program holds the population's batch: its largest activation over all models' samples
        must stay within 32-bit indexing; evaluation batches shrink to fit (a power of two: its bucket)."""
        program, bs = self.fast.pop, data.batch
        limit = program.max_rows
        if n_models * (1 << (bs - 1).bit_length()) > limit:  # a compiled step pads its batch to a power of two
            raise TrainError(
                f"population of {n_models} models x batch {bs}: {n_models * bs:,} samples in one program, but its largest "
                f"activation ({program.sample_elements:,} values a sample) allows at most {limit:,} (CUDA indexes a "
                f"tensor with 32-bit offsets); set population_size <= {max(1, limit // bs)}")
        if n_models * eval_batch > limit:
            self.eval_batch = 1 << ((limit // n_models).bit_length() - 1)

    @property
    def reads_rows(self) -> bool:
        """The program reads the resident data set by row index (no [N, B, ...] copy of a batch)."""
        return self.fast is not None

    @property
    def reads_shared_rows(self) -> bool:
        """A batch every model shares is read by row index too (popconv's first layer), not sliced and expanded."""
        return self.fast is not None and self.fast.pop.kernels

    @property
    def not_capturable(self) -> str | None:
        """Why a step cannot be captured as a CUDA graph: vmap, or an op of the program that syncs the host."""
        if self.fast is None:
            return f"it runs as vmap ({self.choice.reason})"
        return self.fast.pop.not_capturable

    def inputs(self, x: Tensor, idx: Tensor) -> tuple[Tensor, Tensor | None]:
        """What `gradients` and `forward` take for the samples idx [N, B] of x: (x, idx) or (x[idx], None)."""
        return (x, idx) if self.reads_rows else (x[idx], None)

    def gradients(self, params, buffers, x: Tensor, y: Tensor, rows: Tensor | None = None):
        """(gradients, per-model total loss, per-model task loss, outputs) of every model on its batch: x [N, B, ...],
        or x the data set read at rows [N, B]."""
        if self.fast is not None:
            grads, loss, total, pred = self.fast.with_outputs(params, buffers, x, y, rows=rows, reg=self.reg)
            return grads, total, loss, pred
        grads, (total, (loss, pred)) = self._vmap_step(params, buffers, x, y, self.reg)
        return grads, total, loss, pred

    def forward(self, params, buffers, x: Tensor, rows: Tensor | None = None, x_per_model: bool = True) -> Tensor:
        """Every model's float32 outputs [N, B, ...] in the module's current mode."""
        with self.autocast():
            if self.fast is not None:
                return self.fast.pop(params, buffers, x, rows=rows, x_per_model=x_per_model, bucket=self.eval_batch).float()
            return population_forward(self.module, params, buffers, x, x_per_model=x_per_model).float()

    def _loss(self, p, b, x, y, r):
        """One model's (total, (task loss, outputs)): what vmap differentiates."""
        with self.autocast():
            pred = functional_call(self.module, (p, b), (x,)).float()
            terms = functional_call(self._prior, (p, b), (x,)).float() if self._prior is not None else None
        loss = self.task.loss(pred, y)
        total = loss + r * _regulariser(p, self._projections) if self._projections else loss
        if terms is not None:
            total = total + self.module.prior_weight * terms.mean()
        return total, (loss, pred.detach())


class _Evaluation:
    """Every model's loss and metric on a split, in eval mode, in batches of `program.eval_batch`."""

    def __init__(self, task: Task, program: _Program, data: _Data, params, buffers):
        self.program, self.data, self.params, self.buffers = program, data, params, buffers
        self.loss = vmap(task.loss, in_dims=(0, 0))
        self.metric = vmap(task.metric, in_dims=(0, 0))
        self.n_models = len(data.specs)

    def _batches(self, split: str, starts: Sequence[int] | None = None
                 ) -> Iterator[tuple[Tensor, Tensor, Tensor | None, bool]]:
        """(x, y, rows, x per model) of each evaluation batch of `split` (those starting at `starts`: all)."""
        data, program, batch = self.data, self.program, self.program.eval_batch
        x, y = data.splits[split]
        own = split == "train" and data.n_sub < len(x)
        for i in range(0, self.size(split), batch) if starts is None else starts:
            rows = None
            if own:
                idx = data.subsets[:, i : i + batch]
                xb, rows = program.inputs(x, idx)
                yb = data.targets(y, idx)
            elif data.per_model is None:
                yb = y[i : i + batch].expand(self.n_models, *y[i : i + batch].shape)
                if program.reads_shared_rows:  # every model reads the same rows of the data set
                    xb, rows = x, torch.arange(i, i + yb.shape[1], device=x.device).expand(self.n_models, -1)
                else:
                    xb = x[i : i + batch]
            else:
                xb, yb = x[i : i + batch], y[:, i : i + batch]
            yield xb, yb, rows, own

    def size(self, split: str) -> int:
        """The samples a model is evaluated on in `split`: its own subset of the train split, else the whole split."""
        n = len(self.data.splits[split][0])
        return self.data.n_sub if split == "train" and self.data.n_sub < n else n

    @torch.no_grad()
    def dry_run(self) -> None:
        """The forward of every split's first and last batch, outputs dropped: the batch shapes an evaluation
        launches (`_compile_ahead`)."""
        self.program.module.eval()
        for split in {id(self.data.splits[s]): s for s in SPLITS}.values():
            n, batch = self.size(split), self.program.eval_batch
            for xb, _, rows, own in self._batches(split, sorted({0, max(0, n - 1) // batch * batch})):
                self.program.forward(self.params, self.buffers, xb, rows=rows, x_per_model=own)
        self.program.module.train()

    @torch.no_grad()
    def __call__(self, split: str) -> tuple[Tensor, Tensor]:
        """([N] loss, [N] metric): the train split over each model's own subset, the others over the whole split;
        a per-model task's metric over all of a model's samples at once (exact for PSNR)."""
        data, program = self.data, self.program
        n = self.size(split)
        loss_sum = torch.zeros(self.n_models, device=data.device)
        metric_sum = torch.zeros(self.n_models, device=data.device)
        preds, ys = [], []
        program.module.eval()
        for xb, yb, rows, own in self._batches(split):
            pred = program.forward(self.params, self.buffers, xb, rows=rows, x_per_model=own)
            if data.per_model is not None:
                preds.append(pred)
                ys.append(yb)
                continue
            k = yb.shape[1]
            loss_sum += self.loss(pred, yb) * k
            metric_sum += self.metric(pred, yb) * k
        program.module.train()
        if data.per_model is not None:
            pred, yb = torch.cat(preds, 1), torch.cat(ys, 1)
            return self.loss(pred, yb), self.metric(pred, yb)
        return loss_sum / n, metric_sum / n


class _Recorder:
    """Curves of every split's loss and metric at epoch 0 and after every epoch, and weights and metrics at the
    checkpoints. With `train_metrics: running`, the train split's are the epoch's own batches (`add_batch`)."""

    def __init__(self, pop: PopulationSpec, task: Task, data: _Data, evaluation: _Evaluation, params, buffers):
        first, n_models = pop.first, len(pop.models)
        self.data, self.evaluation, self.params, self.buffers = data, evaluation, params, buffers
        self.metric_name, self.checkpoints = task.metric_name, list(first.checkpoints)
        self.names = [f"{s}_{what}" for s in SPLITS for what in ("loss", task.metric_name)]
        self.curves = {name: np.full((n_models, first.epochs + 1), np.nan) for name in self.names}
        self.checkpoint_metrics = {name: np.full((n_models, len(self.checkpoints)), np.nan) for name in self.names}
        self.weights: dict[str, np.ndarray] = {}
        self.running = first.train_metrics == "running"
        device = data.device
        self.run_loss, self.run_metric = torch.zeros(n_models, device=device), torch.zeros(n_models, device=device)

    def begin_epoch(self) -> None:
        self.run_loss.zero_()
        self.run_metric.zero_()

    def add_batch(self, loss: Tensor, pred: Tensor, y: Tensor) -> None:
        """Each batch's mean weighted by its size: the epoch's mean over its samples."""
        k = y.shape[1]
        self.run_loss.add_(loss.detach(), alpha=k)
        self.run_metric.add_(self.evaluation.metric(pred, y), alpha=k)

    def record(self, epoch: int) -> None:
        done: dict[int, tuple[Tensor, Tensor]] = {}
        for s in SPLITS:
            key = id(self.data.splits[s])
            if s == "train" and self.running and epoch > 0:
                loss, metric = self.run_loss / self.data.n_sub, self.run_metric / self.data.n_sub
            else:
                loss, metric = done[key] = done[key] if key in done else self.evaluation(s)
            self.curves[f"{s}_loss"][:, epoch] = loss.cpu().numpy()
            self.curves[f"{s}_{self.metric_name}"][:, epoch] = metric.cpu().numpy()
        if epoch in self.checkpoints:
            c = self.checkpoints.index(epoch)
            for name in self.names:
                self.checkpoint_metrics[name][:, c] = self.curves[name][:, epoch]
            for k, v in {**self.params, **self.buffers}.items():
                if k not in self.weights:
                    self.weights[k] = np.zeros((v.shape[0], len(self.checkpoints), *v.shape[1:]), dtype=np.float32)
                self.weights[k][:, c] = v.detach().float().cpu().numpy()


def _step(program: _Program, data: _Data, optimizer: Optimizer, recorder: _Recorder, params, buffers,
          augmenter: Augmenter | None) -> Callable[..., None]:
    """One step of every model on the batches idx [N, B], in place: parameters, optimizer state and the running
    sums. The same code runs eagerly or is replayed as a CUDA graph."""
    x_train, y_train = data.splits["train"]

    def step(idx: Tensor, aug: tuple | None = None) -> None:
        y = data.targets(y_train, idx)
        if aug is None:
            x, rows = program.inputs(x_train, idx)
        else:
            (x, y), rows = augmenter(*aug, x_train[idx], y), None
        grads, total, loss, pred = program.gradients(params, buffers, x, y, rows=rows)
        if recorder.running:
            recorder.add_batch(loss, pred, y)
        optimizer.step(params, grads, total)

    return step


def _compile_ahead(program: _Program, data: _Data, optimizer: Optimizer, evaluation: _Evaluation, params, buffers,
                   augmenter: Augmenter | None) -> precompile.AheadRun:
    """The population's Triton kernels compiled at once, on threads, before its first evaluation and step
    (`zoos.precompile`): a dry run of the forward of each split's evaluation batch shapes, a training step's
    forward and backward and the optimizer's update with every model marked diverged (so it writes nothing),
    under a forked RNG. The population program's kernels only where it runs them and no op of it reads a result on
    the host (the skipped kernels' outputs are whatever memory held: eigh may fail on them); the optimizer's where
    it is popoptim."""
    device = data.device
    kernels = program.fast is not None and program.fast.pop.kernels and program.not_capturable is None
    with torch.random.fork_rng(devices=[device.index]), precompile.ahead(device) as run:
        grads = total = None
        if kernels:
            evaluation.dry_run()
            x_train, y_train = data.splits["train"]
            idx = torch.zeros(len(data.specs), data.batch, dtype=torch.long, device=device)
            x, rows = program.inputs(x_train, idx) if augmenter is None else (x_train[idx], None)
            grads, total, _, _ = program.gradients(params, buffers, x, data.targets(y_train, idx), rows=rows)
        if program.choice.optimizer == "popoptim":
            if grads is None:
                grads, total = {k: torch.zeros_like(v) for k, v in params.items()}, torch.zeros_like(optimizer.lr)
            optimizer.dry_step(params, grads, total)
    return run


def _replayed(step: Callable[..., None], program: _Program, augmenter: Augmenter | None, graphs: bool | None,
              data: _Data, device: torch.device) -> Callable[..., None]:
    """`step` replayed as a CUDA graph where it can be (`graphs` None: wherever it can), else `step` itself."""
    why_not = [r for r in (f"the device is {device.type}" if device.type != "cuda" else None, program.not_capturable,
                           "augmentation changes a step's group elements every epoch" if augmenter is not None else None) if r]
    if graphs and why_not:
        raise TrainError("graphs = true needs a CUDA device, a population program with no op that syncs the host and "
                         f"no augmentation; here {'; '.join(why_not)}")
    use = not why_not if graphs is None else graphs
    program.choice.graphs = bool(use)
    return _StepGraph(step, (len(data.specs), data.batch), device, before_capture=data.settle) if use else step


def learned_models(task: Task, curves: dict[str, np.ndarray]) -> np.ndarray:
    """[N] whether each model learned: its final training loss below LEARNED x its loss at init, or, for a metric
    where higher is better, its final training metric at least twice its initial one and LEARNED_METRIC above it
    (a classifier's cross-entropy falls slowly while its accuracy rises from chance: one short epoch can take
    accuracy from 0.1 to 0.5 with the loss down 4%)."""
    start, end = curves["train_loss"][:, 0], curves["train_loss"][:, -1]
    learned = end < LEARNED * start
    metric = curves.get(f"train_{task.metric_name}")
    if metric is not None and task.higher_is_better:
        first, last = metric[:, 0], metric[:, -1]
        learned |= last >= first + np.maximum(LEARNED_METRIC, first)
    return learned


def _model_rows(pop: PopulationSpec, task: Task, n_params: int, curves: dict[str, np.ndarray], alive: list[bool]) -> list[dict]:
    """Every model's row of the zoo's model table: its spec, status, final metrics and size."""
    per_model = task.per_model
    start, end = curves["train_loss"][:, 0], curves["train_loss"][:, -1]
    exploded = (end > DIVERGED * np.maximum(start, 1e-12)).tolist()  # finite, but far above where it began
    learned = np.asarray(alive, dtype=bool) & learned_models(task, curves)
    # per-model data: each row's task_config names its own data, plus the task's columns (inr: split, label)
    specs = pop.models
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
            "status": "ok" if alive[i] and not exploded[i] else "diverged",
            "learned": bool(learned[i]),
            **{name: float(values[i, -1]) for name, values in curves.items()},
            "n_params": n_params,
            "epochs": m.epochs,
            "train_metrics": m.train_metrics,
        })
    return rows


class _Clock:
    """Wall time by phase; on a GPU each lap first waits for the queued kernels (a few syncs a population)."""

    def __init__(self, device: torch.device, called: float | None = None):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.t = time.perf_counter()
        self.start = self.t if called is None else called
        self.totals: dict[str, float] = {} if called is None else {"plan": self.t - called}  # the memory plan, the split

    def lap(self, phase: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self.t
        self.t = now
        if phase == "first_step":  # seconds from the call to the end of the first step: what a user waits for
            self.totals["first_step_at"] = now - self.start


class OptimizerState(NamedTuple):
    """Every model's optimizer state, stacked like the parameters; a step updates every tensor in place."""

    first: dict[str, Tensor]  # SGD's momentum buffer / Adam's first moment
    second: dict[str, Tensor]  # Adam's second moment ({} for SGD)
    weight_decay: Tensor  # [N]
    momentum: Tensor  # [N]: SGD's momentum, Adam's beta1
    count: Tensor  # 0-d float64: steps taken (a tensor, so a compiled update is one program for every step)
    alive: Tensor  # [N] bool: False once a model's loss or parameters became non-finite (frozen from then on)


class Optimizer:
    """SGD or AdamW for every model of a population at once, with each model's own lr, weight decay and momentum
    (the semantics in the module docstring), and the divergence check. `step(params, grads, total)` updates the
    parameters and the state in place; `lr_factors` are the schedule's multipliers, one per step. `update` is how
    it runs (`zoos.program.Program.optimizer`): "eager" torch ops, one "compiled" program or "popoptim"'s kernels."""

    def __init__(self, kind: str, params: dict[str, Tensor], lr: Tensor, weight_decay: Tensor, momentum: Tensor,
                 lr_factors: list[float] | None = None, *, update: str = "eager"):
        device = lr.device
        self.kind, self.lr = kind, lr
        self.lr_factors = None if lr_factors is None else torch.tensor(lr_factors, device=device, dtype=lr.dtype)
        self.state = OptimizerState(
            first={k: torch.zeros_like(v) for k, v in params.items()},
            second={k: torch.zeros_like(v) for k, v in params.items()} if kind == "adam" else {},
            weight_decay=weight_decay, momentum=momentum,
            count=torch.zeros((), dtype=torch.float64, device=device),
            alive=torch.ones(len(lr), dtype=torch.bool, device=device))
        updates = {"eager": _update_in_place, "popoptim": _fused_update}
        self._apply = _compiled_update(kind) if update == "compiled" else functools.partial(updates[update], kind)

    @classmethod
    def of(cls, pop: PopulationSpec, params: dict[str, Tensor], lr_factors: list[float] | None = None, *,
           update: str = "eager") -> Optimizer:
        """The population's optimizer, each model's hyperparameters from its factors."""
        device = next(iter(params.values())).device
        lr, wd, mom = (_per_model([m.factors[k] for m in pop.models], device) for k in ("lr", "weight_decay", "momentum"))
        return cls(pop.shared("optimizer"), params, lr, wd, mom, lr_factors, update=update)

    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor], total: Tensor) -> None:
        """One update of every model from its gradients; `total` [N] is the loss the gradients are of."""
        lr = self.lr if self.lr_factors is None else self.lr * self.lr_factors.index_select(0, self.state.count.long().view(1))
        self.state.count.add_(1)  # the schedule reads the count before the step, the bias corrections after
        self._apply(params, grads, self.state, lr, total)

    def dry_step(self, params: dict[str, Tensor], grads: dict[str, Tensor], total: Tensor) -> None:
        """The update's launches with every model marked diverged, so nothing is written and the state stays as it
        was (`_compile_ahead`'s dry run)."""
        state = self.state._replace(alive=torch.zeros_like(self.state.alive), count=self.state.count + 1)
        self._apply(params, grads, state, self.lr, total)


def _update(kind: str, params: dict[str, Tensor], grads: dict[str, Tensor], state: OptimizerState, lr: Tensor,
            total: Tensor) -> tuple[dict[str, Tensor], OptimizerState]:
    """One optimizer step of every model, then the divergence check: a model whose loss or new parameters are not
    finite keeps its last finite state from now on. `state.count` is the 1-based count of this step (a 0-d
    float64 tensor). Returns the new parameters and state (the inputs are not written)."""
    if kind == "sgd":
        new_p, first = _sgd(params, grads, state.first, lr, state.weight_decay, state.momentum)
        second = {}
    else:
        new_p, first, second = _adamw(params, grads, state.first, state.second, lr, state.weight_decay,
                                      state.momentum, state.count)
    alive = state.alive & torch.isfinite(total) & _all_finite(new_p)

    def keep(new: dict[str, Tensor], old: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: torch.where(_bcast(alive, v), v, old[k]) for k, v in new.items()}

    return keep(new_p, params), state._replace(first=keep(first, state.first), second=keep(second, state.second),
                                               alive=alive)


def _update_in_place(kind: str, params: dict[str, Tensor], grads: dict[str, Tensor], state: OptimizerState,
                     lr: Tensor, total: Tensor) -> None:
    """`_update` written back into params and state (the tensors a captured step reads)."""
    new_p, new = _update(kind, params, grads, state, lr, total)
    for old, fresh in ((params, new_p), (state.first, new.first), (state.second, new.second)):
        for k, v in fresh.items():
            old[k].copy_(v)
    state.alive.copy_(new.alive)


def _fused_update(kind: str, params: dict[str, Tensor], grads: dict[str, Tensor], state: OptimizerState,
                  lr: Tensor, total: Tensor) -> None:
    """`_update_in_place` as popoptim's two Triton launches over all the parameter tensors."""
    popoptim.step_(kind, params, grads, state.first, state.second, lr, state.weight_decay, state.momentum,
                   state.count, state.alive, total, beta2=ADAM_BETA2, eps=ADAM_EPS)


_COMPILED_UPDATES: dict[str, Callable] = {}


def _compiled_update(kind: str) -> Callable:
    """`_update_in_place` for `kind` as one compiled program (a handful of fused kernels that write the new values
    in place instead of ~15 small ones per parameter tensor), shared by every population of the process."""
    if kind not in _COMPILED_UPDATES:
        _COMPILED_UPDATES[kind] = torch.compile(functools.partial(_update_in_place, kind))
    return _COMPILED_UPDATES[kind]


class _StepGraph:
    """A training step (`step(idx)`, which updates its tensors in place) replayed as one CUDA graph.

    A step is ~100 kernel launches; a replay is one. The first GRAPH_WARMUP calls run eagerly
    on a side stream (compiles, autotuning, the window table: nothing that allocates or loads code may run
    inside a capture), the next is captured and every later one replays it after copying its indices into
    the captured index tensor. A batch of another shape (an epoch's short last batch) runs eagerly; the
    eager and replayed steps compute the same kernels on the same tensors, so either order is the same run.
    """


    def __init__(self, step: Callable[[Tensor], None], idx_shape: tuple[int, int], device: torch.device,
                 before_capture: Callable[[], None] = lambda: None):
        self.step, self.device, self.before_capture = step, device, before_capture
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
            if self.eager_calls < GRAPH_WARMUP:
                side, main = torch.cuda.Stream(), torch.cuda.current_stream()
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    self.step(self.idx)
                main.wait_stream(side)
                self.eager_calls += 1
                return
            self.before_capture()  # no helper's copy during the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
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
    return new_p, new_b


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
