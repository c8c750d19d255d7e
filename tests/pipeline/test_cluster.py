"""The cluster path for real: a Ray head started with `ray start --head`, a study submitted with
`ray job submit`, and MLflow logging to a `mlflow server` process on 127.0.0.1."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

import zoos

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cluster")]
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


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group: `ray start --block` and `mlflow server` take their children down."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def tiny_study(folder: Path, name: str) -> Path:
    study = {"study": name, "zoos": [{"name": "mlp", "task": {"name": "digits"},
                                       "arch": {"name": "mlp", "config": {"width": 16, "depth": 1}},
                                       "grid": {"seed": [0, 1, 2]}, "epochs": 1}]}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.fixture
def mlflow_server(tmp_path):
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
        stop(proc)


def test_ray_job_submit_to_a_started_head_logs_to_an_mlflow_server(tmp_path, mlflow_server):
    gcs, dashboard = free_port(), free_port()
    # Every port of its own: other Rays of the test session would hold the defaults (agent: 52365).
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--num-cpus=2",
         "--include-dashboard=true", "--disable-usage-stats", *agent_ports, "--block"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for(lambda: listening(dashboard), 120, "ray dashboard")
        work = tmp_path / "job"
        work.mkdir()
        tiny_study(work, "jobs")
        store = tmp_path / "store"
        cmd = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(work),
               "--", "symzoo", "run", "study.yaml", "--store", str(store), "--tracking-uri", mlflow_server, "--plain"]
        for _ in range(60):  # the dashboard answers before its job agent is up: "No available agent"
            submit = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            if "No available agent" not in submit.stderr + submit.stdout:
                break
            time.sleep(2)
        server_log = (tmp_path / "mlflow-server.log").read_text(errors="replace")[-2000:]
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:] + "\nmlflow server log:\n" + server_log
        assert "succeeded" in submit.stdout + submit.stderr
    finally:
        stop(head)
    assert zoos.open(str(store)).models().collect().height == 3
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("jobs")
    runs = client.search_runs([exp.experiment_id], "tags.`symzoo.kind` = 'model'")
    assert len(runs) == 3 and {r.data.tags["status"] for r in runs} == {"ok"}
