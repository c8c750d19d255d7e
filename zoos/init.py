"""A model's random streams and its initial weights, built or replayed from its seed.

Every model draws from its own streams, each seeded by `stream_seed(seed, salt)`: its init, its training
subset, its data order and its augmentation per epoch, so no two ever share one. `init_model` builds one
model from its init stream; `init_population` gives every model of a population the weights `init_model`
would, replaying the layers' draws on one copy where the architecture allows it (the trainer's setup).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable, Sequence

from tasks.base import MODEL_STRIDE, mix_seed

if TYPE_CHECKING:
    from zoos.spec import ModelSpec


# Salts of the per-model random streams: init, training subset, data order and augmentation per epoch.
INIT_STREAM, SUBSET_STREAM, ORDER_STREAM, AUGMENT_STREAM = 1, 2, 1_000, 1_000_000


def stream_seed(seed: int, salt: int) -> int:
    """The seed of one of a model's random streams, so init, data order and augmentation never share one."""
    return mix_seed(seed, salt, MODEL_STRIDE)


def init_model(arch: str, arch_config: dict[str, Any], factors: dict[str, Any], task: Any) -> Any:
    """Build and initialise one model from its own seed: the same factors always give the same weights."""
    from zoos.archs.base import build_arch

    return _seeded_init(factors, lambda: build_arch(arch, task, **arch_config))


def _seeded_init(factors: dict[str, Any], draw: Callable[[], Any]) -> Any:
    """draw() (a model it builds or redraws) from the model's init stream, then `reinit` with factors["init"]."""
    import torch

    from zoos.archs.base import reinit

    s = stream_seed(factors["seed"], INIT_STREAM)
    with torch.random.fork_rng(devices=[]):
        # layers' own default init draws from the CPU generator: seed that one alone (torch.manual_seed would
        # also reseed every CUDA generator, which fork_rng(devices=[]) does not restore, and is slower)
        torch.default_generator.manual_seed(s)
        model = draw()
    reinit(model, factors["init"], generator=torch.Generator().manual_seed(s))
    return model


def init_population(models: Sequence[ModelSpec], task: Any) -> tuple[Any, dict, dict]:
    """Every model of a population as `init_model` builds it: (the first model, stacked params, stacked buffers).

    Building a module per model is most of a large population's setup on a GPU (benchmarks/HISTORY.md), but its
    weights are only the draws of its `reset_parameters()` (`archs.base.init_resets`), in order, from the
    model's seeded generator, then `reinit`. Where that holds for this architecture (checked: the first two
    models are built and a replay of their draws on a copy must give both, parameters and buffers, to the bit)
    and every model has the same arch config, the other models are replays on that copy. Elsewhere (an
    architecture drawing outside its resets; per-model configs such as dropout) every model is built."""
    import torch

    from zoos.archs.base import init_resets
    from zoos.functional import stack_states

    built = [init_model(m.arch, m.arch_config, m.factors, task) for m in models[:2]]
    replay = copy.deepcopy(built[0])
    same_config = all(m.arch_config == models[0].arch_config for m in models)
    resets = init_resets(replay)

    def tensors(model: Any) -> dict:
        return {**dict(model.named_parameters()), **dict(model.named_buffers())}

    live = tensors(replay)  # the replay's own tensors: every draw is in place

    def redraw() -> Any:
        with torch.no_grad():
            for reset in resets:
                reset()
        return replay

    def replayed(m: ModelSpec) -> dict:
        _seeded_init(m.factors, redraw)
        return live

    def same(state: dict, model: Any) -> bool:
        ref = tensors(model)
        return state.keys() == ref.keys() and all(torch.equal(state[k], ref[k]) for k in ref)

    if len(models) <= 2 or not same_config or not all(same(replayed(m), b) for m, b in zip(models, built)):
        rest = [init_model(m.arch, m.arch_config, m.factors, task) for m in models[2:]]
        params, buffers = stack_states(built + rest)
        return built[0], params, buffers
    params, buffers = stack_states(built)
    params, buffers = ({k: torch.cat([v, v.new_empty((len(models) - 2, *v.shape[1:]))]) for k, v in d.items()}
                       for d in (params, buffers))
    with torch.no_grad():  # the replay's parameters require grad: copies of them must not join a graph
        for i, m in enumerate(models[2:], 2):
            state = replayed(m)
            for k, v in (*params.items(), *buffers.items()):
                v[i] = state[k]
    return built[0], params, buffers
