"""Per-model 2-D convolutions for a population as Triton implicit-GEMM kernels (forward and backward).

A population of N small CNNs, each with its own weights and its own batch, is a grouped convolution
with 1-8 channels per group: cuDNN runs it far below the card's limit, and im2col + bmm (the portable
path in `zoos.fastpop`) spends as much time writing and reading the patch matrix as multiplying.
Here each program owns one model and a tile of its output pixels and builds the patch tile in
registers straight from the input (no patch matrix in memory):

  forward     y[m, p, o]  = sum_k  patch(x)[m, p, k] * w[m, o, k] + b[m, o]     tiles [pixels, K] @ [K, O]
  input grad  dx          = the forward on dy, zero-padded by k-1-pad, with w flipped and in/out swapped
  weight grad dw[m, o, k] = sum_p  patch(x)[m, p, k] * dy[m, p, o]             tiles [K, pixels] @ [pixels, O]
              db[m, o]    = sum_p  dy[m, p, o]                                 (same pass)

with p running over (sample, output row, output column) and k over (in-channel, kernel row, kernel
column). Any channel counts, kernel size and zero padding at stride 1 (what `supports` checks).
The forward of few-channel layers (O <= 16 from C < 16) runs on CUDA cores in float32, one tap at a
time; other forwards and every weight gradient run as tensor-core tiles with float32 accumulation, their
inputs in bf16 where the activations are bf16 (as autocast would) and TF32 otherwise (the choices and
the tile sizes were measured: benchmarks/popconv_bench.py, benchmarks/zoo_bench.py). Activations are
read and written in their own dtype (bf16 in the trainer), weights are read as float32 master copies,
and weight gradients come back in float32. Layouts matter more than arithmetic at these sizes: in the
few-channel kernels a thread's pixels lie along the fast axis of every tile, so inputs are loaded by the
threads that use them and dy loads coalesce. Wide layers (16 or more inputs) are channels-last instead:
k runs over (kernel row, kernel column, in-channel), so a tap's channels are one contiguous run per pixel
and every [pixels, channels] tile loads whole rows. A tensor-core forward writes its output channels-last
(logical NCHW, `torch.channels_last` memory), which the next wide layer, PyTorch's pointwise ops and
`max_pool2x2` keep; `TUNING["channels_last"] = False` keeps every tensor NCHW.

The first layer can read its input by row index: `rows[m*B + b]` names the sample of the data set
`x [S, C, H, W]` that model m sees at batch position b, so a training step indexes the resident data
set on the device instead of materialising an [N, B, C, H, W] copy, and an evaluation on a shared
batch (rows = the same B indices for every model) never expands the input N times.

`conv2d_pool_act(x, w, b, padding, pool=2, act="tanh")` is the CUDA-core forward with a 2x2 max-pool
and a monotone activation folded in (what `zoos.fastpop` emits for conv -> pool -> act chains): a
thread computes all four window positions of its pooled pixels, each input value and weight loaded
once for the positions that share it, and writes only the pooled, activated output and a byte per
output saying which position won. Its backward rebuilds the conv's output gradient from those
(act'(a) * da at the winning position): inside the weight-gradient kernel's dy tile when the input
needs no gradient (the first layer), else once in memory for the input-gradient conv to share.

A first layer that reads the data set by index can instead read its window table (`window_table`, built
once per resident data set): row (s, q) is the whole (k + pool - 1)^2 input window of pooled output q,
so the forward is one [positions, window] @ [window, outputs] tensor-core product per window position (the
weights placed at that position; max, code, bias and activation after) and the weight gradient one
[(window position, output), pooled outputs] @ [pooled outputs, window] product (each output's gradient
placed at the position the pool chose), with contiguous rows instead of per-pixel gathers. A pooled
layer's input gradient is likewise a sum of tensor-core products, a row per POOL x POOL block of input
pixels: each pooled output whose window covers the block, its gradient placed at the position the pool
chose, times the weights shifted to that block (`window_dx`).

`conv2d(x, w, b, padding, rows)` is a `torch.library` custom op with its backward registered, so
`torch.compile` fuses everything around it and autograd differentiates through it. Without a GPU the
kernels run in Triton's interpreter (`TRITON_INTERPRET=1`), which the tests use to check them.
"""

from .common import available, stored_channels_last, supports
from .conv import conv2d
from .pool import max_pool2x2
from .pooled import EPILOGUE_ACTIVATIONS, conv2d_pool_act, fuses
from .tuning import Tuning, parse_tuning, tuned
from .window import window_table, window_table_bytes, windows_pay

__all__ = ["EPILOGUE_ACTIVATIONS", "Tuning", "available", "conv2d", "conv2d_pool_act", "fuses", "max_pool2x2",
           "parse_tuning", "stored_channels_last", "supports", "tuned", "window_table", "window_table_bytes",
           "windows_pay"]
