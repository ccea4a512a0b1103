"""Drafts looked up in the context itself (prompt lookup, n-gram self-speculation).

Chat answers often repeat what the prompt or an earlier turn said: code being edited, names,
quoted text, lists. ``LookupDrafter`` finds the most recent earlier place where the
sequence's last m tokens occurred and proposes what followed there. It runs no model, so a
draft costs microseconds and q is one-hot: verification accepts a drafted token exactly when
the target would have chosen it (greedy) or sampled it, so output is unchanged.

The rule, which ``tests/test_lookup.py`` checks against a brute-force reference:

* m runs from ``n_match_max`` down to ``n_min``; the longest m with an earlier occurrence
  wins, and among occurrences of that m-gram the most recent one.
* "earlier" means the occurrence ends strictly before the last token, so a match is never
  the suffix itself; its continuation may run into the suffix (repeats such as "a a a").
* when the continuation reaches the end of the sequence before ``n_max`` tokens, it goes on
  with the draft's own tokens: the match says the text repeats with period
  ``len(tokens) - 1 - end``, so a loop the model is stuck in is drafted in full.
"""

from __future__ import annotations

import time

from runtime.drafting import Draft, DraftCost

N_MIN = 1          # shortest context match that drafts
N_MATCH_MAX = 8    # longest context compared; longer matches rarely change the answer


class LookupDrafter:
    """Drafter protocol over an incremental n-gram index of the sequence itself.

    The index maps every n-gram (n in ``n_min..n_match_max``) of the tokens seen so far to
    the positions where it ends, in increasing order. ``propose`` indexes only the tokens
    added since the last call, and ``rollback`` pops the removed tokens' positions from the
    tails of those lists, so both cost O(changed tokens x n-gram sizes), never O(sequence).

    Args:
        n_min: shortest suffix match that yields a draft (>= 1).
        n_match_max: longest suffix compared (>= n_min).
        extend_repeats: continue a continuation that reaches the end of the sequence with
            its own tokens (periodic repeat); False stops it at the end of the sequence.
    """

    source = "lookup"
    cost = DraftCost.FREE

    def __init__(self, n_min: int = N_MIN, n_match_max: int = N_MATCH_MAX,
                 extend_repeats: bool = True):
        if not 1 <= n_min <= n_match_max:
            raise ValueError(f"need 1 <= n_min <= n_match_max, got n_min={n_min}, "
                             f"n_match_max={n_match_max}")
        self.n_min = n_min
        self.n_match_max = n_match_max
        self.extend_repeats = extend_repeats
        self._seen: list[int] = []  # the indexed tokens, a prefix of the real sequence
        # n-gram -> end positions, ascending; a tuple key per n, so sizes never collide
        self._index: dict[tuple[int, ...], list[int]] = {}

    @property
    def n_indexed(self) -> int:
        """How many tokens of the sequence the index covers."""
        return len(self._seen)

    def propose(self, tokens: list[int], n_max: int, p_min: float) -> Draft:
        """Up to ``n_max`` tokens that followed the best earlier match of the suffix.

        Args:
            tokens: the whole sequence so far; the last element is the newest token.
            n_max: most tokens to draft.
            p_min: ignored; a lookup has no confidence to cut on.

        Returns:
            ``Draft(source="lookup", match_len=m)``; empty with ``match_len=0`` when no
            suffix of length >= ``n_min`` occurred earlier (or ``n_max <= 0``).
        """
        start = time.perf_counter()
        draft = Draft(source=self.source)
        self._sync(tokens)
        if n_max > 0:
            end, m = self._find(tokens)
            if m:
                draft.tokens = self._continuation(tokens, end, n_max)
                draft.match_len = m
        draft.seconds = time.perf_counter() - start
        return draft

    def time_step(self) -> float:
        """A lookup costs nothing measurable against a model step."""
        return 0.0

    def rollback(self, n_keep: int) -> None:
        """Forget every position >= ``n_keep``: O(removed tokens x n-gram sizes)."""
        seen, index = self._seen, self._index
        lo = max(n_keep, 0)
        for i in range(len(seen) - 1, lo - 1, -1):
            for key in self._keys(seen, i):
                ends = index[key]
                assert ends[-1] == i, "lookup index out of order"
                ends.pop()
                if not ends:
                    del index[key]
        del seen[lo:]

    def reset(self) -> None:
        self._seen.clear()
        self._index.clear()

    def _sync(self, tokens: list[int]) -> None:
        """Index what ``tokens`` adds to the indexed prefix.

        The decode loop calls ``rollback`` whenever the tail of the sequence changes, so
        ``tokens`` extends what was indexed; only the last indexed token is checked rather
        than an O(n) prefix scan per step.
        """
        if len(tokens) < len(self._seen):
            self.rollback(len(tokens))
        seen, index = self._seen, self._index
        n = len(seen)
        assert n == 0 or seen[n - 1] == tokens[n - 1], "lookup index diverged"
        get, keys = index.get, self._keys
        for i in range(n, len(tokens)):
            seen.append(tokens[i])
            for key in keys(seen, i):
                ends = get(key)
                if ends is None:
                    index[key] = [i]
                else:
                    ends.append(i)

    def _keys(self, seen: list[int], i: int) -> list[tuple[int, ...]]:
        """The n-grams ending at position ``i``, longest first: one list slice and
        cheap tuple slices, since this runs n_match_max times per new token."""
        window = tuple(seen[max(0, i - self.n_match_max + 1):i + 1])
        return [window[j:] for j in range(len(window) - self.n_min + 1)]

    def _find(self, tokens: list[int]) -> tuple[int, int]:
        """(end position, m) of the best earlier match of the suffix; (0, 0) if none."""
        last = len(tokens) - 1
        index = self._index
        # an earlier occurrence ends at <= last - 1, so it holds at most `last` tokens
        for m in range(min(self.n_match_max, last), self.n_min - 1, -1):
            ends = index.get(tuple(tokens[last - m + 1:]))
            if not ends:
                continue
            # the list always ends with `last` itself (the suffix); skip it
            if ends[-1] == last:
                if len(ends) < 2:
                    continue
                return ends[-2], m
            return ends[-1], m
        return 0, 0

    def _continuation(self, tokens: list[int], end: int, n_max: int) -> list[int]:
        out = tokens[end + 1:end + 1 + n_max]
        if self.extend_repeats:
            period = len(tokens) - 1 - end  # == len(tokens[end + 1:]) >= 1
            while len(out) < n_max:
                out.append(out[len(out) - period])
        return out
