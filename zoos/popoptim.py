"""A population's optimizer step as Triton kernels: AdamW or SGD over every model's stacked parameters.

The trainer's update (`zoos.trainer._update`) is written on stacked [N, *shape] tensors with per-model
hyperparameters, and freezes a model whose loss or new parameters are not finite at its last finite state.
Eager, that is some twenty elementwise passes over every parameter tensor (the moments, the bias-corrected
step, the finite check, a `where` for each state tensor, the copies back into place) and a dozen small ops for
the per-model factors: for the small models of a zoo it is most of a training step's kernels. Here it is two
launches for all of a population's parameter tensors (up to GROUP tensors a launch; a program updates one block
of one model's tensor, the tensor found from its block index), and a memset:

  check   reads p, g and the moments, computes the new p, and marks the model bad where it is not finite;
  apply   reads them again and, for each model to keep (alive, a finite loss, not marked), writes p and the
          moments in place, and the model's alive flag; a frozen model's tensors are not written.

The arithmetic is the eager update's, term for term, with IEEE-rounded division and square root, the per-model
factors (1 - lr wd, 1 - beta1, lr / (1 - beta1^t)) computed in each program from the bias corrections torch
computes once a step (Triton's interpreter has no pow).
`step_` is `zoos.trainer._update_in_place` on these kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zoos.popconv.common import available, triton

BLOCK = 1024  # elements of one model's tensor a program updates
GROUP = 48  # parameter tensors a launch updates: 4 pointers and a size each stay within CUDA's 4 KiB of arguments

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _factors(lr_ptr, wd_ptr, mom_ptr, bc1_ptr, n, KIND: tl.constexpr):
        """Model n's (h0, h1, h2). adam: (1 - lr wd, 1 - beta1, lr / (1 - beta1^t)); sgd: (weight decay,
        momentum, lr)."""
        lr, wd, mom = tl.load(lr_ptr + n), tl.load(wd_ptr + n), tl.load(mom_ptr + n)
        if KIND == "adam":
            return 1 - lr * wd, 1 - mom, tl.div_rn(lr, tl.load(bc1_ptr + n))
        return wd, mom, lr

    @triton.jit
    def _new_values(p, g, s1, s2, h0, h1, h2, bc2, beta2, one_minus_beta2, eps, KIND: tl.constexpr):
        """(new p, new first state, new second state) of one element (h, bc2 as `_factors` gives them)."""
        if KIND == "adam":
            m = s1 + h1 * (g - s1)
            v = s2 * beta2 + one_minus_beta2 * g * g
            denom = tl.div_rn(tl.sqrt_rn(v), bc2) + eps
            return p * h0 - tl.div_rn(h2 * m, denom), m, v
        b = h1 * s1 + (g + h0 * p)
        return p - h2 * b, b, s2

    @triton.jit
    def _update_kernel(P, G, S1, S2, SIZES, lr_ptr, wd_ptr, mom_ptr, bc1_ptr, bc2_ptr, total_ptr, alive_ptr, bad_ptr,
                       beta2, one_minus_beta2, eps, STARTS: tl.constexpr, KIND: tl.constexpr, CHECK: tl.constexpr,
                       BLOCK: tl.constexpr):
        """One block of one model's tensor: program (b, model), tensor t the last with STARTS[t] <= b. P, G, S1,
        S2 the tensors' [N, SIZES[t]] parameters, gradients and states. CHECK: mark bad[model] where a new p is
        not finite; else, for a model to keep, write p, s1 (and s2) and, from block 0, alive[model]."""
        b, n = tl.program_id(0), tl.program_id(1)
        p_ptr, g_ptr, s1_ptr, s2_ptr, size, start = P[0], G[0], S1[0], S2[0], SIZES[0], 0
        for t in tl.static_range(1, len(STARTS)):
            if b >= STARTS[t]:
                p_ptr, g_ptr, s1_ptr, s2_ptr, size, start = P[t], G[t], S1[t], S2[t], SIZES[t], STARTS[t]
        keep = (tl.load(alive_ptr + n) != 0) & (tl.abs(tl.load(total_ptr + n)) < float("inf"))  # NaN compares false
        if not CHECK:
            keep = keep & (tl.load(bad_ptr + n) == 0)
            if b == 0:
                tl.store(alive_ptr + n, keep)  # programs of model n reading alive after this compute the same keep
        offs = (b - start) * BLOCK + tl.arange(0, BLOCK)
        mask = (offs < size) & keep
        at = n.to(tl.int64) * size + offs
        p = tl.load(p_ptr + at, mask=mask, other=0.0)
        g = tl.load(g_ptr + at, mask=mask, other=0.0)
        s1 = tl.load(s1_ptr + at, mask=mask, other=0.0)
        s2 = tl.load(s2_ptr + at, mask=mask, other=0.0) if KIND == "adam" else s1
        h0, h1, h2 = _factors(lr_ptr, wd_ptr, mom_ptr, bc1_ptr, n, KIND)
        new_p, new_s1, new_s2 = _new_values(p, g, s1, s2, h0, h1, h2, tl.load(bc2_ptr), beta2, one_minus_beta2, eps,
                                            KIND)
        if CHECK:
            bad = mask & ~(tl.abs(new_p) < float("inf"))
            tl.store(bad_ptr + n, 1, mask=tl.max(bad.to(tl.int32), axis=0) > 0)
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
    flat = [_flat(kind, k, params[k], grads[k], first[k], second.get(k), n) for k in params]
    groups = [flat[i:i + GROUP] for i in range(0, len(flat), GROUP)]
    if kind == "adam":  # the bias corrections as the eager update computes them: beta2^t in float64
        bc1, bc2 = 1 - momentum**count, torch.sqrt(1 - beta2**count).float().reshape(1)
    else:
        bc1, bc2 = lr, lr  # not read
    bad = torch.zeros(n, dtype=torch.int32, device=lr.device)
    for check in (True, False):
        for group in groups:
            blocks = [triton.cdiv(p.shape[1], BLOCK) for p, *_ in group]
            starts = tuple(sum(blocks[:i]) for i in range(len(group)))
            tensors = [tuple(ts) for ts in zip(*group)]
            _update_kernel[(sum(blocks), n)](*tensors, tuple(p.shape[1] for p, *_ in group), lr, weight_decay,
                                             momentum, bc1, bc2, total, alive, bad, beta2, 1 - beta2, eps,
                                             STARTS=starts, KIND=kind, CHECK=check, BLOCK=BLOCK)


def _flat(kind: str, key: str, p: Tensor, g: Tensor, s1: Tensor, s2: Tensor | None, n: int) -> tuple[Tensor, ...]:
    """[N, M] views of parameter `key`'s tensors (the gradient copied only where its layout or dtype needs it)."""
    for what, t in [("parameter", p), ("first state", s1)] + ([("second state", s2)] if kind == "adam" else []):
        if not t.is_contiguous() or t.dtype != torch.float32:
            raise ValueError(f"{what} {key!r} is {t.dtype} with strides {tuple(t.stride())}; allowed: contiguous "
                             "float32")
    s2 = s1 if s2 is None else s2
    return p.view(n, -1), g.reshape(n, -1).float(), s1.view(n, -1), s2.view(n, -1)


__all__ = ["available", "step_"]
