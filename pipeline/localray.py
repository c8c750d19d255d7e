"""Ray for one `symzoo` process: join a cluster, or start a local Ray on loopback that dies with the driver.

A local Ray is symzoo's own: its services listen on 127.0.0.1 only (a laptop on a café network exposes
nothing), and nothing of it outlives the driver, even when the driver is SIGKILLed: Ray's gcs and raylet
share the driver's fate through the kernel, but its dashboard and runtime-env agents can linger (seen with
ray 2.60), so a small reaper process ends whatever of the session is left when the driver goes.
A cluster (an address given, or RAY_ADDRESS) is configured by cluster.yaml and left as it is; `check_cluster`
refuses in seconds an address where no head listens, which ray.init would retry for minutes.
A local Ray's workers start with WORKER_ENV (where the user has not set those variables), as cluster.yaml's
nodes do.

Run as `python -m pipeline.localray RAYLET_PID`, this module is that reaper.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlsplit

# The value Ray reads at import to decide whether a node may join others; off, every service binds loopback.
_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_reaper: subprocess.Popen | None = None  # holds the pipe whose end-of-file tells the reaper the driver is gone


PROBE_TIMEOUT_S = 5.0  # ray.init retries an unreachable head for minutes; a TCP connect says it in seconds

# glibc's malloc on transparent huge pages (read at a process's start): a population on the CPU makes and frees
# activations of tens to hundreds of MiB every op, each a fresh mapping whose every 4 KiB page faults on first
# touch (benchmarks/README.md, cpu_bench.py)
WORKER_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def worker_environment() -> None:
    """WORKER_ENV into this process's environment, which a local Ray it starts passes to its workers; a variable
    the user set keeps their value."""
    for name, value in WORKER_ENV.items():
        os.environ.setdefault(name, value)


class ClusterUnreachable(ConnectionError):
    """No Ray head answers at the address a run was told to join (or `auto` finds no cluster)."""


def check_cluster(address: str | None = None) -> str | None:
    """The head's host:port that `init_ray(address)` will join (None: a local Ray of our own), after a TCP
    connect to it within PROBE_TIMEOUT_S; ClusterUnreachable naming the address and why otherwise."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address == "local":
        return None
    given = address
    if address.startswith(("http://", "https://")):
        raise ClusterUnreachable(f"Ray address {given!r} is a dashboard's (what `ray job submit --address` takes); a run "
                                 "joins the cluster's head, host:6379 (or ray://host:10001), or runs as a submitted job")
    if address.startswith("ray://"):  # Ray Client: its server's host and port
        try:
            parts = urlsplit(address)
            host, port = parts.hostname, parts.port or 10001
        except ValueError as e:  # a port that is not a number
            raise ClusterUnreachable(f"Ray address {given!r}: {e}; a Ray Client address is ray://host:port") from None
        if not host:
            raise ClusterUnreachable(f"Ray address {given!r} names no host (ray://host:10001)")
    else:
        try:
            from ray._private.services import canonicalize_bootstrap_address
        except ImportError:  # a Ray that moved it: ray.init checks the address itself
            return address
        try:
            head = canonicalize_bootstrap_address(address)  # what ray.init joins: `auto` read, localhost resolved
        except (ConnectionError, ValueError) as e:
            raise ClusterUnreachable(f"Ray address {given!r}: {str(e).splitlines()[0]}; a Ray address is host:port, "
                                     "auto, or ray://host:port (--address or RAY_ADDRESS)") from None
        if head is None:
            raise ClusterUnreachable(f"Ray address {given!r}: no Ray cluster was started on this machine "
                                     "(`ray start --head` starts one)")
        host, _, port_text = head.rpartition(":")
        port = int(port_text)
    try:
        socket.create_connection((host.strip("[]"), port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        why = f"no answer within {PROBE_TIMEOUT_S:g} s" if isinstance(e, TimeoutError) else (e.strerror or type(e).__name__).lower()
        raise ClusterUnreachable(f"no Ray cluster at {given!r} ({host}:{port}: {why}); "
                                 "start one with `ray start --head`, or check --address and RAY_ADDRESS") from None
    return f"{host}:{port}"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the Ray cluster at `address` (or RAY_ADDRESS), else start a local one; reuse one already up."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=True, configure_logging=False)
    loopback_only(not address)
    if address:
        ray.init(address=address, **kwargs)
        return
    # "local": a new Ray of our own, never one found through /tmp/ray/ray_current_cluster
    worker_environment()
    # Ray's notice that a new local Ray has token authentication (its default, kept) is no news in symzoo's output
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = notice.level
    notice.setLevel(logging.ERROR)
    try:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **kwargs)
    finally:
        notice.setLevel(level)
    start_reaper()


def loopback_only(on: bool) -> None:
    """Ray resolves a node IP of 127.0.0.1 to the routable address unless clusters are off (as on macOS),
    and its gRPC servers bind all interfaces unless the node IP is 127.0.0.1: turning clusters off for a
    local Ray is what puts every service (gcs, raylet, workers, agents) on loopback."""
    from ray._private import ray_constants

    if on:
        os.environ[_CLUSTER_SWITCH] = "0"  # for the processes Ray starts
        ray_constants.ENABLE_RAY_CLUSTER = False
    elif os.environ.get(_CLUSTER_SWITCH) == "0":  # a later cluster join in the same process
        del os.environ[_CLUSTER_SWITCH]
        ray_constants.ENABLE_RAY_CLUSTER = True


def raylet_pid() -> int | None:
    """The local raylet's pid, while this process runs a local Ray."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    procs = getattr(node, "all_processes", {}).get("raylet") if node is not None else None
    return procs[0].process.pid if procs else None


def start_reaper() -> None:
    """Start the reaper of the local Ray this process started (Linux; once per Ray session)."""
    global _reaper
    pid = raylet_pid()
    if pid is None or sys.platform != "linux":
        return
    if _reaper is not None and _reaper.poll() is None:
        _reaper.stdin.close()  # the previous session's reaper ends and tidies what that session left
    # Its own session: a Ctrl-C or a kill of the driver's process group does not take it down first.
    _reaper = subprocess.Popen([sys.executable, "-m", "pipeline.localray", str(pid)], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks) of a process, from /proc/PID/stat; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every live descendant of `root` (the start time tells a reused pid apart)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))) is not None:
            children.setdefault(st[1], []).append((int(entry), st[2]))
    found, todo = {}, [root]
    while todo:
        for pid, start in children.get(todo.pop(), []):
            found[pid] = start
            todo.append(pid)
    return found


def _alive(pid: int, start: int | None = None) -> bool:
    """Whether `pid` runs (a zombie has exited) and, given its start time, is still the same process."""
    st = _stat(pid)
    return st is not None and st[0] != "Z" and (start is None or st[2] == start)


def _reap(raylet: int, known: dict[int, int], grace_s: float = 5.0) -> None:
    """Wait for Ray's own shutdown, then end what the raylet started and left: SIGTERM, SIGKILL after 2 s."""
    deadline = time.monotonic() + grace_s
    while _alive(raylet) and time.monotonic() < deadline:
        time.sleep(0.2)
    known = {**known, **descendants(raylet)}
    for sig, wait_s in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 0.0)):
        left = [p for p, start in known.items() if _alive(p, start)]
        if _alive(raylet):
            left.append(raylet)
        if not left:
            return
        for p in left:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        end = time.monotonic() + wait_s
        while time.monotonic() < end and any(_alive(p) for p in left):
            time.sleep(0.1)


def main(argv: list[str]) -> None:
    raylet = int(argv[0])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # What the raylet started, kept up to date: once it is gone its orphans belong to init and name no parent.
    known: dict[int, int] = {}
    while _alive(raylet):  # until the driver is gone (end of file on stdin) or has shut its Ray down
        known.update(descendants(raylet))
        ready, _, _ = select.select([sys.stdin.buffer], [], [], 1.0)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break
    _reap(raylet, known)


if __name__ == "__main__":
    main(sys.argv[1:])
