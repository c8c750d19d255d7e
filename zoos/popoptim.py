"""A population's optimizer step as Triton kernels: AdamW or SGD over every model's stacked parameters.

The trainer's update (`zoos.trainer._update`) is written on stacked [N, *shape] tensors with per-model
hyperparameters, and freezes a model whose loss or new parameters are not finite at its last finite state.
Eager, that is some twenty elementwise passes over every parameter tensor (the moments, the bias-corrected
step, the finite check, a `where` for each state tensor, the copies back into place): for the small models of
a zoo it is most of a training step's kernels. Here it is two passes a parameter tensor:

  check   reads p, g and the moments, computes the new p, and clears the model's flag where it is not finite;
  apply   reads them again and, for each model still alive (alive, a finite loss, every new p finite),
          writes p and the moments in place; a frozen model's tensors are not written.

The arithmetic is the eager update's, term for term, with IEEE-rounded division and square root; the
per-model factors (1 - lr wd, 1 - beta1, lr / (1 - beta1^t), ...) are computed by torch once a step, as the
eager update computes them. `step_` is `zoos.trainer._update_in_place` on these kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zoos.popconv.common import available, triton

BLOCK = 1024  # elements of one model's tensor a program updates

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _new_values(p, g, s1, s2, h0, h1, h2, bc2, beta2, one_minus_beta2, eps, KIND: tl.constexpr):
        """(new p, new first state, new second state) of one element. adam: h = (1 - lr wd, 1 - beta1,
        lr / (1 - beta1^t)), bc2 = sqrt(1 - beta2^t); sgd: h = (weight decay, momentum, lr), s1 the buffer."""
        if KIND == "adam":
            m = s1 + h1 * (g - s1)
            v = s2 * beta2 + one_minus_beta2 * g * g
            denom = tl.div_rn(tl.sqrt_rn(v), bc2) + eps
            return p * h0 - tl.div_rn(h2 * m, denom), m, v
        b = h1 * s1 + (g + h0 * p)
        return p - h2 * b, b, s2

    @triton.jit
    def _update_kernel(p_ptr, g_ptr, s1_ptr, s2_ptr, hyper_ptr, bc2_ptr, flag_ptr, M, N, beta2, one_minus_beta2, eps,
                       KIND: tl.constexpr, CHECK: tl.constexpr, BLOCK: tl.constexpr):
        """One block of one model's tensor (program (block, model)). CHECK: clear flag[model] where a new p is
        not finite; else write p, s1 (and s2) where flag[model] is set."""
        n = tl.program_id(1)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M
        if not CHECK:
            mask = mask & (tl.load(flag_ptr + n) != 0)
        at = n.to(tl.int64) * M + offs
        p = tl.load(p_ptr + at, mask=mask, other=0.0)
        g = tl.load(g_ptr + at, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(s1_ptr + at, mask=mask, other=0.0)
        s2 = tl.load(s2_ptr + at, mask=mask, other=0.0) if KIND == "adam" else s1
        h0, h1, h2 = tl.load(hyper_ptr + n), tl.load(hyper_ptr + N + n), tl.load(hyper_ptr + 2 * N + n)
        new_p, new_s1, new_s2 = _new_values(p, g, s1, s2, h0, h1, h2, tl.load(bc2_ptr), beta2, one_minus_beta2, eps, KIND)
        if CHECK:
            bad = mask & ~(tl.abs(new_p) < float("inf"))  # NaN compares false
            tl.store(flag_ptr + n, 0, mask=tl.max(bad.to(tl.int32), axis=0) > 0)
        else:
            tl.store(p_ptr + at, new_p, mask=mask)
            tl.store(s1_ptr + at, new_s1, mask=mask)
            if KIND == "adam":
                tl.store(s2_ptr + at, new_s2, mask=mask)


def step_(kind: str, params: dict[str, Tensor], grads: dict[str, Tensor], first: dict[str, Tensor],
          second: dict[str, Tensor], lr: Tensor, weight_decay: Tensor, momentum: Tensor, count: Tensor,
          alive: Tensor, total: Tensor, *, beta2: float, eps: float) -> None:
    """One optimizer step of every model in place (`zoos.trainer._update_in_place`'s semantics): params, first,
    second (Adam's moments; {} for SGD) and alive [N] bool. lr, weight_decay, momentum [N] float32 (momentum is
    Adam's beta1); count the 0-d float64 count of this step; total [N] the loss the gradients are of."""
    if kind not in ("adam", "sgd"):
        raise ValueError(f"optimizer {kind!r} is not known; allowed: adam, sgd")
    n = lr.shape[0]
    if kind == "adam":
        bc1 = 1 - momentum**count
        hyper = torch.stack([1 - lr * weight_decay, 1 - momentum, lr / bc1])
        bc2 = torch.sqrt(1 - beta2**count).float().reshape(1)
    else:
        hyper = torch.stack([weight_decay, momentum, lr])
        bc2 = torch.ones(1, dtype=torch.float32, device=lr.device)
    flag = torch.ones(n, dtype=torch.int32, device=lr.device)
    flat = {k: _flat(kind, k, params[k], grads[k], first[k], second.get(k), n) for k in params}
    for check in (True, False):
        for p, g, s1, s2 in flat.values():
            m = p.shape[1]
            _update_kernel[(triton.cdiv(m, BLOCK), n)](p, g, s1, s2, hyper, bc2, flag, m, n, beta2, 1 - beta2, eps,
                                                       KIND=kind, CHECK=check, BLOCK=BLOCK)
        if check:
            alive &= torch.isfinite(total) & flag.bool()
            flag.copy_(alive)


def _flat(kind: str, key: str, p: Tensor, g: Tensor, s1: Tensor, s2: Tensor | None, n: int) -> tuple[Tensor, ...]:
    """[N, M] views of parameter `key`'s tensors (the gradient copied only where its layout needs it)."""
    for what, t in [("parameter", p), ("first state", s1)] + ([("second state", s2)] if kind == "adam" else []):
        if not t.is_contiguous() or t.dtype != torch.float32:
            raise ValueError(f"{what} {key!r} is {t.dtype} with strides {tuple(t.stride())}; allowed: contiguous "
                             "float32")
    s2 = s1 if s2 is None else s2
    return p.view(n, -1), g.reshape(n, -1), s1.view(n, -1), s2.view(n, -1)


__all__ = ["available", "step_"]
