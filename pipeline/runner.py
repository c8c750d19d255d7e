"""Run a study on Ray: train the populations that are missing, then the analysis stages, logging to MLflow.

The driver plans and logs; Ray tasks do the work. A training task trains one population, writes its
shard to the store and returns only small summaries (model rows and checkpoint metrics), so weights
never pass through the driver. An analysis task reads the store, computes its items and writes its
own result shard. Everything is keyed by stable ids, so running a study again trains and analyses
only what is missing, and a task retried after a worker death overwrites its own shard.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.localray import ClusterUnreachable, check_cluster, init_ray
from pipeline.progress import Display, ProgressBoard, counted
from pipeline.study import Study
from pipeline.tracking import Tracker, default_tracking_uri, model_run_name


class RunRefused(RuntimeError):
    """A run that cannot start: its output folder or store is not writable, a stored zoo it names is missing,
    another run holds the study's lock, or no Ray cluster answers at its address; the message names the path,
    the holder or the address."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's stop) taken as Ctrl-C is: the run ends its MLflow runs KILLED and stops."""


TERMINATED = threading.Event()  # set by SIGTERM: Ray's waits re-raise the interrupt as a plain KeyboardInterrupt


def _terminate(signum: int, frame: Any) -> None:
    TERMINATED.set()
    raise Terminated()


def ignore_interrupts() -> None:
    """Ctrl-C and SIGTERM ignored from here on (main thread only): once a run is stopping, a second one would cut
    short the ending of its MLflow runs and Ray's shutdown (a traceback, then a crash)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM raises `Terminated` in the block (installed after Ray's start, whose handler would dump and abort);
    the handlers before it are restored after, unless the block was interrupted (the caller is stopping: they stay
    ignored, `ignore_interrupts`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, _terminate), signal.getsignal(signal.SIGINT)
    stopping = False
    try:
        yield
    except KeyboardInterrupt:
        stopping = True
        raise
    finally:
        if not stopping:
            signal.signal(signal.SIGTERM, before[0])
            signal.signal(signal.SIGINT, before[1])


class ResourceError(ValueError):
    """A study asks each task for more CPUs or GPUs than any node of the cluster has; the message gives both."""


def check_resources(res: Any, cluster: bool, log: Any = None, wait_s: float | None = None) -> None:
    """ResourceError when no node can run a task of `res` (num_cpus, num_gpus): Ray would wait forever. A local Ray
    is refused at once; a cluster (its autoscaler may add nodes) is given `wait_s` (SYMZOO_RESOURCE_WAIT_S, 300 s)."""
    import ray

    def largest() -> tuple[float, float]:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        return (max((n.get("CPU", 0.0) for n in nodes), default=0.0), max((n.get("GPU", 0.0) for n in nodes), default=0.0))

    def fits(cpu: float, gpu: float) -> bool:
        return res.num_cpus <= cpu and res.num_gpus <= gpu

    cpu, gpu = largest()
    if fits(cpu, gpu):
        return
    asked = (f"resources ask each task for num_cpus={res.num_cpus:g}, num_gpus={res.num_gpus:g}; the largest node "
             f"of this Ray has {cpu:g} CPUs and {gpu:g} GPUs")
    wait_s = float(os.environ.get("SYMZOO_RESOURCE_WAIT_S", 300)) if wait_s is None else wait_s
    if cluster and wait_s > 0:
        if log is not None:
            log(f"{asked}: waiting up to {wait_s:.0f}s for a node that has them (an autoscaler may add one)")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            cpu, gpu = largest()
            if fits(cpu, gpu):
                return
    raise ResourceError(f"{asked}: no task could start. Lower resources in the study, or run it on a cluster that has "
                        "such nodes")


class StageConfigError(ValueError):
    """An analysis stage's settings do not fit what is stored (e.g. an epoch no checkpoint has)."""


class TaskFailed(RuntimeError):
    """A Ray task of the study raised (after its retries): `where` says which population or stage, `cause` is
    the exception the task raised, with its own message (the Ray traceback stays on the __cause__ chain)."""

    def __init__(self, where: str, cause: BaseException):
        super().__init__(f"{where}: {type(cause).__name__}: {cause}")
        self.where, self.cause = where, cause


def _get(ref: Any, where: str) -> Any:
    """ray.get, a task's error raised as TaskFailed naming `where`."""
    import ray
    from ray.exceptions import RayError, RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as e:
        raise TaskFailed(where, e.cause if getattr(e, "cause", None) is not None else e) from e
    except RayError as e:  # the worker or its node died past the task's retries (WorkerCrashedError, ...)
        raise TaskFailed(where, e) from e


@dataclass
class RunReport:
    """What a study run did, for the summary and the benchmarks."""

    study: str = ""
    store: str = ""
    trained_models: int = 0
    skipped_models: int = 0
    populations: int = 0
    analysis_items: dict[str, int] = field(default_factory=dict)
    placements: list[dict[str, Any]] = field(default_factory=list)  # per population: node, host, GPU ids, start/finish
    population_sizes: dict[str, int] = field(default_factory=dict)  # zoo -> size chosen by population_size: auto
    phase_s: dict[str, float] = field(default_factory=dict)  # driver wall time of "train" and of each stage
    wall_s: float = 0.0
    experiment_id: str = ""  # the study's MLflow experiment
    tracking_s: float = 0.0  # all time spent in MLflow calls, on any driver thread
    tracking_wait_s: float = 0.0  # of which the driver sat waiting for MLflow (the wall-time overhead)
    train_task_s: float = 0.0
    driver_result_s: float = 0.0  # driver time spent taking in finished populations (ray.get + bookkeeping)
    plots: list[Path] = field(default_factory=list)
    summary: pl.DataFrame | None = None
    absent: str = ""  # one line: what the store lacks for the study's zoos (curves an import lacks, a stage's rows)
    pooled: dict[str, list[str]] = field(default_factory=dict)  # zoo -> the factors its summary column pools

    def as_dict(self) -> dict[str, Any]:
        """The report as plain data (JSON): everything but the summary table and plot paths, and when it was written
        (times in a placement, `started` and `finished`, are Unix seconds)."""
        skip = {"summary", "plots"}
        return {**{k: v for k, v in self.__dict__.items() if k not in skip},
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    @property
    def tracking_share(self) -> float:
        """Share of the wall time the study waited for MLflow."""
        return self.tracking_wait_s / self.wall_s if self.wall_s else 0.0


def path_problem(path: Path | str, folder: bool = True) -> str | None:
    """Why `path` cannot be made and written as a folder (or, `folder=False`, a file), creating nothing: it is a file
    (a folder), a path above it is a file, or the nearest existing folder at or above it takes no new file (a probe
    file is written there and removed); None when it can."""
    import uuid

    path = Path(os.path.abspath(path))
    if path.exists():
        if folder != path.is_dir():
            return "it is a file, not a folder" if folder else "it is a folder, not a file"
        if not folder:
            return None if os.access(path, os.W_OK) else "it is read-only"
    above = path if path.exists() else path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        return f"{str(above)!r} is a file, not a folder"
    probe = above / f".symzoo-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        return f"{str(above)!r} cannot be written ({e.strerror or e})"
    return None


def missing_folders(path: Path | str) -> list[Path]:
    """The folders that making `path` (a folder) would create, deepest first: what a failed run removes again if empty."""
    path, made = Path(os.path.abspath(path)), []
    while not path.exists() and path != path.parent:
        made.append(path)
        path = path.parent
    return made


def remove_empty(folders: list[Path]) -> None:
    """Remove each of `folders` (deepest first) that is empty; a folder something was written into stays."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass


def check_output_writable(folder: Path) -> None:
    """Prove the output folder (plots, summary.csv) can be made and written before any work, creating nothing."""
    why = path_problem(folder)
    if why:
        raise RunRefused(f"cannot write the output folder {str(folder)!r}: {why}. Set output: in the study to a folder "
                         "you can write")


def check_report_path(path: Path) -> None:
    """RunRefused naming --report when the run's JSON report could not be written there: a folder, a file above it,
    a folder that cannot be written. Checked before any work; nothing is created."""
    why = path_problem(path, folder=False)
    if why:
        raise RunRefused(f"--report {str(path)!r} cannot be written: {why}; give a file path in a folder you can write")


def check_stored_zoos(study: Study) -> dict[str, dict[str, Any]]:
    """{zoo: its models, architectures and tasks} of each zoo the study names as stored; RunRefused naming the
    zoo and what the store holds when one is not there, before any work starts."""
    from zoos.store import Store

    if not study.stored_zoos:
        return {}
    store = Store(study.store)
    where = {id(z): f"zoos[{i}].name: " for i, z in enumerate(study.zoos)}  # the key the message is about
    if not store.exists:
        first = study.stored_zoos[0]
        raise RunRefused(f"{where[id(first)]}zoo {first.name!r} is named stored: true, but there is no symzoo store at "
                         f"{study.store!r} (--store, or store: in the study); give the store that holds it")
    held = store.zoos()
    found = {}
    for zoo in study.stored_zoos:
        if zoo.name not in held:
            have = ", ".join(held[:12]) + (", ..." if len(held) > 12 else "") if held else "no zoo"
            raise RunRefused(f"{where[id(zoo)]}zoo {zoo.name!r} is named stored: true, but store {study.store!r} holds "
                             f"{have}; import it (symzoo import) or train it in another study first")
        models = store.models(zoo.name).select("arch", "task", "status").collect()
        found[zoo.name] = {"models": models.height, "ok": int((models["status"] == "ok").sum()),
                           "arch": ", ".join(sorted(set(models["arch"]))), "task": ", ".join(sorted(set(models["task"])))}
    _check_stored_epochs(study, store)
    return found


def _check_stored_epochs(study: Study, store: Any) -> None:
    """RunRefused, before any work, where a stage asks a stored zoo for checkpoint epochs it does not hold (a
    trained zoo's are checked against its `checkpoints` when the study is read)."""
    from pipeline.stages import STAGES
    from pipeline.study import StoredZoo

    for i, stage in enumerate(study.analysis):
        wanted = getattr(stage.settings, "epochs", None)
        if not (STAGES[stage.stage].every_epoch_stored and isinstance(wanted, list)):
            continue
        for zoo in study.stage_zoos(stage):
            if isinstance(zoo, StoredZoo):
                held = set(store.checkpoints(zoo=zoo.name).select("epoch").unique().collect()["epoch"].to_list())
                if missing := sorted(set(wanted) - held):
                    raise RunRefused(f"analysis[{i}].epochs: {missing} not stored for zoo {zoo.name!r}; its checkpoints "
                                     f"are at epochs {sorted(held)} (ask for some of those, or 'last' or 'all')")


def check_store_writable(root: str) -> None:
    """Prove the store usable and its root writable before any work starts, leaving nothing behind: a local path is
    probed without being made; a remote root is made, probed, and removed again if this check made it."""
    import uuid

    import pyarrow.fs as pafs

    from zoos.store import Store, StoreError

    hint = "Choose another --store (or store: in the study)"
    try:
        store = Store(root)
    except StoreError as e:
        raise RunRefused(f"{e}. {hint}") from None
    if not store.exists and _holds_files(store):  # a run would write a store in among someone's files
        raise RunRefused(f"{root!r} is a folder of other files, not a symzoo store (no symzoo-store.json); a store is "
                         f"a new or empty folder, or one symzoo wrote. {hint}")
    if store.local:
        why = path_problem(store.root)
        if why:
            raise RunRefused(f"cannot write the store at {root!r}: {why}. {hint}")
        return
    try:
        made = store.fs.get_file_info(store.root).type == pafs.FileType.NotFound
        store.fs.create_dir(store.root, recursive=True)
        probe = f"{store.root}/.write-probe-{uuid.uuid4().hex[:8]}"
        with store.fs.open_output_stream(probe) as f:
            f.write(b"ok")
        store.fs.delete_file(probe)
        if made:
            store.fs.delete_dir(store.root)
    except OSError as e:
        raise RunRefused(f"cannot write the store at {root!r}: {e.strerror or e}. {hint}") from None


def _holds_files(store: Any) -> bool:
    """Whether a store root without a marker already holds something not hidden (a run's own `.locks` is)."""
    import pyarrow.fs as pafs

    if store.fs.get_file_info(store.root).type != pafs.FileType.Directory:
        return False
    entries = store.fs.get_file_info(pafs.FileSelector(store.root, allow_not_found=True))
    return any(not e.base_name.startswith(".") for e in entries)


class StudyLock:
    """One `symzoo run` of a study on a store at a time: `<store>/.locks/<study>.json` names its holder (host,
    pid, start) and a heartbeat the holder refreshes every HEARTBEAT_S. A second run is refused naming the holder;
    a lock whose process is gone (same host) or whose heartbeat is older than STALE_S is taken over."""

    HEARTBEAT_S, STALE_S = 30.0, 150.0

    def __init__(self, store_root: str, study: str):
        from zoos.store import Store

        self.store = Store(store_root)
        self.rel = f".locks/{study}.json"
        self.study = study
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _path(self) -> str:
        return f"{self.store.root}/{self.rel}"

    def _read(self) -> dict | None:
        try:
            with self.store.fs.open_input_stream(self._path()) as f:
                return json.loads(f.read().decode())
        except (OSError, ValueError):
            return None

    def _write(self) -> None:
        self.store.fs.create_dir(f"{self.store.root}/.locks", recursive=True)
        with self.store.fs.open_output_stream(self._path()) as f:
            f.write(json.dumps({**self.me, "heartbeat": time.time()}).encode())

    def _alive(self, holder: dict) -> bool:
        if holder.get("host") == self.me["host"]:
            try:
                os.kill(int(holder["pid"]), 0)
                return True
            except PermissionError:  # it exists, run by another user
                return True
            except (OSError, ValueError, KeyError):
                return False
        return time.time() - float(holder.get("heartbeat", 0)) < self.STALE_S

    def held(self) -> str | None:
        """A line naming the live run that holds the lock, else None; reads only."""
        holder = self._read()
        if holder and holder.get("pid") != self.me["pid"] and self._alive(holder):
            since = time.strftime("%H:%M:%S", time.localtime(float(holder.get("started", 0))))
            return (f"study {self.study!r} is being run on store {self.store.uri!r} by process {holder.get('pid')} on "
                    f"{holder.get('host')} (since {since}); wait for it to finish, or stop it")
        return None

    def acquire(self) -> str | None:
        """Take the lock (None), or return why not: a line naming the run that holds it."""
        busy = self.held()
        if busy:
            return busy
        self._write()
        self._thread = threading.Thread(target=self._beat, name="symzoo-lock", daemon=True)
        self._thread.start()
        return None

    def _beat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            try:
                self._write()
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        holder = self._read()
        if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            try:
                self.store.fs.delete_file(self._path())
            except OSError:
                pass


# ---- Ray task bodies ------------------------------------------------------------------------------


def _train_task(pop: Any, store_root: str, precision: str, compile_: bool, data_dir: str | None, board: Any) -> dict[str, Any]:
    """Train one population, write its shard, return small summaries (runs inside a Ray worker)."""
    import ray
    import torch

    from zoos.store import Store
    from zoos.trainer import train_population

    gpus = ray.get_gpu_ids()
    device = "cuda" if gpus and torch.cuda.is_available() else "cpu"
    cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)) or 1
    torch.set_num_threads(max(1, cpus))
    shard = pop.shard
    started, t0 = time.time(), time.perf_counter()
    result = train_population(pop, device=device, precision=precision, compile=compile_, data_dir=data_dir,
                              progress=lambda epoch, total: board.report.remote(shard, epoch),
                              status=lambda phase: board.phase.remote(shard, phase))
    t1 = time.perf_counter()
    Store(store_root).write_population(result)
    t2 = time.perf_counter()
    curves = {m["model_id"]: {name: list(enumerate(map(float, values[i]))) for name, values in result.curves.items()}
              for i, m in enumerate(result.models)}  # every epoch's metrics, epoch 0 = at init
    return {"zoo": pop.zoo, "rows": result.models, "curves": curves, "train_s": t1 - t0,
            "write_s": t2 - t1, "weight_bytes": int(sum(v.nbytes for v in result.weights.values())),
            "timings": result.timings, "program": result.program, "device": device, "gpu_ids": [str(g) for g in gpus],
            "node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "started": started, "finished": time.time()}  # Unix seconds


def _stage_task(stage: str, store_root: str, items: list[Any], settings: dict[str, Any], data_dir: str | None) -> int:
    """Compute one chunk of an analysis stage and write it as its own shard (runs inside a Ray worker)."""
    import ray
    import torch

    from pipeline.stages import STAGES

    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)) or 1))
    return len(STAGES[stage].run(store_root, items, settings, data_dir, device))


# ---- the driver -----------------------------------------------------------------------------------

def training_slots(res: Any) -> int:
    """How many training tasks the connected Ray cluster runs at once with these resources: its GPUs over
    `num_gpus` per task (or its CPUs over `num_cpus` without GPUs); at least 1 (an autoscaling cluster
    that has not started its workers yet counts as one slot)."""
    import ray

    total = ray.cluster_resources()
    if res.num_gpus > 0:
        return max(1, int(total.get("GPU", 0) // res.num_gpus))
    return max(1, int(total.get("CPU", 1) // res.num_cpus))


def _summary_metrics(summary: pl.DataFrame | None) -> dict[str, float]:
    """The summary table's numbers as `<zoo>.<column>` metrics for the study run."""
    if summary is None:
        return {}
    return {f"{row['zoo']}.{k}": float(v) for row in summary.iter_rows(named=True) for k, v in row.items()
            if k != "zoo" and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}


def _distribution(metrics: dict[str, list[float]]) -> dict[str, float]:
    """Mean and median of each metric over models (NaN of diverged models left out)."""
    import numpy as np

    out = {}
    for name, values in metrics.items():
        v = np.asarray(values, dtype=float)
        v = v[np.isfinite(v)]
        if v.size:
            out[f"{name}_mean"], out[f"{name}_median"] = float(v.mean()), float(np.median(v))
    return out


def _log_stored_models(store: Any, tracker: Tracker, zoo: str, ids: set[str], logged: set[str], factors: list[str],
                       varying: list[str]) -> int:
    """Log the stored models among `ids` of `zoo` that have no finished MLflow run (rows and every epoch's metrics
    read back from the store), e.g. those a killed driver had stored but not logged."""
    unlogged = (store.stored_ids(zoo) & ids) - logged
    if not unlogged:
        return 0
    wanted = pl.col("model_id").is_in(sorted(unlogged))
    rows = store.models(zoo).filter(wanted).collect().to_dicts()
    ck = store.curves(zoo).filter(wanted).sort("model_id", "epoch").collect()
    names = [c for c in ck.columns if c not in ("model_id", "zoo", "epoch") and ck[c].dtype.is_numeric()]
    metrics: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in ck.iter_rows(named=True):
        per = metrics.setdefault(r["model_id"], {})
        for name in names:
            if r[name] is not None:
                per.setdefault(name, []).append((int(r["epoch"]), float(r[name])))
    tracker.log_models(zoo, rows, factors, metrics, varying)
    logged.update(unlogged)
    return len(rows)


def run_study(study: Study, *, address: str | None = None, display: Display | None = None,
              tracking_uri: str | None = None) -> RunReport:
    """Train what is missing, run the analysis stages, log everything; returns what was done."""
    t_start = time.perf_counter()
    report = RunReport(study=study.study, store=study.store)
    display = display or Display()
    # Everything that can refuse the run is checked before anything is created (MLflow file, experiment or run,
    # store, lock, output folder): the cluster address, the tracking store, the store, the output folder, the
    # stored zoos, the study's lock and the resources (a local Ray's before it starts; a cluster's once joined).
    try:
        check_cluster(address)  # a head that does not answer: refused in seconds
    except ClusterUnreachable as e:
        raise RunRefused(str(e)) from None
    tracker = Tracker(tracking_uri or study.tracking_uri or default_tracking_uri(), study.study)
    tracker.preflight()
    check_store_writable(study.store)
    check_output_writable(study.output_dir())
    stored_zoos = check_stored_zoos(study)
    lock = StudyLock(study.store, study.study)
    held = lock.held()
    if held:
        raise RunRefused(held)
    _start_ray(study, address, display)
    # what this run creates from here on, and removes again (where left empty) if it fails
    made = missing_folders(study.output_dir())
    if lock.store.local:
        made = missing_folders(f"{lock.store.root}/.locks") + made
    ok = False
    with _terminate_as_interrupt():
        try:
            held = lock.acquire()  # before MLflow: connecting marks a live run's RUNNING study run KILLED
            if held:  # another run took it since
                raise RunRefused(held)
            tracker.connect()
            report.experiment_id = tracker.experiment_id
            report = _run_study(study, display, tracker, report, stored_zoos, t_start)
            ok = True
            return report
        except BaseException as e:  # the runs this invocation opened end FAILED (KILLED on Ctrl-C), not RUNNING
            if isinstance(e, KeyboardInterrupt):
                ignore_interrupts()
            tracker.abort("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            lock.release()
            if not ok:
                remove_empty(made)


def _run_study(study: Study, display: Display, tracker: Tracker, report: RunReport,
               stored_zoos: dict[str, dict[str, Any]], t_start: float) -> RunReport:
    """The phases of a run, in order: start, plan, recover, train, analyse, drain the logging, summarise."""
    store = _start(study, tracker, stored_zoos)
    plan = _plan(study, store, tracker, report)
    logged = _recover(study, store, tracker, plan)
    with display:
        _train(study, plan, logged, display, tracker, report)
        _analyse(study, store, display, tracker, report)
    # model runs were logged on a background thread, overlapping training and the analysis stages
    t_wait = time.perf_counter()
    tracker.drain()
    report.tracking_wait_s += time.perf_counter() - t_wait
    _summarise(study, store, tracker, report, t_start)
    return report


def local_resources() -> tuple[float, float] | None:
    """(CPUs, GPUs) a local Ray started by `init_ray` would have (all CPUs; the GPUs Ray detects, capped by
    CUDA_VISIBLE_DEVICES as Ray caps them); None when Ray's detection cannot be asked."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        manager = get_accelerator_manager_for_resource("GPU")
        gpus = manager.get_current_node_num_accelerators()
        visible = manager.get_current_process_visible_accelerator_ids()
    except Exception:  # noqa: BLE001 - a Ray without this private API: checked once Ray is up
        return None
    if visible is not None:
        gpus = min(gpus, len(visible))
    return float(os.cpu_count() or 1), float(gpus)


def _start_ray(study: Study, address: str | None, display: Display) -> None:
    """Start (or join) Ray and check the resources can be had. A local Ray's resources are known before it starts:
    a study asking more is refused before Ray starts; a cluster's are asked of it (its autoscaler given time)."""
    import ray

    res = study.resources
    target = address or os.environ.get("RAY_ADDRESS")
    cluster = bool(target) and target != "local"
    here = None if cluster or ray.is_initialized() else local_resources()
    if here is not None and not (res.num_cpus <= here[0] and res.num_gpus <= here[1]):
        raise ResourceError(f"resources ask each task for num_cpus={res.num_cpus:g}, num_gpus={res.num_gpus:g}; this "
                            f"machine, where a local Ray would start, has {here[0]:g} CPUs and {here[1]:g} GPUs: no task "
                            "could start. Lower resources in the study, or run it on a cluster (--address) that has "
                            "such nodes")
    t_ray = time.perf_counter()
    display.log(f"starting Ray ({target or 'a local instance'}) ...")
    init_ray(address)
    display.log(f"Ray up in {time.perf_counter() - t_ray:.1f}s; planning populations")
    check_resources(res, cluster=cluster, log=display.log)


def _start(study: Study, tracker: Tracker, stored_zoos: dict[str, dict[str, Any]]) -> Any:
    """Log the study's configuration and its stored zoos' runs; open the store."""
    from zoos.store import Store

    tracker.log_study({"store": study.store, "zoos": [z.name for z in study.zoos],
                       "stages": [s.stage for s in study.analysis], **study.resources.model_dump()})
    store = Store(study.store)
    for name, found in stored_zoos.items():
        tracker.zoo_run(name, config={"stored": True, **found})
    return store


@dataclass
class _Plan:
    """The populations a run trains (those whose models are not all stored) and what names their models' runs."""

    todo: list[Any] = field(default_factory=list)  # PopulationSpec
    factor_names: dict[str, list[str]] = field(default_factory=dict)  # zoo -> its models' factors
    varying: dict[str, list[str]] = field(default_factory=dict)  # zoo -> the factors that tell its models apart
    zoo_ids: dict[str, set[str]] = field(default_factory=dict)  # zoo -> every model id it has
    slots: int = 0  # training tasks the cluster runs at once: asked of Ray only for a zoo with population_size auto
    fitted: dict[str, int] = field(default_factory=dict)  # zoo -> the most models one program holds, where split to it


def _plan(study: Study, store: Any, tracker: Tracker, report: RunReport) -> _Plan:
    """Expand each trained zoo, leave out its stored models, group the rest into populations (sized to the cluster
    for population_size auto, split to 32-bit indexing on a GPU); open each zoo's MLflow run."""
    from zoos.program import fit_populations
    from zoos.spec import AUTO_MAX_POPULATION, expand, populations
    from zoos.trainer import make_task

    plan, res = _Plan(), study.resources
    for zoo in study.trained_zoos:
        models = expand(zoo, study.study)
        plan.factor_names[zoo.name] = sorted({k for m in models for k in m.factors})
        plan.varying[zoo.name] = [f for f in plan.factor_names[zoo.name]  # what tells the zoo's models apart: their runs' names
                                  if len({json.dumps(m.factors.get(f), default=str) for m in models}) > 1]
        plan.zoo_ids[zoo.name] = {m.model_id for m in models}
        tracker.zoo_run(zoo.name, config={"task": zoo.task.name, "task_options": zoo.task.options, "arch": zoo.arch.name,
                                           "arch_config": zoo.arch.config, "epochs": zoo.epochs,
                                           "checkpoints": zoo.checkpoints, "train_metrics": zoo.train_metrics})
        done = store.stored_ids(zoo.name)
        missing = [m for m in models if m.model_id not in done]  # a re-run trains only these
        report.skipped_models += len(models) - len(missing)
        if zoo.population_size == "auto":
            plan.slots = plan.slots or training_slots(res)
            pops = populations(missing, AUTO_MAX_POPULATION, slots=plan.slots)
            report.population_sizes[zoo.name] = max((len(p.model_ids) for p in pops), default=0)
        else:
            pops = populations(missing, zoo.population_size)
        if res.num_gpus > 0:  # on a GPU one program's activations must stay within 32-bit indexing
            pops, limits = fit_populations(pops, lambda p: make_task(p, study.data_dir))
            plan.fitted.update(limits)
        plan.todo += pops
    return plan


def _recover(study: Study, store: Any, tracker: Tracker, plan: _Plan) -> set[str]:
    """Log the models an earlier run stored but whose driver died before logging them (from the store); returns
    the ids of the models that have a finished MLflow run (none are tracked without per-model runs)."""
    per_model = study.model_runs == "all"
    tracker.discard_unfinished_models()
    logged = tracker.logged_models() if per_model else set()
    for zoo in study.trained_zoos if per_model else ():
        _log_stored_models(store, tracker, zoo.name, plan.zoo_ids[zoo.name], logged, plan.factor_names[zoo.name],
                           plan.varying[zoo.name])
    return logged


def _train(study: Study, plan: _Plan, logged: set[str], display: Display, tracker: Tracker, report: RunReport) -> None:
    """Train the planned populations as Ray tasks, polling their progress; take in each as it finishes."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    todo, res, per_model = plan.todo, study.resources, study.model_runs == "all"
    n_models = sum(len(p.model_ids) for p in todo)
    analysed = sum(bool(getattr(z, "stored", False)) for z in study.zoos)  # zoos found in the store, not trained
    display.log(f"study {study.study}: {counted(n_models, 'model')} to train in {counted(len(todo), 'population')}, "
                f"{report.skipped_models:,} already stored" + (f"; {counted(analysed, 'zoo')} analysed as stored"
                                                               if analysed else ""))
    for zoo_name, size in report.population_sizes.items():
        display.log(f"zoo {zoo_name}: population_size auto -> {size} ({plan.slots} training slots)")
    for zoo_name, limit in plan.fitted.items():
        display.log(f"zoo {zoo_name}: populations split to at most {limit} models (one program's largest activation "
                    "must stay within 32-bit indexing)")
    if not todo:
        return
    t_phase = time.perf_counter()
    tracker.begin_work()
    # on the driver's node: a worker node that dies must not take the live progress with it
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board = ray.remote(ProgressBoard).options(num_cpus=0, scheduling_strategy=here).remote()
    remote = ray.remote(_train_task)
    pending = {
        remote.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_retries=res.max_retries,
                       name=f"train:{pop.zoo}:{pop.shard}").remote(pop, study.store, res.precision, res.compile, study.data_dir, board): pop
        for pop in todo
    }
    for pop in todo if per_model else ():  # runs created on the logging thread while training runs
        tracker.create_model_runs_later(pop.zoo, {m.model_id: model_run_name(pop.zoo, m.model_id, m.factors, plan.varying[pop.zoo])
                                                  for m in pop.models if m.model_id not in logged})
    display.add("models trained", n_models)
    display.add("model-epochs", sum(len(p.model_ids) * p.epochs for p in todo))
    sizes = {p.shard: len(p.model_ids) for p in todo}
    finals: dict[str, dict[str, list[float]]] = {}  # zoo -> metric -> final value of each model trained now
    finished_epochs = 0
    fell_back: set[str] = set()
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
        _show_progress(board, pending, sizes, finished_epochs, display)
        for ref in ready:
            t_result = time.perf_counter()
            pop = pending.pop(ref)
            out = _get(ref, f"training zoo {pop.zoo!r} (population {pop.shard})")  # raises after the task's retries
            _take_population(pop, out, plan, logged, per_model, fell_back, finals, display, tracker, report)
            finished_epochs += len(pop.model_ids) * pop.epochs
            report.driver_result_s += time.perf_counter() - t_result
    display.update("model-epochs", finished_epochs, note="")
    ray.kill(board)
    report.phase_s["train"] = time.perf_counter() - t_phase
    for zoo_name, metrics in finals.items():  # the zoo run: its models' final metrics at a glance
        tracker.log_zoo_metrics(zoo_name, {"models_trained": float(len(next(iter(metrics.values())))),
                                           **_distribution(metrics)})


def _show_progress(board: Any, pending: dict[Any, Any], sizes: dict[str, int], finished_epochs: int,
                   display: Display) -> None:
    """Model-epochs done (finished populations and the running ones' live counts), and what the others are doing."""
    import ray

    live = ray.get(board.snapshot.remote())
    running = sum(sizes[s] * e for s, e in live.items() if s in {p.shard for p in pending.values()})
    phases = ray.get(board.current_phases.remote())
    counts: dict[str, int] = {}
    for p in pending.values():  # a population with no phase yet waits for a worker
        what = phases.get(p.shard, "waiting for a worker")
        counts[what] = counts.get(what, 0) + 1
    display.update("model-epochs", finished_epochs + running,
                   note=", ".join(f"{n} {what}" for what, n in sorted(counts.items())))


def _take_population(pop: Any, out: dict[str, Any], plan: _Plan, logged: set[str], per_model: bool,
                     fell_back: set[str], finals: dict[str, dict[str, list[float]]], display: Display,
                     tracker: Tracker, report: RunReport) -> None:
    """A finished population: its placement and timings into the report, its models' runs onto the logging thread,
    its final metrics into `finals`; a warning, once per zoo, when a GPU trained it as plain vmap."""
    report.train_task_s += out["train_s"] + out["write_s"]
    report.placements.append({"population": pop.shard, "zoo": pop.zoo, "models": len(pop.model_ids),
                              "epochs": pop.epochs,
                              **{k: out[k] for k in ("node", "host", "gpu_ids", "device", "started", "finished",
                                                      "train_s", "write_s", "weight_bytes", "timings",
                                                      "program")}})
    program = out["program"]
    if out["device"] == "cuda" and not program.get("fast", True) and pop.zoo not in fell_back:
        fell_back.add(pop.zoo)  # once per zoo: the slow path, and why
        display.log(f"warning: zoo {pop.zoo!r} trains as plain vmap on the GPU, slower per model: "
                    f"{program.get('reason')}")
    if per_model:
        rows = [r for r in out["rows"] if r["model_id"] not in logged]
        tracker.log_models_later(out["zoo"], rows, plan.factor_names[out["zoo"]], out["curves"], plan.varying[out["zoo"]])
    for series in out["curves"].values():
        for name, points in series.items():
            finals.setdefault(out["zoo"], {}).setdefault(name, []).append(points[-1][1])
    report.trained_models += len(pop.model_ids)
    report.populations += 1
    display.update("models trained", report.trained_models, note=f"{pop.zoo} on {out['device']}")


def _analyse(study: Study, store: Any, display: Display, tracker: Tracker, report: RunReport) -> None:
    """Each analysis stage in the study's order: plan its missing items, run them in chunks as Ray tasks."""
    import ray

    from pipeline.stages import STAGES

    res = study.resources
    for stage in study.analysis:
        t_phase = time.perf_counter()
        impl = STAGES[stage.stage]
        zoos = study.stage_zoos(stage)
        try:
            items = impl.plan(store, zoos, stage.settings)
        except ValueError as e:
            raise StageConfigError(f"analysis stage {stage.stage!r}: {e}") from None
        display.add(stage.stage, len(items))
        if items and not tracker.working:
            tracker.begin_work()
        remote = ray.remote(_stage_task)
        chunks = [items[i:i + stage.items_per_task] for i in range(0, len(items), stage.items_per_task)]
        settings = stage.settings.model_dump()
        pending = {remote.options(num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_retries=res.max_retries)
                   .remote(stage.stage, study.store, chunk, settings, study.data_dir): len(chunk) for chunk in chunks}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                _get(ref, f"analysis stage {stage.stage!r}")
                display.advance(stage.stage, pending.pop(ref))
        report.analysis_items[stage.stage] = len(items)
        report.phase_s[stage.stage] = report.phase_s.get(stage.stage, 0.0) + time.perf_counter() - t_phase


def _summarise(study: Study, store: Any, tracker: Tracker, report: RunReport, t_start: float) -> None:
    """Plots and summary.csv; each stage's and the study's MLflow run; the report's wall and tracking times."""
    from pipeline.report import absent, pooled_factors, statistics_rows, study_store, summarise, unlearned_models
    from pipeline.stages import STAGES

    out_dir = study.output_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    store = study_store(store, study)  # the study's own results: its items, under its settings
    names = [z.name for z in study.zoos]
    report.summary, report.plots, stage_plots = summarise(store, study, out_dir)
    report.absent = absent(store, names, [s.stage for s in study.analysis], bool(study.analysis))
    report.pooled = pooled_factors(store, names)
    unlearned = unlearned_models(store, names)  # left out of the stage runs' numbers, as of the summary's
    for stage in study.analysis:  # a stage run for each stage that computed something now (a re-run adds a step), or
        params = stage.settings.model_dump()  # whose results an interrupted run computed but did not log
        if not report.analysis_items.get(stage.stage) and tracker.stage_logged(stage.stage, params):
            continue
        rows = statistics_rows(store, names, stage.stage, unlearned)  # the numbers the summary shows
        metrics = STAGES[stage.stage].summary_metrics(rows) if rows.height else {}
        tracker.log_stage(stage.stage, metrics, params=params, artifacts=stage_plots.get(stage.stage, []))
    if tracker.working:  # a run with nothing to do rewrites nothing
        in_stages = {p for paths in stage_plots.values() for p in paths}
        tracker.log_summary({"wall_s": time.perf_counter() - t_start, "tracking_s": tracker.seconds,
                             "trained_models": report.trained_models, **_summary_metrics(report.summary)},
                            artifacts=[out_dir / "summary.csv", *(p for p in report.plots if p not in in_stages)])
    tracker.settle_zoos(z.name for z in study.zoos)  # every model is stored now: an interrupted run's zoo runs end
    tracker.finish()
    report.wall_s = time.perf_counter() - t_start
    report.tracking_s = tracker.seconds
    report.tracking_wait_s += tracker.seconds - tracker.background_seconds
