"""The program choice over every registered architecture: the population program it picks equals vmap
(forward, gradients with and without the equivariance regulariser, two epochs of training) on the CPU,
and a module it cannot run is named with the layer and the reason, then trained by vmap."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from tasks import get_task
from tasks.formats import write_cifar_batch, write_idx
from tasks.images import IDX_FILES
from tests.zoos.test_archs import CASES, IDS, _randomise, training_without_dropout
from tests.zoos.test_trainer import one_population, zoo_models
from zoos import popconv
from zoos.archs import build_arch
from zoos.fastpop import FastPopulation, FastStep, prior_view
from zoos.functional import population_forward, stack_states, template
from zoos.program import FallbackWarning, choose_program
from zoos.trainer import train_population

KERNELS = popconv.available("cpu")  # Triton's interpreter here: the program a GPU runs, popconv included


def _population(arch, task_name, opts, config, n=3):
    torch.manual_seed(0)
    task = get_task(task_name, **opts)
    models = [build_arch(arch, task, **config) for _ in range(n)]
    for m in models:
        _randomise(m)
    params, buffers = stack_states(models)
    return task, template(models[0]), params, buffers


def _targets(task, n: int, b: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    if task.kind == "classification":
        return torch.randint(0, task.output_shape[-1] if task.output_shape else 10, (n, b), generator=g)
    return torch.randn(n, b, *task.output_shape, generator=g)


@pytest.mark.parametrize("arch,task_name,opts,config,which", CASES, ids=IDS)
def test_every_architecture_runs_the_population_program_and_equals_vmap(arch, task_name, opts, config, which):
    task, module, params, buffers = _population(arch, task_name, opts, config)
    program = choose_program(module, task, "cpu", fast=True, kernels=KERNELS, compile=False, dropout=False, arch=arch)
    assert program.fast, f"{arch}: {program.reason}"
    assert program.layers and all(len(layer) == 3 for layer in program.layers)
    x = torch.randn(3, 4, *task.input_shape, generator=torch.Generator().manual_seed(1))
    y = _targets(task, 3, 4)
    with torch.no_grad():
        ref = population_forward(module.eval(), params, buffers, x, x_per_model=True)
        out = program.step.pop(params, buffers, x, x_per_model=True)
    torch.testing.assert_close(out, ref, atol=1e-5 * (1 + ref.abs().max().item()), rtol=1e-4)

    def one(p, b, xb, yb):
        return task.loss(functional_call(module, (p, b), (xb,)), yb)

    training_without_dropout(module)  # a training step's gradients, dropout off as the program was chosen
    want = vmap(grad(one))(params, buffers, x, y)
    steps = [program.step]
    if any(p == "grouped conv" for _, p, _ in program.layers):  # the CPU's grouped convs; im2col runs them elsewhere
        steps.append(FastStep(module, task.loss, task.input_shape, dropout=False, grouped_convs=False))
        assert not any(p == "grouped conv" for _, p, _ in steps[-1].pop.choices)
        with torch.no_grad():
            torch.testing.assert_close(steps[-1].pop(params, buffers, x), ref, atol=1e-5 * (1 + ref.abs().max().item()), rtol=1e-4)
    for step in steps:
        grads, loss = step(params, buffers, x, y)
        for k in want:
            scale = want[k].abs().max().item()
            torch.testing.assert_close(grads[k], want[k], atol=1e-5 * (1 + scale), rtol=1e-3, msg=lambda m: f"{arch} {k}: {m}")


def test_the_cpu_runs_the_population_program_by_default_with_grouped_convs():
    """Off CUDA the choice is the population program too: a conv with a one-channel input (9-long patches) as
    im2col + bmm, the wider ones as grouped convolutions, each with its reason; `fast=False` still gives vmap."""
    task, module, _, _ = _population("cnn", "digits", {}, dict(width=8, depth=3))
    program = choose_program(module, task, "cpu", arch="cnn")
    assert program.fast and not program.kernels and program.device == "cpu"
    convs = [(layer, p, why) for layer, p, why in program.layers if layer.startswith("convs.")]
    assert [p for _, p, _ in convs] == ["im2col + bmm", "grouped conv", "grouped conv"], convs
    assert "9-long patches" in convs[0][2]
    assert program.describe().startswith("2 grouped conv, 1 im2col + bmm")
    vm = choose_program(module, task, "cpu", fast=False)
    assert not vm.fast and vm.reason == "asked for"


def test_the_regulariser_enters_the_population_step_as_in_vmap():
    """An equivariance-regularised zoo trains on the population program: model i's gradient is that of
    loss_i + r_i * ||W_i - P(W_i)||^2."""
    from zoos.equivariance import projections, regulariser

    task, module, params, buffers = _population("cnn", "digits", {}, dict(width=4, depth=2))
    proj = projections(build_arch("cnn", task, width=4, depth=2), task.group, tuple(task.input_shape))
    penalty = vmap(lambda p: regulariser(p, proj))
    program = choose_program(module, task, "cpu", fast=True, kernels=False, dropout=False, regulariser=penalty)
    x, y, r = torch.randn(3, 5, *task.input_shape), _targets(task, 3, 5), torch.tensor([0.0, 0.5, 2.0])
    grads, loss, total, _ = program.step.with_outputs(params, buffers, x, y, reg=r)

    def one(p, b, xb, yb, rb):
        return task.loss(functional_call(module, (p, b), (xb,)), yb) + rb * regulariser(p, proj)

    want = vmap(grad(one), randomness="different")(params, buffers, x, y, r)  # dropout rates are 0: no draw counts
    for k in want:
        torch.testing.assert_close(grads[k], want[k], atol=1e-6, rtol=1e-4)
    assert (total - loss)[0] == 0 and ((total - loss)[1:] > 0).all()


@pytest.mark.parametrize("arch,task_name,config", [("canon_cnn", "digits", dict(width=3, backbone_config=dict(width=4, depth=2))),
                                                    ("canon_mlp", "inertia", dict(width=8, canon_width=4))])
def test_the_canonicalization_prior_enters_the_population_step_as_in_vmap(arch, task_name, config):
    """prior_weight > 0: model i's gradient is that of loss_i + prior_weight * mean_b prior_terms_b, on the
    population program (the prior traced as a second program, kernels too) as in vmap; 0 adds nothing."""
    task, module, params, buffers = _population(arch, task_name, {}, dict(config, prior_weight=0.7))
    program = choose_program(module, task, "cpu", fast=True, kernels=KERNELS, dropout=False, arch=arch)
    assert program.fast and program.step.prior is not None, program.reason
    x, y = torch.randn(3, 4, *task.input_shape, generator=torch.Generator().manual_seed(3)), _targets(task, 3, 4)
    grads, loss, total, _ = program.step.with_outputs(params, buffers, x, y)

    prior = prior_view(module)

    def one(p, b, xb, yb):
        return task.loss(functional_call(module, (p, b), (xb,)), yb) + 0.7 * functional_call(prior, (p, b), (xb,)).mean()

    training_without_dropout(module)
    want = vmap(grad(one))(params, buffers, x, y)
    for k in want:
        scale = want[k].abs().max().item()
        torch.testing.assert_close(grads[k], want[k], atol=1e-5 * (1 + scale), rtol=1e-3, msg=lambda m: f"{arch} {k}: {m}")
    assert ((total - loss) > 0).all()
    plain = build_arch(arch, task, **config)  # prior_weight 0: no prior program, nothing added
    assert prior_view(plain) is None
    assert choose_program(template(plain), task, "cpu", fast=True, kernels=False, dropout=False).step.prior is None


def _mnist_files(root) -> dict:
    """A small MNIST in its published IDX layout (for cnn_s, whose valid convs need 28x28)."""
    g = np.random.default_rng(0)
    (root / "mnist").mkdir()
    arrays = [g.integers(0, 256, (96, 28, 28), dtype=np.uint8), g.integers(0, 10, 96, dtype=np.uint8),
              g.integers(0, 256, (32, 28, 28), dtype=np.uint8), g.integers(0, 10, 32, dtype=np.uint8)]
    for name, a in zip(IDX_FILES, arrays):
        write_idx(root / "mnist" / name, a)
    return {"data_dir": str(root), "n_val": 32}


def _cifar10_files(root) -> dict:
    """A small CIFAR-10 in its published python-batch layout (for the published zoos' 3-channel networks)."""
    g = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for name, n in [(f"data_batch_{i}", 24) for i in range(1, 6)] + [("test_batch", 32)]:
        write_cifar_batch(folder / name, g.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), g.integers(0, 10, n))
    return {"data_dir": str(root), "n_val": 32}


@pytest.mark.slow
@pytest.mark.parametrize("arch,task_name,opts,config,which", CASES, ids=IDS)
def test_two_epochs_on_the_population_program_equal_vmap_training(arch, task_name, opts, config, which, tmp_path):
    """The trainer on the population program (the CPU's: grouped convs, im2col for the shortest patches; the
    kernels are held to vmap above and in test_popconv) and on vmap: same init, data order and Adam; weights and
    curves agree after 2 epochs."""
    pop = _case_population(arch, task_name, opts, config, tmp_path)
    fast = train_population(pop, fast=True, kernels=False)
    plain = train_population(pop, fast=False)
    assert fast.program["fast"] and not plain.program["fast"], fast.program["reason"]
    for k in plain.weights:
        scale = np.abs(plain.weights[k]).max()
        np.testing.assert_allclose(fast.weights[k], plain.weights[k], atol=1e-4 * (1 + scale), rtol=1e-3, err_msg=f"{arch} {k}")
    for name in plain.curves:
        np.testing.assert_allclose(fast.curves[name], plain.curves[name], atol=1e-4, rtol=1e-3, err_msg=f"{arch} {name}")


def test_the_trainer_adds_the_prior_on_either_program(tmp_path):
    """A canon_mlp zoo with prior_weight > 0 trains to the same weights on the population program and on vmap,
    and to other weights than without the prior: the factor is trained, not only recorded."""
    config = dict(width=16, canon_width=8)  # the registry case (at width 8 the two programs drift apart even without a prior)
    with_prior = _case_population("canon_mlp", "inertia", {}, dict(config, prior_weight=0.5), tmp_path)
    fast = train_population(with_prior, fast=True, kernels=False)
    plain = train_population(with_prior, fast=False)
    without = train_population(_case_population("canon_mlp", "inertia", {}, config, tmp_path), fast=True, kernels=False)
    canon = [k for k in plain.weights if k.startswith("canon.")]
    for k in plain.weights:
        np.testing.assert_allclose(fast.weights[k], plain.weights[k], atol=1e-4, rtol=1e-3, err_msg=k)
    assert any(not np.allclose(plain.weights[k][:, -1], without.weights[k][:, -1]) for k in canon)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("arch,task_name,opts,config,which", CASES, ids=IDS)
def test_every_eager_program_replays_as_a_cuda_graph(arch, task_name, opts, config, which, tmp_path):
    """Uncompiled, every architecture's training step is captured and replayed as a CUDA graph (no host
    copy inside a step: its constants are made once; only an op that syncs the host keeps a step eager) and
    trains exactly as the same steps run eagerly."""
    pop = _case_population(arch, task_name, opts, config, tmp_path)
    graphed = train_population(pop, device="cuda", precision="bf16", compile=False)
    eager = train_population(pop, device="cuda", precision="bf16", compile=False, graphs=False)
    assert graphed.program["fast"] and not graphed.program["compile"]
    syncs = arch == "frame_avg"  # eigh reads its solver's status on the host: its steps run eagerly
    assert graphed.program["graphs"] is not syncs and not eager.program["graphs"]
    for k in eager.weights:
        np.testing.assert_array_equal(graphed.weights[k], eager.weights[k], err_msg=f"{arch} {k}")


def test_an_eager_program_makes_its_constant_tensors_once():
    """Index lists and `torch.tensor(...)` constants in a forward become tensors made at the first call and
    reused (the same objects) by every later one; the outputs do not change."""
    task, module, params, buffers = _population("scalar_mlp", "o5_regression", {}, {})
    pop = FastPopulation(module, task.input_shape)
    assert any(getattr(n.target, "__name__", "").startswith("constant_") for n in pop.graph_module.graph.nodes)
    x = torch.randn(3, 4, *task.input_shape)
    first = pop(params, buffers, x)
    made = dict(pop.constants.made)
    assert made and pop(params, buffers, x).equal(first)
    assert pop.constants.made.keys() == made.keys() and all(pop.constants.made[k] is v for k, v in made.items())
    assert FastPopulation(module, task.input_shape, compile=True).constants is None  # a compiled program folds them


def _case_population(arch, task_name, opts, config, tmp_path):
    """Two models of a registry case on small data in its published layout, dropout off (programs draw masks differently)."""
    options = dict(opts)
    config = {**config, "dropout": 0.0} if config.get("dropout") else config  # the two programs draw masks differently
    if task_name == "mnist":
        options.update(_mnist_files(tmp_path))
    elif task_name == "cifar10":
        options.update(_cifar10_files(tmp_path))
    elif task_name != "inr":
        options.update({"n_train": 96, "n_val": 32, "n_test": 32})
    grid = {"seed": [0, 1], "lr": [3e-3], "optimizer": ["adam"], "batch_size": [32]}
    if task_name == "inr":
        grid["image"] = [0, 1]
    models = zoo_models(grid, arch={"name": arch, "config": config}, task=task_name, task_options=options)
    return one_population(models)


class _BatchMean(nn.Module):
    """Centres each sample on the batch mean: not per sample, so not a population program."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x - x.mean(0))


class _Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x.transpose(0, 1)).transpose(0, 1)


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x) if x.sum() > 0 else -self.lin(x)


@pytest.mark.parametrize("module,shape,reason", [
    (_BatchMean(), (4,), r"mean \(test_program\.py:{line}\) reduces over the batch"),
    (_Transposed(), (4, 3), r"transpose \(test_program\.py:{line}\) moves the batch axis off the front"),
    (_Branchy(), (4,), "torch.fx cannot trace its forward .*control flow"),
])
def test_what_the_population_program_cannot_run_is_named(module, shape, reason):
    """The op, the line of the forward it is on (its body's first line here), and why."""
    import inspect
    import re

    line = inspect.getsourcelines(type(module).forward)[1] + 1
    assert FastPopulation.why_not(module, shape) is not None
    assert re.search(reason.format(line=line), FastPopulation.why_not(module, shape))


def test_a_fallback_trains_by_vmap_and_warns_once_on_cuda_only():
    task = get_task("o5_regression")

    class Model(_BatchMean):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(10, 1)

        def forward(self, x):
            return super().forward(x.flatten(1))

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        program = choose_program(template(Model()), task, "cpu", fast=True)
    assert not program.fast and "reduces over the batch" in program.reason and program.step is None
    assert program.describe().startswith("vmap (") and not seen  # no warning off CUDA: vmap is the CPU's default
    assert program.as_dict()["reason"] == program.reason


def test_a_population_beyond_32_bit_indexing_is_split_or_refused(monkeypatch):
    """One program's largest activation (models x batch x one sample's values) must stay within 32-bit
    indexing on CUDA: the runner splits larger populations into equal parts that fit, the trainer refuses
    one it is handed with the size that fits, and evaluation batches shrink to fit."""
    from zoos import fastpop
    from zoos.program import fit_populations, max_models
    from zoos.spec import populations
    from zoos.trainer import TrainError, make_task

    models = zoo_models({"seed": list(range(10)), "batch_size": [16]}, arch={"name": "mlp", "config": {"width": 32, "depth": 1}})
    pop = one_population(models)
    task = make_task(pop)
    assert max_models(pop, task) == (2**31 - 1) // 64 // 16  # the input (64 pixels) is the largest per-sample value
    monkeypatch.setattr(fastpop, "INDEX_LIMIT", 64 * 16 * 4)  # room for 4 models of 16 samples
    assert max_models(pop, task) == 4
    split, limits = fit_populations(populations(models, 10), lambda p: task)
    assert [len(p.models) for p in split] == [4, 3, 3] and limits == {"z": 4}
    with pytest.raises(TrainError, match=r"10 models x batch 16: 160 samples .* set population_size <= 4"):
        train_population(pop, fast=True, kernels=False)
    result = train_population(populations(models, 4)[0], fast=True, kernels=False, eval_batch=512)
    assert result.program["fast"] and np.isfinite(result.curves["test_loss"]).all()


def test_the_memory_plan_traces_a_group_of_models_once_a_process(monkeypatch):
    """The runner's split, the trainer's memory plan and its 32-bit check read one trace of the group's program."""
    from zoos import program
    from zoos.program import max_models, models_in_memory

    traced = []
    monkeypatch.setattr(program, "_PLANS", {})
    monkeypatch.setattr(program, "FastPopulation", lambda *a: traced.append(a) or FastPopulation(*a))
    pop = one_population(zoo_models({"seed": [0, 1], "batch_size": [16]}, arch={"name": "mlp", "config": {"width": 32, "depth": 1}}))
    task = get_task("digits")
    limits = [max_models(pop, task), models_in_memory(pop, task, 1 << 30), max_models(pop, task)]
    assert len(traced) == 1 and limits[0] == limits[2] == (2**31 - 1) // 64 // 16
    other = one_population(zoo_models({"seed": [0], "batch_size": [16]}, arch={"name": "mlp", "config": {"width": 8, "depth": 1}}))
    assert max_models(other, task) == limits[0] and len(traced) == 2  # another config: its own trace


BF16_CASES = [  # (arch, task, options, config, also compiled, on popconv's and popnorm's kernels on a GPU)
    ("p4cnn", "digits", {}, dict(width=2, depth=1), True, True),
    ("frame_avg", "inertia", {}, dict(width=8), False, False),
    ("fourier_mlp", "inr", {"group": "D4"}, dict(width=8, depth=1, n_freqs=4), False, False),
    ("cgenn", "convex_hull", {"n_train": 16, "n_val": 8, "n_test": 8}, dict(width=4, depth=2), False, False),
    ("fa_cnn", "digits", {}, dict(backbone_config=dict(width=4, depth=2)), False, True),
]


@pytest.mark.parametrize("arch,task_name,opts,config,compiled,kernels", BF16_CASES, ids=[c[0] for c in BF16_CASES])
def test_bf16_step_follows_autocast_and_stays_finite(arch, task_name, opts, config, compiled, kernels):
    """bf16 as autocast runs it, the vmap program's semantics: convs, linears and matmuls read bf16, the maps between
    a p4 CNN's convs stay bf16 and its group max stays finite when compiled (amax's tie-splitting backward gave
    NaN there), the input stays float32 where an op other than a conv or linear reads it (eigh has no bf16)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter's bf16 dot is not a GPU's: kernels there only
    task, module, params, buffers = _population(arch, task_name, opts, config)
    params, buffers = ({k: v.to(device) for k, v in d.items()} for d in (params, buffers))
    x, y = torch.randn(3, 8, *task.input_shape, device=device), _targets(task, 3, 8).to(device)

    def one(p, b, xb, yb):
        with torch.autocast(device, dtype=torch.bfloat16):
            pred = functional_call(module, (p, b), (xb,))
        return task.loss(pred.float(), yb)

    want = vmap(grad(one), randomness="different")(params, buffers, x, y)
    for c in (False, True) if compiled else (False,):
        step = FastStep(module, task.loss, task.input_shape, dtype=torch.bfloat16, compile=c, dropout=False,
                        kernels=kernels and device == "cuda")
        grads = step(params, buffers, x, y)[0]
        for k in want:
            assert torch.isfinite(grads[k]).all(), k
            torch.testing.assert_close(grads[k], want[k], atol=3e-2 * (1 + want[k].abs().max().item()), rtol=5e-2)
