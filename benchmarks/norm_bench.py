"""A population's norms. LayerNorm on narrow rows (a transformer zoo's tokens): torch's layer_norm + per-model
affine against zoos.popnorm.layer_norm. GroupNorm(1, C) on ResNet-20's maps: popnorm's rows read in passes
against each row held as one tile.

    python benchmarks/norm_bench.py                  # CUDA machine, ~30 s: both
    python benchmarks/norm_bench.py --norms group    # GroupNorm only

A population program normalises its [N*B, T, D] batch, each model's rows with that model's affine. Without the
kernel, zoos.fastpop runs F.layer_norm on the float32 batch (one thread block a row) and then the affine as two
broadcast ops (`pop_layer_norm`); popnorm.layer_norm is one pass forward and one back, many rows a program. For
each width D: 256 models, 2^26 / D rows of bf16 input (a bf16 program's stream), float32 output, forward +
backward (gradients to x, w and b), CUDA events, median of 20 after a warm-up; ms, the ratio, the largest
difference of the outputs, and each form's effective bandwidth (the bytes a fused pass must move: x and y
forward, x, dy and dx backward) against the card's.

GroupNorm: 256 models x 128 samples of bf16 channels-last maps, as ResNet-20 normalises them: inside a block
(norm + ReLU, stored bf16: only a conv reads it) and at a block's end (norm + residual add + ReLU, stored float32
with a bf16 copy for the next conv; the gradients of both readers). Forward + backward, the rows read in passes
(`NORM_ROW_TILE` 0) against one tile a row (the default where a row fits), the same timing and bandwidth.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from popconv_bench import timed  # the script's folder is on the path: CUDA events, median of 20
from zoos import popnorm
from zoos.fastpop import pop_layer_norm

MODELS = 256


def layer_norms() -> None:
    print(f"LayerNorm: {MODELS} models, bf16 in, float32 out")
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


@contextlib.contextmanager
def row_tile(elements: int):
    saved, popnorm.NORM_ROW_TILE = popnorm.NORM_ROW_TILE, elements
    try:
        yield
    finally:
        popnorm.NORM_ROW_TILE = saved


def group_norms() -> None:
    batch = 128
    print(f"GroupNorm(1, C): {MODELS} models x {batch} samples, bf16 channels-last in; passes against one tile a row")
    print(f"{'map':>12} {'op':>14} {'passes ms':>10} {'one tile ms':>12} {'ratio':>7} {'max diff':>9} "
          f"{'passes GB/s':>12} {'one tile GB/s':>14}")
    for c, hw in ((16, 32), (32, 16), (64, 8)):
        x = torch.randn(MODELS * batch, c, hw, hw, device="cuda").mul(3).add(1).bfloat16()
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        w = (1 + 0.1 * torch.randn(MODELS, c, device="cuda")).requires_grad_()
        b = (0.1 * torch.randn(MODELS, c, device="cuda")).requires_grad_()
        res = torch.randn_like(x, dtype=torch.float32).requires_grad_()
        g32, g16 = torch.randn_like(res), torch.randn_like(x)
        cases = {  # op: (forward, its outputs' gradients, bytes a fused pass moves a value, forward + backward)
            "norm+relu": (lambda: [popnorm.group_norm1(x, w, b, act="relu", out_dtype=torch.bfloat16)], [g16],
                          2 + 2 + (2 + 2 + 2 + 2)),  # x, y; x, dy, y, dx
            "norm+add+relu": (lambda: list(popnorm.group_norm1(x, w, b, residual=res, act="relu",
                                                                 copy_dtype=torch.bfloat16)), [g32, g16],
                              2 + 4 + 4 + 2 + (2 + 4 + 2 + 2 + 2 + 4)),  # x, res, y, y2; x, dy, dy2, y2, dx, dres
        }
        for op, (forward, grads, per_value) in cases.items():
            wrt = (x, w, b, res) if op == "norm+add+relu" else (x, w, b)

            def step():
                torch.autograd.grad(forward(), wrt, grads)

            with torch.no_grad():
                with row_tile(0):
                    old = forward()[0]
                diff = (old.float() - forward()[0].float()).abs().max().item()
            with row_tile(0):
                a = timed(step)
            k = timed(step)
            moved = x.numel() * per_value
            print(f"{f'{c}x{hw}x{hw}':>12} {op:>14} {a:10.3f} {k:12.3f} {a / k:7.2f} {diff:9.1e} "
                  f"{moved / a / 1e6:12.0f} {moved / k / 1e6:14.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--norms", default="layer,group", help="which: layer, group or both (comma-separated)")
    norms = set(parser.parse_args().norms.split(","))
    if not norms or norms - {"layer", "group"}:
        parser.error(f"--norms {','.join(sorted(norms))!r}: allowed layer, group")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    if "layer" in norms:
        layer_norms()
    if "group" in norms:
        group_norms()


if __name__ == "__main__":
    main()
