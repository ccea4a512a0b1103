"""runtime.sampling on hand-made distributions: filters, and losslessness of verification."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.config import SamplingConfig
from runtime.sampling import Sampler, top1_prob, verify_greedy, verify_stochastic

PLAIN = SamplingConfig(temp=1.0, top_k=0, top_p=1.0, min_p=0.0)


class GridRng:
    """Feeds a scripted sequence of uniforms, so probabilities can be integrated exactly."""

    def __init__(self, values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def _grid(n):
    return (np.arange(n) + 0.5) / n  # midpoints of n equal cells of [0, 1)


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


class RecordingSampler(Sampler):
    """Records the distribution each draw would sample from, instead of sampling."""

    def draw(self, p):
        self.drawn_from = p / p.sum()
        return -1


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_rejection_sampling_is_exactly_lossless(seed):
    """P(first emitted token = y) = sum_x q(x) [a(x) 1{x=y} + (1 - a(x)) r(y)] must equal
    p(y). The real code runs for every drafted x over a grid of uniforms u (so a(x) is
    integrated to 1/n), and r is the distribution it would resample from."""
    gen = np.random.default_rng(seed)
    vocab, n = 7, 4000
    p_logits, q_logits = gen.normal(size=vocab) * 2, gen.normal(size=vocab) * 2
    p, q = _softmax(p_logits), _softmax(q_logits)
    rows = np.stack([p_logits, gen.normal(size=vocab)])  # row 1: after an accepted draft
    out = np.zeros(vocab)
    for x in range(vocab):
        for u in _grid(n):
            s = RecordingSampler(PLAIN, rng=GridRng([u]))
            n_acc, _ = verify_stochastic(s, rows, [x], [q], [])
            if n_acc == 1:
                out[x] += q[x] / n
            else:
                out += q[x] / n * s.drawn_from
    np.testing.assert_allclose(out, p, atol=1e-3)


def test_all_accepted_draws_bonus_from_target():
    p_logits = np.log(np.array([0.1, 0.2, 0.7]))
    rows = np.stack([np.log([0.0001, 0.9998, 0.0001]), p_logits])
    q = np.array([0.0, 1.0, 0.0])
    counts = np.zeros(3)
    for u2 in _grid(1000):
        s = Sampler(PLAIN, rng=GridRng([0.5, u2]))
        n_acc, nxt = verify_stochastic(s, rows, [1], [q], [])
        assert n_acc == 1
        counts[nxt] += 1
    np.testing.assert_allclose(counts / 1000, [0.1, 0.2, 0.7], atol=2e-3)


def test_greedy_verification_cases():
    s = Sampler(SamplingConfig(temp=0))
    rows = np.eye(5)[[2, 3, 4, 1]] * 10  # target says 2, 3, 4, then 1
    # table of cases: (drafts, expected accepted, expected next token)
    cases = [
        ([2, 3, 4], 3, 1),   # all accepted: bonus token from the last row
        ([2, 3, 0], 2, 4),   # rejection at the third draft: target's token replaces it
        ([0, 3, 4], 0, 2),   # first draft wrong: plain step's result
        ([], 0, 2),          # nothing drafted: a plain step
    ]
    for drafts, n_acc, nxt in cases:
        assert verify_greedy(s, rows[: len(drafts) + 1], drafts, []) == (n_acc, nxt)


def test_greedy_with_repeat_penalty_uses_draft_history():
    s = Sampler(SamplingConfig(temp=0, repeat_penalty=2.0))
    row = np.array([3.0, 2.0, 0.5])
    rows = np.stack([row, row])
    # token 0 is drafted first; with the penalty it loses to token 1 at the next position
    assert verify_greedy(s, rows, [0], []) == (1, 1)


def test_filters_match_llama_cpp_order():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    probs = Sampler(SamplingConfig(temp=1.0, top_k=3, top_p=1.0, min_p=0.0)).probs(logits, [])
    np.testing.assert_allclose(probs, [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0])
    # top-p keeps the smallest prefix reaching 0.7: {0.5, 0.2}
    probs = Sampler(SamplingConfig(temp=1.0, top_k=0, top_p=0.7, min_p=0.0)).probs(logits, [])
    np.testing.assert_allclose(probs, [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])
    # min-p 0.3 keeps tokens with p >= 0.15
    probs = Sampler(SamplingConfig(temp=1.0, top_k=0, top_p=1.0, min_p=0.3)).probs(logits, [])
    np.testing.assert_allclose(probs, np.array([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    # temperature sharpens the kept candidates
    hot = Sampler(SamplingConfig(temp=0.5, top_k=0, top_p=1.0, min_p=0.0)).probs(logits, [])
    np.testing.assert_allclose(hot, _softmax(logits / 0.5))


def test_top1_prob_and_draw():
    assert top1_prob(np.log(np.array([0.25, 0.75]))) == pytest.approx(0.75)
    s = Sampler(PLAIN, rng=GridRng([0.0, 0.2499, 0.2501, 0.9999]))
    p = np.array([0.25, 0.0, 0.75])
    assert [s.draw(p) for _ in range(4)] == [0, 0, 2, 2]  # never a zero-probability token


@pytest.mark.parametrize("bad", [
    dict(temp=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1.0), dict(top_k=-1),
    dict(repeat_penalty=0), dict(seed=-3),
])
def test_invalid_sampling_values_are_refused(bad):
    with pytest.raises(ValueError, match="must be"):
        SamplingConfig(**bad)
