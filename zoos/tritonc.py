"""A generated Triton kernel compiled in a process of its own, into Triton's on-disk cache.

Triton's compiler holds the GIL through its MLIR passes, so kernels compiled on threads of one process run those
passes one after another; a kernel whose compile is mostly those passes (popbilinear's generated products: long
straight-line code) gains from a process of its own. `zoos.precompile` sends such kernels here: a kernel whose code
was generated as text and exec'd (its file is a name linecache holds, not a file on disk) can be rebuilt in a fresh
process from that text, compiled there with the launch's specialisation for the parent's target, and the parent's
own compile of it then reads Triton's cache. This module imports Triton only: a worker starts in a fraction of a
second and never touches the GPU.

    job = tritonc.job(jit_function, signature, constants, attrs, options, target)   # None: not a generated kernel
    python -m zoos.tritonc < pickled job                                          # exit status 0 once compiled
"""

from __future__ import annotations

import importlib
import linecache
import pickle
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

_PLAIN = (bool, int, float, str, bytes, type(None))


@dataclass(frozen=True)
class Job:
    """What a worker needs to rebuild a generated kernel and compile one specialisation of it: the text, its
    pseudo file name and module (the line numbers and names Triton keys its cache by), the names the text reads
    from its scope (`modules`: name -> module name; `values`: plain values and constexprs), and the launch's signature,
    constants, attributes and options for `target`."""

    module: str
    filename: str
    text: str
    name: str
    modules: dict[str, str]
    values: dict[str, Any]
    signature: dict
    constants: dict
    attrs: dict
    options: dict
    target: Any


def job(fn: Any, signature: dict, constants: dict, attrs: dict, options: dict, target: Any) -> Job | None:
    """The job compiling JITFunction `fn`'s specialisation in a worker, or None where `fn` is not a generated
    kernel a worker can rebuild: its code not text linecache holds, or its scope holding anything but modules,
    plain values (a kernel reads a global as a tl.constexpr) and the text's own kernels."""
    from triton.language import constexpr

    code = fn.fn.__code__
    entry = linecache.cache.get(code.co_filename)
    if entry is None or len(entry) != 4 or entry[1] is not None:  # a file's code (linecache keeps its mtime), or none
        return None
    modules, values = {}, {}
    for key, value in fn.fn.__globals__.items():
        if key.startswith("__"):
            continue
        if isinstance(value, ModuleType):
            modules[key] = value.__name__
        elif isinstance(value, (*_PLAIN, constexpr)):
            values[key] = value
        elif getattr(getattr(getattr(value, "fn", None), "__code__", None), "co_filename", None) != code.co_filename:
            return None  # anything else in its scope, but a kernel the text itself defines: not rebuilt from text alone
    return Job(fn.fn.__globals__.get("__name__", "__main__"), code.co_filename, "".join(entry[2]), fn.fn.__name__,
               modules, values, signature, constants, attrs, options, target)


def compile_job(job: Job) -> None:
    """Rebuild `job`'s kernel from its text and compile its specialisation into Triton's cache."""
    import triton
    from triton.compiler.compiler import ASTSource, make_backend

    linecache.cache[job.filename] = (len(job.text), None, job.text.splitlines(True), job.filename)
    scope = {"__name__": job.module, **{k: importlib.import_module(m) for k, m in job.modules.items()}, **job.values}
    exec(compile(job.text, job.filename, "exec"), scope)  # noqa: S102 - the parent's own generated kernel code
    fn = scope[job.name]
    options = make_backend(job.target).parse_options(dict(job.options))
    source = ASTSource(fn, job.signature, job.constants, job.attrs)
    triton.compile(source, target=job.target, options=options.__dict__)


if __name__ == "__main__":
    compile_job(pickle.load(sys.stdin.buffer))
