"""popgather: a weight prologue that only moves values, as gathers; one that computes, refused."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx
from torch.func import vmap

from tasks import get_task
from zoos import popgather
from zoos.archs import build_arch
from zoos.fastpop import FastPopulation
from zoos.functional import population_forward, stack_states, template

ROOT = Path(__file__).resolve().parents[2]
C4 = torch.tensor([1, 2, 3, 0])

MOVES = {
    "rotations stacked": (lambda w, b: (torch.stack([torch.rot90(w, k, (-2, -1)) for k in range(4)], 1).flatten(0, 1),
                                        b.repeat_interleave(4)), ()),
    "group axis re-indexed": (lambda w, b, c: (w[:, :, c].flip(-1).permute(1, 0, 2, 3, 4).reshape(-1, 3, 3), b[c]), (C4,)),
    "expanded, sliced, cat": (lambda w, b: (torch.cat([w[..., ::2, :], w[..., 1:, :]], -2).unsqueeze(0).expand(2, -1, -1, -1, -1, -1),
                                            b.unsqueeze(0).repeat(3, 1, 1)), ()),
    "the same value read twice": (lambda w, b: (w, w.transpose(-1, -2), b.roll(1)), ()),
}

COMPUTES = {
    "scaled": (lambda w, b: (2 * w, b), ()),
    "added to itself moved": (lambda w, b: (w + w.flip(-1), b), ()),
    "summed": (lambda w, b: (w.sum(0), b), ()),
    "a constant joined": (lambda w, b, c: (w, torch.cat([b.flatten(), c])), (C4,)),
    "cast": (lambda w, b: (w.to(torch.bfloat16).double(), b), ()),
    "zeros like": (lambda w, b: (torch.zeros_like(w), b), ()),
}

SHAPES = [(5, 2, 4, 3, 3), (5, 4)]  # a group conv's base filters and its biases


def traced(fn, n_consts):
    names = ["w", "b"] + [f"c{i}" for i in range(n_consts)]
    args = ", ".join(names)
    return fx.symbolic_trace(eval(f"lambda {args}: fn({args})", {"fn": fn}))


@pytest.mark.parametrize("name", MOVES)
def test_a_prologue_that_only_moves_runs_as_gathers_equal_to_vmap(name):
    """Output and gradient of the gathers are vmap's of the prologue (float64: exactly), each output contiguous."""
    fn, consts = MOVES[name]
    gather = popgather.plan(traced(fn, len(consts)), SHAPES, consts)
    assert gather is not None
    torch.manual_seed(0)
    w, b = (torch.randn(3, *s, dtype=torch.float64, requires_grad=True) for s in SHAPES)
    got = gather(w, b, *consts)
    want = vmap(fn, in_dims=(0, 0) + (None,) * len(consts))(w, b, *consts)
    assert len(got) == len(want)
    grads = [torch.randn_like(t) for t in want]
    for g, r in zip(got, want):
        assert g.is_contiguous() and g.shape == r.shape
        assert torch.equal(g, r)
    mine = torch.autograd.grad(got, (w, b), grads)
    theirs = torch.autograd.grad(want, (w, b), grads)
    for g, r in zip(mine, theirs):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", COMPUTES)
def test_a_prologue_that_computes_is_left_to_vmap(name):
    fn, consts = COMPUTES[name]
    assert popgather.plan(traced(fn, len(consts)), SHAPES, consts) is None


def test_a_weight_read_k_times_gets_the_sum_of_its_k_gradients():
    fn, _ = MOVES["rotations stacked"]
    gather = popgather.plan(traced(fn, 0), SHAPES)
    w, b = (torch.zeros(2, *s, requires_grad=True) for s in SHAPES)
    out = gather(w, b)
    gw, gb = torch.autograd.grad([o.sum() for o in out], (w, b))
    assert torch.equal(gw, torch.full_like(w, 4.0)) and torch.equal(gb, torch.full_like(b, 4.0))


@pytest.mark.parametrize("arch,prologue_ops", [("p4cnn", 42), ("p4mcnn", 71)])
def test_group_cnns_gather_their_kernels_and_equal_vmap(arch, prologue_ops):
    """The group CNNs' kernel expansions and repeated biases as gathers (under `vmapped`, as vmap): the population
    program's output and gradients equal vmap's of the models either way."""
    task = get_task("mnist")
    models = [build_arch(arch, task, width=4, depth=3) for _ in range(3)]
    params, buffers = stack_states(models)
    params = {k: v.requires_grad_() for k, v in params.items()}
    x = torch.randn(3, 2, *task.input_shape)
    module = template(models[0])
    want = population_forward(module, params, buffers, x, x_per_model=True)
    g = torch.randn_like(want)
    expected = torch.autograd.grad((want * g).sum(), list(params.values()))
    with popgather.vmapped():
        plain = FastPopulation(module, task.input_shape)
    for fast, how in ((FastPopulation(module, task.input_shape), "as one gather a step"), (plain, "vmapped over the models")):
        (layer, program, why), = [c for c in fast.choices if c[0] == "weights"]
        assert program == "prologue" and why.startswith(f"{prologue_ops} ops") and how in why
        got = fast(params, buffers, x, x_per_model=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, r in zip(torch.autograd.grad((got * g).sum(), list(params.values())), expected):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value,gathers", [("0", False), ("1", True)])
def test_the_environment_turns_the_gathers_off_for_a_process(value, gathers):
    code = ("import torch; from torch import fx; from zoos import popgather; "
            "g = fx.symbolic_trace(lambda w: (w.flip(0),)); print(popgather.plan(g, [(3, 2)]) is not None)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SYMZOO_POPGATHER": value}, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == str(gathers)


# one movement a step, on a 3-d weight [a, b, c]: each keeps three axes (so any order of them applies)
STEPS = {
    "rot90": lambda t, k: torch.rot90(t, k % 4, (1, 2)),
    "flip": lambda t, k: t.flip(k % 3),
    "transpose": lambda t, k: t.transpose(k % 3, (k + 1) % 3),
    "roll": lambda t, k: t.roll(k - 2, k % 3),
    "repeat": lambda t, k: t.repeat_interleave(1 + k % 2, k % 3),
    "slice": lambda t, k: t[:, ::1 + k % 2],
    "stack": lambda t, k: torch.stack([t, t.flip(-1)], 0).flatten(0, 1),
    "expand": lambda t, k: t[:1].expand(1 + k % 3, -1, -1),
}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(STEPS)), st.integers(0, 5)), min_size=1, max_size=5))
def test_any_chain_of_movements_gathers_as_vmap(chain):
    """A prologue of any chain of movements is planned, and its gathers give vmap's outputs and gradients."""
    def fn(w, b):
        for name, k in chain:
            w = STEPS[name](w, k)
        return w, b.flip(0)

    shapes = [(3, 4, 4), (5,)]
    gather = popgather.plan(fx.symbolic_trace(fn), shapes)
    assert gather is not None
    w, b = (torch.randn(2, *s, dtype=torch.float64, requires_grad=True) for s in shapes)
    got, want = gather(w, b), vmap(fn)(w, b)
    grads = [torch.randn_like(t) for t in want]
    assert all(torch.equal(g, r) for g, r in zip(got, want))
    for g, r in zip(torch.autograd.grad(got, (w, b), grads), torch.autograd.grad(want, (w, b), grads)):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
