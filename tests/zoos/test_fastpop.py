"""zoos.fastpop: the batched-matmul population program equals vmap over the model, forward, backward and training."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

from tasks.registry import get_task
from zoos.archs.base import PopDropout, build_arch
from zoos.fastpop import (FastPopulation, FastStep, dropout_active, from_model_groups, pop_conv2d, pop_conv2d_grouped, pop_dropout,
                          pop_dropout_groups, to_model_groups)
from zoos import popconv
from zoos.functional import population_forward, stack_states, template
from zoos.spec import PopulationSpec
from zoos.trainer import train_population

from tests.zoos.test_trainer import one_population, zoo_models

CASES = [("cnn_s", "mnist", {}), ("cnn", "digits", {"width": 6, "depth": 3}), ("mlp", "digits", {"width": 12, "depth": 2})]


def population(arch, task_name, config, n=3):
    task = get_task(task_name)
    models = [build_arch(arch, task, **config) for _ in range(n)]
    params, buffers = stack_states(models)
    return task, models, params, buffers


@pytest.mark.parametrize("arch,task_name,config", CASES)
@pytest.mark.parametrize("per_model", [True, False])
def test_forward_equals_vmap(arch, task_name, config, per_model):
    task, models, params, buffers = population(arch, task_name, config)
    x = torch.randn(*((3,) if per_model else ()), 5, *task.input_shape)
    module = template(models[0]).eval()
    ref = population_forward(module, params, buffers, x, x_per_model=per_model)
    out = FastPopulation(module, task.input_shape)(params, buffers, x, x_per_model=per_model)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,task_name,config", CASES)
def test_gradients_equal_vmap_of_grad(arch, task_name, config):
    task, models, params, buffers = population(arch, task_name, config)
    module = template(models[0])
    x, y = torch.randn(3, 7, *task.input_shape), torch.randint(0, 10, (3, 7))
    grads, loss = FastStep(module, task.loss, task.input_shape, dropout=False)(params, buffers, x, y)

    def one(p, b, xb, yb):
        return task.loss(functional_call(module, (p, b), (xb,)), yb)

    ref = vmap(grad(one), randomness="different")(params, buffers, x, y)
    assert set(grads) == set(ref)
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], atol=1e-6, rtol=1e-4)
    alone = [one({k: v[i] for k, v in params.items()}, {k: v[i] for k, v in buffers.items()}, x[i], y[i]) for i in range(3)]
    torch.testing.assert_close(loss, torch.stack(alone))


def test_batches_padded_to_a_bucket_give_the_same_rows():
    task, models, params, buffers = population("cnn_s", "mnist", {})
    x = torch.randn(3, 5, *task.input_shape)
    plain = FastPopulation(models[0], task.input_shape)
    bucketed = FastPopulation(models[0], task.input_shape)
    bucketed._compiled = bucketed.graph_module  # the compiled path's padding (5 -> 8 rows), without a compiler
    torch.testing.assert_close(bucketed(params, buffers, x), plain(params, buffers, x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("conv", [pop_conv2d, pop_conv2d_grouped])
def test_strided_padded_conv_equals_torch(conv):
    w, b = torch.randn(4, 5, 3, 3, 3), torch.randn(4, 5)
    x = torch.randn(4 * 2, 3, 9, 10)
    out = conv(x, w, b, stride=(2, 1), padding=(1, 2))
    ref = torch.cat([torch.nn.functional.conv2d(x[2 * i : 2 * i + 2], w[i], b[i], stride=(2, 1), padding=(1, 2)) for i in range(4)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_dropout_uses_each_models_rate():
    x = torch.ones(2 * 2000, 8)
    out = pop_dropout(x, torch.tensor([0.0, 0.5]), training=True).view(2, 2000, 8)
    assert torch.equal(out[0], torch.ones(2000, 8))
    assert 0.45 < (out[1] == 0).float().mean() < 0.55 and set(out[1].unique().tolist()) == {0.0, 2.0}
    assert torch.equal(pop_dropout(x, torch.tensor([0.0, 0.5]), training=False), x)
    _, models, _, buffers = population("cnn_s", "mnist", {"dropout": 0.2}, n=2)
    assert dropout_active(models[0], buffers)
    _, models, _, buffers = population("cnn_s", "mnist", {}, n=2)
    assert not dropout_active(models[0], buffers)


class _GroupChains(torch.nn.Module):
    """Grouped convs with plane ops between them (relu, a pool, gelu, a spatial mean), one map read twice (a
    residual add), and a dropout with each model's rate."""

    def __init__(self):
        super().__init__()
        from zoos.archs.base import PopDropout

        self.c1, self.c2, self.c3 = (torch.nn.Conv2d(i, o, 3, padding=1) for i, o in ((2, 6), (6, 6), (6, 6)))
        self.pool, self.drop, self.head = torch.nn.MaxPool2d(2), PopDropout(0.3), torch.nn.Linear(6, 4)

    def forward(self, x):
        h = self.drop(self.pool(torch.relu(self.c1(x))))  # c1 -> c2: nothing between them needs [N*B, ...]
        h = torch.nn.functional.gelu(self.c2(h))  # read by c3 and by the add: c3 reads it grouped, the add not
        h = torch.relu(self.c3(h) + h)
        return self.head(h.mean(dim=(-2, -1)))


def test_grouped_convs_keep_the_model_groups_layout_between_them():
    """The CPU's grouped convs: the transposes between two of them cancel through plane ops, a map read by more than
    the next conv comes back once, and the program equals vmap, forward and every gradient; dropout keeps each
    model's rate in the groups layout."""
    models = [_GroupChains() for _ in range(3)]
    params, buffers = stack_states(models)
    module = template(models[0])
    fast = FastPopulation(module.eval(), (2, 8, 8), grouped_convs=True)
    code = fast.graph_module.code
    assert code.count("to_model_groups(") == 1 and code.count("from_model_groups(") == 2, code  # 3 and 3 without
    assert "pop_dropout_groups(" in code
    x, y = torch.randn(3, 5, 2, 8, 8), torch.randint(0, 4, (3, 5))
    ref = population_forward(module, params, buffers, x, x_per_model=True)
    torch.testing.assert_close(fast(params, buffers, x), ref, atol=1e-5, rtol=1e-5)
    loss = torch.nn.functional.cross_entropy
    grads, _ = FastStep(module.train(), loss, (2, 8, 8), dropout=False, grouped_convs=True)(params, buffers, x, y)
    ref = vmap(grad(lambda p, b, xb, yb: loss(functional_call(module.eval(), (p, b), (xb,)), yb)))(params, buffers, x, y)
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], atol=1e-6, rtol=1e-4)
    two = torch.zeros(2, 1)  # stands for two models' weights: the layout reads N off them
    ones = to_model_groups(torch.ones(2 * 2000, 8, 1, 1), two)  # [2000, 2 * 8, 1, 1]
    out = from_model_groups(pop_dropout_groups(ones, torch.tensor([0.0, 0.5]), training=True), two).view(2, 2000, 8)
    assert torch.equal(out[0], torch.ones(2000, 8))
    assert 0.45 < (out[1] == 0).float().mean() < 0.55 and set(out[1].unique().tolist()) == {0.0, 2.0}


@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "strided"])
def test_the_model_groups_layout_hands_the_gradient_back_in_the_inputs_layout(layout):
    """to_model_groups' gradient equals the plain reshapes' and comes back in x's memory layout (an im2col conv's
    output is channels-last: the activation before it then reads both alike), contiguous where x is not dense;
    differentiable again."""
    n = torch.zeros(3, 1)
    base = torch.randn(3 * 4, 5, 6, 7, dtype=torch.float64)
    x = {"channels_last": base.contiguous(memory_format=torch.channels_last), "contiguous": base,
         "strided": torch.randn(3 * 4, 5, 6, 14, dtype=torch.float64)[..., ::2]}[layout].requires_grad_()
    v = torch.randn(4, 3 * 5, 6, 7, dtype=torch.float64, requires_grad=True)
    (got,) = torch.autograd.grad((to_model_groups(x, n) * v * v).sum(), x, create_graph=True)
    plain = x.reshape(3, 4, 5, 6, 7).transpose(0, 1).reshape(4, 15, 6, 7)
    (want,) = torch.autograd.grad((plain * v * v).sum(), x, create_graph=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.stride() == (x.stride() if layout != "strided" else base.stride())
    torch.testing.assert_close(torch.autograd.grad((got * x).sum(), v)[0], torch.autograd.grad((want * x).sum(), v)[0])


class _PoolIndices(torch.nn.Module):
    """A pool that also returns its indices between two grouped convs: not a plane op (its result is a pair)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(2, 6, 3, padding=1), torch.nn.Conv2d(6, 5, 3, padding=1)
        self.pool, self.head = torch.nn.MaxPool2d(2, return_indices=True), torch.nn.Linear(5, 4)

    def forward(self, x):
        h, _ = self.pool(torch.relu(self.c1(x)))
        return self.head(torch.relu(self.c2(h)).mean(dim=(-2, -1)))


def test_a_pool_returning_indices_ends_a_model_groups_chain():
    models = [_PoolIndices() for _ in range(3)]
    params, buffers = stack_states(models)
    module = template(models[0]).eval()
    fast = FastPopulation(module, (2, 8, 8), grouped_convs=True)
    x = torch.randn(3, 5, 2, 8, 8)
    ref = population_forward(module, params, buffers, x, x_per_model=True)
    torch.testing.assert_close(fast(params, buffers, x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", [{"name": "cnn", "config": {"width": 6, "depth": 2}},
                                  {"name": "mlp", "config": {"width": 16, "depth": 1, "dropout": 0.0}}])
def test_training_fast_equals_vmap_trainer(arch):
    """Same init, data order and Adam: the weights after 2 epochs (~16 steps) agree to float32 tolerance."""
    models = zoo_models({"seed": [0, 1, 2], "lr": [3e-3, 1e-3], "optimizer": ["adam"], "batch_size": [32]}, arch=arch)
    pop = one_population(models[:4])
    fast = train_population(pop, fast=True)
    plain = train_population(pop, fast=False)
    for k in plain.weights:
        np.testing.assert_allclose(fast.weights[k], plain.weights[k], atol=2e-5, rtol=1e-4)
    for name in plain.curves:
        np.testing.assert_allclose(fast.curves[name], plain.curves[name], atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resnet_on_the_kernels_folds_its_norms_and_tracks_autocast_vmap_in_bf16():
    """ResNet-20's norms run as popnorm with the activation (and the skip) folded in, bf16 out where convs alone
    read them: its bf16 gradients are as close to float32's as autocast's vmap program's are (twenty bf16 layers
    leave the stem's gradient at a cosine of ~0.97 to float32 in either program; a broken one is near 0)."""
    task, models, params, buffers = population("resnet20", "cifar10", {"width": 0.5}, n=4)
    params = {k: v.cuda() for k, v in params.items()}
    buffers = {k: v.cuda() for k, v in buffers.items()}
    x, y = torch.randn(4, 32, 3, 32, 32, device="cuda"), torch.randint(0, 10, (4, 32), device="cuda")
    module = template(models[0])

    def one(p, b, xb, yb, bf16):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            return task.loss(functional_call(module, (p, b), (xb,)).float(), yb)

    exact = vmap(grad(one), in_dims=(0, 0, 0, 0, None), randomness="different")(params, buffers, x, y, False)
    peer = vmap(grad(one), in_dims=(0, 0, 0, 0, None), randomness="different")(params, buffers, x, y, True)
    step = FastStep(module, task.loss, task.input_shape, dtype=torch.bfloat16, dropout=False, kernels=True)
    programs = Counter(p for _, p, _ in step.pop.choices)
    assert programs["popnorm+ReLU"] == 10 and programs["popnorm+add+ReLU"] == 9 and programs["popnorm"] == 2, programs
    # bf16 out: each block's first norm (read by its conv2) and the two block ends that only convs read (conv1 and the
    # next stage's shortcut conv); float32 where a residual add reads it
    assert sum(why.startswith("stored in the compute dtype") for _, p, why in step.pop.choices if p.startswith("popnorm")) == 11
    got = step(params, buffers, x, y)[0]
    cos = lambda u, v: torch.nn.functional.cosine_similarity(u.flatten(1).float(), v.flatten(1).float(), dim=1).min()  # noqa: E731
    for k in exact:
        assert cos(got[k], exact[k]) > cos(peer[k], exact[k]) - 0.02, (k, cos(got[k], exact[k]), cos(peer[k], exact[k]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_bf16_step_tracks_float32_on_gpu():
    task, models, params, buffers = population("cnn_s", "mnist", {}, n=16)
    params = {k: v.cuda() for k, v in params.items()}
    buffers = {k: v.cuda() for k, v in buffers.items()}
    x, y = torch.randn(16, 128, 1, 28, 28, device="cuda"), torch.randint(0, 10, (16, 128), device="cuda")
    module = template(models[0])
    g32, l32 = FastStep(module, task.loss, task.input_shape, dropout=False)(params, buffers, x, y)
    g16, l16 = FastStep(module, task.loss, task.input_shape, dtype=torch.bfloat16, compile=True, dropout=False)(params, buffers, x, y)
    torch.testing.assert_close(l16, l32, atol=2e-2, rtol=2e-2)
    for k in g32:  # a broken step gives cosines near 0; bf16 rounding alone went down to 0.985 (conv1.bias: a sum
        # over 128 x 576 bf16 products; one of 16 models, H200, 2026-11-30), the others above 0.995
        cos = torch.nn.functional.cosine_similarity(g16[k].flatten(1), g32[k].flatten(1), dim=1)
        assert cos.min() > 0.97, k
        assert cos.median() > 0.99, k


class _WeightOps(torch.nn.Module):
    """Per-sample data against the model's own weights in every broadcast form the population program takes
    without a per-op vmap: either operand first, a weight of lower rank or with a leading 1, a matmul on the right."""

    def __init__(self):
        super().__init__()
        self.row = torch.nn.Parameter(torch.randn(6) + 3)
        self.col = torch.nn.Parameter(torch.randn(4, 1))
        self.lead = torch.nn.Parameter(torch.randn(1, 4, 6))
        self.mat = torch.nn.Parameter(torch.randn(6, 5))

    def forward(self, x):  # x [B, 4, 6]
        h = (x - self.row) * self.col / (self.row.abs() + 1)
        h = (self.row - h) + x.mul(self.lead) - torch.div(self.col, h.abs() + 1)
        return (h @ self.mat).sum(-1)


def test_data_and_weight_ops_broadcast_per_model_without_vmap():
    models = [_WeightOps() for _ in range(3)]
    params, buffers = stack_states(models)
    module = template(models[0])
    pop = FastPopulation(module, (4, 6))
    programs = Counter(p for _, p, _ in pop.choices)
    assert programs["broadcast"] == 7 and "vmap op" not in programs, programs
    x = torch.randn(3, 5, 4, 6)
    torch.testing.assert_close(pop(params, buffers, x, x_per_model=True),
                               population_forward(module, params, buffers, x, x_per_model=True), atol=1e-5, rtol=1e-5)
    y = torch.randn(3, 5, 4)
    grads, _ = FastStep(module, torch.nn.functional.mse_loss, (4, 6), dropout=False)(params, buffers, x, y)
    ref = vmap(grad(lambda p, b, xb, yb: torch.nn.functional.mse_loss(functional_call(module, (p, b), (xb,)), yb)),
               randomness="different")(params, buffers, x, y)  # the dropout's rate is 0: its draw changes nothing
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], atol=1e-5, rtol=1e-4)


class _Whitened(torch.nn.Module):
    """A linear layer through a Cholesky factor of its own weights' Gram matrix: a forward that fails with zero
    weights (the factor of a singular matrix)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 4) + 4 * torch.eye(4))
        self.out = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.out(x @ torch.linalg.cholesky(self.w @ self.w.T))


def test_a_template_whose_forward_fails_with_zero_weights_is_still_probed():
    """The shape probes run a template on the CPU with zero weights; where that fails they run on the meta device,
    so the program is the same one, and equals vmap."""
    models = [_Whitened() for _ in range(3)]
    params, buffers = stack_states(models)
    module = template(models[0])
    with pytest.raises(torch.linalg.LinAlgError):
        torch.func.functional_call(module, {k: torch.zeros(v.shape[1:]) for k, v in params.items()}, (torch.zeros(2, 4),))
    x = torch.randn(3, 5, 4)
    torch.testing.assert_close(FastPopulation(module, (4,))(params, buffers, x, x_per_model=True),
                               population_forward(module, params, buffers, x, x_per_model=True), atol=1e-5, rtol=1e-5)


class _Siblings(torch.nn.Module):
    """Four Linears of one input (64 + 64 + 8 + 8 outputs) and one of another value."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 64), torch.nn.Linear(6, 64, bias=False)
        self.c, self.d = torch.nn.Linear(6, 8), torch.nn.Linear(6, 8)
        self.e = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x)) * self.b(x)
        return self.e(torch.relu(self.c(x) + self.d(x))) + h[..., :3]


@pytest.mark.skipif(not popconv.available("cuda" if torch.cuda.is_available() else "cpu"),
                    reason="needs Triton (GPU or TRITON_INTERPRET=1)")
def test_linears_of_one_input_run_as_one_op_and_equal_vmap():
    """Linears reading one value group in graph order, up to 128 outputs and three linears a group (a and b;
    c and d), the Linear of another value alone; forward and gradients equal vmap's."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    models = [_Siblings() for _ in range(3)]
    params, buffers = stack_states(models)
    params = {k: v.to(device) for k, v in params.items()}
    module = template(models[0])
    step = FastStep(module, torch.nn.functional.mse_loss, (6,), dropout=False, kernels=True)
    assert [(layer, p) for layer, p, _ in step.pop.choices] == [
        ("a", "poplinear (input shared)"), ("b", "poplinear (input shared)"), ("c", "poplinear (input shared)"),
        ("d", "poplinear (input shared)"), ("e", "relu+poplinear")], step.pop.choices
    x, y = torch.randn(3, 5, 6, device=device), torch.randn(3, 5, 3, device=device)
    with torch.no_grad():
        torch.testing.assert_close(step.pop(params, {}, x, x_per_model=True),
                                   population_forward(module, params, {}, x, x_per_model=True),
                                   atol=1e-5, rtol=1e-4)
    grads, _ = step(params, {}, x, y)
    ref = vmap(grad(lambda p, xb, yb: torch.nn.functional.mse_loss(functional_call(module, p, (xb,)), yb)))(params, x, y)
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


class _Activations(torch.nn.Module):
    """Activations read by linears alone (directly, past a skipped dropout and a reshape, as an F.linear, by two
    linears of one input) and ones that are not folded: read by a non-linear too, in place on a value others read,
    the exact gelu."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 8)
        self.c, self.d = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4, bias=False)
        self.e, self.f, self.g = torch.nn.Linear(4, 8), torch.nn.Linear(8, 4), torch.nn.Linear(4, 3)
        self.act, self.drop = torch.nn.SiLU(), PopDropout(0.0)
        self.w = torch.nn.Parameter(torch.randn(8, 8) / 3)

    def forward(self, x):
        h = self.b(self.drop(self.act(self.a(x))))  # silu, past a skipped dropout
        h = torch.nn.functional.linear(torch.nn.functional.gelu(h, approximate="tanh").unsqueeze(-2), self.w).squeeze(-2)
        u, v = self.c(torch.tanh(h)), self.d(torch.tanh(h))  # one tanh node each, read by a linear alone
        s = torch.sigmoid(u + v)
        h = self.e(s) * s.sum(-1, keepdim=True)  # s read by a sum too: not folded
        z = self.f(torch.nn.functional.gelu(h))  # the exact gelu: kept apart
        r = torch.nn.functional.relu(z, inplace=True)  # in place on z, which leaky_relu reads too: not folded
        return self.g(r) + torch.nn.functional.leaky_relu(z, 0.2).sum(-1, keepdim=True)


@pytest.mark.skipif(not popconv.available("cuda" if torch.cuda.is_available() else "cpu"),
                    reason="needs Triton (GPU or TRITON_INTERPRET=1)")
def test_activations_only_linears_read_are_applied_by_them_and_equal_vmap():
    """Each activation that only poplinear linears read (past skipped dropouts and reshapes) is applied by them as
    they load their input (`input_act`), the others run as they are; forward and gradients equal vmap's."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    models = [_Activations() for _ in range(3)]
    params, buffers = stack_states(models)
    params = {k: v.to(device) for k, v in params.items()}
    buffers = {k: v.to(device) for k, v in buffers.items()}
    module = template(models[0])
    step = FastStep(module, torch.nn.functional.mse_loss, (6,), dropout=False, kernels=True)
    assert Counter(p for _, p, _ in step.pop.choices) == Counter({
        "poplinear": 4, "silu+poplinear": 1, "gelu_tanh+poplinear": 1, "tanh+poplinear": 2}), \
        step.pop.choices
    x, y = torch.randn(3, 5, 6, device=device), torch.randn(3, 5, 3, device=device)
    with torch.no_grad():
        torch.testing.assert_close(step.pop(params, buffers, x, x_per_model=True),
                                   population_forward(module, params, buffers, x, x_per_model=True),
                                   atol=1e-5, rtol=1e-4)
    grads, _ = step(params, buffers, x, y)
    ref = vmap(grad(lambda p, b, xb, yb: torch.nn.functional.mse_loss(functional_call(module, (p, b), (xb,)), yb)),
               randomness="different")(params, buffers, x, y)  # the dropout's rate is 0: its draw changes nothing
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
