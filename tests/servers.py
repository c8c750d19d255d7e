"""Real servers for the tests, on 127.0.0.1: free ports, waiting for a server's own health answer, stopping
a server and its process group."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not up after {timeout:.0f}s")


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def mlflow_answers(port: int) -> bool:
    """An MLflow server, not just any process, is listening on port: its /health says OK."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return r.status == 200 and r.read().strip() == b"OK"
    except OSError:
        return False


def stop(proc: subprocess.Popen, graceful: bool = True) -> None:
    """SIGTERM to the process (`ray start --block` takes its children down), then SIGKILL to what is left of its
    group; not graceful: SIGKILL to the group alone. Not SIGTERM to the group: a Ray head's GCS then dies first, and
    the head's drain waits out its 30 s for it."""
    if graceful and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):  # none left
        os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def mlflow_server_at(tmp_path: Path) -> Iterator[str]:
    """A `mlflow server` on a free port of 127.0.0.1 with its sqlite store and artifacts in tmp_path; its URL."""
    # A free port can be taken by another test's Ray process in the seconds before the server binds it; then
    # the server exits and that process answers on the port (the likely cause of one run where the job's
    # MLflow calls failed). So wait for the server's own /health, and start again on another port if it
    # exited; its log goes to tmp_path for the test's failure message.
    for _ in range(3):
        port = free_port()
        with (tmp_path / "mlflow-server.log").open("ab") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                 "--default-artifact-root", str(tmp_path / "artifacts")],
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
            )
        wait_for(lambda: proc.poll() is not None or mlflow_answers(port), 90, "mlflow server")
        if proc.poll() is None:
            break
    else:
        raise RuntimeError(f"mlflow server exited at start on 3 ports (last {port}, exit code {proc.returncode})")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc, graceful=False)  # its sqlite file holds what it committed; its graceful stop takes seconds


