"""The zoo store: model rows, curves and checkpoints in Arrow/Parquet, queried lazily with polars.

Layout under the root (a local path or a pyarrow filesystem URI such as file://, s3://, gs://):

    symzoo-store.json                      schema version, creation time
    models/<zoo>/<shard>.parquet           one row per model: ids, configs, factors, status, final metrics
    curves/<zoo>/<shard>.parquet           one row per (model, epoch) for every epoch: metrics
    checkpoints/<zoo>/<shard>.parquet      one row per (model, stored epoch): metrics, no weights
    checkpoints/<zoo>/<shard>.arrow        the same rows in the same order: one FixedSizeList<float32>
                                           column per state_dict key, one record batch per epoch
    analysis/<stage>/<shard>.parquet       analysis results
    manifest/<zoo>/<shard>.json            sha256 + size of every file of the shard, written last

Weights live in uncompressed Arrow IPC because a memory-mapped IPC file hands out layer k of N models
as one [N, *shape] array without reading or copying anything (benchmarks/store_bench.py measures it
against Parquet); everything else is Parquet, which every tool reads. Checkpoint rows are ordered
epoch-major (all models at the first stored epoch, then the next), so one epoch of one shard is one
contiguous block. A shard is complete iff its manifest exists, and readers only read complete shards.
Every file a query reads is first checked against its manifest (size, and sha256 once per Store
instance unless check="size"): a damaged file raises StoreError naming it and its models, or is
skipped with a warning when the store is opened with skip_damaged=True.
"""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import torch

from zoos.population import PopulationResult, population_id

SCHEMA_VERSION = 1
MARKER = "symzoo-store.json"
ANALYSIS_MANIFESTS = "manifest/@analysis"  # '@' is not allowed in zoo names, so no zoo can collide
_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]*$")


class StoreError(ValueError):
    """A missing, newer or damaged store, or a bad query argument; the message says which and what to do."""


class DamagedShardWarning(UserWarning):
    """A damaged file was skipped by a store opened with skip_damaged=True."""


MAX_NAME = 100  # characters of a zoo, stage, study or shard name
GCS_RETRY_S = 30  # how long a gs:// store's requests retry (Arrow's default, 15 minutes, reads as a hang)


def _from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem and path for a store URI; a gs:// one retries for GCS_RETRY_S unless the URI says."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(uri)
    if parts.scheme in ("gs", "gcs") and "retry_limit_seconds" not in parse_qs(parts.query):
        uri += ("&" if parts.query else "?") + f"retry_limit_seconds={GCS_RETRY_S}"
    return pafs.FileSystem.from_uri(uri)


def _brief(e: BaseException, limit: int = 300) -> str:
    """An error's first line, cut after its last whole sentence within `limit` characters (a cloud client's
    message runs to pages)."""
    line = next((text for text in str(e).splitlines() if text.strip()), type(e).__name__)
    if len(line) <= limit:
        return line
    end = line.rfind(". ", 0, limit)
    return line[: end + 1] if end > 0 else line[:limit] + " ..."


def safe_name(kind: str, value: Any) -> str:
    """Return `value` if it is a safe single path component (zoo, stage or shard name), else raise."""
    if not isinstance(value, str) or not _SAFE.match(value) or ".." in value:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise StoreError(
            f"{kind} name {shown} is not a safe path component; "
            "use letters, digits and _ . = + - (not starting with . or -, no '..' or '/')"
        )
    if len(value) > MAX_NAME:
        raise StoreError(f"{kind} name {value[:40]!r}... has {len(value)} characters; at most {MAX_NAME} "
                         "(it becomes part of file names, which file systems cap)")
    return value


# ---------------------------------------------------------------------------------------------------
# typed tables from row dicts


def _column_type(values: list[Any]) -> pa.DataType:
    """The Arrow type of one models-table column: ints int64, floats float64, bools, else strings."""
    present = [v for v in values if v is not None]
    if not present:
        return pa.string()
    if all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in present):
        return pa.int64()
    if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in present):
        return pa.float64()
    return pa.string()


def _cell(value: Any, typ: pa.DataType) -> Any:
    if value is None:
        return None
    if typ == pa.string() and not isinstance(value, str):
        return json.dumps(value, sort_keys=True, default=str) if isinstance(value, (dict, list, tuple)) else str(value)
    if typ == pa.float64():
        return float(value)
    if typ == pa.int64():
        return int(value)
    return value


def rows_to_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """A typed Arrow table from row dicts (union of keys, first-seen order); dicts/lists become JSON strings."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        typ = _column_type(values)
        columns[name] = pa.array([_cell(v, typ) for v in values], type=typ)
    return pa.table(columns)


# ---------------------------------------------------------------------------------------------------
# the stacked weights handed out by `Store.to_torch`


@dataclass
class StackedWeights:
    """`{key: tensor [N, *shape]}` for N models plus their ids in row order; unpacks as (tensors, model_ids).

    Tensors read from one local shard share memory with the memory-mapped file: they are read-only
    views (clone before writing in place).
    """

    tensors: dict[str, torch.Tensor]
    model_ids: list[str]
    epochs: list[int] = field(default_factory=list)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.tensors, self.model_ids))

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __len__(self) -> int:
        return len(self.model_ids)


# ---------------------------------------------------------------------------------------------------


class Store:
    """A zoo store rooted at a local path or a pyarrow filesystem URI.

    Opening writes nothing: the store's marker file appears with its first shard. Reading a store
    that does not exist, or one written by a newer schema, raises StoreError. `check` is how files
    are checked before they are read ("sha256": size and hash, once per file per instance; "size":
    size only, for the fastest first read); `skip_damaged` reads around damaged files instead of raising.
    """

    def __init__(self, root: str, filesystem: pafs.FileSystem | None = None, *,
                 skip_damaged: bool = False, check: str = "sha256"):
        if check not in ("sha256", "size"):
            raise StoreError(f"check={check!r} is not allowed; use 'sha256' or 'size'")
        self.skip_damaged, self.check = bool(skip_damaged), check
        self._checked: dict[tuple, str | None] = {}
        root = str(root)
        if filesystem is not None:
            self.fs, self.root = filesystem, root
        elif "://" in root:
            try:
                self.fs, self.root = _from_uri(root)
            except (pa.ArrowException, ValueError) as e:  # an unknown scheme or URI option
                raise StoreError(f"store {root!r}: {e}; a store is a local path or a pyarrow filesystem URI "
                                 "(file://, s3://, gs://, hdfs://)") from None
        else:
            self.fs, self.root = pafs.LocalFileSystem(), posixpath.abspath(root)
        self.uri = root
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.opened: list[str] = []  # relative path of every data file opened for reading, in order
        try:
            info = self._info(MARKER)
        except (OSError, pa.ArrowException) as e:  # a cloud store unreachable, or refusing its credentials
            raise StoreError(f"cannot read the store at {root!r}: {_brief(e)}") from None
        if info.type == pafs.FileType.File:
            self._check_marker()

    # -- paths and raw IO --------------------------------------------------------------------------

    def _path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def _info(self, rel: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self._path(rel))

    def _check_marker(self) -> dict:
        with self.fs.open_input_stream(self._path(MARKER)) as f:
            try:
                meta = json.loads(f.read().decode())
                version = int(meta["schema_version"])
            except (ValueError, KeyError, TypeError) as e:
                raise StoreError(f"{self.uri}/{MARKER} is not a symzoo store marker ({e})") from None
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store {self.uri} has schema version {version}; this symzoo reads versions up to "
                f"{SCHEMA_VERSION}: upgrade symzoo to read it"
            )
        return meta

    @property
    def exists(self) -> bool:
        return self._info(MARKER).type == pafs.FileType.File

    def _require(self) -> None:
        if not self.exists:
            raise StoreError(f"no symzoo store at {self.uri} (no {MARKER}); write a population there first")

    def _ensure_marker(self) -> None:
        self.fs.create_dir(self.root, recursive=True)
        if not self.exists:
            meta = {"schema_version": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            self._write_bytes(MARKER, json.dumps(meta, indent=1).encode())
        else:
            self._check_marker()

    def _write_bytes(self, rel: str, data: bytes | pa.Buffer) -> dict[str, Any]:
        """Write a whole file to a temporary name beside it, rename it into place; return its sha256 and size."""
        path = self._path(rel)
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        tmp = f"{path}.tmp-{time.time_ns()}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, path)
        view = memoryview(data) if isinstance(data, (bytes, bytearray)) else memoryview(data)
        return {"sha256": hashlib.sha256(view).hexdigest(), "size": len(view)}

    def _delete(self, rel: str) -> None:
        if self._info(rel).type == pafs.FileType.File:
            self.fs.delete_file(self._path(rel))

    def _read_json(self, rel: str) -> dict:
        with self.fs.open_input_stream(self._path(rel)) as f:
            raw = f.read()
        try:
            return json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"damaged file {self._path(rel)} ({type(e).__name__}: {str(e)[:120]}); run `symzoo verify "
                             f"{self.uri}` to list every damaged file; `symzoo repair {self.uri}`, then a re-run of the study, "
                             "rewrites it") from None

    def _list(self, rel_dir: str, suffix: str) -> list[str]:
        """Relative paths of files under `rel_dir` (recursively) ending with `suffix`, sorted."""
        sel = pafs.FileSelector(self._path(rel_dir), recursive=True, allow_not_found=True)
        for attempt in range(5):
            try:
                infos = self.fs.get_file_info(sel)
                break
            except FileNotFoundError:
                # Seen once with two stage tasks writing a new stage's first shards at the same moment: the
                # listing failed although allow_not_found was set. A folder that is not there has nothing to
                # list; one that is there changed under the listing, and the next listing sees it settled.
                if self._info(rel_dir).type == pafs.FileType.NotFound:
                    return []
                if attempt == 4:
                    raise
                time.sleep(0.01 * (attempt + 1))
        out = []
        for info in infos:
            if info.type == pafs.FileType.File and info.path.endswith(suffix):
                out.append(posixpath.relpath(info.path, self.root))
        return sorted(out)

    def _damage(self, rel: str, rec: dict) -> str | None:
        """What is wrong with a shard file against its manifest record (None: intact); memoised per file version."""
        info = self._info(rel)
        key = (rel, info.size, info.mtime_ns)
        if key not in self._checked:
            if info.type != pafs.FileType.File:
                return "missing"
            if self.check == "size":
                self._checked[key] = None if info.size == rec["size"] else f"size {info.size} != {rec['size']} recorded"
            else:
                self._checked[key] = _check_file(self.fs, self._path(rel), rec)
        return self._checked[key]

    def _usable(self, manifest: dict, rel: str) -> bool:
        """True if a shard file may be read; a damaged one raises StoreError, or is skipped with skip_damaged."""
        problem = self._damage(rel, manifest["files"][rel])
        if problem is None:
            return True
        ids = manifest.get("model_ids", [])
        shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
        where = f"{self.uri}/{rel} ({problem}; {len(ids)} models: {shown})"
        if self.skip_damaged:
            warnings.warn(f"skipping damaged file {where}", DamagedShardWarning, stacklevel=3)
            return False
        raise StoreError(
            f"damaged file {where}. `symzoo verify {self.uri}` lists every damaged file; `symzoo repair {self.uri}` "
            "drops the damaged shards and a re-run of the study rewrites them; or open the store with "
            "skip_damaged=True to read around it"
        )

    def _sweep_partial(self, kinds: Sequence[str], zoo: str, shard: str) -> None:
        """Delete temporary files of this shard left by a writer that died before renaming them into place."""
        for kind in kinds:
            for rel in self._list(f"{kind}/{zoo}", ""):
                name = posixpath.basename(rel)
                if name.startswith(shard + ".") and ".tmp-" in name:
                    self._delete(rel)

    # -- writing -----------------------------------------------------------------------------------

    def write_population(self, result: PopulationResult) -> str:
        """Write a trained population as one shard (replacing a shard of the same name); return the shard name."""
        result.validate()
        if not result.models:
            raise StoreError("population has no models; nothing to write")
        zoos_ = {m.get("zoo") for m in result.models}
        if len(zoos_) != 1:
            raise StoreError(f"a population belongs to one zoo; its model rows name {sorted(map(str, zoos_))}")
        zoo = safe_name("zoo", zoos_.pop())
        shard = safe_name("shard", result.shard)
        self._ensure_marker()
        manifest_rel = f"manifest/{zoo}/{shard}.json"
        self._delete(manifest_rel)  # the shard is incomplete from here until its new manifest is written
        self._sweep_partial(("models", "curves", "checkpoints", "manifest"), zoo, shard)

        ids = result.ids
        n, c = len(ids), len(result.epochs)
        files: dict[str, dict] = {}

        models = rows_to_table([{**m, "shard": shard} for m in result.models])
        files[f"models/{zoo}/{shard}.parquet"] = self._write_parquet(f"models/{zoo}/{shard}.parquet", models)

        if result.curves:
            e = next(iter(result.curves.values())).shape[1]
            # model-major: model i's curve is rows i * e .. i * e + e - 1
            curves = pa.table(
                {
                    "model_id": pa.array(np.repeat(ids, e)),
                    "zoo": pa.array([zoo] * (n * e)),
                    "epoch": pa.array(np.tile(np.arange(e, dtype=np.int64), n)),
                    **{k: pa.array(np.asarray(v, dtype=np.float64).reshape(-1)) for k, v in result.curves.items()},
                }
            )
            files[f"curves/{zoo}/{shard}.parquet"] = self._write_parquet(f"curves/{zoo}/{shard}.parquet", curves)

        if c:
            # epoch-major rows: row j * n + i is model i at stored epoch j
            ids_col = pa.array(np.tile(np.asarray(ids, dtype=object), c), type=pa.string())
            ep_col = pa.array(np.repeat(np.asarray(result.epochs, dtype=np.int64), n))
            meta = pa.table(
                {
                    "model_id": ids_col,
                    "zoo": pa.array([zoo] * (n * c)),
                    "epoch": ep_col,
                    **{k: pa.array(np.asarray(v, dtype=np.float64).T.reshape(-1)) for k, v in result.metrics.items()},
                }
            )
            files[f"checkpoints/{zoo}/{shard}.parquet"] = self._write_parquet(
                f"checkpoints/{zoo}/{shard}.parquet", meta
            )
            if result.weights:
                rel = f"checkpoints/{zoo}/{shard}.arrow"
                files[rel] = self._write_bytes(rel, _weights_ipc(ids, result.epochs, result.weights))

        manifest = {
            "schema_version": SCHEMA_VERSION,
            "zoo": zoo,
            "shard": shard,
            "model_ids": ids,
            "epochs": list(map(int, result.epochs)),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
        }
        self._write_bytes(manifest_rel, json.dumps(manifest, indent=1).encode())
        return shard

    def remove_models(self, zoo: str, ids: set[str], keep: Sequence[str] = ()) -> int:
        """Remove the copies of the models `ids` that the zoo's complete shards hold, but the shards named in `keep`
        (a re-import's own): a shard holding only such models is dropped; one holding others too is first written
        again without them (under its remaining models' shard name), then dropped, so a writer dying part-way
        leaves a model twice at worst, never lost. Returns the copies removed."""
        hit = [(m, {i for i in m["model_ids"] if i in ids}) for m in self.manifests(zoo) if m["shard"] not in keep]
        hit = [(m, held) for m, held in hit if held]
        for m, held in hit:  # a shard written again is read whole: refused before anything changes if damaged
            if len(held) < len(m["model_ids"]):
                for rel in m["files"]:
                    if not self._usable(m, rel):
                        raise StoreError(f"{self.uri}/{rel} is damaged: `symzoo repair {self.uri}` drops its shard first")
        for m, held in hit:
            self._remove_from_shard(m, held)
        return sum(len(held) for _, held in hit)

    def _remove_from_shard(self, manifest: dict, ids: set[str]) -> None:
        """Drop a shard, first written again without the models `ids` where it holds others too."""
        if len(ids) < len(manifest["model_ids"]):
            self._write_without(manifest, ids)
        self._drop_shard(f"manifest/{manifest['zoo']}/{manifest['shard']}.json", list(manifest["files"]))

    def _write_without(self, manifest: dict, ids: set[str]) -> str:
        """Write the shard of `manifest` again without the models `ids`, as a new complete shard; return its name."""
        zoo = manifest["zoo"]
        keep = [i for i in manifest["model_ids"] if i not in ids]
        shard = population_id(keep)
        manifest_rel = f"manifest/{zoo}/{shard}.json"
        self._delete(manifest_rel)
        dropped = pa.array(sorted(ids), type=pa.string())
        files: dict[str, dict] = {}
        for rel in manifest["files"]:
            new_rel = f"{posixpath.dirname(rel)}/{shard}{rel[rel.rindex('.'):]}"
            if rel.endswith(".arrow"):  # one record batch an epoch, as written
                reader = self._open_ipc(rel)
                sink = pa.BufferOutputStream()
                with ipc.new_file(sink, reader.schema) as writer:
                    for j in range(reader.num_record_batches):
                        batch = reader.get_batch(j)
                        writer.write_batch(batch.filter(pc.invert(pc.is_in(batch["model_id"], dropped))))
                files[new_rel] = self._write_bytes(new_rel, sink.getvalue())
            else:
                table = pq.read_table(self._path(rel), filesystem=self.fs)
                table = table.filter(pc.invert(pc.is_in(table["model_id"], dropped)))
                if "shard" in table.column_names:  # the models table names each row's shard
                    table = table.set_column(table.column_names.index("shard"), "shard", pa.array([shard] * table.num_rows))
                files[new_rel] = self._write_parquet(new_rel, table)
        new = {**manifest, "shard": shard, "model_ids": keep, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
        self._write_bytes(manifest_rel, json.dumps(new, indent=1).encode())
        return shard

    def _drop_shard(self, manifest_rel: str, files: Sequence[str]) -> None:
        """Delete a shard: its manifest first (the shard is then invisible to readers), then its files."""
        self._delete(manifest_rel)
        for rel in files:
            self._delete(rel)

    def _write_parquet(self, rel: str, table: pa.Table) -> dict[str, Any]:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", row_group_size=64 * 1024)
        return self._write_bytes(rel, sink.getvalue())

    def write_analysis(self, stage: str, shard: str, rows_or_table: Any) -> str:
        """Write one shard of an analysis stage's results (row dicts, an Arrow table or a polars frame)."""
        stage, shard = safe_name("stage", stage), safe_name("shard", shard)
        if isinstance(rows_or_table, pa.Table):
            table = rows_or_table
        elif isinstance(rows_or_table, pl.DataFrame):
            table = rows_or_table.to_arrow()
        elif isinstance(rows_or_table, (list, tuple)):
            table = pa.Table.from_pylist(list(rows_or_table))
        else:
            raise StoreError(
                f"analysis rows for stage {stage!r} are a {type(rows_or_table).__name__}; "
                "pass a list of dicts, a pyarrow.Table or a polars.DataFrame"
            )
        self._ensure_marker()
        manifest_rel = f"{ANALYSIS_MANIFESTS}/{stage}/{shard}.json"
        self._delete(manifest_rel)
        self._sweep_partial(("analysis", ANALYSIS_MANIFESTS), stage, shard)
        rel = f"analysis/{stage}/{shard}.parquet"
        files = {rel: self._write_parquet(rel, table)}
        ids = table.column("model_id").to_pylist() if "model_id" in table.column_names else []
        manifest = {"schema_version": SCHEMA_VERSION, "stage": stage, "shard": shard, "model_ids": ids, "files": files}
        self._write_bytes(manifest_rel, json.dumps(manifest, indent=1).encode())
        return shard

    # -- manifests ---------------------------------------------------------------------------------

    def manifests(self, zoo: str | None = None) -> list[dict]:
        """The manifests of complete population shards (optionally of one zoo), sorted by (zoo, shard)."""
        self._require()
        base = "manifest" if zoo is None else f"manifest/{safe_name('zoo', zoo)}"
        out = []
        for rel in self._list(base, ".json"):
            if rel.startswith(ANALYSIS_MANIFESTS + "/"):
                continue
            out.append(self._read_json(rel))
        return sorted(out, key=lambda m: (m["zoo"], m["shard"]))

    def _analysis_manifests(self, stage: str | None = None) -> list[dict]:
        self._require()
        base = ANALYSIS_MANIFESTS if stage is None else f"{ANALYSIS_MANIFESTS}/{safe_name('stage', stage)}"
        return [self._read_json(rel) for rel in self._list(base, ".json")]

    def stored_ids(self, zoo: str | None = None) -> set[str]:
        """Ids of the models whose shard is complete (has a manifest); an empty set for a store not yet written."""
        if not self.exists:
            return set()
        return {i for m in self.manifests(zoo) for i in m["model_ids"]}

    def zoos(self) -> list[str]:
        """Names of the zoos with at least one complete shard."""
        return sorted({m["zoo"] for m in self.manifests()})

    def stages(self) -> list[str]:
        """Names of the analysis stages with at least one complete shard."""
        return sorted({m["stage"] for m in self._analysis_manifests()})

    # -- queries -----------------------------------------------------------------------------------

    def _scan(self, rels: list[str]) -> pl.LazyFrame:
        """One LazyFrame over Parquet files (schemas may differ between shards: missing columns are null)."""
        self.opened += rels
        if not rels:
            return pl.LazyFrame({"model_id": pl.Series([], dtype=pl.String)})
        if self.local:
            frames = [pl.scan_parquet(self._path(rel)) for rel in rels]
        else:
            frames = [pl.from_arrow(pq.read_table(self._path(rel), filesystem=self.fs)).lazy() for rel in rels]
        return frames[0] if len(frames) == 1 else pl.concat(frames, how="diagonal_relaxed")

    def _files(self, kind: str, zoo: str | None = None, suffix: str = ".parquet") -> list[str]:
        return [rel for m in self.manifests(zoo) for rel in m["files"]
                if rel.startswith(kind + "/") and rel.endswith(suffix) and self._usable(m, rel)]

    def models(self, zoo: str | None = None) -> pl.LazyFrame:
        """The models table: one row per model of every complete shard."""
        return self._scan(self._files("models", zoo))

    def curves(self, zoo: str | None = None) -> pl.LazyFrame:
        """Every epoch's metrics: one row per (model_id, epoch), epoch 0 = at initialisation."""
        return self._scan(self._files("curves", zoo))

    def analysis(self, stage: str) -> pl.LazyFrame:
        """The results of one analysis stage, all complete shards."""
        return self._scan([rel for m in self._analysis_manifests(stage) for rel in m["files"] if self._usable(m, rel)])

    def checkpoints(
        self, columns: Sequence[str] | str | None = None, epochs: Sequence[int] | str | None = None, zoo: str | None = None
    ) -> pl.LazyFrame:
        """(model_id, zoo, epoch, metrics...) per stored checkpoint, plus the weight columns asked for.

        `columns`: None (metadata only: no weight file is opened), a list of state_dict keys, or "all".
        `epochs`: None (all), a list of epochs, or "last" (each shard's last stored epoch).
        """
        if columns is None:
            frame = self._scan(self._files("checkpoints", zoo))
            if epochs is None:
                return frame
            if epochs == "last":
                last = pl.col("epoch") == pl.col("epoch").max().over("model_id")
                return frame.filter(last)
            return frame.filter(pl.col("epoch").is_in(list(epochs)))
        frames = []
        for m in self.manifests(zoo):
            arrow = [rel for rel in m["files"] if rel.endswith(".arrow")]
            if not arrow:
                continue
            batches = _pick_epochs(m["epochs"], epochs)
            meta_rel = arrow[0][: -len(".arrow")] + ".parquet"
            if not batches or not (self._usable(m, arrow[0]) and self._usable(m, meta_rel)):
                continue
            reader = self._open_ipc(arrow[0])
            keys = _weight_keys(reader.schema) if columns == "all" else list(_as_list(columns, "columns"))
            _check_keys(keys, reader.schema, arrow[0])
            weights = pa.Table.from_batches([reader.get_batch(b) for b in batches]).select(keys)
            self.opened.append(meta_rel)
            meta = pq.read_table(self._path(meta_rel), filesystem=self.fs)
            n = len(m["model_ids"])
            rows = np.concatenate([np.arange(b * n, (b + 1) * n) for b in batches])
            meta = meta.take(pa.array(rows))
            frames.append(pl.from_arrow(meta).hstack(pl.from_arrow(weights)))
        if not frames:
            raise StoreError(f"no stored weights match epochs={epochs!r} in store {self.uri}")
        return pl.concat(frames, how="diagonal_relaxed").lazy()

    def _open_ipc(self, rel: str) -> ipc.RecordBatchFileReader:
        """Open a weight file: memory-mapped when local (zero-copy), a random-access reader otherwise."""
        path = self._path(rel)
        if self.local:
            source = pa.memory_map(path, "r")
        else:
            source = self.fs.open_input_file(path)
        self.opened.append(rel)
        return ipc.open_file(source)

    # -- weights as tensors ------------------------------------------------------------------------

    def to_torch(
        self,
        filter: pl.Expr | None = None,  # noqa: A002 - the documented keyword
        epoch: int | str = "last",
        keys: Sequence[str] | None = None,
        device: str | torch.device | None = None,
    ) -> StackedWeights:
        """Stacked weights `{key: [N, *shape]}` of the models matching `filter` (a polars expression on
        the models table) at `epoch` ("last" = each shard's last stored epoch, or an int).

        Within one local shard each layer is a zero-copy view of the memory-mapped file (a gather, one
        copy per layer, when the filter keeps only part of the shard); shards are joined by one
        concatenation per layer. Returns StackedWeights(tensors, model_ids, epochs), which unpacks as
        `tensors, ids = store.to_torch(...)`.
        """
        wanted = None
        if filter is not None:
            wanted = set(self.models().filter(filter).select("model_id").collect()["model_id"].to_list())
        return self._stacked(wanted, epoch, keys, device)

    def _stacked(
        self, wanted: set[str] | None, epoch: int | str, keys: Sequence[str] | None, device=None
    ) -> StackedWeights:
        if epoch != "last" and not isinstance(epoch, (int, np.integer)):
            raise StoreError(f"epoch must be 'last' or an int, got {epoch!r}")
        parts: list[dict[str, np.ndarray]] = []
        ids: list[str] = []
        epochs: list[int] = []
        layout: tuple | None = None
        for m in self.manifests():
            if wanted is not None and wanted.isdisjoint(m["model_ids"]):
                continue
            arrow = [rel for rel in m["files"] if rel.endswith(".arrow")]
            batches = _pick_epochs(m["epochs"], epoch if epoch == "last" else [int(epoch)])
            if not arrow or not batches or not self._usable(m, arrow[0]):
                continue
            reader = self._open_ipc(arrow[0])
            batch = reader.get_batch(batches[0])
            shard_keys = _weight_keys(reader.schema) if keys is None else list(keys)
            _check_keys(shard_keys, reader.schema, arrow[0])
            shapes = tuple((k, _shape(reader.schema.field(k))) for k in shard_keys)
            if layout is None:
                layout = shapes
            elif shapes != layout:
                raise StoreError(
                    f"the selected models have different weight layouts (shard {m['shard']} of zoo {m['zoo']} "
                    "differs from the first); filter to one architecture, e.g. pl.col('zoo') == ..."
                )
            batch_ids = batch.column("model_id").to_pylist()
            take = None
            if wanted is not None and not wanted.issuperset(batch_ids):
                take = np.array([i for i, x in enumerate(batch_ids) if x in wanted], dtype=np.int64)
                batch_ids = [batch_ids[i] for i in take]
            part = {}
            for k, shape in shapes:
                flat = batch.column(k).flatten().to_numpy(zero_copy_only=True)
                arr = flat.reshape(len(batch), *shape)
                part[k] = arr if take is None else arr[take]
            parts.append(part)
            ids += batch_ids
            epochs += [m["epochs"][batches[0]]] * len(batch_ids)
        if not parts:
            what = "the store" if wanted is None else f"{len(wanted)} models matching the filter"
            raise StoreError(f"no stored weights at epoch={epoch!r} for {what} ({self.uri})")
        tensors = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for k, _ in layout:
                ts = [torch.from_numpy(p[k]) for p in parts]
                t = ts[0] if len(ts) == 1 else torch.cat(ts)
                tensors[k] = t if device is None else t.to(device)
        return StackedWeights(tensors, ids, epochs)

    def state_dict(self, model_id: str, epoch: int | None = None) -> dict[str, torch.Tensor]:
        """One model's state dict at `epoch` (None = its last stored epoch), as tensors it owns."""
        stacked = self._stacked({model_id}, "last" if epoch is None else epoch, None)
        if model_id not in stacked.model_ids:
            raise StoreError(f"model {model_id!r} has no stored checkpoint at epoch={epoch!r}")
        i = stacked.model_ids.index(model_id)
        return {k: v[i].clone() for k, v in stacked.tensors.items()}

    def _row(self, model_id: str) -> dict[str, Any]:
        row = self.models().filter(pl.col("model_id") == model_id).collect()
        if row.height == 0:
            raise StoreError(f"model_id {model_id!r} is not in store {self.uri}")
        return row.row(0, named=True)

    def load_task(self, model_id: str, data_dir: str | None = None) -> Any:
        """The task a stored model was trained on, as it was configured: `task.load("test")` gives the data as the
        model saw it (scaled, split and transformed alike), so `task.metric(model(x), y)` is the stored metric.
        File-backed tasks read from `data_dir` (else the option they were trained with, else $SYMZOO_DATA)."""
        from tasks import task_with_data

        r = self._row(model_id)
        options = json.loads(r["task_config"] or "{}")
        name = options.pop("name", r["task"])
        if data_dir is not None:
            options.pop("data_dir", None)  # the folder asked for now, not the trained-with one
        return task_with_data(name, options, data_dir)

    def load_model(self, model_id: str, epoch: int | None = None) -> torch.nn.Module:
        """Rebuild a stored model (task + architecture from its row) and load its weights strictly."""
        from zoos.archs import build_arch

        r = self._row(model_id)
        if r.get("arch") in (None, "imported"):
            raise StoreError(
                f"model {model_id!r} was imported without a known architecture; "
                "use store.state_dict(model_id) or store.to_torch() for its weights"
            )
        task = self.load_task(model_id)
        module = build_arch(r["arch"], task, **json.loads(r["arch_config"] or "{}"))
        module.load_state_dict(self.state_dict(model_id, epoch), strict=True)
        return module.eval()

    # -- integrity ---------------------------------------------------------------------------------

    def verify(self) -> list[dict[str, Any]]:
        """Check every manifest's files (present, size, sha256); list problems with the affected model ids.

        Also reports data files that belong to no complete shard (left by an interrupted write), and each shard
        holding models that a newer shard of its zoo holds too (`duplicates`: their ids).
        """
        self._require()
        problems: list[dict[str, Any]] = []
        listed: set[str] = set()
        shards: list[dict] = []  # the population shards' manifests
        manifest_rels = self._list("manifest", ".json")
        for rel in manifest_rels:
            try:
                m = self._read_json(rel)
                files = m["files"]
            except (ValueError, KeyError, OSError) as e:
                problems.append({"file": rel, "shard": posixpath.basename(rel)[:-5], "model_ids": [], "manifest": rel,
                                 "problem": f"unreadable manifest: {e}"})
                continue
            ids = m.get("model_ids", [])
            if not rel.startswith(ANALYSIS_MANIFESTS + "/"):
                shards.append(m)
            for frel, rec in files.items():
                listed.add(frel)
                problem = _check_file(self.fs, self._path(frel), rec)
                if problem:
                    problems.append({"file": frel, "shard": m["shard"], "model_ids": ids, "manifest": rel, "problem": problem})
        problems += self._older_copies(shards)
        for kind in ("models", "curves", "checkpoints", "analysis"):
            for frel in self._list(kind, ""):
                if frel not in listed:
                    problems.append(
                        {"file": frel, "shard": posixpath.basename(frel).split(".")[0], "model_ids": [], "manifest": None,
                         "problem": "not part of any complete shard (no manifest lists it)"}
                    )
        for frel in self._list("manifest", ""):
            if ".tmp-" in posixpath.basename(frel):
                problems.append({"file": frel, "shard": posixpath.basename(frel).split(".")[0], "model_ids": [],
                                 "manifest": None, "problem": "a manifest an interrupted write left unfinished"})
        return problems

    def repair(self) -> list[dict[str, Any]]:
        """Drop what `verify` finds damaged so that re-running the study rewrites it: a damaged shard's manifest
        first (the shard is then invisible: its models count as missing), then its files; stray and unfinished
        files; then the older copies of models stored twice (a shard of only those dropped, one holding others
        too written again without them). Returns the problems it mended. Other shards are not touched."""
        problems = [p for p in self.verify() if not p.get("duplicates")]
        manifests = {p["manifest"] for p in problems if p["manifest"]}
        for rel in sorted(manifests):
            try:
                files = list(self._read_json(rel)["files"])
            except (ValueError, KeyError, OSError):
                files = []
            self._drop_shard(rel, files)
        for p in problems:
            if p["manifest"] is None and self._info(p["file"]).type == pafs.FileType.File:
                self.fs.delete_file(self._path(p["file"]))
        self._checked = {}  # what was checked is gone
        twice = self._older_copies(self.manifests())  # the damaged gone: the newest intact copy is the one kept
        for p in twice:
            self._remove_from_shard(self._read_json(p["file"]), set(p["duplicates"]))
        return problems + twice

    @staticmethod
    def _older_copies(manifests: Sequence[dict]) -> list[dict[str, Any]]:
        """A problem for each shard holding models that a newer shard of its zoo holds too (`duplicates`: their ids)."""
        holders: dict[tuple[str, str], list[tuple[str, str]]] = {}  # (zoo, model) -> [(written, shard)]
        for m in manifests:
            for i in m.get("model_ids", []):
                holders.setdefault((m["zoo"], i), []).append((m.get("written", ""), m["shard"]))
        older: dict[tuple[str, str], list[str]] = {}  # (zoo, shard) -> its models held by a newer shard too
        for (zoo, i), held in holders.items():
            for _, shard in sorted(held)[:-1]:
                older.setdefault((zoo, shard), []).append(i)
        return [{"file": f"manifest/{zoo}/{shard}.json", "shard": shard, "model_ids": ids, "manifest": None, "duplicates": ids,
                 "problem": f"{len(ids)} of its models are held by a newer shard of the zoo too (imported twice before "
                            "symzoo kept one copy): the older copies"} for (zoo, shard), ids in sorted(older.items())]

    def size_on_disk(self, zoo: str | None = None) -> int:
        """Bytes of all files of complete shards (optionally of one zoo), from their manifests."""
        return sum(rec["size"] for m in self.manifests(zoo) for rec in m["files"].values())


# ---------------------------------------------------------------------------------------------------
# helpers


def _weights_ipc(ids: list[str], epochs: list[int], weights: dict[str, np.ndarray]) -> pa.Buffer:
    """Serialise weights [N, C, *shape] as an uncompressed IPC file: one record batch per stored epoch."""
    n = len(ids)
    fields = [pa.field("model_id", pa.string()), pa.field("epoch", pa.int64())]
    for k, a in weights.items():
        size = int(math.prod(a.shape[2:]))
        fields.append(pa.field(k, pa.list_(pa.float32(), size), metadata={"shape": json.dumps(list(a.shape[2:]))}))
    schema = pa.schema(fields, metadata={"epochs": json.dumps(list(map(int, epochs)))})
    ids_arr = pa.array(ids, type=pa.string())
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, schema) as writer:
        for j, ep in enumerate(epochs):
            cols = [ids_arr, pa.array(np.full(n, ep, dtype=np.int64))]
            for k, a in weights.items():
                block = np.ascontiguousarray(a[:, j], dtype=np.float32).reshape(-1)
                cols.append(pa.FixedSizeListArray.from_arrays(pa.array(block), int(block.size // max(n, 1))))
            writer.write_batch(pa.record_batch(cols, schema=schema))
    return sink.getvalue()


def _weight_keys(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if pa.types.is_fixed_size_list(f.type)]


def _shape(f: pa.Field) -> tuple[int, ...]:
    return tuple(json.loads(f.metadata[b"shape"]))


def _check_keys(keys: Sequence[str], schema: pa.Schema, where: str) -> None:
    have = _weight_keys(schema)
    for k in keys:
        if k not in have:
            raise StoreError(f"weight column {k!r} is not stored in {where}; stored keys: {', '.join(have)}")


def _as_list(value: Any, name: str) -> list:
    if isinstance(value, str):
        return [value]
    try:
        return list(value)
    except TypeError:
        raise StoreError(f"{name} must be a list, got {value!r}") from None


def _pick_epochs(stored: list[int], epochs: Sequence[int] | str | None) -> list[int]:
    """Batch indices of a shard's stored epochs that match `epochs` (None = all, "last", or a list)."""
    if epochs is None:
        return list(range(len(stored)))
    if epochs == "last":
        return [len(stored) - 1] if stored else []
    if isinstance(epochs, str):
        raise StoreError(f"epochs must be None, 'last' or a list of ints, got {epochs!r}")
    want = {int(e) for e in _as_list(epochs, "epochs")}
    return [i for i, e in enumerate(stored) if e in want]


def _check_file(fs: pafs.FileSystem, path: str, rec: dict) -> str | None:
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return "missing"
    if info.size != rec["size"]:
        return f"size {info.size} != {rec['size']} recorded"
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    if h.hexdigest() != rec["sha256"]:
        return "sha256 mismatch (content changed or damaged)"
    return None
