"""runtime.batching's rounds on a stand-in context: who shares a round, in which order,
how prompts are chunked, and what happens when cells run out. No model is loaded: the
stand-in's "logits" row for a token is one-hot at token + 1, so each row says which
token it was evaluated for."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from runtime.batching import SharedContext
from runtime.config import RuntimeConfig
from runtime.context import ContextFullError

V = 64  # the stand-in vocabulary


class FakeContext:
    """Records every decode_rows call; cells per sequence as llama.cpp would hold them."""

    def __init__(self, n_ctx: int = 256, n_batch: int = 32, seconds: float = 0.0):
        self.n_ctx, self.n_batch, self.seconds = n_ctx, n_batch, seconds
        self.n_ctx_seq = n_ctx  # one unified cache: any sequence may use every cell
        self.calls: list[list[tuple[int, int, int, bool]]] = []  # (seq, pos, token, want)
        self.cells: dict[int, set[int]] = {}

    def decode_rows(self, tokens, pos, seq, want):
        rows = list(zip(seq, pos, tokens, want, strict=True))
        self.calls.append(rows)
        time.sleep(self.seconds)  # a decode takes time: the others' threads catch up
        for s, p, _, _ in rows:
            self.cells.setdefault(s, set()).add(p)
        out = np.zeros((sum(map(bool, want)), V), dtype=np.float32)
        for i, t in enumerate(t for t, w in zip(tokens, want, strict=True) if w):
            out[i, (t + 1) % V] = 1.0
        return out

    def remove_seq(self, seq: int, start: int) -> None:
        self.cells[seq] = {p for p in self.cells.get(seq, set()) if p < start}


def _run(fns):
    """Run each callable on its own thread; re-raise the first error."""
    errors: list[BaseException] = []

    def wrap(f):
        def go():
            try:
                f()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
        return go

    threads = [threading.Thread(target=wrap(f)) for f in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive(), "a sequence is stuck waiting for a round"
    if errors:
        raise errors[0]


def test_active_sequences_share_each_round():
    ctx = FakeContext()
    shared = SharedContext(ctx, 3, prefill_chunk=8)
    barrier = threading.Barrier(3)

    def seq(i: int):
        v = shared.views[i]
        v.acquire()
        barrier.wait()
        for step in range(5):
            row = v.eval([10 * i + step], all_logits=True)
            assert int(np.argmax(row[0])) == 10 * i + step + 1  # its own row back
        v.idle()
        v.release()

    _run([lambda i=i: seq(i) for i in range(3)])
    # after the first round (the threads may arrive one by one), all three share rounds
    widths = [len(c) for c in ctx.calls]
    assert sum(widths) == 15
    assert widths.count(3) >= 3
    for c in ctx.calls:
        assert len({s for s, *_ in c}) == len(c)  # one row per sequence per step
    assert [v.n_past for v in shared.views] == [5, 5, 5]


def test_a_long_prompt_joins_rounds_a_chunk_at_a_time():
    ctx = FakeContext(seconds=0.01)
    shared = SharedContext(ctx, 2, prefill_chunk=4)
    started = threading.Event()

    def decoder():
        v = shared.views[0]
        v.eval([1])
        started.set()
        for t in range(8):
            v.eval([t], all_logits=True)
        v.idle()

    def prompt():
        started.wait()
        v = shared.views[1]
        rows = v.eval(list(range(20)))  # 5 chunks of 4
        assert rows.shape == (1, V) and int(np.argmax(rows[0])) == 20  # the last row only
        v.idle()

    _run([decoder, prompt])
    chunks = [[r for r in c if r[0] == 1] for c in ctx.calls]
    assert max(len(c) for c in chunks) == 4  # never more than a chunk a round
    assert sum(len(c) for c in chunks) == 20
    # the decoding sequence kept stepping while the prompt was read
    shared_rounds = [c for c in ctx.calls if {r[0] for r in c} == {0, 1}]
    assert len(shared_rounds) >= 3
    # only the prompt's last row asked for logits
    wanted = [(p, w) for c in ctx.calls for s, p, _, w in c if s == 1 and w]
    assert wanted == [(19, True)]


def test_idle_caches_are_evicted_least_recently_used_first():
    ctx = FakeContext(n_ctx=40)
    shared = SharedContext(ctx, 3, prefill_chunk=32)
    for i in (0, 1):  # two finished conversations stay cached
        v = shared.views[i]
        v.acquire()
        v.eval(list(range(15)))
        v.idle()
        v.release()
    v2 = shared.views[2]
    v2.acquire()
    v2.eval(list(range(20)))  # needs 20 cells, 10 are free: the older cache goes
    assert shared.views[0].n_past == 0 and shared.views[0].evicted
    assert shared.views[1].n_past == 15
    assert ctx.cells[0] == set()
    assert shared.views[0].acquire() is False  # its owner learns the cache is gone
    assert shared.views[1].acquire() is True


def test_when_nothing_fits_the_largest_sequence_gives_way():
    ctx = FakeContext(n_ctx=24)
    shared = SharedContext(ctx, 2, prefill_chunk=16)
    a, b = shared.views
    a.acquire(), b.acquire()  # both busy: neither cache may be evicted
    a.eval(list(range(12)))
    a.idle()
    b.eval(list(range(10)))
    b.idle()
    # 2 cells left; a (12 cells) asks for 4 rows: nothing fits, so a gets the error
    with pytest.raises(ContextFullError, match="full"):
        a.eval([1, 2, 3, 4], all_logits=True)
    assert a.n_past == 12  # nothing was evaluated for it
    assert b.eval([5], all_logits=True).shape == (1, V)  # the other goes on


def test_a_leaving_sequence_releases_the_round():
    ctx = FakeContext()
    shared = SharedContext(ctx, 2)
    a, b = shared.views
    b.eval([1], all_logits=True)  # b is active now: rounds wait for it
    done = threading.Event()

    def waiter():
        a.eval([2], all_logits=True)  # waits for b's submission or departure
        done.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert not done.wait(0.3)
    b.idle()
    assert done.wait(5)
    t.join()


@pytest.mark.parametrize("kw, match", [
    ({"prefill_chunk": 1024, "n_batch": 512}, "--prefill-chunk"),
    ({"prefill_chunk": 0}, "--prefill-chunk"),
    ({"parallel": 0}, "--parallel"),
    ({"parallel": 64, "n_ctx": 2048, "kv_unified": True}, "per sequence"),  # 32 tokens each
])
def test_settings_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        RuntimeConfig(**kw)


def test_prefill_chunk_follows_the_batch_llama_cpp_allows():
    assert SharedContext(FakeContext(n_batch=32), 2, prefill_chunk=256).prefill_chunk == 32
