"""Which draft sources an engine offers, and one lane's drafters built from them.

Every lane of an engine has the same sources, each with drafters of its own (a lookup
index reads one sequence's tokens); what the lanes share is passed in: the drafting memory
and the draft model's context. A new kind of source is one more drafter module and one
more name here. Forced text (``grammar``) is not among them: the decode loop adds it for
a generation that has a constraint.
"""

from __future__ import annotations

from runtime.context import LlamaContext
from runtime.controller import PRUNED
from runtime.drafters.lookup import LookupDrafter
from runtime.drafters.memory import DraftMemory, MemoryDrafter
from runtime.drafters.pruned import PrunedDrafter
from runtime.drafting import Drafter
from runtime.sampling import Sampler


def source_names(drafter: str, memory: bool, pruned: bool, max_rows: int | None
                 ) -> list[str]:
    """The sources every lane has, in the order the decode loop asks them.

    Args:
        drafter: ``SpeculativeConfig.drafter`` (``auto``, ``lookup``, ``pruned``, ``none``).
        memory: a drafting memory is shared across requests.
        pruned: a draft model is open.
        max_rows: exact mode's widest bitwise-equal batch: 1 leaves no room for a draft.
    """
    if max_rows == 1:
        return []
    names = ["lookup"] if drafter in ("auto", "lookup") else []
    if memory:
        names.append("memory")
    if pruned:
        names.append(PRUNED)
    return names


def make_drafters(names: list[str], memory: DraftMemory | None,
                  draft_ctx: LlamaContext | None, sampler: Sampler) -> list[Drafter]:
    """One lane's drafters for ``names`` (``source_names``): the memory's reads the shared
    ``memory``, the pruned draft's drives ``draft_ctx`` with the lane's ``sampler``."""
    drafters: list[Drafter] = []
    if "lookup" in names:
        drafters.append(LookupDrafter())
    if "memory" in names:
        drafters.append(MemoryDrafter(memory))
    if PRUNED in names:
        drafters.append(PrunedDrafter(draft_ctx, sampler))
    return drafters
