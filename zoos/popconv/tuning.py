"""popconv's kernel choices and tile sizes."""

from __future__ import annotations

import contextlib
import os


# Kernel choices and tile sizes (0 = the measured default for the layer's shape): the forward on CUDA
# cores for the few-channel layers of population zoos and on tensor cores where O is large; the weight
# gradient always on tensor cores (a CUDA-core version with a [pixels, taps, outputs] accumulator was
# 1.6-3.4x slower on every CNN-s layer); "dot": bf16 or tf32 tensor-core inputs for bf16 activations;
# "fuse": whether FastPopulation folds a following max-pool and activation into the CUDA-core forward;
# "windows": when a first layer reads a window table (`windows_pay`), "window_max_fraction" of the card
# a table may take; "window_dx": a pooled layer's input gradient as products per block of input pixels
# (else the padded conv of its unpooled gradient), "window_dx_block_n" block values (channels x pool^2) a
# tile and "window_dx_stages" its pipeline stages (each stage holds a tile's 9 loads for CNN-s: 3 stages of
# 128 rows asked 377 KB of shared memory); "window_block_m", "window_warps", "window_stages": rows a tile,
# warps and pipeline stages (0: Triton's default) of every window kernel (default 128 rows and 2 stages, the
# fastest set measured; figures in benchmarks/README.md, train_bench section);
# "wgrad_block_k": taps a weight-gradient tile (0: `_blocks`' choice). `benchmarks/step_kernels_bench.py`
# times the step's kernels under TUNING sets side by side, `benchmarks/popconv_bench.py` sweeps the conv
# tiles, `benchmarks/train_bench.py --step-kinds` times the step with each choice off, `--tuning` with
# other TUNING values.
TUNING = {"forward": os.environ.get("SYMZOO_POPCONV_FORWARD", "auto"), "fma_block_m": 0, "fused_block_m": 0, "fma_warps": 4,
          "wgrad_block_m": 0, "wgrad_block_k": 0, "wgrad_per_sm": 16, "wgrad_stages": 0, "dot": "bf16",
          "fuse": os.environ.get("SYMZOO_POPCONV_FUSE", "1") != "0",
          "windows": os.environ.get("SYMZOO_POPCONV_WINDOWS", "pool"), "window_max_fraction": 0.125,
          "window_dx": os.environ.get("SYMZOO_POPCONV_WINDOW_DX", "1") != "0", "window_dx_block_n": 64,
          "window_dx_stages": 1, "window_block_m": 128, "window_warps": 4, "window_stages": 2,
          "channels_last": True}


def parse_tuning(text: str) -> list[dict]:
    """TUNING sets from `text`: ';'-separated sets of ','-separated key=value pairs, each value cast to its
    entry's type (a flag: 0/1/false/true); an empty set is the defaults (";window_block_m=64": the defaults,
    then 64 rows). Raises ValueError naming the pair, for a key that is no entry or a value not of its type."""
    sets = []
    for part in text.split(";"):
        one = {}
        for pair in filter(None, (p.strip() for p in part.split(","))):
            key, _, value = pair.partition("=")
            if key not in TUNING:
                raise ValueError(f"tuning {pair!r}: {key!r} is not a popconv.TUNING entry; allowed: {', '.join(sorted(TUNING))}")
            kind = type(TUNING[key])
            flags = {"0": False, "false": False, "1": True, "true": True}
            try:
                one[key] = flags[value.lower()] if kind is bool else kind(value)
            except (KeyError, ValueError):
                raise ValueError(f"tuning {pair!r}: {key} takes {kind.__name__} values (now {TUNING[key]!r})") from None
        sets.append(one)
    return sets


@contextlib.contextmanager
def tuned(changes: dict):
    """TUNING with `changes` inside the block, as it was after (an exception included)."""
    saved = dict(TUNING)
    TUNING.update(changes)
    try:
        yield
    finally:
        TUNING.clear()
        TUNING.update(saved)
