"""The draft interface: one method, so the verify loop never knows where drafts come from.

The sources themselves live in ``runtime.drafters`` (lookup, memory, pruned, grammar).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol


class DraftCost(Enum):
    """What a drafted token costs, which decides how the decode loop asks a source.

    ``FREE``: microseconds (a lookup, forced text). The source is asked before the choice,
    and its offer (how many tokens, how long a context match) informs the choice.
    ``MODEL_STEP``: one decode of a draft model each (the pruned draft). The source is
    offered to the controller unasked and drafts only once chosen; its step's cost is what
    the controller learns from ``Draft.seconds / Draft.n_evals``, and it times a step
    (``Drafter.time_step``) when the controller's plan asks for one.
    """

    FREE = "free"
    MODEL_STEP = "model step"


@dataclass
class Draft:
    """Tokens proposed for the positions after the sequence, by ``source`` (empty for a
    plain step's empty draft, which no source made).

    No draft carries its probabilities: verification compares tokens with the target's
    own coupled choices (``runtime.sampling``), which is exact whatever q was.
    ``seconds`` is the time spent drafting proper and ``catchup_seconds`` / ``n_catchup``
    the time and tokens spent first reading what the drafter had not seen, kept apart so
    catch-up never poses as draft cost. ``match_len`` is the length of the context match
    a lookup drafter found (acceptance grows with it).
    """

    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0
    n_evals: int = 0
    catchup_seconds: float = 0.0
    n_catchup: int = 0
    source: str = ""
    match_len: int = 0


class Drafter(Protocol):
    source: str  # "pruned", "lookup", "memory": the name stats and the controller use
    cost: DraftCost  # how the loop asks for a draft, and whether it times a step

    def propose(self, tokens: list[int], n_max: int, p_min: float) -> Draft:
        """Up to ``n_max`` tokens to follow ``tokens`` (the whole sequence so far)."""
        ...

    def rollback(self, n_keep: int) -> None:
        """The real sequence agrees with what this drafter saw only up to ``n_keep``."""
        ...

    def time_step(self) -> float:
        """Seconds for one draft step, without changing what the drafter has seen."""
        ...

    def reset(self) -> None: ...
