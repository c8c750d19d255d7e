"""A transformer zoo's GPU paths: `zoos.archs.transformers.attend` (zoos.popattn's kernel for short sequences and
narrow heads, the fused flash kernel for longer ones) against the plain products it replaces, and population
programs that run it (and their LayerNorms as popnorm) against vmap. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, vmap

from tests.zoos.test_archs import training_without_dropout
from tests.zoos.test_program import _population, _targets
from zoos.archs.transformers import attend
from zoos.program import choose_program

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,tokens,head_dim", [(6, 50, 8), (6, 17, 4), (6, 65, 16), (3, 128, 64), (4100, 16, 8),
                                                   (6, 200, 8)])
def test_attention_equals_the_plain_products(batch, tokens, head_dim, dtype):
    """popattn up to its limits (4100 x 3 problems: several a program), the flash kernel past them (200 tokens)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, 3, tokens, head_dim, device="cuda").to(dtype).requires_grad_() for _ in range(3))
    g = torch.randn(batch, 3, tokens, head_dim, device="cuda").to(dtype)
    scale = head_dim ** -0.5
    got = attend(q, k, v, scale)
    got_grads = torch.autograd.grad(got, (q, k, v), g)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = (qf @ kf.transpose(-2, -1) * scale).softmax(-1) @ vf
    want_grads = torch.autograd.grad(want, (qf, kf, vf), g.float())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(("output", "dq", "dk", "dv"), (got, *got_grads), (want, *want_grads)):
        err = ((a.float() - b).norm() / b.norm()).item()
        assert err < tol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("arch,task_name,config", [("vit", "mnist", dict(width=8, depth=2, heads=2, patch=7)),
                                                    ("set_transformer", "convex_hull", dict(width=16, depth=2, heads=2))])
def test_transformer_population_program_on_the_kernels_equals_vmap(arch, task_name, config):
    """MNIST's 7x7 patches (17 tokens of head_dim 4), a convex hull's 16 points (head_dim 8): the program runs
    attention on popattn and the norms on popnorm; vmap (under torch.func) runs the plain products."""
    task, module, params, buffers = _population(arch, task_name, {}, config)
    params, buffers = {k: v.cuda() for k, v in params.items()}, {k: v.cuda() for k, v in buffers.items()}
    program = choose_program(module, task, "cuda", fast=True, kernels=True, compile=False, dropout=False, arch=arch)
    assert program.fast, program.reason
    programs = [p for _, p, _ in program.step.pop.choices]
    assert programs.count("add+popnorm") == 4 and programs.count("popnorm") == 1  # every LayerNorm on the kernel
    x = torch.randn(3, 4, *task.input_shape, generator=torch.Generator().manual_seed(1)).cuda()
    y = _targets(task, 3, 4).cuda()

    def one(p, b, xb, yb):
        return task.loss(functional_call(module, (p, b), (xb,)), yb)

    training_without_dropout(module)
    grads, _ = program.step(params, buffers, x, y)
    want = vmap(grad(one))(params, buffers, x, y)
    for k in want:
        scale = want[k].abs().max().item()
        torch.testing.assert_close(grads[k], want[k], atol=1e-5 * (1 + scale), rtol=1e-3, msg=lambda m: f"{k}: {m}")
