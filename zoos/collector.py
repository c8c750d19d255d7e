"""The garbage collector around symzoo's bursts of allocation.

A full collection walks every tracked object, and a process that imported torch holds hundreds of thousands
(its modules, and the ones a first trace imports lazily: sympy, torch._dynamo). Two rules keep those walks
out of the hot paths:
- `paused()`: no collection while a program is traced. A trace (and the imports it triggers) allocates
  objects by the hundred thousand, each burst starting a collection that walks everything made so far.
- `spares_the_old()`: the objects alive on entry frozen out of the collector's passes while a population
  trains; its eager steps make enough short-lived objects to start a full pass every few steps.
"""

from __future__ import annotations

import contextlib
import gc
from typing import Iterator


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No automatic collection inside (the cycles made there are collected after); a pause already on stays on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextlib.contextmanager
def spares_the_old() -> Iterator[None]:
    """The objects alive on entry left out of the collector's passes until exit. What was frozen before stays
    frozen: the collector cannot unfreeze a part, so another freeze's objects stay with it."""
    frozen_before = gc.get_freeze_count()
    gc.freeze()
    try:
        yield
    finally:
        if not frozen_before:
            gc.unfreeze()


__all__ = ["paused", "spares_the_old"]
