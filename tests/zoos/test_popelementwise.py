"""zoos.popelementwise: a broadcasting add, sub, mul or div gives PyTorch's result and gradients, whatever the
operands' shapes and strides (Triton's interpreter on the CPU, as tests/conftest.py sets it), and a population
program running its broadcasting ops on it equals vmap."""

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch.func import functional_call, grad, vmap

from tests.zoos.test_program import _population, _targets
from zoos import popelementwise
from zoos.program import choose_program

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not popelementwise.available(DEVICE), reason="needs Triton (GPU or TRITON_INTERPRET=1)")


def _operand(shape, keep, lead, strided, g):
    """A tensor of `shape` with the axes not in `keep` of size 1 and the first `lead` axes dropped (as broadcasting
    allows), contiguous or a slice of a wider tensor's last axis."""
    dims = [n if k else 1 for n, k in zip(shape, keep)][lead:]
    if strided:
        return torch.randn(*dims[:-1], dims[-1] + 3, generator=g)[..., 1:dims[-1] + 1]
    return torch.randn(dims, generator=g)


def _same(got, want):
    """PyTorch's result to the bit; on the CPU Triton's interpreter truncates float32 to bf16 where a GPU rounds,
    so there a bf16 result may sit one unit in the last place off."""
    if got.dtype == torch.bfloat16 and got.device.type == "cpu":
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(got, want), (got - want).abs().max()


@settings(max_examples=25, deadline=None)
@example(shape=[64, 5, 5, 32], keep_a=[1, 1, 0, 1], keep_b=[1, 0, 1, 1], lead_b=0, op="add", dtype="bfloat16",
         strided=False, seed=0)  # EGNN's pair sum
@example(shape=[64, 5, 5, 32], keep_a=[1, 1, 1, 1], keep_b=[0, 1, 1, 0], lead_b=1, op="mul", dtype="float32",
         strided=True, seed=1)  # its mask
@example(shape=[2, 3, 4, 5, 6], keep_a=[1, 0, 1, 0, 1], keep_b=[0, 1, 0, 1, 1], lead_b=0, op="div", dtype="float32",
         strided=False, seed=2)  # five axes that do not merge
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=5), keep_a=st.lists(st.booleans(), min_size=5, max_size=5),
       keep_b=st.lists(st.booleans(), min_size=5, max_size=5), lead_b=st.integers(0, 2),
       op=st.sampled_from(popelementwise.OPS), dtype=st.sampled_from(["float32", "bfloat16"]), strided=st.booleans(),
       seed=st.integers(0, 99))
def test_a_broadcasting_op_gives_pytorchs_result_and_gradients(shape, keep_a, keep_b, lead_b, op, dtype, strided, seed):
    """Any broadcast of two operands (axes of one, dropped leading axes, a strided slice) whose axes coalesce to
    MAX_AXES or fewer: the kernel's forward is PyTorch's to the bit, its gradients PyTorch's to rounding; with more
    axes `runs_here` leaves it to PyTorch."""
    g = torch.Generator().manual_seed(seed)
    a = _operand(shape, [True] + list(keep_a[1:]), 0, strided, g).to(DEVICE, getattr(torch, dtype))
    b = _operand(shape, keep_b, min(lead_b, len(shape) - 1), False, g).to(DEVICE, getattr(torch, dtype))
    assume(a.shape != b.shape)
    if op == "div":
        b = b.sign() * (b.abs() + 0.5)  # away from 0
    a, b = a.requires_grad_(), b.requires_grad_()
    want = popelementwise._TORCH[op](a, b)
    full = torch.broadcast_shapes(a.shape, b.shape)
    axes, _ = popelementwise._layout(tuple(full), popelementwise._expanded_strides(a, full),
                                     popelementwise._expanded_strides(b, full))
    if len(axes) > popelementwise.MAX_AXES:
        assert not popelementwise.runs_here(a, b)
        return
    got = popelementwise._pop_binary(a, b, op)
    assert got.shape == want.shape and got.dtype == want.dtype
    _same(got, want)
    dy = torch.randn(want.shape, generator=g).to(DEVICE, want.dtype)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == "bfloat16" else dict(rtol=1e-5, atol=1e-5)
    for x, r, name in zip(torch.autograd.grad(got, (a, b), dy), torch.autograd.grad(want, (a, b), dy), "ab"):
        assert x.shape == r.shape and x.dtype == r.dtype
        torch.testing.assert_close(x.float(), r.float(), **tol, msg=lambda m: f"d{name}: {m}")


def test_what_runs_on_the_kernel_and_what_is_left_to_pytorch():
    """Different shapes of float32 / bf16 / float16, an output of LEAST_ELEMENTS or more, MAX_AXES coalesced axes:
    the kernel; same shapes, float64, small outputs, more axes: PyTorch's op (the same result)."""
    big = torch.randn(128, 5, 5, 32, device=DEVICE)
    mask = torch.randn(5, 5, 1, device=DEVICE)
    assert popelementwise.runs_here(big, mask) and popelementwise.runs_here(big.bfloat16(), mask)
    assert not popelementwise.runs_here(big, big)
    assert not popelementwise.runs_here(big.double(), mask.double())
    assert not popelementwise.runs_here(big[:2], mask)  # 1,600 elements
    # [16, 10, 12, 10, 16]: five axes, every other one broadcast in each operand, so none merge
    assert not popelementwise.runs_here(torch.randn(16, 1, 12, 1, 16, device=DEVICE), torch.randn(10, 1, 10, 1, device=DEVICE))
    torch.testing.assert_close(popelementwise.binary("mul", big.double(), mask.double()), big.double() * mask.double())
    with pytest.raises(ValueError, match="op = 'pow': one of add, sub, mul, div"):
        popelementwise.binary("pow", big, mask)


def test_the_op_passes_torch_library_opcheck():
    a = torch.randn(4, 3, 1, 8, device=DEVICE, requires_grad=True)
    b = torch.randn(4, 1, 5, 8, device=DEVICE, requires_grad=True)
    for op in popelementwise.OPS:
        torch.library.opcheck(popelementwise._pop_binary.op, (a, b, op))


def test_egnn_with_its_broadcasting_ops_on_the_kernel_equals_vmap(monkeypatch):
    """The population program of EGNN (pair sums, masks, coordinate steps: every broadcasting op on the kernel,
    however small) gives vmap's forward and gradients."""
    monkeypatch.setattr(popelementwise, "LEAST_ELEMENTS", 1)
    task, module, params, buffers = _population("egnn", "nbody", {}, {})
    program = choose_program(module, task, DEVICE, fast=True, kernels=True, compile=False, dropout=False, arch="egnn")
    assert sum(p == "popelementwise" for _, p, _ in program.layers) >= 10, program.layers
    params = {k: v.to(DEVICE) for k, v in params.items()}
    buffers = {k: v.to(DEVICE) for k, v in buffers.items()}
    x = torch.randn(3, 4, *task.input_shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    y = _targets(task, 3, 4).to(DEVICE)
    with torch.no_grad():
        ref = vmap(lambda p, b, xb: functional_call(module, (p, b), (xb,)))(params, buffers, x)
        torch.testing.assert_close(program.step.pop(params, buffers, x, x_per_model=True), ref, atol=1e-5, rtol=1e-4)
    want = vmap(grad(lambda p, b, xb, yb: task.loss(functional_call(module, (p, b), (xb,)), yb)))(params, buffers, x, y)
    grads, _ = program.step(params, buffers, x, y)
    for k in want:
        torch.testing.assert_close(grads[k], want[k], atol=1e-5 * (1 + want[k].abs().max().item()), rtol=1e-3,
                                   msg=lambda m: f"{k}: {m}")
