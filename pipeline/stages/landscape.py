"""Landscape stage: per model and checkpoint, the Hessian's top eigenvalue and its trace on a test batch.

Hessian-vector products of the task loss, vmapped over the stacked population (`analysis.landscape`):
power iteration for the eigenvalue of largest magnitude (with the last relative change, so a run that
did not converge shows it) and Hutchinson's trace with its standard error, probes added until that error is
a stated fraction of the trace (`trace_rel_se`; a model that reaches `probes` first is counted imprecise). `trace_per_param` (trace /
parameter count, the mean eigenvalue) makes zoos of different sizes comparable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import torch
from pydantic import Field

from analysis import plots
from pipeline.stages.checkpoint import CheckpointSettings, CheckpointStage
from pipeline.stages.common import item_generator, median_iqr, register_stage, test_batch


class LandscapeSettings(CheckpointSettings):
    samples: int = Field(256, ge=1, description="test inputs in the loss whose Hessian is taken")
    iters: int = Field(30, ge=2, description="power-iteration steps at most")
    tol: float = Field(1e-3, gt=0, description="power iteration stops when every model changes by less (relative)")
    probes: int = Field(64, ge=2, description="Rademacher probes of Hutchinson's trace estimate, at most")
    trace_rel_se: float = Field(0.05, gt=0, le=1, description="probes are added (8 at least) until the trace's "
                                "standard error is at most this fraction of |trace|, or `probes` are spent")


@register_stage
class Landscape(CheckpointStage):
    name = "landscape"
    Settings = LandscapeSettings

    def measure(self, module: torch.nn.Module, task: Any, params: dict, buffers: dict, settings: dict[str, Any],
                device: str, model_ids: list[str]) -> dict[str, Any]:
        from analysis.landscape import hessian_top_eigenvalue, hessian_trace

        x, y = test_batch(task, settings["samples"], settings["seed"], device)
        gens = [item_generator(settings["seed"], m) for m in model_ids]  # each model's draws its own
        top = hessian_top_eigenvalue(module, params, buffers, x, y, task.loss, iters=settings["iters"],
                                     tol=settings["tol"], generator=gens)
        trace = hessian_trace(module, params, buffers, x, y, task.loss, n_samples=settings["probes"],
                              rel_se=settings["trace_rel_se"], generator=gens)
        n_params = sum(p[0].numel() for p in params.values())
        return {"hessian_top": top.value, "hessian_top_rel_change": top.rel_change, "power_iters": top.iterations,
                "hessian_trace": trace.mean, "hessian_trace_se": trace.se, "trace_per_param": trace.mean / n_params,
                "trace_probes": trace.n_samples, "trace_precise": trace.precise(settings["trace_rel_se"]),
                "n_params": n_params, "samples": int(x.shape[0])}

    def summary_columns(self, rows: pl.DataFrame) -> pl.DataFrame:
        last = rows.filter(pl.col("epoch") == pl.col("epoch").max().over("model_id"))
        rel_se = pl.col("hessian_trace_se") / pl.col("hessian_trace").abs()
        aggs = [*median_iqr("hessian_top", "hessian_top"), *median_iqr("hessian_trace", "hessian_trace"),
                *median_iqr(rel_se, "trace_rel_se")]
        if "trace_precise" in last.columns:  # results stored before the precision rule have no such column
            aggs.append((~pl.col("trace_precise")).sum().alias("trace_imprecise"))
        return last.group_by("zoo").agg(aggs)

    def plots(self, rows: pl.DataFrame, out_dir: Path) -> list[Path]:
        return [plots.metric_vs_epoch(rows, "hessian_top", out_dir / "hessian_top.png", log=True),
                plots.metric_vs_epoch(rows, "trace_per_param", out_dir / "hessian_trace_per_param.png")]
