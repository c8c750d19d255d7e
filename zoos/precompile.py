"""A population's Triton kernels compiled ahead of its first step, all at once on threads and processes.

symzoo's population kernels (popconv, poplinear, popnorm, popattn, popoptim) are Triton kernels specialised
to their layer's shapes, so a population compiles tens of them, each at its first launch, one after another,
before its first step; here they compile on threads, in parallel where Triton's compiler leaves the GIL (ptxas
runs as a process of its own; its MLIR passes hold the GIL). A kernel generated as text (popbilinear's products,
whose compile is mostly those passes, seconds of them for the largest) compiles in a worker process of its own
(`zoos.tritonc`), started as the dry run below records it, into Triton's on-disk cache, which its thread then
reads. `ahead(device)` makes that possible without knowing the kernels in advance:

    with ahead(device) as run:        # a dry run: kernel launches record what they would compile, and return
        ...the first evaluation and training step, their outputs ignored...
    # on leaving, the recorded kernels compile on a thread pool into the kernels' own caches
    run.kernels, run.seconds          # how many, and how long the compile took (run.processes: how many in workers)

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
import hashlib
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from zoos import tritonc

try:
    import triton
    from triton import knobs as _knobs
    from triton.runtime.driver import driver as _driver
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # no Triton, or one without the hooks: nothing compiles ahead
    triton = _knobs = _driver = _JITFunction = None

MAX_THREADS = 32  # the most compiles at once


@dataclass(frozen=True, eq=False)  # a key by identity
class _Spec:
    """A skipped launch: the kernel, Triton's serialised specialisation (`preload`'s) and the hook's own."""

    fn: Any
    data: str
    signature: dict
    constants: dict
    attrs: dict


@dataclass
class AheadRun:
    """What an `ahead` block compiled: `kernels` compiled on `threads` threads in `seconds`, `processes` of them
    in worker processes; `failed` the ones whose compile raised (their first real launch compiles them again and
    reports the error there)."""

    kernels: int = 0
    threads: int = 0
    seconds: float = 0.0
    failed: int = 0
    processes: int = 0
    _specs: dict[tuple[int, str], _Spec] = field(default_factory=dict, repr=False)  # (kernel, key) -> its launch


def supported(device: torch.device | str) -> bool:
    """Whether kernels are compiled ahead on `device`: CUDA, a Triton with the launch hooks this uses, and
    SYMZOO_COMPILE_AHEAD not 0."""
    return (torch.device(device).type == "cuda" and os.environ.get("SYMZOO_COMPILE_AHEAD", "1") != "0"
            and _knobs is not None and hasattr(_knobs.runtime, "jit_cache_hook") and hasattr(_JITFunction, "preload")
            and os.environ.get("TRITON_INTERPRET") != "1")


_LOCK = threading.Lock()  # one dry run a process at a time: the hook is process-wide


@contextlib.contextmanager
def ahead(device: torch.device | str, threads: int | None = None) -> Iterator[AheadRun]:
    """Record the kernels the block would compile, skipping their launches (a generated kernel starts compiling
    in a worker process at once); compile them on leaving, on `threads` threads (None: one a core this process
    may use, at most MAX_THREADS)."""
    run = AheadRun()
    if not supported(device):
        yield run
        return
    device = torch.device(device)
    owner = threading.get_ident()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    run.threads = max(1, min(threads or cores, MAX_THREADS))
    workers = _Workers(device, run.threads)

    def hook(*, key, fn, compile, **_) -> bool | None:
        if threading.get_ident() != owner and torch._C._current_autograd_node() is None:
            return None  # another thread's launch, not a backward's (autograd runs a CUDA backward on its own thread)
        data = compile.get("specialization_data")
        if data is None:
            return None  # a Triton that does not describe its specialisation: compile it now, as usual
        spec = _Spec(fn.jit_function, data, compile["signature"], compile["constants"], compile["configs"][0])
        if run._specs.setdefault((id(fn.jit_function), str(key)), spec) is spec:  # a relaunch: recorded once
            workers.submit(spec)
        return True  # skip: neither compile nor launch

    with _LOCK, workers:
        previous = _knobs.runtime.jit_cache_hook
        _knobs.runtime.jit_cache_hook = hook
        try:
            yield run
        finally:
            _knobs.runtime.jit_cache_hook = previous
        _compile(run, device, workers)


class _Workers:
    """Generated kernels' specialisations compiled in worker processes (`zoos.tritonc`), each started as the dry
    run records it, at most `most` at once (not one a worker compiled into this cache before: a warm run's thread
    reads it from there); none where Triton's cache is not its file cache (a worker's compile
    would not reach this process), without a Python executable to start, or with SYMZOO_COMPILE_PROCESSES=0."""

    def __init__(self, device: torch.device, most: int):
        self.device, self.most, self.started = device, most, {}
        self.on = (_knobs.cache.manager_class is None and os.environ.get("SYMZOO_COMPILE_PROCESSES", "1") != "0"
                   and bool(sys.executable))  # an embedded interpreter may not name one
        self._pool: ThreadPoolExecutor | None = None
        self._target = None

    def submit(self, spec: _Spec) -> None:
        if not self.on:
            return
        try:
            if self._target is None:
                with torch.cuda.device(self.device):
                    self._target = _driver.active.get_current_target()
            options = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(spec.data)["options"].items()}
            job = tritonc.job(spec.fn, spec.signature, spec.constants, spec.attrs, options, self._target)
        except Exception:  # noqa: BLE001 - a specialisation this cannot describe compiles on a thread, as any other
            return
        if job is not None and not _compiled_before(job):  # else its thread reads it from Triton's cache
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.most, thread_name_prefix="symzoo-worker")
            self.started[spec] = self._pool.submit(_compile_in_process, job)

    def wait(self, spec: _Spec) -> None:
        """Until `spec`'s worker (if it has one) is done: its kernel in Triton's cache, or a failure that leaves
        the compile to this process."""
        if spec in self.started:
            self.started[spec].result()

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)  # a block that raised: what runs finishes


def _compile(run: AheadRun, device: torch.device, workers: _Workers) -> None:
    """Every recorded specialisation compiled (or read from Triton's on-disk cache) into its kernel's cache."""
    if not run._specs:
        run.threads = 0
        return
    start = time.perf_counter()
    run.threads = min(run.threads, len(run._specs))

    def one(spec: _Spec) -> bool:
        workers.wait(spec)  # a generated kernel: in Triton's cache now, or compiled here where its worker failed
        try:
            with torch.cuda.device(device):  # preload compiles for the thread's current device
                kernel = spec.fn.preload(spec.data)
                if hasattr(kernel, "_init_handles"):
                    kernel._init_handles()  # its launcher and the binary loaded on the device: else at its first launch
        except Exception:  # noqa: BLE001 - the kernel's first real launch compiles it again and raises there
            return False
        return True

    order = sorted(run._specs.values(), key=lambda spec: spec in workers.started)  # the workers' last: still running
    with ThreadPoolExecutor(run.threads, thread_name_prefix="symzoo-compile") as pool:
        done = list(pool.map(one, order))
    run.kernels, run.failed, run.processes = sum(done), len(done) - sum(done), len(workers.started)
    run.seconds = time.perf_counter() - start
    run._specs.clear()


_ROOT = str(Path(tritonc.__file__).resolve().parents[1])  # where `zoos` is imported from: the workers' path


def _compile_in_process(job: tritonc.Job) -> bool:
    """`job` compiled by `python -m zoos.tritonc` into the cache this process reads; whether it was."""
    path = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_CACHE_DIR": _knobs.cache.dir, "PYTHONPATH": path}
    try:
        done = subprocess.run([sys.executable, "-m", "zoos.tritonc"], input=pickle.dumps(job), env=env,
                              capture_output=True, check=False)
    except OSError:
        return False
    if done.returncode != 0:
        return False
    with contextlib.suppress(OSError):  # no note: the next run's worker compiles it again, finding it cached
        marker = _marker(job)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return True


def _marker(job: tritonc.Job) -> Path:
    """A note in Triton's cache directory that a worker compiled `job` there (cleared with the cache)."""
    key = hashlib.sha256(pickle.dumps((triton.__version__, job))).hexdigest()
    return Path(_knobs.cache.dir) / "symzoo-workers" / key


def _compiled_before(job: tritonc.Job) -> bool:
    """Whether a worker compiled `job` into this cache before: a warm run starts no worker for it."""
    try:
        return _marker(job).exists()
    except Exception:  # noqa: BLE001 - a job that does not pickle alike: compiled in a worker, as new
        return False


__all__ = ["AheadRun", "MAX_THREADS", "ahead", "supported"]
