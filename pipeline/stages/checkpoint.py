"""What the per-checkpoint metric stages share: an `epochs` setting and planning over (model, epoch).

A metric stage (landscape, weightspace, lie, similarity) measures every ok model of a zoo at the
checkpoints its `epochs` setting picks: `last` (each model's last stored epoch), `all` (every stored
checkpoint: how the metric evolves through training) or a list of epochs (those a zoo stored; a zoo
that stored none of them contributes nothing). A result is keyed by (model_id, epoch), so a second
run computes only checkpoints not stored yet. Inside the Ray task, items are grouped by (zoo, arch
config, epoch): each group is one stacked population, loaded at that epoch and measured at once.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Literal

import polars as pl
import torch
from pydantic import field_validator

from pipeline.stages.common import Item, Settings, Stage, by_context, model_context, ok_models, stacked

Epochs = Literal["last", "all"] | list[int]


class CheckpointSettings(Settings):
    """Settings of a stage measured per checkpoint."""

    epochs: Epochs = "last"

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("epochs list is empty; give epochs such as [0, 5], or 'last' or 'all'")
            bad = [e for e in v if e < 0]
            if bad:
                raise ValueError(f"epochs must be >= 0, got {bad[0]}; allowed: 'last', 'all' or a list of epochs")
        return v


def chosen_checkpoints(store: Any, zoo: str, epochs: Epochs) -> pl.DataFrame:
    """(model_id, epoch) of a zoo's stored checkpoints that the `epochs` setting picks."""
    ck = store.checkpoints(zoo=zoo).select("model_id", "epoch").collect()
    if epochs == "last":
        ck = ck.filter(pl.col("epoch") == pl.col("epoch").max().over("model_id"))
    elif epochs != "all":
        ck = ck.filter(pl.col("epoch").is_in(list(epochs)))
    return ck.sort("model_id", "epoch")


class CheckpointStage(Stage):
    """A stage computing per-model values at chosen checkpoints; subclasses implement `measure`."""

    Settings = CheckpointSettings

    keys = ["model_id", "epoch"]

    def wanted(self, store: Any, zoos: list, settings: CheckpointSettings) -> list[Item]:
        items: list[Item] = []
        for zoo in zoos:
            models = ok_models(store, zoo.name)
            if not models.height:
                continue
            ck = chosen_checkpoints(store, zoo.name, settings.epochs).join(models, on="model_id")
            items += [{"zoo": zoo.name, "model_id": m, "epoch": int(e), "context": c}
                      for m, e, c in ck.select("model_id", "epoch", "context").iter_rows()]
        return items

    def run(self, store_root: str, items: list[Item], settings: dict[str, Any], data_dir: str | None, device: str) -> list[dict]:
        from zoos.functional import split_state
        from zoos.store import Store

        store = Store(store_root)
        rows: list[dict] = []
        for (zoo, _, epoch), group in by_context(items, "epoch").items():
            module, task = model_context(store, group[0]["model_id"], data_dir)
            module = module.to(device)
            weights = stacked(store, [i["model_id"] for i in group], device, epoch=epoch)
            params, buffers = split_state(module, weights.tensors)
            values = self.measure(module, task, params, buffers, settings, device, model_ids=weights.model_ids)
            for i, mid in enumerate(weights.model_ids):
                rows.append({"zoo": zoo, "model_id": mid, "epoch": epoch, **{k: _cell(v, i) for k, v in values.items()}})
        return self.write(store, items, rows, settings)

    @abstractmethod
    def measure(self, module: torch.nn.Module, task: Any, params: dict, buffers: dict, settings: dict[str, Any],
                device: str, model_ids: list[str]) -> dict[str, Any]:
        """Columns for N stacked models (`model_ids`, for draws of their own: `item_generator`): a tensor [N, ...]
        holds one entry per model; any other value is shared by all."""


def _cell(value: Any, i: int) -> Any:
    """Model i's entry of a measured column."""
    if isinstance(value, torch.Tensor):
        v = value[i] if value.dim() else value
        return v.tolist() if v.dim() else v.item()
    return value
