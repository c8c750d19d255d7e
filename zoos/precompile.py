"""A population's Triton kernels compiled ahead of its first step, all at once on threads.

symzoo's population kernels (popconv, poplinear, popnorm, popattn, popoptim) are Triton kernels specialised
to their layer's shapes, so a population compiles tens of them, each at its first launch, one after another,
before its first step; here they compile on threads, in parallel where Triton's compiler leaves the GIL (ptxas
runs as a process of its own; its MLIR passes hold the GIL, so kernels whose compile is mostly those passes, such
as popbilinear's generated ones, compile one after another). `ahead(device)` makes that possible without knowing the kernels
in advance:

    with ahead(device) as run:        # a dry run: kernel launches record what they would compile, and return
        ...the first evaluation and training step, their outputs ignored...
    # on leaving, the recorded kernels compile on a thread pool into the kernels' own caches
    run.kernels, run.seconds          # how many, and how long the compile took

Inside the block a launch of a kernel the process has not compiled yet is skipped: nothing compiles and
nothing runs, so its outputs keep whatever their memory held and nothing it would write in place changes. A
kernel the process has already compiled runs as usual (a dry run must therefore not hand a kernel that
writes in place any state it cares about). Launches from the block's thread and from autograd's (which runs a
CUDA backward) are the dry run's; one process runs one block at a time, and another thread's backward during
it would be taken for the block's. Where Triton lacks the hooks this needs, or off CUDA, the block runs its
code as it is and compiles nothing ahead; so it does with SYMZOO_COMPILE_AHEAD=0 (each kernel then compiles at
its first launch, one after another).

What runs inside must not depend on the skipped kernels' results for anything but more kernel launches (no
host read of them, no indexing by them: a garbage index asserts on the device, which ends the process): the
trainer's dry run (`zoos.trainer`) is the program's forward on evaluation batches, its forward and backward
on a training batch and the optimizer's update with every model marked diverged, under a forked RNG.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

try:
    import triton
    from triton import knobs as _knobs
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # no Triton, or one without the hooks: nothing compiles ahead
    triton = _knobs = _JITFunction = None

MAX_THREADS = 32  # the most compiles at once


@dataclass
class AheadRun:
    """What an `ahead` block compiled: `kernels` compiled on `threads` threads in `seconds`; `failed` the ones
    whose compile raised (their first real launch compiles them again and reports the error there)."""

    kernels: int = 0
    threads: int = 0
    seconds: float = 0.0
    failed: int = 0
    _specs: dict[tuple[int, str], tuple[Any, str]] = field(default_factory=dict, repr=False)  # (kernel, key) -> spec


def supported(device: torch.device | str) -> bool:
    """Whether kernels are compiled ahead on `device`: CUDA, a Triton with the launch hooks this uses, and
    SYMZOO_COMPILE_AHEAD not 0."""
    return (torch.device(device).type == "cuda" and os.environ.get("SYMZOO_COMPILE_AHEAD", "1") != "0"
            and _knobs is not None and hasattr(_knobs.runtime, "jit_cache_hook") and hasattr(_JITFunction, "preload")
            and os.environ.get("TRITON_INTERPRET") != "1")


_LOCK = threading.Lock()  # one dry run a process at a time: the hook is process-wide


@contextlib.contextmanager
def ahead(device: torch.device | str, threads: int | None = None) -> Iterator[AheadRun]:
    """Record the kernels the block would compile, skipping their launches; compile them on leaving, on
    `threads` threads (None: one a core this process may use, at most MAX_THREADS)."""
    run = AheadRun()
    if not supported(device):
        yield run
        return
    device = torch.device(device)
    owner = threading.get_ident()

    def hook(*, key, fn, compile, **_) -> bool | None:
        if threading.get_ident() != owner and torch._C._current_autograd_node() is None:
            return None  # another thread's launch, not a backward's (autograd runs a CUDA backward on its own thread)
        spec = compile.get("specialization_data")
        if spec is None:
            return None  # a Triton that does not describe its specialisation: compile it now, as usual
        run._specs.setdefault((id(fn.jit_function), str(key)), (fn.jit_function, spec))  # a relaunch: recorded once
        return True  # skip: neither compile nor launch

    with _LOCK:
        previous = _knobs.runtime.jit_cache_hook
        _knobs.runtime.jit_cache_hook = hook
        try:
            yield run
        finally:
            _knobs.runtime.jit_cache_hook = previous
        _compile(run, device, threads)


def _compile(run: AheadRun, device: torch.device, threads: int | None) -> None:
    """Every recorded specialisation compiled (or read from Triton's on-disk cache) into its kernel's cache."""
    if not run._specs:
        return
    start = time.perf_counter()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    run.threads = max(1, min(len(run._specs), threads or cores, MAX_THREADS))

    def one(item: tuple[Any, str]) -> bool:
        fn, spec = item
        try:
            with torch.cuda.device(device):  # preload compiles for the thread's current device
                kernel = fn.preload(spec)
                if hasattr(kernel, "_init_handles"):
                    kernel._init_handles()  # its launcher and the binary loaded on the device: else at its first launch
        except Exception:  # noqa: BLE001 - the kernel's first real launch compiles it again and raises there
            return False
        return True

    with ThreadPoolExecutor(run.threads, thread_name_prefix="symzoo-compile") as pool:
        done = list(pool.map(one, run._specs.values()))
    run.kernels, run.failed = sum(done), len(done) - sum(done)
    run.seconds = time.perf_counter() - start
    run._specs.clear()


__all__ = ["AheadRun", "MAX_THREADS", "ahead", "supported"]
