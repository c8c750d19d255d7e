"""The study file: one YAML document -> a validated `Study`.

A study names its zoos (each a `zoos.spec.ZooSpec`), the analysis stages to run over them, the
resources each Ray task asks for, where the store lives and where MLflow logs. Every error names the
key path (`zoos[1].grid.lr[2]`), the value found and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from zoos.spec import ZooSpec
from zoos.store import safe_name


class StudyError(ValueError):
    """A study file that cannot be used; the message names the key path, the value and what is allowed (a line a
    problem)."""


MAX_EPOCHS = 1_000_000  # epochs a zoo may train: more is a typo (1e21), not a plan
MAX_DEPTH = 1_000  # layers an architecture's `*depth` config may ask for: checking one builds every layer


def _err(loc: tuple, message: str) -> InitErrorDetails:
    """A problem whose message is final (it shows the value itself): format_study_errors prints it as it is."""
    return InitErrorDetails(type=PydanticCustomError("study", message), loc=loc, input=None)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _twice(values: list) -> Any:
    """The first value `values` lists twice (by its YAML form), or None."""
    seen: set = set()
    for v in values:
        key = repr(v)
        if key in seen:
            return v
        seen.add(key)
    return None


def _allows_bool(annotation: Any) -> bool:
    return annotation is bool or any(_allows_bool(a) for a in get_args(annotation))


class Resources(BaseModel):
    """What each Ray task asks for. Fractional GPUs let several populations share one GPU."""

    model_config = ConfigDict(extra="forbid")
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    precision: Literal["float32", "bf16"] = "float32"
    compile: bool = Field(False, description="torch.compile each population's program on a GPU: tens of seconds before "
                          "the first step, faster steps for some families in long runs (benchmarks/README.md)")
    max_retries: int = Field(3, ge=0, description="retries of a task whose worker or node died")


def _setting_problems(settings: type[BaseModel], given: dict[str, Any]) -> list[InitErrorDetails]:
    """What pydantic's lax mode would let through in a stage's settings: true/false where a number or name is
    expected (or a number where true/false is), a negative seed, an empty list, a value listed twice."""
    errs = []
    for key, v in given.items():
        field = settings.model_fields.get(key)
        if field is None:
            continue
        ann, got = field.annotation, f"(got {_short_repr(v)})"
        if ann is bool and not isinstance(v, bool):
            errs.append(_err((key,), f"must be true or false {got}"))
        elif not _allows_bool(ann) and (isinstance(v, bool) or (isinstance(v, list) and any(isinstance(x, bool) for x in v))):
            kind = _ACCEPTS.get(key) or {int: "an integer", float: "a number", str: "a name"}.get(ann, "a value")
            errs.append(_err((key,), f"must be {kind}, not true or false {got}"))
        elif key == "seed" and _is_int(v) and v < 0:
            errs.append(_err((key,), f"must be >= 0, as a zoo's seeds are {got}"))
        elif isinstance(v, list) and not v:
            more = "an epoch such as [0, 5], or 'last' or 'all'" if key == "epochs" else "at least one value"
            errs.append(_err((key,), f"the list is empty; give {more}"))
        elif isinstance(v, list) and _twice(v) is not None:
            errs.append(_err((key,), f"lists {_short_repr(_twice(v))} twice; values must differ {got}"))
    return errs


class StageSpec(BaseModel):
    """An analysis stage over some zoos of the study; every other key is a setting of that stage."""

    model_config = ConfigDict(extra="allow")
    stage: str
    zoos: list[str] | Literal["all"] = "all"
    items_per_task: int = Field(16, ge=1, description="pairs or models per Ray task")

    @field_validator("zoos", mode="before")
    @classmethod
    def _zoo_names(cls, v: Any) -> Any:
        """'all', or the zoos to analyse: a non-empty list of distinct names."""
        if v == "all" or (isinstance(v, list) and v and all(isinstance(z, str) for z in v) and _twice(v) is None):
            return v
        if isinstance(v, list) and not v:
            raise ValueError("the list is empty: nothing to analyse; give zoo names or 'all'")
        if isinstance(v, list) and _twice(v) is not None:
            raise ValueError(f"lists {_twice(v)!r} twice; zoo names must differ")
        raise ValueError("must be 'all' or a list of zoo names")

    @model_validator(mode="after")
    def _settings(self) -> "StageSpec":
        from pipeline.stages import STAGES

        if self.stage not in STAGES:
            raise ValidationError.from_exception_data("StageSpec", [_err(("stage",), (
                f"unknown stage {self.stage!r}; available: {', '.join(sorted(STAGES))}"))])
        settings = STAGES[self.stage].Settings
        given = self.model_extra or {}
        errs = _setting_problems(settings, given)
        try:
            self._parsed = settings.model_validate(given)
        except ValidationError as e:
            have = {tuple(d["loc"]) for d in errs}
            for loc, msg in _problems(e):
                if loc in have:
                    continue
                if loc and loc[0] not in settings.model_fields and msg.startswith("unknown key"):
                    msg = (f"stage {self.stage!r} has no setting {loc[0]!r}; its settings: stage, zoos, items_per_task, "
                           + ", ".join(settings.model_fields))
                errs.append(_err(loc, msg))
        if errs:
            raise ValidationError.from_exception_data("StageSpec", errs)
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


def _depths(node: Any, loc: tuple) -> list[tuple[tuple, Any]]:
    """(loc, value) of every `*depth` key in an arch config, nested configs (backbone_config) included."""
    out = []
    for k, v in node.items() if isinstance(node, dict) else ():
        if isinstance(v, dict):
            out += _depths(v, loc + (k,))
        elif isinstance(k, str) and k.endswith("depth"):
            out.append((loc + (k,), v))
    return out


def _zoo_problems(i: int, zoo: dict[str, Any]) -> list[InitErrorDetails]:
    """A trained zoo's problems that ZooSpec's lax checks let through: epochs true/false or absurdly many, an epoch
    listed twice in checkpoints, an arch config value that the grid or random factors override, and depths too
    large to build (checking a config builds every layer)."""
    errs = []
    epochs, ck, grid, rnd = zoo.get("epochs"), zoo.get("checkpoints"), zoo.get("grid"), zoo.get("random")
    arch = zoo.get("arch")
    config = arch.get("config") if isinstance(arch, dict) else None
    config = config if isinstance(config, dict) else {}
    grid = grid if isinstance(grid, dict) else {}
    rnd = rnd if isinstance(rnd, dict) else {}
    if isinstance(epochs, bool):
        errs.append(_err((i, "epochs"), f"must be an integer >= 1, not true or false (got {_short_repr(epochs)})"))
    elif isinstance(epochs, (int, float)) and epochs > MAX_EPOCHS:
        errs.append(_err((i, "epochs"), f"must be at most {MAX_EPOCHS:,} (got {_short_repr(epochs)})"))
    if isinstance(ck, list) and _twice(ck) is not None:
        errs.append(_err((i, "checkpoints"), f"lists epoch {_short_repr(_twice(ck))} twice; checkpoint epochs must "
                         f"differ (got {_short_repr(ck)})"))
    for key in config:
        for section, factors in (("grid", grid), ("random", rnd)):
            if key in factors:
                errs.append(_err((i, "arch", "config", key), f"{section}.{key} also sets {key} and would override "
                                 f"this; give it in one place (got {_short_repr(config[key])})"))
    located = _depths(config, ("arch", "config"))
    for f, values in grid.items():
        if isinstance(f, str) and f.endswith("depth") and isinstance(values, list):
            located += [(("grid", f, j), x) for j, x in enumerate(values)]
    for f, dist in rnd.items():
        if isinstance(f, str) and f.endswith("depth") and isinstance(dist, dict):
            located += [(("random", f, kind, j), x) for kind, arg in dist.items() if isinstance(arg, list)
                        for j, x in enumerate(arg)]
    errs += [_err((i,) + loc, f"must be at most {MAX_DEPTH:,} layers (got {_short_repr(x)})") for loc, x in located
             if isinstance(x, (int, float)) and not isinstance(x, bool) and x > MAX_DEPTH]
    return errs


def _pairing_problems(i: int, stage: StageSpec, zoos: list) -> list[InitErrorDetails]:
    """A pair stage that could pair nothing: one across zoos given fewer than two, one within a zoo given only trained
    zoos of fewer than two models (a stored zoo's count is known when the run opens the store)."""
    from pipeline.stages import STAGES

    kind, names = STAGES[stage.stage].pairs, ", ".join(repr(z.name) for z in zoos)
    if kind == "across" and len(zoos) < 2:
        return [_err(("analysis", i, "zoos"), f"stage {stage.stage!r} pairs a model of one zoo with one of another; it "
                     f"analyses {len(zoos)} zoo ({names}): give it two or more")]
    if kind == "within" and zoos and all(isinstance(z, ZooSpec) and z.model_count() < 2 for z in zoos):
        return [_err(("analysis", i, "zoos"), f"stage {stage.stage!r} pairs models of a zoo; every zoo it analyses "
                     f"({names}) trains one model: give a zoo two or more (e.g. seeds in its grid)")]
    return []


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

    @field_validator("zoos", mode="wrap")
    @classmethod
    def _zoo_limits(cls, v: Any, handler: Callable[[Any], Any]) -> Any:
        """What ZooSpec lets through, checked on the raw entries and reported with its own problems (see
        _zoo_problems); an out-of-range epochs is blamed on epochs, not on the checkpoints it makes."""
        extra = [d for i, z in enumerate(v) if isinstance(z, dict) and z.get("stored", False) is False
                 for d in _zoo_problems(i, z)] if isinstance(v, list) else []
        try:
            out = handler(v)
        except ValidationError as e:
            if not extra:
                raise
            have = {tuple(d["loc"]) for d in extra}
            bad_epochs = {d["loc"][0] for d in extra if d["loc"][1:] == ("epochs",)}
            kept = [_err(loc, msg) for loc, msg in _problems(e)
                    if loc not in have and not (loc[0] in bad_epochs and loc[1:2] == ("checkpoints",))]
            raise ValidationError.from_exception_data("zoos", kept + extra) from None
        if extra:
            raise ValidationError.from_exception_data("zoos", extra)
        return out

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
        errs = []
        for i, name in enumerate(names):
            try:
                safe_name("zoo", name)
            except ValueError as e:
                errs.append(_err(("zoos", i, "name"), str(e)))
            if name in names[:i]:
                errs.append(_err(("zoos", i, "name"), f"zoo name {name!r} is used twice (zoos[{names.index(name)}]); "
                                 "zoo names must be unique"))
        counts = {z.name: z.model_count() for z in self.trained_zoos}
        if sum(counts.values()) > self.max_models:
            biggest = ", ".join(f"{n}: {c:,}" for n, c in sorted(counts.items(), key=lambda kv: -kv[1])[:3])
            errs.append(_err(("max_models",), f"the zoos hold {sum(counts.values()):,} models ({biggest}), more than "
                             f"max_models = {self.max_models:,}; shrink the grids, or set max_models: "
                             f"{sum(counts.values())} to allow it"))
        from pipeline.stages import STAGES

        stages = [st.stage for st in self.analysis]
        for i, st in enumerate(self.analysis):
            if st.stage in stages[:i]:  # the summary, the report and MLflow hold one result set a stage
                errs.append(_err(("analysis", i, "stage"), f"stage {st.stage!r} is listed twice (analysis"
                                 f"[{stages.index(st.stage)}]); a study runs each stage once: put its other settings in "
                                 "another study on the same store (results both ask for are computed once)"))
                continue
            if st.zoos != "all":
                unknown = [z for z in st.zoos if z not in names]
                if unknown:
                    errs.append(_err(("analysis", i, "zoos"), f"names unknown zoo {unknown[0]!r}; zoos of this study: "
                                     f"{names}"))
                    continue
            errs += _pairing_problems(i, st, self.stage_zoos(st))
            wanted = getattr(st.settings, "epochs", None)
            if STAGES[st.stage].every_epoch_stored and isinstance(wanted, list):  # zoos already stored: when it runs
                for z in self.stage_zoos(st):
                    kept = z.checkpoint_epochs() if isinstance(z, ZooSpec) else wanted
                    if missing := sorted(set(wanted) - set(kept)):
                        errs.append(_err(("analysis", i, "epochs"), f"{missing} not stored for zoo {z.name!r}; its "
                                         f"checkpoints are {kept} (add them to its `checkpoints`, or ask for 'last' or "
                                         "'all')"))
                        break
        if errs:
            raise ValidationError.from_exception_data("Study", errs)
        return self

    def stage_zoos(self, stage: StageSpec) -> list[ZooSpec | StoredZoo]:
        return [z for z in self.zoos if stage.zoos == "all" or z.name in stage.zoos]

    def output_dir(self) -> Path:
        return Path(self.output or f"runs/{self.study}")


def _short_repr(value: Any) -> str:
    """A value as it reads in one line of an error: bounded, whatever its size; true, false and null as in YAML."""
    import reprlib

    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    r = reprlib.Repr()
    r.maxstring, r.maxother, r.maxlist, r.maxdict, r.maxlevel = 60, 60, 6, 4, 3
    return r.repr(value)


# A key of pydantic's loc naming one alternative of a union (`str`, `list[int]`, `literal['all']`), not a field.
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|literal\[.*\]|function-\w+\[.*\])$")
# What a union-typed key accepts, by the key's name, where the alternatives' own names would not say.
_ACCEPTS = {"checkpoints": "a checkpoint string such as '0,5,last' or a list of epochs",
            "epochs": "'last', 'all' or a list of epochs"}
_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false", "none": "null"}

_TYPE_ERRORS = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
                "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
                "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "a string",
                "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
                "model_attributes_type": "a mapping"}
_BOUNDS = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
           "less_than": ("<", "lt")}


def _got(value: Any) -> str:
    """` (got value)`; a mapping by its type alone (its keys are the next lines' business)."""
    return " (got a mapping)" if isinstance(value, dict) else f" (got {_short_repr(value)})"


def _fields_at(loc: tuple) -> list[str] | None:
    """The keys the model at `loc` of a study takes (for an unknown key's message), or None where not a model."""
    def model_in(annotation: Any) -> Any:  # the first model in list[...], X | None, Annotated[...]
        queue = [annotation]
        while queue:
            a = queue.pop(0)
            if isinstance(a, type) and issubclass(a, BaseModel):
                return a
            queue += list(get_args(a))
        return None

    node: Any = Study
    for part in loc:
        if part in (_TRAINED, _STORED):
            node = ZooSpec if part == _TRAINED else StoredZoo
        elif isinstance(part, str):
            if node is None or part not in node.model_fields:
                return None
            node = model_in(node.model_fields[part].annotation)
    return list(node.model_fields) if node is not None else None


def _message(e: dict) -> str:
    """One pydantic error as `message (got value)`, in symzoo's words."""
    t, ctx, got = e["type"], e.get("ctx") or {}, e.get("input")
    if t == "study":
        return e["msg"]
    if t == "missing":
        return "is required"
    if t == "extra_forbidden":
        allowed = _fields_at(tuple(e["loc"][:-1]))
        return f"unknown key {e['loc'][-1]!r}" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
    if t in _TYPE_ERRORS:
        return f"must be {_TYPE_ERRORS[t]}{_got(got)}"
    if t in _BOUNDS:
        op, name = _BOUNDS[t]
        return f"must be {op} {ctx.get(name)}{_got(got)}"
    if t == "literal_error":
        return f"must be {ctx.get('expected')}{_got(got)}"
    if t == "too_short" and ctx.get("min_length") == 1:
        return "the list is empty; give at least one"
    if t == "string_too_short":
        return f"must not be empty{_got(got)}"
    msg = e["msg"].removeprefix("Value error, ")
    shown = isinstance(got, dict) or f"= {_short_repr(got)} " in msg  # zoos.spec's `name = value is not allowed`
    return msg if shown else msg + _got(got)


def _problems(err: ValidationError) -> list[tuple[tuple, str]]:
    """pydantic's errors as (key path, message) pairs, one per problem: the zoo-kind tags left out of key paths and
    the alternatives of a union (`str`, `list[int]`) collapsed into one line saying what the key accepts."""
    out: list[tuple[tuple, str]] = []
    unions: dict[tuple, list[dict]] = {}
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in (_TRAINED, _STORED))
        k = next((j for j, p in enumerate(loc) if isinstance(p, str) and _UNION_BRANCH.match(p)), None)
        if k is None:
            out.append((loc, _message({**e, "loc": loc})))
            continue
        if loc[:k] not in unions:
            unions[loc[:k]] = []
            out.append((loc[:k], ""))  # filled in below, in the place of the union's first error
        unions[loc[:k]].append({**e, "loc": loc})
    for j, (loc, msg) in enumerate(out):
        if msg:
            continue
        errs = unions[loc]
        branches = list(dict.fromkeys(e["loc"][len(loc)] for e in errs))
        top = [e for e in errs if len(e["loc"]) == len(loc) + 1]
        got = (top or errs)[0]["input"]
        name = next((p for p in reversed(loc) if isinstance(p, str)), "")
        words = [_WORDS.get(b) or (b.removeprefix("literal[").removesuffix("]") if b.startswith("literal[") else
                                   "a list" if b.startswith("list[") else "a mapping" if b.startswith("dict[") else b)
                 for b in branches]
        out[j] = (loc, f"must be {_ACCEPTS.get(name) or ' or '.join(words)}{_got(got)}")
    return out


def format_study_errors(err: ValidationError) -> list[str]:
    """pydantic's errors as `key.path[i]: message (got value)` lines, one per problem."""
    lines = []
    for loc, msg in _problems(err):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        lines.append(f"{path or 'study'}: {msg}")
    return lines


def parse_study(data: Any, source: str = "study") -> Study:
    """Validate a parsed YAML document; StudyError has a line per problem: `source: key.path: message`."""
    if data is None:
        raise StudyError(f"{source}: the file is empty; a study is a YAML mapping with keys study, zoos, analysis, ...")
    if not isinstance(data, dict):
        got = {list: "a list", str: "a single value", int: "a number", float: "a number", bool: "true/false"}
        raise StudyError(f"{source}: expected a mapping with keys study, zoos, analysis, ...; got "
                         f"{got.get(type(data), type(data).__name__)}")
    try:
        return Study.model_validate(data)
    except ValidationError as e:
        raise StudyError("\n".join(f"{source}: {line}" for line in format_study_errors(e))) from None


class _RepeatedKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int):
        self.key, self.line, self.first = key, line, first


class _StudyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML keeps the last silently); `<<` merges may still
    be overridden, as they are meant to be."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise _RepeatedKey(key, key_node.start_mark.line + 1, seen[key])
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


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
    if not path.exists():
        raise StudyError(f"study file {str(path)!r} does not exist")
    if not path.is_file():  # a folder, /dev/null, a FIFO (reading one would wait for a writer)
        raise StudyError(f"study file {str(path)!r} is not a regular file; a study is a YAML file")
    raw = path.read_bytes()
    if len(raw) > MAX_STUDY_BYTES:
        raise StudyError(f"{path}: {len(raw):,} bytes; a study file is at most {MAX_STUDY_BYTES:,} (is it a study?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StudyError(f"{path}: not a text file (not UTF-8); a study is a YAML file") from None
    try:
        data = yaml.load(text, Loader=_StudyLoader)  # noqa: S506 - a SafeLoader
    except _RepeatedKey as e:
        raise StudyError(f"{path}: key {e.key!r} at line {e.line} is given twice (first at line {e.first}); give "
                         "it once") from None
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
