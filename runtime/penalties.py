"""Loop-breaking penalties on a logits row, in llama.cpp's order and with its semantics:
the repeat, frequency and presence penalties (llama.cpp's ``penalties`` sampler), then DRY
("don't repeat yourself", its ``dry`` sampler).

Both are functions of the tokens so far and nothing else, so a row is penalized from the
history that ends right before the token it predicts. Verifying drafts calls them with
``history + drafts[:i]`` for row i, exactly the history plain decoding would have had
there: the emitted tokens are the same as without drafts (``runtime.sampling.verify``).
Nothing here keeps state between rows.

Penalties, over the last ``repeat_last_n`` tokens (prompt included, as llama-server
counts them), for a token seen c > 0 times:

    z <- z / repeat_penalty  if z > 0  else  z * repeat_penalty
    z <- z - c * frequency_penalty - presence_penalty

DRY, over the last ``dry_penalty_last_n`` tokens h[0..n-1]: for each earlier position j,
L_j is the length of the longest common suffix of h[..j] and h (the whole window),
capped at ``rep_limit``, the number of tokens after the most recent sequence breaker.
The token h[j+1] would extend that repeat, so each such token t gets

    L(t) = max over j with h[j+1] = t of L_j,
    z_t <- z_t - dry_multiplier * dry_base ^ (L(t) - dry_allowed_length)  if L(t) >= allowed

(the exponent clamped where the power would overflow a float). Tokens that are a
sequence breaker on their own are never penalized.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from runtime.config import SamplingConfig

# llama.cpp: log(FLT_MAX), the largest exponent base^e may reach before it overflows
_FLOAT_MAX_LOG = 88.7228391
# llama.cpp clamps each breaker's text and its tail of tokens to these lengths
MAX_BREAKER_CHARS = 40
_MAX_TAIL = 20


@dataclass(frozen=True)
class Breakers:
    """DRY's sequence breakers as tokens (llama.cpp's ``get_overlapping_token_sequences``).

    A breaker string is found in the tokens either whole inside one token (``single``: the
    token alone restarts the count and is never penalized), or as a token whose text ends
    with the breaker's first characters followed by the tokens of the rest (``tails``).
    """

    is_head: np.ndarray  # bool [n_vocab]: the token begins some breaker
    single: np.ndarray   # bool [n_vocab]: the token contains a whole breaker
    tails: dict[int, tuple[tuple[int, ...], ...]]  # head -> its non-empty tails

    @classmethod
    def build(cls, pieces: Sequence[bytes], tokenize: Callable[[bytes], list[int]],
              breakers: Sequence[str]) -> Breakers:
        """``pieces[t]`` is token t's text (special tokens rendered), ``tokenize`` turns
        bytes into tokens without special parsing."""
        n = len(pieces)
        single = np.zeros(n, dtype=bool)
        tails: dict[int, set[tuple[int, ...]]] = {}
        for text in breakers:
            s = text.encode("utf-8")[:MAX_BREAKER_CHARS]
            first = s[:1]
            for tok, word in enumerate(pieces):
                if first not in word:
                    continue
                if s in word:
                    single[tok] = True
                    continue
                # every place where the word's end overlaps the breaker's beginning
                pos = word.find(first)
                while pos >= 0:
                    overlap = word[pos:]
                    if s.startswith(overlap):
                        rest = tuple(tokenize(s[len(overlap):])[:_MAX_TAIL])
                        tails.setdefault(tok, set()).add(rest)
                    pos = word.find(first, pos + 1)
        is_head = single.copy()
        for tok in tails:
            is_head[tok] = True
        return cls(is_head, single, {t: tuple(sorted(v)) for t, v in tails.items()})

    def rep_limit(self, h: np.ndarray) -> int:
        """How many tokens follow the most recent complete breaker in ``h`` (its length
        when there is none): no repeat is counted across a breaker."""
        n = len(h)
        heads = np.flatnonzero(self.is_head[h])
        for p in heads[::-1].tolist():
            i = n - 1 - p  # tokens after the head
            if self.single[h[p]]:
                return i
            longest = -1
            for tail in self.tails.get(int(h[p]), ()):
                k = len(tail)
                if longest < k <= i and tuple(h[p + 1:p + 1 + k].tolist()) == tail:
                    longest = k
            if longest >= 0:
                return i - longest
        return n


def _window(n: int) -> int:
    """A setting's window in tokens: -1 is the whole context (here: all the history)."""
    return 1 << 30 if n < 0 else n


class Penalties:
    """The penalties a ``SamplingConfig`` asks for; ``None`` from ``of`` when it asks none.

    Args:
        cfg: the settings.
        breakers: DRY's breaker table for ``cfg.dry_sequence_breakers`` (needed only when
            DRY is on).
    """

    def __init__(self, cfg: SamplingConfig, breakers: Breakers | None):
        self.cfg = cfg
        self.repeat_n = _window(cfg.repeat_last_n) if cfg.repeat_on else 0
        self.dry_n = _window(cfg.dry_penalty_last_n) if cfg.dry_on else 0
        self.breakers = breakers
        base = cfg.dry_base
        # llama.cpp: the exponent is clamped only for bases that can overflow
        self.max_exp = int(_FLOAT_MAX_LOG / math.log(base)) if base > 1.000001 else 0

    @classmethod
    def of(cls, cfg: SamplingConfig, breakers: Callable[[tuple[str, ...]], Breakers] | None
           ) -> Penalties | None:
        """The penalties of ``cfg``, or None when it asks for none; ``breakers`` makes
        DRY's table for a tuple of breaker strings."""
        if not cfg.penalized:
            return None
        if cfg.dry_on and breakers is None:
            raise ValueError("DRY needs the model's vocabulary for its sequence breakers")
        return cls(cfg, breakers(cfg.dry_sequence_breakers) if cfg.dry_on else None)

    @property
    def window(self) -> int:
        """How many recent tokens the penalties read."""
        return max(self.repeat_n, self.dry_n)

    def apply(self, row: np.ndarray, history: Sequence[int]) -> None:
        """Penalize ``row`` (float64, in place) for the token after ``history``."""
        if not len(history):
            return
        h = np.asarray(history[-self.window:], dtype=np.int64)
        if self.repeat_n:
            self._repeat(row, h[-self.repeat_n:])
        if self.dry_n:
            self._dry(row, h[-self.dry_n:])

    def _repeat(self, row: np.ndarray, h: np.ndarray) -> None:
        cfg = self.cfg
        seen, counts = np.unique(h, return_counts=True)
        vals = row[seen]
        if cfg.repeat_penalty != 1.0:
            vals = np.where(vals <= 0, vals * cfg.repeat_penalty, vals / cfg.repeat_penalty)
        row[seen] = vals - counts * cfg.frequency_penalty - cfg.presence_penalty

    def _dry(self, row: np.ndarray, h: np.ndarray) -> None:
        cfg = self.cfg
        allowed = cfg.dry_allowed_length
        n = len(h)
        if n <= allowed:
            return
        limit = self.breakers.rep_limit(h)
        if limit < allowed:
            return
        # lengths past allowed + max_exp all give the same (clamped) penalty
        cap = min(limit, allowed + self.max_exp) if self.max_exp else limit
        last = n - 1
        ends: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        if allowed == 0:  # even a repeat of length 0 counts: every token seen follows one
            ends.append(np.arange(last))
            lengths.append(np.zeros(last, dtype=np.int64))
        # positions j < last whose suffix matches the window's suffix: grown one token
        # at a time, each round keeping the j whose match goes on (vectorized)
        alive = np.flatnonzero(h[:last] == h[last]) if cap >= 1 else np.empty(0, np.int64)
        length = 1
        while alive.size and length < cap:
            ok = alive[alive >= length]
            ok = ok[h[ok - length] == h[last - length]]
            if ok.size < alive.size and length >= allowed:
                stopped = np.setdiff1d(alive, ok, assume_unique=True)
                ends.append(stopped)
                lengths.append(np.full(stopped.size, length))
            alive = ok
            length += 1
        if alive.size and length >= allowed:
            ends.append(alive)
            lengths.append(np.full(alive.size, length))
        if not ends:
            return
        nxt = h[np.concatenate(ends) + 1]
        lens = np.concatenate(lengths)
        toks, inv = np.unique(nxt, return_inverse=True)
        best = np.zeros(toks.size, dtype=np.int64)
        np.maximum.at(best, inv, lens)
        keep = ~self.breakers.single[toks]
        toks, best = toks[keep], best[keep]
        exp = best - allowed
        if self.max_exp:
            exp = np.minimum(exp, self.max_exp)
        row[toks] -= cfg.dry_multiplier * np.power(cfg.dry_base, exp.astype(np.float64))
