"""zoos.popattn: softmax attention with whole problems a program equals the plain products, forward and
backward, on the head-split views a transformer passes (Triton's interpreter on the CPU, as tests/conftest.py
sets it; bf16 on a GPU only: the interpreter's bf16 products are not exact)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zoos import popattn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not popattn.available(DEVICE), reason="needs Triton (GPU or TRITON_INTERPRET=1)")
DTYPES = [torch.float32, torch.bfloat16] if DEVICE == "cuda" else [torch.float32]


def plain(q, k, v, scale):
    return (q.float() @ k.float().transpose(-2, -1) * scale).softmax(-1) @ v.float()


def heads(x, h):
    """[..., T, H * hd] -> [..., H, T, hd]: a model's head split, a strided view."""
    return x.unflatten(-1, (h, x.shape[-1] // h)).transpose(-3, -2)


@settings(max_examples=10, deadline=None)
@given(lead=st.sampled_from([(1,), (3,), (2, 3)]), tokens=st.sampled_from([1, 5, 16, 17, 50, 65]),
       h=st.integers(1, 3), hd=st.sampled_from([1, 4, 8, 20]), dtype=st.sampled_from(DTYPES),
       scale=st.floats(0.1, 2.0), seed=st.integers(0, 99))
def test_attention_equals_the_plain_products(lead, tokens, h, hd, dtype, scale, seed):
    """Output, stored [..., T, H, hd] and returned as the [..., H, T, hd] view, and the gradients of q, k and v,
    each laid out as its input, against the float32 plain products."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (heads(torch.randn(*lead, tokens, h * hd, generator=g), h).to(DEVICE).to(dtype).requires_grad_()
               for _ in range(3))
    out = popattn.attention(q, k, v, scale)
    assert out.shape == q.shape and out.dtype == dtype and out.transpose(-3, -2).is_contiguous()
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = plain(qf, kf, vf, scale)
    dy = torch.randn(want.shape, generator=g).to(DEVICE)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    got = (out, *torch.autograd.grad(out, (q, k, v), dy.to(dtype)))
    ref = (want, *torch.autograd.grad(want, (qf, kf, vf), dy))
    for name, a, b, x in zip(("output", "dq", "dk", "dv"), got, ref, (q, q, k, v)):
        assert name == "output" or all(n == 1 or sa == sx for n, sa, sx in zip(x.shape, a.stride(), x.stride()))
        if name in ("dq", "dk") and tokens == 1:  # a softmax over one token is constant: dq and dk vanish, but for
            # the rounding of dy.v - dy.o (hd products each), times the scale and the other operand
            bound = tol * scale * hd * dy.abs().max() * vf.abs().max() * torch.maximum(qf.abs().max(), kf.abs().max())
            assert b.abs().max() == 0 and a.float().abs().max() <= bound, f"{name}: {a.float().abs().max():.2e} > {bound:.2e}"
            continue
        err = ((a.float() - b).norm() / b.norm().clamp_min(1e-12)).item()
        assert err < tol, f"{name}: relative error {err:.2e}"


def test_attention_names_what_it_does_not_take():
    x = torch.zeros(2, 3, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"share one shape \[\.\.\., T, head_dim\]: \(2, 3, 5, 8\), \(2, 3, 5, 4\)"):
        popattn.attention(x, x[..., :4], x, 1.0)
    with pytest.raises(ValueError, match="share one dtype: torch.float32, torch.float64"):
        popattn.attention(x, x.double(), x, 1.0)
    long = torch.zeros(1, 1, popattn.MAX_TOKENS + 1, 8, device=DEVICE)
    assert popattn.fits(popattn.MAX_TOKENS, popattn.MAX_HEAD_DIM) and not popattn.fits(popattn.MAX_TOKENS + 1, 8)
    with pytest.raises(ValueError, match=f"up to {popattn.MAX_TOKENS} tokens of head_dim up to {popattn.MAX_HEAD_DIM}, "
                                         f"got {popattn.MAX_TOKENS + 1} of 8"):
        popattn.attention(long, long, long, 1.0)
