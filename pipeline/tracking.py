"""MLflow tracking, from the driver only, in batches.

One experiment per study; inside it a parent run for the study, a child run per zoo, a run per model
(params = generating factors, metrics at the stored checkpoints, tags: model id, status) and a run per
analysis stage with its plots as artifacts. Runs are found again by their `symzoo.*` tags, so running
a study twice creates no duplicate runs. sqlite locks under concurrent writers, which is why nothing
but the driver logs; `log_batch` carries many values per call (MLflow caps a call at 1000 metrics,
100 params and 100 tags).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100
KIND, STUDY, ZOO, MODEL_ID, STAGE = "symzoo.kind", "symzoo.study", "symzoo.zoo", "symzoo.model_id", "symzoo.stage"
SETTINGS = "symzoo.settings"  # hash of a stage run's settings


def _fast_sqlite_commits() -> None:
    """WAL journaling with synchronous=NORMAL for sqlite tracking stores: 3-4x cheaper commits (measured
    55 -> 15 ms per model run here), and `mlflow ui` can read while a study writes. A crash of the
    process loses nothing; a power loss may lose the last transactions, never corrupt the file, and a
    re-run of the study logs whatever is missing."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if getattr(_fast_sqlite_commits, "installed", False):
        return

    @event.listens_for(Engine, "connect")
    def _pragmas(dbapi_conn, _record) -> None:  # every new sqlite connection MLflow opens
        if type(dbapi_conn).__module__.startswith("sqlite3"):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    _fast_sqlite_commits.installed = True


class TrackingError(RuntimeError):
    """The tracking server or database cannot be reached or written; the message says which URI."""


def default_tracking_uri(workdir: str | Path = ".") -> str:
    """A sqlite file in the working directory: MLflow's default store, and `mlflow ui` reads it."""
    return f"sqlite:///{Path(workdir).resolve() / 'symzoo.db'}"


@dataclass
class Tracker:
    """Logs a study to MLflow and counts the seconds it spends doing so (the tracking overhead)."""

    uri: str
    study: str
    seconds: float = 0.0  # time in MLflow calls, all threads
    background_seconds: float = 0.0  # of which on the background logging thread, overlapping other work
    calls: int = 0
    _client: Any = field(default=None, repr=False)
    _experiment_id: str = ""
    _study_run: str = ""
    _zoo_runs: dict[str, str] = field(default_factory=dict)
    _pool: Any = field(default=None, repr=False)
    _pending: list = field(default_factory=list, repr=False)
    _model_runs: dict[str, str] = field(default_factory=dict, repr=False)  # created, not yet finished

    def __post_init__(self) -> None:
        # Fail fast against an unreachable server instead of MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        if self.uri.startswith("sqlite:"):
            _fast_sqlite_commits()
        if self.uri.startswith("file:") or "://" not in self.uri:  # a folder the user named (MLflow 3 refuses it unasked)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # after import, which sets it: no "creating tables" chatter

        try:
            self._client = MlflowClient(tracking_uri=self.uri)
        except Exception as e:  # an unknown scheme or a malformed URI
            raise TrackingError(
                f"cannot use the MLflow tracking URI {self.uri!r}: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}. "
                "Fix the URI (--tracking-uri or the study's tracking_uri): sqlite:///file.db, http://host:port or a folder."
            ) from None

    @contextmanager
    def _timed(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.seconds += dt
            self.calls += 1
            if threading.current_thread().name.startswith("mlflow-log"):
                self.background_seconds += dt

    # ---- set-up -------------------------------------------------------------------------------

    def connect(self) -> None:
        """Create or find the study's experiment and parent run; TrackingError if the store is unusable."""
        try:
            with self._timed():
                exp = self._client.get_experiment_by_name(self.study)
                self._experiment_id = exp.experiment_id if exp else self._client.create_experiment(self.study)
        except Exception as e:  # MLflow raises many types (connection, sqlite, permission)
            raise TrackingError(
                f"cannot use the MLflow tracking URI {self.uri!r}: {type(e).__name__}: {str(e).splitlines()[0][:200]}. "
                "Start the server, fix the URI (--tracking-uri or the study's tracking_uri), or use a sqlite file."
            ) from None
        self._study_run = self._find_or_create({KIND: "study", STUDY: self.study}, run_name=self.study)

    def _find(self, tags: dict[str, str]) -> list:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs, token = [], None
        while True:
            with self._timed():
                page = self._client.search_runs([self._experiment_id], query, max_results=5000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _find_or_create(self, tags: dict[str, str], run_name: str, parent: str | None = None) -> str:
        found = self._find(tags)
        if found:
            return found[0].info.run_id
        all_tags = dict(tags)
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        with self._timed():
            return self._client.create_run(self._experiment_id, tags=all_tags, run_name=run_name).info.run_id

    @property
    def study_run_id(self) -> str:
        return self._study_run

    @property
    def experiment_id(self) -> str:
        return self._experiment_id

    def log_study(self, config: dict[str, Any]) -> None:
        """The study's current configuration, as tags: a study file may change between runs, params may not."""
        self._set_tags(self._study_run, config)

    def zoo_run(self, zoo: str, config: dict[str, Any] | None = None) -> str:
        """The zoo's child run (created on first use, found again on a re-run); its config as tags (a zoo may grow)."""
        if zoo not in self._zoo_runs:
            run = self._find_or_create({KIND: "zoo", STUDY: self.study, ZOO: zoo}, run_name=zoo, parent=self._study_run)
            self._zoo_runs[zoo] = run
            if config:
                self._set_tags(run, config)
        return self._zoo_runs[zoo]

    def discard_unfinished_models(self) -> int:
        """Delete model runs a driver left unfinished (killed while logging), so each model is logged once, again."""
        stale = [r for r in self._find({KIND: "model", STUDY: self.study}) if r.info.status != "FINISHED"]
        for r in stale:
            with self._timed():
                self._client.delete_run(r.info.run_id)
        return len(stale)

    def logged_models(self) -> set[str]:
        """Model ids that already have a finished run in this experiment."""
        return {r.data.tags[MODEL_ID] for r in self._find({KIND: "model", STUDY: self.study}) if r.info.status == "FINISHED"}

    # ---- logging ------------------------------------------------------------------------------

    def create_model_runs(self, zoo: str, model_ids: Sequence[str]) -> None:
        """Create the runs of models about to train (status RUNNING), so that finishing one costs two calls.

        Queued on the background thread while training runs; a run left unfinished by a killed driver
        is dropped by `discard_unfinished_models` on the next run.
        """
        parent = self.zoo_run(zoo)
        for mid in model_ids:
            if mid in self._model_runs:
                continue
            tags = {KIND: "model", STUDY: self.study, ZOO: zoo, MODEL_ID: mid, "mlflow.parentRunId": parent}
            with self._timed():
                self._model_runs[mid] = self._client.create_run(self._experiment_id, tags=tags,
                                                                run_name=f"{zoo}/{mid[:8]}").info.run_id

    def log_models(self, zoo: str, rows: Sequence[dict[str, Any]], factors: Sequence[str],
                   checkpoint_metrics: dict[str, dict[str, list[tuple[int, float]]]]) -> None:
        """One finished run per model: factors as params, checkpoint metrics by epoch, id/status tags.

        `checkpoint_metrics[model_id][metric] = [(epoch, value), ...]`.
        """
        self.create_model_runs(zoo, [r["model_id"] for r in rows])
        for row in rows:
            mid = row["model_id"]
            params = {f: row[f] for f in factors if f in row}
            params.update(arch=row.get("arch"), task=row.get("task"), n_params=row.get("n_params"))
            metrics = [(name, float(v), step) for name, series in checkpoint_metrics.get(mid, {}).items() for step, v in series]
            self._log(self._model_runs.pop(mid), params=params, metrics=metrics, tags={"status": row["status"]},
                      status="FINISHED")

    def create_model_runs_later(self, zoo: str, model_ids: Sequence[str]) -> None:
        """`create_model_runs` on the background logging thread."""
        self._submit(self.create_model_runs, zoo, model_ids)

    def log_models_later(self, zoo: str, rows: Sequence[dict[str, Any]], factors: Sequence[str],
                         checkpoint_metrics: dict[str, dict[str, list[tuple[int, float]]]]) -> None:
        """`log_models` on one background thread of the driver, overlapping the training still running.

        One thread is the only writer while training runs (sqlite locks under concurrent writers);
        `drain()` waits for it and re-raises what it raised.
        """
        self._submit(self.log_models, zoo, rows, factors, checkpoint_metrics)

    def _submit(self, fn: Any, *args: Any) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-log")
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        """Wait until every model run queued by `log_models_later` is logged."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def log_stage(self, stage: str, metrics: dict[str, float], params: dict[str, Any] | None = None,
                  artifacts: Iterable[Path] = ()) -> str:
        """A run per analysis stage and settings (child of the study run), with summary metrics and plots.

        Other settings make another run (params are immutable); the same settings find the same run again.
        """
        digest = hashlib.sha256(json.dumps(params or {}, sort_keys=True, default=str).encode()).hexdigest()[:12]
        run = self._find_or_create({KIND: "stage", STUDY: self.study, STAGE: stage, SETTINGS: digest},
                                   run_name=stage, parent=self._study_run)
        self._log(run, params=params or {}, metrics=[(k, float(v), 0) for k, v in metrics.items()])
        self.log_artifacts(run, artifacts)
        return run

    def log_zoo_metrics(self, zoo: str, metrics: dict[str, float]) -> None:
        """Summary metrics of the models a run trained in `zoo`, on the zoo's run (queued on the logging
        thread, behind the model runs still being logged: one sqlite writer at a time)."""
        self._submit(self._log, self.zoo_run(zoo), None, [(k, float(v), 0) for k, v in metrics.items()])

    def log_artifacts(self, run_id: str, paths: Iterable[Path], folder: str = "plots") -> None:
        for p in paths:
            with self._timed():
                self._client.log_artifact(run_id, str(p), artifact_path=folder)

    def log_summary(self, metrics: dict[str, float], artifacts: Iterable[Path] = ()) -> None:
        self._log(self._study_run, metrics=[(k, float(v), 0) for k, v in metrics.items()])
        self.log_artifacts(self._study_run, artifacts)

    def finish(self, status: str = "FINISHED") -> None:
        runs = [self._study_run, *self._zoo_runs.values()]
        for run in runs:
            with self._timed():
                self._client.set_terminated(run, status=status)

    def _set_tags(self, run_id: str, values: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        tags = [RunTag(f"config.{k}", _param_value(v)) for k, v in values.items() if v is not None]
        for i in range(0, len(tags), MAX_TAGS):
            with self._timed():
                self._client.log_batch(run_id, tags=tags[i:i + MAX_TAGS])

    def _log(self, run_id: str, params: dict[str, Any] | None = None,
             metrics: Sequence[tuple[str, float, int]] = (), tags: dict[str, str] | None = None,
             status: str | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        plist = [Param(k, _param_value(v)) for k, v in (params or {}).items() if v is not None]
        mlist = [Metric(k, v, now, step) for k, v, step in metrics if v == v]  # NaN is not loggable in every store
        tlist = [RunTag(k, v) for k, v in (tags or {}).items()]
        p_chunks = [plist[i:i + MAX_PARAMS] for i in range(0, len(plist), MAX_PARAMS)]
        m_chunks = [mlist[i:i + MAX_METRICS] for i in range(0, len(mlist), MAX_METRICS)]
        for k in range(max(len(p_chunks), len(m_chunks), 1 if tlist else 0)):
            with self._timed():
                self._client.log_batch(run_id, metrics=m_chunks[k] if k < len(m_chunks) else [],
                                       params=p_chunks[k] if k < len(p_chunks) else [],
                                       tags=tlist if k == 0 else [])
        if status:
            with self._timed():
                self._client.set_terminated(run_id, status=status)


def _param_value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s[:6000]
