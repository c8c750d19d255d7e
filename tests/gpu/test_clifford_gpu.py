"""cgenn's GPU path: its geometric products as the dense right-multiplication matmuls or, enabled, on
`zoos.popbilinear` (one pass over the Cayley table's terms), whose grades the next layer's linears read where they
lie (poplinear's two-level rows), in population programs against vmap (under torch.func: the dense products).
Skipped without CUDA."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.func import functional_call, grad, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from tests.zoos.test_program import _population, _targets
from zoos import popbilinear
from zoos.program import choose_program

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


class _Ops(TorchDispatchMode):
    """Counts the ops a block dispatches, and keeps the shapes of the copies among them."""

    def __init__(self):
        super().__init__()
        self.ops, self.copies = Counter(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if name == "aten.clone":
            self.copies.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize("task_name,config", [("convex_hull", dict(width=8, depth=3)), ("nbody", dict(width=8, depth=2)),
                                              ("lorentz", dict(width=8, depth=2))])
def test_cgenn_population_program_on_the_kernels_equals_vmap(task_name, config, bilinear):
    """A set with a shared context (convex hull, O(5): grades up to 4), per-point vector outputs (n-body), the points
    as one multivector's channels (Lorentz, O(1,3)): the gradients equal vmap's; with popbilinear every layer's
    product runs as one of its ops and the grades reach the linears without a copy."""
    with popbilinear.using(bilinear):
        _program_equals_vmap(task_name, config, bilinear)


def _program_equals_vmap(task_name, config, bilinear):
    task, module, params, buffers = _population("cgenn", task_name, {}, config)
    params, buffers = {k: v.cuda() for k, v in params.items()}, {k: v.cuda() for k, v in buffers.items()}
    program = choose_program(module, task, "cuda", fast=True, kernels=True, compile=False, dropout=False, arch="cgenn")
    assert program.fast, program.reason
    x = torch.randn(3, 4, *task.input_shape, generator=torch.Generator().manual_seed(1)).cuda()
    y = _targets(task, 3, 4).cuda()

    def one(p, b, xb, yb):
        return task.loss(functional_call(module, (p, b), (xb,)), yb)

    with _Ops() as seen:
        grads, _ = program.step(params, buffers, x, y)
    assert seen.ops["symzoo.pop_bilinear"] == seen.ops["symzoo.pop_bilinear_backward"] == (config["depth"] if bilinear else 0)
    if bilinear:
        c_in = module.layers[0].left.grades[0].in_features  # the embedding's grades are copied once, later layers' not
        per_point = [shape for shape in seen.copies if len(shape) == 4 and shape[1] > 1 and shape[-1] != c_in]
        assert not per_point, f"points' features copied: {per_point}"
    want = vmap(grad(one))(params, buffers, x, y)
    for k in want:
        scale = want[k].abs().max().item()
        torch.testing.assert_close(grads[k], want[k], atol=1e-5 * (1 + scale), rtol=1e-3, msg=lambda m: f"{k}: {m}")
