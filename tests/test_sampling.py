"""runtime.sampling on hand-made distributions: filters, coupled draws, and verification."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.config import SamplingConfig
from runtime.sampling import Sampler, gumbel_noise, top1_prob, top_k_ids, verify

PLAIN = SamplingConfig(temp=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _draws(sampler: Sampler, row: np.ndarray, positions) -> np.ndarray:
    return np.array([sampler.choose(row, [], t) for t in positions])


@pytest.mark.parametrize("cfg", [
    PLAIN,
    SamplingConfig(temp=0.7, top_k=4, top_p=1.0, min_p=0.0, seed=3),
    SamplingConfig(temp=1.3, top_k=0, top_p=0.9, min_p=0.05, seed=11),
])
def test_coupled_draws_follow_the_filtered_distribution(cfg):
    """Gumbel-max over the hashed noise is an exact draw from p: over 40,000 positions the
    frequencies match p within sampling noise (chi-square, 99.9% level), for each set of
    filters."""
    gen = np.random.default_rng(0)
    row = gen.normal(size=9) * 1.5
    s = Sampler(cfg)
    p = s.probs(row, [])
    n = 40_000
    counts = np.bincount(_draws(s, row, range(n)), minlength=row.size)
    assert np.all(counts[p == 0] == 0)                      # never a filtered-out token
    keep = p > 0
    chi2 = float((((counts[keep] - n * p[keep]) ** 2) / (n * p[keep])).sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 4.0 * np.sqrt(2 * dof) + 10, (chi2, dof)


def test_noise_is_a_function_of_seed_position_and_token():
    toks = np.array([5, 17, 3])
    a = gumbel_noise(1, 42, toks)
    np.testing.assert_array_equal(a, gumbel_noise(1, 42, toks))
    np.testing.assert_array_equal(a[[2, 0]], gumbel_noise(1, 42, np.array([3, 5])))
    assert not np.array_equal(a, gumbel_noise(2, 42, toks))     # another seed
    assert not np.array_equal(a, gumbel_noise(1, 43, toks))     # another position


def test_verification_keeps_exactly_the_targets_own_draws():
    """A drafted token is kept iff it equals the target's coupled draw at its position, and
    the token after the kept prefix is the target's own draw: for any drafts, the emitted
    tokens are what plain sampling would emit at those positions."""
    gen = np.random.default_rng(1)
    s = Sampler(PLAIN)
    rows = gen.normal(size=(5, 12)) * 2
    own = [s.choose(rows[i], [], 100 + i) for i in range(5)]
    for drafts in ([], own[:4], [own[0], own[1], (own[2] + 1) % 12, own[3]],
                   [(own[0] + 1) % 12]):
        n_acc, nxt = verify(s, rows[: len(drafts) + 1], drafts, [], 100)
        assert drafts[:n_acc] == own[:n_acc] and nxt == own[n_acc]
        assert n_acc == len(drafts) or drafts[n_acc] != own[n_acc]


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
        assert verify(s, rows[: len(drafts) + 1], drafts, [], 0) == (n_acc, nxt)


def test_greedy_with_repeat_penalty_uses_draft_history():
    s = Sampler(SamplingConfig(temp=0, repeat_penalty=2.0))
    row = np.array([3.0, 2.0, 0.5])
    rows = np.stack([row, row])
    # token 0 is drafted first; with the penalty it loses to token 1 at the next position
    assert verify(s, rows, [0], [], 0) == (1, 1)


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


def test_top1_prob():
    assert top1_prob(np.log(np.array([0.25, 0.75]))) == pytest.approx(0.75)


@pytest.mark.parametrize("bad", [
    dict(temp=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1.0), dict(top_k=-1),
    dict(repeat_penalty=0), dict(seed=-3),
])
def test_invalid_sampling_values_are_refused(bad):
    with pytest.raises(ValueError, match="must be"):
        SamplingConfig(**bad)


@pytest.mark.parametrize("scale", [0.01, 1.0, 3.0, 30.0, 1e5])
@pytest.mark.parametrize("k", [1, 40, 999])
def test_top_k_ids_is_the_k_largest(scale, k):
    """The windowed top-k gives exactly the k largest, however spread the logits are:
    flat rows, peaked ones, -inf entries and spreads beyond its widest window."""
    rng = np.random.default_rng(k)
    row = (rng.standard_normal(5000) * scale).astype(np.float32)
    row[rng.choice(5000, 50, replace=False)] = -np.inf
    row[7] = row.max() + 50 * scale  # one far-ahead favourite, as real logits often have
    got = top_k_ids(row, k)
    assert len(got) == k == len(set(got.tolist()))
    assert row[got].min() >= np.sort(row)[-k]
    assert np.array_equal(top_k_ids(row, 0), np.arange(5000))
    assert np.array_equal(top_k_ids(row, 5000), np.arange(5000))
