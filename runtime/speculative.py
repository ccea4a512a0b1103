"""The draft-then-verify decode loop, as a generator of small step records.

Invariant between steps: the target's KV cache holds exactly ``self.kv`` and the sequence
continues with one emitted-but-unevaluated token, ``self.pending``. Each step:

1. the drafter proposes up to gamma tokens after kv + [pending];
2. the target evaluates [pending] + drafts in ONE llama_decode, one logits row each:
   row i predicts the token after kv + [pending] + drafts[:i];
3. the longest agreeing prefix is kept, plus the target's own next token;
4. both caches are rolled back to exactly the emitted tokens.

A ``try/finally`` restores the invariant whatever interrupts a step (a stop string in
the consumer, Ctrl-C, an error), so a chat can always continue from what was emitted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from runtime.context import LlamaContext
from runtime.controller import GammaController
from runtime.drafting import Draft, Drafter
from runtime.sampling import Sampler, verify_greedy, verify_stochastic

log = logging.getLogger(__name__)


@dataclass
class Step:
    """What one step emitted. ``tokens`` are final: the target agreed to every one."""

    tokens: list[int]
    gamma: int
    n_drafted: int
    n_accepted: int

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
    llama_seconds: float = 0.0  # inside llama_decode, both models, decode phase
    gamma_history: list[int] = field(default_factory=list)
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
    def python_overhead(self) -> float:
        """Share of decode time spent outside llama_decode."""
        if self.decode_seconds <= 0:
            return 0.0
        return max(0.0, 1.0 - self.llama_seconds / self.decode_seconds)

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "tokens_per_s": round(self.tokens_per_s, 3),
            "n_tokens": self.n_tokens,
            "n_steps": self.n_steps,
            "n_drafted": self.n_drafted,
            "n_accepted": self.n_accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "alpha": round(self.alpha, 4),
            "mean_accepted_per_step": round(self.mean_accepted_per_step, 4),
            "n_prompt": self.n_prompt,
            "n_prompt_evaluated": self.n_prompt_new,
            "prompt_seconds": round(self.prompt_seconds, 4),
            "decode_seconds": round(self.decode_seconds, 4),
            "python_overhead": round(self.python_overhead, 4),
            "gamma_history": self.gamma_history,
            "note": self.note,
        }


class SpeculativeDecoder:
    """Drives one target context and an optional drafter.

    Args:
        target: the full model's context (owned by the caller).
        drafter: the draft source, or None for plain decoding through the same loop.
        sampler: shared by verification and drafting.
        controller: chooses gamma per step; ``None`` drafter means gamma is always 0.
        p_min: the drafter's confidence cut-off.
    """

    def __init__(self, target: LlamaContext, drafter: Drafter | None, sampler: Sampler,
                 controller: GammaController, p_min: float):
        self.target = target
        self.drafter = drafter
        self.sampler = sampler
        self.controller = controller
        self.p_min = p_min
        self.kv: list[int] = []       # exactly the target's KV cache
        self.pending: int | None = None

    def reset(self) -> None:
        self.target.reset()
        self.kv.clear()
        self.pending = None
        if self.drafter:
            self.drafter.reset()

    def generate(self, prompt: list[int], max_tokens: int, is_eog: Callable[[int], bool],
                 stats: Stats) -> Iterator[Step]:
        """Yield steps continuing ``prompt`` until an end-of-generation token or
        ``max_tokens``. Reuses the KV cache for the longest common prefix with the last
        call, so a chat turn evaluates only its new tokens."""
        stats.mode = "speculative" if self.drafter else "plain"
        stats.n_prompt = len(prompt)
        t_start = time.perf_counter()
        llama_start = self._llama_seconds()
        # the answer may use what the context has left after the prompt, and no more
        max_tokens = min(max_tokens, self.target.n_ctx - len(prompt))
        try:
            first = self._prefill(prompt, stats)
            stats.n_tokens = 1
            t_start = time.perf_counter()
            llama_start = self._llama_seconds()
            yield Step([first], 0, 0, 0)
            if is_eog(first):
                return
            while stats.n_tokens < max_tokens:
                step = self._step(max_tokens - stats.n_tokens, is_eog)
                stats.n_steps += 1
                stats.n_drafted += step.n_drafted
                stats.n_accepted += step.n_accepted
                stats.n_rejections += step.rejected
                stats.n_tokens += len(step.tokens)
                stats.decode_seconds = time.perf_counter() - t_start
                yield step
                if is_eog(step.tokens[-1]):
                    return
        finally:
            stats.decode_seconds = time.perf_counter() - t_start
            stats.llama_seconds = self._llama_seconds() - llama_start
            stats.gamma_history = list(self.controller.history[-stats.n_steps:]) \
                if stats.n_steps else []
            stats.note = self.controller.disabled_reason
            self._restore()

    def _llama_seconds(self) -> float:
        total = self.target.eval_seconds
        ctx = getattr(self.drafter, "ctx", None)
        return total + (ctx.eval_seconds if ctx is not None else 0.0)

    def _prefill(self, prompt: list[int], stats: Stats) -> int:
        """Evaluate what the cache lacks of ``prompt``; return the first new token."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.target.n_ctx:
            raise ValueError(f"the prompt has {len(prompt)} tokens but the context holds "
                             f"{self.target.n_ctx}; raise -c/--ctx or shorten the prompt")
        n = _common_prefix(self.kv, prompt)
        n = min(n, len(prompt) - 1)  # re-evaluate at least one token for its logits
        self.target.truncate(n)
        del self.kv[n:]
        if self.drafter:
            self.drafter.rollback(n)
        start = time.perf_counter()
        self.pending = None
        rows = self.target.eval(prompt[n:])
        self.kv.extend(prompt[n:])
        stats.n_prompt_new = len(prompt) - n
        stats.prompt_seconds = time.perf_counter() - start
        w = self.sampler.history_window
        first = self._pick(rows[-1], self.kv[-w:] if w else [])
        self.pending = first
        return first

    def _pick(self, row, history: list[int]) -> int:
        if self.sampler.cfg.greedy:
            return self.sampler.argmax(row, history)
        return self.sampler.draw(self.sampler.probs(row, history))

    def _step(self, budget: int, is_eog: Callable[[int], bool]) -> Step:
        assert self.pending is not None
        t0 = time.perf_counter()
        llama0 = self._llama_seconds()
        gamma = self.controller.choose() if self.drafter else 0
        gamma = min(gamma, budget - 1, self.target.n_ctx - len(self.kv) - 2)
        need = self.controller.calibration_need() if self.drafter else None
        if need == "draft":
            self.controller.observe_draft(self.drafter.time_step())
        # the whole sequence is built only when drafting; filters need just a short tail
        draft = self.drafter.propose(self.kv + [self.pending], gamma, self.p_min) \
            if gamma > 0 and self.drafter else Draft()
        w = self.sampler.history_window
        history = (self.kv[-w:] if w else []) + [self.pending]
        # Calibration: a plain step run as a 2-token batch (the pending token twice) times
        # t_verify(2); row 0 is the plain step's answer and the padding is dropped below.
        batch = [self.pending, self.pending] if need == "batch" and self.target.n_ctx > \
            len(self.kv) + 2 else [self.pending, *draft.tokens]
        t_verify = time.perf_counter()
        rows = self.target.eval(batch, all_logits=True)
        verify_seconds = time.perf_counter() - t_verify
        rows = rows[: len(draft.tokens) + 1]
        if self.sampler.cfg.greedy:
            n_acc, nxt = verify_greedy(self.sampler, rows, draft.tokens, history)
        else:
            n_acc, nxt = verify_stochastic(self.sampler, rows, draft.tokens, draft.probs,
                                         history)
        emitted = [*draft.tokens[:n_acc], nxt]
        emitted = _cut(emitted, budget, is_eog)
        # roll back: the cache keeps pending + the accepted drafts that were emitted
        self.kv.append(self.pending)
        self.kv.extend(emitted[:-1])
        self.target.truncate(len(self.kv))
        self.pending = emitted[-1]
        if self.drafter:
            self.drafter.rollback(len(self.kv))
        overhead = (time.perf_counter() - t0) - (self._llama_seconds() - llama0)
        self.controller.observe(gamma, len(batch) - 1, len(draft.tokens), n_acc, draft.seconds,
                                draft.n_evals, verify_seconds, overhead,
                                rejected=n_acc < len(draft.tokens))
        return Step(emitted, gamma, len(draft.tokens), min(n_acc, len(emitted)))

    def _restore(self) -> None:
        """Make both caches agree with ``self.kv`` (a no-op unless a step was cut short)."""
        if self.target.n_past > len(self.kv):
            self.target.truncate(len(self.kv))
        del self.kv[self.target.n_past:]
        if self.drafter:
            self.drafter.rollback(len(self.kv))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _cut(tokens: list[int], budget: int, is_eog: Callable[[int], bool]) -> list[int]:
    """Stop at the first end-of-generation token (kept) or after ``budget`` tokens."""
    out = tokens[:budget]
    for i, tok in enumerate(out):
        if is_eog(tok):
            return out[: i + 1]
    return out
