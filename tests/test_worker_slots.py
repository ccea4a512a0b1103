"""Which free slot a queued job runs on (``runtime.serve.worker.pick_slot``), on
stand-in slots: no model is loaded."""

from __future__ import annotations

from types import SimpleNamespace

from runtime.serve.worker import REUSE_SLACK, Job, Slot, pick_slot


class FakeSlot(Slot):
    """A slot whose cache holds ``held`` for ``scope``; its sequence is ``seq``."""

    def __init__(self, seq: int, held: str = "", scope: str = "", last_used: float = 0.0):
        self.lane = SimpleNamespace(target=SimpleNamespace(seq=seq), tokens=[])
        self.session = SimpleNamespace(cached_text=held)
        self.scope, self.last_used = scope, last_used


def job(key: str, scope: str = "") -> Job:
    return Job(start=None, loop=None, scope=scope, key=key)


TEMPLATE = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"


def test_the_longest_cached_prefix_wins():
    slots = [FakeSlot(0, TEMPLATE + "a" * 10), FakeSlot(1, TEMPLATE + "q" * 200),
             FakeSlot(2), FakeSlot(3)]
    free = slots[:]
    for streams in (True, False):
        assert pick_slot(free, slots, job(TEMPLATE + "q" * 300), streams) is slots[1]


def test_with_streams_a_near_tie_keeps_the_running_ids_consecutive():
    """0 and 1 run: of free 2 and 3, the job takes 2 though 3 is older and holds a few
    characters more of its prompt (within REUSE_SLACK)."""
    slots = [FakeSlot(0), FakeSlot(1), FakeSlot(2, TEMPLATE, last_used=5.0),
             FakeSlot(3, TEMPLATE + "Expl", last_used=1.0)]
    free = slots[2:]
    j = job(TEMPLATE + "Explain the tides.")
    assert pick_slot(free, slots, j, streams=True) is slots[2]
    # one cache stream: ids do not matter, the longer prefix and then the older slot win
    assert pick_slot(free, slots, j, streams=False) is slots[3]


def test_a_gap_is_filled_first():
    slots = [FakeSlot(i, last_used=float(10 - i)) for i in range(4)]
    free = [slots[1], slots[3]]  # 0 and 2 run
    assert pick_slot(free, slots, job("hello"), streams=True) is slots[1]


def test_a_long_prefix_outweighs_a_gap():
    slots = [FakeSlot(0), FakeSlot(1), FakeSlot(2), FakeSlot(3, "x" * (REUSE_SLACK + 40))]
    free = slots[1:]  # 0 runs
    assert pick_slot(free, slots, job("x" * 500), streams=True) is slots[3]


def test_another_scopes_cache_is_taken_last():
    slots = [FakeSlot(0), FakeSlot(1, scope="other"), FakeSlot(2)]
    free = [slots[1], slots[2]]  # 0 runs: 1 would keep the ids consecutive
    assert pick_slot(free, slots, job("hello"), streams=True) is slots[2]
    free = [slots[1]]  # the only free slot, though another scope's
    assert pick_slot(free, slots, job("hello"), streams=True) is slots[1]


def test_nothing_running_the_least_recently_used_of_a_tie():
    slots = [FakeSlot(i, last_used=t) for i, t in enumerate((3.0, 1.0, 2.0, 4.0))]
    assert pick_slot(slots[:], slots, job("hello"), streams=True) is slots[1]
