"""Tasks, case by case (test_registry.py checks every task's contract): data is deterministic per seed; digits
variants rotate what they say; options are validated."""

import time

import pytest
import torch

import tasks
from tasks import TASKS, TaskError, get_task
from tasks.generated import inertia_matrix, simulate_charged
from tasks.groups import OrthogonalGroup

SMALL = {"n_train": 24, "n_val": 16, "n_test": 16}
GENERATED = ["o5_regression", "inertia", "modified_inertia", "lorentz", "convex_hull", "nbody"]
FILE_TASKS = {"mnist", "fashion_mnist", "cifar10", "svhn"}


def test_registry_holds_every_task_and_construction_is_cheap(monkeypatch):
    assert set(GENERATED) | {"digits"} | FILE_TASKS <= set(TASKS)
    monkeypatch.delenv("SYMZOO_DATA", raising=False)  # file tasks must build without their files
    start = time.perf_counter()
    built = [get_task(name) for name in TASKS]
    assert time.perf_counter() - start < 1.0
    for task in built:
        assert task.metric_name in ("acc", "rel_mse", "psnr") and task.input_kind in ("image", "points", "vector")


def test_modified_inertia_breaks_o3():
    """Exact under O(2) about z, clearly not under O(3): the point of the task."""
    task = get_task("modified_inertia", **SMALL)
    x = task.load("val")[0].double()
    o3 = OrthogonalGroup(3, "s,v", "matrix")
    errs = [(task.target(o3.act_in(g, x)) - o3.act_out(g, task.target(x))).abs().max() for g in o3.sample(4)]
    assert min(errs) > 0.05 * task.target(x).abs().max()


@pytest.mark.parametrize("name", GENERATED + ["digits"])
def test_loading_is_deterministic_per_seed_and_split(name):
    opts = SMALL if name != "digits" else {"n_train": 100, "n_val": 50, "n_test": 50, "variant": "rotated"}
    a, b = get_task(name, **opts), get_task(name, **opts)
    for split in ("train", "val", "test"):
        xa, ya = a.load(split, seed=3)
        xb, yb = b.load(split, seed=3)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.load("val", seed=3)[0], a.load("val", seed=4)[0])
    assert not torch.equal(a.load("train", seed=3)[0][:16], a.load("val", seed=3)[0][:16])


def test_loaded_tensors_are_copies():
    task = get_task("o5_regression", **SMALL)
    x, _ = task.load("train")
    x.zero_()
    assert task.load("train")[0].abs().sum() > 0


def test_known_values():
    x = torch.tensor([[[1.0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0]]])
    y = get_task("o5_regression").raw_target(x)
    assert torch.allclose(y, torch.tensor([[torch.sin(torch.tensor(1.0)) - 4.0]]))
    point = torch.tensor([[[2.0, 1.0, 0.0, 0.0]]])  # mass 2 at (1, 0, 0)
    assert torch.allclose(inertia_matrix(point), torch.diag(torch.tensor([0.0, 2.0, 2.0]))[None])
    simplex = torch.zeros(1, 16, 5)
    simplex[0, 1:6] = torch.eye(5)
    simplex[0, 6:] = 0.05  # interior points do not change the hull
    assert torch.allclose(get_task("convex_hull").raw_target(simplex), torch.tensor([[1 / 120]]), rtol=1e-5)


def test_nbody_centre_of_mass_moves_uniformly():
    """Pairwise forces cancel, so the mean position moves at the mean initial velocity."""
    task = get_task("nbody", n_steps=200, **SMALL)
    x = task.load("val")[0].double()
    end = simulate_charged(x, 200, 0.001, 0.1)
    expected = x[..., :3].mean(1) + 0.2 * x[..., 3:6].mean(1)
    assert torch.allclose(end.mean(1), expected, atol=1e-10)
    assert (end - x[..., :3]).abs().max() > 1e-2  # and the particles did move


def test_standardised_targets_have_unit_scale():
    task = get_task("o5_regression", n_train=2000, n_val=0, n_test=0)
    y = task.load("train")[1]
    assert abs(float(y.mean())) < 0.1 and 0.9 < float(y.std()) < 1.1


def test_digits_splits_are_disjoint_and_stratified():
    task = get_task("digits")
    xs = {s: task.load(s, seed=0) for s in ("train", "val", "test")}
    assert xs["train"][0].shape == (1197, 1, 8, 8) and xs["val"][0].shape == (300, 1, 8, 8)
    assert 0 <= float(xs["train"][0].min()) and float(xs["train"][0].max()) <= 1
    flat = torch.cat([xs[s][0].flatten(1) for s in xs])
    assert len(torch.unique(flat, dim=0)) >= len(flat) - 5  # digits has a handful of duplicate images
    counts = torch.bincount(xs["val"][1], minlength=10)
    assert counts.min() >= 28 and counts.max() <= 32  # 300 images, 10 balanced classes


def _in_orbit(group, img, ref):
    return any(torch.equal(group.act_in(g, ref), img) for g in group.elements())


@pytest.mark.parametrize("group", ["C4", "D4"])
def test_digits_variants(group):
    sizes = {"n_train": 60, "n_val": 40, "n_test": 40}
    up = get_task("digits", group=group, **sizes)
    rot = get_task("digits", group=group, variant="rotated", **sizes)
    aug = get_task("digits", group=group, variant="augmented", **sizes)
    assert torch.equal(rot.load("train")[0], up.load("train")[0])
    for split in ("val", "test"):
        (xu, yu), (xr, yr) = up.load(split), rot.load(split)
        assert torch.equal(yu, yr)
        assert all(_in_orbit(rot.group, xr[i], xu[i]) for i in range(len(xu)))
        moved = sum(not torch.equal(xr[i], xu[i]) for i in range(len(xu)))
        assert moved >= len(xu) // 2  # identity is drawn 1/4 or 1/8 of the time
    xa, xu = aug.load("train")[0], up.load("train")[0]
    assert all(_in_orbit(aug.group, xa[i], xu[i]) for i in range(len(xu))) and not torch.equal(xa, xu)


def test_options_are_validated():
    with pytest.raises(TaskError, match="no option 'bogus'"):
        get_task("digits", bogus=1)
    with pytest.raises(TaskError, match="group='C8'"):
        get_task("digits", group="C8")
    with pytest.raises(TaskError, match="variant='sideways'"):
        get_task("digits", variant="sideways")
    with pytest.raises(TaskError, match="at most 1797"):
        get_task("digits", n_train=2000)
    with pytest.raises(TaskError, match="n_val=-1"):
        get_task("inertia", n_val=-1)
    with pytest.raises(TaskError, match="split='dev'"):
        get_task("o5_regression", **SMALL).load("dev")
    with pytest.raises(TaskError, match="unknown task"):
        get_task("imagenet")


def test_config_round_trips():
    task = get_task("lorentz", n_train=8, max_rapidity=0.5)
    again = get_task(**task.config())
    assert again.group.max_rapidity == 0.5 and torch.equal(again.load("train")[0], task.load("train")[0])


def test_package_exports():
    assert tasks.get_task is get_task
