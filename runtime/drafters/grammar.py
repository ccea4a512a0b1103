"""``GrammarDrafter``: the text a constraint forces next, drafted at no model cost."""

from __future__ import annotations

import time

from runtime.constraint import Constraint
from runtime.controller import GRAMMAR
from runtime.drafting import Draft, DraftCost


class GrammarDrafter:
    """Drafts the tokens the grammar forces next, at no model cost.

    With a byte-level BPE vocabulary the forced *text* rarely leaves one token allowed
    (``{"`` and ``{`` both start ``{"name"``), so the forced text's canonical tokens are
    verified like any draft: the target still makes every choice under the mask, and the
    controller learns their acceptance (nearly 1) as its own source.
    """

    source = GRAMMAR
    cost = DraftCost.FREE

    def __init__(self, constraint: Constraint):
        self.constraint = constraint

    def propose(self, tokens: list[int], n_max: int, p_min: float) -> Draft:
        # the constraint has consumed exactly the sequence's answer tokens (pending included)
        assert self.constraint.start + self.constraint.n_consumed == len(tokens)
        t = time.perf_counter()
        out = self.constraint.forced()[:n_max] if n_max > 0 else []
        return Draft(tokens=out, seconds=time.perf_counter() - t, source=self.source,
                     match_len=len(out))

    def rollback(self, n_keep: int) -> None:
        pass  # the constraint itself is rolled back by the decoder

    def time_step(self) -> float:
        return 0.0

    def reset(self) -> None:
        pass
