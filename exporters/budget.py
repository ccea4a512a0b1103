"""Sizing the calibration set to the export's time budget.

Every slow stage of a scored export grows with the calibration tokens: llama.cpp writes
``n_new`` tokens per prompt, and each layer runs over every token once for scoring and
once per track for held-out acceptance. Only a few costs are fixed (dequantizing each
layer, the output head). So for a given machine the predicted time is a function of the
number of prompts, ``T(n) = fixed + sum over the n prompts of per-prompt costs``, known
before any text is written once the estimate's probes have run
(``exporters.estimate``). The export then uses the largest ``n`` with ``T(n)`` inside the
time it has left, and says so; ``--time-budget none`` uses every prompt.

A subset of n prompts is spread evenly over the offered list (the built-in set is ordered
by kind: code, chat, facts...), so a smaller set keeps the mix. At least ``MIN_PROMPTS``
are kept: 3 to score on and 1 held out, below which the held-out acceptance means little;
when even those do not fit, the export runs with them and warns with its estimate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from exporters.estimate import Estimate, describe, duration

log = logging.getLogger(__name__)

MIN_PROMPTS = 4
# With no time budget, an export predicted to take longer than this warns before it starts.
LONG_EXPORT_S = 15 * 60
T = TypeVar("T")


def spread(items: Sequence[T], n: int) -> list[T]:
    """``n`` of ``items`` spread evenly, in order: item ``floor(i * len / n)`` for i < n
    (all of them when ``n >= len``)."""
    if n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


@dataclass(frozen=True)
class Sizing:
    """How many of the offered prompts the export uses, and what it predicts then."""

    used: int
    offered: int
    estimate: Estimate
    seconds_left: float | None  # None: no budget
    fits: bool

    def describe(self, method: str) -> str:
        said = describe(self.estimate, method)
        if self.seconds_left is None:
            return f"{said}; no time budget: all {self.offered} calibration prompts"
        left = duration(max(self.seconds_left, 0.0))
        if self.used == self.offered and self.fits:
            return f"{said}; within the {left} left of the time budget"
        if not self.fits:
            return (f"{said}: over the {left} left of the time budget even with the "
                    f"minimum of {self.used} of {self.offered} calibration prompts")
        return (f"{said}: {self.used} of {self.offered} calibration prompts fit the {left} "
                f"left of the time budget (--time-budget sets it; 'none' uses all)")


def time_left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (a ``time.perf_counter()`` reading; None: no budget)."""
    return None if deadline is None else deadline - time.perf_counter()


def fit_prompts(offered: int, predict: Callable[[int], Estimate],
                seconds_left: float | None, minimum: int = MIN_PROMPTS) -> Sizing:
    """The largest prompt count in ``minimum..offered`` whose ``predict(n).total`` fits
    in ``seconds_left`` (None: every prompt); ``predict`` grows with ``n``."""
    if seconds_left is None:
        return Sizing(offered, offered, predict(offered), None, True)
    lo = min(minimum, offered)
    if (est := predict(lo)).total > seconds_left:
        return Sizing(lo, offered, est, seconds_left, False)
    # the largest n that fits: a bisection over lo..offered, T(n) being monotone in n
    good, bad = lo, offered + 1
    best = est
    while bad - good > 1:
        mid = (good + bad) // 2
        if (e := predict(mid)).total <= seconds_left:
            good, best = mid, e
        else:
            bad = mid
    return Sizing(good, offered, best, seconds_left, True)


def subset(items: Sequence[T], n: int) -> tuple[list[T], list[T]]:
    """(calibration, held-out) of the ``n`` items ``spread`` picks, split as
    ``calibration.split_holdout`` splits a whole set."""
    from exporters.calibration import split_holdout

    picked = spread(range(len(items)), n)
    calib, held = split_holdout(picked)
    return [items[i] for i in calib], [items[i] for i in held]


def log_sizing(sizing: Sizing, method: str, faster: str = "") -> None:
    """Say the sizing: a warning when the export will overrun its budget, or, with no
    budget, take longer than ``LONG_EXPORT_S`` (``faster``: how to speed it up)."""
    slow = not sizing.fits or (sizing.seconds_left is None
                               and sizing.estimate.total > LONG_EXPORT_S)
    (log.warning if slow else log.info)("%s%s", sizing.describe(method),
                                        faster if slow else "")
