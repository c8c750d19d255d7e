"""The cluster path for real: a Ray head started with `ray start --head`, a study submitted with
`ray job submit`, and MLflow logging to a `mlflow server` process on 127.0.0.1."""

import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

import zoos
from tests.servers import BIN, free_port, listening, stop, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("cluster")]


def tiny_study(folder: Path, name: str) -> Path:
    study = {"study": name, "zoos": [{"name": "mlp", "task": {"name": "digits"},
                                       "arch": {"name": "mlp", "config": {"width": 16, "depth": 1}},
                                       "grid": {"seed": [0, 1, 2]}, "epochs": 1}]}
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def start_head(env: dict, log: Path) -> tuple[subprocess.Popen, int]:
    """`ray start --head --block` on fresh ports, (the process, its dashboard port) once the dashboard listens.
    A port taken by another process between `free_port` and the head binding it ends the head at start: then it
    starts again on other ports; its output goes to `log` for the failure message."""
    for _ in range(3):
        gcs, dashboard = free_port(), free_port()
        # Every port of its own: other Rays of the test session would hold the defaults (agent: 52365).
        agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                       f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        with log.open("ab") as out:  # the child keeps its own descriptor
            head = subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--num-cpus=2",
                 "--include-dashboard=true", "--disable-usage-stats", *agent_ports, "--block"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:  # a loaded 2-core machine (the rest of the suite beside it) has taken over 120 s
            wait_for(lambda: head.poll() is not None or listening(dashboard), 300, "ray dashboard")
        except TimeoutError:
            stop(head)
            raise TimeoutError("ray dashboard not up after 300 s; the head's output:\n" + log.read_text(errors="replace")[-3000:])
        if head.poll() is None:
            return head, dashboard
    raise RuntimeError(f"ray start --head exited at start on 3 sets of ports; its output:\n{log.read_text(errors='replace')[-3000:]}")


def test_ray_job_submit_to_a_started_head_logs_to_an_mlflow_server(tmp_path, mlflow_server):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"}
    head, dashboard = start_head(env, tmp_path / "ray-head.log")
    try:
        work = tmp_path / "job"
        work.mkdir()
        tiny_study(work, "jobs")
        store = tmp_path / "store"
        cmd = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(work),
               "--", "symzoo", "run", "study.yaml", "--store", str(store), "--tracking-uri", mlflow_server, "--plain"]
        # the dashboard answers before its job agent is up ("No available agent"), and on a loaded machine may
        # drop a connection while it starts: both are the head's start-up, not the submitted job
        starting = ("No available agent", "Connection aborted", "Connection refused")
        for _ in range(60):
            submit = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            if not any(s in submit.stderr + submit.stdout for s in starting):
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
