"""Choosing, before every step, a draft source and how many tokens to draft (gamma), from
what this machine actually measures.

Cost model (``runtime.costmodel``), per step, in seconds:

    T(g) = g * c_source + t_verify(g + 1) + t_overhead        (g = 0: a plain step)

where t_verify(k) is the target's cost to evaluate k tokens in one batch, fitted as
a + b * (k - 1) through the measured batch sizes, c_source is a draft token's cost (the
pruned draft's measured step; about 0 for a lookup), and E(g) = (1 - alpha^(g+1)) / (1 -
alpha) tokens are emitted per step at per-token acceptance alpha. Each step the controller
takes the (source, g) with the best E(g) / T(g); plain decoding is g = 0, and a draft
must beat it by a margin (``_MARGIN``) that covers the estimates' noise.

Acceptance is tracked per source, and for lookup sources per match length (a 6-token
match predicts far better than a 1-token one). Costs are learnt from every step; the time
a drafter spends catching up on tokens it had not seen is charged per token, apart from
drafting, so a long prompt can never pose as an expensive draft.

The pruned draft is left out of the choice while, on the current costs, even 100%
acceptance could not beat a plain step (as on small CPUs). That verdict is recomputed
from the costs at every step, never stored, and the draft's step is re-timed now and then,
so a wrong early measurement cannot switch it off for good. While plain decoding wins,
the controller re-probes with exponential back-off, so it recovers when the text becomes
predictable.

Each decision reaches the decode loop as a ``StepPlan`` (the source, gamma, and the
measurement a calibrating step must take: ``runtime.costs.Calibration``), and the loop
hands back what the step measured as a ``StepRecord``. The running cost figures
themselves live in ``runtime.costs``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from runtime import costmodel
from runtime.costs import Calibration, CostModel, Measure

log = logging.getLogger(__name__)

_ALPHA_DECAY = 0.92  # per judged draft: acceptance remembers ~12 drafts, so it follows the text
_PROBE_GAMMA = 4     # a probe drafts several tokens: more evidence per probe
_FIRST_BACKOFF, _MAX_BACKOFF = 16, 512
_MATCH_BUCKETS = 4   # lookup acceptance is kept for match lengths 1, 2, 3 and 4+
_LOOKUP_PRIOR = 0.5  # a lookup match length never judged yet starts neutral
_PROBE_MIN_MATCH = 2  # a lookup is probed only on a context match of 2+ tokens
# A draft must promise this much over a plain step to be taken. The choice takes the best
# of several noisy estimates (alpha per source and match length, V(k) from a few batches),
# and the best of noisy figures is biased upward: on a CPU where batching buys almost
# nothing, bets predicted to win 1-3% lost that much on average. Real wins (a GPU, long
# accepted lookups) clear it easily.
_MARGIN = 0.05
_RETIME_EVERY = 256  # plain steps between re-timings of a pruned draft judged unable to pay
_HISTORY_MAX = 4096  # choices kept for inspection
PRUNED = "pruned"
GRAMMAR = "grammar"  # the tokens a constraint forces: its text is certain, so its prior is high


@dataclass(frozen=True)
class Offer:
    """What a source can draft this step: up to ``n_max`` tokens; ``match_len`` is the
    context match a lookup found (0 for a model draft)."""

    n_max: int
    match_len: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class StepPlan:
    """The controller's decision for one step, which the decode loop carries out: draft
    ``gamma`` tokens from ``source`` (None and 0: a plain step), and take the measurement
    ``calibration`` names, if any, on the way."""

    source: str | None = None
    gamma: int = 0
    calibration: Calibration | None = None

    @property
    def verify_rows(self) -> int:
        """The rows the target's batch is timed at when the step drafts nothing: more
        than 1 only while V(k) is being calibrated."""
        c = self.calibration
        return c.rows if c is not None else 1

    @property
    def times_draft_step(self) -> bool:
        """Whether the draft model's step is to be timed (``Drafter.time_step``)."""
        c = self.calibration
        return c is not None and c.measure is Measure.DRAFT_STEP


PLAIN_STEP = StepPlan()  # the plan of most steps on a CPU: built once, shared
_RETIME_DRAFT = Calibration(measure=Measure.DRAFT_STEP)


@dataclass(slots=True, kw_only=True)
class StepRecord:
    """One step's measurements, as the decode loop hands them over. Built by keyword (a
    dozen figures in a row are easy to swap unseen); not frozen, because a frozen
    dataclass costs three times as much to build, and one is built every step."""

    source: str | None       # who drafted (None: a plain step)
    gamma: int               # tokens the controller asked for
    n_verified: int          # tokens the target evaluated in its one batch
    n_drafted: int = 0
    n_accepted: int = 0
    match_len: int = 0
    draft_seconds: float = 0.0   # drafting proper (catch-up excluded)
    draft_evals: int = 0
    catchup_seconds: float = 0.0  # reading tokens the drafter had not seen
    n_catchup: int = 0
    verify_seconds: float = 0.0
    overhead_seconds: float = 0.0  # Python time outside llama_decode

    @property
    def rejected(self) -> bool:
        return self.n_accepted < self.n_drafted


def _prior(source: str) -> float:
    """Acceptance before any draft was judged: a pruned draft of a good layer choice keeps
    ~0.7, grammar-forced text nearly always matches, a lookup match starts neutral."""
    return {PRUNED: 0.7, GRAMMAR: 0.95}.get(source, _LOOKUP_PRIOR)


class Acceptance:
    """Decayed counts of accepted and judged drafts, so alpha follows the text."""

    def __init__(self, prior: float, weight: float = 2.0):
        self.acc, self.tried, self.n = prior * weight, weight, 0

    @property
    def alpha(self) -> float:
        return self.acc / self.tried

    def add(self, n_judged: int, n_accepted: int) -> None:
        decay = _ALPHA_DECAY ** n_judged
        self.acc = self.acc * decay + n_accepted
        self.tried = self.tried * decay + n_judged
        self.n += 1


class GammaController:
    """Plans every step (a source and gamma, and what to measure) and learns from the
    step's record.

    Args:
        draft_max: the largest gamma it may choose.
        adaptive: False drafts ``draft_max`` tokens (or all a lookup offers, if fewer)
            every step, from the pruned draft when there is one (for fixed-gamma benchmarks).
        has_pruned: whether a pruned draft is among the sources (it needs a draft timing).
        costs: costs from a stored profile; None measures them in the first steps.
    """

    def __init__(self, draft_max: int, adaptive: bool = True, has_pruned: bool = True,
                 costs: CostModel | None = None,
                 load: Callable[[], tuple[int, float]] | None = None,
                 split: bool = False):
        self.draft_max = draft_max
        # in a shared batch: (rows, tokens) the other sequences put in the round, and the
        # rounds are timed by the shared context (a step's own wait includes the others')
        self.load = load
        # a stream per sequence: drafts beside the others' steps are a graph of their own
        # (costmodel.round_cost)
        self.split = split
        self.expected = 1.0  # tokens the last step's choice should yield (E(gamma))
        self.adaptive = adaptive
        self.has_pruned = has_pruned
        self.costs = costs or CostModel()
        self.calibrated_from_profile = costs is not None
        self._acc: dict[tuple[str, int], Acceptance] = {}
        self._since_probe = 0
        self._backoff = _FIRST_BACKOFF
        self._probe_turn = 0
        self._retime_draft = False
        self._since_retime = 0
        self._could_pay: tuple[tuple | None, dict[str, bool]] = (None, {})  # wants()'s
        self._n_judged = 0  # drafts judged so far: acceptance changes only with this
        self._verdict: tuple[tuple | None, bool] = (None, False)  # _pruned_off()'s
        self._plain_verdict: tuple[tuple | None, bool] = (None, False)  # plain_now()'s
        # the last choices, for tests and debugging: a server runs for weeks, so only the
        # newest _HISTORY_MAX are kept, and what the controller holds stays the same size
        self.history: deque[int] = deque(maxlen=_HISTORY_MAX)  # gamma chosen at each step
        self.source_history: deque[str | None] = deque(maxlen=_HISTORY_MAX)

    def _record(self, gamma: int, source: str | None) -> None:
        self.history.append(gamma)
        self.source_history.append(source)

    def _others(self) -> tuple[int, float]:
        return self.load() if self.load is not None else (0, 0.0)

    # -- acceptance ---------------------------------------------------------------------

    def acceptance(self, source: str, match_len: int = 0) -> Acceptance:
        key = (source, 0 if source == PRUNED else min(max(match_len, 1), _MATCH_BUCKETS))
        if key not in self._acc:
            # two pseudo-drafts at the prior: the first real drafts dominate quickly
            self._acc[key] = Acceptance(_prior(source))
        return self._acc[key]

    @property
    def alpha(self) -> float:
        """The pruned draft's current acceptance estimate."""
        return self.acceptance(PRUNED).alpha

    # -- decisions ----------------------------------------------------------------------

    def calibration_need(self) -> Calibration | None:
        """The measurement the next step should make (else None)."""
        if not self.adaptive:
            return None
        if self._retime_draft:
            return _RETIME_DRAFT
        return self.costs.calibration_need(self.has_pruned, self.draft_max + 1)

    @property
    def disabled_reason(self) -> str | None:
        """Why the pruned draft is out of the choice, from the costs as they are now."""
        c = self.costs
        if not (self.adaptive and self.has_pruned) \
                or c.calibration_need(True, self.draft_max + 1) is not None:
            return None
        if self._best(1.0, c.draft, self.draft_max)[0] > 0:
            return None
        t1 = c.verify_cost(1)
        return (f"the pruned draft cannot pay on this device: a draft step costs "
                f"{c.draft / t1:.2f}x a target step and verifying 2 tokens "
                f"{c.verify_cost(2) / t1:.2f}x, so even 100% acceptance would be slower")

    def _pruned_off(self) -> bool:
        key = (self.costs.version, self.costs.draft, self.draft_max)
        if self._verdict[0] != key:
            self._verdict = (key, self.disabled_reason is not None)
        return self._verdict[1]

    def wants(self, source: str) -> bool:
        """Whether a lookup-like source (drafts cost ~0) should be asked for an offer this
        step. Asking costs tens of microseconds (a memory match, a lookup), so it is skipped
        while even the source's best acceptance, over every match length, could not beat a
        plain step on the current costs: such an offer would not be taken. Every source is
        asked when the next probe is due, and always in fixed-gamma mode, so the decisions
        are the ones asking every step would give."""
        if not self.adaptive:
            return True
        if self.costs.calibration_need(self.has_pruned, self.draft_max + 1) is not None:
            return False  # calibration steps are plain whatever is offered
        if self._since_probe + 1 >= self._backoff:
            return True
        # the verdict holds until the costs are refitted or an acceptance changes
        key = (self.costs.version, self.draft_max, self._n_judged, self._others())
        if self._could_pay[0] != key:
            self._could_pay = (key, {})
        verdicts = self._could_pay[1]
        could = verdicts.get(source)
        if could is None:
            # the prior of a match length never seen counts too (acceptance() uses it)
            alphas = [a.alpha for (name, _), a in self._acc.items() if name == source]
            best = max(alphas + [_prior(source)] * (len(alphas) < _MATCH_BUCKETS))
            plain = (1 + _MARGIN) * self._rate(0, 0.0, 0.0)
            could = verdicts[source] = self._best(best, 0.0, self.draft_max,
                                                  gamma_min=1)[1] > plain
        return could

    def plain_now(self, sources: Iterable[str]) -> bool:
        """Whether this step is certainly plain, decided before any source is asked: the
        costs are calibrated, no probe or re-timing is due, and no source could be taken
        (the pruned draft judged unable to pay, every other source unable to beat a plain
        step even at its best acceptance: ``wants``). That is the choice ``choose`` would
        make once the sources had been asked, and it is recorded as such; on a CPU where
        nothing pays it is nearly every step, and it costs a few attribute reads instead
        of a lookup, a memory probe and a gamma search."""
        if not self.adaptive or self._retime_draft or self._since_probe + 1 >= self._backoff:
            return False
        # the verdict holds while the figures it reads are the same: the verify curve,
        # the draft's cost, the acceptances, the sources (calibration, once complete for a
        # draft_max, stays complete)
        c = self.costs
        key = (c.version, c.draft, self.draft_max, self._n_judged, self._others(),
               tuple(sources))
        if self._plain_verdict[0] != key:
            plain = c.calibration_need(self.has_pruned, self.draft_max + 1) is None and not any(
                (not self._pruned_off()) if name == PRUNED else self.wants(name)
                for name in key[-1])
            self._plain_verdict = (key, plain)
        if not self._plain_verdict[1]:
            return False
        # what choose() -> _maybe_probe() records for a plain step that is not a probe
        self._since_probe += 1
        self._since_retime += 1
        self._record(0, None)
        self.expected = 1.0
        return True

    def choose(self, offers: dict[str, Offer]) -> StepPlan:
        """The plan for the next step: a source and gamma (``PLAIN_STEP``: none), and what
        the step must measure while the costs are being calibrated."""
        plan = self._choose(offers)
        self._record(plan.gamma, plan.source)
        self.expected = costmodel.expected_tokens(plan.gamma, self.acceptance(
            plan.source, offers[plan.source].match_len).alpha) if plan.gamma else 1.0
        need = self.calibration_need()  # after the choice: a probe may ask for a re-timing
        if need is None:
            return plan
        return StepPlan(source=plan.source, gamma=plan.gamma, calibration=need)

    def _choose(self, offers: dict[str, Offer]) -> StepPlan:
        live = {n: o for n, o in offers.items() if o.n_max > 0}
        if not self.adaptive:
            if not live:
                return PLAIN_STEP
            return self._fixed_choice(live)
        if self.costs.calibration_need(self.has_pruned, self.draft_max + 1) is not None:
            # calibrated without the draft ever reading the prompt (see PrunedDrafter), so
            # a device where speculation cannot pay finds out for almost nothing
            return PLAIN_STEP
        # the verdict costs a gamma search: asked only when the pruned draft is on offer,
        # and recomputed only when the figures it reads have changed
        pruned_off = PRUNED in live and self._pruned_off()
        best: tuple[str | None, int, float] = (None, 0,
                                                (1 + _MARGIN) * self._rate(0, 0.0, 0.0))
        for name, offer in live.items():
            if name == PRUNED and pruned_off:
                continue
            c = self.costs.draft if name == PRUNED else 0.0
            alpha = self.acceptance(name, offer.match_len).alpha
            g, rate = self._best(alpha, c, min(offer.n_max, self.draft_max), gamma_min=1)
            if rate > best[2]:
                best = (name, g, rate)
        if best[0] is not None:
            self._since_probe, self._backoff = 0, _FIRST_BACKOFF
            return StepPlan(source=best[0], gamma=best[1])
        return self._maybe_probe(live, pruned_off)

    def _fixed_choice(self, live: dict[str, Offer]) -> StepPlan:
        """Fixed gamma: the grammar's forced tokens when a constraint forces any; else the
        pruned draft when there is one; else the lookup whose context
        match is longest (ties: the longer draft). A lookup that found only a short match
        pads its draft by repeating the text, so the longer draft alone would nearly always
        be the in-request lookup's; on the 24 session requests of ``bench.serve``,
        teacher-forced, choosing by match length gives 3.22 tokens per target step
        against 2.87 by draft length."""
        if GRAMMAR in live:  # forced text first: it is (nearly) always kept, for free
            name = GRAMMAR
        elif PRUNED in live:
            name = PRUNED
        else:
            name = max(live, key=lambda n: (live[n].match_len, live[n].n_max))
        return StepPlan(source=name, gamma=min(self.draft_max, live[name].n_max))

    def _maybe_probe(self, live: dict[str, Offer], pruned_off: bool) -> StepPlan:
        """While plain decoding wins, draft now and then anyway (with back-off), taking
        the sources in turn, so acceptance estimates stay current."""
        self._since_probe += 1
        self._since_retime += 1
        if self._since_probe < self._backoff:
            return PLAIN_STEP
        self._since_probe = 0
        self._backoff = min(2 * self._backoff, _MAX_BACKOFF)
        if pruned_off and PRUNED in live and self._since_retime >= _RETIME_EVERY:
            self._retime_draft = True  # is the verdict still true? re-time the draft step
            self._since_retime = 0
        # a lookup probe needs a real match: one shared token predicts little, and a
        # probe on it would cost a batch for almost no evidence. Forced text is never
        # probed: its acceptance is known (it is the grammar's own text), so whether it
        # pays depends on the verify costs alone, and a probe would only pay a batch to
        # learn nothing (its clean result would even reset the back-off every time).
        names = sorted(n for n, o in live.items()
                       if n != GRAMMAR and not (n == PRUNED and pruned_off)
                       and (n == PRUNED or o.match_len >= _PROBE_MIN_MATCH))
        if not names:
            return PLAIN_STEP
        name = names[self._probe_turn % len(names)]
        self._probe_turn += 1
        return StepPlan(source=name, gamma=self._probe_gamma(live[name].n_max))

    def _probe_gamma(self, n_max: int) -> int:
        """Up to _PROBE_GAMMA drafts, but no more than a batch costing at most two plain
        steps buys: on a CPU where batching buys nothing a probe then costs under one
        extra step, on a GPU it drafts the full _PROBE_GAMMA."""
        v, r = self.costs.verify_cost, self._others()[0]
        t1 = v(1)
        g = 1
        # the probe's extra rows, on top of what the round holds anyway (r = 0 alone)
        while g < min(_PROBE_GAMMA, self.draft_max, n_max) and \
                costmodel.round_cost(g + 1, v, r, self.split) - v(r + 1) <= t1:
            g += 1
        return g

    def _rate(self, gamma: int, alpha: float, c: float) -> float:
        k = self.costs
        return costmodel.batch_rate(gamma, alpha, c, k.verify_cost,
                                    k.overhead_spec if gamma else k.overhead_plain,
                                    self._others(), self.split)

    def _best(self, alpha: float, c: float | None, gamma_max: int, gamma_min: int = 0
              ) -> tuple[int, float]:
        k = self.costs
        return costmodel.best_gamma(alpha, c or 0.0, k.verify_cost, gamma_max, gamma_min,
                                    (k.overhead_plain, k.overhead_spec), self._others(),
                                    self.split)

    def best_gamma(self, alpha: float) -> int:
        """The pruned draft's best gamma at acceptance ``alpha`` on the current costs."""
        return self._best(alpha, self.costs.draft, self.draft_max)[0]

    # -- learning -----------------------------------------------------------------------

    def observe(self, rec: StepRecord) -> None:
        """Record one step."""
        c = self.costs
        if self.load is None:  # shared rounds are timed whole by runtime.batching
            c.add_verify(rec.n_verified, rec.verify_seconds)
        if rec.n_catchup:
            c.add_catchup(rec.catchup_seconds, rec.n_catchup)
        if rec.n_drafted and rec.source is not None:
            if rec.source == PRUNED and rec.draft_evals:
                c.add_draft(rec.draft_seconds / rec.draft_evals)
            self.acceptance(rec.source, rec.match_len).add(
                rec.n_accepted + int(rec.rejected), rec.n_accepted)
            self._n_judged += 1
            if not rec.rejected and self._since_probe == 0 and self._backoff > _FIRST_BACKOFF:
                self._backoff = _FIRST_BACKOFF  # a clean probe: look again soon
        c.add_overhead(rec.gamma > 0, rec.overhead_seconds)

    def observe_draft(self, seconds: float) -> None:
        """A draft step timed outside the decode loop (calibration or a re-check). A
        re-check that comes in cheaper replaces the estimate: a busy machine only ever
        inflates timings, so the cheaper figure is the better evidence of the real cost."""
        c = self.costs
        if self._retime_draft and c.draft is not None and seconds < c.draft:
            c.draft = seconds
        else:
            c.add_draft(seconds)
        self._retime_draft = False
        if self.disabled_reason:
            log.debug("%s; decoding without it", self.disabled_reason)
