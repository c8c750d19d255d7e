"""Interpolation stage: weight matching of sampled pairs, then the linear path naive and aligned.

All λ of all pairs of a chunk are evaluated as one vectorised population; barriers in sup and midpoint
form, for loss and for error, and the relative barrier reduction that weight matching buys.
`epochs: all` (or a list) repeats the same pairs at every stored checkpoint: the barrier against
training time, one row per (pair, epoch). `InterpolationCross` is the sibling stage whose pairs join
two zoos of one architecture (models that differ in learning rate, optimiser, data, ...).

Attention heads. Matching is head-aware by default (the spec's block groups: heads matched as wholes).
`heads: unaware` (or `both`, alongside) matches with the head structure forgotten: each attention's
dimensions as one flat permutation, which is not a symmetry, so the permuted b computes another function.
Its path is therefore measured against the true endpoints: the barrier is max_l [loss(l) - ((1 - l)
loss(a) + l loss(b))] with b unpermuted, so a merge that breaks b is charged for it at l = 1 too; the
loss it adds to b itself is `unaware_endpoint_loss`. `repair: true` adds the aligned path after REPAIR
(`analysis.connectivity.repair_path`: linear layers and LayerNorm affines renormalised per feature).
`matching: activation` aligns by the correlation of hidden activations on `match_samples` training inputs
instead of by weights (Git Re-Basin's §3.1; heads as wholes the same way).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any, Hashable, Literal, Mapping, Sequence

import polars as pl
import torch
from pydantic import Field

from analysis import plots
from pipeline.stages.common import Item, Settings, Stage, by_context, item_generator, mean_sd, ok_models, pair_pool, pair_population, register_stage
from zoos.spec import FACTORS


class InterpolationSettings(Settings):
    pairs: int = Field(8, ge=0, description="model pairs sampled per zoo and architecture config, spread evenly over the cells of its varied factors with no model reused while one is unused; 0 = every pair within each cell (models equal in all factors but seed)")
    lambdas: int = Field(25, ge=3, le=1001, description="points on the path, ends included (odd: the midpoint is one)")
    epochs: Literal["last", "all"] | list[int] = Field(
        "last", description="checkpoints to interpolate at: 'last', 'all' stored, or a list of epochs")
    restarts: int = Field(4, ge=1, description="weight-matching restarts per pair (the best objective is kept); "
                          "1 = one coordinate descent from the identity")
    heads: Literal["aware", "unaware", "both"] = Field(
        "aware", description="attention heads in matching: 'aware' matches heads as wholes (a symmetry), 'unaware' "
        "treats each attention's dimensions as one flat permutation (not a symmetry: measured against the true "
        "endpoints), 'both' adds the unaware path as *_unaware columns; the same for networks without heads")
    repair: bool = Field(False, description="also evaluate the aligned path after REPAIR (per-feature renormalisation "
                         "of linear layers and LayerNorms, on `repair_samples` training inputs): *_repair columns")
    repair_samples: int = Field(256, ge=1, description="training inputs REPAIR measures its statistics on")
    matching: Literal["weight", "activation"] = Field(
        "weight", description="how b is aligned to a: 'weight' matching (coordinate descent on the weights' inner "
        "products, with `restarts`) or 'activation' matching (correlation of hidden activations on `match_samples` "
        "training inputs)")
    match_samples: int = Field(512, ge=2, description="training inputs activation matching correlates units on")


def sample_pairs(ids: list[str], k: int, key: str, cells: Mapping[str, Hashable] | None = None) -> list[tuple[str, str]]:
    """`k` unordered pairs of `ids` drawn reproducibly from `key`, sorted (k = 0: every pair within each cell; k
    at least the number of pairs: all pairs).

    Rules, in order: (1) pairs join two models of one cell (`cells`: model -> cell, the combination of
    non-seed factors a phase report averages over; None: one cell), since a report only counts pairs
    within a cell; (2) k is split across cells with two or more models as evenly as their pair counts
    allow (remainder to random cells), so every such cell gets a pair when k >= their number; (3) within
    a cell, pair counts per model differ by at most 1 (no model is reused while one is unused); (4) only
    when every within-cell pair is taken do the rest join cells, spreading over the least-used models.
    """
    everything = list(itertools.combinations(sorted(ids), 2))
    members: dict[Hashable, list[str]] = {}
    for m in sorted(ids):
        members.setdefault(cells.get(m) if cells is not None else None, []).append(m)
    groups = [members[c] for c in sorted(members, key=repr) if len(members[c]) >= 2]
    if not k:
        return sorted(p for g in groups for p in itertools.combinations(g, 2))
    if k >= len(everything):
        return everything
    rng = random.Random(key)
    quotas = _split(k, [len(g) * (len(g) - 1) // 2 for g in groups], rng)
    pairs = [p for g, q in zip(groups, quotas) for p in _balanced(g, q, rng)]
    if len(pairs) < k:
        pairs += _spread(sorted(ids), k - len(pairs), set(pairs), rng)
    return sorted(pairs)


def _split(k: int, caps: list[int], rng: random.Random) -> list[int]:
    """k split into parts no larger than `caps`, as equal as the caps allow; the remainder to random parts."""
    quotas = [0] * len(caps)
    while k:
        open_ = [i for i, c in enumerate(caps) if quotas[i] < c]
        if not open_:
            break
        share, extra = divmod(k, len(open_))
        if not share:
            for i in rng.sample(open_, extra):
                quotas[i] += 1
            break
        for i in open_:
            add = min(share, caps[i] - quotas[i])
            quotas[i] += add
            k -= add
    return quotas


def _balanced(members: list[str], k: int, rng: random.Random) -> list[tuple[str, str]]:
    """k distinct pairs among `members` (k <= all pairs) whose per-model counts differ by at most 1.

    The counts (2k spread over the models, the odd ones at random) form a near-regular degree sequence,
    which is always graphical; Havel-Hakimi realises it, ties broken at random."""
    q, r = divmod(2 * k, len(members))
    extra = set(rng.sample(members, r))
    need = {m: q + (m in extra) for m in members}
    pairs: list[tuple[str, str]] = []
    while True:
        order = sorted(members, key=lambda m: (-need[m], rng.random()))
        v = order[0]
        if not need[v]:
            return pairs
        for u in order[1:need[v] + 1]:
            need[u] -= 1
            pairs.append((min(u, v), max(u, v)))
        need[v] = 0


def _spread(members: list[str], k: int, taken: set[tuple[str, str]], rng: random.Random) -> list[tuple[str, str]]:
    """k more pairs not in `taken`, each joining a least-used model that has a free partner to its least-used free partner."""
    count = {m: 0 for m in members}
    for a, b in taken:
        count[a] += 1
        count[b] += 1
    free = {m: [o for o in members if o != m and (min(m, o), max(m, o)) not in taken] for m in members}
    pairs: list[tuple[str, str]] = []
    for _ in range(k):
        u = min((m for m in members if free[m]), key=lambda m: (count[m], rng.random()))
        v = min(free[u], key=lambda m: (count[m], rng.random()))
        free[u].remove(v)
        free[v].remove(u)
        count[u] += 1
        count[v] += 1
        pairs.append((min(u, v), max(u, v)))
    return pairs


def sample_cross(ids_a: list[str], ids_b: list[str], k: int, key: str) -> list[tuple[str, str]]:
    """`k` (a, b) pairs, a from `ids_a` and b from `ids_b`, drawn reproducibly from `key`, sorted (k = 0, or k
    at least all pairs: all); on each side pair counts per model differ by at most 1."""
    everything = sorted(itertools.product(sorted(ids_a), sorted(ids_b)))
    if not k or k >= len(everything):
        return everything
    rng = random.Random(key)

    def counts(ids: list[str]) -> dict[str, int]:
        q, r = divmod(k, len(ids))
        extra = set(rng.sample(sorted(ids), r))
        return {m: q + (m in extra) for m in sorted(ids)}

    need_a, need_b = counts(ids_a), counts(ids_b)
    pairs: list[tuple[str, str]] = []
    for a in sorted(need_a, key=lambda m: (-need_a[m], rng.random())):  # Gale-Ryser greedy: always succeeds
        for b in sorted(need_b, key=lambda m: (-need_b[m], rng.random()))[:need_a[a]]:
            need_b[b] -= 1
            pairs.append((a, b))
    return sorted(pairs)


def factor_cells(store: Any, zoo: str) -> dict[str, tuple]:
    """model_id -> its values of the non-seed factors that vary among the zoo's ok models: the finest cell a
    phase report can form, so a pair within it is within every report cell."""
    if zoo not in store.zoos():
        return {}
    models = store.models(zoo).filter(pl.col("status") == "ok").collect()
    varied = [f for f in FACTORS if f != "seed" and f in models.columns and models[f].n_unique() > 1]
    return {row[0]: row[1:] for row in models.select("model_id", *varied).iter_rows()}


def stored_epochs(store: Any, zoo: str) -> dict[str, list[int]]:
    """model_id -> its stored checkpoint epochs (metadata only: no weight file is opened)."""
    frame = store.checkpoints(zoo=zoo).select("model_id", "epoch").collect()
    return {m: sorted(g["epoch"].to_list()) for (m,), g in frame.group_by("model_id")}


def pick_epochs(common: list[int], wanted: str | list[int], where: str) -> list[int]:
    """The epochs of `common` (the stored epochs a pair shares) that the `epochs` setting asks for."""
    if wanted == "last":
        return common[-1:]
    if wanted == "all":
        return common
    missing = sorted(set(wanted) - set(common))
    if missing:
        raise ValueError(f"epochs: {missing} not stored for {where}; stored epochs: {common}")
    return sorted(set(wanted))


def _train_inputs(task: Any, count: int) -> list[torch.Tensor]:
    """The first `count` training inputs, in batches of 256: what REPAIR and activation matching observe."""
    from zoos.trainer import DATA_SEED

    return list(task.load("train", DATA_SEED)[0][:count].split(256))


def _align(module: torch.nn.Module, task: Any, spec: Any, a: dict, b: dict, settings: dict[str, Any],
           gens: list[torch.Generator]) -> tuple[dict, list]:
    """b's stacked pairs matched to a's under `spec` (by weights or by activations, as `settings` say), pair p's
    weight matching drawing from gens[p]: (aligned stacked b, one MatchResult per pair)."""
    from analysis.matching import RESTARTS, activation_matching, weight_matching
    from zoos.permspec import apply_permutation

    by_activations = settings.get("matching", "weight") == "activation"
    batches = _train_inputs(task, settings.get("match_samples", 512)) if by_activations else None
    aligned, matches = {k: v.clone() for k, v in b.items()}, []
    for p in range(next(iter(a.values())).shape[0]):
        ap, bp = {k: v[p] for k, v in a.items()}, {k: v[p] for k, v in b.items()}
        if by_activations:
            match = activation_matching(module, spec, ap, bp, batches, device=next(iter(ap.values())).device)
        else:
            match = weight_matching(spec, ap, bp, generator=gens[p], restarts=settings.get("restarts", RESTARTS))
        for k, v in apply_permutation(spec, bp, match.perms).items():
            aligned[k][p] = v
        matches.append(match)
    return aligned, matches


def _barrier_between(values: torch.Tensor, lam: torch.Tensor, ends: torch.Tensor, form: str = "sup") -> torch.Tensor:
    """The barrier of curves values [P, L] against given endpoint values ends [P, 2] (not the curves' own ends)."""
    lam = lam.to(values.dtype)
    line = (1 - lam) * ends[:, :1] + lam * ends[:, 1:]
    if form == "sup":
        return (values - line).amax(-1)
    mid = int((lam - 0.5).abs().argmin())
    return values[:, mid] - line[:, mid]


def connect_pairs(module: torch.nn.Module, task: Any, a: dict, b: dict, settings: dict[str, Any], device: str,
                  pairs: Sequence[tuple[str, str]] | None = None) -> list[dict]:
    """Per stacked pair (a[p], b[p]): weight-match b to a, then loss and error along both linear paths (and the
    head-unaware and REPAIRed paths where the settings ask). `pairs`: the pairs' model ids, which seed each pair's
    matching (`item_generator`) so that its result does not depend on the pairs beside it (default: its index)."""
    from analysis.connectivity import barrier, barrier_reduction, evaluate_path, linear_path, repair_path
    from zoos.trainer import DATA_SEED

    spec, n = module.perm_spec(), next(iter(a.values())).shape[0]
    heads = settings.get("heads", "aware")
    pairs = list(pairs) if pairs is not None else [(str(p), "") for p in range(n)]
    gens = [item_generator(settings["seed"], *pair) for pair in pairs]
    aligned, matches = _align(module, task, spec if heads != "unaware" else spec.unstructured(), a, b, settings, gens)
    kw = dict(lambdas=settings["lambdas"], pairs=True, splits=("test",), seed=DATA_SEED,
              max_examples=settings["samples"], device=device)
    naive, matched = linear_path(module, a, b, task, **kw), linear_path(module, a, aligned, task, **kw)
    lam = naive.lambdas
    loss_n, loss_a, err_n, err_a = naive.loss["test"], matched.loss["test"], naive.error("test"), matched.error("test")
    ends_loss, ends_err = loss_n[:, [0, -1]], err_n[:, [0, -1]]
    has_mid = len(lam) % 2 == 1
    if heads == "unaware":  # not a symmetry: b's permuted copy is another function, so measure against a and b
        b_aligned, e_aligned = _barrier_between(loss_a, lam, ends_loss), _barrier_between(err_a, lam, ends_err)
        mid_aligned = _barrier_between(loss_a, lam, ends_loss, "midpoint") if has_mid else None
    else:
        b_aligned, e_aligned = barrier(loss_a, lam), barrier(err_a, lam)
        mid_aligned = barrier(loss_a, lam, "midpoint") if has_mid else None
    b_naive = barrier(loss_n, lam)
    reduction = barrier_reduction(b_naive, b_aligned)
    rows = [{
        "lambdas": lam.tolist(),
        "test_loss_naive": loss_n[p].tolist(), "test_loss_aligned": loss_a[p].tolist(),
        "test_err_naive": err_n[p].tolist(), "test_err_aligned": err_a[p].tolist(),
        "barrier_loss_naive": float(b_naive[p]), "barrier_loss_aligned": float(b_aligned[p]),
        "barrier_err_naive": float(barrier(err_n[p], lam)), "barrier_err_aligned": float(e_aligned[p]),
        "midpoint_loss_naive": float(barrier(loss_n[p], lam, "midpoint")) if has_mid else None,
        "midpoint_loss_aligned": float(mid_aligned[p]) if has_mid else None,
        "barrier_reduction": float(reduction[p]), "matching_sweeps": matches[p].sweeps,
        # best objective over the restarts, and their range (max - min): 0 when every restart agrees
        "matching_objective": matches[p].objective[-1] if matches[p].objective else None,
        "matching_restart_spread": (max(matches[p].restart_objectives) - min(matches[p].restart_objectives)
                                    if matches[p].restart_objectives else None),
    } for p in range(n)]
    if heads == "unaware":
        for p, row in enumerate(rows):
            row["unaware_endpoint_loss"] = float(loss_a[p, -1] - loss_n[p, -1])
    if heads == "both":
        flat, _ = _align(module, task, spec.unstructured(), a, b, settings,
                         [item_generator(settings["seed"], *pair, "unaware") for pair in pairs])
        path = linear_path(module, a, flat, task, **kw)
        loss_u, err_u = path.loss["test"], path.error("test")
        b_u = _barrier_between(loss_u, lam, ends_loss)
        e_u = _barrier_between(err_u, lam, ends_err)
        mid_u = _barrier_between(loss_u, lam, ends_loss, "midpoint") if has_mid else None
        red_u = barrier_reduction(b_naive, b_u)
        for p, row in enumerate(rows):
            row.update({"test_loss_unaware": loss_u[p].tolist(), "test_err_unaware": err_u[p].tolist(),
                        "barrier_loss_unaware": float(b_u[p]), "barrier_err_unaware": float(e_u[p]),
                        "midpoint_loss_unaware": float(mid_u[p]) if has_mid else None,
                        "barrier_reduction_unaware": float(red_u[p]),
                        "unaware_endpoint_loss": float(loss_u[p, -1] - loss_n[p, -1])})
    if settings.get("repair"):
        batches = _train_inputs(task, settings.get("repair_samples", 256))
        paths = [repair_path(module, spec, {k: v[p] for k, v in a.items()}, {k: v[p] for k, v in aligned.items()}, lam,
                             batches) for p in range(n)]
        states = {k: torch.stack([path[k] for path in paths]) for k in paths[0]}
        fixed = evaluate_path(module, states, lam, task, pairs=True, splits=("test",), seed=DATA_SEED,
                              max_examples=settings["samples"], device=device)
        loss_r, err_r = fixed.loss["test"], fixed.error("test")
        b_r, e_r = _barrier_between(loss_r, lam, ends_loss), _barrier_between(err_r, lam, ends_err)
        for p, row in enumerate(rows):
            row.update({"test_loss_repair": loss_r[p].tolist(), "test_err_repair": err_r[p].tolist(),
                        "barrier_loss_repair": float(b_r[p]), "barrier_err_repair": float(e_r[p])})
    return rows


def last_epoch_rows(rows: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Each pair's row at its latest interpolated epoch (what the summary and the heatmap show)."""
    return rows.filter(pl.col("epoch") == pl.col("epoch").max().over(keys))


@register_stage
class Interpolation(Stage):
    name = "interpolation"
    Settings = InterpolationSettings
    every_epoch_stored = True
    pairs = "within"
    keys = ["zoo", "model_a", "model_b", "epoch"]

    def wanted(self, store: Any, zoos: list, settings: InterpolationSettings) -> list[Item]:
        items: list[Item] = []
        for zoo in zoos:
            epochs = stored_epochs(store, zoo.name) if zoo.name in store.zoos() else {}
            cells = factor_cells(store, zoo.name)
            for (config,), group in ok_models(store, zoo.name).group_by("context", maintain_order=True):
                for a, b in sample_pairs(pair_pool(group), settings.pairs, f"{settings.seed}:{zoo.name}", cells):
                    common = sorted(set(epochs[a]) & set(epochs[b]))
                    items += [{"zoo": zoo.name, "model_a": a, "model_b": b, "context": config, "epoch": e}
                              for e in pick_epochs(common, settings.epochs, f"zoo {zoo.name!r}")]
        return items

    def run(self, store_root: str, items: list[Item], settings: dict[str, Any], data_dir: str | None, device: str) -> list[dict]:
        """Items sharing (zoo, context, epoch) run as one stacked population of pairs."""
        from zoos.store import Store

        store = Store(store_root)
        rows: list[dict] = []
        for (_, _, epoch), group in by_context(items, "epoch").items():
            module, task, weights, index = pair_population(store, group, data_dir, device, epoch)
            a = {k: v[torch.tensor([index[i["model_a"]] for i in group])] for k, v in weights.tensors.items()}
            b = {k: v[torch.tensor([index[i["model_b"]] for i in group])] for k, v in weights.tensors.items()}
            results = connect_pairs(module.to(device), task, a, b, settings, device,
                                    pairs=[(i["model_a"], i["model_b"]) for i in group])
            for it, res in zip(group, results):
                ids = {k: v for k, v in it.items() if k != "context"}
                rows.append({**ids, "epoch": int(weights.epochs[index[it["model_a"]]]), **res})
        return self.write(store, items, rows, settings)

    def summary_columns(self, rows: pl.DataFrame) -> pl.DataFrame:
        last = last_epoch_rows(rows, ["zoo", "model_a", "model_b"])
        worse = (pl.col("barrier_loss_aligned") > pl.col("barrier_loss_naive")).sum()
        extra = [c for c in ("unaware", "repair") if f"barrier_loss_{c}" in last.columns]
        return last.group_by("zoo").agg(pl.len().alias("pairs"), worse.alias("matching_worse"),
                                        *mean_sd("barrier_loss_naive", "barrier_naive", 0),
                                        *mean_sd("barrier_loss_aligned", "barrier_aligned", 0),
                                        *mean_sd("barrier_err_naive", "err_barrier_naive", 0, 1),
                                        *mean_sd("barrier_err_aligned", "err_barrier_aligned", 0, 1),
                                        *[e for c in extra for e in mean_sd(f"barrier_loss_{c}", f"barrier_{c}", 0)])

    def plots(self, rows: pl.DataFrame, out_dir: Path) -> list[Path]:
        last = last_epoch_rows(rows, ["zoo", "model_a", "model_b"])
        out = [plots.interpolation_curves(last, "test_loss", out_dir / "interpolation_loss.png"),
               plots.barrier_slopes(last, out_dir / "barriers_naive_aligned.png")]
        if plots.dense_pairs(last):  # all pairs of a group: their matrix; sampled pairs would leave it nearly blank
            out.append(plots.barrier_heatmap(last, "barrier_loss_aligned", out_dir / "barriers_aligned.png"))
        if rows["epoch"].n_unique() > 1:
            out.append(plots.barrier_vs_epoch(rows, ["barrier_loss_naive", "barrier_loss_aligned"],
                                              out_dir / "barrier_vs_epoch.png"))
        return out


class InterpolationCrossSettings(InterpolationSettings):
    pairs: int = Field(8, ge=0, description="model pairs sampled per pair of zoos (one model from each); 0 = all")


@register_stage
class InterpolationCross(Interpolation):
    """Pairs across zoos of one architecture and config (equal parameter shapes): model_a from zoo, model_b from zoo_b."""

    name = "interpolation_cross"
    Settings = InterpolationCrossSettings
    pairs = "across"
    keys = ["zoo", "zoo_b", "model_a", "model_b", "epoch"]

    def wanted(self, store: Any, zoos: list, settings: InterpolationSettings) -> list[Item]:
        models = {z.name: ok_models(store, z.name) for z in zoos}
        epochs = {z.name: stored_epochs(store, z.name) if z.name in store.zoos() else {} for z in zoos}
        items: list[Item] = []
        for za, zb in itertools.combinations([z.name for z in zoos], 2):
            if not (models[za].height and models[zb].height):
                continue
            # zoos may differ in task options (e.g. augmented training): match on the architecture config;
            # the path is evaluated on zoo a's task (the items carry zoo a's context)
            by_config = {c: pair_pool(g) for (c,), g in models[zb].group_by("arch_config")}
            arch_a, arch_b = (store.models(z).select("arch").head(1).collect()["arch"].to_list() for z in (za, zb))
            if arch_a != arch_b:
                continue
            for (config, arch_config), group in models[za].group_by("context", "arch_config", maintain_order=True):
                cross = sample_cross(pair_pool(group), by_config.get(arch_config, []), settings.pairs,
                                     f"{settings.seed}:{za}:{zb}")
                for a, b in cross:
                    common = sorted(set(epochs[za][a]) & set(epochs[zb][b]))
                    items += [{"zoo": za, "zoo_b": zb, "model_a": a, "model_b": b, "context": config, "epoch": e}
                              for e in pick_epochs(common, settings.epochs, f"zoos {za!r} and {zb!r}")]
        return items

    def summary_columns(self, rows: pl.DataFrame) -> pl.DataFrame:
        last = last_epoch_rows(rows, ["zoo", "zoo_b", "model_a", "model_b"])
        return last.group_by("zoo").agg(pl.len().alias("cross_pairs"), *mean_sd("barrier_loss_naive", "cross_barrier_naive", 0),
                                        *mean_sd("barrier_loss_aligned", "cross_barrier_aligned", 0))

    def plots(self, rows: pl.DataFrame, out_dir: Path) -> list[Path]:
        last = last_epoch_rows(rows, ["zoo", "zoo_b", "model_a", "model_b"])
        labelled = last.with_columns((pl.col("zoo") + " x " + pl.col("zoo_b")).alias("zoo"))
        out = [plots.interpolation_curves(labelled, "test_loss", out_dir / "cross_interpolation_loss.png"),
               plots.barrier_heatmap(labelled, "barrier_loss_aligned", out_dir / "cross_barriers_aligned.png")]
        if rows["epoch"].n_unique() > 1:
            out.append(plots.barrier_vs_epoch(rows.with_columns((pl.col("zoo") + " x " + pl.col("zoo_b")).alias("zoo")),
                                              ["barrier_loss_naive", "barrier_loss_aligned"], out_dir / "cross_barrier_vs_epoch.png"))
        return out
