"""What every analysis stage shares: the `Stage` interface, its settings base, and store helpers.

A stage lists the items its settings ask for on the driver (`wanted`: models or model pairs) and plans
those whose results under these settings are not in the store yet; a Ray task computes a chunk of items with
the pure functions of `analysis/` and writes the chunk as one shard of `analysis/<stage>`, each row with the
`settings_id` of the settings that produced it (a deterministic shard name, so a retried task overwrites its
own shard). A study's results are its wanted items' rows under its settings (`Stage.rows`): the driver takes
per-zoo summary columns, plots and MLflow metrics from those, never from results another study computed for
other settings or other items.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections import defaultdict
from pathlib import Path
from typing import Any, ClassVar

import polars as pl
import torch
from pydantic import BaseModel, ConfigDict, Field

Item = dict[str, str]

# Summary columns carry their spread and their uncertainty in sibling columns: <name>__sd for a mean,
# <name>__q25 / <name>__q75 for a median, and <name>__lo / <name>__hi for the 95% interval of either
# (pipeline.report prints "mean ± sd (lo–hi)" or "median [q25, q75] (lo–hi)" and says which).
SD, Q25, Q75, LO, HI = "__sd", "__q25", "__q75", "__lo", "__hi"
SIBLINGS = (SD, Q25, Q75, LO, HI)


def _t975(n: pl.Expr) -> pl.Expr:
    """Student's t quantile 0.975 with n - 1 degrees of freedom (null below two values)."""
    from scipy import stats

    return n.map_elements(lambda k: float(stats.t.ppf(0.975, k - 1)) if k > 1 else None, return_dtype=pl.Float64)


def mean_sd(column: str | pl.Expr, name: str, low: float | None = None, high: float | None = None) -> list[pl.Expr]:
    """A summary column as the mean, with the standard deviation and the mean's 95% t interval beside it, the
    interval clipped to the values the quantity can take (`low`, `high`: a barrier >= 0, an accuracy in [0, 1])."""
    e = pl.col(column) if isinstance(column, str) else column
    half = _t975(e.count()) * e.std() / e.count().sqrt()
    return [e.mean().alias(name), e.std().alias(name + SD), (e.mean() - half).clip(low, high).alias(name + LO),
            (e.mean() + half).clip(low, high).alias(name + HI)]


def value_range(column: str) -> tuple[float | None, float | None]:
    """The values a metric column can take, by its name: an accuracy in [0, 1], a loss or squared error >= 0."""
    if column.endswith("_acc"):
        return 0.0, 1.0
    return (0.0, None) if column.endswith(("_loss", "_mse")) else (None, None)


def median_iqr(column: str | pl.Expr, name: str) -> list[pl.Expr]:
    """A summary column as the median (for heavy-tailed values), with the quartiles and the median's 95%
    distribution-free interval beside it: the order statistics n/2 ± 1.96 sqrt(n)/2 (binomial, normal
    approximation; below 6 values it is the range, whose coverage is 1 - 2^(1-n); none for one value)."""
    e = pl.col(column) if isinstance(column, str) else column
    n, ordered = e.count(), e.drop_nulls().sort()
    lo = ((n - 1.96 * n.sqrt()) / 2).floor().clip(0).cast(pl.Int64)
    hi = ((n + 1.96 * n.sqrt()) / 2).ceil().clip(upper_bound=n - 1).cast(pl.Int64)
    return [e.median().alias(name), e.quantile(0.25).alias(name + Q25), e.quantile(0.75).alias(name + Q75),
            pl.when(n > 1).then(ordered.get(lo, null_on_oob=True)).alias(name + LO),
            pl.when(n > 1).then(ordered.get(hi, null_on_oob=True)).alias(name + HI)]


# Settings that choose which items a study computes, not what an item's result is: left out of `settings_id`,
# so a study asking for more pairs or other epochs reuses the results it shares with another.
SELECTING = frozenset({"pairs", "epochs", "within"})


def settings_id(settings: dict[str, Any]) -> str:
    """The id a result's row carries for the settings that produced it: 16 hex digits of the canonical JSON of
    every setting but the selecting ones."""
    kept = {k: v for k, v in settings.items() if k not in SELECTING}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Settings(BaseModel):
    """Settings every stage takes; a stage subclasses this with its own fields and defaults."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    samples: int = Field(512, ge=1, description="test inputs used per model")


class Stage(ABC):
    """An analysis stage. Subclasses set `name`, `Settings`, and implement plan and run."""

    name: ClassVar[str]
    Settings: ClassVar[type[Settings]] = Settings
    keys: ClassVar[list[str]] = ["model_id", "epoch"]  # the columns naming one item's result
    every_epoch_stored: ClassVar[bool] = False  # an `epochs` list must be stored by every zoo (pairs meet at each)
    pairs: ClassVar[str] = ""  # "within": it pairs models of a zoo; "across": a model of one zoo with one of another

    @abstractmethod
    def wanted(self, store: Any, zoos: list, settings: Settings) -> list[Item]:
        """Every item these settings ask for of these zoos, stored or not (each with the `keys` columns)."""

    def plan(self, store: Any, zoos: list, settings: Settings) -> list[Item]:
        """The wanted items still to compute: no result of theirs under these settings is in the store yet."""
        done = set(self._stored(store, settings).select(self.keys).iter_rows())
        return [it for it in self.wanted(store, zoos, settings) if tuple(it[k] for k in self.keys) not in done]

    def rows(self, store: Any, zoos: list, settings: Settings, wanted: list[Item] | None = None) -> pl.DataFrame:
        """A study's results: the stored rows of the items its settings want (`wanted`, if known), under those
        settings."""
        stored = self._stored(store, settings)
        wanted = self.wanted(store, zoos, settings) if wanted is None else wanted
        if not wanted or not stored.height:
            return stored.head(0)
        keys = pl.DataFrame([{k: it[k] for k in self.keys} for it in wanted]).unique()
        keys = keys.with_columns(pl.col(k).cast(stored.schema[k]) for k in self.keys)
        return stored.join(keys, on=self.keys, how="semi")

    def _stored(self, store: Any, settings: Settings) -> pl.DataFrame:
        """The stage's stored rows under these settings (none from a store written before rows carried them)."""
        if self.name not in store.stages():
            return pl.DataFrame(schema={k: pl.String for k in [*self.keys, "settings_id"]})
        frame = store.analysis(self.name)
        if "settings_id" not in frame.collect_schema().names():
            return frame.head(0).with_columns(pl.lit(None, dtype=pl.String).alias("settings_id")).collect()
        return frame.filter(pl.col("settings_id") == settings_id(settings.model_dump())).collect()

    @abstractmethod
    def run(self, store_root: str, items: list[Item], settings: dict[str, Any], data_dir: str | None, device: str) -> list[dict]:
        """Compute a chunk of items inside a Ray task; write them as one shard (`write`); return the rows."""

    def write(self, store: Any, items: list[Item], rows: list[dict], settings: dict[str, Any]) -> list[dict]:
        """A chunk's rows as one shard of analysis/<stage>, each with its `settings_id`: a retried task overwrites
        its own shard, the same items under other settings write another."""
        sid = settings_id(settings)
        rows = [{**r, "settings_id": sid} for r in rows]
        store.write_analysis(self.name, shard_name(self.name, items, sid), rows)
        return rows

    def summary_columns(self, rows: pl.DataFrame) -> pl.DataFrame:
        """Per-zoo columns for the study's summary table (a `zoo` column plus the stage's own)."""
        return rows.select("zoo").unique()

    def summary_metrics(self, rows: pl.DataFrame) -> dict[str, float]:
        """`{zoo.column: value}` of the summary columns, for the stage's MLflow run."""
        cols = self.summary_columns(rows)
        return {f"{r['zoo']}.{k}": float(v) for r in cols.iter_rows(named=True) for k, v in r.items()
                if k != "zoo" and isinstance(v, (int, float))}

    def plots(self, rows: pl.DataFrame, out_dir: Path) -> list[Path]:
        return []


STAGES: dict[str, Stage] = {}  # the stages a study may name: `stage:` in its analysis list


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: register one instance of the stage under its `name`."""
    STAGES[cls.name] = cls()
    return cls


def shard_name(stage: str, items: list[Item], sid: str = "") -> str:
    """Deterministic shard name of a chunk of items (and the `settings_id` of their results)."""
    blob = json.dumps(sorted(json.dumps(i, sort_keys=True) for i in items)) + sid
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


# What models must share for one template module and one task to serve them all: the architecture
# config and the task config (which differs per model for per-model-data tasks such as `inr`). Stages
# group items by it, and draw pairs only within it, so a path is evaluated on both endpoints' data.
CONTEXT = pl.concat_str(pl.col("arch_config"), pl.lit("|"), pl.col("task_config").fill_null("")).alias("context")


def ok_models(store: Any, zoo: str) -> pl.DataFrame:
    """(model_id, context, arch_config, learned) of a zoo's models that trained without diverging, in id order
    (`learned` true where the store predates the column)."""
    if zoo not in store.zoos():
        return pl.DataFrame(schema={"model_id": pl.String, "context": pl.String, "arch_config": pl.String,
                                    "learned": pl.Boolean})
    models = store.models(zoo)
    learned = pl.col("learned").fill_null(True) if "learned" in models.collect_schema().names() else pl.lit(True)
    return (models.filter(pl.col("status") == "ok").select("model_id", CONTEXT, "arch_config", learned.alias("learned"))
            .collect().sort("model_id"))


def pair_pool(group: pl.DataFrame) -> list[str]:
    """The models of one group (ok models with a `learned` column) that its pairs are drawn among: those that
    learned, where two did (a pair with a model that never learned is left out of the zoo's statistics), else all
    of them (a phase study's untrained cell: its pairs are that phase's)."""
    learned = group.filter(pl.col("learned"))["model_id"].to_list() if "learned" in group.columns else []
    return learned if len(learned) >= 2 else group["model_id"].to_list()


def item_generator(seed: int, *item: Any) -> torch.Generator:
    """A generator for one item's random draws, seeded by the stage's seed and the item (its model ids): the item's
    result does not depend on which items share its Ray task or in what order, so a resumed run reproduces it."""
    digest = hashlib.sha256(json.dumps([seed, *item], default=str).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def model_context(store: Any, model_id: str, data_dir: str | None) -> tuple[torch.nn.Module, Any]:
    """(template module in eval mode, task) of a stored model, rebuilt from its row."""
    from tasks import task_with_data
    from zoos.archs import build_arch

    row = store.models().filter(pl.col("model_id") == model_id).collect().row(0, named=True)
    options = json.loads(row["task_config"] or "{}")
    options.pop("name", None)
    task = task_with_data(row["task"], options, data_dir)
    return build_arch(row["arch"], task, **json.loads(row["arch_config"] or "{}")).eval(), task


def by_context(items: list[Item], *also: str) -> dict[tuple, list[Item]]:
    """Items grouped by (zoo, context, *also): each group shares one template module and one task
    (and, with also=("epoch",), one checkpoint, so its weights load as one stacked population)."""
    groups: dict[tuple, list[Item]] = defaultdict(list)
    for it in items:
        groups[(it["zoo"], it["context"], *(it[k] for k in also))].append(it)
    return groups


def test_batch(task: Any, samples: int, seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The first `samples` test examples of the task for `seed`."""
    x, y = task.load("test", seed)
    return x[:samples].to(device), y[:samples].to(device)


def stacked(store: Any, model_ids: list[str], device: str, epoch: int | str = "last") -> Any:
    """Stored weights of `model_ids` as `StackedWeights` on `device`."""
    return store.to_torch(pl.col("model_id").is_in(model_ids), epoch=epoch, device=device)


def pair_population(store: Any, group: list[Item], data_dir: str | None, device: str, epoch: int | str = "last"
                    ) -> tuple[torch.nn.Module, Any, Any, dict[str, int]]:
    """(template module, task, stacked weights, model_id -> row) for a group of pair items of one context:
    every model on either side of a pair loaded once."""
    module, task = model_context(store, group[0]["model_a"], data_dir)
    weights = stacked(store, sorted({i["model_a"] for i in group} | {i["model_b"] for i in group}), device, epoch)
    return module, task, weights, {m: i for i, m in enumerate(weights.model_ids)}
