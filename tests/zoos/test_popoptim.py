"""zoos.popoptim: the optimizer step as Triton kernels equals the trainer's eager update (`_update`), the
freezing of models whose loss or new parameters are not finite included (Triton's interpreter on the CPU)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zoos import popoptim
from zoos.trainer import ADAM_BETA2, ADAM_EPS, OptimizerState, _update

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.skipif(not popoptim.available(DEVICE), reason="needs Triton (GPU or TRITON_INTERPRET=1)"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # the interpreter's numpy:
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")]  # inf / inf, the planted overflow

SHAPES = [(), (3,), (2, 5), (4, 3, 3), (1100,)]  # a model's parameter shapes; 1,100 spans two programs


def population(g, n, shapes, kind, step):
    """Parameters, gradients (one transposed, as a matmul's backward may give) and a mid-run optimizer state."""
    params = {f"p{i}": torch.randn(n, *s, generator=g) for i, s in enumerate(shapes)}
    grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    wide = [k for k, v in grads.items() if v.dim() == 3]
    for k in wide:  # a non-contiguous gradient
        grads[k] = torch.randn(n, *reversed(params[k].shape[1:]), generator=g).transpose(1, 2)
    lr = torch.rand(n, generator=g) * 0.1
    wd = torch.rand(n, generator=g) * 0.01
    mom = 0.5 + 0.49 * torch.rand(n, generator=g)
    state = OptimizerState(first={k: torch.randn(v.shape, generator=g) * 0.1 for k, v in params.items()},
                           second={k: torch.rand(v.shape, generator=g) * 0.01 for k, v in params.items()} if kind == "adam" else {},
                           weight_decay=wd, momentum=mom, count=torch.tensor(float(step), dtype=torch.float64),
                           alive=torch.ones(n, dtype=torch.bool))
    return params, grads, lr, state


def to(device, params, grads, lr, state):
    move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return move(params), move(grads), lr.to(device), OptimizerState(*(move(f) if isinstance(f, dict) else f.to(device) for f in state))


def fused(kind, params, grads, lr, state, total):
    """popoptim.step_ on copies: (params, state) after the step."""
    params = {k: v.clone() for k, v in params.items()}
    state = OptimizerState(*({k: v.clone() for k, v in f.items()} if isinstance(f, dict) else f.clone() for f in state))
    popoptim.step_(kind, params, grads, state.first, state.second, lr, state.weight_decay, state.momentum, state.count,
                   state.alive, total, beta2=ADAM_BETA2, eps=ADAM_EPS)
    return params, state


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(["adam", "sgd"]), n=st.integers(1, 4), shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3),
       step=st.integers(1, 3000), dead=st.sets(st.integers(0, 3)), bad_loss=st.sets(st.integers(0, 3)),
       bad_grad=st.sets(st.integers(0, 3)), seed=st.integers(0, 99))
def test_step_equals_the_eager_update(kind, n, shapes, step, dead, bad_loss, bad_grad, seed):
    """Every model's new parameters and state, and which models stay alive: models already frozen, with a
    non-finite loss or a NaN/inf gradient keep their tensors bit for bit; the others match the eager update."""
    g = torch.Generator().manual_seed(seed)
    params, grads, lr, state = population(g, n, shapes, kind, step)
    total = torch.rand(n, generator=g)
    for i in dead & set(range(n)):
        state.alive[i] = False
    for i in bad_loss & set(range(n)):
        total[i] = float("nan")
    first = next(iter(grads))
    for i in bad_grad & set(range(n)):
        grads[first][(i, *[0] * (grads[first].dim() - 1))] = float("inf") if i % 2 else float("nan")
    want_p, want_state = _update(kind, params, grads, state, lr, total)
    got_p, got_state = fused(kind, *to(DEVICE, params, grads, lr, state), total.to(DEVICE))
    assert got_state.alive.cpu().tolist() == want_state.alive.tolist()
    frozen = ~want_state.alive
    for name, got, want, old in [("params", got_p, want_p, params), ("first", got_state.first, want_state.first, state.first),
                                 ("second", got_state.second, want_state.second, state.second)]:
        assert got.keys() == want.keys(), name
        for k in want:
            torch.testing.assert_close(got[k].cpu(), want[k], rtol=2e-6, atol=1e-7, msg=lambda m: f"{name}[{k}]: {m}")
            assert torch.equal(got[k].cpu()[frozen], old[k][frozen]), f"{name}[{k}] of a frozen model was written"


def test_a_finite_step_that_overflows_freezes_the_model():
    """Finite gradients and state whose update overflows float32 (a huge first moment over a tiny second):
    the model is frozen at its last state, as the eager update's check on the new parameters does."""
    g = torch.Generator().manual_seed(0)
    params, grads, lr, state = population(g, 3, [(4,)], "adam", 10)
    params["p0"][1, 2], grads["p0"][1, 2] = 1.0, 0.0
    state.first["p0"][1, 2], state.second["p0"][1, 2] = -3e38, 0.0  # the step: lr m / eps
    total = torch.ones(3)
    want_p, want_state = _update("adam", params, grads, state, lr, total)
    assert want_state.alive.tolist() == [True, False, True]
    got_p, got_state = fused("adam", *to(DEVICE, params, grads, lr, state), total.to(DEVICE))
    assert got_state.alive.cpu().tolist() == [True, False, True]
    assert torch.equal(got_p["p0"].cpu()[1], params["p0"][1])
    torch.testing.assert_close(got_p["p0"].cpu(), want_p["p0"], rtol=2e-6, atol=1e-7)


def test_unknown_kind_and_wrong_state_dtype_are_refused():
    g = torch.Generator().manual_seed(0)
    params, grads, lr, state = population(g, 2, [(3,)], "adam", 1)
    params, grads, lr, state = to(DEVICE, params, grads, lr, state)
    args = (params, grads, state.first, state.second, lr, state.weight_decay, state.momentum, state.count, state.alive,
            torch.ones(2, device=DEVICE))
    with pytest.raises(ValueError, match="optimizer 'lamb' is not known; allowed: adam, sgd"):
        popoptim.step_("lamb", *args, beta2=ADAM_BETA2, eps=ADAM_EPS)
    params["p0"] = params["p0"].double()
    with pytest.raises(ValueError, match="parameter 'p0' is torch.float64 with strides .*; allowed: contiguous float32"):
        popoptim.step_("adam", *args, beta2=ADAM_BETA2, eps=ADAM_EPS)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_more_tensors_than_a_launch_takes(kind):
    """A population with more parameter tensors than one launch updates (popoptim.GROUP): a NaN gradient in the
    last launch's tensors freezes the model in the first launch's too; the others match the eager update."""
    g = torch.Generator().manual_seed(1)
    shapes = [SHAPES[i % len(SHAPES)] for i in range(popoptim.GROUP + 3)]
    params, grads, lr, state = population(g, 3, shapes, kind, 7)
    grads[f"p{len(shapes) - 1}"][2].view(-1)[-1] = float("nan")
    total = torch.rand(3, generator=g)
    want_p, want_state = _update(kind, params, grads, state, lr, total)
    assert want_state.alive.tolist() == [True, True, False]
    got_p, got_state = fused(kind, *to(DEVICE, params, grads, lr, state), total.to(DEVICE))
    assert got_state.alive.cpu().tolist() == [True, True, False]
    for k in want_p:
        torch.testing.assert_close(got_p[k].cpu(), want_p[k], rtol=2e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")
        torch.testing.assert_close(got_state.first[k].cpu(), want_state.first[k], rtol=2e-6, atol=1e-7)
        assert torch.equal(got_p[k].cpu()[2], params[k][2]), f"{k} of the frozen model was written"
