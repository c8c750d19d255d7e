"""The population trainer: N models as one program equal N separate runs and plain torch.optim loops."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tasks
from zoos import popoptim
from zoos.init import init_model
from zoos.spec import PopulationSpec, expand, parse_zoo, populations
from zoos.trainer import (
    DATA_SEED,
    Augmenter,
    TrainError,
    epoch_order,
    lr_factor,
    make_task,
    steps_per_epoch,
    train_population,
    train_subset,
)

N_TRAIN = 200
ROOT = Path(__file__).resolve().parents[2]


def zoo_models(grid, *, arch=None, epochs=2, task_options=None, task="digits", **over):
    sizes = {"n_train": N_TRAIN, "n_val": 100, "n_test": 100} if task == "digits" else {}
    data = {
        "name": "z",
        "task": {"name": task, "options": {**sizes, **(task_options or {})}},
        "arch": arch or {"name": "mlp", "config": {"width": 16, "depth": 1}},
        "grid": grid,
        "epochs": epochs,
        **over,
    }
    return expand(parse_zoo(data), "study")


def one_population(models) -> PopulationSpec:
    pops = populations(models)
    assert len(pops) == 1
    return pops[0]


def final_state(result, i):
    return {k: torch.from_numpy(v[i, -1]) for k, v in result.weights.items()}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_population_equals_separate_single_model_runs(optimizer):
    lrs = [0.1, 0.03] if optimizer == "sgd" else [3e-3, 1e-3]
    models = zoo_models({"seed": [0, 1], "lr": lrs, "weight_decay": [0.0, 1e-2], "optimizer": [optimizer]})
    models = [models[i] for i in (0, 3, 5, 6)]  # four models, each with its own seed, lr and weight decay
    together = train_population(one_population(models))
    for i, m in enumerate(models):
        alone = train_population(PopulationSpec((m,)))
        for k in together.weights:
            np.testing.assert_allclose(together.weights[k][i], alone.weights[k][0], atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(together.curves["test_loss"][i], alone.curves["test_loss"][0], atol=1e-5, rtol=1e-4)


def torch_optim_run(m, task, running=None):
    """The reference: one model, a plain torch.optim loop over the trainer's data order and schedule.

    `running`, a list, receives each epoch's mean training loss and accuracy over its batches."""
    f = m.factors
    model = init_model(m.arch, m.arch_config, f, task)
    x, y = task.load("train", seed=DATA_SEED)
    subset = train_subset(f["seed"], len(x), f["train_fraction"])
    n, bs = len(subset), min(f["batch_size"], len(subset))
    total = m.epochs * steps_per_epoch(n, f["batch_size"])
    if f["optimizer"] == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=f["lr"], momentum=f["momentum"], weight_decay=f["weight_decay"])
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=f["lr"], betas=(f["momentum"], 0.999), eps=1e-8,
                                weight_decay=f["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(f["lr_schedule"], t, total))
    model.train()
    for epoch in range(1, m.epochs + 1):
        order = subset[epoch_order(f["seed"], epoch, n)]
        loss_sum = correct = 0.0
        for s in range(0, n, bs):
            idx = order[s : s + bs]
            pred = model(x[idx])
            loss = task.loss(pred, y[idx])
            loss_sum += float(loss.detach()) * len(idx)
            correct += float((pred.argmax(-1) == y[idx]).sum())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if running is not None:
            running.append((loss_sum / n, correct / n))
    return model.state_dict()


@pytest.mark.parametrize("optimizer, schedule", [("sgd", "cosine"), ("adam", "warmup_cosine")])
def test_single_model_matches_torch_optim(optimizer, schedule):
    lr = 0.05 if optimizer == "sgd" else 3e-3
    (m,) = zoo_models({"seed": [3], "lr": [lr], "weight_decay": [1e-2], "momentum": [0.8], "optimizer": [optimizer],
                       "lr_schedule": [schedule], "train_fraction": [0.6], "batch_size": [24]}, epochs=3)
    result = train_population(PopulationSpec((m,)))
    ref = torch_optim_run(m, tasks.get_task("digits", n_train=N_TRAIN, n_val=100, n_test=100))
    for k, v in ref.items():
        np.testing.assert_allclose(result.weights[k][0, -1], v.numpy(), atol=2e-5, rtol=1e-4, err_msg=k)


@pytest.mark.parametrize("fast", [False, True])
def test_running_train_metrics_are_the_epochs_batch_means(fast):
    grid = {"seed": [3], "lr": [3e-3], "optimizer": ["adam"], "train_fraction": [0.6], "batch_size": [32]}
    (m,) = zoo_models(grid, epochs=3, train_metrics="running")  # 120 samples: batches of 32, 32, 32, 24
    (m_full,) = zoo_models(grid, epochs=3)
    run = train_population(PopulationSpec((m,)), fast=fast)
    full = train_population(PopulationSpec((m_full,)), fast=fast)
    ref = []
    torch_optim_run(m, tasks.get_task("digits", n_train=N_TRAIN, n_val=100, n_test=100), running=ref)
    ref_loss, ref_acc = np.array(ref).T
    np.testing.assert_allclose(run.curves["train_loss"][0, 1:], ref_loss, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run.curves["train_acc"][0, 1:], ref_acc, atol=1e-6)
    assert not np.allclose(full.curves["train_loss"][0, 1:], ref_loss, rtol=1e-3)  # the full pass is another figure
    # the same training: weights, val/test curves and the epoch-0 train pass agree with the full mode
    for k in full.weights:
        np.testing.assert_array_equal(run.weights[k], full.weights[k], err_msg=k)
    for name in ("val_loss", "test_acc"):
        np.testing.assert_array_equal(run.curves[name], full.curves[name], err_msg=name)
    assert run.curves["train_loss"][0, 0] == full.curves["train_loss"][0, 0]
    assert run.models[0]["train_metrics"] == "running" and full.models[0]["train_metrics"] == "full"
    assert run.models[0]["model_id"] == full.models[0]["model_id"]  # how a curve is measured is not a factor


def test_train_metrics_must_be_known():
    with pytest.raises(Exception, match=r"train_metrics = 'batches' is not allowed; expected one of full, running"):
        zoo_models({"seed": [0]}, train_metrics="batches")


def test_diverged_model_is_frozen_and_does_not_touch_the_others():
    models = zoo_models({"seed": [0, 1], "lr": [0.05, 1e30]})  # (0, .05), (0, 1e30), (1, .05), (1, 1e30)
    with_bad = train_population(one_population(models[:3]))
    without = train_population(one_population([models[0], models[2]]))
    assert [r["status"] for r in with_bad.models] == ["ok", "diverged", "ok"]
    for k in without.weights:  # bit for bit
        assert np.array_equal(with_bad.weights[k][[0, 2]], without.weights[k]), k
        assert np.isfinite(with_bad.weights[k][1]).all(), k  # frozen at its last finite state
    for name in without.curves:
        assert np.array_equal(with_bad.curves[name][[0, 2]], without.curves[name]), name


def test_checkpoints_curves_rows_and_progress():
    models = zoo_models({"seed": [0, 1], "dropout": [0.0, 0.3]}, epochs=3, checkpoints=[0, 2])
    calls = []
    r = train_population(one_population(models), progress=lambda e, n: calls.append((e, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert r.epochs == [0, 2, 3]
    names = {f"{s}_{m}" for s in ("train", "val", "test") for m in ("loss", "acc")}
    assert set(r.curves) == names == set(r.metrics)
    assert all(v.shape == (4, 4) for v in r.curves.values()) and all(v.shape == (4, 3) for v in r.metrics.values())
    np.testing.assert_array_equal(r.metrics["test_acc"], r.curves["test_acc"][:, [0, 2, 3]])
    task = tasks.get_task("digits", n_train=N_TRAIN, n_val=100, n_test=100)
    for i, m in enumerate(models):
        init = init_model(m.arch, m.arch_config, m.factors, task).state_dict()
        assert set(r.weights) == set(init)
        for k, v in init.items():
            assert r.weights[k].shape == (4, 3, *v.shape) and r.weights[k].dtype == np.float32
            np.testing.assert_array_equal(r.weights[k][i, 0], v.numpy())  # epoch 0 = at init
        assert not np.array_equal(r.weights["net.layers.0.weight"][i, 1], r.weights["net.layers.0.weight"][i, 0])
        row = r.models[i]
        assert row["model_id"] == m.model_id and row["status"] == "ok" and row["dropout"] == m.factors["dropout"]
        assert row["test_acc"] == r.curves["test_acc"][i, -1] and row["n_params"] == 16 * 64 + 16 + 10 * 16 + 10
    np.testing.assert_array_equal(r.weights["net.drops.0.p"][:, 0], np.float32([0.0, 0.3, 0.0, 0.3]))


def test_the_collector_spares_the_old_objects_while_epochs_run_and_only_then():
    """The epochs run with the objects alive before them frozen out of the garbage collector's passes (a pass over
    torch's modules costs tens of ms, started every few eager steps), and unfrozen after, also after an error."""
    import gc

    models = zoo_models({"seed": [0, 1]}, epochs=2)
    frozen = []
    gc.unfreeze()  # nothing frozen to begin with
    train_population(one_population(models), progress=lambda e, n: frozen.append(gc.get_freeze_count()))
    assert len(frozen) == 2 and min(frozen) > 10_000  # the imported modules' objects, at least
    assert gc.get_freeze_count() == 0

    def fail(e, n):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        train_population(one_population(models), progress=fail)
    assert gc.get_freeze_count() == 0
    gc.freeze()  # somebody else's freeze is left as it was
    train_population(one_population(models))
    assert gc.get_freeze_count() > 10_000
    gc.unfreeze()


def test_a_split_that_cannot_be_read_fails_once_with_a_short_traceback(monkeypatch):
    """The helper threads read the splits' size once before their draws: a failed read reaches the caller as
    the task's own error with its frames a few times, not once for each model's draw."""
    import traceback

    from tasks.images import DigitsTask

    def unreadable(self, split, seed=0):
        raise OSError(f"{split}: unreadable")

    monkeypatch.setattr(DigitsTask, "load", unreadable)
    with pytest.raises(OSError, match="unreadable") as info:
        train_population(one_population(zoo_models({"seed": list(range(12))}, epochs=1)))
    frames = traceback.extract_tb(info.value.__traceback__)
    assert sum(f.name == "unreadable" for f in frames) <= 3 and len(frames) < 40, len(frames)


def test_same_spec_same_weights_with_dropout_and_augmentation():
    models = zoo_models({"seed": [0, 1], "dropout": [0.2], "augmentation": [True], "train_fraction": [0.5]})
    a = train_population(one_population(models))
    b = train_population(one_population(models))
    for k in a.weights:
        assert np.array_equal(a.weights[k], b.weights[k]), k
    plain = train_population(one_population(zoo_models({"seed": [0, 1], "dropout": [0.2], "train_fraction": [0.5]})))
    assert not np.array_equal(a.weights["net.layers.0.weight"], plain.weights["net.layers.0.weight"])


def test_augmenter_moves_each_sample_by_its_own_element():
    task = tasks.get_task("digits", group="D4")
    models = tuple(zoo_models({"seed": [0, 1, 2]}))
    aug = Augmenter(task, models, n=40, device=torch.device("cpu"))
    els, which = aug.epoch(1)
    x, y = task.load("train")
    xb, yb = x[:120].reshape(3, 40, 1, 8, 8), y[:120].reshape(3, 40)
    out_x, out_y = aug(els, which, xb, yb)
    assert torch.equal(out_y, yb) and len(set(which.flatten().tolist())) == 8
    for i in range(3):
        for j in range(40):
            assert torch.equal(out_x[i, j], task.group.act_in(els[which[i, j]], xb[i, j : j + 1])[0])


def test_training_learns_digits():
    models = zoo_models({"seed": [0, 1], "lr": [0.1]}, arch={"name": "mlp", "config": {"width": 64, "depth": 1}},
                        epochs=5, task_options={"n_train": 1197, "n_val": 300, "n_test": 300})
    r = train_population(one_population(models))
    assert (r.curves["test_acc"][:, -1] > 0.8).all(), r.curves["test_acc"]
    assert (r.curves["train_loss"][:, -1] < r.curves["train_loss"][:, 0]).all()


def test_equivariance_regulariser_pulls_conv_kernels_to_the_equivariant_subspace():
    from zoos.equivariance import distance, projections

    models = zoo_models({"equiv_reg": [0.0, 5.0], "momentum": [0.0], "batch_size": [16]}, arch={"name": "cnn", "config": {"width": 4, "depth": 2}}, epochs=3)
    r = train_population(one_population(models))
    task = tasks.get_task("digits")
    proj = projections(init_model(models[0].arch, models[0].arch_config, models[0].factors, task), task.group,
                       task.input_shape)
    assert {"convs.0.weight", "convs.1.weight"} <= set(proj)
    d = distance(final_state(r, slice(None)), proj, batch_dims=1)
    for k in proj:
        assert d[k][1] < 0.01 * d[k][0], (k, d[k])


def test_bf16_runs_with_float32_master_weights_and_bad_precision_is_refused():
    pop = one_population(zoo_models({"seed": [0]}, epochs=1))
    r = train_population(pop, precision="bf16")
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in r.weights.values())
    assert r.curves["train_loss"][0, 1] < r.curves["train_loss"][0, 0]
    with pytest.raises(TrainError, match="fp16.*float32, bf16"):
        train_population(pop, precision="fp16")


def test_bf16_fast_program_with_bf16_resident_inputs_tracks_float32():
    """The fast program in bf16 keeps the resident inputs in bf16 (what autocast casts them to): the
    curves stay within bf16 rounding of the same models in float32."""
    pop = one_population(zoo_models({"seed": [0, 1]}, epochs=2))
    low = train_population(pop, precision="bf16", fast=True)
    full = train_population(pop, precision="float32", fast=True)
    for name in ("train_loss", "test_loss"):
        np.testing.assert_allclose(low.curves[name], full.curves[name], rtol=0.05, atol=0.02)
    assert (low.curves["train_loss"][:, -1] < low.curves["train_loss"][:, 0]).all()


def test_augmentation_with_a_lie_group_keeps_input_and_target_paired():
    task = tasks.get_task("inertia")
    models = tuple(expand(parse_zoo({"name": "z", "task": {"name": "inertia"}, "arch": {"name": "mlp"},
                                     "grid": {"seed": [0, 1]}, "epochs": 1}), "s"))
    aug = Augmenter(task, models, n=16, device=torch.device("cpu"))
    els, which = aug.epoch(1)
    x, y = task.load("train")
    xb, yb = x[:32].reshape(2, 16, 5, 4), y[:32].reshape(2, 16, 3, 3)
    out_x, out_y = aug(els, which, xb, yb)
    assert not torch.allclose(out_x, xb)
    torch.testing.assert_close(out_y.flatten(0, 1), task.target(out_x.flatten(0, 1)), atol=1e-4, rtol=1e-4)


def test_result_says_where_the_time_went():
    """timings: the plan, setup, first step, the other steps and evaluation, adding up to the wall (on a GPU the
    kernels compiled ahead and the steps before the first replay of the CUDA graph apart, as compile and
    graph_warmup); first_step_at: when the first step ended, counted from the call."""
    import time

    pop = one_population(zoo_models({"seed": [0, 1]}, epochs=2))
    t0 = time.perf_counter()
    res = train_population(pop)
    wall = time.perf_counter() - t0
    phases = {k: v for k, v in res.timings.items() if k != "first_step_at"}
    assert set(phases) == {"plan", "init", "setup", "evaluation", "first_step", "steps"}
    assert all(v >= 0 for v in phases.values())
    assert sum(phases.values()) <= wall
    before = phases["plan"] + phases["init"] + phases["setup"] + phases["first_step"]  # and the first evaluation, but not the last
    assert before <= res.timings["first_step_at"] <= wall


@pytest.mark.skipif(not popoptim.available("cuda" if torch.cuda.is_available() else "cpu"),
                    reason="needs Triton (GPU or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_optimizer_kernels_train_as_the_eager_update(optimizer):
    """With the population kernels on, the update runs as popoptim's kernels and trains the models the eager
    update trains, a diverging one frozen alike; the program records which update ran."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = zoo_models({"seed": [0, 1], "lr": [0.05, 1e30], "optimizer": [optimizer]})
    pop = one_population(models[:3])
    fused = train_population(pop, device=device, kernels=True)
    eager = train_population(pop, device=device, kernels=False)
    assert (fused.program["optimizer"], eager.program["optimizer"]) == ("popoptim", "eager")
    assert [r["status"] for r in fused.models] == [r["status"] for r in eager.models] == ["ok", "diverged", "ok"]
    for k in eager.weights:
        np.testing.assert_allclose(fused.weights[k], eager.weights[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the update is compiled on CUDA only")
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_compiled_update_equals_the_eager_one(optimizer):
    """The trainer's compiled optimizer step + divergence check (written in place) computes what the eager
    one returns, over steps whose count is a device tensor (one program), with a model diverging midway."""
    from zoos.trainer import OptimizerState, _compiled_update, _update

    gen = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (5, 3, 2), "a.bias": (5, 3), "b.weight": (5, 7)}
    params = {k: torch.randn(s, generator=gen).cuda() for k, s in shapes.items()}

    def zeros() -> dict:
        return {k: torch.zeros_like(v) for k, v in params.items()}

    wd, mom = (torch.tensor(v, device="cuda") for v in ([0.0, 1e-3, 0.0, 1e-2, 0.0], [0.9] * 5))
    lr = torch.full((5,), 1e-2, device="cuda")
    count = torch.zeros((), dtype=torch.float64, device="cuda")
    state = OptimizerState(zeros(), zeros() if optimizer == "adam" else {}, wd, mom, count,
                           torch.ones(5, dtype=torch.bool, device="cuda"))
    eager = (params, state)
    compiled = ({k: v.clone() for k, v in params.items()},  # updated in place
                state._replace(first=zeros(), second=zeros() if optimizer == "adam" else {}, alive=state.alive.clone()))
    for i in range(6):
        grads = {k: torch.randn(s, generator=gen).cuda() for k, s in shapes.items()}
        total = torch.zeros(5, device="cuda")
        if i == 3:
            total[2] = float("nan")  # model 2 diverges: frozen from here on
        count += 1
        eager = _update(optimizer, eager[0], grads, eager[1], lr, total)
        _compiled_update(optimizer)(compiled[0], grads, compiled[1], lr, total)
    assert eager[1].alive.tolist() == compiled[1].alive.tolist() == [True, True, False, True, True]
    pairs = [(compiled[0], eager[0]), (compiled[1].first, eager[1].first), (compiled[1].second, eager[1].second)]
    for got, want in pairs:
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("compile", [False, True])
def test_graphed_steps_train_exactly_as_eager_ones(dropout, compile, monkeypatch):
    """A population whose steps replay as a CUDA graph (popconv's kernels, eager or compiled, running
    metrics, a cosine schedule read on the device, dropout masks from the device generator) ends with the
    same weights and curves, to the bit, as one whose steps run eagerly; an epoch's short last batch runs
    eagerly between replays."""
    grid = {"seed": [0, 1, 2], "lr": [3e-3], "optimizer": ["adam"], "train_fraction": [0.6], "batch_size": [32],
            "lr_schedule": ["cosine"], "dropout": [dropout]}  # 120 samples: batches of 32, 32, 32, then 24
    models = zoo_models(grid, arch={"name": "cnn", "config": {"width": 4, "depth": 2}}, epochs=4,
                        train_metrics="running", checkpoints="0,2,last")
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda g: (replays.append(1), replay(g))[1])
    graphed = train_population(one_population(models), device="cuda", precision="bf16", graphs=True, compile=compile)
    assert graphed.program["compile"] == compile
    assert len(replays) == 4 * 3 - 3  # 3 full batches an epoch, the first 3 eager (compile, warm-up)
    eager = train_population(one_population(models), device="cuda", precision="bf16", graphs=False, compile=compile)
    assert len(replays) == 9
    for k in eager.weights:
        np.testing.assert_array_equal(graphed.weights[k], eager.weights[k], err_msg=k)
    for name in eager.curves:
        np.testing.assert_array_equal(graphed.curves[name], eager.curves[name], err_msg=name)
    assert (eager.curves["train_loss"][:, -1] < eager.curves["train_loss"][:, 0]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_a_capture_waits_for_the_helpers_draw(monkeypatch):
    """The next epoch's index draw, still under way when a step is to be captured as a CUDA graph, is waited for
    first: torch refuses a helper thread's pageable copy while a capture is under way (a run crashed at random)."""
    import time

    from zoos import trainer

    datas, pending_at_capture = [], []
    init, draw, begin = trainer._Data.__init__, trainer._Data._orders_of, torch.cuda.CUDAGraph.capture_begin

    def keep(self, *args, **kwargs):
        init(self, *args, **kwargs)
        datas.append(self)

    def late(self, epoch):
        time.sleep(0.3)  # still drawing when epoch 1's first full step (the 4th) is captured
        return draw(self, epoch)

    def capture_begin(graph, *args, **kwargs):
        pending_at_capture.append(sum(not f.done() for d in datas for f in (d._subsets, d._orders)))
        return begin(graph, *args, **kwargs)

    monkeypatch.setattr(trainer._Data, "__init__", keep)
    monkeypatch.setattr(trainer._Data, "_orders_of", late)
    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", capture_begin)
    grid = {"seed": [0, 1], "train_fraction": [0.6], "batch_size": [32]}  # 120 samples: 3 full batches an epoch
    models = zoo_models(grid, arch={"name": "cnn", "config": {"width": 4, "depth": 2}}, epochs=3)
    result = train_population(one_population(models), device="cuda", precision="bf16", graphs=True)
    assert pending_at_capture == [0]
    assert np.isfinite(result.curves["train_loss"]).all()


def test_graphs_are_refused_where_they_cannot_run_and_no_helper_is_left():
    import threading

    pop = one_population(zoo_models({"seed": [0]}, epochs=1))
    with pytest.raises(TrainError, match="graphs = true needs a CUDA device"):
        train_population(pop, graphs=True)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("symzoo-")]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_init_model_leaves_the_random_generators_as_they_were(device):
    """A model's init seeds the CPU generator inside fork_rng and touches no CUDA generator, so the
    trainer's own stream (dropout masks on the GPU) is not reseeded by whichever model was built last."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    m = zoo_models({"seed": [3]})[0]
    task = tasks.get_task(m.task, **m.task_options)
    state = torch.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state()
    first = init_model(m.arch, m.arch_config, m.factors, task).state_dict()
    after = torch.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state()
    assert torch.equal(after, state)
    again = init_model(m.arch, m.arch_config, m.factors, task).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_a_model_whose_loss_stays_at_its_start_is_marked_not_learned():
    """learned: the final training loss fell below LEARNED x its value at init (a model stuck at chance is ok,
    not diverged, but learned nothing: the summary leaves it out of zoo statistics)."""
    from zoos.trainer import LEARNED

    models = zoo_models({"seed": [0], "lr": [1e-9, 3e-3], "optimizer": ["adam"]}, epochs=3)
    result = train_population(one_population(models))
    by_lr = {m["lr"]: m for m in result.models}
    assert by_lr[1e-9]["status"] == "ok" and by_lr[1e-9]["learned"] is False
    assert by_lr[3e-3]["learned"] is True
    i = [m["lr"] for m in result.models].index(3e-3)
    assert result.curves["train_loss"][i, -1] < LEARNED * result.curves["train_loss"][i, 0]


def test_a_classifier_whose_accuracy_left_chance_learned_though_its_loss_fell_little():
    """One short epoch can take accuracy from chance (0.1) to 0.5 with the cross-entropy down 4%: learned. A model
    stuck near chance is not, nor is one whose lower-is-better metric moved (the loss says it for those)."""
    from tasks import get_task
    from zoos.trainer import learned_models

    curves = {"train_loss": np.array([[2.306, 2.206], [2.31, 2.30], [2.3, 1.2], [2.3, 2.29]]),
              "train_acc": np.array([[0.10, 0.52], [0.08, 0.103], [0.1, 0.1], [0.3, 0.62]])}
    assert learned_models(get_task("digits"), curves).tolist() == [True, False, True, True]
    regression = get_task("o5_regression")
    name = f"train_{regression.metric_name}"
    assert not regression.higher_is_better
    assert learned_models(regression, {"train_loss": np.array([[1.0, 0.99]]), name: np.array([[1.0, 0.1]])}).tolist() == [False]


def test_a_finite_loss_far_above_its_start_is_diverged():
    """lr 1e4: losses in the thousands and huge weights, all finite: diverged, as a user would say."""
    models = zoo_models({"seed": [0], "lr": [1e4, 1e-2], "optimizer": ["sgd"]}, epochs=2)
    result = train_population(one_population(models))
    by_lr = {m["lr"]: m for m in result.models}
    assert by_lr[1e4]["status"] == "diverged" and by_lr[1e-2]["status"] == "ok"


def test_a_population_beyond_the_devices_memory_trains_in_parts_with_the_same_models(monkeypatch):
    """When the device holds fewer models than the population (zoos.program.models_in_memory), it trains in
    parts one after another: the same models, weights and curves as at once, progress in whole-population epochs."""
    import zoos.trainer as trainer

    pop = one_population(zoo_models({"seed": [0, 1, 2, 3, 4], "lr": [3e-3]}, checkpoints=[0, 2]))
    whole = train_population(pop)
    monkeypatch.setattr(trainer, "memory_limit", lambda pop, device, data_dir=None: 2)
    seen, phases = [], []
    parts = train_population(pop, progress=lambda e, n: seen.append((e, n)), status=phases.append)
    assert parts.ids == whole.ids and parts.epochs == whole.epochs and parts.program["parts"] == 3
    for name in ("weights", "metrics", "curves"):
        for k, v in getattr(whole, name).items():
            np.testing.assert_allclose(getattr(parts, name)[k], v, rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")
    assert phases[0] == "training in 3 parts of <= 2 models (the device's free memory)"
    assert [e for e, _ in seen] == sorted(e for e, _ in seen) and seen[-1] == (2, 2)
    parts.validate()


def test_models_in_memory_counts_activations_and_optimizer_state():
    """The estimate: every activation of a model's batch at 4 bytes, and 16 bytes a parameter (weight, gradient,
    Adam's two moments); a vmap-only architecture has none."""
    from zoos.archs import build_arch
    from zoos.program import models_in_memory

    pop = one_population(zoo_models({"seed": [0, 1], "batch_size": [32]}))
    task = make_task(pop)
    n_params = build_arch("mlp", task, width=16, depth=1).num_params
    per_model = 4 * 32 * (64 + 16 + 16 + 16 + 10) + 16 * n_params  # input, hidden, activation, dropout, output
    assert models_in_memory(pop, task, int(per_model * 10 / 0.8)) == 10
    assert models_in_memory(pop, task, 1) == 1


def test_a_fresh_processs_first_population_imports_neither_dynamo_nor_sympy():
    """A worker's first population (its program traced from a template, the population kernels forward and
    backward, the optimizer's update) imports neither torch._dynamo nor sympy, which would add ~1.5 s to its
    first step."""
    code = """
import sys
import torch
from tests.zoos.test_trainer import one_population, zoo_models
from zoos.trainer import train_population
models = zoo_models({"seed": [0, 1], "batch_size": [16]}, arch={"name": "cnn", "config": {"width": 4, "depth": 2}},
                    epochs=1, task_options={"n_train": 32, "n_val": 16, "n_test": 16})
result = train_population(one_population(models), device="cuda" if torch.cuda.is_available() else "cpu",
                          kernels=True)
assert result.program["fast"] and result.program["optimizer"] == "popoptim", result.program
print(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"
