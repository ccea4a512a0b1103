"""The draft-then-verify decode loop, as a generator of small step records.

Invariant between steps: the target's KV cache holds exactly ``self.kv`` and the sequence
continues with one emitted-but-unevaluated token, ``self.pending``. Each step:

1. the controller plans the step (a ``StepPlan``: a draft source and gamma, 0 for a plain
   step, and what to measure while it calibrates), and that source proposes up to gamma
   tokens after kv + [pending];
2. the target evaluates [pending] + drafts in ONE llama_decode, one logits row each:
   row i predicts the token after kv + [pending] + drafts[:i];
3. the longest prefix equal to the target's own choices is kept, plus the target's own
   next token (``sampling.verify``): every emitted token is the target's choice from the
   batch that verified it;
4. every cache is rolled back to exactly the emitted tokens.

Under a constraint (``runtime.constraint``) drafts are first cut where the grammar rejects
them, row i of the batch is masked by the grammar's state after [pending] + drafts[:i],
and each emitted token is the target's own choice among the allowed tokens. The grammar
state is one more cache: it has consumed exactly kv + [pending] past the prompt and is
rolled back with the others. The tokens the grammar forces are one more draft source
(``GrammarDrafter``), chosen by the controller like any other.

A ``try/finally`` restores the invariant whatever interrupts a step (a stop string in
the consumer, Ctrl-C, an error), so a chat can always continue from what was emitted.
Timing is taken here only as raw figures in a ``StepRecord``; the controller judges them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from runtime.constraint import Constraint
from runtime.context import ContextFullError, LlamaContext
from runtime.controller import GRAMMAR, PLAIN_STEP, GammaController, Offer, StepPlan, StepRecord
from runtime.drafters.grammar import GrammarDrafter
from runtime.drafting import Draft, DraftCost, Drafter
from runtime.sampling import Sampler, accept_prefix, logprobs, verify

log = logging.getLogger(__name__)

FINISH_REASONS = ("eog", "stop", "length", "context")
_NO_DRAFT = Draft()  # a plain step's draft; shared, so never mutated


@dataclass(slots=True, kw_only=True)
class Step:
    """What one step emitted. ``tokens`` are final: the target chose every one."""

    tokens: list[int]
    gamma: int
    n_drafted: int = 0
    n_accepted: int = 0
    source: str | None = None
    # per token, when asked for: (log-prob, [(token, log-prob) of the most likely])
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None

    @property
    def rejected(self) -> bool:
        return self.n_accepted < self.n_drafted


@dataclass
class Stats:
    """Figures for one generation; every rate is computed from measured counts."""

    mode: str = "plain"
    n_prompt: int = 0
    n_prompt_new: int = 0  # prompt tokens actually evaluated (the rest was cached)
    prompt_seconds: float = 0.0
    n_tokens: int = 0
    decode_seconds: float = 0.0
    n_steps: int = 0
    n_drafted: int = 0
    n_accepted: int = 0
    n_rejections: int = 0  # steps where the target rejected a draft
    llama_seconds: float = 0.0  # inside llama_decode, all models, decode phase
    # shared rounds (runtime.batching) this request took part in, and their rows (every
    # sequence's): rows per round is how full the batch was
    batch_rounds: int = 0
    batch_rows: int = 0
    gamma_history: list[int] = field(default_factory=list)
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    finish_reason: str | None = None
    note: str | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.n_accepted / self.n_drafted if self.n_drafted else 0.0

    @property
    def alpha(self) -> float:
        """Per-token acceptance under the model 'each draft accepted independently until
        the first rejection': accepted / (accepted + rejections)."""
        judged = self.n_accepted + self.n_rejections
        return self.n_accepted / judged if judged else 0.0

    @property
    def mean_accepted_per_step(self) -> float:
        return self.n_accepted / self.n_steps if self.n_steps else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens emitted per target evaluation (1.0 for plain decoding)."""
        return (self.n_tokens - 1) / self.n_steps if self.n_steps else 1.0

    @property
    def python_overhead(self) -> float:
        """Share of decode time spent outside llama_decode."""
        if self.decode_seconds <= 0:
            return 0.0
        return max(0.0, 1.0 - self.llama_seconds / self.decode_seconds)

    @property
    def python_us_per_step(self) -> float:
        """bridge's own time per target step (drafting by lookup, the controller, sampling,
        bookkeeping), in microseconds: decode time outside llama_decode."""
        if not self.n_steps:
            return 0.0
        return 1e6 * max(0.0, self.decode_seconds - self.llama_seconds) / self.n_steps

    @property
    def main_source(self) -> str | None:
        """The source that contributed most accepted tokens."""
        best = max(self.sources.items(), key=lambda kv: kv[1]["accepted"], default=None)
        return best[0] if best and best[1]["accepted"] else None

    def add_step(self, step: Step) -> None:
        self.n_steps += 1
        self.n_tokens += len(step.tokens)
        self.gamma_history.append(step.gamma)
        if step.source is None:
            return
        self.n_drafted += step.n_drafted
        self.n_accepted += step.n_accepted
        self.n_rejections += step.rejected
        src = self.sources.setdefault(step.source, {"steps": 0, "drafted": 0, "accepted": 0})
        src["steps"] += 1
        src["drafted"] += step.n_drafted
        src["accepted"] += step.n_accepted

    def gamma_summary(self) -> str:
        """gamma's histogram, e.g. '0x80 4x6' (gamma x steps)."""
        return " ".join(f"{g}x{n}" for g, n in sorted(Counter(self.gamma_history).items()))

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "finish_reason": self.finish_reason,
            "tokens_per_s": round(self.tokens_per_s, 3),
            "n_tokens": self.n_tokens,
            "n_steps": self.n_steps,
            "tokens_per_step": round(self.tokens_per_step, 4),
            "n_drafted": self.n_drafted,
            "n_accepted": self.n_accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "alpha": round(self.alpha, 4),
            "mean_accepted_per_step": round(self.mean_accepted_per_step, 4),
            "sources": self.sources,
            "n_prompt": self.n_prompt,
            "n_prompt_evaluated": self.n_prompt_new,
            "prompt_seconds": round(self.prompt_seconds, 4),
            "decode_seconds": round(self.decode_seconds, 4),
            "python_overhead": round(self.python_overhead, 4),
            "python_us_per_step": round(self.python_us_per_step, 1),
            "gamma": self.gamma_summary(),
            "batch_rows_per_round": round(self.batch_rows / self.batch_rounds, 2)
            if self.batch_rounds else None,
            "note": self.note,
        }


class SpeculativeDecoder:
    """Drives one target context and any number of draft sources.

    Args:
        target: the full model's context (owned by the caller).
        drafters: the draft sources (a pruned draft, lookups); empty for plain decoding
            through the same loop.
        sampler: shared by verification and drafting.
        controller: chooses the source and gamma per step.
        p_min: the pruned drafter's confidence cut-off.
        max_rows: the most rows a target batch may have (exact mode's widest batch that
            matches one-token steps bitwise); None for no limit.
        forced_drafts: under a constraint, offer the tokens it forces as a draft source.
    """

    def __init__(self, target: LlamaContext, drafters: list[Drafter], sampler: Sampler,
                 controller: GammaController, p_min: float, max_rows: int | None = None,
                 forced_drafts: bool = True):
        self.target = target
        self.max_rows = max_rows
        self.drafters = {d.source: d for d in drafters}
        self.sampler = sampler
        self.controller = controller
        self.p_min = p_min
        self.forced_drafts = forced_drafts
        self.kv: list[int] = []       # exactly the target's KV cache
        self._draft_ctxs: list[LlamaContext] = []  # the drafters' contexts (timing)
        # this generation's sources by cost (DraftCost): those asked before the choice,
        # and the one whose drafts cost a model step (the controller models one)
        self._free: list[tuple[str, Drafter]] = []
        self._model_drafter: Drafter | None = None
        self.pending: int | None = None
        # the last generation's constraint: kept after it ends, so that keep() past a
        # stop string rolls it back with the caches
        self.constraint: Constraint | None = None
        self.n_logprobs: int | None = None  # top log-probs per token, when asked for
        self._argmax_only = False  # this generation needs only the target's argmax

    def reset(self) -> None:
        self.target.reset()
        self.kv.clear()
        self.pending = None
        self.constraint = None
        for d in self.drafters.values():
            d.reset()

    def keep(self, n: int) -> None:
        """Forget everything after the first ``n`` tokens of the sequence (e.g. past a stop
        string), so the caches end exactly where the returned text ends."""
        if n < len(self.kv) + (self.pending is not None):
            self.pending = None
        if n < len(self.kv):
            self.target.truncate(n)
            del self.kv[n:]
        for d in self.drafters.values():
            d.rollback(len(self.kv))
        if self.constraint is not None:
            self.constraint.rollback(n)

    def generate(self, prompt: list[int], max_tokens: int, is_eog: Callable[[int], bool],
                 stats: Stats, constraint: Constraint | None = None,
                 n_logprobs: int | None = None) -> Iterator[Step]:
        """Yield steps continuing ``prompt`` until an end-of-generation token, ``max_tokens``
        or a full context; ``stats.finish_reason`` says which. Reuses the KV cache for the
        longest common prefix with the last call, so a chat turn evaluates only its new
        tokens.

        Args:
            constraint: what the answer must match; the answer ends (``eog``) where the
                grammar is complete, or at an end-of-generation token it allows.
            n_logprobs: attach each token's log-prob and this many top ones to the steps.
        """
        self.constraint, self.n_logprobs = constraint, n_logprobs
        # plain greedy needs no logits in Python: llama.cpp takes every row's argmax
        self._argmax_only = (self.sampler.plain_greedy and constraint is None
                             and n_logprobs is None)
        if constraint is not None:
            constraint.bind(len(prompt))
            if self.forced_drafts and self.drafters:
                self.drafters[GRAMMAR] = GrammarDrafter(constraint)
        self._draft_ctxs = [c for d in self.drafters.values()
                            if (c := getattr(d, "ctx", None)) is not None]
        self._free = [(n, d) for n, d in self.drafters.items() if d.cost is DraftCost.FREE]
        self._model_drafter = next((d for d in self.drafters.values()
                                    if d.cost is DraftCost.MODEL_STEP), None)
        stats.mode = "speculative" if self.drafters else "plain"
        stats.n_prompt = len(prompt)
        t_start = time.perf_counter()
        llama_start = self._llama_seconds()
        # the answer may use what the context has left after the prompt, and no more
        room = self.target.n_ctx - len(prompt) + 1
        limit, reason = (max_tokens, "length") if max_tokens <= room else (room, "context")
        try:
            first = self._prefill(prompt, stats)
            stats.n_tokens = 1
            t_start = time.perf_counter()
            llama_start = self._llama_seconds()
            yield first
            if self._ended(first.tokens[-1], is_eog):
                stats.finish_reason = "eog"
                return
            while stats.n_tokens < limit:
                try:
                    step = self._step(limit - stats.n_tokens, is_eog)
                except ContextFullError:  # a shared cache ran out of cells (batching)
                    stats.finish_reason = "context"
                    return
                stats.add_step(step)
                stats.decode_seconds = time.perf_counter() - t_start
                yield step
                if self._ended(step.tokens[-1], is_eog):
                    stats.finish_reason = "eog"
                    return
            stats.finish_reason = reason
        finally:
            self.drafters.pop(GRAMMAR, None)
            stats.decode_seconds = time.perf_counter() - t_start
            stats.llama_seconds = self._llama_seconds() - llama_start
            note = self.controller.disabled_reason if self._model_drafter is not None \
                else None
            if self.drafters and not stats.n_drafted:
                stats.mode = "plain (speculation off)"
            stats.note = note
            self._restore()

    def _ended(self, token: int, is_eog: Callable[[int], bool]) -> bool:
        """The answer is complete: an end-of-generation token, or a grammar that admits
        nothing more (no token then needs to be spent on the end itself)."""
        if is_eog(token):
            return True
        c = self.constraint
        if c is not None and c.done:
            if c.error:
                log.warning("the constraint stopped with an error: %s", c.error)
            return True
        return False

    def _llama_seconds(self) -> float:
        """Seconds inside llama_decode so far, target and draft models (read twice a step:
        the contexts are listed once per generation, when the drafters are settled)."""
        seconds = self.target.eval_seconds
        for c in self._draft_ctxs:
            seconds += c.eval_seconds
        return seconds

    def _prefill(self, prompt: list[int], stats: Stats) -> Step:
        """Evaluate what the cache lacks of ``prompt``; return the step of the first new
        token (chosen under the constraint, if any)."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.target.n_ctx:
            raise ValueError(f"the prompt has {len(prompt)} tokens but the context holds "
                             f"{self.target.n_ctx}; raise -c/--ctx or shorten the prompt")
        n = common_prefix(self.kv, prompt)
        n = min(n, len(prompt) - 1)  # re-evaluate at least one token for its logits
        self.target.truncate(n)
        del self.kv[n:]
        for d in self.drafters.values():
            d.rollback(n)
        start = time.perf_counter()
        self.pending = None
        if self._argmax_only:
            rows, first = None, self.target.eval_argmax(prompt[n:])[-1]
        else:
            rows = self.target.eval(prompt[n:])
        self.kv.extend(prompt[n:])
        stats.n_prompt_new = len(prompt) - n
        stats.prompt_seconds = time.perf_counter() - start
        if rows is None:
            self.pending = first
            return Step(tokens=[first], gamma=0)
        allowed = self.constraint.allowed() if self.constraint is not None else None
        first = self.sampler.choose(rows[-1], self._history(), len(self.kv), allowed)
        if self.constraint is not None:
            self.constraint.consume(first)
        self.pending = first
        return Step(tokens=[first], gamma=0,
                    logprobs=self._logprobs(rows[-1:], [first], [allowed]))

    def _logprobs(self, rows, tokens: list[int], masks: list) -> list | None:
        """Each emitted token's log-prob from the row that chose it, under its mask."""
        if self.n_logprobs is None:
            return None
        return [logprobs(rows[i], tok, self.n_logprobs, masks[i])
                for i, tok in enumerate(tokens)]

    def _history(self) -> list[int]:
        w = self.sampler.history_window
        return self.kv[-w:] if w else []

    def _propose(self, gamma_cap: int) -> tuple[StepPlan, Draft]:
        """Ask the controller for the step's plan and get its source's draft. Sources
        whose drafts cost about nothing are asked first (their match length informs the
        choice); a draft model runs only when chosen."""
        ctrl = self.controller
        if not self.drafters or gamma_cap <= 0:
            # nothing can be drafted: the step is recorded as plain, and a measurement the
            # controller still lacks waits for a step that could draft
            ctrl.choose({})
            return PLAIN_STEP, _NO_DRAFT
        if ctrl.plain_now(self.drafters):
            return PLAIN_STEP, _NO_DRAFT
        # drafters read kv + [pending]; append in place rather than copy the whole
        # sequence every step (this runs once per emitted token)
        self.kv.append(self.pending)
        try:
            return self._choose_and_draft(self.kv, gamma_cap)
        finally:
            self.kv.pop()

    def _choose_and_draft(self, seq: list[int], gamma_cap: int) -> tuple[StepPlan, Draft]:
        ctrl = self.controller
        # sources whose offer could not be taken are not asked (GammaController.wants)
        cheap = {name: d.propose(seq, gamma_cap, 0.0) for name, d in self._free
                 if ctrl.wants(name)}
        offers = {name: Offer(len(d.tokens), d.match_len) for name, d in cheap.items()}
        model = self._model_drafter
        if model is not None:
            offers[model.source] = Offer(gamma_cap)
        plan = ctrl.choose(offers)
        if plan.times_draft_step and model is not None:
            ctrl.observe_draft(model.time_step())
        if plan.source is None:
            draft = _NO_DRAFT
        elif plan.source in cheap:
            draft = cheap[plan.source]
            draft.tokens = draft.tokens[:plan.gamma]
        else:  # the model's draft, run now that it was chosen
            draft = self.drafters[plan.source].propose(seq, plan.gamma, self.p_min)
        return plan, draft

    def _step(self, budget: int, is_eog: Callable[[int], bool]) -> Step:
        assert self.pending is not None
        t0 = time.perf_counter()
        llama0 = self._llama_seconds()
        room = self.target.n_ctx - len(self.kv) - 2
        plan, draft = self._propose(min(budget - 1, room))
        constraint = self.constraint
        if constraint is not None and draft.tokens:  # cut where the grammar rejects it
            draft.tokens = draft.tokens[:constraint.validate(draft.tokens)]
        # the repeat penalty's window (empty when the sampler has no penalty)
        history = self._history() + [self.pending] if self.sampler.history_window else []
        # Calibration: a plain step run as a k-token batch (the pending token k times)
        # times t_verify(k); row 0 is the plain step's answer and the padding is dropped.
        k = plan.verify_rows
        pad_ok = k > 1 and room >= k - 2 and (self.max_rows is None or k <= self.max_rows)
        batch = [self.pending] * k if pad_ok and not draft.tokens \
            else [self.pending, *draft.tokens]
        assert self.max_rows is None or len(batch) <= self.max_rows
        t_verify = time.perf_counter()
        if self._argmax_only:
            choices = self.target.eval_argmax(batch, all_rows=True)
            verify_seconds = time.perf_counter() - t_verify
            n_acc, nxt = accept_prefix(choices, draft.tokens)
            emitted, lps = _cut([*draft.tokens[:n_acc], nxt], budget, is_eog), None
        else:
            rows = self.target.eval(batch, all_logits=True)
            verify_seconds = time.perf_counter() - t_verify
            rows = rows[: len(draft.tokens) + 1]
            masks: list | None = [] if self.n_logprobs is not None else None
            n_acc, nxt = verify(self.sampler, rows, draft.tokens, history,
                                len(self.kv) + 1, constraint, masks)
            emitted = _cut([*draft.tokens[:n_acc], nxt], budget, is_eog)
            lps = self._logprobs(rows, emitted, masks or [None] * len(emitted))
        # roll back: the cache keeps pending + the accepted drafts that were emitted
        self.kv.append(self.pending)
        self.kv.extend(emitted[:-1])
        self.target.truncate(len(self.kv))
        self.pending = emitted[-1]
        if plan.source is not None:
            # only a drafter asked for a draft can have read past what is kept (the pruned
            # draft reads its own proposal, even one the grammar then cut to nothing);
            # otherwise each drafter saw at most kv + [pending], which the cache now holds
            for d in self.drafters.values():
                d.rollback(len(self.kv))
        if constraint is not None:
            constraint.rollback(len(self.kv) + 1)
        overhead = (time.perf_counter() - t0) - (self._llama_seconds() - llama0)
        source = plan.source if draft.tokens else None  # who drafted what was verified
        self.controller.observe(StepRecord(
            source=source, gamma=plan.gamma, n_verified=len(batch),
            n_drafted=len(draft.tokens), n_accepted=n_acc, match_len=draft.match_len,
            draft_seconds=draft.seconds, draft_evals=draft.n_evals,
            catchup_seconds=draft.catchup_seconds, n_catchup=draft.n_catchup,
            verify_seconds=verify_seconds, overhead_seconds=overhead))
        return Step(tokens=emitted, gamma=plan.gamma, n_drafted=len(draft.tokens),
                    n_accepted=min(n_acc, len(emitted)), source=source, logprobs=lps)

    def _restore(self) -> None:
        """Make every cache agree with ``self.kv`` (a no-op unless a step was cut short)."""
        if self.target.n_past > len(self.kv):
            self.target.truncate(len(self.kv))
        del self.kv[self.target.n_past:]
        for d in self.drafters.values():
            d.rollback(len(self.kv))
        if self.constraint is not None:
            self.constraint.rollback(len(self.kv) + (self.pending is not None))


def common_prefix(a: Sequence, b: Sequence) -> int:
    """Length of the common prefix of two lists (or strings): a binary search over slice
    comparisons, which run in C (a Python loop over a 10,000-token prompt costs ~1 ms)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # invariant: a[:lo] == b[:lo]; the answer is in lo..hi
        mid = (lo + hi + 1) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _cut(tokens: list[int], budget: int, is_eog: Callable[[int], bool]) -> list[int]:
    """Stop at the first end-of-generation token (kept) or after ``budget`` tokens."""
    out = tokens[:budget]
    for i, tok in enumerate(out):
        if is_eog(tok):
            return out[: i + 1]
    return out
