"""Every registered task, by one generic check of what the `Task` interface promises: the shapes and dtypes of
each split, the same tensors for the same seed, a loss and a metric that score a perfect prediction as such,
a symmetry group whose action on inputs and outputs is an action, and ground truth equivariant under it."""

import numpy as np
import pytest
import torch

from tasks import TASKS, get_task
from tasks.base import SPLITS
from tasks.groups import element_list
from tests.tasks.datafiles import write_cifar, write_mnist, write_svhn

SMALL = {"n_train": 24, "n_val": 16, "n_test": 16}
FILES = {"n_val": 8}  # the tiny files below hold 30 (CIFAR-10: 20) training images
# Each registered task with options that keep it cheap; the file-backed ones read tiny files in their formats.
CASES = {
    "digits": {**SMALL, "variant": "rotated"},
    "mnist": FILES,
    "fashion_mnist": FILES,
    "cifar10": FILES,
    "svhn": FILES,
    "o5_regression": SMALL,
    "inertia": SMALL,
    "modified_inertia": SMALL,
    "lorentz": SMALL,
    "convex_hull": SMALL,
    "nbody": SMALL,
    "inr": {**SMALL, "image": 3, "group": "D4"},
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    write_mnist(root / "mnist", rng)
    write_mnist(root / "fashion_mnist", rng)
    write_cifar(root / "cifar-10-batches-py", rng)
    write_svhn(root / "svhn", rng)
    return str(root)


def test_every_registered_task_has_a_case():
    assert set(TASKS) == set(CASES)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    """Equal up to `tol` relative to b's largest entry (sampled Lie group elements are float32 matrices)."""
    return bool((a - b).abs().max() <= tol * b.abs().max().clamp_min(1e-12))


def _perfect(task, y: torch.Tensor) -> torch.Tensor:
    """The prediction a perfect model makes: the target itself, or logits that put the true class first."""
    return torch.nn.functional.one_hot(y, task.output_shape[0]).float() if task.kind == "classification" else y


@pytest.mark.parametrize("name", sorted(CASES))
def test_task_contract(name, data_dir):
    options = {**CASES[name], **({"data_dir": data_dir} if "data_dir" in TASKS[name].options else {})}
    task = get_task(name, **options)
    assert task.name == name and task.config() == {"name": name, **options}
    assert task.per_model is None or task.per_model in TASKS[name].options

    for split in SPLITS:
        x, y = task.load(split, seed=1)
        n = len(x)
        assert n > 0 and x.dtype == torch.float32 and x.shape == (n, *task.input_shape) and x.isfinite().all()
        if task.kind == "classification":
            assert y.dtype == torch.int64 and y.shape == (n,) and 0 <= y.min() and y.max() < task.output_shape[0]
        else:
            assert y.dtype == torch.float32 and y.shape == (n, *task.output_shape) and y.isfinite().all()
        again = get_task(name, **options).load(split, seed=1)  # the same seed, the same tensors, in a fresh task
        assert torch.equal(again[0], x) and torch.equal(again[1], y)

    # a perfect prediction scores as one: the lowest loss and the best metric against a wrong one
    x, y = task.load("val", seed=1)
    perfect, wrong = _perfect(task, y), _perfect(task, y).flip(0) + 1.0
    assert task.loss(perfect, y) < task.loss(wrong, y)
    assert (task.metric(perfect, y) > task.metric(wrong, y)) == task.higher_is_better

    # the group acts: the identity does nothing, an element is undone by its inverse, g(h x) = (g h) x;
    # outputs (the prediction's layout) likewise; where the task knows its ground truth, it is equivariant
    group, x64, out = task.group, x.double(), perfect.double()
    els = list(element_list(group, 3, torch.Generator().manual_seed(0)))
    for act, z in ((group.act_in, x64), (group.act_out, out)):
        assert torch.equal(act(group.identity(), z), z)
        for g in els:
            assert act(g, z).shape == z.shape
            assert _close(act(group.inverse(g), act(g, z)), z)
            assert _close(act(group.compose(g, els[0]), z), act(g, act(els[0], z)))
    fx = task.target(x64)
    if fx is not None:
        torch.testing.assert_close(fx.float(), y)
        assert all(_close(task.target(group.act_in(g, x64)), group.act_out(g, fx)) for g in els)
