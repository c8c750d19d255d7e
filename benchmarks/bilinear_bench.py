"""A Clifford layer's geometric product over a population's features: the dense right multiplication (R(y) built
from y, a batched matmul per feature, the scalar gate after it) against zoos.popbilinear (the table in a generated
kernel's code, the gate in the same pass).

    python benchmarks/bilinear_bench.py                # CUDA machine, ~30 s
    python benchmarks/bilinear_bench.py --sets 8192    # fewer sets (the default: 256 models x 128 sets)

cgenn's three products on the convex hull (Cl(5,0), 16 points a set, 16 channels, the context shared by a set's
points): grades 0-1 -> 0-2 (6 blades, a left map of 6), 0-2 -> 0-4 (16, 16), 0-4 -> the scalar (31, 1). For each,
the layer's maps as x's blocks in the layout its linears write ([.., blades, channels]), bf16, forward + backward
(gradients to x and y), CUDA events, median of 20 after a warm-up: ms, the ratio, the peak memory of a step, and
popbilinear's largest difference from the dense form relative to its norm.
"""

from __future__ import annotations

import argparse
import math

import torch

from popconv_bench import timed  # the script's folder is on the path: CUDA events, median of 20
from zoos import popbilinear
from zoos.archs.clifford import algebra_of, product_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", type=int, default=256 * 128, help="sets of points (models x batch)")
    ap.add_argument("--points", type=int, default=16)
    ap.add_argument("--channels", type=int, default=16)
    a = ap.parse_args()
    metric = (1.0,) * 5
    alg = algebra_of(metric)
    nb = alg.n_blades
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Cl(5,0), {a.sets} sets x {a.points} points x "
          f"{a.channels} channels, bf16")
    print(f"{'grades':>8} {'terms':>6} {'dense ms':>9} {'popbilinear ms':>15} {'ratio':>6} {'dense GB':>9} "
          f"{'popbilinear GB':>15} {'rel diff':>9}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for top_in, top_out in ((1, 2), (2, 4), (4, 0)):
        blades, k, left = nb[top_in], nb[top_out], nb[min(top_in, top_out)]
        sizes = (blades, blades, k)
        grade = [nb[g] - (nb[g - 1] if g else 0) for g in range(top_in + 1)]
        maps = [torch.randn(a.sets, a.points, n, a.channels, device="cuda", generator=gen).bfloat16().requires_grad_()
                for n in grade[: min(top_in, top_out) + 1] + grade]
        y = torch.randn(a.sets, 1, blades, a.channels, device="cuda", generator=gen).bfloat16().transpose(-1, -2)
        y = y.detach().requires_grad_()
        dz = torch.randn(a.sets, a.points, k, a.channels, device="cuda", generator=gen).bfloat16().transpose(-1, -2)

        def step(on: bool):
            with popbilinear.using(on):
                z = product_rows(metric, maps, y, sizes, left, 1 / math.sqrt(2), True, gate=True)
            return (z, *torch.autograd.grad(z, (*maps, y), dz))

        out, ms, peak = {}, {}, {}
        for on in (False, True):
            out[on] = [t.float() for t in step(on)]
            ms[on] = timed(lambda: step(on))
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(on)
            peak[on] = (torch.cuda.max_memory_allocated() - base) / 1e9
        diff = max(((u - v).norm() / v.norm()).item() for u, v in zip(out[True], out[False]))
        print(f"{top_in}->{top_out:<5} {len(alg.product_table(sizes, left, 1 / math.sqrt(2)).terms):6d} "
              f"{ms[False]:9.3f} {ms[True]:15.3f} {ms[False] / ms[True]:6.2f} {peak[False]:9.2f} {peak[True]:15.2f} "
              f"{diff:9.1e}", flush=True)


if __name__ == "__main__":
    main()
