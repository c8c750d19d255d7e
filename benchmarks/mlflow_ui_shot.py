"""The MLflow UI as a researcher first sees a study: a screenshot of its experiment page in headless Chromium.

    python benchmarks/mlflow_ui_shot.py --out results/      # needs `chromium` (Debian: apt-get install chromium)

Starts a `mlflow server` on 127.0.0.1, runs a small study into it with `symzoo run`, opens the study's
experiment page (the link `symzoo run` prints) in headless Chromium and writes <out>/mlflow_experiment.png
(and the page as .html);
the page's text is checked for the runs table (the study's run and its "N matching runs" footer;
an experiment opened on MLflow 3's empty GenAI overview shows neither). Exit 1 when it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.tracking import experiment_url  # noqa: E402
from tests.servers import mlflow_server_at  # noqa: E402

STUDY = {"study": "ui-shot", "zoos": [{"name": "mlp", "task": {"name": "digits"},
                                       "arch": {"name": "mlp", "config": {"width": 16, "depth": 1}},
                                       "grid": {"seed": [0, 1], "lr": [0.01, 0.03], "optimizer": ["adam"]}, "epochs": 3}],
         "analysis": [{"stage": "equivariance", "samples": 64}]}


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    sys.exit("mlflow_ui_shot: no chromium on PATH; install it (Debian: apt-get install chromium)")


def browse(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1600,1000", "--virtual-time-budget=20000", *args, url],
                          capture_output=True, text=True, timeout=180)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ui-shot-"))
    with mlflow_server_at(work) as server:
        study = work / "study.yaml"
        study.write_text(yaml.safe_dump({**STUDY, "store": str(work / "store"), "output": str(work / "out")}))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        run = subprocess.run([sys.executable, "-m", "pipeline", "run", str(study), "--plain", "--tracking-uri", server],
                             capture_output=True, text=True, env=env, timeout=900)
        if run.returncode:
            sys.exit(f"mlflow_ui_shot: symzoo run failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
        with urllib.request.urlopen(f"{server}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ui-shot") as r:
            exp = json.loads(r.read())["experiment"]["experiment_id"]
        url = experiment_url(server, exp)  # the link `symzoo run` prints
        a.out.mkdir(parents=True, exist_ok=True)
        shot = a.out / "mlflow_experiment.png"
        browse(url, f"--screenshot={shot.resolve()}")
        dom = browse(url, "--dump-dom").stdout
        (a.out / "mlflow_experiment.html").write_text(dom)
    wanted = ["ui-shot", "matching runs"]
    seen = [w for w in wanted if w in dom]
    print(f"{url}: screenshot {shot}; the runs table: {'shown' if seen == wanted else 'missing ' + str(sorted(set(wanted) - set(seen)))}")
    sys.exit(0 if seen == wanted else 1)


if __name__ == "__main__":
    main()
