"""A zoo's attention (many short sequences, narrow heads): zoos.popattn against torch's fused kernel and the plain products.

    python benchmarks/attention_bench.py            # CUDA machine, ~30 s

A population program runs attention over N x B x H problems at once (256 models x 128 samples x 4 heads of a
ViT: 131,072). For each (tokens, head_dim) a registered transformer meets, bf16 q, k, v as a model's head split
lays them out ([B, T, H, hd] viewed as [B, H, T, hd]), forward + backward, CUDA events, median of 20 after a
warm-up: ms of popattn, F.scaled_dot_product_attention and the plain products (softmax(q k^T) v), each ratio to
popattn, and popattn's largest difference from the float32 products' output (on the first 512 problems).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from popconv_bench import timed  # the script's folder is on the path: CUDA events, median of 20
from zoos import popattn

CASES = [  # (what meets it, samples, heads, tokens, head_dim)
    ("set transformer, 16 points", 32768, 4, 16, 8),
    ("ViT on MNIST, 7x7 patches", 32768, 4, 17, 4),
    ("ViT on MNIST, 4x4 patches", 32768, 4, 50, 8),
    ("ViT on CIFAR-10, 4x4 patches", 16384, 4, 65, 16),
    ("longest popattn takes", 2048, 4, 128, 32),
    ("widest popattn takes", 2048, 4, 128, 64),
]


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, forward + backward")
    print(f"{'case':30} {'problems':>9} {'T':>4} {'hd':>3} {'popattn ms':>11} {'sdpa ms':>8} {'plain ms':>9} "
          f"{'sdpa/pop':>9} {'plain/pop':>10} {'max diff':>9}")
    for name, b, h, t, hd in CASES:
        qkv = [torch.randn(b, t, h * hd, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        q, k, v = (x.unflatten(-1, (h, hd)).transpose(1, 2).requires_grad_() for x in qkv)
        g = torch.randn(b, h, t, hd, device="cuda", dtype=torch.bfloat16)
        scale = hd ** -0.5
        forms = {
            "popattn": lambda: popattn.attention(q, k, v, scale),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, scale=scale),
            "plain": lambda: (q @ k.transpose(-2, -1) * scale).softmax(-1) @ v,
        }
        ms = {}
        for form, fn in forms.items():
            try:
                ms[form] = timed(lambda fn=fn: torch.autograd.grad(fn(), (q, k, v), g))
            except torch.OutOfMemoryError:
                ms[form] = float("nan")
            torch.cuda.empty_cache()
        with torch.no_grad():
            few = [x[:128].float() for x in (q, k, v)]
            diff = (popattn.attention(q[:128], k[:128], v[:128], scale).float()
                    - (few[0] @ few[1].transpose(-2, -1) * scale).softmax(-1) @ few[2]).abs().max().item()
        print(f"{name:30} {b * h:9d} {t:4d} {hd:3d} {ms['popattn']:11.3f} {ms['sdpa']:8.3f} {ms['plain']:9.3f} "
              f"{ms['sdpa'] / ms['popattn']:9.2f} {ms['plain'] / ms['popattn']:10.2f} {diff:9.1e}", flush=True)


if __name__ == "__main__":
    main()
