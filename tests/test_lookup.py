"""LookupDrafter (in-context n-gram drafts) and DraftMemory (drafts across requests), on
hand-made token lists, each checked against a brute-force reference of the same rule."""

from __future__ import annotations

import logging
import random
from collections import Counter

import numpy as np
import pytest

from runtime.drafters import memory as memory_mod
from runtime.drafters.lookup import LookupDrafter
from runtime.drafters.memory import DraftMemory, MemoryDrafter

# ---------------------------------------------------------------- brute-force references

def ref_lookup(tokens: list[int], n_max: int, n_min: int = 1, n_match_max: int = 8,
               extend: bool = True) -> tuple[list[int], int]:
    """Longest suffix (n_min..n_match_max) with an occurrence ending before the last
    token, its most recent occurrence, and what followed it (periodically extended)."""
    last = len(tokens) - 1
    for m in range(min(n_match_max, last), n_min - 1, -1):
        suffix = tokens[last - m + 1:]
        for end in range(last - 1, m - 2, -1):
            if tokens[end - m + 1:end + 1] == suffix:
                seq = list(tokens)
                while extend and len(seq) < end + 1 + n_max:
                    seq.append(seq[len(seq) - (last - end)])
                return seq[end + 1:end + 1 + n_max], m
    return [], 0


def ref_memory(seqs: list[list[int]], context: list[int], n_max: int, n_min: int,
               n_match_max: int, min_share: float) -> tuple[list[int], int]:
    """Longest stored context match, then the frequency walk (ties: smallest token id)."""
    for m in range(min(n_match_max, len(context)), n_min - 1, -1):
        suffix = context[len(context) - m:]
        occ = [(s, j) for s in seqs for j in range(m - 1, len(s))
               if s[j - m + 1:j + 1] == suffix]
        if not occ:
            continue
        out: list[int] = []
        while len(out) < n_max:
            nxt = [s[j + 1] for s, j in occ if j + 1 < len(s)]
            if not nxt:
                break
            counts = Counter(nxt)
            best = max(counts.values())
            tok = min(t for t, c in counts.items() if c == best)
            if best < min_share * len(nxt):
                break
            out.append(tok)
            occ = [(s, j + 1) for s, j in occ if j + 1 < len(s) and s[j + 1] == tok]
        return out, m
    return [], 0


# ---------------------------------------------------------------- LookupDrafter

@pytest.mark.parametrize("tokens, n_max, want, match_len", [
    # the longest suffix wins: [2, 3] matched at 1..2 beats [3] matched later at 5
    ([1, 2, 3, 9, 7, 3, 8, 2, 3], 4, [9, 7, 3, 8], 2),
    # equal lengths: the most recent occurrence wins
    ([5, 1, 5, 2, 5], 3, [2, 5, 2], 1),
    # no earlier occurrence of the last token
    ([1, 2, 3, 4], 4, [], 0),
    # a one-token sequence has nothing earlier
    ([7], 4, [], 0),
    # n_max truncates the continuation
    ([1, 2, 3, 4, 5, 6, 1, 2], 2, [3, 4], 2),
    # a self-overlapping repeat is extended with its own period
    ([4, 4, 4, 4], 5, [4, 4, 4, 4, 4], 3),
    ([1, 2, 1, 2, 1], 5, [2, 1, 2, 1, 2], 3),
    # n_max 0 drafts nothing
    ([1, 2, 1], 0, [], 0),
])
def test_lookup_rule(tokens: list[int], n_max: int, want: list[int], match_len: int) -> None:
    draft = LookupDrafter().propose(tokens, n_max, 0.0)
    assert (draft.tokens, draft.match_len) == (want, match_len)
    assert draft.source == "lookup" and draft.seconds >= 0
    assert (want, match_len) == (ref_lookup(tokens, n_max) if n_max else ([], 0))


def test_lookup_without_repeat_extension_stops_at_the_end() -> None:
    draft = LookupDrafter(extend_repeats=False).propose([4, 4, 4, 4], 5, 0.0)
    assert draft.tokens == [4] and draft.match_len == 3


def test_lookup_n_min_and_constructor_checks() -> None:
    # [3] alone occurred earlier, but n_min=2 asks for two tokens of context
    assert LookupDrafter(n_min=2).propose([3, 1, 2, 3], 4, 0.0).tokens == []
    with pytest.raises(ValueError):
        LookupDrafter(n_min=0)
    with pytest.raises(ValueError):
        LookupDrafter(n_min=5, n_match_max=4)
    assert LookupDrafter().time_step() == 0.0


def test_lookup_rollback_then_another_continuation() -> None:
    d = LookupDrafter()
    seq = [1, 2, 3, 4, 1, 2]
    assert d.propose(seq, 3, 0.0).tokens == [3, 4, 1]
    d.rollback(4)                           # the sequence now diverges after [1, 2, 3, 4]
    seq = [1, 2, 3, 4, 9, 1, 2, 3, 7, 1, 2, 3]
    assert d.propose(seq, 2, 0.0).tokens == [7, 1]   # most recent [1, 2, 3] is at 6..8
    assert d.n_indexed == len(seq)
    d.reset()
    assert d.n_indexed == 0 and d.propose([5, 5], 2, 0.0).tokens == [5, 5]


def test_lookup_shorter_sequence_rolls_back_by_itself() -> None:
    d = LookupDrafter()
    d.propose([1, 2, 3, 1, 2, 3], 2, 0.0)
    assert d.propose([1, 2, 3, 1], 2, 0.0).tokens == [2, 3]
    assert d.n_indexed == 4


def test_lookup_incremental_equals_from_scratch() -> None:
    """Random appends and rollbacks over a small alphabet (so matches are frequent): every
    draft equals the brute-force rule, and the index equals one built from scratch."""
    rng = random.Random(1234)
    for n_min, n_match_max in [(1, 8), (2, 4), (1, 1)]:
        d = LookupDrafter(n_min=n_min, n_match_max=n_match_max)
        seq: list[int] = []
        for _ in range(300):
            if seq and rng.random() < 0.3:
                n_keep = rng.randrange(len(seq) + 1)
                del seq[n_keep:]
                d.rollback(n_keep)
            seq.extend(rng.randrange(3) for _ in range(rng.randint(1, 9)))
            n_max = rng.randint(1, 10)
            draft = d.propose(seq, n_max, 0.5)
            assert (draft.tokens, draft.match_len) == ref_lookup(seq, n_max, n_min, n_match_max)
            fresh = LookupDrafter(n_min=n_min, n_match_max=n_match_max)
            fresh.propose(seq, 1, 0.0)
            assert d._index == fresh._index


# ---------------------------------------------------------------- DraftMemory

def test_memory_frequency_beats_recency() -> None:
    mem = DraftMemory()
    mem.add([10, 1, 2, 3, 4, 5])
    mem.add([11, 1, 2, 3, 4, 5])
    mem.add([12, 1, 2, 3, 9, 9])   # the most recent, but seen once
    assert mem.lookup([7, 1, 2, 3], 8) == ([4, 5], 3)
    # the in-context lookup would take the most recent occurrence instead
    assert LookupDrafter().propose([12, 1, 2, 3, 9, 9, 1, 2, 3], 1, 0.0).tokens == [9]


def test_memory_stops_where_no_continuation_dominates() -> None:
    mem = DraftMemory()
    mem.add([1, 2, 3, 4])
    mem.add([0, 2, 3, 5])
    mem.add([9, 2, 3, 6])          # after [2, 3]: 4, 5 and 6, a third each
    assert mem.lookup([2, 3], 4) == ([], 2)
    mem.add([8, 2, 3, 4, 7])       # 4 now has half the occurrences: enough
    assert mem.lookup([2, 3], 4) == ([4, 7], 2)
    assert mem.lookup([2, 3], 0) == ([], 0)


def test_memory_eviction_keeps_the_bound() -> None:
    mem = DraftMemory(max_tokens=10)
    mem.add([1, 2, 3, 4])
    assert mem.lookup([1, 2], 4)[0] == [3, 4]
    for seq in ([20, 21, 22, 23], [30, 31, 32, 33], [40, 41, 42, 43]):
        mem.add(seq)
        assert mem.n_tokens <= 10
    assert mem.n_tokens == 8
    assert mem.lookup([1, 2], 4) == ([], 0)            # evicted text is never proposed
    assert mem.lookup([40, 41], 4)[0] == [42, 43]
    mem.add(list(range(100, 125)))                      # longer than the bound: its tail
    assert mem.n_tokens == 10 and mem.lookup([115, 116], 2)[0] == [117, 118]


def test_memory_scope_isolation() -> None:
    mem = DraftMemory()
    mem.add([1, 2, 3, 4, 5], scope="b")
    assert MemoryDrafter(mem, "a").propose([1, 2, 3], 4, 0.0).tokens == []
    draft = MemoryDrafter(mem, "b").propose([1, 2, 3], 4, 0.0)
    assert (draft.tokens, draft.source, draft.match_len) == ([4, 5], "memory", 3)


def test_memory_chat_turn_replaces_its_earlier_turn() -> None:
    mem = DraftMemory()
    mem.add([1, 2, 3, 4, 5])
    mem.add([1, 2, 3, 4, 5, 6, 7, 8])   # the same chat, one turn later
    assert mem.n_tokens == 8
    mem.add([1, 2, 3, 9])                # not an extension: stored beside it
    assert mem.n_tokens == 12
    with pytest.raises(ValueError):
        mem.add([-1, 2])


def test_memory_matches_reference_through_rebuilds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random adds (with evictions, replaced turns and index rebuilds forced often) and
    lookups: every draft equals the brute-force reference over the live sequences."""
    monkeypatch.setattr(memory_mod, "_FRESH_MIN", 8)
    rng = random.Random(99)
    for n_min, n_match_max in [(2, 8), (1, 4), (1, 3)]:
        mem = DraftMemory(max_tokens=120, n_match_max=n_match_max, n_min=n_min)
        live: list[list[int]] = []
        for _ in range(150):
            chats = [s for s in live if len(s) < 40]
            if chats and rng.random() < 0.2:   # a later turn of a stored chat
                seq = rng.choice(chats) + [rng.randrange(4) for _ in range(rng.randint(0, 5))]
            else:
                seq = [rng.randrange(4) for _ in range(rng.randint(1, 12))]
            mem.add(seq)
            live = [s for s in live if s != seq[:len(s)]] + [seq]
            while sum(map(len, live)) > 120:
                live.pop(0)
            assert mem.n_tokens == sum(map(len, live))
            context = [rng.randrange(4) for _ in range(rng.randint(1, 10))]
            n_max = rng.randint(1, 8)
            assert mem.lookup(context, n_max) == \
                ref_memory(live, context, n_max, n_min, n_match_max, memory_mod.MIN_SHARE)


def test_memory_large_token_ids_round_trip_the_packed_keys() -> None:
    big = memory_mod.MAX_TOKEN_ID
    mem = DraftMemory()
    mem.add([big, 0, big - 1, 262_143, big])
    assert mem.lookup([big, 0], 3) == ([big - 1, 262_143, big], 2)
    assert mem.lookup([big + 1, big, 0], 3) == ([big - 1, 262_143, big], 2)


# ---------------------------------------------------------------- persistence

def test_memory_save_load_round_trip(tmp_path) -> None:
    mem = DraftMemory()
    mem.add([1, 2, 3, 4, 5], scope="a")
    mem.add([7, 2, 3, 4, 6])
    mem.add([8, 2, 3, 4, 6])
    path = tmp_path / "memory.npz"
    mem.save(path, fingerprint="sha-1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.npz"]  # no temp left
    back = DraftMemory.load(path, fingerprint="sha-1")
    assert back.n_tokens == mem.n_tokens == 15
    for context, scope in [([2, 3], ""), ([2, 3], "a"), ([1], "a"), ([9], "b")]:
        assert back.lookup(context, 4, scope) == mem.lookup(context, 4, scope)
    # a smaller bound keeps the newest sequences
    small = DraftMemory.load(path, fingerprint="sha-1", max_tokens=10)
    assert small.n_tokens == 10 and small.lookup([1, 2], 4, "a") == ([], 0)
    mem.save(path, fingerprint="sha-1")   # overwriting works the same way
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.npz"]


@pytest.mark.parametrize("case", ["missing", "corrupt", "foreign", "pickle"])
def test_memory_bad_file_gives_empty_memory_and_one_warning(tmp_path, caplog, case) -> None:
    path = tmp_path / "memory.npz"
    if case == "corrupt":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    elif case == "foreign":
        mem = DraftMemory()
        mem.add([1, 2, 3])
        mem.save(path, fingerprint="other-model")
    elif case == "pickle":   # an object array must not be unpickled
        np.savez(path, header=np.array([{"a": 1}], dtype=object))
    with caplog.at_level(logging.WARNING, logger="runtime.drafters.memory"):
        mem = DraftMemory.load(path, fingerprint="this-model", max_tokens=50)
    assert mem.n_tokens == 0 and mem.max_tokens == 50
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    said = warnings[0].getMessage() if len(warnings) == 1 else warnings
    assert "starts with an empty memory" in said
    # a file that is not ours is called that, not "pickled data" or an unsafe load
    assert ("is not a bridge drafting-memory file" in said) == (case in ("corrupt", "pickle"))
    assert "allow_pickle" not in said and "unsafe" not in said


def test_memory_failed_save_leaves_no_temp_file(tmp_path, monkeypatch) -> None:
    mem = DraftMemory()
    mem.add([1, 2, 3])
    path = tmp_path / "memory.npz"
    mem.save(path, fingerprint="x")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(memory_mod.os, "replace", boom)
    mem.add([4, 5, 6])
    with pytest.raises(OSError):
        mem.save(path, fingerprint="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.npz"]
    assert DraftMemory.load(path, fingerprint="x").n_tokens == 3   # the old file is whole
