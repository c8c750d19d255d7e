"""A model's random streams and its initial weights, built or replayed from its seed.

Every model draws from its own streams, each seeded by `stream_seed(seed, salt)`: its init, its training
subset, its data order and its augmentation per epoch, so no two ever share one. `init_model` builds one
model from its init stream; `init_population` gives every model of a population the weights `init_model`
would, replaying the layers' draws on one copy where the architecture allows it (the trainer's setup).
"""

from __future__ import annotations

import contextlib
import copy
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Sequence

from tasks.base import MODEL_STRIDE, mix_seed

if TYPE_CHECKING:
    from zoos.spec import ModelSpec


# Salts of the per-model random streams: init, training subset, data order and augmentation per epoch.
INIT_STREAM, SUBSET_STREAM, ORDER_STREAM, AUGMENT_STREAM = 1, 2, 1_000, 1_000_000
DRAWS_A_THREAD = 1 << 24  # a population's init replays on one more thread for every this many weights it draws


def stream_seed(seed: int, salt: int) -> int:
    """The seed of one of a model's random streams, so init, data order and augmentation never share one."""
    return mix_seed(seed, salt, MODEL_STRIDE)


def init_model(arch: str, arch_config: dict[str, Any], factors: dict[str, Any], task: Any) -> Any:
    """Build and initialise one model from its own seed: the same factors always give the same weights."""
    from zoos.archs.base import build_arch

    return _seeded_init(factors, lambda: build_arch(arch, task, **arch_config))


def _seeded_init(factors: dict[str, Any], draw: Callable[[], Any], own_generator: bool = False) -> Any:
    """draw() (a model it builds or redraws) from the model's init stream, then `reinit` with factors["init"]: the
    stream seeds the default CPU generator, or with `own_generator` one of draw's own (`_draws_from`)."""
    import torch

    from zoos.archs.base import reinit

    s = stream_seed(factors["seed"], INIT_STREAM)
    with contextlib.ExitStack() as scope:
        if own_generator:
            scope.enter_context(_draws_from(torch.Generator().manual_seed(s)))
        else:
            # layers' own default init draws from the CPU generator: seed that one alone (torch.manual_seed would
            # also reseed every CUDA generator, which fork_rng(devices=[]) does not restore, and is slower)
            scope.enter_context(torch.random.fork_rng(devices=[]))
            torch.default_generator.manual_seed(s)
        model = draw()
    reinit(model, factors["init"], generator=torch.Generator().manual_seed(s))
    return model


def init_population(models: Sequence[ModelSpec], task: Any, device: Any = None) -> tuple[Any, dict, dict]:
    """Every model of a population as `init_model` builds it: (the first model, stacked params, stacked buffers).

    Building a module per model is most of a large population's setup on a GPU (benchmarks/HISTORY.md), but its
    weights are only the draws of its `reset_parameters()` (`archs.base.init_resets`), in order, from the
    model's seeded generator, then `reinit`. Where that holds for this architecture (checked: the first two
    models are built and a replay of their draws on a copy must give both, parameters and buffers, to the bit)
    and every model has the same arch config, the other models are replays; a population with many weights to
    draw replays on several threads, a copy each, each model drawing from its own generator (`_draws_from`).
    Elsewhere (an architecture drawing outside its resets, or there with a draw that takes no generator;
    per-model configs such as dropout) every model is built.

    device: where the replays' stacked tensors are made (None: the CPU). On a CUDA device each replay draws into
    pinned memory and copies its model to its rows there as the other threads draw: no stacked copy on the host
    (a ResNet-18 population's is gigabytes) and no second pass to move it. Built models stay on the CPU."""
    import torch

    from zoos.functional import stack_states

    built = [init_model(m.arch, m.arch_config, m.factors, task) for m in models[:2]]
    same_config = all(m.arch_config == models[0].arch_config for m in models)
    draws = len(models) * sum(v.numel() for v in _tensors(built[0]).values())
    workers = max(1, min(torch.get_num_threads(), draws // DRAWS_A_THREAD, 16))
    pinned = device is not None and torch.device(device).type == "cuda"
    replay = _Replay(built[0], own_generator=workers > 1, pinned=pinned)
    if len(models) <= 2 or not same_config or not all(replay.same(replay.draw(m), b) for m, b in zip(models, built)):
        rest = [init_model(m.arch, m.arch_config, m.factors, task) for m in models[2:]]
        params, buffers = stack_states(built + rest)
        return built[0], params, buffers
    params, buffers = ({k: v.new_empty((len(models), *v.shape), device=device) for k, v in d.items()}
                       for d in (dict(built[0].named_parameters()), dict(built[0].named_buffers())))
    rows = {**params, **buffers}

    def fill(replay: _Replay | None, indices: range) -> None:
        replay = replay or _Replay(built[0], own_generator=True, pinned=pinned)  # a thread's own, made there
        with torch.no_grad():  # the replay's parameters require grad: copies of them must not join a graph
            for i in indices:
                for k, v in (_tensors(built[i]) if i < 2 else replay.draw(models[i])).items():
                    rows[k][i].copy_(v)  # to a device: from pinned memory, done before the next draw overwrites it

    if workers == 1:
        fill(replay, range(len(models)))
    else:  # the draws release the GIL: one replay a thread, each model's draws from its own generator
        chunks = [range(len(models))[w::workers] for w in range(workers)]
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, [replay] + [None] * (len(chunks) - 1), chunks))
    return built[0], params, buffers


def _draws_from(generator: Any) -> Any:
    """A mode within which this thread's random ops that would draw from the default CPU generator draw from
    `generator`: seeded alike, the two give the same draws, and threads with one each draw at once. An op that
    takes no generator still draws from the default one, which `init_population`'s check of the replay catches."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    def takes_generator(op: Any) -> bool:
        return any(a.name == "generator" for a in op._schema.arguments)

    class DrawsFrom(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if torch.Tag.nondeterministic_seeded in func.tags and kwargs.get("generator") is None:
                if not takes_generator(func):  # randn(size) and the like: their overload that takes one
                    func = getattr(func.overloadpacket, "generator", func)
                if takes_generator(func):
                    kwargs = {**kwargs, "generator": generator}
            return func(*args, **kwargs)

    return DrawsFrom()


class _Replay:
    """A copy of a built model whose weights are redrawn in place for another model's seed (its layers' resets),
    from the default CPU generator, or with `own_generator` from one of its own (`_draws_from`: a thread's); with
    `pinned`, its tensors in page-locked memory (copies from there to a GPU run at the link's speed)."""

    def __init__(self, model: Any, own_generator: bool, pinned: bool = False):
        from zoos.archs.base import init_resets

        self.model = copy.deepcopy(model)
        if pinned:
            for t in _tensors(self.model).values():
                t.data = t.data.pin_memory()
        self.resets = init_resets(self.model)
        self.live = _tensors(self.model)  # the copy's own tensors: every draw is in place
        self.own_generator = own_generator

    def draw(self, m: ModelSpec) -> dict:
        """The copy's tensors, redrawn as `init_model` draws them for m."""
        _seeded_init(m.factors, self._reset, self.own_generator)
        return self.live

    def _reset(self) -> Any:
        import torch

        with torch.no_grad():
            for reset in self.resets:
                reset()
        return self.model

    def same(self, state: dict, model: Any) -> bool:
        import torch

        ref = _tensors(model)
        return state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)


def _tensors(model: Any) -> dict:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}
