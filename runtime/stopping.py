"""Where an answer ends besides its end-of-generation token and its length: stop strings
(``split_stop``) and stop rules (``StopRule``), which ``runtime.lane`` applies as the
decode loop's steps turn into text.

Both end the generation the same way: the lane closes the decode loop's generator and
keeps the tokens up to the end (``SpeculativeDecoder.keep``), so the KV cache, the
drafters and the grammar state hold exactly the tokens the caller was given.

A stop rule is per generation and stateful (a fresh one per request, passed down with
it); it reads the answer's text as it is verified, never drafts, so a drafted answer and
a plain one, streamed or not, end at the same place. ``runtime.tool_reading``'s
``RepeatedCallStop`` is one: an answer of tool calls ends when a call would repeat one
it already made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a stop rule says after reading more of the answer. Offsets count characters
    of the answer's text.

    Args:
        hold: text from this offset on may still be taken back: it is not shown, nor are
            the tokens that reach into it (None: show everything).
        end: the answer ends here: it keeps its tokens up to the first token boundary at
            or after this offset, so a token that straddles ``end`` is kept whole and the
            text before ``end`` is never cut (None: go on). A rule holds back what it
            may end before, so ``end`` is never before text it let be shown.
    """

    hold: int | None = None
    end: int | None = None


GO_ON = Verdict()


class StopRule(Protocol):
    """A per-generation rule that may end the answer where no stop string can say."""

    def feed(self, text: str, tokens: Sequence[int]) -> Verdict:
        """Read the answer's next ``text``, decoded from ``tokens`` (control tokens have
        no text); return what to hold back and whether the answer ends."""
        ...

    def finish(self) -> Verdict:
        """The answer ended by itself (its end-of-generation token, a complete grammar,
        ``max_tokens``): whether it still ends earlier than its text does."""
        ...


def split_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str, int | None]:
    """(text safe to emit, text to hold back, where a stop string starts in ``text`` or
    None). On a stop, the text to emit is everything before it."""
    if not stops:
        return text, "", None
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
    if cut >= 0:
        return text[:cut], "", cut
    # hold back the longest tail that is a prefix of some stop string
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return text[: len(text) - hold], text[len(text) - hold:], None
