"""A transformer zoo's GPU paths: attention's fused kernel (`zoos.archs.transformers.attend`, taken where the
scores outweigh q, k and v) against the plain products it replaces, and a ViT population program that runs it
(and its LayerNorms as popnorm) against vmap. Skipped without CUDA."""

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
@pytest.mark.parametrize("tokens,head_dim", [(50, 8), (17, 4), (65, 16)])
def test_fused_attention_equals_the_plain_products(tokens, head_dim, dtype):
    assert tokens > 3 * head_dim  # the fused kernel's side of the rule
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 3, tokens, head_dim, device="cuda").to(dtype).requires_grad_() for _ in range(3))
    g = torch.randn(6, 3, tokens, head_dim, device="cuda").to(dtype)
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


def test_vit_population_program_with_fused_attention_equals_vmap():
    """MNIST's 7x7 patches: 17 tokens of head_dim 4, so every block's attention runs the fused kernel."""
    task, module, params, buffers = _population("vit", "mnist", {}, dict(width=8, depth=2, heads=2, patch=7))
    params, buffers = {k: v.cuda() for k, v in params.items()}, {k: v.cuda() for k, v in buffers.items()}
    program = choose_program(module, task, "cuda", fast=True, kernels=True, compile=False, dropout=False, arch="vit")
    assert program.fast, program.reason
    assert [p for _, p, _ in program.step.pop.choices].count("popnorm") == 5  # every LayerNorm on the kernel
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
