"""Similarity stages: how alike the models of a zoo are, in their features and in their weights.

`similarity` (over model pairs, at chosen checkpoints): linear CKA between the two models' features,
layer by layer, on one batch of test inputs (`analysis.representation`), next to two weight distances:
the plain L2 distance ||θa - θb|| and, for ReLU MLPs, the canonical-form distance (`analysis.canonical`),
which is 0 for networks equal up to hidden-neuron permutation and positive scaling. The canonical form
rescales every hidden neuron to a unit incoming vector, so its distance is on its own scale, not a
fraction of the L2 distance: compare canonical distances with each other (across pairs, epochs, zoos).
The features compared are the outputs of every activation module (in the module's order) and the
model's output (`output`), or the submodules named by the `layers` setting. Pairs are drawn among
models of one architecture config (they stack as one population), or with `within: seeds` only among
models equal in every factor but the seed. One row per (pair, epoch), per-layer values as lists.

`funcdim` (per model, at chosen checkpoints): the functional dimension, i.e. the rank of the Jacobian of
the outputs on a batch with respect to all parameters, next to the parameter count and, for MLPs with
a positively homogeneous activation (ReLU, leaky ReLU), the bound #params - #hidden neurons that
per-neuron scaling leaves. Other architectures have no such bound: their rows say `bound_applicable =
false` and carry a null bound.
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import Any, Literal

import polars as pl
import torch
from pydantic import Field
from torch import nn

from analysis import plots
from pipeline.stages.checkpoint import CheckpointSettings, CheckpointStage
from pipeline.stages.common import CONTEXT, Item, Settings, Stage, by_context, mean_sd, median_iqr, ok_models, pair_pool, pair_population, register_stage, test_batch
from pipeline.stages.interpolation import last_epoch_rows, pick_epochs, sample_pairs, stored_epochs
from zoos.archs.base import ACTIVATIONS
from zoos.spec import FACTORS

# Pointwise activations whose outputs are the default CKA layers.
ACTIVATION_MODULES = tuple(a.module for a in ACTIVATIONS.values())
# Activations with act(c z) = c act(z) for c > 0: an MLP using one has the per-neuron scaling symmetry.
HOMOGENEOUS = tuple(name for name, a in ACTIVATIONS.items() if a.homogeneous)
OUTPUT = "output"


def homogeneous_mlp(module: nn.Module) -> bool:
    """Whether `module` is symzoo's sequential MLP with a positively homogeneous activation."""
    return getattr(module, "arch_name", "") == "mlp" and module.config.get("activation") in HOMOGENEOUS


def feature_layers(module: nn.Module, wanted: list[str] | None) -> dict[str, str]:
    """{label: submodule name} of the features CKA compares; `output` (the model's output) is the root module."""
    if wanted:
        return {name: "" if name == OUTPUT else name for name in wanted}
    acts = [name for name, m in module.named_modules() if isinstance(m, ACTIVATION_MODULES)]
    return {**{name: name for name in acts}, OUTPUT: ""}


def pairs_of_zoo(models: pl.DataFrame, k: int, within: str, key: str) -> list[tuple[str, str, str]]:
    """(model_a, model_b, context) pairs among models of one context (arch + task config); within='seeds': equal in every factor but seed."""
    by = ["context"] + ([f for f in FACTORS if f != "seed" and f in models.columns] if within == "seeds" else [])
    out: list[tuple[str, str, str]] = []
    for _, group in models.group_by(by, maintain_order=True):
        config = group["context"][0]
        out += [(a, b, config) for a, b in sample_pairs(pair_pool(group), 0, key)]
    if k and len(out) > k:
        out = sorted(random.Random(key).sample(out, k))
    return out


class SimilaritySettings(Settings):
    samples: int = Field(256, ge=4, description="test inputs whose features are compared")
    pairs: int = Field(16, ge=0, description="model pairs sampled per zoo (among models of one architecture config); 0 = all pairs")
    within: Literal["zoo", "seeds"] = Field(
        "zoo", description="pair any two models of one architecture config ('zoo'), or only models differing in seed alone ('seeds')")
    epochs: Literal["last", "all"] | list[int] = Field(
        "last", description="checkpoints to compare at: 'last', 'all' stored, or a list of epochs")
    layers: list[str] | None = Field(
        None, description="submodules whose outputs are compared ('output' = the model's output); default: every activation + output")
    debiased: bool = Field(False, description="debiased CKA (unbiased HSIC): ~0 for unrelated features even when wider than the batch")


@register_stage
class Similarity(Stage):
    name = "similarity"
    Settings = SimilaritySettings
    every_epoch_stored = True
    pairs = "within"
    keys = ["zoo", "model_a", "model_b", "epoch"]

    def wanted(self, store: Any, zoos: list, settings: SimilaritySettings) -> list[Item]:
        items: list[Item] = []
        for zoo in zoos:
            if zoo.name not in store.zoos():
                continue
            models = store.models(zoo.name).with_columns(CONTEXT).drop("learned", strict=False).collect().join(
                ok_models(store, zoo.name).select("model_id", "learned"), on="model_id").sort("model_id")
            epochs = stored_epochs(store, zoo.name)
            for a, b, config in pairs_of_zoo(models, settings.pairs, settings.within, f"{settings.seed}:{zoo.name}"):
                common = sorted(set(epochs[a]) & set(epochs[b]))
                items += [{"zoo": zoo.name, "model_a": a, "model_b": b, "context": config, "epoch": e}
                          for e in pick_epochs(common, settings.epochs, f"zoo {zoo.name!r}")]
        return items

    def run(self, store_root: str, items: list[Item], settings: dict[str, Any], data_dir: str | None, device: str) -> list[dict]:
        """Items sharing (zoo, arch config, epoch): features of every model involved taken once, as one population."""
        from zoos.store import Store

        store = Store(store_root)
        rows: list[dict] = []
        for (zoo, _, epoch), group in by_context(items, "epoch").items():
            module, task, weights, index = pair_population(store, group, data_dir, device, epoch)
            result = compare_population(module.to(device), task, weights.tensors, settings, device)
            for it in group:
                a, b = index[it["model_a"]], index[it["model_b"]]
                rows.append({"zoo": zoo, "model_a": it["model_a"], "model_b": it["model_b"], "epoch": int(epoch),
                             **pair_row(result, a, b)})
        return self.write(store, items, rows, settings)

    def summary_columns(self, rows: pl.DataFrame) -> pl.DataFrame:
        last = last_epoch_rows(rows, ["zoo", "model_a", "model_b"])
        return last.group_by("zoo").agg(pl.len().alias("similarity_pairs"), *mean_sd("cka_output", "cka_output", 0, 1),
                                        *mean_sd("cka_penultimate", "cka_penult", 0, 1), *median_iqr("l2_distance", "l2_dist"),
                                        *median_iqr("canonical_distance", "canon_dist"))

    def plots(self, rows: pl.DataFrame, out_dir: Path) -> list[Path]:
        last = last_epoch_rows(rows, ["zoo", "model_a", "model_b"])
        out = [plots.cka_heatmap(last, "cka_output", out_dir / "cka_output.png"),
               plots.cka_vs_layer(last, out_dir / "cka_vs_layer.png")]
        if last["canonical_distance"].is_not_null().any():
            out.append(plots.distance_scatter(last.filter(pl.col("canonical_distance").is_not_null()),
                                              "l2_distance", "canonical_distance", out_dir / "canonical_vs_l2.png"))
        return out


def compare_population(module: nn.Module, task: Any, tensors: dict[str, torch.Tensor], settings: dict[str, Any],
                       device: str) -> dict[str, Any]:
    """[N, N] CKA per layer, L2 distance and (ReLU MLPs) canonical distance between all N stacked models."""
    from analysis.canonical import mlp_layers, pairwise_canonical_distance
    from analysis.representation import cka_matrix, population_features
    from zoos.functional import split_state

    params, buffers = split_state(module, tensors)
    x, _ = test_batch(task, settings["samples"], settings["seed"], device)
    layers = feature_layers(module, settings["layers"])
    with torch.no_grad():
        feats = population_features(module, params, buffers, x, list(dict.fromkeys(layers.values())))
    cka = {}
    for label, name in layers.items():
        f = feats[name]
        f = f.unsqueeze(-1) if f.dim() == 2 else f  # a scalar output per example: one feature
        cka[label] = cka_matrix(f, f, debiased=settings["debiased"]).double().cpu()
    flat = torch.cat([params[k].flatten(1) for k in sorted(params)], 1).double()
    l2 = torch.cdist(flat[None], flat[None])[0].cpu()
    canonical = None
    if homogeneous_mlp(module):
        double = {k: v.double() for k, v in params.items()}
        canonical = pairwise_canonical_distance(double, mlp_layers(module)).cpu()
    hidden = [label for label in layers if label != OUTPUT]
    return {"layers": list(layers), "cka": cka, "l2": l2, "canonical": canonical,
            "penultimate": hidden[-1] if hidden else None, "samples": int(x.shape[0]), "debiased": settings["debiased"]}


def pair_row(result: dict[str, Any], a: int, b: int) -> dict[str, Any]:
    """The stored columns of pair (a, b) from `compare_population`'s matrices."""
    cka = [float(result["cka"][label][a, b]) for label in result["layers"]]
    by_label = dict(zip(result["layers"], cka))
    return {
        "layers": result["layers"], "cka": cka,
        "cka_output": by_label.get(OUTPUT),
        "cka_penultimate": by_label[result["penultimate"]] if result["penultimate"] else None,
        "l2_distance": float(result["l2"][a, b]),
        "canonical_applicable": result["canonical"] is not None,
        "canonical_distance": float(result["canonical"][a, b]) if result["canonical"] is not None else None,
        "samples": result["samples"], "debiased": result["debiased"],
    }


class FuncdimSettings(CheckpointSettings):
    samples: int = Field(1024, ge=1, description="test inputs in the Jacobian at most (rows = samples x outputs; a rank "
                                                 "reaching the rows is only a lower bound: `rank_capped`)")
    max_entries: int = Field(20_000_000, ge=1, description="Jacobian entries at most (float64); fewer samples are used above it")


@register_stage
class Funcdim(CheckpointStage):
    name = "funcdim"
    Settings = FuncdimSettings

    def measure(self, module: torch.nn.Module, task: Any, params: dict, buffers: dict, settings: dict[str, Any],
                device: str, model_ids: list[str]) -> dict[str, Any]:
        from analysis.representation import functional_dimension, relu_mlp_bound

        n_params = sum(p[0].numel() for p in params.values())
        n_out = math.prod(task.output_shape)
        b = max(1, min(settings["samples"], settings["max_entries"] // (n_out * n_params)))
        x, _ = test_batch(task, b, settings["seed"], device)
        model = copy.deepcopy(module).double()
        n = next(iter(params.values())).shape[0]
        ranks = []
        for i in range(n):
            state = {k: v[i].double() for k, v in {**params, **buffers}.items()}
            ranks.append(functional_dimension(model, state, x.double()).rank)
        rank = torch.tensor(ranks, dtype=torch.float64)
        applicable = homogeneous_mlp(module)
        bound = relu_mlp_bound(module) if applicable else None
        return {"rank": rank, "n_params": n_params, "bound": bound, "bound_applicable": applicable,
                "rank_over_bound": rank / bound if applicable else None, "rank_over_params": rank / n_params,
                "jacobian_rows": int(x.shape[0]) * n_out, "samples": int(x.shape[0]),
                "rank_capped": rank >= int(x.shape[0]) * n_out}  # full row rank: more rows could show more

    def summary_columns(self, rows: pl.DataFrame) -> pl.DataFrame:
        last = rows.filter(pl.col("epoch") == pl.col("epoch").max().over("model_id"))
        capped = [pl.col("rank_capped").sum().alias("fdim_capped")] if "rank_capped" in last.columns else []
        return last.group_by("zoo").agg(*median_iqr("rank_over_params", "fdim_over_params"),
                                        *median_iqr("rank_over_bound", "fdim_over_bound"), *capped)

    def plots(self, rows: pl.DataFrame, out_dir: Path) -> list[Path]:
        last = rows.filter(pl.col("epoch") == pl.col("epoch").max().over("model_id"))
        out = [plots.rank_vs_bound(last, out_dir / "functional_dimension.png")]
        if rows["epoch"].n_unique() > 1:
            out.append(plots.metric_vs_epoch(rows, "rank_over_params", out_dir / "functional_dimension_vs_epoch.png"))
        return out
