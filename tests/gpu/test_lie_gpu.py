"""The Lie derivative on a GPU for every registered image architecture and every image flow: equal to
the CPU value and to a central finite difference (float64 on both devices). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from analysis.lie import IMAGE_FLOWS, finite_difference, image_flow, lie_derivative
from tasks import get_task
from tests.zoos.test_archs import CASES
from zoos.archs import build_arch
from zoos.functional import stack_states, template

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

IMAGE_CASES = [(a, t, o, c) for a, t, o, c, _ in CASES if get_task(t, **o).input_kind == "image"]


@pytest.mark.parametrize("arch,task_name,opts,config", IMAGE_CASES, ids=[f"{a}-{t}" for a, t, *_ in IMAGE_CASES])
def test_lie_derivative_on_the_gpu_equals_cpu_and_finite_difference(arch, task_name, opts, config):
    torch.manual_seed(0)
    task = get_task(task_name, **opts)
    models = [build_arch(arch, task, **config).double() for _ in range(2)]
    params, buffers = stack_states(models)
    module = template(models[0])
    x = torch.rand(3, *task.input_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gpu = {k: v.cuda() for k, v in params.items()}, {k: v.cuda() for k, v in buffers.items()}
    for kind in IMAGE_FLOWS:
        flow = image_flow(kind)
        cpu = lie_derivative(module, params, buffers, x, flow)  # the template holds no weights: any device's run
        cuda = lie_derivative(module, *gpu, x.cuda(), flow).cpu()
        scale = cpu.abs().max().item()
        assert scale > 0, f"{arch} {kind}: no model of a plain architecture commutes with every small {kind}"
        torch.testing.assert_close(cuda, cpu, rtol=1e-8, atol=1e-10 * scale)
        fd = finite_difference(module, *gpu, x.cuda(), flow, h=1e-7).cpu()
        torch.testing.assert_close(cuda, fd, rtol=1e-3, atol=1e-4 * scale)
