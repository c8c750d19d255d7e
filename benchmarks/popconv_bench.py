"""Per-layer times of the population convolutions: im2col + bmm vs popconv's Triton kernels.

    python benchmarks/popconv_bench.py --models 1024            # CUDA machine, ~1 min
    python benchmarks/popconv_bench.py --wide --models 256 --before /tmp/before/zoos/popconv   # the wide layers

For each convolution of CNN-s on 28x28x1 (batch 128 per model, bf16 activations, float32 weights)
and its two backward products, times (CUDA events, median of 20 after a warm-up):
  im2col   zoos.fastpop.pop_conv2d forward, and its autograd backward (input + weight grads)
  fma      popconv's forward on CUDA cores (outer products a tap at a time), the best of a sweep over
           pixels per program
  dot      popconv's forward as implicit-GEMM tiles on tensor cores (TF32)
  wgrad    popconv's weight (+ bias) gradient on tensor cores: the best of a sweep over pixels per
           tile, programs per SM and pipeline stages, and the default tiles
  auto     what popconv picks by default
  before   with --before DIR: the defaults of another zoos/popconv package (e.g. `git archive HEAD~3 zoos/popconv
           | tar -x -C /tmp/before`, then --before /tmp/before/zoos/popconv; an older single popconv.py works
           too), timed in the same run, so a kernel change is measured side by side (ratio = before / auto)
The first layer reads the resident data set by row index, as in training. Output: a table and
<out>/popconv_bench.json.

--wide times instead the wide (tensor-core, channels-last) layers of cnn and resnet20, 3x3 with padding 1, bf16:
the forward alone and a training step's three products (forward, input gradient, weight gradient), at the
defaults and (--before) another version's, each as the families call it (`conv2d_pool_act` with a ReLU, the
plain `conv2d` ahead of a norm, resnet20's and resnet18_width's stride-2 convs: on a version without a stride
argument, the stride-1 conv of the input's blocks as zoos.fastpop ran it). Output: <out>/popconv_wide.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoos import popconv  # noqa: E402
from zoos.popconv.conv import _pop_conv2d_wgrad  # noqa: E402
from zoos.fastpop import pop_conv2d  # noqa: E402

# (name, C, O, k, input size, padding): CNN-s's convs and the input-gradient convs of conv2 and conv3
LAYERS = [("conv1", 1, 8, 5, 28, 0), ("conv2", 8, 6, 5, 12, 0), ("conv3", 6, 4, 2, 4, 0),
          ("conv2 dgrad", 6, 8, 5, 8, 4), ("conv3 dgrad", 4, 6, 2, 3, 1)]


# (name, C, O, input size, how the family calls it): cnn's and resnet20's wide 3x3 convs, resnet20's stride-2 ones,
# and a no-pool layer of 16 outputs from 16 inputs
WIDE = [("cnn conv2", 32, 32, 28, "relu"), ("cnn conv1>2", 16, 32, 28, "relu"), ("resnet20 s1", 16, 16, 32, "plain"),
        ("resnet20 s2", 32, 32, 16, "plain"), ("resnet20 s3", 64, 64, 8, "plain"), ("16>16 relu", 16, 16, 32, "relu"),
        ("resnet20 s1>2", 16, 32, 32, "stride 2"), ("resnet20 s2>3", 32, 64, 16, "stride 2"),
        ("resnet18 l1>2", 64, 128, 32, "stride 2 relu")]


def timed(fn, reps: int = 20) -> float:
    """Median milliseconds of fn() on the GPU."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def load_before(path: Path):
    """Another version of popconv as its own module, its custom ops renamed so both can be registered: a
    zoos/popconv package folder (copied, renamed, imported as `popconv_before`) or a single popconv.py."""
    if path.is_dir():
        pkg = Path(tempfile.mkdtemp(prefix="popconv-before-")) / "popconv_before"
        pkg.mkdir()
        for f in path.glob("*.py"):
            (pkg / f.name).write_text(f.read_text().replace('"symzoo::', '"symzoo_before::'))
        spec = importlib.util.spec_from_file_location("popconv_before", pkg / "__init__.py",
                                                      submodule_search_locations=[str(pkg)])
        mod = sys.modules["popconv_before"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    src = path.read_text().replace('"symzoo::', '"symzoo_before::')
    spec = importlib.util.spec_from_loader("popconv_before", loader=None)
    mod = importlib.util.module_from_spec(spec)
    exec(compile(src, str(path), "exec"), mod.__dict__)
    return mod


def before_wgrad(before):
    """The weight-gradient op of a loaded `load_before` version (in its conv module since popconv is a package)."""
    return before.conv._pop_conv2d_wgrad if hasattr(before, "conv") else before._pop_conv2d_wgrad


def wide(models: int, batch: int, before, out: Path) -> None:
    """The --wide table: forward and training-step milliseconds of the WIDE layers, at the defaults and `before`."""
    versions = {"auto": popconv} | ({"before": before} if before is not None else {})
    results = []
    print(f"{'layer':14s}{'fwd':>9s}{'step':>9s}" + ("".join(f"{h:>9s}" for h in ("bef fwd", "bef step", "fwd x", "step x"))
                                                     if before is not None else "") + f"   ms, N={models}, B={batch}")
    for name, c, o, size, call in WIDE:
        x = torch.randn(models * batch, c, size, size, device="cuda", dtype=torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        w = (torch.randn(models, o, c, 3, 3, device="cuda") * 0.1).requires_grad_()
        b = torch.zeros(models, o, device="cuda", requires_grad=True)
        row = {"layer": name, "C": c, "O": o, "size": size, "call": call, "models": models, "batch": batch}
        for label, pc in versions.items():
            def conv(pc=pc):
                if call == "plain":
                    return pc.conv2d(x, w, b, (1, 1))
                if call.startswith("stride 2"):  # a version without a stride: the stride-1 conv of the blocks
                    op = pc.conv2d_pool_act if call.endswith("relu") else pc.conv2d
                    extra = {"pool": 1, "act": "relu"} if call.endswith("relu") else {}
                    if "stride" in inspect.signature(op).parameters:
                        return op(x, w, b, (1, 1), stride=(2, 2), **extra)
                    blocks = pc.space_to_depth(x, (2, 2), (1, 1), (3, 3), pc.reads_channels_last(4 * c, o))
                    return op(blocks, pc.strided_weight(w, (2, 2)), b, **extra)
                return pc.conv2d_pool_act(x, w, b, (1, 1), pool=1, act="relu")

            with torch.no_grad():
                dy = torch.randn_like(conv())

            def step(conv=conv):
                torch.autograd.grad(conv(), [x, w, b], dy)

            with torch.no_grad():
                row[f"{label}_fwd_ms"] = timed(conv)
            row[f"{label}_step_ms"] = timed(step)
        results.append(row)
        line = f"{name:14s}{row['auto_fwd_ms']:9.3f}{row['auto_step_ms']:9.3f}"
        if before is not None:
            line += (f"{row['before_fwd_ms']:9.3f}{row['before_step_ms']:9.3f}"
                     f"{row['before_fwd_ms'] / row['auto_fwd_ms']:8.2f}x{row['before_step_ms'] / row['auto_step_ms']:8.2f}x")
        print(line, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "popconv_wide.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "layers": results}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--before", type=Path, help="a zoos/popconv folder (or popconv.py) to time side by side at its defaults")
    ap.add_argument("--no-sweep", action="store_true", help="defaults only (and --before): no tile-size sweeps")
    ap.add_argument("--wide", action="store_true", help="the wide layers of cnn and resnet20 instead (see above)")
    a = ap.parse_args()
    before = load_before(a.before) if a.before else None
    if a.wide:
        return wide(a.models, a.batch, before, a.out)
    n, batch, dev = a.models, a.batch, "cuda"
    data = torch.randn(60000, 1, 28, 28, device=dev)
    rows = torch.randint(0, 60000, (n, batch), device=dev)
    results = []
    print(f"{'layer':14s}{'im2col fwd':>12s}{'im2col bwd':>12s}{'fma fwd':>10s}{'dot fwd':>10s}{'wgr best':>10s}"
          f"{'wgr dflt':>10s}{'auto fwd':>10s}{'auto wgr':>10s}   ms, N={n}, B={batch}")
    for name, c, o, k, size, pad in LAYERS:
        first = name == "conv1"
        x = data if first else torch.randn(n * batch, c, size, size, device=dev, dtype=torch.bfloat16)
        r = rows if first else None
        w = torch.randn(n, o, c, k, k, device=dev) * 0.1
        b = torch.randn(n, o, device=dev) * 0.1
        xi = (data[rows.reshape(-1)] if first else x).to(torch.bfloat16)

        def im2col_fwd():
            return pop_conv2d(xi, w, b, (1, 1), (pad, pad))

        xg, wg, bg = xi.clone().requires_grad_(not first), w.clone().requires_grad_(), b.clone().requires_grad_()
        y = pop_conv2d(xg, wg, bg, (1, 1), (pad, pad))
        dy = torch.randn_like(y)

        def im2col_bwd():
            torch.autograd.grad(y, [wg, bg] + ([] if first else [xg]), dy, retain_graph=True)

        dyc = dy.contiguous()
        ri = r.reshape(-1).int() if first else None

        def fwd():
            return popconv.conv2d(x, w, b, (pad, pad), rows=r, out_dtype=torch.bfloat16)

        def wgrad():
            return _pop_conv2d_wgrad(x, ri, dyc, w, pad, pad, True)

        row = {"layer": name, "models": n, "batch": batch, "im2col_fwd_ms": timed(im2col_fwd), "im2col_bwd_ms": timed(im2col_bwd)}
        for block_m in (128, 256, 512, 1024) if not a.no_sweep else ():
            for warps in (4, 8):
                with popconv.tuned({"forward": "fma", "fma_block_m": block_m, "fma_warps": warps}):
                    row[f"fma_fwd_m{block_m}_w{warps}_ms"] = timed(fwd)
        with popconv.tuned({"forward": "dot", "dot": "tf32"}):  # TF32 tensor-core operands
            row["dot_fwd_ms"] = timed(fwd)
            sweep = "dgrad" not in name and not a.no_sweep  # an input-grad conv has no weight grad
            for block_m in (64, 128, 256) if sweep else ():
                for per_sm in (4, 16, 64):
                    for stages in (1, 3):
                        with popconv.tuned({"wgrad_block_m": block_m, "wgrad_per_sm": per_sm, "wgrad_stages": stages}):
                            row[f"dot_wgrad_m{block_m}_s{per_sm}_st{stages}_ms"] = timed(wgrad)
            row["dot_wgrad_ms"] = timed(wgrad)
        with popconv.tuned({"forward": "dot", "dot": "bf16"}):  # bf16 operands (x as bf16 for the first layer too)
            xb = x.to(torch.bfloat16)
            row["dot_bf16_fwd_ms"] = timed(lambda: popconv.conv2d(xb, w, b, (pad, pad), rows=r, out_dtype=torch.bfloat16))
            if "dgrad" not in name:
                row["dot_bf16_wgrad_ms"] = timed(lambda: _pop_conv2d_wgrad(xb, ri, dyc, w, pad, pad, True))
        row["auto_fwd_ms"], row["auto_wgrad_ms"] = timed(fwd), timed(wgrad)  # the defaults
        if before is not None:
            row["before_fwd_ms"] = timed(lambda: before.conv2d(x, w, b, (pad, pad), rows=r, out_dtype=torch.bfloat16))
            row["before_wgrad_ms"] = timed(lambda: before_wgrad(before)(x, ri, dyc, w, pad, pad, True))
        results.append(row)
        fma_f = min(((v, k) for k, v in row.items() if k.startswith("fma_fwd")), default=(float("nan"), "-"))
        fma_w = min(((v, k) for k, v in row.items() if k.startswith("dot_wgrad")), default=(0.0, "-"))
        print(f"{name:14s}{row['im2col_fwd_ms']:12.2f}{row['im2col_bwd_ms']:12.2f}{fma_f[0]:10.2f}"
              f"{row['dot_fwd_ms']:10.2f}{fma_w[0]:10.2f}{row['dot_wgrad_ms']:10.2f}{row['auto_fwd_ms']:10.2f}"
              f"{row['auto_wgrad_ms']:10.2f}   best: {fma_f[1]} {fma_f[0]:.2f}, {fma_w[1]} {fma_w[0]:.2f}", flush=True)
        print(f"{'':14s}bf16 tensor-core products: dot fwd {row['dot_bf16_fwd_ms']:.2f} ms, wgrad "
              f"{row.get('dot_bf16_wgrad_ms', float('nan')):.2f} ms", flush=True)
        if before is not None:
            print(f"{'':14s}before: fwd {row['before_fwd_ms']:.2f} ms ({row['before_fwd_ms'] / row['auto_fwd_ms']:.2f}x), "
                  f"wgrad {row['before_wgrad_ms']:.2f} ms ({row['before_wgrad_ms'] / row['auto_wgrad_ms']:.2f}x)", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "popconv_bench.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "layers": results}, indent=2))


if __name__ == "__main__":
    main()
