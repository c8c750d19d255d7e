"""Zoo specs: a task, an architecture, generating factors to vary, and how long to train.

A zoo is plain data (YAML in a study file, validated here with pydantic):

    name: mlp-digits
    task: {name: digits, options: {}}
    arch: {name: mlp, config: {depth: 2}}
    grid: {seed: [0, 1, 2], lr: [0.01, 0.1]}          # cartesian product; {range: [0, 100]} = 0..99
    random: {weight_decay: {log_uniform: [1e-5, 1e-2]}, dropout: {uniform: [0, 0.3]}}
    samples: 4                                          # random draws, crossed with the grid
    sample_seed: 0
    epochs: 20
    checkpoints: "0,1,...,last"                         # 0,1,2,5,10,20,50,...,last; or a list of epochs
    train_metrics: full                                 # or running: the epoch's batches, no extra pass

`expand` turns a zoo into one `ModelSpec` per model (every factor resolved, defaults filled in, a
stable id), and `populations` groups the models that can train as one vectorised program and
chunks them to a maximum size. Both are frozen dataclasses of plain values, so Ray can ship them.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from zoos.init import init_model
from zoos.population import model_id, population_id

OPTIMIZERS = ("sgd", "adam")
# How the train split's loss and metric of an epoch are measured: "full" evaluates every model on its
# whole training set after the epoch (eval mode); "running" takes the mean over the epoch's own training
# batches as they were stepped (train mode, the model changing through the epoch: what a standard
# training loop and the published model zoos report), which costs no extra pass. Epoch 0 is always full.
TRAIN_METRICS = ("full", "running")
LR_SCHEDULES = ("constant", "cosine", "warmup_cosine")

# Factors that shape the architecture: handed to `build_arch` when the arch has that config field.
ARCH_FACTORS = ("width", "depth", "activation", "dropout")

# Training factors and their defaults. `momentum` is SGD's momentum or Adam's beta1.
TRAIN_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "init": "default",
    "optimizer": "sgd",
    "lr": 0.05,
    "momentum": 0.9,
    "lr_schedule": "constant",
    "weight_decay": 0.0,
    "batch_size": 64,
    "train_fraction": 1.0,
    "augmentation": False,
    "equiv_reg": 0.0,
}
FACTORS = tuple(TRAIN_DEFAULTS) + ARCH_FACTORS

# Factors that must agree for models to run as one program (besides task and architecture config).
POPULATION_KEYS = ("batch_size", "optimizer", "lr_schedule", "train_fraction", "augmentation")

# Keys of a `models` table row that a factor (for instance an arch config field) may not shadow.
RESERVED = ("model_id", "study", "zoo", "task", "task_config", "arch", "arch_config", "status", "n_params", "epochs",
            "train_metrics")


class SpecError(ValueError):
    """A zoo spec that does not validate; the message names each field path, its value and what is allowed."""


def _activations() -> tuple[str, ...]:
    from zoos.archs.base import ACTIVATIONS

    return tuple(ACTIVATIONS)


def _inits() -> tuple[str, ...]:
    from zoos.archs.base import INIT_SCHEMES

    return tuple(INIT_SCHEMES)


def _is_int(v: Any) -> bool:
    """An integer that fits the store's int64 columns (and torch's seeds)."""
    return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# factor -> (check, what is allowed); arch config fields that are not listed here take any value.
CHECKS: dict[str, tuple[Callable[[Any], bool], Callable[[], str]]] = {
    "seed": (lambda v: _is_int(v) and v >= 0, lambda: "an integer >= 0"),
    "width": (lambda v: _is_num(v) and v > 0, lambda: "a number > 0 (an integer >= 1 where the architecture counts units)"),
    "depth": (lambda v: _is_int(v) and v >= 1, lambda: "an integer >= 1"),
    "activation": (lambda v: v in _activations(), lambda: "one of " + ", ".join(_activations())),
    "init": (lambda v: v in _inits(), lambda: "one of " + ", ".join(_inits())),
    "optimizer": (lambda v: v in OPTIMIZERS, lambda: "one of " + ", ".join(OPTIMIZERS)),
    "lr": (lambda v: _is_num(v) and v > 0, lambda: "a number > 0"),
    "momentum": (lambda v: _is_num(v) and 0 <= v < 1, lambda: "a number in [0, 1)"),
    "lr_schedule": (lambda v: v in LR_SCHEDULES, lambda: "one of " + ", ".join(LR_SCHEDULES)),
    "weight_decay": (lambda v: _is_num(v) and v >= 0, lambda: "a number >= 0"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, lambda: "an integer >= 1"),
    "dropout": (lambda v: _is_num(v) and 0 <= v < 1, lambda: "a number in [0, 1)"),
    "train_fraction": (lambda v: _is_num(v) and 0 < v <= 1, lambda: "a number in (0, 1]"),
    "augmentation": (lambda v: isinstance(v, bool), lambda: "true or false"),
    "equiv_reg": (lambda v: _is_num(v) and v >= 0, lambda: "a number >= 0"),
    "image": (lambda v: _is_int(v) and v >= 0, lambda: "an image index >= 0"),  # per-model factor of tasks.inr
}

# Factors whose values are real numbers (numeric strings such as YAML's "1e-3" are converted).
NUMERIC = ("lr", "momentum", "weight_decay", "dropout", "train_fraction", "equiv_reg")

MAX_FACTOR_VALUES = 10**6  # values one grid factor may list (a range is checked before it is listed)

# Random-factor distributions: {kind: parameters}.
DISTRIBUTIONS = ("choice", "uniform", "log_uniform", "int")


def _number(v: Any) -> Any:
    """YAML reads `1e-3` (no dot) as a string: accept numeric strings where a number is expected."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _err(loc: tuple, message: str, value: Any) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("zoo_spec", message), loc=loc, input=value)


def _as_details(err: ValidationError) -> list[InitErrorDetails]:
    """`err`'s errors as details to raise again with more: pydantic's own types as they are, ours by message."""
    out = []
    for d in err.errors():
        if d["type"] == "zoo_spec":
            out.append(_err(tuple(d["loc"]), d["msg"], d["input"]))
        else:
            ctx = {"ctx": d["ctx"]} if "ctx" in d else {}
            out.append(InitErrorDetails(type=d["type"], loc=tuple(d["loc"]), input=d["input"], **ctx))
    return out


def _check_value(factor: str, value: Any, loc: tuple) -> list[InitErrorDetails]:
    if factor not in CHECKS:
        return []
    ok, allowed = CHECKS[factor]
    if ok(value):
        return []
    return [_err(loc, f"{factor} = {value!r} is not allowed; expected {allowed()}", value)]


def _bare_name(value: Any) -> Any:
    """A reference given as its name alone (`task: digits`) as the mapping it stands for ({name: digits}); refused
    where it is neither a name nor a mapping."""
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, (dict, BaseModel)):
        return value
    raise PydanticCustomError("reference", "expected a name, or a mapping with `name` and its options or config")


class TaskRef(BaseModel):
    """Which task to train on, with its options (`task: digits` is {name: digits})."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    _by_name = model_validator(mode="before")(staticmethod(_bare_name))


class ArchRef(BaseModel):
    """Which architecture to train, with the config shared by every model of the zoo (`arch: cnn` is {name: cnn})."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    config: dict[str, Any] = Field(default_factory=dict)

    _by_name = model_validator(mode="before")(staticmethod(_bare_name))


def parse_checkpoints(schedule: str | list[int], epochs: int) -> list[int]:
    """Checkpoint epochs from a list or a schedule string, ascending, always ending with `epochs`.

    The string is comma separated: integers, "last" (= epochs), "all" (every epoch 0..epochs), and
    "..." which continues the log-like 1-2-5 series (10, 20, 50, 100, 200, ...) up to `epochs`.
    """
    if isinstance(schedule, str):
        out: list[int] = []
        for tok in (t.strip() for t in schedule.split(",")):
            if tok == "last":
                out.append(epochs)
            elif tok == "all":
                out.extend(range(epochs + 1))
            elif tok == "...":
                start = max(out, default=0)
                series = (m * 10**k for k in range(0, 19) for m in (1, 2, 5))
                out.extend(e for e in series if start < e <= epochs)
            elif tok.lstrip("-").isdigit():
                out.append(int(tok))
            else:
                raise ValueError(
                    f"checkpoint schedule token {tok!r} is not allowed; use integers, 'last', 'all' or '...'"
                )
    else:
        out = list(schedule)
    for e in out:
        if not _is_int(e) or not 0 <= e <= epochs:
            raise ValueError(f"checkpoint epoch {e!r} is not allowed; expected an integer in [0, {epochs}]")
    return sorted(set(out) | {epochs})


class ZooSpec(BaseModel):
    """One zoo: a task, an architecture, generating factors (grid and/or random), epochs, checkpoints."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    task: TaskRef
    arch: ArchRef
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    random: dict[str, dict[str, Any]] = Field(default_factory=dict)
    samples: int = Field(default=1, ge=1)
    sample_seed: int = 0
    epochs: int = Field(default=10, ge=1)
    checkpoints: str | list[int] = "0,1,...,last"  # 0, 1, 2, 5, 10, 20, 50, ... and the last epoch
    population_size: int | Literal["auto"] = Field(
        default=256, description="models per population (one Ray task), or 'auto': an equal share of the "
                                 "cluster's training slots, at most AUTO_MAX_POPULATION each")

    train_metrics: str = Field(default="full", description="the train split's per-epoch loss and metric: 'full' "
                               "(a pass over the training set after each epoch) or 'running' (the epoch's batches)")

    @field_validator("train_metrics", mode="before")
    @classmethod
    def _train_metrics(cls, v: Any) -> Any:
        if v in TRAIN_METRICS:
            return v
        raise ValueError(f"train_metrics = {v!r} is not allowed; expected one of {', '.join(TRAIN_METRICS)}")

    @field_validator("population_size", mode="before")
    @classmethod
    def _population_size(cls, v: Any) -> Any:
        """One message for any bad value (the int | 'auto' union would report each branch apart)."""
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError(f"population_size = {v!r} is not allowed; expected an integer >= 1 or 'auto'")

    @field_validator("grid", mode="before")
    @classmethod
    def _ranges(cls, grid: Any) -> Any:
        """`{range: [start, stop]}` or `{range: [start, stop, step]}` as a grid value: Python's range, listed."""
        if not isinstance(grid, dict):
            return grid
        errs, out = [], {}
        for factor, values in grid.items():
            if not isinstance(values, dict):
                out[factor] = values
                continue
            arg = values.get("range")
            if set(values) != {"range"} or not (isinstance(arg, list) and 2 <= len(arg) <= 3 and all(_is_int(a) for a in arg)
                                                and (len(arg) == 2 or arg[2] != 0) and len(range(*arg)) > 0):
                errs.append(_err((factor,), f"grid factor {factor!r}: {values!r} is not allowed; give a list of values or "
                                 "{range: [start, stop]} / {range: [start, stop, step]} with integers and at least one value", values))
                continue
            if len(range(*arg)) > MAX_FACTOR_VALUES:
                errs.append(_err((factor,), f"grid factor {factor!r}: range {arg} has {len(range(*arg)):,} values; at "
                                 f"most {MAX_FACTOR_VALUES:,} a factor", values))
                continue
            out[factor] = list(range(*arg))
        if errs:
            raise ValidationError.from_exception_data("grid", errs)
        return out

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        errs = []
        grid = {f: [_number(v) if f in NUMERIC else v for v in vs] for f, vs in grid.items()}
        for factor, values in grid.items():
            if not values:
                errs.append(_err((factor,), f"grid factor {factor!r} has no values; give at least one", values))
            if len(values) > MAX_FACTOR_VALUES:
                errs.append(_err((factor,), f"grid factor {factor!r} has {len(values):,} values; at most "
                                 f"{MAX_FACTOR_VALUES:,} a factor", f"[{len(values)} values]"))
                continue
            seen: set = set()  # one pass: a set of each value's JSON form (values may be lists)
            for i, v in enumerate(values):
                errs += _check_value(factor, v, (factor, i))
                key = json.dumps(v, sort_keys=True, default=str)
                if key in seen:
                    errs.append(_err((factor, i), f"{factor} = {v!r} is listed twice; grid values must differ", v))
                seen.add(key)
                if len(errs) > 20:  # enough to say what is wrong
                    break
        if errs:
            raise ValidationError.from_exception_data("grid", errs)
        return grid

    @field_validator("random")
    @classmethod
    def _random(cls, rnd: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        errs = []
        for factor, dist in rnd.items():
            if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                errs.append(_err((factor,), f"distribution {dist!r} is not allowed; give one of {', '.join(DISTRIBUTIONS)}, "
                                 "e.g. {log_uniform: [1e-4, 1e-1]} or {choice: [relu, gelu]}", dist))
                continue
            kind, arg = next(iter(dist.items()))
            if isinstance(arg, list) and (kind != "choice" or factor in NUMERIC):
                arg = [_number(a) for a in arg]
                rnd = {**rnd, factor: {kind: arg}}
            loc = (factor, kind)
            if kind == "choice":
                if not isinstance(arg, list) or not arg:
                    errs.append(_err(loc, f"choice needs a non-empty list, got {arg!r}", arg))
                    continue
                for i, v in enumerate(arg):
                    errs += _check_value(factor, v, loc + (i,))
                continue
            if not (isinstance(arg, list) and len(arg) == 2 and all(_is_num(a) for a in arg) and arg[0] <= arg[1]):
                errs.append(_err(loc, f"{kind} needs [low, high] with low <= high, got {arg!r}", arg))
                continue
            if kind == "log_uniform" and arg[0] <= 0:
                errs.append(_err(loc, f"log_uniform needs low > 0, got {arg!r}", arg))
            if kind == "int" and not all(_is_int(a) for a in arg):
                errs.append(_err(loc, f"int needs integer bounds, got {arg!r}", arg))
            for i, v in enumerate(arg):
                errs += _check_value(factor, int(v) if kind == "int" else v, loc + (i,))
        if errs:
            raise ValidationError.from_exception_data("random", errs)
        return rnd

    @model_validator(mode="wrap")
    @classmethod
    def _names_with_field_errors(cls, data: Any, handler: Callable[[Any], "ZooSpec"]) -> "ZooSpec":
        """A field's error stops pydantic before `_whole`; the task's and the architecture's names and keys are then
        still checked from the raw data, so one pass reports them with it."""
        try:
            return handler(data)
        except ValidationError as e:
            if not isinstance(data, dict):
                raise
            extra: list[InitErrorDetails] = []
            try:
                extra += _check_task(TaskRef.model_validate(data.get("task")))
            except ValidationError:
                pass  # the task's own shape is among e's errors
            try:
                extra += _check_arch(ArchRef.model_validate(data.get("arch")))[1]
            except ValidationError:
                pass
            have = {tuple(d["loc"]) for d in e.errors()}
            extra = [d for d in extra if tuple(d["loc"]) not in have]
            if not extra:
                raise
            try:
                merged = ValidationError.from_exception_data("ZooSpec", [*_as_details(e), *extra])
            except Exception:  # noqa: BLE001 - an error type pydantic will not rebuild: its own errors as they were
                raise e from None
            raise merged from None

    @model_validator(mode="after")
    def _whole(self) -> "ZooSpec":
        errs = []
        try:
            parse_checkpoints(self.checkpoints, self.epochs)
        except ValueError as e:
            errs.append(_err(("checkpoints",), str(e), self.checkpoints))
        if self.samples > 1 and not self.random:
            errs.append(_err(("samples",), f"samples = {self.samples} needs random factors to draw; add a 'random' section", self.samples))
        both = sorted(set(self.grid) & set(self.random))
        for f in both:
            errs.append(_err(("random", f), f"factor {f!r} is in both grid and random; give it in one", f))
        errs += _check_task(self.task)
        arch_keys, arch_errs = _check_arch(self.arch)
        errs += arch_errs
        if arch_keys is not None:
            allowed = sorted(set(FACTORS) | set(arch_keys) | set(_task_factors(self.task)) - set(RESERVED))
            for section, factors in (("grid", self.grid), ("random", self.random)):
                for f in factors:
                    if f not in allowed:
                        errs.append(_err((section, f), f"unknown factor {f!r}; allowed: {', '.join(allowed)}", f))
                    elif f in ARCH_FACTORS and f not in arch_keys:
                        errs.append(_err((section, f), f"architecture {self.arch.name!r} has no config field {f!r}; "
                                         f"its fields: {', '.join(sorted(arch_keys))}", f))
        errs += _width_errors(self.arch.name, [(("arch", "config", "width"), self.arch.config["width"])]
                              if "width" in self.arch.config else [])
        errs += _width_errors(self.arch.name, [(("grid", "width", i), v) for i, v in enumerate(self.grid.get("width", []))])
        for f in _task_factors(self.task):
            if f not in self.grid and f not in self.random:
                errs.append(_err(("grid",), f"task {self.task.name!r} fits each model to its own data, picked by the factor "
                                 f"{f!r}; give it in grid, e.g. {f}: {{range: [0, 100]}}", f))
        if errs:
            raise ValidationError.from_exception_data("ZooSpec", errs)
        return self

    def model_count(self) -> int:
        """How many models `expand` makes (grid points x random draws), without making them."""
        return math.prod(len(v) for v in self.grid.values()) * (self.samples if self.random else 1)

    def checkpoint_epochs(self) -> list[int]:
        """The checkpoint epochs, resolved."""
        return parse_checkpoints(self.checkpoints, self.epochs)


def _check_task(task: TaskRef) -> list[InitErrorDetails]:
    from tasks.registry import TASKS

    if task.name not in TASKS:
        return [_err(("task", "name"), f"unknown task {task.name!r}; available: {', '.join(sorted(TASKS))}", task.name)]
    allowed = TASKS[task.name].options
    return [
        _err(("task", "options", k), f"task {task.name!r} has no option {k!r}; allowed: {', '.join(sorted(allowed)) or 'none'}", k)
        for k in task.options
        if k not in allowed
    ]


def _task_factors(task: TaskRef) -> tuple[str, ...]:
    """The per-model factor of a task whose models each fit their own data (tasks.inr: "image"), if any."""
    from tasks.registry import TASKS

    info = TASKS.get(task.name)
    return (info.per_model,) if info is not None and info.per_model else ()


def _check_arch(arch: ArchRef) -> tuple[set[str] | None, list[InitErrorDetails]]:
    from zoos.archs import ARCHS

    if arch.name not in ARCHS:
        return None, [_err(("arch", "name"), f"unknown architecture {arch.name!r}; available: {', '.join(sorted(ARCHS))}", arch.name)]
    keys = set(ARCHS[arch.name].defaults)
    errs = [
        _err(("arch", "config", k), f"architecture {arch.name!r} has no config field {k!r}; allowed: {', '.join(sorted(keys))}", k)
        for k in arch.config
        if k not in keys
    ]
    errs += [e for k, v in arch.config.items() if k in ARCH_FACTORS for e in _check_value(k, v, ("arch", "config", k))]
    return keys, errs


def _width_errors(arch: str, located: list[tuple[tuple, Any]]) -> list[InitErrorDetails]:
    """Widths that count units (an integer default: every architecture but the multiplier of resnet20) must be
    integers >= 1; a multiplier may be any number > 0. A width <= 0 is the generic check's (one error a value)."""
    from zoos.archs import ARCHS

    default = ARCHS[arch].defaults.get("width") if arch in ARCHS else None
    if not isinstance(default, int):
        return []
    return [_err(loc, f"width = {v!r} is not allowed; architecture {arch!r} counts units: expected an integer >= 1", v)
            for loc, v in located if _is_num(v) and v > 0 and not _is_int(v)]


def format_spec_errors(err: ValidationError, prefix: str = "") -> str:
    """One line per error: `zoos[1].grid.lr[2]: lr = -3 is not allowed; expected a number > 0`."""
    lines = []
    for e in err.errors():
        path = prefix
        for part in e["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        lines.append(f"{path or '<zoo>'}: {e['msg']}")
    return "\n".join(lines)


def parse_zoo(data: dict[str, Any], prefix: str = "zoo") -> ZooSpec:
    """Validate a zoo from plain data; a bad spec raises `SpecError` naming every bad field path."""
    try:
        return ZooSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_spec_errors(e, prefix)) from None


@dataclass(frozen=True)
class ModelSpec:
    """One model to train: every generating factor resolved, the arch config to build it with, its id."""

    model_id: str
    study: str
    zoo: str
    task: str
    task_options: dict[str, Any]
    arch: str
    arch_config: dict[str, Any]  # zoo config + arch-shaping factors (handed to build_arch)
    factors: dict[str, Any]  # every generating factor, defaults filled in (the models-table columns)
    epochs: int
    checkpoints: tuple[int, ...]
    train_metrics: str = "full"  # TRAIN_METRICS

    def group_key(self) -> str:
        """Models with equal keys have equal parameter shapes and code, so they can train as one program."""
        shape_config = {k: v for k, v in self.arch_config.items() if k != "dropout"}  # dropout is a per-model buffer
        key = {
            "study": self.study, "zoo": self.zoo, "task": self.task, "task_options": self.task_options,
            "arch": self.arch, "arch_config": shape_config, "epochs": self.epochs, "checkpoints": self.checkpoints,
            "train_metrics": self.train_metrics, **{k: self.factors[k] for k in POPULATION_KEYS},
        }
        return json.dumps(key, sort_keys=True, default=str)


def _draw(dist: dict[str, Any], rng: random.Random) -> Any:
    kind, arg = next(iter(dist.items()))
    if kind == "choice":
        return arg[rng.randrange(len(arg))]
    if kind == "uniform":
        return rng.uniform(arg[0], arg[1])
    if kind == "log_uniform":
        return math.exp(rng.uniform(math.log(arg[0]), math.log(arg[1])))
    return rng.randint(int(arg[0]), int(arg[1]))


def expand(spec: ZooSpec, study: str) -> list[ModelSpec]:
    """Every model of a zoo: grid points (in the order given) crossed with the random draws."""
    from zoos.archs import ARCHS

    arch_defaults = {**ARCHS[spec.arch.name].defaults, **spec.arch.config}
    grid_points = [dict(zip(spec.grid, vals)) for vals in itertools.product(*spec.grid.values())]
    rng = random.Random(spec.sample_seed)
    draws = [{f: _draw(d, rng) for f, d in spec.random.items()} for _ in range(spec.samples if spec.random else 1)]
    checkpoints = tuple(spec.checkpoint_epochs())
    models: list[ModelSpec] = []
    seen: dict[str, int] = {}
    for point in grid_points:
        for draw in draws:
            given = {**point, **draw}
            factors = dict(TRAIN_DEFAULTS)
            factors.update({f: arch_defaults.get(f) for f in ARCH_FACTORS})
            factors.update(given)
            arch_config = dict(spec.arch.config)
            arch_config.update({k: v for k, v in given.items() if k in arch_defaults})
            mid = model_id(study, spec.name, factors)
            if mid in seen:
                raise SpecError(
                    f"zoo {spec.name!r}: models {seen[mid]} and {len(models)} have the same factors {given}; "
                    "make the random draws distinct (more choices or fewer samples)"
                )
            seen[mid] = len(models)
            models.append(ModelSpec(
                model_id=mid, study=study, zoo=spec.name, task=spec.task.name, task_options=dict(spec.task.options),
                arch=spec.arch.name, arch_config=arch_config, factors=factors, epochs=spec.epochs,
                checkpoints=checkpoints, train_metrics=spec.train_metrics,
            ))
    return models


@dataclass(frozen=True)
class PopulationSpec:
    """Models that train together as one vectorised program; the unit Ray schedules."""

    models: tuple[ModelSpec, ...]

    def __post_init__(self) -> None:
        if not self.models:
            raise SpecError("a population needs at least one model")
        keys = {m.group_key() for m in self.models}
        if len(keys) != 1:
            raise SpecError("the models of a population must share task, arch shape config, epochs, checkpoints, "
                            "train_metrics and "
                            f"{', '.join(POPULATION_KEYS)}; group them with zoos.spec.populations")

    @property
    def model_ids(self) -> list[str]:
        return [m.model_id for m in self.models]

    @property
    def shard(self) -> str:
        """The deterministic shard name (`zoos.population.population_id`), as PopulationResult.shard."""
        return population_id(self.model_ids)

    @property
    def first(self) -> ModelSpec:
        return self.models[0]

    @property
    def study(self) -> str:
        return self.first.study

    @property
    def zoo(self) -> str:
        return self.first.zoo

    @property
    def epochs(self) -> int:
        return self.first.epochs

    @property
    def checkpoints(self) -> tuple[int, ...]:
        return self.first.checkpoints

    def shared(self, factor: str) -> Any:
        """A factor every model shares (one of POPULATION_KEYS)."""
        return self.first.factors[factor]

    def per_model(self, factor: str) -> list[Any]:
        return [m.factors[factor] for m in self.models]

    def __len__(self) -> int:
        return len(self.models)


def build_model(zoo: ZooSpec, factors: dict[str, Any], task: Any) -> Any:
    """The initialised model of `zoo` with generating `factors` (as `expand` resolves them) on `task`."""
    from zoos.archs import ARCHS

    keys = set(ARCHS[zoo.arch.name].defaults)
    config = {**zoo.arch.config, **{k: v for k, v in factors.items() if k in keys and v is not None}}
    return init_model(zoo.arch.name, config, {**TRAIN_DEFAULTS, **factors}, task)


AUTO_MAX_POPULATION = 1024  # where a CNN-s population stops gaining per model on one H100 (benchmarks/README.md)


def populations(models: list[ModelSpec], max_size: int = 256, *, slots: int | None = None) -> list[PopulationSpec]:
    """Group models that can train as one program, in first-seen order, and chunk each group to `max_size`.

    With `slots` (population_size: auto, slots = training tasks the cluster runs at once) each group is
    split instead into near-equal populations (sizes differ by at most one), as many as a multiple of
    `slots` that keeps each within `max_size`, or one per model when the group is smaller than `slots`:
    every GPU gets the same work and none trains a second, short population while the others idle.
    """
    if max_size < 1:
        raise SpecError(f"max_size = {max_size} is not allowed; expected an integer >= 1")
    groups: dict[str, list[ModelSpec]] = {}
    for m in models:
        groups.setdefault(m.group_key(), []).append(m)
    if slots is None:
        return [PopulationSpec(tuple(ms[i : i + max_size])) for ms in groups.values() for i in range(0, len(ms), max_size)]
    slots, out = max(1, slots), []
    for ms in groups.values():
        k = min(len(ms), slots * -(-len(ms) // (slots * max_size)))
        bounds = [len(ms) * i // k for i in range(k + 1)]
        out += [PopulationSpec(tuple(ms[a:b])) for a, b in zip(bounds, bounds[1:])]
    return out
