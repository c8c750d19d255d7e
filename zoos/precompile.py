"""A population's Triton kernels compiled ahead of its first step, all at once, on threads and worker processes.

symzoo's population kernels (popconv, poplinear, popnorm, popattn, popoptim, popbilinear) are Triton kernels
specialised to their layer's shapes, so a population compiles tens of them, each at its first launch, one after
another, before its first step; here they compile at once. `ahead(device)` makes that possible without knowing the
kernels in advance:

    with ahead(device) as run:        # a dry run: kernel launches record what they would compile, and return
        ...the first evaluation and training step, their outputs ignored...
    # on leaving, the recorded kernels compile into the kernels' own caches
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

Where the compile runs: Triton's MLIR passes hold the GIL (ptxas runs as a process of its own), so threads
compile a process's kernels mostly one after another. `start_workers()` starts compile workers, processes of
their own (`python -c ...` on the parent's sys.path; no CUDA in them), once a process, at the start of a
population on CUDA, so they are up by its first compile. On leaving a block the recorded kernels, largest source
first, go to the workers, which compile each for the spec's target into Triton's on-disk cache; the parent then
loads it from there (a cache hit) onto the device. At the same time the parent's threads take the smallest ones
and compile them in the process (with warm caches: a cache hit each, before a worker has started). A kernel a
worker cannot rebuild (a module-level `@triton.jit` function is found by its module and name; a generated one
where its maker registered itself with `remade_by`) or fails to compile is compiled by the parent as before.
SYMZOO_COMPILE_WORKERS sets how many (0: none; default: half the cores this process may use, at most 8).
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

try:
    import triton
    from triton import knobs as _knobs
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # no Triton, or one without the hooks: nothing compiles ahead
    triton = _knobs = _JITFunction = None

MAX_THREADS = 32  # the most compiles at once in the process
MAX_WORKERS = 8  # the most compile worker processes by default


@dataclass
class AheadRun:
    """What an `ahead` block compiled: `kernels` compiled on `threads` threads in `seconds`, `in_workers` of them
    by the compile workers; `failed` the ones whose compile raised (their first real launch compiles them again
    and reports the error there)."""

    kernels: int = 0
    threads: int = 0
    seconds: float = 0.0
    failed: int = 0
    in_workers: int = 0
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
    `threads` threads (None: one a core this process may use, at most MAX_THREADS) and the compile workers."""
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


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _compile(run: AheadRun, device: torch.device, threads: int | None) -> None:
    """Every recorded specialisation compiled (or read from Triton's on-disk cache) into its kernel's cache: the
    largest by the workers (then read back from the disk cache), the smallest by the process's threads."""
    if not run._specs:
        return
    start = time.perf_counter()
    run.threads = max(1, min(len(run._specs), threads or _cores(), MAX_THREADS))
    queue = collections.deque(sorted(run._specs.values(), key=lambda item: -len(getattr(item[0], "src", ""))))
    taken = threading.Lock()
    done: list[bool] = []
    in_workers: list[bool] = []

    def take(largest: bool) -> tuple[Any, str] | None:
        with taken:
            return (queue.popleft() if largest else queue.pop()) if queue else None

    def load(item: tuple[Any, str]) -> bool:
        fn, spec = item
        try:
            with torch.cuda.device(device) if torch.cuda.is_available() else contextlib.nullcontext():
                # preload compiles for the thread's current device (without CUDA: Triton's active driver's)
                kernel = fn.preload(spec)
                if hasattr(kernel, "_init_handles"):
                    kernel._init_handles()  # its launcher and the binary loaded on the device: else at its first launch
        except Exception:  # noqa: BLE001 - the kernel's first real launch compiles it again and raises there
            return False
        return True

    def in_process() -> None:
        while (item := take(largest=False)) is not None:
            done.append(load(item))

    def through(worker: _Worker) -> None:
        if not worker.wait_ready(lambda: not queue):
            return
        while (item := take(largest=True)) is not None:
            compiled = worker.compile(*item)
            in_workers.append(compiled)
            done.append(load(item))  # from the disk cache where the worker compiled it, else compiled here

    workers = _WORKERS or []
    with ThreadPoolExecutor(run.threads + len(workers), thread_name_prefix="symzoo-compile") as pool:
        for f in [pool.submit(through, w) for w in workers] + [pool.submit(in_process) for _ in range(run.threads)]:
            f.result()
    run.kernels, run.failed, run.in_workers = sum(done), len(done) - sum(done), sum(in_workers)
    run.seconds = time.perf_counter() - start
    run._specs.clear()


# -- compile workers


def remade_by(kernel: Any, maker: Callable[..., Any], *args: Any) -> Any:
    """Note on a generated `kernel` that `maker(*args)` (a module-level function, JSON arguments) makes it again in
    another process, so a compile worker can compile it; returns the kernel."""
    kernel._symzoo_made_by = (maker.__module__, maker.__qualname__, list(args))
    return kernel


def _recipe(fn: Any) -> list | None:
    """How a worker finds the JITFunction `fn`: [module, name, maker arguments or None], None where it cannot."""
    made = getattr(fn, "_symzoo_made_by", None)
    if made is not None:
        return list(made)
    inner = getattr(fn, "fn", None)
    module, name = getattr(inner, "__module__", None), getattr(inner, "__qualname__", "")
    if not module or "<locals>" in name or module == "__main__":
        return None  # a worker does not run the parent's main script
    return [module, name, None]


def _found(recipe: list) -> Any:
    """The JITFunction `recipe` names, in this process."""
    module, name, args = recipe
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    if args is not None:
        obj = obj(*args)
    while _JITFunction is not None and not isinstance(obj, _JITFunction) and hasattr(obj, "fn"):
        obj = obj.fn  # an autotuner's or heuristics' wrapper
    return obj


class _Worker:
    """One compile worker process: a JSON line in (a kernel's recipe, its specialisation, Triton's environment),
    a JSON line out (whether it compiled)."""

    def __init__(self, env: dict[str, str], modules: list[str]):
        code = f"from zoos.precompile import _serve; _serve({modules!r})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, text=True, start_new_session=True)
        self.ready = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._started, daemon=True, name="symzoo-compile-worker").start()

    def _started(self) -> None:
        if self.proc.stdout.readline().strip() == "ready":
            self.ready.set()

    def wait_ready(self, give_up: Callable[[], bool]) -> bool:
        """Whether the worker is up, waiting while it starts unless `give_up()` (no work left for it)."""
        while not self.ready.wait(0.02):
            if give_up() or self.proc.poll() is not None:
                return False
        return True

    def compile(self, fn: Any, spec: str) -> bool:
        recipe = _recipe(fn)
        if recipe is None or self.proc.poll() is not None:
            return False
        env = {k: v for k, v in os.environ.items() if k.startswith("TRITON_")}
        try:
            with self.lock:
                self.proc.stdin.write(json.dumps({"recipe": recipe, "key": fn.cache_key, "spec": spec, "env": env}) + "\n")
                self.proc.stdin.flush()
                reply = self.proc.stdout.readline()
        except (OSError, ValueError):  # the worker is gone
            return False
        return bool(reply) and json.loads(reply).get("ok", False)


_WORKERS: list[_Worker] | None = None  # the process's, once started
_STARTING = threading.Lock()


def workers_wanted() -> int:
    """How many compile workers to start: SYMZOO_COMPILE_WORKERS, else half the cores, at most MAX_WORKERS."""
    value = os.environ.get("SYMZOO_COMPILE_WORKERS", "")
    if value.strip():
        try:
            return max(0, int(value))
        except ValueError:
            raise ValueError(f"SYMZOO_COMPILE_WORKERS={value!r}: expected a whole number of worker processes "
                             "(0: compile in the process only)") from None
    return min(MAX_WORKERS, _cores() // 2)


def start_workers(device: torch.device | str) -> int:
    """Start the process's compile workers if kernels compile ahead on `device` and they are not started yet (they
    live as long as the process); returns how many there are. They import Triton and symzoo's kernel modules while
    the caller goes on."""
    global _WORKERS
    if not supported(device):
        return 0
    with _STARTING:
        if _WORKERS is None:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
            env["CUDA_VISIBLE_DEVICES"] = ""  # a worker compiles for a target it is told: no device
            modules = sorted(m for m in sys.modules if m.startswith("zoos.pop"))
            _WORKERS = [_Worker(env, modules) for _ in range(workers_wanted())]
        return len(_WORKERS)


def _serve(modules: list[str]) -> None:
    """A compile worker's loop (`_Worker`): import Triton's compiler and `modules`, say ready, then compile each
    kernel asked for into Triton's on-disk cache for its spec's target, until stdin closes."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what the imports and the compiler print goes where stderr goes, not into the replies
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as compile_kernel
    from triton.compiler import make_backend

    for module in modules:
        with contextlib.suppress(Exception):
            importlib.import_module(module)
    protocol.write("ready\n")
    for line in sys.stdin:
        try:
            task = json.loads(line)
            for k in [k for k in os.environ if k.startswith("TRITON_") and k not in task["env"]]:
                del os.environ[k]
            os.environ.update(task["env"])
            fn = _found(task["recipe"])
            if fn.cache_key != task["key"]:
                raise RuntimeError("the kernel's code differs from the parent's")
            spec = json.loads(task["spec"])
            target = GPUTarget(**spec["target"])
            source = ASTSource(fn, *_decoded(spec))
            options = make_backend(target).parse_options(
                {k: tuple(v) if isinstance(v, list) else v for k, v in spec["options"].items()})
            compile_kernel(source, target=target, options=options.__dict__)
            reply = {"ok": True}
        except Exception as e:  # noqa: BLE001 - the parent compiles it itself
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        protocol.write(json.dumps(reply) + "\n")


def _decoded(spec: dict) -> tuple[dict, dict, dict]:
    """A kernel specialisation's (signature, constexprs, attrs) from Triton's JSON description of it (what
    JITFunction.preload reads)."""
    import triton.language as tl
    from triton.runtime import jit

    registry = getattr(jit, "_triton_jit_function_registry", {})

    def constant(value: Any) -> Any:
        if tl.dtype.is_dtype(value):
            return tl.dtype(value)
        if isinstance(value, dict) and "constexpr" in value:
            return tl.constexpr(value["constexpr"])
        if isinstance(value, dict) and "jit_function" in value:
            return registry[value["jit_function"]]
        return value

    constexprs = {tuple(k): constant(v) for k, v in zip(spec["constant_keys"], spec["constant_vals"])}
    attrs = {tuple(k): v for k, v in zip(spec["attrs_keys"], spec["attrs_vals"])}
    signature = {k: _tupled(v) for k, v in spec["signature"].items()}
    return signature, constexprs, attrs


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


__all__ = ["AheadRun", "MAX_THREADS", "MAX_WORKERS", "ahead", "remade_by", "start_workers", "supported",
           "workers_wanted"]
