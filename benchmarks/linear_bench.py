"""A population's narrow Linear layers (a small zoo's widths): autocast's batched matmul (`zoos.fastpop.pop_linear`,
baddbmm where there is a bias) against zoos.poplinear.linear; then linears of one input, each on its own against
zoos.poplinear.linears (one op).

    python benchmarks/linear_bench.py            # CUDA machine, ~20 s

Each case is one layer of a registered family's population program at 256 models: bf16 rows (a bf16 program's
stream), float32 master weights and bias, forward alone and forward + backward (gradients to x, w and b), CUDA
events, median of 20 after a warm-up; ms, the ratio, the largest difference of the outputs, and poplinear's
effective bandwidth (x and y forward; dy read twice, x once and dx written backward) against the card's. The
second table times the linears of one value (a transformer's query, key and value maps) as separate
`poplinear.linear` calls, whose input gradients autograd adds, against one `poplinear.linears`. The third times a
linear reading an activation of its input (an MLP's hidden layer): torch's activation then `poplinear.linear`
against `poplinear.linear(..., input_act=...)`, which applies it as it loads the input.
"""

from __future__ import annotations

import torch

from popconv_bench import timed  # the script's folder is on the path: CUDA events, median of 20
from zoos import poplinear
from zoos.fastpop import pop_linear

MODELS = 256
# (family and layer, rows a model, in, out, bias)
CASES = [("vit q/v/o (50 tokens x 128)", 6400, 32, 32, True), ("vit k", 6400, 32, 32, False),
         ("vit fc1", 6400, 32, 64, True), ("vit fc2", 6400, 64, 32, True),
         ("set_transformer (16 points x 128)", 2048, 32, 32, True), ("egnn edge (20 x 20 pairs x 128)", 51200, 32, 32, True),
         ("deepsets phi (100 points x 128)", 12800, 2, 64, True), ("mlp hidden (128)", 128, 64, 64, True),
         ("cnn head (128)", 128, 32, 10, True), ("widest (128 in, 128 out)", 4096, 128, 128, True)]


# (family and layers, rows a model, in, [(out, bias)]): linears that read one value
SHARED = [("vit q, k, v (50 tokens x 128)", 6400, 32, [(32, True), (32, False), (32, True)]),
          ("egnn h: edge_src, edge_dst, node_h (5 x 128)", 640, 32, [(32, True), (32, False), (32, True)]),
          ("cgenn grade 1: left, a (16 pts x 3 x 128)", 6144, 16, [(16, True), (16, False)])]


def shared_inputs() -> None:
    """Linears of one input: each on its own (autograd adds their input gradients) against one `linears`."""
    print(f"\n{'linears of one input':44s} {'rows':>6} {'each fwd':>8} {'one fwd':>8} {'ratio':>6} "
          f"{'each f+b':>8} {'one f+b':>8} {'ratio':>6} {'max diff':>9}")
    for name, rows, in_f, outs in SHARED:
        x = torch.randn(MODELS * rows, in_f, device="cuda").bfloat16().requires_grad_()
        ws = [(torch.randn(MODELS, o, in_f, device="cuda") / in_f**0.5).requires_grad_() for o, _ in outs]
        bs = [torch.randn(MODELS, o, device="cuda").requires_grad_() if bias else None for o, bias in outs]
        gs = [torch.randn(MODELS * rows, o, device="cuda").bfloat16() for o, _ in outs]
        wrt = [x, *ws, *[b for b in bs if b is not None]]

        def each():
            return [poplinear.linear(x, w, b) for w, b in zip(ws, bs)]

        def one():
            return list(poplinear.linears(x, ws, bs))

        with torch.no_grad():
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(each(), one()))
        ef, of = timed(each), timed(one)
        eb, ob = timed(lambda: torch.autograd.grad(each(), wrt, gs)), timed(lambda: torch.autograd.grad(one(), wrt, gs))
        print(f"{name:44s} {rows:6d} {ef:8.3f} {of:8.3f} {ef / of:6.2f} {eb:8.3f} {ob:8.3f} {eb / ob:6.2f} {diff:9.1e}",
              flush=True)


# (family and layer, rows a model, in, out, activation): a linear reading an activation of its input
ACTIVATED = [("egnn edge_out: silu (20 x 20 pairs x 128)", 51200, 32, 32, "silu"),
             ("vit fc2: gelu (50 tokens x 128)", 6400, 64, 32, "gelu"),
             ("deepsets rho: relu (100 points x 128)", 12800, 64, 64, "relu"),
             ("mlp hidden: relu (128)", 128, 64, 64, "relu")]
TORCH_ACT = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "relu": torch.relu}


def input_activations() -> None:
    """A linear of act(x): torch's activation, then the linear, against the linear applying it as it loads x."""
    print(f"\n{'linear of an activation':44s} {'rows':>6} {'act+lin fwd':>11} {'fused fwd':>9} {'ratio':>6} "
          f"{'act+lin f+b':>11} {'fused f+b':>9} {'ratio':>6} {'max diff':>9}")
    for name, rows, in_f, out_f, act in ACTIVATED:
        x = torch.randn(MODELS * rows, in_f, device="cuda").bfloat16().requires_grad_()
        w = (torch.randn(MODELS, out_f, in_f, device="cuda") / in_f**0.5).requires_grad_()
        b = torch.randn(MODELS, out_f, device="cuda").requires_grad_()
        g = torch.randn(MODELS * rows, out_f, device="cuda").bfloat16()

        def apart():
            return poplinear.linear(TORCH_ACT[act](x), w, b)

        def fused():
            return poplinear.linear(x, w, b, input_act=(act, 0.0))

        with torch.no_grad():
            diff = (apart().float() - fused().float()).abs().max().item()
        af, ff = timed(apart), timed(fused)
        ab = timed(lambda: torch.autograd.grad(apart(), [x, w, b], g))
        fb = timed(lambda: torch.autograd.grad(fused(), [x, w, b], g))
        print(f"{name:44s} {rows:6d} {af:11.3f} {ff:9.3f} {af / ff:6.2f} {ab:11.3f} {fb:9.3f} {ab / fb:6.2f} {diff:9.1e}",
              flush=True)


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {MODELS} models, bf16 rows, float32 weights")
    print(f"{'layer':36s} {'rows':>8} {'in':>4} {'out':>4} {'bmm fwd':>8} {'pop fwd':>8} {'ratio':>6} "
          f"{'bmm f+b':>8} {'pop f+b':>8} {'ratio':>6} {'max diff':>9} {'pop GB/s':>9}")
    for name, rows, in_f, out_f, bias in CASES:
        x = torch.randn(MODELS * rows, in_f, device="cuda").bfloat16().requires_grad_()
        w = (torch.randn(MODELS, out_f, in_f, device="cuda") / in_f**0.5).requires_grad_()
        b = torch.randn(MODELS, out_f, device="cuda").requires_grad_() if bias else None
        g = torch.randn(MODELS * rows, out_f, device="cuda").bfloat16()
        wrt = [t for t in (x, w, b) if t is not None]

        def eager():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return pop_linear(x, w, b)

        def kernel():
            return poplinear.linear(x, w, b)

        with torch.no_grad():
            diff = (eager().float() - kernel().float()).abs().max().item()
        ef, kf = timed(eager), timed(kernel)
        eb, kb = timed(lambda: torch.autograd.grad(eager(), wrt, g)), timed(lambda: torch.autograd.grad(kernel(), wrt, g))
        moved = MODELS * rows * 2 * (in_f + out_f + 2 * out_f + in_f + in_f)  # bytes: x, y; dy twice, x, dx
        print(f"{name:36s} {rows:8d} {in_f:4d} {out_f:4d} {ef:8.3f} {kf:8.3f} {ef / kf:6.2f} {eb:8.3f} {kb:8.3f} "
              f"{eb / kb:6.2f} {diff:9.1e} {moved / kb / 1e6:9.0f}", flush=True)
    shared_inputs()
    input_activations()


if __name__ == "__main__":
    main()
