"""GPU placement checked on CPU: a Ray node that declares 4 or 8 GPUs (Ray's logical resources; no CUDA
needed) and a study whose populations ask for whole or fractional GPUs. Each training task reports the
GPU ids Ray handed it, so the test sees where every population ran."""

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("fake-gpus")]

SCRIPT = textwrap.dedent('''
    import json, sys, ray
    from pipeline.progress import Display
    from pipeline.runner import run_study
    from pipeline.study import parse_study

    gpus, per_task, models, root, size = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    ray.init(address="local", num_cpus=max(gpus, 4), num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    study = parse_study({
        "study": "fakegpus", "store": f"{root}/store", "output": f"{root}/out",
        "resources": {"num_cpus": 1, "num_gpus": per_task},
        "zoos": [{"name": "mlp", "task": {"name": "digits", "options": {"n_train": 64, "n_val": 32, "n_test": 32}},
                  "arch": {"name": "mlp", "config": {"width": 8, "depth": 1}},
                  "grid": {"seed": list(range(models))}, "epochs": 1,
                  "population_size": size if size == "auto" else int(size)}],
    })
    report = run_study(study, display=Display(plain=True, every_s=60), tracking_uri=f"file://{root}/mlruns")
    print("PLACEMENTS" + json.dumps(report.placements))
    print("SIZES" + json.dumps(report.population_sizes))
''')


def run(tmp_path, gpus: int, per_task: float, models: int, size: str = "1") -> tuple[list[dict], dict]:
    """(placements, auto population sizes) of a study of `models` tiny MLPs on a node with `gpus` logical GPUs."""
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(gpus), str(per_task), str(models), str(tmp_path), size],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {line[:5]: line for line in out.stdout.splitlines() if line.startswith(("PLACE", "SIZES"))}
    return json.loads(lines["PLACE"].removeprefix("PLACEMENTS")), json.loads(lines["SIZES"].removeprefix("SIZES"))


def placements(tmp_path, gpus: int, per_task: float, populations: int) -> list[dict]:
    return run(tmp_path, gpus, per_task, populations)[0]


@pytest.mark.parametrize("gpus", [4])  # each case starts a Ray of that many workers: one is enough here
def test_one_population_per_gpu_spreads_over_every_gpu(tmp_path, gpus):
    placed = placements(tmp_path, gpus, 1.0, gpus)
    assert len(placed) == gpus
    assert all(len(p["gpu_ids"]) == 1 for p in placed)
    assert sorted(int(p["gpu_ids"][0]) for p in placed) == list(range(gpus)), "every GPU got one population"
    assert {p["device"] for p in placed} == {"cpu"}, "no CUDA here: the task falls back to the CPU"


@pytest.mark.parametrize("gpus,per_task,models,size", [(2, 0.5, 18, 5)])
def test_auto_population_size_gives_every_slot_an_equal_share(tmp_path, gpus, per_task, models, size):
    """population_size: auto splits the zoo into a multiple of the cluster's training slots (GPUs over
    num_gpus per task), equal sizes, so no GPU idles while another trains a second population; fractional
    GPUs pack several populations on one GPU, each on one GPU id."""
    placed, sizes = run(tmp_path, gpus, per_task, models, "auto")
    assert sizes == {"mlp": size}
    slots = int(gpus / per_task)
    assert len(placed) == slots and sum(p["models"] for p in placed) == models
    per_gpu = [sum(p["gpu_ids"] == [str(g)] for p in placed) for g in range(gpus)]
    assert per_gpu == [slots // gpus] * gpus, f"fractional GPUs pack {slots // gpus} populations on each: {placed}"
