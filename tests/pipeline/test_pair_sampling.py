"""Pair sampling of the pair stages: reproducible, no model reused while another is unused, pair counts per
model within 1 of each other, k spread over the factor cells a phase report shows, pairs within a cell."""

import itertools
from collections import Counter

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.cmd_report import with_pair_counts
from pipeline.stages.bezier import Bezier, BezierSettings
from pipeline.stages.interpolation import Interpolation, InterpolationSettings, factor_cells, sample_cross, sample_pairs

FAST = settings(max_examples=150, deadline=None)


def ids_of(n: int) -> list[str]:
    return [f"m{i:02d}" for i in range(n)]


def counts(pairs: list[tuple[str, str]], ids: list[str]) -> list[int]:
    c = Counter(itertools.chain.from_iterable(pairs))
    return [c[m] for m in ids]


@st.composite
def groups(draw, max_models: int = 12, max_cells: int = 4):
    """(ids, cells: model -> cell or None, k, key)."""
    n = draw(st.integers(2, max_models))
    ids = ids_of(n)
    cells = None
    if draw(st.booleans()):
        cells = {m: (draw(st.integers(0, max_cells - 1)),) for m in ids}
    k = draw(st.integers(0, n * (n - 1) // 2 + 2))
    return ids, cells, k, draw(st.text(min_size=1, max_size=8))


@FAST
@given(groups())
def test_deterministic_distinct_and_exactly_min_k_all(case):
    ids, cells, k, key = case
    pairs = sample_pairs(list(reversed(ids)), k, key, cells)
    assert pairs == sample_pairs(ids, k, key, cells)  # a function of the set of ids, k and key
    everything = list(itertools.combinations(ids, 2))
    within = [(a, b) for a, b in everything if cells is None or cells[a] == cells[b]]
    assert len(pairs) == len(set(pairs)) == (len(within) if k == 0 else min(k, len(everything)))
    assert set(pairs) <= set(everything) and pairs == sorted(pairs)


@FAST
@given(st.integers(2, 14), st.data())
def test_one_cell_counts_differ_by_at_most_one(n, data):
    ids = ids_of(n)
    k = data.draw(st.integers(1, n * (n - 1) // 2))
    c = counts(sample_pairs(ids, k, data.draw(st.text(max_size=6))), ids)
    assert max(c) - min(c) <= 1, c  # in particular: nobody at 2 while somebody is at 0
    if k <= n // 2:
        assert max(c) == 1  # the first pairs are disjoint


@FAST
@given(groups(max_models=14))
def test_cells_each_get_a_share_and_pairs_stay_within_them(case):
    ids, cells, k, key = case
    cells = cells or {m: (0,) for m in ids}
    members = {c: [m for m in ids if cells[m] == c] for c in set(cells.values())}
    caps = {c: len(ms) * (len(ms) - 1) // 2 for c, ms in members.items() if len(ms) >= 2}
    if not k or k >= len(ids) * (len(ids) - 1) // 2:
        return  # all pairs
    pairs = sample_pairs(ids, k, key, cells)
    within = [p for p in pairs if cells[p[0]] == cells[p[1]]]
    assert len(within) == min(k, sum(caps.values()))  # across cells only once every within-cell pair is taken
    share = Counter(cells[a] for a, _ in within)
    if k >= len(caps):
        assert all(share[c] >= 1 for c in caps)
    for c, d in itertools.permutations(caps, 2):  # as even as the cells' pair counts allow
        assert share[c] >= share[d] - 1 or share[c] == caps[c], (share, caps)
    for c in caps:
        cnt = counts([p for p in within if cells[p[0]] == c], members[c])
        assert max(cnt) - min(cnt) <= 1, (c, cnt)


def test_quickstart_shape_six_pairs_of_sixteen_models_use_twelve():
    ids = ids_of(16)
    cells = {m: (0.01 if i < 8 else 0.02,) for i, m in enumerate(ids)}
    pairs = sample_pairs(ids, 6, "0:p4cnn", cells)
    assert sorted(counts(pairs, ids)) == [0] * 4 + [1] * 12
    assert Counter(cells[a] for a, b in pairs if cells[a] == cells[b]) == {(0.01,): 3, (0.02,): 3}


@FAST
@given(st.integers(1, 6), st.integers(1, 6), st.data())
def test_cross_pairs_distinct_and_balanced_on_both_sides(na, nb, data):
    a, b = [f"a{i}" for i in range(na)], [f"b{i}" for i in range(nb)]
    k = data.draw(st.integers(0, na * nb + 1))
    key = data.draw(st.text(max_size=6))
    pairs = sample_cross(a, b, k, key)
    assert pairs == sample_cross(list(reversed(a)), list(reversed(b)), k, key)
    assert len(set(pairs)) == len(pairs) == (na * nb if k == 0 else min(k, na * nb))
    assert all(x in a and y in b for x, y in pairs)
    for side, ids in ((0, a), (1, b)):
        c = Counter(p[side] for p in pairs)
        assert max(c[m] for m in ids) - min(c[m] for m in ids) <= 1


class FakeStore:
    """The store calls the plans make: one zoo's models table and checkpoints, no stored results."""

    def __init__(self, models: pl.DataFrame):
        self.frame = models

    def zoos(self) -> list[str]:
        return ["z"]

    def stages(self) -> list[str]:
        return []

    def models(self, zoo: str) -> pl.LazyFrame:
        return self.frame.lazy()

    def checkpoints(self, zoo: str) -> pl.LazyFrame:
        return self.frame.select("model_id", pl.lit(5).alias("epoch")).lazy()


class Zoo:
    name = "z"


def grid_store() -> FakeStore:
    """2 lr x 2 batch sizes x 3 seeds in one context, one diverged model; seed varies, so it is no cell factor."""
    rows = [{"model_id": f"m{lr}-{bs}-{s}", "lr": lr, "batch_size": bs, "seed": s, "arch_config": "{}",
             "task_config": None, "status": "diverged" if (lr, bs, s) == (0.1, 64, 2) else "ok"}
            for lr in (0.01, 0.1) for bs in (32, 64) for s in range(3)]
    return FakeStore(pl.DataFrame(rows))


def test_factor_cells_are_the_varied_non_seed_factors():
    cells = factor_cells(grid_store(), "z")
    assert len(cells) == 11 and cells["m0.01-32-0"] == (0.01, 32) and cells["m0.1-64-1"] == (0.1, 64)


def test_stage_plans_put_pairs_in_every_cell_within_it():
    store = grid_store()
    cells = factor_cells(store, "z")
    for stage, s in ((Interpolation(), InterpolationSettings(pairs=4)), (Bezier(), BezierSettings(pairs=4))):
        items = stage.plan(store, [Zoo()], s)
        assert len(items) == 4, stage.name
        assert sorted(cells[i["model_a"]] for i in items) == sorted(set(cells.values()))  # one pair per cell
        assert all(cells[i["model_a"]] == cells[i["model_b"]] for i in items)


def test_report_cells_show_the_pair_count_beside_each_pair_metric():
    cells = pl.DataFrame({"arch": ["cnn", "cnn"], "barrier_aligned": [0.125, None], "interpolation_pairs": [3, None],
                          "test_loss": [0.5, 0.25]})
    shown = with_pair_counts(cells)
    assert shown["barrier_aligned"].to_list() == ["0.125 (n=3)", "(n=0)"]
    assert shown["interpolation_pairs"].to_list() == [3, 0] and shown["test_loss"].to_list() == [0.5, 0.25]


def test_pairs_are_drawn_among_the_models_that_learned_where_two_did():
    """A pair with a model that never learned is left out of the zoo's statistics, so a group's pairs are drawn
    among its learned models; a group with fewer than two (a phase study's untrained cell) pairs all of them."""
    import polars as pl

    from pipeline.stages.common import pair_pool

    mixed = pl.DataFrame({"model_id": ["a", "b", "c", "d"], "learned": [True, False, True, True]})
    assert pair_pool(mixed) == ["a", "c", "d"]
    untrained = pl.DataFrame({"model_id": ["a", "b", "c"], "learned": [True, False, False]})
    assert pair_pool(untrained) == ["a", "b", "c"]
    assert pair_pool(pl.DataFrame({"model_id": ["a", "b"]})) == ["a", "b"]  # a store from before `learned`


def test_every_pair_means_every_pair_within_a_cell():
    """pairs: 0 asks for every pair a report counts: two seeds of one cell (a data-efficiency zoo's 10% and 100%
    models are never paired); without cells, every pair."""
    ids = ids_of(9)
    cells = {m: (fraction,) for m, fraction in zip(ids, [0.1, 0.3, 1.0] * 3)}
    pairs = sample_pairs(ids, 0, "0:z", cells)
    assert len(pairs) == 3 * 3 and all(cells[a] == cells[b] for a, b in pairs)
    assert sample_pairs(ids, 0, "0:z") == list(itertools.combinations(sorted(ids), 2))
