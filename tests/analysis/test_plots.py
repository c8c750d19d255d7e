"""analysis.plots: what the barrier plots draw, from the pairs' rows."""

import numpy as np
import polars as pl
from hypothesis import given, settings, strategies as st

from analysis import plots


def _pairs(zoo: str, pairs: list[tuple[str, str]], naive: list[float], aligned: list[float]) -> pl.DataFrame:
    return pl.DataFrame({"zoo": [zoo] * len(pairs), "model_a": [a for a, _ in pairs], "model_b": [b for _, b in pairs],
                         "barrier_loss_naive": naive, "barrier_loss_aligned": aligned})


def test_disjoint_sampled_pairs_are_not_dense_and_all_pairs_are():
    ids = [f"m{i}" for i in range(8)]
    disjoint = _pairs("z", list(zip(ids[::2], ids[1::2])), [1.0] * 4, [0.5] * 4)
    every = _pairs("z", [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]], [1.0] * 28, [0.5] * 28)
    assert not plots.dense_pairs(disjoint) and plots.dense_pairs(every)
    assert not plots.dense_pairs(pl.concat([every, disjoint.with_columns(pl.lit("y").alias("zoo"))]))  # every zoo


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 10), st.floats(0, 10)), min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_each_pair_keeps_its_own_two_barriers(values, rng):
    """Rows in any order: each zoo's pairs in (model_a, model_b) order, each with its naive and aligned barrier."""
    pairs = [(f"a{i:02d}", f"b{i:02d}") for i in range(len(values))]
    frame = _pairs("z", pairs, [n for n, _ in values], [a for _, a in values])
    order = list(range(len(values)))
    rng.shuffle(order)
    naive, aligned = plots.pair_slopes(frame[order], "barrier_loss_naive", "barrier_loss_aligned")["z"]
    np.testing.assert_array_equal(naive, [n for n, _ in values])
    np.testing.assert_array_equal(aligned, [a for _, a in values])


def test_the_slope_plot_is_written_for_every_zoo(tmp_path):
    frame = pl.concat([_pairs("cnn", [("a", "b"), ("c", "d"), ("e", "f")], [2.0, 1.0, 3.0], [1.0, 1.5, 0.5]),
                       _pairs("p4cnn", [("g", "h")], [0.4], [0.2])])
    assert set(plots.pair_slopes(frame, "barrier_loss_naive", "barrier_loss_aligned")) == {"cnn", "p4cnn"}
    path = plots.barrier_slopes(frame, tmp_path / "slopes.png")
    assert path.stat().st_size > 0
