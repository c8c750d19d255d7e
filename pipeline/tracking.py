"""MLflow tracking, from the driver only, in batches.

One experiment per study (tagged so that MLflow 3's UI opens it on its runs); inside it a parent run for
the study (the summary's numbers, summary.csv, the study plots), a child run per zoo (its config as
params), a run per model (named by the factors that vary in its zoo; params = generating factors, every
epoch's metrics, tags: model id, status) and a run per analysis stage (its settings as `<stage>.<key>`
params, its summary metrics and plots). Runs are found again by their `symzoo.*` tags, so running a
study twice creates no duplicate runs, and a run that did nothing touches nothing: metrics of a later run
that did work go to the next step (`symzoo.invocations`), so the first run's values stay. Every run ends
FINISHED, or FAILED / KILLED; runs a killed driver left RUNNING are marked KILLED by the next connect.
sqlite locks under concurrent writers, which is why nothing but the driver logs; `log_batch` carries many
values per call (MLflow caps a call at 1000 metrics, 100 params and 100 tags).
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
CURRENT = "symzoo.current"  # "true" on a stage's run for the settings the study asked for last, "false" on the others
INVOCATIONS = "symzoo.invocations"  # on the study run: how many `symzoo run`s did work; their metrics' step
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # MLflow 3's UI: open on the runs, not traces


def experiment_url(base: str, experiment_id: str) -> str:
    """The UI page of an experiment's runs. MLflow 3.17's UI picks GenAI or model-training pages from the URL's
    workflowType (else the browser's last choice, GenAI at first) before the experiment's kind tag."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def model_run_name(zoo: str, model_id: str, factors: dict[str, Any], varying: Sequence[str]) -> str:
    """A model run's name: the zoo and the factors that vary in it (`cnn seed=3 lr=0.02`), else a short id."""
    parts = [f"{f}={_short(factors[f])}" for f in varying if f in factors]
    return f"{zoo} {' '.join(parts)}"[:240] if parts else f"{zoo}/{model_id[:8]}"


def _short(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _fast_sqlite_commits() -> None:
    """WAL journaling with synchronous=NORMAL for sqlite tracking stores: cheaper commits (tracking_bench.py,
    benchmarks/README.md), and `mlflow ui` can read while a study writes. A crash of the
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
    """The tracking server or database cannot be reached or written; the message says which URI, `cause` what
    MLflow said (one line)."""

    def __init__(self, message: str, cause: str = ""):
        super().__init__(message)
        self.cause = cause


def mlflow_cause(e: BaseException, limit: int = 200) -> str:
    """MLflow's error in one line: its type and its message's first line, at most `limit` characters, cut between
    words and marked " [...]" (a server's reply can be a page of HTML)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:([{'\"") + " [...]"


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
    _touched: set = field(default_factory=set, repr=False)  # study / zoo runs this invocation wrote to: ended by finish
    _step: int = 0  # the step of this invocation's study, zoo and stage metrics
    killed: int = 0  # runs an earlier, killed driver had left RUNNING, marked KILLED by connect

    def __post_init__(self) -> None:
        # Fail fast against an unreachable server instead of MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run ..." line per ended run
        if self.uri.startswith("sqlite:"):
            _fast_sqlite_commits()
        if self.uri.startswith("file:") or "://" not in self.uri:  # a folder the user named (MLflow 3 refuses it unasked)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        if self._local_path() is None:  # a server or a database elsewhere: an unknown scheme is refused here
            self._make_client()
        # a sqlite file or a folder: MLflow creates it with its client, so the client waits for connect()

    def _make_client(self) -> None:
        """The MlflowClient (creating a sqlite file or folder store); TrackingError for an unknown or malformed URI."""
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # after import, which sets it: no "creating tables" chatter

        try:
            self._client = MlflowClient(tracking_uri=self.uri)
        except Exception as e:  # an unknown scheme or a malformed URI
            cause = mlflow_cause(e)
            raise TrackingError(
                f"cannot use the MLflow tracking URI {self.uri!r}: {cause}. "
                "Fix the URI (--tracking-uri or the study's tracking_uri): sqlite:///file.db, http://host:port or a folder.",
                cause) from None

    def _local_path(self) -> Path | None:
        """The sqlite file or the folder of a local tracking store; None for a server or another database."""
        if self.uri.startswith("sqlite:///"):
            return Path(self.uri.removeprefix("sqlite:///").split("?")[0])
        if self.uri.startswith("file:"):
            from urllib.parse import urlsplit

            return Path(urlsplit(self.uri).path)
        return None if "://" in self.uri or self.uri.startswith("sqlite:") else Path(self.uri)

    def preflight(self) -> None:
        """Prove the tracking store usable before a run creates anything: a sqlite file or folder store that can be
        made and written (nothing is created), a server that answers a read; TrackingError naming the URI otherwise."""
        path = self._local_path()
        if path is None:
            try:
                self._client.get_experiment_by_name(self.study)
            except Exception as e:  # noqa: BLE001 - MLflow raises many types (connection, HTTP, permission)
                raise self._unusable(mlflow_cause(e)) from None
            return
        from pipeline.runner import path_problem

        database = self._sqlite_path() is not None
        what, path = ("MLflow database" if database else "MLflow tracking folder"), Path(os.path.abspath(path))
        bad = path_problem(path, folder=not database)
        if bad:
            raise TrackingError(f"cannot use the {what} {str(path)!r} (tracking URI {self.uri!r}): {bad}; choose "
                                "another --tracking-uri (or the study's tracking_uri)")

    def _unusable(self, cause: str) -> TrackingError:
        """The store did not answer (MLflow's `cause`, one line): what to do about it."""
        return TrackingError(f"cannot use the MLflow tracking URI {self.uri!r}: {cause}. Start the server, fix the URI "
                             "(--tracking-uri or the study's tracking_uri), or use a sqlite file.", cause)

    @contextmanager
    def _timed(self) -> Iterator[None]:
        """Count the time of an MLflow call; its failure becomes a TrackingError naming the URI (one line, not
        MLflow's traceback), and a sqlite file deleted under the run is said to be so."""
        t0 = time.perf_counter()
        try:
            yield
        except TrackingError:
            raise
        except Exception as e:  # noqa: BLE001 - MLflow raises many types (sqlite, HTTP, permission)
            self._check_sqlite_file()
            cause = mlflow_cause(e)
            raise TrackingError(f"MLflow at {self.uri!r} failed during the run: {cause}. The store holds everything "
                                "trained; fix the tracking store and run the study again to log what is missing",
                                cause) from None
        finally:
            dt = time.perf_counter() - t0
            self.seconds += dt
            self.calls += 1
            if threading.current_thread().name.startswith("mlflow-log"):
                self.background_seconds += dt

    # ---- set-up -------------------------------------------------------------------------------

    def connect(self) -> None:
        """Create or find the study's experiment and parent run; TrackingError if the store is unusable.
        Study, zoo and stage runs that an earlier driver left RUNNING (it died) are marked KILLED."""
        self._check_sqlite_file()
        if self._client is None:
            self._make_client()
        try:
            with self._timed():
                exp = self._client.get_experiment_by_name(self.study)
                self._experiment_id = exp.experiment_id if exp else self._client.create_experiment(
                    self.study, artifact_location=self._artifact_location())
                if exp is None or exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
                    self._client.set_experiment_tag(self._experiment_id, *EXPERIMENT_KIND)
        except Exception as e:  # MLflow raises many types (connection, sqlite, permission), which _timed wraps
            if isinstance(e, TrackingError) and not e.cause:
                raise  # symzoo's own words on a sqlite file (deleted, read-only), naming it
            raise self._unusable(e.cause if isinstance(e, TrackingError) else mlflow_cause(e)) from None
        self._db_existed = self._sqlite_path() is not None and self._sqlite_path().exists()
        for kind in ("study", "zoo", "stage"):
            for r in self._find({KIND: kind, STUDY: self.study}):
                if r.info.status == "RUNNING":
                    with self._timed():
                        self._client.set_terminated(r.info.run_id, status="KILLED")
                    self.killed += 1
        tags = {KIND: "study", STUDY: self.study}
        found = self._find(tags)
        self._study_run = found[0].info.run_id if found else self._find_or_create(tags, run_name=self.study)
        if not found:  # created RUNNING now: this invocation ends it, whatever happens
            self._touched.add(self._study_run)

    @property
    def working(self) -> bool:
        """Whether this invocation has work (`begin_work` was called)."""
        return self._study_run in self._touched

    def abort(self, status: str) -> None:
        """After an error: end the runs this invocation opened with `status` (FAILED, or KILLED on an interrupt)."""
        try:
            self.drain()
        except Exception:  # noqa: BLE001 - the logging thread's own error is secondary to the one being raised
            pass
        try:
            for run in list(self._model_runs.values()):  # created, never finished: deleted and redone by the next run
                with self._timed():
                    self._client.set_terminated(run, status=status)
            self._model_runs.clear()
            self.finish(status)
        except TrackingError:  # the tracking store is what failed: the error being raised says more
            pass

    def _sqlite_path(self) -> Path | None:
        return Path(self.uri.removeprefix("sqlite:///")) if self.uri.startswith("sqlite:///") else None

    def _check_sqlite_file(self) -> None:
        """TrackingError when the sqlite file cannot take this run's writes: read-only (MLflow would retry for
        minutes), or deleted while the run held it (its writes would go nowhere, silently)."""
        db = self._sqlite_path()
        if db is None:
            return
        if getattr(self, "_db_existed", False) and not db.exists():
            raise TrackingError(f"the MLflow database {str(db)!r} was deleted during the run: what was logged since is "
                                "lost (the store holds every result); run the study again to log it into a new one")
        if db.exists() and not os.access(db, os.W_OK):
            raise TrackingError(f"the MLflow database {str(db)!r} is read-only: make it writable or choose another "
                                "--tracking-uri")
        if not db.exists() and db.parent.exists() and not os.access(db.parent, os.W_OK):
            raise TrackingError(f"cannot create the MLflow database {str(db)!r}: its folder is read-only; choose another "
                                "--tracking-uri")

    def _artifact_location(self) -> str | None:
        """Artifacts of a sqlite store go beside its file (<db folder>/mlruns/<study>), not into whatever folder the
        process runs in (MLflow's default, ./mlruns); other stores keep their own default."""
        if not self.uri.startswith("sqlite:///"):
            return None
        db = Path(self.uri.removeprefix("sqlite:///"))
        return (db.resolve().parent / "mlruns" / self.study).as_uri()

    def begin_work(self) -> None:
        """This invocation trains or analyses something: the study run is RUNNING again and this invocation's
        metrics go to the next step. Not called by a run with nothing to do, which so leaves every run as it was."""
        with self._timed():
            run = self._client.get_run(self._study_run)
            self._step = int(run.data.tags.get(INVOCATIONS, "0"))
            self._client.set_tag(self._study_run, INVOCATIONS, str(self._step + 1))
            if run.info.status != "RUNNING":
                self._client.update_run(self._study_run, status="RUNNING")
        self._touched.add(self._study_run)

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
        """The zoo's child run (created on first use, found again on a re-run), its config as params when created
        (params are immutable: a zoo that grows later keeps its first config there, and its model count as a metric)."""
        if zoo not in self._zoo_runs:
            tags = {KIND: "zoo", STUDY: self.study, ZOO: zoo}
            found = self._find(tags)
            run = found[0].info.run_id if found else self._find_or_create(tags, run_name=zoo, parent=self._study_run)
            self._zoo_runs[zoo] = run
            if not found:
                self._touched.add(run)
                if config:
                    self._log(run, params=config)
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

    def create_model_runs(self, zoo: str, names: dict[str, str]) -> None:
        """Create the runs of models about to train (status RUNNING), named `names[model_id]`, so that finishing
        one costs two calls.

        Queued on the background thread while training runs; a run left unfinished by a killed driver
        is dropped by `discard_unfinished_models` on the next run.
        """
        parent = self.zoo_run(zoo)
        for mid, name in names.items():
            if mid in self._model_runs:
                continue
            tags = {KIND: "model", STUDY: self.study, ZOO: zoo, MODEL_ID: mid, "mlflow.parentRunId": parent}
            with self._timed():
                self._model_runs[mid] = self._client.create_run(self._experiment_id, tags=tags, run_name=name).info.run_id

    def log_models(self, zoo: str, rows: Sequence[dict[str, Any]], factors: Sequence[str],
                   curves: dict[str, dict[str, list[tuple[int, float]]]], varying: Sequence[str] = ()) -> None:
        """One finished run per model: factors as params, every epoch's metrics (step = epoch), id/status tags;
        named by the factors in `varying` (those that differ between the zoo's models).

        `curves[model_id][metric] = [(epoch, value), ...]`.
        """
        self.create_model_runs(zoo, {r["model_id"]: model_run_name(zoo, r["model_id"], r, varying) for r in rows})
        for row in rows:
            mid = row["model_id"]
            params = {f: row[f] for f in factors if f in row}
            params.update(arch=row.get("arch"), task=row.get("task"), n_params=row.get("n_params"))
            metrics = [(name, float(v), step) for name, series in curves.get(mid, {}).items() for step, v in series]
            self._log(self._model_runs.pop(mid), params=params, metrics=metrics, tags={"status": row["status"]},
                      status="FINISHED")

    def create_model_runs_later(self, zoo: str, names: dict[str, str]) -> None:
        """`create_model_runs` on the background logging thread."""
        self._submit(self.create_model_runs, zoo, names)

    def log_models_later(self, zoo: str, rows: Sequence[dict[str, Any]], factors: Sequence[str],
                         curves: dict[str, dict[str, list[tuple[int, float]]]], varying: Sequence[str] = ()) -> None:
        """`log_models` on one background thread of the driver, overlapping the training still running.

        One thread is the only writer while training runs (sqlite locks under concurrent writers);
        `drain()` waits for it and re-raises what it raised.
        """
        self._submit(self.log_models, zoo, rows, factors, curves, varying)

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
        tags = self._stage_tags(stage, params)
        found = self._find(tags)
        run = found[0].info.run_id if found else self._find_or_create(tags, run_name=stage, parent=self._study_run)
        if found:
            with self._timed():
                self._client.update_run(run, status="RUNNING")
        own = {f"{stage}.{k}": v for k, v in (params or {}).items()}  # its own columns: a stage's seed is not a model's
        self._log(run, params=None if found else own, metrics=[(k, float(v), self._step) for k, v in metrics.items()])
        self.log_artifacts(run, artifacts)
        with self._timed():
            self._client.set_terminated(run, status="FINISHED")
            for other in self._find({KIND: "stage", STUDY: self.study, STAGE: stage}):  # runs of earlier settings
                self._client.set_tag(other.info.run_id, CURRENT, str(other.info.run_id == run).lower())
        return run

    def stage_logged(self, stage: str, params: dict[str, Any] | None = None) -> bool:
        """Whether the stage has a FINISHED run for these settings (an interrupted run may have computed its
        results and stopped before logging them)."""
        return any(r.info.status == "FINISHED" for r in self._find(self._stage_tags(stage, params)))

    def _stage_tags(self, stage: str, params: dict[str, Any] | None) -> dict[str, str]:
        """The tags that find a stage's run for these settings."""
        digest = hashlib.sha256(json.dumps(params or {}, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return {KIND: "stage", STUDY: self.study, STAGE: stage, SETTINGS: digest}

    def settle_zoos(self, zoos: Iterable[str]) -> None:
        """After a run that completed: the runs of these zoos (all their models now stored) that an interrupted or
        failed run left KILLED or FAILED are FINISHED."""
        for zoo in zoos:
            for r in self._find({KIND: "zoo", STUDY: self.study, ZOO: zoo}):
                if r.info.status in ("KILLED", "FAILED"):
                    with self._timed():
                        self._client.set_terminated(r.info.run_id, status="FINISHED")

    def log_zoo_metrics(self, zoo: str, metrics: dict[str, float]) -> None:
        """Summary metrics of the models a run trained in `zoo`, on the zoo's run (queued on the logging
        thread, behind the model runs still being logged: one sqlite writer at a time)."""
        run = self.zoo_run(zoo)
        self._touched.add(run)
        self._submit(self._log, run, None, [(k, float(v), self._step) for k, v in metrics.items()])

    def log_artifacts(self, run_id: str, paths: Iterable[Path], folder: str = "plots") -> None:
        for p in paths:
            with self._timed():
                self._client.log_artifact(run_id, str(p), artifact_path=folder)

    def log_summary(self, metrics: dict[str, float], artifacts: Iterable[Path] = ()) -> None:
        """The study run's metrics at this invocation's step, and its artifacts (summary.csv, study plots)."""
        self._touched.add(self._study_run)
        self._log(self._study_run, metrics=[(k, float(v), self._step) for k, v in metrics.items()])
        self.log_artifacts(self._study_run, artifacts)

    def finish(self, status: str = "FINISHED") -> None:
        """End the study and zoo runs this invocation wrote to (FINISHED, FAILED or KILLED); others stay as they were.
        TrackingError if the sqlite file went away during the run (its logging was lost without an error)."""
        self._check_sqlite_file()
        for run in [self._study_run, *self._zoo_runs.values()]:
            if run in self._touched:
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
