"""Softmax attention over short sequences with narrow heads, as Triton kernels: a small transformer zoo's attention.

For each attention problem (a sample's head) of q, k, v [T, hd]:

  s = q k^T * scale,   p = softmax_rows(s),   o = p v                  lse = logsumexp_rows(s)
  dv = p^T do,   dp = do v^T,   ds = p * (dp - rowsum(do * o)) * scale,   dq = ds k,   dk = ds^T q

A model zoo's transformers are small (ViT on MNIST: 50 tokens of head_dim 8), and its population program
runs one attention over N x B x H such problems at once: hundreds of thousands of [50, 8] problems. A fused
flash-attention kernel gives each problem its own thread block, tiled for long sequences and wide heads, so
such a call is mostly padding and scheduling; the plain products store every [T, T] score matrix. Here one
program holds a whole problem in registers ([T, T] scores, T <= MAX_TOKENS) and loops over several problems,
the forward keeping only o and lse for the backward, which recomputes p.

The inputs are [..., H, T, hd] with any strides (a head split is a transposed view); the output is stored
[..., T, H, hd] and returned as its [..., H, T, hd] view, so merging the heads back is free. Products take
the inputs' dtype (bf16 on tensor cores, float32 exactly), accumulate in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zoos.popconv.common import available, dot_precision, population_op, triton

MAX_TOKENS = 128  # the longest sequence one program holds: [T, T] float32 scores in registers
MAX_HEAD_DIM = 64

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _tile(ptr, b, h, st, T, HD, t, d, sb, sh):
        """A problem's [BT, BD] tile of a [B, H, T, hd] tensor with strides (sb, sh, st, 1), zero-padded."""
        at = b.to(tl.int64) * sb + h.to(tl.int64) * sh + t[:, None] * st + d[None, :]
        return tl.load(ptr + at, mask=(t < T)[:, None] & (d < HD)[None, :], other=0.0)

    @triton.jit
    def _put(ptr, val, b, h, st, T, HD, t, d, sb, sh):
        at = b.to(tl.int64) * sb + h.to(tl.int64) * sh + t[:, None] * st + d[None, :]
        tl.store(ptr + at, val.to(ptr.dtype.element_ty), mask=(t < T)[:, None] & (d < HD)[None, :])

    @triton.jit
    def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, P, H, T, HD, scale, EACH,
                         qb, qh, qt, kb, kh, kt, vb, vh, vt, ob, oh, ot,
                         BT: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr):
        t, d = tl.arange(0, BT), tl.arange(0, BD)
        for i in tl.range(EACH, num_stages=STAGES):
            p = tl.minimum(tl.program_id(0) * EACH + i, P - 1)  # a program's tail redoes the last problem
            b, h = p // H, p % H
            q = _tile(q_ptr, b, h, qt, T, HD, t, d, qb, qh)
            k = _tile(k_ptr, b, h, kt, T, HD, t, d, kb, kh)
            v = _tile(v_ptr, b, h, vt, T, HD, t, d, vb, vh)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            s = tl.where((t < T)[None, :], s, float("-inf"))
            mx = tl.max(s, axis=1)
            e = tl.exp(s - mx[:, None])
            total = tl.sum(e, axis=1)
            o = tl.dot((e / total[:, None]).to(v.dtype), v, input_precision=PREC)
            _put(o_ptr, o, b, h, ot, T, HD, t, d, ob, oh)
            tl.store(lse_ptr + p.to(tl.int64) * T + t, mx + tl.log(total), mask=t < T)

    @triton.jit
    def _attn_bwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr, P, H, T, HD, scale,
                         EACH, qb, qh, qt, kb, kh, kt, vb, vh, vt, ob, oh, ot, gb, gh, gt,
                         dqb, dqh, dqt, dkb, dkh, dkt, dvb, dvh, dvt,
                         BT: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr):
        t, d = tl.arange(0, BT), tl.arange(0, BD)
        for i in tl.range(EACH, num_stages=STAGES):
            p = tl.minimum(tl.program_id(0) * EACH + i, P - 1)  # a program's tail redoes the last problem
            b, h = p // H, p % H
            q = _tile(q_ptr, b, h, qt, T, HD, t, d, qb, qh)
            k = _tile(k_ptr, b, h, kt, T, HD, t, d, kb, kh)
            v = _tile(v_ptr, b, h, vt, T, HD, t, d, vb, vh)
            o = _tile(o_ptr, b, h, ot, T, HD, t, d, ob, oh)
            do = _tile(do_ptr, b, h, gt, T, HD, t, d, gb, gh)
            lse = tl.load(lse_ptr + p.to(tl.int64) * T + t, mask=t < T, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            pr = tl.where((t < T)[None, :], tl.exp(s - lse[:, None]), 0.0)
            dv = tl.dot(tl.trans(pr.to(do.dtype)), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
            ds = (pr * (dp - delta[:, None]) * scale).to(q.dtype)
            dq = tl.dot(ds, k, input_precision=PREC)
            dk = tl.dot(tl.trans(ds), q, input_precision=PREC)
            _put(dq_ptr, dq, b, h, dqt, T, HD, t, d, dqb, dqh)
            _put(dk_ptr, dk, b, h, dkt, T, HD, t, d, dkb, dkh)
            _put(dv_ptr, dv, b, h, dvt, T, HD, t, d, dvb, dvh)


def fits(tokens: int, head_dim: int) -> bool:
    """Whether attention over `tokens` with heads of `head_dim` runs here."""
    return 1 <= tokens <= MAX_TOKENS and 1 <= head_dim <= MAX_HEAD_DIM


def _four(t: Tensor) -> Tensor:
    """[..., H, T, hd] as [B, H, T, hd] (a view where the leading dims merge), the last axis unit-strided."""
    t = t.reshape(-1, *t.shape[-3:])
    return t if t.stride(-1) == 1 else t.contiguous()


PLAN = {"each": 16, "programs": 4096, "stages": 3}  # the launch: attention_bench.py sweeps it
WARPS = {16: 2, 32: 2, 64: 4, 128: 8}  # by the [BT, BT] score tile: a warp for every 16 of its rows, at least 2


def _plan(problems: int, tokens: int, head_dim: int) -> tuple[int, int, int, int, int]:
    """(BT, BD, problems a program, warps, stages): tiles of at least 16 (tl.dot's least); up to PLAN's problems
    a program while at least its programs fill the card, the next problem's loads issued during this one's math."""
    bt, bd = max(16, triton.next_power_of_2(tokens)), max(16, triton.next_power_of_2(head_dim))
    each = max(1, min(PLAN["each"], problems // PLAN["programs"]))
    return bt, bd, each, WARPS[bt], PLAN["stages"]


def _strides(*ts: Tensor) -> list[int]:
    return [s for t in ts for s in t.stride()[:3]]


@population_op("small_attention")
def _small_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    shape = q.shape
    q, k, v = _four(q), _four(k), _four(v)
    b, h, t, hd = q.shape
    o = q.new_empty(b, t, h, hd).transpose(1, 2)
    lse = q.new_empty(b * h, t, dtype=torch.float32)
    bt, bd, each, warps, stages = _plan(b * h, t, hd)
    if o.numel():
        _attn_fwd_kernel[(triton.cdiv(b * h, each),)](q, k, v, o, lse, b * h, h, t, hd, scale, each,
                                                      *_strides(q, k, v, o), BT=bt, BD=bd,
                                                      PREC=dot_precision(q.dtype), STAGES=stages, num_warps=warps)
    return o.reshape(shape) if o.shape != shape else o, lse


@_small_attention.register_fake
def _(q, k, v, scale):
    return q.new_empty(*q.shape[:-3], q.shape[-2], q.shape[-3], q.shape[-1]).transpose(-3, -2), \
        q.new_empty(q.shape[:-3].numel() * q.shape[-3], q.shape[-2], dtype=torch.float32)


@population_op("small_attention_backward")
def _small_attention_backward(q: Tensor, k: Tensor, v: Tensor, o: Tensor, do: Tensor, lse: Tensor,
                              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    shapes = q.shape, k.shape, v.shape
    q, k, v, o, do = _four(q), _four(k), _four(v), _four(o), _four(do)
    dq, dk, dv = (_four(torch.empty_like(t)) for t in (q, k, v))
    b, h, t, hd = q.shape
    bt, bd, each, warps, stages = _plan(b * h, t, hd)
    if q.numel():
        _attn_bwd_kernel[(triton.cdiv(b * h, each),)](q, k, v, o, do, lse, dq, dk, dv, b * h, h, t, hd, scale, each,
                                                      *_strides(q, k, v, o, do, dq, dk, dv), BT=bt, BD=bd,
                                                      PREC=dot_precision(q.dtype), STAGES=stages, num_warps=warps)
    return tuple(g.reshape(s) for g, s in zip((dq, dk, dv), shapes))


@_small_attention_backward.register_fake
def _(q, k, v, o, do, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1])
    ctx.scale = scale


def _backward(ctx, do: Tensor, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    return (*_small_attention_backward(q, k, v, o, do, lse, ctx.scale), None)


_small_attention.register_autograd(_backward, setup_context=_setup)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale) v of q, k, v [..., H, T, hd] (one dtype, any strides), for T <= MAX_TOKENS and
    hd <= MAX_HEAD_DIM; gradients to q, k and v."""
    if not (q.shape == k.shape == v.shape and q.dim() >= 3):
        raise ValueError(f"q, k, v must share one shape [..., T, head_dim]: {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share one dtype: {q.dtype}, {k.dtype}, {v.dtype}")
    if not fits(q.shape[-2], q.shape[-1]):
        raise ValueError(f"attention here takes up to {MAX_TOKENS} tokens of head_dim up to {MAX_HEAD_DIM}, "
                         f"got {q.shape[-2]} of {q.shape[-1]}")
    four = q.dim() == 3  # [H, T, hd] alone: one batch
    if four:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    out = _small_attention(q, k, v, float(scale))[0]
    return out.squeeze(0) if four else out


__all__ = ["MAX_HEAD_DIM", "MAX_TOKENS", "attention", "available", "fits"]
