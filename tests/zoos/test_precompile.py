"""Kernels compiled ahead (`zoos.precompile`): inside the block a launch of a kernel not yet compiled is skipped and
recorded, leaving the block compiles what was recorded; the trainer's dry run leaves no trace in what it trains."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from zoos import popoptim, precompile
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
ahead = train_population(pop, device="cuda", precision="bf16")  # a fresh process: its kernels compile ahead
os.environ["SYMZOO_COMPILE_AHEAD"] = "0"
plain = train_population(pop, device="cuda", precision="bf16")  # the same kernels, now compiled: no dry run
same = all(np.array_equal(ahead.weights[k], plain.weights[k]) for k in plain.weights) and all(
    np.array_equal(ahead.curves[k], plain.curves[k], equal_nan=True) for k in plain.curves)
print(json.dumps({"same": same, "ahead": ahead.program["compiled_ahead"], "plain": plain.program["compiled_ahead"],
                  "eager": eager.program["compiled_ahead"], "eager_finite": bool(np.isfinite(eager.curves["test_loss"]).all()),
                  "phases": sorted(ahead.timings), "compile_lap": ahead.timings.get("compile")}))
"""


@on_cuda
def test_the_trainers_dry_run_leaves_no_trace(tmp_path):
    """A population whose kernels compile ahead (a fresh process: every kernel new; dropout draws from the
    population's generator) trains, to the bit, as one whose kernels were compiled before it started; a program
    that reads a result on the host (frame averaging's eigh) compiles only its optimizer's kernels ahead."""
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton"), "SYMZOO_COMPILE_AHEAD": "1"}
    out = subprocess.run([sys.executable, "-c", _TRAIN_TWICE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["same"]
    assert got["ahead"]["kernels"] > 5 and got["ahead"]["failed"] == 0 and "compile" in got["phases"]
    assert 0 < got["ahead"]["seconds"] <= got["compile_lap"]  # the compile, within the lap that holds the dry run too
    assert got["plain"] is None  # turned off: no dry run
    assert got["eager_finite"] and got["eager"]["kernels"] > 0  # the optimizer's kernels


# ---- the kernel list a dry run keeps for the next process --------------------------------------------------

needs_triton = pytest.mark.skipif(precompile.triton is None, reason="needs Triton")


@needs_triton
def test_a_kept_list_names_its_kernels_and_reads_back_as_recorded(tmp_path):
    from zoos import popnorm, poplinear

    specs = [(popnorm._norm1_fwd_kernel, json.dumps({"key": "a", "name": "_norm1_fwd_kernel"})),
             (popnorm._norm1_bwd_kernel, json.dumps({"key": "b", "name": "_norm1_bwd_kernel"}))]
    path = tmp_path / "kernels" / "k.json"
    precompile._keep(path, specs)
    assert [item["kernel"] for item in json.loads(path.read_text())] == [
        "zoos.popnorm:_norm1_fwd_kernel", "zoos.popnorm:_norm1_bwd_kernel"]
    assert list(precompile._read(path).values()) == specs
    assert [p.name for p in path.parent.iterdir()] == ["k.json"]  # no temporary file left beside it
    assert precompile._by_name("zoos.popnorm:_no_such_kernel") is None
    assert precompile._by_name("zoos.no_such_module:_norm1_fwd_kernel") is None
    assert precompile._by_name("zoos.popnorm:group_norm1") is None  # a function, not a kernel
    assert precompile._by_name(precompile._name(poplinear._rows_times_weight)) is poplinear._rows_times_weight


@needs_triton
def test_a_list_is_kept_only_whole_and_read_only_whole(tmp_path):
    """A list with a kernel that cannot be found again by its name (generated in a function) is not kept; a list
    that is half-written, of another format or names a kernel not found reads as none (the dry run runs)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _local(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)

    from zoos import popnorm

    path = tmp_path / "k.json"
    precompile._keep(path, [(popnorm._norm1_fwd_kernel, '{"key": "a"}'), (_local, '{"key": "b"}')])
    assert not path.exists()
    precompile._keep(path, [])
    assert not path.exists()
    for text in ('[{"kernel": "zoos.popnorm:_norm1_fwd_kernel", "spec": "{\\"key\\": ', '{"a": 1}', '[1]',
                 '[{"kernel": "zoos.popnorm:_nope", "spec": "{\\"key\\": \\"a\\"}"}]'):
        path.write_text(text)
        assert precompile._read(path) is None, text
    assert precompile._read(tmp_path / "absent.json") is None
    assert precompile.from_list("cpu", path) is None  # off CUDA: nothing compiles ahead


def test_a_lists_place_follows_the_population_and_the_cache_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("SYMZOO_CACHE", str(tmp_path))
    one = precompile.list_path({"arch": "cnn", "models": 8}, "cpu")
    assert one.parent == tmp_path / "kernels" and one.suffix == ".json"
    assert precompile.list_path({"arch": "cnn", "models": 8}, "cpu") == one
    assert precompile.list_path({"arch": "cnn", "models": 9}, "cpu") != one
    monkeypatch.setenv("SYMZOO_POPCONV_FUSE", "0")  # a kernel choice from the environment
    assert precompile.list_path({"arch": "cnn", "models": 8}, "cpu") != one
    monkeypatch.setenv("SYMZOO_CACHE", "off")
    assert precompile.list_path({"arch": "cnn", "models": 8}, "cpu") is None


_TRAIN_ONCE = """
import json, os, sys
import numpy as np
sys.path.insert(0, os.getcwd())
from tests.zoos.test_trainer import one_population, zoo_models
from zoos.trainer import train_population

pop = one_population(zoo_models({"seed": [0, 1, 2]}, arch={"name": "cnn", "config": {"width": 8, "depth": 2, "dropout": 0.3}},
                                epochs=2))
result = train_population(pop, device="cuda", precision="bf16")
np.savez(sys.argv[1], **{f"w:{k}": v for k, v in result.weights.items()}, **{f"c:{k}": v for k, v in result.curves.items()})
print(json.dumps(result.program["compiled_ahead"]))
"""


@on_cuda
def test_the_next_process_loads_the_kept_list_and_trains_the_same(tmp_path):
    """A fresh process's dry run keeps its kernel list under SYMZOO_CACHE; the next fresh process training the same
    population compiles that list instead (no dry run) and trains, to the bit, as the first."""
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton"), "SYMZOO_CACHE": str(tmp_path / "cache"),
           "SYMZOO_COMPILE_AHEAD": "1"}
    runs = []
    for i in range(2):
        out = subprocess.run([sys.executable, "-c", _TRAIN_ONCE, str(tmp_path / f"run{i}.npz")], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["source"] == "dry run" and first["kernels"] > 5 and first["failed"] == 0
    assert second["source"] == "list" and (second["kernels"], second["failed"]) == (first["kernels"], 0)
    assert len(list((tmp_path / "cache" / "kernels").glob("*.json"))) == 1
    a, b = np.load(tmp_path / "run0.npz"), np.load(tmp_path / "run1.npz")
    assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a.files)
