"""The study file: one YAML document -> a validated `Study`.

A study names its zoos (each a `zoos.spec.ZooSpec`), the analysis stages to run over them, the
resources each Ray task asks for, where the store lives and where MLflow logs. Every error names the
key path (`zoos[1].grid.lr[2]`), the value found and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from zoos.spec import ZooSpec
from zoos.store import safe_name


class StudyError(ValueError):
    """A study file that cannot be used; the message names the key path, the value and what is allowed."""


class Resources(BaseModel):
    """What each Ray task asks for. Fractional GPUs let several populations share one GPU."""

    model_config = ConfigDict(extra="forbid")
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    precision: Literal["float32", "bf16"] = "float32"
    compile: bool = Field(False, description="torch.compile each population's program on a GPU: tens of seconds before "
                          "the first step, faster steps for some families in long runs (benchmarks/README.md)")
    max_retries: int = Field(3, ge=0, description="retries of a task whose worker or node died")


class StageSpec(BaseModel):
    """An analysis stage over some zoos of the study; every other key is a setting of that stage."""

    model_config = ConfigDict(extra="allow")
    stage: str
    zoos: list[str] | Literal["all"] = "all"
    items_per_task: int = Field(16, ge=1, description="pairs or models per Ray task")

    @model_validator(mode="after")
    def _settings(self) -> "StageSpec":
        from pipeline.stages import STAGES

        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; available: {', '.join(sorted(STAGES))}")
        try:
            self._parsed = STAGES[self.stage].Settings.model_validate(self.model_extra or {})
        except ValidationError as e:
            raise ValueError(f"stage {self.stage!r}: " + "; ".join(
                f"{'.'.join(map(str, err['loc']))}: {err['msg']} (got {err.get('input')!r})" for err in e.errors())) from None
        return self

    @property
    def settings(self):
        """The stage's validated settings (its own pydantic model)."""
        return self._parsed


class StoredZoo(BaseModel):
    """A zoo already in the store (imported, or trained by another study): analysed, never trained.
    Written `{name: <zoo>, stored: true}`; its task, architecture and models are the store's."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    stored: Literal[True]

    @model_validator(mode="before")
    @classmethod
    def _only_a_name(cls, data: Any) -> Any:
        extra = sorted(set(data) - {"name", "stored"}) if isinstance(data, dict) else []
        if extra:
            raise ValueError(f"a stored zoo (stored: true) takes its name only; its task, architecture and models "
                             f"are the store's, so {', '.join(extra)} cannot be given")
        return data


# Tags of the two kinds of zoo entry; format_study_errors leaves them out of key paths.
_TRAINED, _STORED = "trained zoo", "stored zoo"


def _zoo_kind(v: Any) -> str:
    stored = v.get("stored", False) if isinstance(v, dict) else getattr(v, "stored", False)
    return _TRAINED if stored is False else _STORED


ZooEntry = Annotated[Union[Annotated[ZooSpec, Tag(_TRAINED)], Annotated[StoredZoo, Tag(_STORED)]], Discriminator(_zoo_kind)]


class Study(BaseModel):
    """A whole study: zoos to train (or, `stored: true`, found in the store), stages to run, where results go."""

    model_config = ConfigDict(extra="forbid")
    study: str
    store: str = "zoo-store"
    tracking_uri: str | None = None
    model_runs: Literal["all", "none"] = Field(
        "all", description="an MLflow run per model ('all'), or 'none': zoo, stage and study runs only (each zoo "
                           "run carries its models' final-metric mean and median; per-model metrics stay in the "
                           "store). One run per model costs ~10-20 ms on a single logging thread: past a few GPUs "
                           "of small models that is the bottleneck (benchmarks/README.md, scaling model)")
    output: str | None = Field(None, description="folder for plots and the summary; default runs/<study>")
    data_dir: str | None = None
    max_models: int = Field(100_000, ge=1, description="the most models the study's zoos may hold together; a grid "
                            "beyond it is refused with the counts (raise it on purpose for a bigger study)")
    resources: Resources = Resources()
    zoos: list[ZooEntry] = Field(min_length=1)
    analysis: list[StageSpec] = []

    @field_validator("zoos", mode="before")
    @classmethod
    def _stored_false(cls, v: Any) -> Any:
        """`stored: false` is the default kind, a zoo to train."""
        if isinstance(v, list):
            return [{k: x for k, x in z.items() if k != "stored"} if isinstance(z, dict) and z.get("stored") is False
                    else z for z in v]
        return v

    @property
    def trained_zoos(self) -> list[ZooSpec]:
        """The zoos this study trains (what is not stored yet)."""
        return [z for z in self.zoos if isinstance(z, ZooSpec)]

    @property
    def stored_zoos(self) -> list[StoredZoo]:
        """The zoos this study only analyses: they must be in the store already."""
        return [z for z in self.zoos if isinstance(z, StoredZoo)]

    @field_validator("study")
    @classmethod
    def _study_name(cls, v: str) -> str:
        return safe_name("study", v)

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("store is empty: give a folder or URI for the zoo store (an empty one would write into the "
                             "current folder)")
        return v

    @model_validator(mode="after")
    def _cross_check(self) -> "Study":
        names = [z.name for z in self.zoos]
        for i, name in enumerate(names):
            try:
                safe_name("zoo", name)
            except ValueError as e:
                raise ValueError(f"zoos[{i}].name: {e}") from None
        counts = {z.name: z.model_count() for z in self.trained_zoos}
        if sum(counts.values()) > self.max_models:
            biggest = ", ".join(f"{n}: {c:,}" for n, c in sorted(counts.items(), key=lambda kv: -kv[1])[:3])
            raise ValueError(f"the zoos hold {sum(counts.values()):,} models ({biggest}), more than max_models = "
                             f"{self.max_models:,}; shrink the grids, or set max_models: {sum(counts.values())} to allow it")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"zoo names must be unique; repeated: {sorted(dup)}")
        from pipeline.stages import STAGES

        for i, st in enumerate(self.analysis):
            if st.zoos != "all":
                unknown = [z for z in st.zoos if z not in names]
                if unknown:
                    raise ValueError(f"analysis[{i}].zoos names unknown zoo {unknown[0]!r}; zoos of this study: {names}")
            wanted = getattr(st.settings, "epochs", None)
            if STAGES[st.stage].every_epoch_stored and isinstance(wanted, list):  # zoos already stored: when it runs
                for z in self.stage_zoos(st):
                    kept = z.checkpoint_epochs() if isinstance(z, ZooSpec) else wanted
                    if missing := sorted(set(wanted) - set(kept)):
                        raise ValueError(f"analysis[{i}].epochs: {missing} not stored for zoo {z.name!r}; its checkpoints "
                                         f"are {kept} (add them to its `checkpoints`, or ask for 'last' or 'all')")
        return self

    def stage_zoos(self, stage: StageSpec) -> list[ZooSpec | StoredZoo]:
        return [z for z in self.zoos if stage.zoos == "all" or z.name in stage.zoos]

    def output_dir(self) -> Path:
        return Path(self.output or f"runs/{self.study}")


def _short_repr(value: Any) -> str:
    """A value as it reads in one line of an error: bounded, whatever its size."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = 60, 60, 6, 4, 3
    return r.repr(value)


def format_study_errors(err: ValidationError) -> str:
    """pydantic's errors as `key.path[i]: message (got value)` lines, one per problem."""
    lines = []
    for e in err.errors():
        loc = [p for p in e["loc"] if p not in (_TRAINED, _STORED)]
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {_short_repr(got)})"
        lines.append(f"{path or 'study'}: {msg}{shown}")
    return "\n".join(lines)


def parse_study(data: Any, source: str = "study") -> Study:
    """Validate a parsed YAML document; StudyError lists every problem with its key path."""
    if not isinstance(data, dict):
        raise StudyError(f"{source}: expected a mapping with keys study, zoos, analysis, ...; got {type(data).__name__}")
    try:
        return Study.model_validate(data)
    except ValidationError as e:
        raise StudyError(f"{source} is not a valid study:\n{format_study_errors(e)}") from None


MAX_STUDY_BYTES = 1_000_000
MAX_STUDY_VALUES = 100_000  # values a study file may expand to (YAML aliases can repeat a list exponentially)
MAX_STUDY_DEPTH = 50


def _check_size(data: Any, path: Path) -> None:
    """StudyError when the parsed document (shared YAML anchors counted each time they are used) holds more than
    MAX_STUDY_VALUES values or nests deeper than MAX_STUDY_DEPTH; stops counting at the limit."""
    seen, stack = 0, [(data, 0)]
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_STUDY_VALUES:
            raise StudyError(f"{path}: expands to more than {MAX_STUDY_VALUES:,} values (YAML aliases repeating lists?); "
                             "a study file is smaller (use {range: [start, stop]} for long grids)")
        if depth > MAX_STUDY_DEPTH:
            raise StudyError(f"{path}: nested more than {MAX_STUDY_DEPTH} levels deep; a study file is flatter")
        if isinstance(node, dict):
            stack += [(v, depth + 1) for v in node.values()] + [(k, depth + 1) for k in node]
        elif isinstance(node, list):
            stack += [(v, depth + 1) for v in node]


def load_study(path: str | Path, **overrides: Any) -> Study:
    """Read and validate a study file; `overrides` (store, tracking_uri, ...) replace its top-level keys."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file {str(path)!r} does not exist")
    raw = path.read_bytes()
    if len(raw) > MAX_STUDY_BYTES:
        raise StudyError(f"{path}: {len(raw):,} bytes; a study file is at most {MAX_STUDY_BYTES:,} (is it a study?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StudyError(f"{path}: not a text file (not UTF-8); a study is a YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise StudyError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
    except RecursionError:
        raise StudyError(f"{path}: nested too deeply for a study file") from None
    _check_size(data, path)
    if isinstance(data, dict):
        data.update({k: v for k, v in overrides.items() if v is not None})
    return parse_study(data, source=str(path))
