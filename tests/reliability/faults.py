"""Helpers that inject real faults: find a Ray worker among our own descendant processes, kill it, write studies."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import polars as pl
import yaml

from pipeline import localray


def descendants(root: int) -> list[int]:
    """Pids of every live descendant of `root` (from /proc), so a test only ever touches processes it started."""
    return list(localray.descendants(root))


def exposed_listeners(pids: list[int]) -> list[str]:
    """'pid ip:port' of each TCP socket one of `pids` listens on at an address other than loopback (from /proc)."""
    listening: dict[str, str] = {}  # socket inode -> local address, for sockets in state LISTEN (0A)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A":
                listening[cols[9]] = cols[1]
    loopback = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
    out = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            inode = target[len("socket:["):-1] if target.startswith("socket:[") else None
            if inode in listening and listening[inode].split(":")[0] not in loopback:
                ip, port = listening[inode].split(":")
                out.append(f"{pid} {ip}:{int(port, 16)}")
    return out


def outlivers(started: list[int], timeout: float = 30.0) -> list[str]:
    """After a driver's SIGKILL: the command lines of its Ray processes (`started`) still running after `timeout`
    seconds. Each of them is then killed, so no process leaks into the next test."""
    try:
        wait_until(lambda: not any(os.path.exists(f"/proc/{p}") and "ray" in cmdline(p) for p in started),
                   timeout=timeout, every=0.2, what="the killed driver's Ray processes to exit")
        leftover = []
    except TimeoutError:
        leftover = [cmdline(p)[:60] for p in started if os.path.exists(f"/proc/{p}")]
    for p in started:
        if "ray" in cmdline(p):  # still the Ray process it was, not a reused pid
            os.kill(p, signal.SIGKILL)
    return leftover


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_for_process(root: int, marker: str, timeout: float = 60.0) -> int:
    """The pid of a descendant of `root` whose command line (a Ray worker's title names its task) holds `marker`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in descendants(root):
            if marker in cmdline(pid):
                return pid
        time.sleep(0.05)
    raise TimeoutError(f"no process of {root} with {marker!r} in its command line after {timeout} s")


def wait_until(check, timeout: float = 60.0, every: float = 0.01, what: str = "condition"):
    """Poll `check()` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what} not reached after {timeout} s")


def mlp_zoo(name: str, seeds: list[int], lrs: list[float], epochs: int, **extra) -> dict:
    """A small digits MLP zoo (trains in about 0.2 s an epoch on one core)."""
    return {"name": name, "task": {"name": "digits", "options": {"variant": "rotated"}},
            "arch": {"name": "mlp", "config": {"width": 16, "depth": 1}},
            "grid": {"seed": seeds, "lr": lrs, "optimizer": ["sgd"]}, "epochs": epochs, **extra}


def write_study(tmp: Path, name: str, zoos: list[dict], **extra) -> tuple[Path, dict]:
    """A study file whose store, MLflow sqlite file and output all live under `tmp`."""
    study = {"study": name, "store": str(tmp / "store"), "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
             "output": str(tmp / "out"), "zoos": zoos, **extra}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path, study


def model_runs(tracking_uri: str, study: str) -> list:
    """The study's active MLflow model runs."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(study)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.`symzoo.kind` = 'model'", max_results=5000)


def assert_store_whole(store_root: str, expected: dict[str, list[int]]) -> pl.DataFrame:
    import zoos

    """Every expected model (id -> checkpoint epochs) stored exactly once with all its checkpoints; nothing stray."""
    store = zoos.open(store_root)
    models = store.models().collect()
    assert sorted(models["model_id"]) == sorted(expected), "each model exactly once"
    ck = store.checkpoints().select("model_id", "epoch").collect()
    got = {mid: sorted(g["epoch"]) for (mid,), g in ck.group_by("model_id")}
    assert got == {mid: sorted(eps) for mid, eps in expected.items()}
    assert store.verify() == [], "no damaged, partial or stray files"
    assert not [f for _, _, fs in os.walk(store_root) for f in fs if ".tmp-" in f]
    return models


def expected_models(study) -> dict[str, list[int]]:
    from zoos.spec import expand

    return {m.model_id: list(m.checkpoints) for z in study.zoos for m in expand(z, study.study)}


def assert_logged_once(study, expected) -> None:
    runs = model_runs(study.tracking_uri, study.study)
    ids = [r.data.tags["symzoo.model_id"] for r in runs]
    assert sorted(ids) == sorted(expected), "one MLflow run per model, no duplicates, none missing"
    assert {r.info.status for r in runs} == {"FINISHED"}
