"""popconv's kernel choices and tile sizes: one frozen `Tuning`, built at import from the SYMZOO_POPCONV_*
environment variables (read there, once; the package docstring lists them), replaced for a block by `tuned`.
Each field is read where its choice is made (the package docstring says where), so a program emitted under one
tuning keeps the ops it chose, and their launches take the tuning current when they run."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Kernel choices and tile sizes; a size of 0 takes the layer shape's default."""

    # the conv forward: "fma" CUDA cores, "dot" tensor cores, "auto" fma for < 16 outputs from < 16 inputs
    forward: str = "auto"
    # output pixels a program of the CUDA-core forward (0: 8,192 / the outputs' power of 2, at most 1,024)
    fma_block_m: int = 0
    # pooled pixels a program of the conv + pool + activation forward (0: fma_block_m's default / pool^2)
    fused_block_m: int = 0
    # warps a program of both CUDA-core forwards
    fma_warps: int = 4
    # output pixels a tile of the NCHW weight gradient (0: 128 up to 32 taps, else 64); at most the image
    wgrad_block_m: int = 0
    # taps a tile of the NCHW weight gradient (0: 16, 32 or 64, the least that holds the taps, else 64)
    wgrad_block_k: int = 0
    # programs a multiprocessor that a model's tiles are split into to fill the card (every split kernel)
    wgrad_per_sm: int = 16
    # pipeline stages of the NCHW weight gradient (0: Triton's default)
    wgrad_stages: int = 0
    # tensor-core operands: "bf16" takes bf16 activations as they are; any other value: float32 (TF32)
    dot: str = "bf16"
    # whether fastpop folds a following 2x2 max-pool and monotone activation into the conv (`fuses`)
    fuse: bool = True
    # whether a strided conv runs here as the stride-1 conv of its blocks (`supports`; else fastpop's im2col + bmm)
    strided: bool = True
    # whether a wide strided conv runs at its stride on the channels-last kernels (`strided_reads_directly`; else as
    # the stride-1 conv of its blocks)
    strided_direct: bool = True
    # whether a conv's folded activation leaves its derivative to the max-pool or stride-1 conv that alone reads it
    # (fastpop's pairing: `act_grad=False`, `input_act`; else the conv's backward runs it as a pass of its own)
    act_in_reader: bool = True
    # when a first layer reads a window table (`windows_pay`): "pool" (a 2x2 max-pool follows), "always", "never"
    windows: str = "pool"
    # the largest share of the device's memory a window table may take
    window_max_fraction: float = 0.125
    # a pooled layer's input gradient per POOL x POOL block of input pixels (else the padded conv of the unpooled)
    window_dx: bool = True
    # block values (channels x pool^2) a tile of the block input gradient
    window_dx_block_n: int = 64
    # pipeline stages of the block input gradient
    window_dx_stages: int = 1
    # rows a tile of the window kernels and the block input gradient (tiles wider than 64: 64 rows)
    window_block_m: int = 128
    # warps a program of the window kernels and the block input gradient
    window_warps: int = 4
    # pipeline stages of the window kernels (0: Triton's default; tiles wider than 64: one stage)
    window_stages: int = 2
    # whether a tensor-core forward writes its output channels-last (False: every tensor NCHW)
    channels_last: bool = True
    # im2col columns (tap, channel) a step of the channels-last forward (0: a tap's channels, 16, 32 or 64)
    cl_block_k: int = 0
    # im2col columns a step of the channels-last weight gradient (0: 64, spanning taps of a narrow layer)
    cl_wgrad_block_k: int = 0
    # output pixels a tile of the channels-last kernels (0: 128 up to 64 outputs, else 64)
    cl_block_m: int = 0
    # output pixels a tile of the channels-last weight gradient (0: cl_block_m's)
    cl_wgrad_block_m: int = 0
    # warps a program of the channels-last kernels
    cl_warps: int = 4


FORWARDS = ("auto", "fma", "dot")


def forward(t: Tuning) -> str:
    """t.forward, refused by name where it is none of FORWARDS (it comes from the environment)."""
    if t.forward not in FORWARDS:
        raise ValueError(f"SYMZOO_POPCONV_FORWARD = {t.forward!r} is not allowed; expected auto, fma or dot")
    return t.forward


def env_flag(env: Mapping[str, str], name: str, default: str = "1") -> bool:
    """The 0/1 environment variable `name` (unset: `default`), refused by name and value where it is neither."""
    value = env.get(name, default)
    if value not in ("0", "1"):
        raise ValueError(f"{name} = {value!r} is not allowed; expected 0 or 1")
    return value == "1"


def _from_environment(env: Mapping[str, str] = os.environ) -> Tuning:
    """The defaults with the SYMZOO_POPCONV_* variables of `env` applied (see the package docstring)."""
    return Tuning(forward=env.get("SYMZOO_POPCONV_FORWARD", "auto"), fuse=env_flag(env, "SYMZOO_POPCONV_FUSE"),
                  strided=env_flag(env, "SYMZOO_POPCONV_STRIDED"), windows=env.get("SYMZOO_POPCONV_WINDOWS", "pool"),
                  window_dx=env_flag(env, "SYMZOO_POPCONV_WINDOW_DX"),
                  act_in_reader=env_flag(env, "SYMZOO_POPCONV_ACT_IN_READER"))


_current = _from_environment()


def current() -> Tuning:
    """The tuning in effect: the environment's, or the innermost `tuned` block's."""
    return _current


@contextlib.contextmanager
def tuned(changes: dict) -> Iterator[Tuning]:
    """The current tuning with `changes` (field -> value) inside the block, the one before after it (an exception
    included). A key that is no field raises TypeError before the block."""
    global _current
    names = [f.name for f in dataclasses.fields(Tuning)]
    unknown = sorted(set(changes) - set(names))
    if unknown:
        raise TypeError(f"tuning {unknown[0]!r} is not a popconv tuning entry; allowed: {', '.join(sorted(names))}")
    saved = _current
    _current = dataclasses.replace(saved, **changes)
    try:
        yield _current
    finally:
        _current = saved


def parse_tuning(text: str) -> list[dict]:
    """Tuning sets from `text`: ';'-separated sets of ','-separated key=value pairs, each value cast to its
    field's type (a flag: 0/1/false/true); an empty set is the defaults (";window_block_m=64": the defaults,
    then 64 rows). Raises ValueError naming the pair, for a key that is no field or a value not of its type."""
    now = current()
    names = [f.name for f in dataclasses.fields(Tuning)]
    sets = []
    for part in text.split(";"):
        one = {}
        for pair in filter(None, (p.strip() for p in part.split(","))):
            key, _, value = pair.partition("=")
            if key not in names:
                raise ValueError(f"tuning {pair!r}: {key!r} is not a popconv tuning entry; "
                                 f"allowed: {', '.join(sorted(names))}")
            kind = type(getattr(now, key))
            flags = {"0": False, "false": False, "1": True, "true": True}
            try:
                one[key] = flags[value.lower()] if kind is bool else kind(value)
            except (KeyError, ValueError):
                raise ValueError(f"tuning {pair!r}: {key} takes {kind.__name__} values "
                                 f"(now {getattr(now, key)!r})") from None
        sets.append(one)
    return sets
