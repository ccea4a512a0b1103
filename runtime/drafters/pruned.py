"""``PrunedDrafter`` runs a layer-pruned GGUF in its own llama.cpp context.

It keeps its KV cache as a prefix of the real token sequence: after each step it forgets
what the target rejected and, on the next proposal, first catches up on the tokens it has
not seen (timed apart from drafting).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from runtime.context import LlamaContext
from runtime.drafting import Draft, DraftCost
from runtime.sampling import Sampler, top1_prob


class PrunedDrafter:
    """Drafts with a (layer-pruned) GGUF in its own context.

    Args:
        ctx: the draft's context; this object drives it but does not own it.
        sampler: shared with the verifier: the same filters and the same coupled noise, so
            a sampled draft is the target's draw whenever the two models agree.
        clock: seconds now (injectable so tests can simulate costs).
    """

    source = "pruned"
    cost = DraftCost.MODEL_STEP

    def __init__(self, ctx: LlamaContext, sampler: Sampler,
                 clock: Callable[[], float] = time.perf_counter):
        self.ctx = ctx
        self.sampler = sampler
        self.clock = clock
        self._seen: list[int] = []  # tokens in the draft's KV cache, in order

    def propose(self, tokens: list[int], n_max: int, p_min: float) -> Draft:
        draft = Draft(source=self.source)
        if n_max <= 0:
            return draft
        self._sync(tokens)
        pending = tokens[len(self._seen):]  # at least the last token: see _sync
        if len(pending) > 1:
            # Catch-up (the prompt, a chat turn, tokens emitted while gamma was 0): one
            # batch, timed apart from drafting and charged per token by the controller.
            start = self.clock()
            self.ctx.eval(pending[:-1])
            self._seen.extend(pending[:-1])
            draft.catchup_seconds, draft.n_catchup = self.clock() - start, len(pending) - 1
            pending = pending[-1:]
        w = self.sampler.history_window
        history = list(tokens[-w:]) if w else []
        start = self.clock()
        try:
            while len(draft.tokens) < n_max:
                row = self.ctx.eval(pending)[0]
                self._seen.extend(pending)
                draft.n_evals += 1
                # llama.cpp's rule: stop before a token the draft is unsure of
                if p_min > 0 and top1_prob(row) < p_min:
                    break
                tok = self.sampler.choose(row, history, len(tokens) + len(draft.tokens))
                draft.tokens.append(tok)
                history.append(tok)
                pending = [tok]
        finally:
            draft.seconds = self.clock() - start
        return draft

    def time_step(self) -> float:
        """Seconds for one single-token draft decode, measured on scratch space past the
        cached tokens and then forgotten (the draft need not have read the prompt)."""
        n = len(self._seen)
        start = self.clock()
        self.ctx.eval([self._seen[-1] if self._seen else 0])
        seconds = self.clock() - start
        self.ctx.truncate(n)
        return seconds

    def _sync(self, tokens: list[int]) -> None:
        """Leave at least one token pending, so the next eval yields the logits we want.

        Callers keep the KV cache a prefix of ``tokens`` by calling ``rollback`` after each
        step, so no O(n) prefix scan runs per step; the last kept token is checked.
        """
        self.rollback(min(len(self._seen), len(tokens) - 1))
        n = len(self._seen)
        assert n == 0 or self._seen[n - 1] == tokens[n - 1], "draft cache diverged"

    def rollback(self, n_keep: int) -> None:
        n_keep = min(n_keep, len(self._seen))
        # ctx.n_past can run ahead of _seen when an interrupt lands mid-eval
        if n_keep < self.ctx.n_past:
            self.ctx.truncate(n_keep)
        del self._seen[n_keep:]

    def reset(self) -> None:
        self.ctx.reset()
        self._seen.clear()
