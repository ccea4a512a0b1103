"""Prompt caches kept in host memory, for when there are more conversations than slots.

A slot's KV cache holds its last conversation until the next job on that slot cuts it to
the part the new prompt shares. With more clients than ``--parallel`` slots, or an agent
coming back to a long conversation after others ran, the cut part would have to be
evaluated again. So before a slot's cache is cut, its cells are copied into this cache
(llama.cpp's ``llama_state_seq_get_data``), and a job whose prompt starts with more of a
cached conversation than its slot holds gets those cells put back first
(``llama_state_seq_set_data``) instead of evaluating them. llama-server does the same
(``--cache-ram``, PR #16391); the anchors are its rules: an entry that another one
contains is dropped, an entry put back leaves the cache (its slot holds it now; kept when
the job uses only a part of it), the oldest go first past the byte budget, and an entry
larger than the budget is not kept.

With a cache stream per sequence, cells put back are laid out as the sequence evaluated
them, so the logits that follow are bitwise those of evaluating the prompt (checked by
``tests/test_prompt_cache.py``). Entries belong to a scope (an API key): a scope never
restores another's conversation, so neither ``cache_n`` nor timing tells one client what
another sent.
"""

from __future__ import annotations

import ctypes
import logging
from collections import OrderedDict
from dataclasses import dataclass

from runtime.speculative import common_prefix

log = logging.getLogger(__name__)

# Entries shorter than this many tokens are not worth a copy: a chat template's opening
# is in every slot already.
MIN_TOKENS = 32


@dataclass(eq=False)
class Entry:
    """One conversation's cache: the tokens its cells hold and, for a chat, the text those
    tokens encode and the session's ids (its tokens but a final end-of-turn)."""

    scope: str
    tokens: list[int]
    state: ctypes.Array
    text: str | None = None
    ids: list[int] | None = None

    @property
    def size(self) -> int:
        """Bytes held: llama.cpp's cells and the token lists (8 bytes a Python int
        pointer, the ints themselves shared with the small-int cache or counted once)."""
        return len(self.state) + 8 * (len(self.tokens) + len(self.ids or ()))

    def reuse(self, key: str | list[int]) -> int:
        """How much of a prompt (its chat text, or its token ids) this entry holds."""
        if isinstance(key, str):
            return common_prefix(self.text, key) if self.text is not None else 0
        return common_prefix(self.tokens, key)

    def within(self, key: str | list[int]) -> bool:
        """Whether the prompt ``key`` continues all of this entry."""
        held = self.text if isinstance(key, str) else self.tokens
        return held is not None and self.reuse(key) == len(held)


class PromptCache:
    """Conversations' caches in host memory, least recently stored first out.

    Args:
        budget: most bytes held (``None``: no bound).
    """

    def __init__(self, budget: int | None):
        if budget is not None and budget < 1:
            raise ValueError(f"the prompt cache's budget must be >= 1 byte, got {budget}")
        self.budget = budget
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self.bytes = 0
        self.hits = 0          # entries put back into a slot
        self.tokens_restored = 0

    def __len__(self) -> int:
        return len(self._entries)

    def find(self, scope: str, key: str | list[int] | None) -> tuple[Entry | None, int]:
        """The entry of ``scope`` holding the longest prefix of ``key``, and how long."""
        best, n = None, 0
        if key:
            for e in self._entries.values():
                if e.scope == scope:
                    m = e.reuse(key)
                    if m > n:
                        best, n = e, m
        return best, n

    def use(self, entry: Entry, whole: bool) -> Entry:
        """``entry`` is going back into a slot. ``whole``: the job continues all of it, so
        it leaves the cache (the slot holds it now, and stores it again, longer, when it
        is cut); else the job keeps a part of it, and the cache keeps the whole."""
        if id(entry) in self._entries:
            if whole:
                self._drop(id(entry))
            else:
                self._entries.move_to_end(id(entry))
        self.hits += 1
        self.tokens_restored += len(entry.tokens)
        return entry

    def holds(self, scope: str, tokens: list[int]) -> bool:
        """Whether an entry of ``scope`` already holds ``tokens`` (or more after them)."""
        return any(e.scope == scope and common_prefix(e.tokens, tokens) == len(tokens)
                   for e in self._entries.values())

    def add(self, entry: Entry) -> bool:
        """Keep ``entry``, dropping the entries it contains and then the oldest until it
        fits the budget. Returns False (nothing changes) when it is too short, larger than
        the whole budget, or already held."""
        n = len(entry.tokens)
        if n < MIN_TOKENS or self.holds(entry.scope, entry.tokens):
            return False
        if self.budget is not None and entry.size > self.budget:
            log.info("a cached prompt of %d tokens (%.1f MiB) exceeds --cache-ram; not kept",
                     n, entry.size / 2**20)
            return False
        for key, e in list(self._entries.items()):
            if e.scope == entry.scope and common_prefix(entry.tokens, e.tokens) == len(e.tokens):
                self._drop(key)
        while self.budget is not None and self._entries and \
                self.bytes + entry.size > self.budget:
            self._drop(next(iter(self._entries)))
        self._entries[id(entry)] = entry
        self.bytes += entry.size
        return True

    def _drop(self, key: int) -> None:
        self.bytes -= self._entries.pop(key).size
