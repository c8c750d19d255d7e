"""Every zoo-level number with its 95% interval: the mean's t interval and the median's order-statistic interval."""

import numpy as np
import polars as pl
import pytest
from scipy import stats

from pipeline.stages.common import HI, LO, mean_sd, median_iqr


def _agg(values: np.ndarray, sizes: list[int]) -> pl.DataFrame:
    groups = np.repeat(np.arange(len(sizes)), sizes)
    frame = pl.DataFrame({"g": groups, "x": values})
    return frame.group_by("g").agg(*mean_sd("x", "m"), *median_iqr("x", "md")).sort("g")


def test_the_mean_interval_is_students_t():
    rng = np.random.default_rng(0)
    sizes = [2, 3, 7, 40]
    values = rng.normal(3.0, 2.0, sum(sizes))
    out = _agg(values, sizes)
    start = 0
    for row, n in zip(out.iter_rows(named=True), sizes):
        x = values[start:start + n]
        start += n
        lo, hi = stats.t.interval(0.95, n - 1, loc=x.mean(), scale=stats.sem(x))
        assert row["m" + LO] == pytest.approx(lo) and row["m" + HI] == pytest.approx(hi)
        assert row["md" + LO] <= row["md"] <= row["md" + HI]


def test_intervals_cover_the_truth_95_percent_of_the_time():
    """Over 2,000 zoos of 25 models: the mean's interval covers the true mean of normal values, the median's the
    true median of skewed (exponential) values, each 95% of the time (binomial 99.9% band; the order-statistic
    interval is conservative)."""
    rng = np.random.default_rng(1)
    zoos, n = 2000, 25
    normal = _agg(rng.normal(1.0, 3.0, zoos * n), [n] * zoos)
    skewed = _agg(rng.exponential(1.0, zoos * n), [n] * zoos)
    cover_mean = ((normal["m" + LO] <= 1.0) & (normal["m" + HI] >= 1.0)).mean()
    cover_median = ((skewed["md" + LO] <= np.log(2)) & (skewed["md" + HI] >= np.log(2))).mean()
    assert 0.93 <= cover_mean <= 0.97
    assert 0.93 <= cover_median <= 0.99


def test_no_interval_from_one_value_or_none():
    out = pl.DataFrame({"g": [0, 1], "x": [1.5, None]}).group_by("g").agg(*mean_sd("x", "m"), *median_iqr("x", "md")).sort("g")
    assert out["m" + LO].to_list() == [None, None] and out["md" + LO].to_list() == [None, None]
    assert out["md"].to_list() == [1.5, None]


def test_an_interval_stays_within_what_the_quantity_can_take():
    """Two barriers (>= 0 by construction) or two accuracies give a wide t interval: it is clipped to the values
    the quantity can take, the mean and sd unchanged."""
    from pipeline.stages.common import HI, LO, SD, mean_sd, value_range

    rows = pl.DataFrame({"b": [0.0, 0.1], "acc": [0.9, 1.0]})
    out = rows.select(*mean_sd("b", "b", 0), *mean_sd("acc", "acc", *value_range("test_acc"))).row(0, named=True)
    assert out["b" + LO] == 0.0 and out["b" + HI] > 0.1 and out["b"] == pytest.approx(0.05)
    assert out["acc" + HI] == 1.0 and out["acc" + LO] < 0.9 and out["acc" + SD] == pytest.approx(0.0707, abs=1e-4)
    free = rows.select(*mean_sd("b", "b")).row(0, named=True)
    assert free["b" + LO] < 0  # unclipped without bounds
    assert value_range("test_loss") == (0.0, None) and value_range("test_psnr") == (None, None)
