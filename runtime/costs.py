"""The step costs measured on this machine, as running estimates the controller reads.

Every figure is in seconds: t_verify(k), the target's cost to evaluate k tokens in one
batch (read from a least-squares line through the measured widths where a width is
unmeasured, or always in a shared batch), a draft model's step, the per-token cost of the
tokens a drafter catches up on, and bridge's own Python time per step. The first two
samples of a figure are calibration (the lower stands), later ones move an average.

Before gamma can be judged, the controller needs a few figures measured
(``CostModel.calibration_need``): what it still lacks is a typed ``Calibration``, which the
controller hands the decode loop inside its step plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

_EMA = 0.15          # weight of a new cost sample
CALIBRATION_BATCHES = (2, 4)  # batch sizes measured before the first decision
_REFIT_EVERY = 16    # verify samples between refits of the cost curve (see add_verify)
# A timing sample counts at most this many times the running figure: on a shared CPU one
# step can take 300x its usual time, and one such sample would move a 15% average 45x.
# A lasting slowdown still shows within a few steps (each may raise the figure 1.45x).
_SAMPLE_CAP = 4.0
# Stored profiles: the most a k-token batch may cost, in k one-token steps, and a draft
# step, in one-token target steps, before the figure is measured again (from_profile).
_SANE_BATCH = 2.0
_SANE_DRAFT = 4.0


class Measure(Enum):
    """What a calibration step times besides its own plain step."""

    VERIFY = "verify"          # the target's batch of ``Calibration.rows`` tokens: V(rows)
    DRAFT_STEP = "draft step"  # one step of the draft model (``Drafter.time_step``)


@dataclass(frozen=True, slots=True, kw_only=True)
class Calibration:
    """A figure the costs still lack, so what the next step must measure. A step that
    times V(k) is a plain step run as a batch of ``rows`` copies of its one token (row 0
    is the plain step's answer, the padding is dropped); a draft step is timed beside a
    plain step (``rows`` 1)."""

    measure: Measure
    rows: int = 1


@dataclass
class CostModel:
    """Running estimates of step costs (seconds)."""

    verify: dict[int, float] = field(default_factory=dict)  # k -> t_verify(k)
    n_verify: dict[int, int] = field(default_factory=dict)  # k -> samples seen
    draft: float | None = None          # one pruned-draft decode
    n_draft: int = 0
    catchup_per_token: float | None = None
    overhead_spec: float = 0.0          # Python time per speculative step
    overhead_plain: float = 0.0         # Python time per plain step
    smooth: bool = False                # V(k) from the fitted line only (shared batches)

    def __post_init__(self) -> None:
        self._fit: tuple[float, float, float] | None = None  # (a, b, min t), lazily
        self._memo: dict[int, float] = {}  # k -> verify_cost(k) on the current figures
        self._since_refit = 0
        self.version = 0  # bumped whenever the verify curve the decisions read changes
        self._calibrated: set[tuple[bool, int]] = set()  # calibration_need() == None

    def _refit(self) -> None:
        self._fit = None
        self._memo.clear()
        self._since_refit = 0
        self.version += 1

    def add_verify(self, k: int, seconds: float) -> None:
        """One timed batch of k tokens. The curve the decisions read is refitted at once
        for a size still being calibrated, else every ``_REFIT_EVERY`` samples: each
        sample moves the average by 15%, so sixteen-step-old figures change a decision
        only at the margin, and refitting per step cost ~10% of bridge's own time."""
        n = self.n_verify.get(k, 0)
        self._since_refit += 1
        if n < 2 or self._since_refit >= _REFIT_EVERY:
            self._refit()
        self.n_verify[k] = n + 1
        self.verify[k] = _sample(self.verify.get(k), n, seconds)

    def add_draft(self, seconds_per_eval: float) -> None:
        self.draft = _sample(self.draft, self.n_draft, seconds_per_eval)
        self.n_draft += 1

    def add_catchup(self, seconds: float, n_tokens: int) -> None:
        per = seconds / n_tokens
        old = self.catchup_per_token
        self.catchup_per_token = per if old is None else old + _EMA * (per - old)

    def add_overhead(self, speculative: bool, seconds: float) -> None:
        """bridge's own time outside llama_decode in one step, kept apart for plain and
        speculative steps (a draft step does more Python work)."""
        if speculative:
            self.overhead_spec += _EMA * (seconds - self.overhead_spec)
        else:
            self.overhead_plain += _EMA * (seconds - self.overhead_plain)

    def calibration_need(self, with_draft: bool, k_max: int = 1 << 30) -> Calibration | None:
        """What to measure next before gamma can be judged: two samples each of a plain
        step (V(1)), 2- and 4-token batches (V(2), V(4)) and, with a pruned draft, a draft
        step. Three batch sizes, because a line through V(1) and V(2) alone overstates
        V(k) on the common CPU curve that flattens with k, and the controller would then
        never try the longer drafts that pay. Batches wider than ``k_max`` (the widest a
        step may verify) are not asked for."""
        if (with_draft, k_max) in self._calibrated:
            return None  # counts only grow: once complete, always complete
        if self.n_verify.get(1, 0) < 2:
            return Calibration(measure=Measure.VERIFY)
        for k in CALIBRATION_BATCHES:
            if k <= k_max and self.n_verify.get(k, 0) < 2:
                return Calibration(measure=Measure.VERIFY, rows=k)
        if with_draft and self.n_draft < 2:
            return Calibration(measure=Measure.DRAFT_STEP)
        self._calibrated.add((with_draft, k_max))
        return None

    def verify_cost(self, k: int) -> float:
        """t_verify(k): measured, or a least-squares line through the measured points
        (fitted once per new measurement: the controller asks for it many times a step)."""
        t = self._memo.get(k)
        if t is None:
            t = self._memo[k] = self._verify_cost(k)
        return t

    def _verify_cost(self, k: int) -> float:
        # a shared batch's widths come and go with the load: one rarely seen keeps an old
        # figure (taken at another context length) beside a fresh one, and a draft row
        # could look cheaper than no row; the line through all of them stays monotone
        if not self.smooth and k in self.verify and self.n_verify.get(k, 0) >= 2:
            return self.verify[k]
        if self._fit is None:
            self._fit = _line_fit(self.verify)
        a, b, floor = self._fit
        return max(a + b * (k - 1), floor)

    def relative(self) -> dict:
        """The costs in units of one plain step: c and the verify curve V(k)."""
        t1 = self.verify_cost(1)
        return {"c": self.draft / t1 if self.draft else None,
                "verify": {k: v / t1 for k, v in sorted(self.verify.items())}}

    # -- persistence (runtime.profiles stores these) --------------------------------------

    def to_profile(self) -> dict:
        return {"verify": {str(k): v for k, v in self.verify.items()
                           if self.n_verify.get(k, 0) >= 2},
                "draft": self.draft if self.n_draft >= 2 else None,
                "overhead_spec": self.overhead_spec, "overhead_plain": self.overhead_plain}

    @classmethod
    def from_profile(cls, profile: dict) -> CostModel:
        """Costs measured by an earlier run on the same files and settings: counted as two
        samples each, so calibration is already done but new steps still refine them.

        Figures no machine can honestly produce are measured again instead of trusted:
        a batch of k tokens above ``_SANE_BATCH`` x k one-token steps (k steps in a row
        cost k), or a draft step above ``_SANE_DRAFT`` one-token target steps (a pruned
        draft runs a subset of the target's layers). A run starved by an oversubscribed
        CPU (ggml's and OpenMP's threads spinning against each other: 2.5 s for a 10 ms
        step, seen here) would otherwise decide every later run.
        """
        c = cls()
        verify = {int(k): float(v) for k, v in profile.get("verify", {}).items()}
        t1 = verify.get(1)
        for k, v in verify.items():
            if t1 is None or k == 1 or v <= _SANE_BATCH * k * t1:
                c.verify[k], c.n_verify[k] = v, 2
        if profile.get("draft") is not None and (
                t1 is None or float(profile["draft"]) <= _SANE_DRAFT * t1):
            c.draft, c.n_draft = float(profile["draft"]), 2
        c.overhead_spec = float(profile.get("overhead_spec", 0.0))
        c.overhead_plain = float(profile.get("overhead_plain", 0.0))
        return c


def _sample(old: float | None, n: int, seconds: float) -> float:
    """A cost figure after its ``n + 1``-th sample. The first two are calibration: the
    lower one stands (a first run of a new batch size pays one-off costs, graph
    allocation and kernel loading, and contention only ever slows a step down); later
    ones move an average by ``_EMA``, each capped at ``_SAMPLE_CAP`` times the figure."""
    if old is None or n == 0:
        return seconds
    if n < 2:
        return min(old, seconds)
    return old + _EMA * (min(seconds, _SAMPLE_CAP * old) - old)


def _line_fit(points: dict[int, float]) -> tuple[float, float, float]:
    """(a, b, floor) of the least-squares line t = a + b (k - 1) through ``points``, in
    closed form (a few points; numpy's polyfit costs ~0.5 ms, a few % of a step). One point
    gives the pessimistic t(k) = t0 k / k0 with no floor."""
    if len(points) == 1:
        (k0, t0), = points.items()
        return t0 / k0, t0 / k0, 0.0
    n = len(points)
    mx = sum(k - 1 for k in points) / n
    my = sum(points.values()) / n
    sxx = sum((k - 1 - mx) ** 2 for k in points)
    b = sum((k - 1 - mx) * (t - my) for k, t in points.items()) / sxx
    return my - b * mx, b, min(points.values())

