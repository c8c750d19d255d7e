"""Kernels compiled ahead (`zoos.precompile`): inside the block a launch of a kernel not yet compiled is skipped and
recorded, leaving the block compiles what was recorded; the trainer's dry run leaves no trace in what it trains."""

import json
import linecache
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoos import popbilinear, popoptim, precompile, tritonc
from zoos.trainer import Optimizer

ROOT = Path(__file__).resolve().parents[2]
on_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and precompile.supported("cuda")),
                             reason="kernels compile ahead on CUDA only")

if precompile.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _scaled(x_ptr, y_ptr, n, SCALE: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * SCALE, mask=i < n)


def _launch(x: torch.Tensor, y: torch.Tensor, scale: int) -> None:
    _scaled[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), SCALE=scale, BLOCK=256)


@on_cuda
def test_a_new_kernel_is_skipped_inside_and_compiled_on_leaving():
    from triton import knobs

    scale = random.randrange(2, 1 << 20)  # a constexpr this process has not compiled
    x = torch.arange(1000, dtype=torch.float32, device="cuda")
    y = torch.zeros_like(x)
    with precompile.ahead("cuda") as run:
        _launch(x, y, scale)
        torch.cuda.synchronize()
        assert not y.any()  # neither compiled nor run
    assert (run.kernels, run.failed) == (1, 0) and run.threads == 1 and run.seconds > 0
    compiled: list = []
    knobs.runtime.jit_post_compile_hook, previous = (lambda **kw: compiled.append(kw)), knobs.runtime.jit_post_compile_hook
    try:
        _launch(x, y, scale)
    finally:
        knobs.runtime.jit_post_compile_hook = previous
    assert compiled == []  # found in the kernel's cache
    torch.testing.assert_close(y, x * scale, rtol=0, atol=0)


@on_cuda
def test_a_kernel_compiled_before_runs_inside():
    scale = random.randrange(2, 1 << 20)
    x = torch.arange(300, dtype=torch.float32, device="cuda")
    _launch(x, torch.empty_like(x), scale)
    y = torch.zeros_like(x)
    with precompile.ahead("cuda") as run:
        _launch(x, y, scale)
    assert run.kernels == 0
    torch.testing.assert_close(y, x * scale, rtol=0, atol=0)


def test_off_cuda_a_block_runs_its_code_and_compiles_nothing():
    ran = []
    with precompile.ahead("cpu") as run:
        ran.append(1)
    assert ran == [1] and (run.kernels, run.threads) == (0, 0)
    assert not precompile.supported("cpu")


_GENERATED = """
@triton.jit
def {name}(x_ptr, y_ptr, n, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * SCALE * OFFSET, mask=i < n)
"""


def _generated(scope: dict):
    """A kernel generated as text and exec'd, as popbilinear makes its products, under a file name of its own."""
    name = f"_generated_{random.getrandbits(48):012x}"
    source, filename = _GENERATED.format(name=name), f"<test_precompile {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    scope = {"triton": triton, "tl": tl, "__name__": __name__, **scope}
    exec(compile(source, filename, "exec"), scope)
    return scope[name]


def _specialisation(fn, constexprs: dict) -> tuple[dict, dict, dict]:
    """A launch's signature, constants and attributes for `fn` (float32 pointers, 16-byte aligned; int32 others)."""
    signature = {p.name: "constexpr" if p.is_constexpr else "*fp32" if p.name.endswith("_ptr") else "i32"
                 for p in fn.params}
    constants = {(i,): constexprs[p.name] for i, p in enumerate(fn.params) if p.is_constexpr}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params) if p.name.endswith("_ptr")}
    return signature, constants, attrs


needs_triton = pytest.mark.skipif(precompile.triton is None, reason="needs Triton")


_WORKER_THEN_HERE = """
import json, os, sys
sys.path.insert(0, os.getcwd())
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource, make_backend
from tests.zoos.test_precompile import _generated, _specialisation
from zoos import precompile, tritonc

fn = _generated({"OFFSET": tl.constexpr(3)})
target = GPUTarget("cuda", 90, 32)
job = tritonc.job(fn, *_specialisation(fn, {"SCALE": 2, "BLOCK": 128}), {"num_warps": 4}, target)
before = precompile._compiled_before(job)
compiled = precompile._compile_in_process(job)
again = precompile._compiled_before(tritonc.job(fn, *_specialisation(fn, {"SCALE": 2, "BLOCK": 128}), {"num_warps": 4}, target))
other = precompile._compiled_before(tritonc.job(fn, *_specialisation(fn, {"SCALE": 5, "BLOCK": 128}), {"num_warps": 4}, target))
hits = []
triton.knobs.compilation.listener = lambda **kw: hits.append(kw["cache_hit"])
options = make_backend(target).parse_options({"num_warps": 4}).__dict__
for scale in (2, 5):
    triton.compile(ASTSource(fn, *_specialisation(fn, {"SCALE": scale, "BLOCK": 128})), target=target, options=options)
print(json.dumps({"compiled": compiled, "hits": hits, "modules": job.modules, "values": list(job.values),
                  "noted": [before, again, other]}))
"""


@needs_triton
def test_a_generated_kernel_compiled_in_a_worker_is_read_from_the_cache(tmp_path):
    """A worker process rebuilds a generated kernel from its text and compiles a specialisation (for an H100, on
    any host: Triton ships ptxas) into the cache the parent then reads; another specialisation is not there. The
    compile is noted in the cache, so a later run's identical job starts no worker."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, as on a GPU
    out = subprocess.run([sys.executable, "-c", _WORKER_THEN_HERE], cwd=ROOT, capture_output=True, text=True,
                         env={**env, "TRITON_CACHE_DIR": str(tmp_path)}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"compiled": True, "hits": [True, False], "modules": {"triton": "triton", "tl": "triton.language"},
                   "values": ["OFFSET"], "noted": [False, True, False]}


@needs_triton
def test_only_kernels_generated_from_text_alone_go_to_workers():
    """A kernel in a file compiles on a thread; so does a generated one whose scope holds more than modules, plain
    values and the text's own kernels; popbilinear's generated products go to workers."""
    spec = ({}, {}, {}, {}, None)
    assert tritonc.job(_scaled, *spec) is None
    assert tritonc.job(_generated({"OFFSET": [3]}), *spec) is None
    assert tritonc.job(_generated({"OFFSET": tl.constexpr(3), "helper": _scaled}), *spec) is None
    product = popbilinear._kernel((((0, 0, 1.0), (1, 1, -1.0)),), ((2,), (2,), (1,)), 2, False, "")
    job = tritonc.job(product, *spec)
    assert job is not None and job.name == product.fn.__name__ and job.module == "zoos.popbilinear"


@needs_triton
def test_workers_can_be_turned_off(monkeypatch):
    """SYMZOO_COMPILE_PROCESSES=0: a generated kernel's specialisation starts no worker (it compiles on a thread)."""
    monkeypatch.setenv("SYMZOO_COMPILE_PROCESSES", "0")
    workers = precompile._Workers(torch.device("cuda"), 2)
    product = popbilinear._kernel((((0, 0, 1.0),),), ((1,), (1,), (1,)), 1, False, "")
    with workers:
        workers.submit(precompile._Spec(product, "{}", {}, {}, {}))
    assert not workers.on and workers.started == {}


def test_compile_ahead_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("SYMZOO_COMPILE_AHEAD", "0")
    assert not precompile.supported("cuda")


@pytest.mark.parametrize("update", ["eager", "popoptim"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_the_optimizers_dry_step_writes_nothing(kind, update):
    """Every model marked diverged: the update's launches run (or are skipped, inside a block), and the parameters,
    the moments, the step count and which models are alive stay as they were."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if update == "popoptim" and not popoptim.available(device):
        pytest.skip("needs Triton (GPU or TRITON_INTERPRET=1)")
    gen = torch.Generator().manual_seed(0)
    params = {k: torch.randn(s, generator=gen).to(device) for k, s in {"w": (3, 4, 5), "b": (3, 4)}.items()}
    lr = torch.full((3,), 0.1, device=device)
    opt = Optimizer(kind, params, lr, torch.full((3,), 1e-2, device=device), torch.full((3,), 0.9, device=device),
                    update=update)
    grads = {k: torch.randn(v.shape, generator=gen).to(device) for k, v in params.items()}
    opt.step(params, grads, torch.zeros(3, device=device))  # moments and a count not at their start
    opt.state.alive[1] = False
    before = [{k: v.clone() for k, v in d.items()} for d in (params, opt.state.first, opt.state.second)]
    count, alive = opt.state.count.clone(), opt.state.alive.clone()
    opt.dry_step(params, {k: torch.randn(v.shape, generator=gen).to(device) for k, v in params.items()},
                 torch.zeros(3, device=device))
    for was, now in zip(before, (params, opt.state.first, opt.state.second)):
        for k in was:
            torch.testing.assert_close(now[k], was[k], rtol=0, atol=0)
    assert torch.equal(opt.state.count, count) and torch.equal(opt.state.alive, alive)


_TRAIN_TWICE = """
import json, os, sys
import numpy as np
sys.path.insert(0, os.getcwd())
from tests.zoos.test_trainer import one_population, zoo_models
from zoos.trainer import train_population

# eigh reads its status on the host: no dry run of the program (on the skipped kernels' outputs it may fail)
fa = one_population(zoo_models({"seed": [0, 1]}, arch={"name": "frame_avg", "config": {"width": 8}}, task="inertia",
                               task_options={"n_train": 64, "n_val": 16, "n_test": 16}, epochs=1))
eager = train_population(fa, device="cuda", precision="bf16")
pop = one_population(zoo_models({"seed": [0, 1, 2]}, arch={"name": "cnn", "config": {"width": 8, "depth": 2, "dropout": 0.3}},
                                epochs=2))
# popbilinear's products: generated kernels, compiled in worker processes
cg = one_population(zoo_models({"seed": [0, 1]}, arch={"name": "cgenn", "config": {"width": 4, "depth": 2}},
                               task="convex_hull", task_options={"n_train": 64, "n_val": 16, "n_test": 16}, epochs=1))
ahead = train_population(pop, device="cuda", precision="bf16")  # a fresh process: its kernels compile ahead
cg_ahead = train_population(cg, device="cuda", precision="bf16")
os.environ["SYMZOO_COMPILE_AHEAD"] = "0"
plain = train_population(pop, device="cuda", precision="bf16")  # the same kernels, now compiled: no dry run
cg_plain = train_population(cg, device="cuda", precision="bf16")
same = all(np.array_equal(a.weights[k], b.weights[k]) for a, b in ((ahead, plain), (cg_ahead, cg_plain))
           for k in b.weights) and all(np.array_equal(a.curves[k], b.curves[k], equal_nan=True)
                                       for a, b in ((ahead, plain), (cg_ahead, cg_plain)) for k in b.curves)
print(json.dumps({"same": same, "ahead": ahead.program["compiled_ahead"], "plain": plain.program["compiled_ahead"],
                  "cgenn": cg_ahead.program["compiled_ahead"],
                  "eager": eager.program["compiled_ahead"], "eager_finite": bool(np.isfinite(eager.curves["test_loss"]).all()),
                  "phases": sorted(ahead.timings), "compile_lap": ahead.timings.get("compile")}))
"""


@on_cuda
def test_the_trainers_dry_run_leaves_no_trace(tmp_path):
    """A population whose kernels compile ahead (a fresh process: every kernel new; dropout draws from the
    population's generator; cgenn's generated products in worker processes) trains, to the bit, as one whose
    kernels were compiled before it started; a program that reads a result on the host (frame averaging's eigh)
    compiles only its optimizer's kernels ahead."""
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton"), "SYMZOO_COMPILE_AHEAD": "1"}
    out = subprocess.run([sys.executable, "-c", _TRAIN_TWICE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["same"]
    assert got["ahead"]["kernels"] > 5 and got["ahead"]["failed"] == 0 and "compile" in got["phases"]
    assert got["ahead"]["processes"] == 0 and 0 < got["cgenn"]["processes"] < got["cgenn"]["kernels"]
    assert got["cgenn"]["failed"] == 0
    assert 0 < got["ahead"]["seconds"] <= got["compile_lap"]  # the compile, within the lap that holds the dry run too
    assert got["plain"] is None  # turned off: no dry run
    assert got["eager_finite"] and got["eager"]["kernels"] > 0  # the optimizer's kernels
