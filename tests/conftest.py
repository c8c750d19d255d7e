"""Shared test set-up: deterministic, single-threaded torch (CI has 2 cores and runs 2 workers)."""

import importlib.util
import os
import secrets
import shutil
import tempfile

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
if "PYTEST_XDIST_WORKER" not in os.environ:  # the controller: its workers, Ray and subprocesses inherit the folder
    os.environ["SYMZOO_CACHE"] = tempfile.mkdtemp(prefix="symzoo-test-cache-")  # not ~/.cache: removed at the end
    # the session's Rays (local ones, a started head, job clients) share one token: none writes ~/.ray/auth_token,
    # and a head started before any local Ray made that file finds its token
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
os.environ.setdefault("MPLBACKEND", "Agg")
if shutil.which("nvidia-smi") is None:  # no GPU: zoos.popconv's Triton kernels run (and are tested) in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

torch.set_num_threads(1)
if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    # the interpreter checks every int32 add and product for overflow, which compiled kernels do only in debug
    # builds: off, as on a GPU (the tests' sizes are far from 2**31, and the check dominates an interpreted kernel)
    import dataclasses

    from triton.runtime import interpreter

    interpreter.interpreter_builder.options = dataclasses.replace(interpreter.interpreter_builder.options,
                                                                  sanitize_overflow=False)
# CI (HYPOTHESIS_PROFILE=ci, set by .ci/run) draws the same examples every run, so a landing is judged on the code;
# a local run draws new ones each time and keeps searching
settings.register_profile("ci", derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session (ray.init costs 5-10 s); tests using it share an
    xdist group (`@pytest.mark.xdist_group("ray")`) so a single worker process owns it."""
    import ray

    from pipeline.localray import loopback_only, start_reaper, worker_environment

    if not ray.is_initialized():
        loopback_only(True)
        worker_environment()
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
        start_reaper()  # a killed test session leaves no Ray process behind
    yield ray
    ray.shutdown()


# Tests write only to temporary folders: the run fails if the checkout's top level gains an entry.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ALLOWED = {".pytest_cache", ".hypothesis", "__pycache__"}


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist)
        session.config._symzoo_top_level = set(os.listdir(_ROOT))


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_symzoo_top_level", None)
    if before is None:
        return
    shutil.rmtree(os.environ["SYMZOO_CACHE"], ignore_errors=True)
    new = sorted(set(os.listdir(_ROOT)) - before - _ALLOWED)
    if new:
        print(f"\nerror: the tests wrote into the checkout: {', '.join(new)} (tests write only to temporary folders)")
        session.exitstatus = 1
