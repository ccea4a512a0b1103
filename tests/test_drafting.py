"""runtime.drafters.pruned.PrunedDrafter on a simulated context: catch-up is timed apart from
drafting, and the cache stays a prefix of the real sequence."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.config import SamplingConfig
from runtime.drafters.pruned import PrunedDrafter
from runtime.sampling import Sampler

VOCAB = 16
PER_BATCH, PER_TOKEN = 1.0, 0.01   # simulated seconds: a decode call, and each token in it


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeContext:
    """A llama context whose decode costs PER_BATCH + PER_TOKEN * n on a fake clock and
    always predicts (last token + 1) mod VOCAB."""

    def __init__(self, clock: Clock):
        self.clock, self.n_past, self.calls = clock, 0, []

    def eval(self, tokens, all_logits=False):
        self.clock.now += PER_BATCH + PER_TOKEN * len(tokens)
        self.n_past += len(tokens)
        self.calls.append(len(tokens))
        row = np.full(VOCAB, -10.0)
        row[(tokens[-1] + 1) % VOCAB] = 10.0
        return row[None, :]

    def truncate(self, n):
        self.n_past = n

    def reset(self):
        self.n_past = 0


def test_catchup_is_timed_apart_from_drafting():
    clock = Clock()
    ctx = FakeContext(clock)
    d = PrunedDrafter(ctx, Sampler(SamplingConfig(temp=0)), clock=clock)
    prompt = [i % VOCAB for i in range(2000)]
    draft = d.propose(prompt, 4, 0.0)
    # the 1,999 unseen tokens are one catch-up batch; then 4 one-token draft steps
    assert draft.n_catchup == 1999 and ctx.calls == [1999, 1, 1, 1, 1]
    assert draft.catchup_seconds == pytest.approx(PER_BATCH + PER_TOKEN * 1999)
    assert draft.n_evals == 4 and draft.seconds == pytest.approx(4 * (PER_BATCH + PER_TOKEN))
    assert draft.tokens == [(prompt[-1] + 1 + i) % VOCAB for i in range(4)]
    # the target kept 2 drafts: the next proposal reads only what it had not seen
    seq = prompt + draft.tokens[:2] + [7]
    d.rollback(len(prompt) + 2)
    nxt = d.propose(seq, 2, 0.0)
    assert nxt.n_catchup == 0 and ctx.calls[-2:] == [1, 1]  # [7], then its own draft
    assert ctx.n_past == len(seq) + 1


def test_rollback_keeps_a_prefix():
    clock = Clock()
    ctx = FakeContext(clock)
    d = PrunedDrafter(ctx, Sampler(SamplingConfig(temp=0)), clock=clock)
    d.propose([1, 2, 3], 3, 0.0)
    d.rollback(2)
    assert ctx.n_past == 2
    d.propose([1, 2, 9], 1, 0.0)   # a different token at position 2 is re-read
    assert ctx.calls[-1] == 1 and ctx.n_past == 3
