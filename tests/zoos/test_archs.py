"""Architectures, generically over the registry: equivariance for the task's group, permutation specs
that are exact and complete enough to be caught when wrong, parameter counts, stacked populations."""

from __future__ import annotations

import pytest
import torch

from tasks import get_task
from tasks.base import Task
from zoos.archs import ARCHS, ArchError, PopDropout, build_arch
from zoos.archs.checks import PointPermutations, assert_equivariant, orbit_errors, relative_orbit_error
from zoos.functional import population_forward, stack_states, template
from zoos.permspec import apply_permutation

# (arch, task, task options, arch config, which group to check: "task" or "points" = the S_n factor)
CASES = [
    ("mlp", "digits", {}, dict(width=16, depth=2), "task"),
    ("set_mlp", "o5_regression", {}, dict(width=16, depth=2, embed=4), "task"),
    ("cnn_s", "mnist", {}, {}, "task"),
    ("cnn", "digits", {}, dict(width=6, depth=3), "task"),
    ("resnet20", "digits", {}, dict(width=0.25), "task"),
    ("p4cnn", "digits", {}, dict(width=4, depth=3), "task"),
    ("p4mcnn", "digits", {"group": "D4"}, dict(width=3, depth=3), "task"),
    ("deepsets", "convex_hull", {}, dict(width=8, depth=2), "points"),
    ("egnn", "nbody", {}, dict(width=8, depth=2), "task"),
    ("egnn", "convex_hull", {}, dict(width=8, depth=2), "task"),
    ("scalar_mlp", "lorentz", {}, dict(width=16), "task"),
    ("scalar_mlp", "o5_regression", {}, dict(width=16), "task"),
    ("inertia_head", "inertia", {}, dict(width=8), "task"),
    ("inertia_head", "modified_inertia", {}, dict(width=8), "task"),
    ("frame_avg", "inertia", {}, dict(width=16), "task"),
    ("canon_cnn", "digits", {"group": "C4", "variant": "rotated"}, dict(width=3, backbone_config=dict(width=4, depth=2)), "task"),
    ("canon_cnn", "digits", {"group": "D4"}, dict(width=3, depth=1, backbone="mlp", backbone_config=dict(width=8, depth=1)), "task"),
    ("fa_cnn", "digits", {"group": "C4", "variant": "rotated"}, dict(backbone_config=dict(width=4, depth=2)), "task"),
    ("fa_cnn", "digits", {"group": "D4"}, dict(backbone="mlp", backbone_config=dict(width=8, depth=1)), "task"),
    ("canon_mlp", "inertia", {}, dict(width=16, canon_width=8), "task"),
    ("canon_mlp", "modified_inertia", {}, dict(width=16, canon_width=8, canon_depth=2), "task"),
    ("siren", "inr", {}, dict(width=8, depth=2), "task"),
    ("fourier_mlp", "inr", {"group": "D4"}, dict(width=8, depth=2, n_freqs=4), "task"),
    ("cgenn", "convex_hull", {}, dict(width=4, depth=2), "task"),
    ("cgenn", "lorentz", {}, dict(width=4, depth=2), "task"),
    ("cgenn", "nbody", {}, dict(width=4, depth=3), "task"),
    # the published zoos' networks (zoos.archs.published), each variant the importers map to
    ("small_cnn_zoo", "mnist", {}, {}, "task"),
    ("small_cnn_zoo", "cifar10", {}, dict(width=6, activation="tanh"), "task"),
    ("model_zoos_cnn", "mnist", {}, dict(dropout=0.5, preprocess={"mean": [0.1307], "std": [0.3081]}), "task"),
    ("model_zoos_cnn", "cifar10", {}, dict(variant="CNN", preprocess={"resize": [28, 28], "mean": [0.5] * 3, "std": [0.5] * 3}), "task"),
    ("model_zoos_cnn", "cifar10", {}, dict(variant="CNN3", activation="relu"), "task"),
    ("model_zoos_cnn", "mnist", {}, dict(variant="CNN2", activation="leaky_relu"), "task"),
    ("resnet18_width", "digits", {}, dict(width=2, preprocess={"mean": [0.5], "std": [0.25]}), "task"),
    # transformers: heads of 2-4 dimensions, so that head and within-head permutations are both exercised
    ("vit", "digits", {}, dict(width=12, depth=2, heads=3, patch=4), "task"),
    ("vit", "mnist", {}, dict(width=8, depth=1, heads=2, patch=7, pool="mean", activation="relu"), "task"),
    ("set_transformer", "convex_hull", {}, dict(width=12, depth=2, heads=3), "points"),
    ("canon_cnn", "digits", {"group": "C4"}, dict(width=3, depth=1, backbone="vit", backbone_config=dict(width=6, depth=1, heads=2)), "task"),
]
IDS = [f"{a}-{t}-{i}" for i, (a, t, *_) in enumerate(CASES)]


def _setup(arch: str, task_name: str, opts: dict, config: dict, which: str, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    task = get_task(task_name, **opts)
    model = build_arch(arch, task, **config).to(dtype).eval()
    group = task.group if which == "task" else PointPermutations(task.input_shape[0])
    return task, model, group, _inputs(task, dtype)


def _inputs(task: Task, dtype: torch.dtype, n: int = 6) -> torch.Tensor:
    """Real digits for the image checks (natural images, not noise); Gaussian points otherwise."""
    g = torch.Generator().manual_seed(1)
    if task.name == "digits":
        return get_task("digits", n_train=0, n_val=0, n_test=n).load("test")[0].to(dtype)
    if task.input_kind == "image":
        return torch.rand(n, *task.input_shape, generator=g, dtype=dtype)
    return torch.randn(n, *task.input_shape, generator=g, dtype=dtype)


def _randomise(model: torch.nn.Module) -> None:
    """Perturb every parameter so that no two units (and no norm affine) are alike by construction, and draw
    BatchNorm running statistics (at their defaults 0 and 1 a spec that forgot them would go unnoticed)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.5)
            elif name.endswith("running_var"):
                b.uniform_(0.3, 3.0)


def training_without_dropout(module: torch.nn.Module) -> torch.nn.Module:
    """`module` in train mode with every dropout off: what a training step differentiates when the rates are 0
    (a canonicalizer's straight-through gradient exists in train mode only)."""
    module.train()
    for m in module.modules():
        if isinstance(m, (torch.nn.Dropout, PopDropout)):
            m.eval()
    return module


def test_every_registered_architecture_has_a_case():
    ours = {n for n, info in ARCHS.items() if info.factory.__module__.startswith("zoos.archs.")}
    assert ours - {a for a, *_ in CASES} == set()
    assert {"mlp", "set_mlp", "cnn_s", "cnn", "resnet20", "p4cnn", "p4mcnn", "deepsets", "egnn", "scalar_mlp",
            "inertia_head", "frame_avg"} <= ours  # fmt: skip


@pytest.mark.parametrize("arch,task_name,opts,config,which", CASES, ids=IDS)
def test_equivariance_for_the_task_group(arch, task_name, opts, config, which):
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    if ARCHS[arch].equivariant:
        for dtype in (torch.float64, torch.float32):
            _, model, group, x = _setup(arch, task_name, opts, config, which, dtype)
            assert_equivariant(model, group, x, generator=gen())
    else:
        _, model, group, x = _setup(arch, task_name, opts, config, which)
        errs = orbit_errors(model, group, x, generator=gen())
        assert max(errs) > 1e-3, f"baseline {arch} looks equivariant to {group.name}: {errs}"
        with pytest.raises(AssertionError, match="not equivariant"):
            assert_equivariant(model, group, x, generator=gen())


def _observed(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The outputs, and a learned canonicalizer's scores where the model has them: its outputs read them through
    an argmax only, so a wrong permutation of the canonicalizer's units may leave the outputs of a few inputs alone."""
    out = model(x).flatten(1)
    return torch.cat([out, model.scores(x).flatten(1)], 1) if hasattr(model, "scores") else out


def _nontrivial(spec, perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace any permutation that came out as the identity by a cyclic shift the spec allows (inside each
    block of a block-structured one)."""
    out = {}
    for k, p in perms.items():
        if torch.equal(p, torch.arange(len(p))):
            n = spec.blocks[k][1] if k in spec.blocks else 1
            p = p.view(n, -1).roll(1, 1).flatten()
        out[k] = p
    return out


@pytest.mark.parametrize("arch,task_name,opts,config,which", CASES, ids=IDS)
def test_permutation_spec_is_exact_and_every_pair_matters(arch, task_name, opts, config, which):
    task, model, _, x = _setup(arch, task_name, opts, config, which)
    _randomise(model)
    spec, state = model.perm_spec(), {k: v.clone() for k, v in model.state_dict().items()}
    perms = _nontrivial(spec, spec.random(state, torch.Generator().manual_seed(5)))
    spec.check(perms)
    with torch.no_grad():
        ref = _observed(model, x)
        model.load_state_dict(apply_permutation(spec, state, perms))
        assert relative_orbit_error(_observed(model, x), ref) < 1e-5
        checked = 0
        for name, pairs in spec.perms.items():
            if len(pairs) < 2 or len(perms[name]) < 2:
                continue
            for drop in pairs:  # a spec missing this one (key, axis) pair must change the function
                wrong = type(spec)({**spec.perms, name: tuple(p for p in pairs if p != drop)})
                model.load_state_dict(apply_permutation(wrong, state, perms))
                assert relative_orbit_error(_observed(model, x), ref) > 1e-6, f"dropping {drop} from {name!r} went unnoticed"
                checked += 1
    assert checked > 0


def test_cnn_s_has_the_published_parameter_count():
    model = build_arch("cnn_s", get_task("mnist"))
    assert model.num_params == 2464
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert build_arch("cnn_s", get_task("cifar10")).fc1.weight.shape == (20, 4, 4, 4)


@pytest.mark.parametrize("arch,task_name,opts,config,which", CASES, ids=IDS)
def test_population_forward_equals_each_model(arch, task_name, opts, config, which):
    task = get_task(task_name, **opts)
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(build_arch(arch, task, **config).eval())
    assert all(m.num_params > 0 for m in models)
    x = _inputs(task, torch.float32).requires_grad_()
    params, buffers = stack_states(models)
    params = {k: v.requires_grad_() for k, v in params.items()}
    out = population_forward(template(models[0]).eval(), params, buffers, x)
    for i, m in enumerate(models):
        with torch.no_grad():
            assert relative_orbit_error(out[i], m(x)) < 1e-5
    # trainable as a population: finite gradients for weights and inputs in train mode (what a step differentiates)
    out = population_forward(training_without_dropout(template(models[0])), params, buffers, x)
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in params.values())
    assert torch.isfinite(x.grad).all()


def test_population_dropout_rate_is_per_model_and_masks_differ():
    task = get_task("o5_regression")
    models = [build_arch("mlp", task, width=32, dropout=p) for p in (0.0, 0.5, 0.5)]
    weights = dict(models[0].named_parameters())  # same weights everywhere, rates stay per model
    for m in models[1:]:
        m.load_state_dict(weights, strict=False)
    params, buffers = stack_states(models)
    assert buffers["net.drops.0.p"].tolist() == [0.0, 0.5, 0.5]
    x = torch.randn(64, 2, 5)
    out = population_forward(template(models[0]).train(), params, buffers, x)
    with torch.no_grad():
        assert torch.allclose(out[0], models[0].eval()(x), atol=1e-6)  # rate 0: no mask at all
    assert not torch.allclose(out[1], out[2])  # same weights and rate, different masks


def test_frame_avg_has_finite_gradients():
    task = get_task("inertia")
    model = build_arch("frame_avg", task, width=8)
    x = torch.randn(4, *task.input_shape, requires_grad=True)
    model(x).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "arch,task_name,config,match",
    [
        ("cnn_s", "digits", {}, "at least 28x28"),
        ("p4cnn", "digits", dict(kernel=4), "kernel must be odd"),
        ("p4cnn", "digits", dict(group_pool="sum"), "group_pool 'sum'"),
        ("mlp", "digits", dict(width=0), "width must be an integer >= 1"),
        ("mlp", "digits", dict(activation="swish"), "activation 'swish'"),
        ("scalar_mlp", "inertia", {}, "invariant outputs"),
        ("inertia_head", "o5_regression", {}, "matrix output"),
        ("frame_avg", "lorentz", {}, "non-Euclidean"),
        ("egnn", "inertia", {}, "invariant or per-point"),
        ("deepsets", "digits", {}, "points inputs"),
        ("resnet20", "digits", dict(width=-1), "positive multiplier"),
        ("canon_cnn", "digits", dict(backbone="p4cnn_x"), "backbone 'p4cnn_x' is not allowed"),
        ("canon_cnn", "digits", dict(prior_weight=-1.0), "prior_weight must be a number >= 0"),
        ("fa_cnn", "digits", dict(backbone="canon_cnn"), "'fa_cnn': backbone 'canon_cnn' is not allowed"),
        ("fa_cnn", "nbody", {}, "takes image inputs"),
        ("canon_mlp", "o5_regression", {}, "at least d = 5 input vectors"),
        ("canon_mlp", "lorentz", {}, "non-Euclidean"),
        ("vit", "digits", dict(width=30, heads=4), "width 30 is not a multiple of heads 4"),
        ("vit", "digits", dict(patch=3), "patch 3 does not divide the 8x8 images"),
        ("vit", "digits", dict(pool="max"), "pool 'max' is not allowed; choose one of cls, mean"),
        ("vit", "digits", dict(mlp_ratio=0), "mlp_ratio must be a positive number, got 0"),
        ("set_transformer", "convex_hull", dict(pool="cls"), "pool 'cls' is not allowed; choose one of mean, sum"),
        ("set_transformer", "digits", {}, "points inputs"),
    ],
)
def test_bad_configurations_are_refused_with_the_field(arch, task_name, config, match):
    with pytest.raises(ArchError, match=match):
        build_arch(arch, get_task(task_name), **config)


@pytest.mark.parametrize("device,init", [("cpu", "default"), ("cpu", "orthogonal")]
                         + ([("cuda", "default")] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("arch,task_name,opts,config,which", CASES, ids=IDS)
def test_population_init_equals_each_model_built_alone(arch, task_name, opts, config, which, device, init, monkeypatch):
    """`init_population` gives every model exactly the weights `init_model` builds for it, and every
    architecture's init replays (its resets draw what its construction draws, in the same order), here on three
    threads at once, each replaying its models from its own generators (on a GPU: into pinned memory, copied to
    the device's rows as they are drawn)."""
    from types import SimpleNamespace

    import zoos.init

    monkeypatch.setattr(zoos.init, "DRAWS_A_THREAD", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    task = get_task(task_name, **opts)
    models = [SimpleNamespace(arch=arch, arch_config=config, factors={"seed": s, "init": init}) for s in (4, 0, 9, 2, 7)]
    calls = []
    build = zoos.init.init_model
    monkeypatch.setattr(zoos.init, "init_model", lambda *a: (calls.append(a), build(*a))[1])
    first, params, buffers = zoos.init.init_population(models, task, device)
    assert {v.device.type for v in (*params.values(), *buffers.values())} == {device}
    params, buffers = ({k: v.cpu() for k, v in d.items()} for d in (params, buffers))
    # plain tensors: a copy that joined the replay's autograd graph grew a graph across every training step
    assert not any(v.requires_grad or v.grad_fn is not None for v in (*params.values(), *buffers.values()))
    alone = [build(m.arch, m.arch_config, m.factors, task) for m in models]
    want_p, want_b = stack_states(alone)
    assert params.keys() == want_p.keys() and buffers.keys() == want_b.keys()
    for k in want_p:
        assert torch.equal(params[k], want_p[k]), k
    for k in want_b:
        assert torch.equal(buffers[k], want_b[k]), k
    assert all(torch.equal(v, want_p[k][0]) for k, v in first.state_dict().items() if k in want_p)
    assert len(calls) == 2, (arch, len(calls))  # every architecture replays: two built, three replayed


def test_population_init_builds_every_model_when_configs_differ_or_the_replay_is_not_exact(monkeypatch):
    from types import SimpleNamespace

    from zoos.init import init_model, init_population

    task = get_task("digits")
    models = [SimpleNamespace(arch="mlp", arch_config={"width": 8, "depth": 1, "dropout": p},
                              factors={"seed": s, "init": "default"}) for s, p in ((0, 0.0), (1, 0.5), (2, 0.1))]
    _, params, buffers = init_population(models, task)
    assert buffers["net.drops.0.p"].tolist() == pytest.approx([0.0, 0.5, 0.1])
    for i, m in enumerate(models):
        for k, v in init_model(m.arch, m.arch_config, m.factors, task).named_parameters():
            assert torch.equal(params[k][i], v), k
    # an architecture whose construction draws outside its resets: the check finds it, every model is built
    from zoos.archs.baselines import MLP

    def drawing_init(self, *args, **kwargs):
        base_init(self, *args, **kwargs)
        with torch.no_grad():
            self.net.layers[0].weight.add_(torch.rand(()))  # a draw of its own after the layers' resets

    base_init = MLP.__init__
    monkeypatch.setattr(MLP, "__init__", drawing_init)
    same = [SimpleNamespace(arch="mlp", arch_config={"width": 8, "depth": 1}, factors={"seed": s, "init": "default"})
            for s in range(4)]
    _, params, _ = init_population(same, task)
    for i, m in enumerate(same):
        for k, v in init_model(m.arch, m.arch_config, m.factors, task).named_parameters():
            assert torch.equal(params[k][i], v), k


@pytest.mark.parametrize("arch,task_name,opts,config,which", CASES, ids=IDS)
def test_every_architecture_builds_on_the_meta_device(arch, task_name, opts, config, which):
    """`symzoo validate` sizes every config on the meta device (no memory) to refuse a model too big for the
    machine before training: construction may compute only on explicit CPU tensors."""
    from zoos.archs.base import INIT_SCHEMES
    from zoos.init import init_model
    from zoos.spec import TRAIN_DEFAULTS

    task = get_task(task_name, **opts)
    for init in INIT_SCHEMES:
        factors = {**TRAIN_DEFAULTS, "init": init}
        with torch.device("meta"):
            meta = init_model(arch, config, factors, task)
        assert all(p.is_meta for p in meta.parameters())
        assert sum(p.numel() for p in meta.parameters()) == build_arch(arch, task, **config).num_params


def test_canon_mlp_is_e3_invariant_on_positions_and_the_canonicalizers_prior_prefers_the_identity():
    """nbody's group is E(3) x S_5 and canon_mlp is not S_n-invariant: check the E(3) factor alone. The prior
    penalty is zero only at the identity, and its weight is a config factor."""
    from tasks.groups import OrthogonalGroup

    task = get_task("nbody")
    e3 = OrthogonalGroup(3, "p,v,s", "p", translations=True)
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(0)
        model = build_arch("canon_mlp", task, width=16, canon_width=8, prior_weight=0.5).to(dtype).eval()
        assert_equivariant(model, e3, _inputs(task, dtype), generator=torch.Generator().manual_seed(3))
    x = _inputs(task, torch.float64)
    assert model.double().prior_loss(x) > 0
    assert build_arch("canon_mlp", task).prior_loss(x.float()) == 0  # prior_weight defaults to 0


def test_canon_cnn_prior_is_the_cross_entropy_against_the_identity():
    task = get_task("digits", group="D4")
    torch.manual_seed(0)
    model = build_arch("canon_cnn", task, prior_weight=2.0).eval()
    x = _inputs(task, torch.float32)
    want = 2.0 * torch.nn.functional.cross_entropy(model.scores(x), torch.zeros(len(x), dtype=torch.long))
    torch.testing.assert_close(model.prior_loss(x), want)
    assert model.scores(x).shape == (len(x), 8)


@pytest.mark.parametrize("group", ["C4", "D4"])
def test_the_canonical_image_is_exactly_the_copy_the_argmax_picks(group):
    """canon_cnn's canonical image is T_{g*}^-1 x for the argmax g* of its scores, to the bit, in training (the
    straight-through one-hot) as in eval."""
    from zoos.archs.canonical import _ELEMENTS
    from zoos.archs.equivariant import _transform

    task = get_task("digits", group=group)
    torch.manual_seed(0)
    model = build_arch("canon_cnn", task, width=3, backbone_config=dict(width=4, depth=2))
    x = _inputs(task, torch.float32)
    for training in (True, False):
        model.train(training)
        chosen = model.scores(x).argmax(-1)
        want = torch.stack([_transform(_ELEMENTS[group][model.inverse[int(g)]], xi) for g, xi in zip(chosen, x)])
        assert torch.equal(model.canonicalize(x), want)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_a_batched_eigh_of_any_size_decomposes_every_matrix(device):
    """linalg_eigh (frame averaging's PCA) takes a population's batch whole: on a GPU more matrices than
    cuSOLVER's batched solver takes in one call (it fails from ~32k) go in chunks, each matrix decomposed as alone."""
    from zoos.archs.layers import EIGH_CHUNK, linalg_eigh

    gen = torch.Generator().manual_seed(0)
    n = 2 * EIGH_CHUNK + 5 if device == "cuda" else 300
    v = torch.randn(n, 3, 3, generator=gen, dtype=torch.float64)
    a = (v @ v.transpose(-1, -2)).float().to(device)
    w, e = linalg_eigh(a)
    assert w.shape == (n, 3) and e.shape == (n, 3, 3)
    assert bool((w[:, :-1] <= w[:, 1:]).all())
    torch.testing.assert_close(e @ torch.diag_embed(w) @ e.transpose(-1, -2), a, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.cpu(), torch.linalg.eigvalsh(a.cpu().double()).float(), rtol=1e-4, atol=1e-4)
