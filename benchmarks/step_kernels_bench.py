"""Per-kernel times of CNN-s's training step (the popconv kernels the trainer launches), with tuning sets
side by side and two memory ceilings.

    python benchmarks/step_kernels_bench.py                                    # CUDA machine, ~15 s
    python benchmarks/step_kernels_bench.py --tuning ";fused_block_m=128;window_block_m=64,window_stages=0"
    python benchmarks/step_kernels_bench.py --smoke                            # CPU interpreter, tiny sizes
    ncu --clock-control none --kernel-name regex:"_window|_conv_" --section SpeedOfLight \\
        --section WarpStateStats --section InstructionStats python benchmarks/step_kernels_bench.py --launch-once

At N models x batch 128 on 28x28x1 inputs (60,000 resident samples, random rows per model, bf16 as the
trainer runs them), each launcher of the step is timed on its own (`triton.testing.do_bench`, median ms):
  window fwd      conv1 + 2x2 max-pool + tanh from the window table (`_launch_window`)
  window wgrad    conv1's weight and bias gradients from the table (`_launch_window_wgrad`)
  conv2 fwd       conv2 + pool + tanh on CUDA cores (`_launch_pool_act`)
  conv2 dx        conv2's input gradient: placed gradient + block products (`_launch_pooled_grads`, no dw)
  conv2 wgrad     conv2's weight and bias gradients, dy rebuilt in the tile (`_launch_wgrad`)
and, for scale, the table rows a step reads (a kernel that only loads them) and a device copy of as many
bytes. Each --tuning set (';'-separated, each 'key=value,...' of popconv.Tuning's fields, the first usually the
defaults: an empty set) is timed in the same process, and its outputs are compared with the first set's
(max |difference| / max |first|). --launch-once runs each launcher once (for ncu) and exits.
Output: a table and <out>/step_kernels_bench.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zoos import popconv  # noqa: E402
from zoos.popconv.common import _programs_per_model, tl, triton  # noqa: E402
from zoos.popconv.conv import _launch_pool_act, _launch_wgrad  # noqa: E402
from zoos.popconv.pooled import _launch_pooled_grads  # noqa: E402
from zoos.popconv.window import _launch_window, _launch_window_wgrad, _window_tile  # noqa: E402

SIDE, KERNEL = 28, 5


@triton.jit
def _read_rows_kernel(t_ptr, rows_ptr, out_ptr, B, PER_PROGRAM, L: tl.constexpr, T: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr):
    """Loads the window rows `_window_conv_kernel` reads, in its order, in tiles of BLOCK_M rows (64: what
    the ceiling in benchmarks/README.md was measured with), and only sums them."""
    group, m = tl.program_id(0), tl.program_id(1)
    acc = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)
    start = group * PER_PROGRAM
    for tile in range(start, tl.minimum(start + PER_PROGRAM, tl.cdiv(B * L, BLOCK_M))):
        win, _, _, _ = _window_tile(t_ptr, rows_ptr, m, tile * BLOCK_M, B, L, T, BLOCK_M, BLOCK_T)
        acc += win.to(tl.float32)
    tl.store(out_ptr + m * tl.num_programs(0) + group, tl.sum(acc))


def step_launchers(n: int, batch: int, samples: int, device: str) -> tuple[dict, float]:
    """The step's launchers on random data and weights (name -> zero-argument callable), and the window
    table's bytes a step."""
    g = torch.Generator(device=device).manual_seed(0)
    bf16 = torch.bfloat16
    x = torch.rand(samples, 1, SIDE, SIDE, device=device, generator=g).to(bf16)
    table = popconv.window_table(x, (KERNEL, KERNEL), (0, 0), 2)
    rows = torch.randint(0, samples, (n * batch,), device=device, generator=g)
    w1 = torch.randn(n, 8, 1, KERNEL, KERNEL, device=device, generator=g) * 0.2
    b1 = torch.randn(n, 8, device=device, generator=g) * 0.1
    w2 = torch.randn(n, 6, 8, KERNEL, KERNEL, device=device, generator=g) * 0.1
    b2 = torch.randn(n, 6, device=device, generator=g) * 0.1
    hp = (SIDE - KERNEL + 1) // 2  # 12: conv1's pooled side
    a1, c1 = _launch_window(table, rows, w1, b1, batch, hp, hp, 2, "tanh", 0.0, bf16)
    a2, c2 = _launch_pool_act(a1, None, w2, b2, batch, (0, 0), 2, "tanh", 0.0, bf16)
    da1 = torch.randn(a1.shape, device=device, generator=g).to(bf16)
    da2 = torch.randn(a2.shape, device=device, generator=g).to(bf16)
    length = hp * hp
    groups, per = _programs_per_model(triton.cdiv(batch * length, 64), n, table.device)
    sums = torch.empty(n * groups, device=device)
    copy_src = torch.empty(n * batch * length * table.shape[2], dtype=bf16, device=device)

    def read_rows():
        _read_rows_kernel[(groups, n)](table, rows, sums, batch, per, L=length, T=table.shape[2], BLOCK_M=64,
                                       BLOCK_T=max(16, triton.next_power_of_2(table.shape[2])))
        return (sums,)

    launchers = {
        "window fwd": lambda: _launch_window(table, rows, w1, b1, batch, hp, hp, 2, "tanh", 0.0, bf16),
        "window wgrad": lambda: _launch_window_wgrad(table, rows, da1, a1, c1, w1.shape, True, 2, "tanh", 0.0),
        "conv2 fwd": lambda: _launch_pool_act(a1, None, w2, b2, batch, (0, 0), 2, "tanh", 0.0, bf16),
        "conv2 dx": lambda: _launch_pooled_grads(da2, a2, c2, w2, a1, (0, 0), 2, "tanh", 0.0, True, False)[:1],
        "conv2 wgrad": lambda: _launch_wgrad(a1, None, da2, w2.shape, (0, 0), True, fused=(a2, c2, 2, "tanh", 0.0)),
        "ceiling: read the rows": read_rows,
        "ceiling: copy as many bytes": lambda: (copy_src.clone(),),
    }
    return launchers, n * batch * length * table.shape[2] * table.element_size()


def timed(fn, device: str) -> float:
    """Median ms of fn() on a GPU (triton's do_bench); one call's in the interpreter (the code path only)."""
    if device == "cuda":
        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=int, default=1024)
    ap.add_argument("--tuning", default="", help="';'-separated popconv tuning sets, e.g. ';window_block_m=64'")
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes in Triton's interpreter on the CPU")
    ap.add_argument("--launch-once", action="store_true", help="each launcher once with the last --tuning set (ncu)")
    a = ap.parse_args()
    if a.models < 1:
        ap.error(f"--models {a.models}: expected a positive number of models")
    try:
        sets = popconv.parse_tuning(a.tuning)
    except ValueError as e:
        ap.error(str(e))
    device = "cpu" if a.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or --smoke for the code paths on the CPU")
    if not popconv.available(device):
        raise SystemExit("Triton's interpreter is off: run with TRITON_INTERPRET=1 for --smoke")
    n, batch, samples = (2, 4, 50) if a.smoke else (a.models, 128, 60000)
    launchers, table_bytes = step_launchers(n, batch, samples, device)
    if a.launch_once:
        with popconv.tuned(sets[-1]):
            for fn in launchers.values():
                fn()
        torch.cuda.synchronize() if device == "cuda" else None
        return
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    print(f"{name}: {n} models x {batch}, bf16; the window table's rows a step: {table_bytes / 1e9:.2f} GB", flush=True)
    results = {"device": name, "torch": torch.__version__, "models": n, "batch": batch, "table_bytes": table_bytes, "sets": []}
    first = None
    for tuning in sets:
        with popconv.tuned(tuning):
            outputs = {k: [t for t in fn() if t is not None] for k, fn in launchers.items() if not k.startswith("ceiling")}
            entry = {"tuning": tuning, "ms": {}, "max_rel_diff": {}}
            for k, ts in outputs.items() if first is not None else ():
                entry["max_rel_diff"][k] = max((t.float() - r.float()).abs().max().item() / max(r.float().abs().max().item(), 1e-30)
                                               for t, r in zip(ts, first[k]))
            first = first if first is not None else outputs
            print(f"--- {','.join(f'{k}={v}' for k, v in tuning.items()) or 'defaults'}", flush=True)
            for k, fn in launchers.items():
                if k.startswith("ceiling") and results["sets"]:
                    continue  # the ceilings do not depend on the tuning
                ms = entry["ms"][k] = timed(fn, device)
                rate = f"  {table_bytes / ms / 1e9:6.2f} TB/s of table rows" if k.startswith(("window", "ceiling: read")) else ""
                diff = f"  (vs the first set: {entry['max_rel_diff'][k]:.1e})" if k in entry["max_rel_diff"] else ""
                print(f"{k:28s} {ms:8.3f} ms{rate}{diff}", flush=True)
        results["sets"].append(entry)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "step_kernels_bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
