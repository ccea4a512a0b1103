"""Choosing how many tokens to draft (gamma) from what this machine actually measures.

Cost model, per step, in seconds:

    T(g) = g * t_draft + t_verify(g + 1) + t_overhead        (g = 0: a plain step)

where t_verify(k) is the target's cost to evaluate k tokens in one batch, fitted as
a + b * (k - 1) from measured steps. With per-token acceptance alpha (drafts accepted
independently until the first rejection), a step emits in expectation

    E(g) = 1 + alpha + ... + alpha^g = (1 - alpha^(g + 1)) / (1 - alpha)

tokens, so the controller picks g maximizing E(g) / T(g). g = 0 is plain decoding.

Speculation can only pay if, at alpha = 1, some g beats a plain step:
(g + 1) / T(g) > 1 / T(0). When the measured costs rule that out (as on small CPUs, where
b and t_draft / t_verify(1) are both large), the controller switches speculation off for
good instead of paying for probes it already knows cannot win. Otherwise, while gamma is 0,
it re-probes now and then (backing off exponentially) so it recovers when the text becomes
predictable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

_EMA = 0.15          # weight of a new cost sample
_ALPHA_DECAY = 0.92  # per judged draft: acceptance remembers ~12 drafts, so it follows the text
_PROBE_GAMMA = 4     # a probe drafts several tokens: more evidence per probe
_FIRST_BACKOFF, _MAX_BACKOFF = 16, 512


@dataclass
class CostModel:
    """Running estimates of step costs (seconds) and acceptance."""

    verify: dict[int, float] = field(default_factory=dict)  # k -> t_verify(k)
    n_verify: dict[int, int] = field(default_factory=dict)  # k -> samples seen
    draft: float | None = None          # one draft decode
    n_draft: int = 0
    overhead_spec: float = 0.0          # Python time per speculative step
    overhead_plain: float = 0.0         # Python time per plain step
    acc: float = 1.4                    # accepted drafts (decayed count)
    tried: float = 2.0                  # drafts the target judged (decayed count)

    @property
    def alpha(self) -> float:
        return self.acc / self.tried

    def add_verify(self, k: int, seconds: float) -> None:
        n = self.n_verify.get(k, 0)
        self.n_verify[k] = n + 1
        # The second sample replaces the first: a first batch of a new size pays one-off
        # costs (graph allocation, GPU kernel loading) that say nothing about later ones.
        old = self.verify.get(k)
        self.verify[k] = seconds if n < 2 or old is None else old + _EMA * (seconds - old)

    def add_draft(self, seconds_per_eval: float) -> None:
        self.n_draft += 1
        d = self.draft
        self.draft = seconds_per_eval if self.n_draft <= 2 or d is None \
            else d + _EMA * (seconds_per_eval - d)

    def calibration_need(self) -> str | None:
        """What to measure next before the model can judge gamma: two samples each of a
        plain step ("plain"), a 2-token batch ("batch") and a draft step ("draft")."""
        if self.n_verify.get(1, 0) < 2:
            return "plain"
        if self.n_verify.get(2, 0) < 2:
            return "batch"
        if self.n_draft < 2:
            return "draft"
        return None

    def add_acceptance(self, n_judged: int, n_accepted: int) -> None:
        decay = _ALPHA_DECAY ** n_judged
        self.acc = self.acc * decay + n_accepted
        self.tried = self.tried * decay + n_judged

    def verify_cost(self, k: int) -> float:
        """t_verify(k): measured, or a least-squares line through the measured points."""
        if k in self.verify:
            return self.verify[k]
        ks = np.fromiter(self.verify.keys(), dtype=np.float64)
        ts = np.fromiter(self.verify.values(), dtype=np.float64)
        if ks.size == 1:
            return float(ts[0] * k / ks[0])  # pessimistic: proportional to k
        b, a = np.polyfit(ks - 1, ts, 1)
        return float(max(a + b * (k - 1), ts.min()))

    def step_time(self, gamma: int) -> float:
        if gamma == 0:
            return self.verify_cost(1) + self.overhead_plain
        assert self.draft is not None
        return gamma * self.draft + self.verify_cost(gamma + 1) + self.overhead_spec

    @staticmethod
    def expected_tokens(gamma: int, alpha: float) -> float:
        if alpha >= 1.0:
            return gamma + 1.0
        return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


class GammaController:
    """Decides gamma before every step and learns from the step's measurements.

    Args:
        draft_max: the largest gamma it may choose.
        adaptive: False pins gamma to ``draft_max`` (for benchmarks of fixed gamma).
    """

    def __init__(self, draft_max: int, adaptive: bool = True):
        self.draft_max = draft_max
        self.adaptive = adaptive
        self.costs = CostModel()
        self.disabled_reason: str | None = None
        self._since_probe = 0
        self._backoff = _FIRST_BACKOFF
        self.history: list[int] = []  # gamma chosen at each step

    def calibration_need(self) -> str | None:
        """The measurement the next step should make, while calibrating (else None)."""
        if not self.adaptive or self.disabled_reason is not None:
            return None
        return self.costs.calibration_need()

    def choose(self) -> int:
        gamma = self._choose()
        self.history.append(gamma)
        return gamma

    def _choose(self) -> int:
        c = self.costs
        if not self.adaptive:
            return self.draft_max
        if self.disabled_reason is not None:
            return 0
        if c.calibration_need() is not None:
            # measured without the draft ever reading the prompt (see SpeculativeDecoder),
            # so a device where speculation cannot pay finds out for almost nothing
            return 0
        best = self.best_gamma(c.alpha)
        if best > 0:
            self._since_probe, self._backoff = 0, _FIRST_BACKOFF
            return best
        self._since_probe += 1
        if self._since_probe >= self._backoff:
            self._since_probe = 0
            self._backoff = min(2 * self._backoff, _MAX_BACKOFF)
            return min(_PROBE_GAMMA, self.draft_max)
        return 0

    def best_gamma(self, alpha: float) -> int:
        c = self.costs
        speeds = [c.expected_tokens(g, alpha) / c.step_time(g) for g in range(self.draft_max + 1)]
        return int(np.argmax(speeds))

    def observe(self, gamma: int, n_extra: int, n_drafted: int, n_accepted: int,
                draft_seconds: float, draft_evals: int, verify_seconds: float,
                overhead_seconds: float, rejected: bool) -> None:
        """Record one step: the target evaluated 1 + ``n_extra`` tokens, ``n_drafted`` of
        them proposed by the draft (<= gamma), of which ``n_accepted`` were kept."""
        c = self.costs
        c.add_verify(n_extra + 1, verify_seconds)
        if n_drafted:
            c.add_draft(draft_seconds / max(draft_evals, 1))
            c.add_acceptance(n_accepted + int(rejected), n_accepted)
            if not rejected and gamma == min(_PROBE_GAMMA, self.draft_max):
                self._backoff = _FIRST_BACKOFF  # a clean probe: look again soon
        if gamma:
            c.overhead_spec += _EMA * (overhead_seconds - c.overhead_spec)
        else:
            c.overhead_plain += _EMA * (overhead_seconds - c.overhead_plain)
        self._judge()

    def observe_draft(self, seconds: float) -> None:
        """A draft step timed outside the decode loop (calibration)."""
        self.costs.add_draft(seconds)
        self._judge()

    def _judge(self) -> None:
        """Switch speculation off for good once even 100% acceptance could not pay."""
        c = self.costs
        if self.adaptive and self.disabled_reason is None and c.calibration_need() is None \
                and self.best_gamma(1.0) == 0:
            t1 = c.verify_cost(1)
            self.disabled_reason = (
                f"speculation cannot pay on this device: a draft step costs "
                f"{c.draft / t1:.2f}x a target step and verifying 2 tokens "
                f"{c.verify_cost(2) / t1:.2f}x, so even 100% acceptance would be slower")
            log.debug("%s; decoding plainly", self.disabled_reason)
