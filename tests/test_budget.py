"""Sizing the calibration set to the export's time budget (``exporters.budget``)."""

from __future__ import annotations

import pytest

from exporters import budget, calibration
from exporters.config import ExportConfig, parse_minutes
from exporters.estimate import Estimate


def test_spread_keeps_order_and_covers_the_list():
    items = list(range(32))
    assert budget.spread(items, 32) == items
    assert budget.spread(items, 40) == items
    assert budget.spread(items, 4) == [0, 8, 16, 24]
    picked = budget.spread(items, 10)
    assert len(picked) == len(set(picked)) == 10 and picked == sorted(picked)
    assert picked[-1] >= 27  # reaches the end of the list, not only its start


def test_subset_of_all_is_the_whole_sets_split():
    prompts = [f"p{i}" for i in range(32)]
    assert budget.subset(prompts, 32) == calibration.split_holdout(prompts)
    calib, held = budget.subset(prompts, 4)
    assert (calib, held) == (["p0", "p8", "p16"], ["p24"])
    # duplicates are split by position, not by value
    assert budget.subset(["a", "a", "a", "a"], 4) == (["a", "a", "a"], ["a"])


def _linear(fixed: float, per_prompt: float):
    calls = []

    def predict(n: int) -> Estimate:
        calls.append(n)
        return Estimate(per_prompt * n, fixed, 0.0)

    return predict, calls


@pytest.mark.parametrize("left, used, fits", [
    (None, 32, True),     # no budget: every prompt
    (1000.0, 32, True),   # all fit
    (100.0 + 10 * 12.5, 12, True),  # the largest n with 100 + 10 n <= left
    (100.0 + 10 * 12, 12, True),    # exactly on the boundary fits
    (100.0 + 10 * 5, 5, True),
    (100.0 + 10 * 4, 4, True),      # the minimum still fits
    (100.0 + 10 * 3.9, 4, False),   # not even the minimum: it is used, and said
    (1.0, 4, False),
])
def test_fit_prompts_takes_the_largest_count_that_fits(left, used, fits):
    predict, _ = _linear(100.0, 10.0)
    sizing = budget.fit_prompts(32, predict, left)
    assert (sizing.used, sizing.fits, sizing.offered) == (used, fits, 32)
    assert sizing.estimate.total == 100.0 + 10 * used
    text = sizing.describe("bi")
    assert text.startswith("estimated time: about")
    if left is None:
        assert "no time budget" in text
    elif not fits:
        assert "even with the minimum of 4 of 32" in text
    elif used < 32:
        assert f"{used} of 32 calibration prompts fit" in text and "--time-budget" in text


def test_fit_prompts_with_fewer_prompts_than_the_minimum():
    predict, _ = _linear(0.0, 10.0)
    assert budget.fit_prompts(2, predict, 1.0).used == 2  # all it has
    assert budget.fit_prompts(2, predict, 1.0).fits is False


def test_fit_prompts_asks_few_predictions():
    predict, calls = _linear(0.0, 1.0)
    assert budget.fit_prompts(1000, predict, 500.5).used == 500
    assert len(calls) <= 12  # a bisection, not a scan


def test_time_budget_parsing():
    assert parse_minutes("10") == 600.0
    assert parse_minutes("2.5") == 150.0
    assert parse_minutes("none") is None and parse_minutes("NONE") is None
    for bad in ("0", "-3", "soon", "nan", "inf", ""):
        with pytest.raises(ValueError, match="--time-budget"):
            parse_minutes(bad)
    with pytest.raises(ValueError, match="--time-budget must be a positive"):
        ExportConfig(model="m", time_budget=0.0)
    assert ExportConfig(model="m", time_budget=None).time_budget is None
