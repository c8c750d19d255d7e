"""Architectures, equivariant and baseline, each with its permutation spec."""

from zoos.archs.base import ARCHS, ArchError, ArchInfo, PopDropout, SymModule, build_arch, make_activation, reinit

# Importing the architecture modules registers them.
from zoos.archs import baselines as _baselines  # noqa: E402,F401
from zoos.archs import canonical as _canonical  # noqa: E402,F401
from zoos.archs import clifford as _clifford  # noqa: E402,F401
from zoos.archs import equivariant as _equivariant  # noqa: E402,F401
from zoos.archs import inr as _inr  # noqa: E402,F401
from zoos.archs import published as _published  # noqa: E402,F401
from zoos.archs import transformers as _transformers  # noqa: E402,F401

__all__ = ["ARCHS", "ArchError", "ArchInfo", "PopDropout", "SymModule", "build_arch", "make_activation", "reinit"]
