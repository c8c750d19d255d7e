"""Run a study on a simulated 3-node Ray cluster and remove a worker node while it trains a population.

Run as a script (`python cluster_study.py STUDY.yaml`) by test_cluster_faults.py, so its cluster never
meets the test session's shared local Ray; set RAY_TMPDIR so the cluster's address file stays private.
Prints one JSON line: the populations trained and the node removed.
"""

import json
import os
import sys
import threading

import ray
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from pipeline.progress import Display
from pipeline.runner import run_study
from pipeline.study import load_study
from tests.reliability.faults import cmdline, descendants, wait_until


def main(study_file: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        out: dict = {}
        driver = threading.Thread(target=lambda: out.update(report=run_study(load_study(study_file), display=Display(plain=True))))
        driver.start()
        victim = workers[0]
        raylet = victim.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
        training = wait_until(lambda: [p for p in descendants(raylet) if "train:" in cmdline(p)], timeout=60,
                              what="a population training on the first worker node")
        killed_task = cmdline(training[0])
        cluster.remove_node(victim, allow_graceful=False)  # the node dies with its task mid-training
        driver.join(120)
        report = out.get("report")
        print(json.dumps({"trained_models": report.trained_models if report else None, "populations": report.populations if report else None,
                          "killed_task": killed_task, "raylet_alive": os.path.exists(f"/proc/{raylet}")}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    os.environ.pop("RAY_ADDRESS", None)
    main(sys.argv[1])
