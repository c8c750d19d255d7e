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
column). Any channel counts, kernel size and zero padding at stride 1 (what `supports` checks); a larger stride
runs at that stride on the channels-last kernels where the layer and its input gradient read channels-last
(`strided_reads_directly`: the input gradient the forward over dy dilated by the stride), else as the stride-1
conv of the input's stride x stride blocks (`strided`), exactly.
The forward of few-channel layers (O <= 16 from C < 16) runs on CUDA cores in float32, one tap at a
time; other forwards and every weight gradient run as tensor-core tiles with float32 accumulation, their
inputs in bf16 where the activations are bf16 (as autocast would) and TF32 otherwise
(benchmarks/popconv_bench.py and benchmarks/zoo_bench.py measure these choices and the tile sizes).
Activations are read and written in their own dtype (bf16 in the trainer), weights are read as float32
master copies, and weight gradients come back in float32. In the few-channel kernels a thread's pixels
lie along the fast axis of every tile, so inputs are loaded by the threads that use them and dy loads
coalesce. Wide layers (16 or more inputs) are channels-last instead: k runs over (kernel row, kernel
column, in-channel), so a tap's channels are one contiguous run per pixel and every [pixels, channels]
tile loads whole rows. A tensor-core forward writes its output channels-last (logical NCHW,
`torch.channels_last` memory), which the next wide layer, PyTorch's pointwise ops and `max_pool2x2`
keep; the tuning's `channels_last=False` keeps every tensor NCHW.

The first layer can read its input by row index: `rows[m*B + b]` names the sample of the data set
`x [S, C, H, W]` that model m sees at batch position b, so a training step indexes the resident data
set on the device instead of materialising an [N, B, C, H, W] copy, and an evaluation on a shared
batch (rows = the same B indices for every model) never expands the input N times.

`conv2d_pool_act(x, w, b, padding, pool=2, act="tanh")` is the CUDA-core forward with a 2x2 max-pool
and a monotone activation folded in (what `zoos.fastpop` emits for conv -> pool -> act chains): a
thread computes all four window positions of its pooled pixels, each input value and weight loaded
once for the positions that share it, and writes only the pooled, activated output and a byte per
output saying which position won. Its backward rebuilds the conv's output gradient from those
(act'(a) * da at the winning position) inside the weight-gradient kernel's dy tile; the input gradient
is a sum of tensor-core products, a row per POOL x POOL block of input pixels: each pooled output whose
window covers the block, its gradient placed at the position the pool chose, times the weights shifted
to that block (`window_dx`; off, the rebuilt gradient is written once, for the padded input-gradient
conv and the weight gradient to read). A conv with more outputs than that kernel holds (16) folds a following
activation alone: `conv2d_pool_act(.., pool=1)` is then the plain forward with the activation in its
epilogue, and its backward one pass of the activation's own backward before the conv's; where a 2x2 max-pool
alone reads it, that pass is the pool's instead (`act_grad=False`, `max_pool2x2(.., act=...)`: act' read off
the pooled output at the winning position, while the pool's backward writes the map's gradient anyway), and
the conv keeps no copy of its full-resolution output for its backward; where a stride-1 conv without a pool
alone reads it, that conv's input gradient is stored times act'(its input) (`input_act`), the same pass saved;
where a spatial mean alone reads it, the mean's backward does (`spatial_mean`).

A first layer that reads the data set by index can instead read its window table (`window_table`, built
once per resident data set): row (s, q) is the whole (k + pool - 1)^2 input window of pooled output q,
so the forward is one [positions, window] @ [window, outputs] tensor-core product per window position (the
weights placed at that position; max, code, bias and activation after) and the weight gradient one
[(window position, output), pooled outputs] @ [pooled outputs, window] product (each output's gradient
placed at the position the pool chose), with contiguous rows instead of per-pixel gathers.

`conv2d(x, w, b, padding, rows)` is a `torch.library` operator with its backward registered (`PopulationOp`), so
`torch.compile` fuses everything around it and autograd differentiates through it. Without a GPU the
kernels run in Triton's interpreter (`TRITON_INTERPRET=1`), which the tests use to check them.

One module a kernel family, each with its kernels, launchers and operators:
  conv     the direct conv: CUDA-core and tensor-core forwards (NCHW and channels-last), the conv + pool +
           activation forward, weight gradients (`conv2d`)
  pooled   conv + max-pool + activation as one op and its backward, the block input gradient
           (`conv2d_pool_act`, `fuses`, `EPILOGUE_ACTIVATIONS`)
  window   the first layer's window table, its forward and weight-gradient kernels (`window_table`,
           `window_table_bytes`, `windows_pay`, `windows_wanted`)
  pool     the 2x2 max-pool in either memory format (`max_pool2x2`)
  strided  a strided conv as the stride-1 conv of its input's blocks (`space_to_depth`, `strided_weight`)
  tuning   kernel choices and tile sizes (`Tuning`, `tuned`, `parse_tuning`)
  common   what several families share (`available`, `supports`, `stored_channels_last`)

Tuning: `tuning.current()` is a frozen `Tuning`, built at import from the environment variables below;
`with tuned({"window_block_m": 64}):` replaces it inside the block (the benchmarks' --tuning sets,
`parse_tuning`). Each field is read where its choice is made: `fuse`, `forward` (through `fuses`), `strided`
(through `supports`), `strided_direct` (through `strided_reads_directly`, again at each call of `conv2d`),
`window_dx` and `act_in_reader` when `zoos.fastpop` emits a program, `windows` and `window_max_fraction` when a
window table is or is not built, the others (and `forward` again) at each launch.

Environment variables, read once when the package is imported:
  SYMZOO_POPCONV_FORWARD    auto (default), fma or dot: the conv forward on CUDA cores (fma) or tensor cores
                            (dot); auto takes fma for fewer than 16 outputs from fewer than 16 inputs. fma also folds
                            the pool and activation into every conv, dot only an activation without a pool
  SYMZOO_POPCONV_FUSE       1 (default) or 0: 0 keeps a following 2x2 max-pool and activation out of the conv
  SYMZOO_POPCONV_STRIDED    1 (default) or 0: 0 leaves strided convs to zoos.fastpop's im2col + bmm
  SYMZOO_POPCONV_ACT_IN_READER  1 (default) or 0: 0 keeps a folded activation's derivative in its conv's backward
                            (a pass of its own) instead of the max-pool's or conv's that alone reads it
  SYMZOO_POPCONV_WINDOWS    pool (default), always or never: when a first layer reading the data set by index
                            reads its window table (pool: when a 2x2 max-pool follows), within 1/8 of the
                            device's memory
  SYMZOO_POPCONV_WINDOW_DX  1 (default) or 0: 0 takes a pooled layer's input gradient as the padded conv of its
                            unpooled gradient instead of the block products
  TRITON_INTERPRET          Triton's own: 1 runs the kernels in its interpreter on the CPU (`available("cpu")`)
"""

from .common import EPILOGUE_ACTIVATIONS, available, stored_channels_last, supports
from .conv import conv2d, reads_channels_last, strided_reads_directly
from .pool import max_pool2x2
from .pooled import conv2d_pool_act, fuses, spatial_mean
from .strided import space_to_depth, strided_weight
from .tuning import Tuning, parse_tuning, tuned
from .window import window_table, window_table_bytes, windows_pay, windows_wanted

__all__ = ["EPILOGUE_ACTIVATIONS", "Tuning", "available", "conv2d", "conv2d_pool_act", "fuses", "max_pool2x2",
           "parse_tuning", "reads_channels_last", "space_to_depth", "spatial_mean", "stored_channels_last",
           "strided_reads_directly", "strided_weight", "supports", "tuned", "window_table", "window_table_bytes",
           "windows_pay", "windows_wanted"]
