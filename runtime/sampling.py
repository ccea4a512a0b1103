"""Turning logits into tokens, and the lossless accept/reject rule for drafted tokens.

Both models' logits go through the same filters (``SamplingConfig``), giving the target
distribution p and the draft distribution q. Speculative rejection sampling (Leviathan et
al. 2023, Chen et al. 2023) then emits tokens distributed exactly as p:

    accept drafted x with probability min(1, p(x) / q(x));
    on rejection, draw from norm(max(0, p - q)), and stop.

Greedy decoding is the temp -> 0 limit: accept while x == argmax p, then emit argmax p.
Everything is vectorized over the vocabulary; nothing loops over it in Python.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runtime.config import SamplingConfig


class Sampler:
    """Applies one ``SamplingConfig`` to logit rows and draws from the result.

    Args:
        cfg: the sampling settings.
        rng: the random source (seeded from ``cfg.seed`` when omitted), shared by the draft
            and the verifier so a fixed seed reproduces a whole generation.
    """

    def __init__(self, cfg: SamplingConfig, rng: np.random.Generator | None = None):
        self.cfg = cfg
        self.rng = rng or np.random.default_rng(cfg.seed)

    @property
    def history_window(self) -> int:
        """How many recent tokens the filters look at (only the repeat penalty does), so
        callers pass that tail rather than copy the whole sequence every step."""
        return self.cfg.repeat_last_n if self.cfg.repeat_penalty != 1.0 else 0

    def penalized(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """A float64 copy of one logits row with the repeat penalty applied (llama.cpp's
        rule: divide positive logits by the penalty, multiply negative ones)."""
        row = logits.astype(np.float64)
        pen, n = self.cfg.repeat_penalty, self.cfg.repeat_last_n
        if pen != 1.0 and n > 0 and len(history):
            seen = np.unique(np.asarray(history[-n:], dtype=np.int64))
            vals = row[seen]
            row[seen] = np.where(vals > 0, vals / pen, vals * pen)
        return row

    def argmax(self, logits: np.ndarray, history: Sequence[int]) -> int:
        if self.cfg.repeat_penalty == 1.0:
            return int(np.argmax(logits))
        return int(np.argmax(self.penalized(logits, history)))

    def probs(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """The dense distribution [n_vocab] after penalty, top-k, top-p, min-p and temperature."""
        row = self.penalized(logits, history)
        cfg = self.cfg
        if 0 < cfg.top_k < row.size:
            kth = np.partition(row, -cfg.top_k)[-cfg.top_k]
            row[row < kth] = -np.inf
        cand = np.flatnonzero(np.isfinite(row))
        if cfg.top_p < 1.0 or cfg.min_p > 0.0:
            # top-p and min-p judge the untempered softmax, as llama.cpp does
            z = row[cand] - row[cand].max()
            p = np.exp(z)
            p /= p.sum()
            keep = np.ones(cand.size, dtype=bool)
            if cfg.top_p < 1.0:
                order = np.argsort(-p, kind="stable")
                cum = np.cumsum(p[order])
                # smallest prefix whose mass reaches top_p (always at least one token)
                n_keep = int(np.searchsorted(cum, cfg.top_p) + 1)
                keep[order[n_keep:]] = False
            if cfg.min_p > 0.0:
                keep &= p >= cfg.min_p * p.max()
            row[cand[~keep]] = -np.inf
            cand = cand[keep]
        temp = cfg.temp if cfg.temp > 0 else 1.0
        out = np.zeros(row.size, dtype=np.float64)
        z = (row[cand] - row[cand].max()) / temp
        e = np.exp(z)
        out[cand] = e / e.sum()
        return out

    def draw(self, p: np.ndarray) -> int:
        """One token from the dense distribution ``p`` (inverse-CDF, one uniform)."""
        cum = np.cumsum(p)
        return int(min(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"),
                       p.size - 1))


def top1_prob(logits: np.ndarray) -> float:
    """Softmax probability of the top token: 1 / sum(exp(l - max))."""
    row = logits.astype(np.float64)
    return float(1.0 / np.exp(row - row.max()).sum())


def verify_greedy(sampler: Sampler, target_rows: np.ndarray, drafts: Sequence[int],
                  history: list[int]) -> tuple[int, int]:
    """Greedy verification.

    Args:
        target_rows: [len(drafts) + 1, n_vocab]; row i is the target's prediction for the
            token after history + drafts[:i].
        drafts: the drafted tokens.
        history: tokens emitted so far (for the repeat penalty).

    Returns:
        (number of drafts accepted, the target's own next token after them).
    """
    if sampler.cfg.repeat_penalty == 1.0:
        # one vectorized argmax over every row
        best = np.argmax(target_rows, axis=1)
        n_acc = 0
        while n_acc < len(drafts) and best[n_acc] == drafts[n_acc]:
            n_acc += 1
        return n_acc, int(best[n_acc])
    n_acc = 0
    while True:
        tok = sampler.argmax(target_rows[n_acc], history + list(drafts[:n_acc]))
        if n_acc == len(drafts) or tok != drafts[n_acc]:
            return n_acc, tok
        n_acc += 1


def verify_stochastic(sampler: Sampler, target_rows: np.ndarray, drafts: Sequence[int],
                      draft_probs: Sequence[np.ndarray], history: list[int]) -> tuple[int, int]:
    """Speculative rejection sampling; lossless with respect to the target distribution.

    Args:
        target_rows: [len(drafts) + 1, n_vocab] target logits (see ``verify_greedy``).
        drafts: tokens the draft sampled, drafts[i] ~ draft_probs[i].
        draft_probs: q_i, the draft's processed distributions.
        history: tokens emitted so far.

    Returns:
        (number of drafts accepted, the next token: a resample on rejection, else a draw
        from the target's distribution after the last draft).
    """
    for i, (x, q) in enumerate(zip(drafts, draft_probs, strict=True)):
        p = sampler.probs(target_rows[i], history + list(drafts[:i]))
        # accept with probability min(1, p(x)/q(x)); q(x) > 0 because x was drawn from q
        if sampler.rng.random() * q[x] < p[x]:
            continue
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        # total == 0 only if p == q, where rejection has probability 0; guard float noise
        return i, sampler.draw(residual if total > 0 else p)
    n = len(drafts)
    p = sampler.probs(target_rows[n], history + list(drafts))
    return n, sampler.draw(p)
