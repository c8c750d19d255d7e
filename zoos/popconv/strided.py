"""A strided convolution as a stride-1 one, so that popconv's kernels run it (space to depth).

With stride (sh, sw), output pixel (i, j) reads the padded input at rows sh*i + a and columns sw*j + b. Writing
a = sh*a' + r and b = sw*b' + t, that is row i + a', column j + b' of the map whose channel (c, r, t) holds the
padded input's residues r, t of channel c:

  X[(c, r, t), i, j] = x_pad[c, sh*i + r, sw*j + t]         (`space_to_depth`: C*sh*sw channels, one copy of x)
  W'[o, (c, r, t), a', b'] = w[o, c, sh*a' + r, sw*b' + t]  (`strided_weight`; zero past the kernel)

so conv(x, w, stride s, padding p) = conv(X, W', stride 1, padding 0), exactly: the taps added by rounding the
kernel up to whole blocks (ceil(kh/sh) x ceil(kw/sw) of them) carry zero weights. A 3x3 stride-2 conv becomes a
2x2 conv over 4C channels (16 taps a channel for 9), a 2x2 stride-2 one a 1x1 conv (none added); a 1x1 conv is
a subsample of its input instead (its other residues would meet only zero weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _blocks(k: int, s: int) -> int:
    return -(-k // s)


def space_to_depth(x: Tensor, stride: tuple[int, int], padding: tuple[int, int], kernel: tuple[int, int],
                   channels_last: bool = False) -> Tensor:
    """x [R, C, H, W] as the input of the stride-1, unpadded conv that equals its stride-`stride` conv with this
    `kernel` and zero `padding`: [R, C*sh*sw, Ho + kh' - 1, Wo + kw' - 1] (a 1x1 kernel: [R, C, Ho, Wo]), with
    kh' = ceil(kh/sh); contiguous, channels-last in memory if asked."""
    (sh, sw), (ph, pw), (kh, kw) = stride, padding, kernel
    r, c, h, w = x.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    if (kh, kw) == (1, 1):
        layout = torch.channels_last if channels_last else torch.contiguous_format
        x = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x  # a zero pad would still copy the map, and again backward
        return x[:, :, ::sh, ::sw][:, :, :ho, :wo].contiguous(memory_format=layout)
    bh, bw = ho + _blocks(kh, sh) - 1, wo + _blocks(kw, sw) - 1  # the blocks the stride-1 conv reads
    x = F.pad(x, (pw, sw * bw - w - pw, ph, sh * bh - h - ph))  # zeros as the conv pads, and cut or filled to whole blocks
    x = x.reshape(r, c, bh, sh, bw, sw)
    if channels_last:  # one copy either way: [R, bh, bw, (C, sh, sw)] viewed as NCHW
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(r, bh, bw, c * sh * sw).permute(0, 3, 1, 2)
        return x.contiguous(memory_format=torch.channels_last)  # no-ops unless a stride of 1 made the reshape a view
    return x.permute(0, 1, 3, 5, 2, 4).reshape(r, c * sh * sw, bh, bw).contiguous()


def strided_weight(w: Tensor, stride: tuple[int, int]) -> Tensor:
    """Stacked filters w [N, O, C, kh, kw] as the kernel of `space_to_depth`'s conv: [N, O, C*sh*sw, kh', kw']
    (a 1x1 kernel: w itself)."""
    (sh, sw), (kh, kw) = stride, w.shape[-2:]
    if (kh, kw) == (1, 1):
        return w
    n, o, c = w.shape[:3]
    kh2, kw2 = _blocks(kh, sh), _blocks(kw, sw)
    w = F.pad(w, (0, sw * kw2 - kw, 0, sh * kh2 - kh))
    return w.reshape(n, o, c, kh2, sh, kw2, sw).permute(0, 1, 2, 4, 6, 3, 5).reshape(n, o, c * sh * sw, kh2, kw2)


__all__ = ["space_to_depth", "strided_weight"]
