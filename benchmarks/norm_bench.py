"""LayerNorm statistics on narrow rows (a transformer zoo's tokens): torch's layer_norm against var_mean + elementwise ops.

    python benchmarks/norm_bench.py            # CUDA machine, ~20 s

zoos.fastpop's population norm normalises the [N*B, T, D] batch without affine (each model's affine follows) in
float32 with F.layer_norm, whose kernel runs one thread block a row: on a 256-model ViT (D = 32, 1.6M tokens a
step) its forward and backward were 45% of the GPU time. The baseline a population LayerNorm kernel (many rows a
program) must beat. For each width D, rows = 2^26 / D, forward + backward of both forms, CUDA events, median of 20
after a warm-up; ms, the ratio and the largest difference. The var_mean form was tried and not kept (README).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from popconv_bench import timed  # the script's folder is on the path: CUDA events, median of 20


def narrow(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    var, mean = torch.var_mean(x, dim=-1, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'D':>6} {'rows':>10} {'layer_norm ms':>14} {'var_mean ms':>12} {'ratio':>7} {'max diff':>9}")
    for d in (16, 32, 64, 128, 256, 512, 1024, 2048):
        rows = 2**26 // d
        x = torch.randn(rows, d, device="cuda", requires_grad=True)
        g = torch.randn(rows, d, device="cuda")

        def native():
            torch.autograd.grad(F.layer_norm(x, (d,)), x, g)

        def ours():
            torch.autograd.grad(narrow(x), x, g)

        diff = (F.layer_norm(x, (d,)) - narrow(x)).abs().max().item()
        a, b = timed(native), timed(ours)
        print(f"{d:6d} {rows:10d} {a:14.3f} {b:12.3f} {a / b:7.2f} {diff:9.1e}", flush=True)


if __name__ == "__main__":
    main()
