"""A population's LayerNorm on narrow rows (a transformer zoo's tokens): torch's layer_norm + per-model affine
against zoos.popnorm.layer_norm.

    python benchmarks/norm_bench.py            # CUDA machine, ~20 s

A population program normalises its [N*B, T, D] batch, each model's rows with that model's affine. Without the
kernel, zoos.fastpop runs F.layer_norm on the float32 batch (one thread block a row) and then the affine as two
broadcast ops (`pop_layer_norm`); popnorm.layer_norm is one pass forward and one back, many rows a program. For
each width D: 256 models, 2^26 / D rows of bf16 input (a bf16 program's stream), float32 output, forward +
backward (gradients to x, w and b), CUDA events, median of 20 after a warm-up; ms, the ratio, the largest
difference of the outputs, and each form's effective bandwidth (the bytes a fused pass must move: x and y
forward, x, dy and dx backward) against the card's.
"""

from __future__ import annotations

import torch

from popconv_bench import timed  # the script's folder is on the path: CUDA events, median of 20
from zoos import popnorm
from zoos.fastpop import pop_layer_norm

MODELS = 256


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {MODELS} models, bf16 in, float32 out")
    print(f"{'D':>6} {'rows':>10} {'torch ms':>9} {'popnorm ms':>11} {'ratio':>7} {'max diff':>9} "
          f"{'torch GB/s':>11} {'popnorm GB/s':>13}")
    for d in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096):
        rows = 2**26 // d
        x = torch.randn(rows, d, device="cuda").mul(3).add(1).bfloat16().requires_grad_()
        w = (1 + 0.1 * torch.randn(MODELS, d, device="cuda")).requires_grad_()
        b = (0.1 * torch.randn(MODELS, d, device="cuda")).requires_grad_()
        g = torch.randn(rows, d, device="cuda")

        def eager():
            torch.autograd.grad(pop_layer_norm(x, (d,), w, b, 1e-5), (x, w, b), g)

        def kernel():
            torch.autograd.grad(popnorm.layer_norm(x, (d,), w, b, 1e-5), (x, w, b), g)

        with torch.no_grad():
            diff = (pop_layer_norm(x, (d,), w, b, 1e-5) - popnorm.layer_norm(x, (d,), w, b, 1e-5)).abs().max().item()
        a, k = timed(eager), timed(kernel)
        moved = rows * d * (2 + 4 + 2 + 4 + 2)  # bytes: x, y forward; x, dy, dx backward
        print(f"{d:6d} {rows:10d} {a:9.3f} {k:11.3f} {a / k:7.2f} {diff:9.1e} {moved / a / 1e6:11.0f} "
              f"{moved / k / 1e6:13.0f}", flush=True)


if __name__ == "__main__":
    main()
