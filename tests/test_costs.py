"""runtime.costs: the running cost figures, what calibration still needs, stored profiles."""

from __future__ import annotations

import pytest

from runtime.costs import Calibration, CostModel, Measure

VERIFY_2 = Calibration(measure=Measure.VERIFY, rows=2)


@pytest.mark.parametrize("with_draft, k_max, expected", [
    # two samples each of V(1), V(2), V(4), then the draft's step, in that order
    (True, 9, [Calibration(measure=Measure.VERIFY, rows=1), VERIFY_2,
               Calibration(measure=Measure.VERIFY, rows=4),
               Calibration(measure=Measure.DRAFT_STEP)]),
    (False, 9, [Calibration(measure=Measure.VERIFY, rows=1), VERIFY_2,
                Calibration(measure=Measure.VERIFY, rows=4)]),   # no draft to time
    (False, 2, [Calibration(measure=Measure.VERIFY, rows=1), VERIFY_2]),  # no 4-row step
])
def test_calibration_asks_for_each_figure_twice_then_nothing(with_draft, k_max, expected):
    c = CostModel()
    asked = []
    while (need := c.calibration_need(with_draft, k_max)) is not None:
        asked.append(need)
        if need.measure is Measure.DRAFT_STEP:
            c.add_draft(0.005)
        else:
            c.add_verify(need.rows, 0.01 * need.rows)
    assert asked == [n for n in expected for _ in range(2)]


def test_overheads_are_kept_apart_for_plain_and_speculative_steps():
    c = CostModel()
    c.add_overhead(False, 1e-4)
    c.add_overhead(True, 2e-4)
    assert c.overhead_plain == pytest.approx(0.15e-4)
    assert c.overhead_spec == pytest.approx(0.3e-4)


def test_calibration_keeps_the_lower_sample_and_outliers_move_little():
    c = CostModel()
    c.add_verify(1, 0.030)   # a first batch pays one-off costs
    c.add_verify(1, 0.010)
    assert c.verify[1] == 0.010
    c.add_verify(2, 0.012)
    c.add_verify(2, 2.9)     # a starved step while calibrating: the lower one stands
    assert c.verify[2] == 0.012
    c.add_verify(1, 3.0)     # 300x after calibration: counted as 4x at most
    assert c.verify[1] == pytest.approx(0.010 * (1 + 0.15 * 3))
    for _ in range(12):      # a lasting slowdown still shows within a few steps
        c.add_verify(1, 0.050)
    assert c.verify[1] > 0.040
    c.add_draft(0.011)
    c.add_draft(2.5)
    assert c.draft == 0.011


def test_a_stored_profile_from_a_starved_run_is_measured_again():
    """A profile written while the CPU was oversubscribed (this machine, 2026-12-04): a
    2-token batch at 345 one-token steps, a 4-token one at 15 and a draft step at 300
    cannot be real."""
    stored = {"verify": {"1": 0.0084, "2": 2.89, "4": 0.13, "9": 0.0496}, "draft": 2.53,
              "overhead_spec": 0.0002, "overhead_plain": 0.0001}
    c = CostModel.from_profile(stored)
    assert set(c.verify) == {1, 9} and c.draft is None  # 4 tokens at 15 steps: gone too
    assert c.calibration_need(with_draft=True) == VERIFY_2  # measured afresh
    sane = {"verify": {"1": 0.01, "2": 0.018, "4": 0.03}, "draft": 0.009}
    c = CostModel.from_profile(sane)
    assert c.verify == {1: 0.01, 2: 0.018, 4: 0.03} and c.draft == 0.009
    assert c.calibration_need(with_draft=True) is None


def test_verify_cost_fit_extrapolates_linearly():
    c = CostModel()
    for k, t in ((1, 1.0), (2, 1.5), (3, 2.0)):
        c.add_verify(k, t)
        c.add_verify(k, t)
    assert c.verify_cost(5) == pytest.approx(3.0)
