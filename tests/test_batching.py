"""runtime.batching's rounds on a stand-in context: who shares a round, in which order,
how prompts are chunked, and what happens when cells run out. No model is loaded: the
stand-in's "logits" row for a token is one-hot at token + 1, so each row says which
token it was evaluated for."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.batching import SharedContext
from runtime.config import RuntimeConfig
from runtime.context import ContextFullError

V = 64  # the stand-in vocabulary


class FakeContext:
    """Records every decode_rows call; cells per sequence as llama.cpp would hold them."""

    def __init__(self, n_ctx: int = 256, n_batch: int = 32):
        self.n_ctx, self.n_batch = n_ctx, n_batch
        self.n_ctx_seq = n_ctx  # one unified cache: any sequence may use every cell
        self.calls: list[list[tuple[int, int, int, bool]]] = []  # (seq, pos, token, want)
        self.cells: dict[int, set[int]] = {}

    def decode_rows(self, tokens, pos, seq, want):
        rows = list(zip(seq, pos, tokens, want, strict=True))
        self.calls.append(rows)
        for s, p, _, _ in rows:
            self.cells.setdefault(s, set()).add(p)
        out = np.zeros((sum(map(bool, want)), V), dtype=np.float32)
        for i, t in enumerate(t for t, w in zip(tokens, want, strict=True) if w):
            out[i, (t + 1) % V] = 1.0
        return out

    def remove_seq(self, seq: int, start: int) -> None:
        self.cells[seq] = {p for p in self.cells.get(seq, set()) if p < start}


def test_live_tasks_share_each_round():
    ctx = FakeContext()
    shared = SharedContext(ctx, 3, prefill_chunk=8)

    def seq(i: int):
        v = shared.views[i]
        for step in range(5):
            row = v.eval([10 * i + step], all_logits=True)
            assert int(np.argmax(row[0])) == 10 * i + step + 1  # its own row back

    shared.run([lambda i=i: seq(i) for i in range(3)])
    assert [len(c) for c in ctx.calls] == [3] * 5  # every round holds all three
    for c in ctx.calls:
        assert sorted(s for s, *_ in c) == [0, 1, 2]
    assert [v.n_past for v in shared.views] == [5, 5, 5]


def test_tasks_join_and_leave_between_rounds():
    ctx = FakeContext()
    shared = SharedContext(ctx, 2)
    a, b = shared.views

    def long():
        for t in range(6):
            a.eval([t], all_logits=True)

    def short():
        for t in range(2):
            b.eval([t], all_logits=True)

    shared.spawn(long)
    shared.round()  # a alone
    shared.spawn(short)
    shared.run([])  # to the end
    seqs = [sorted(s for s, *_ in c) for c in ctx.calls]
    assert seqs == [[0], [0, 1], [0, 1], [0], [0], [0]]


def test_a_long_prompt_joins_rounds_a_chunk_at_a_time():
    ctx = FakeContext()
    shared = SharedContext(ctx, 2, prefill_chunk=4)

    def decoder():
        v = shared.views[0]
        for t in range(8):
            v.eval([t], all_logits=True)

    def prompt():
        rows = shared.views[1].eval(list(range(20)))  # 5 chunks of 4
        assert rows.shape == (1, V) and int(np.argmax(rows[0])) == 20  # the last row only

    shared.run([decoder, prompt])
    chunks = [[r for r in c if r[0] == 1] for c in ctx.calls]
    assert max(len(c) for c in chunks) == 4  # never more than a chunk a round
    assert sum(len(c) for c in chunks) == 20
    # the decoding sequence stepped in every round while the prompt was read
    assert all({r[0] for r in c} == {0, 1} for c in ctx.calls[:5])
    # the decode step comes first in each round, and only the prompt's last row has logits
    assert all(c[0][0] == 0 for c in ctx.calls)
    wanted = [p for c in ctx.calls for s, p, _, w in c if s == 1 and w]
    assert wanted == [19]


def test_a_round_holds_at_most_the_batch():
    ctx = FakeContext(n_batch=8)
    shared = SharedContext(ctx, 3, prefill_chunk=8)
    shared.run([lambda i=i: shared.views[i].eval(list(range(6))) for i in range(3)])
    assert [len(c) for c in ctx.calls] == [6, 6, 6]  # 12 rows would not fit: one a round
    assert shared.stats.deferred == 3  # two waited, then one


def test_idle_caches_are_evicted_least_recently_used_first():
    ctx = FakeContext(n_ctx=40)
    shared = SharedContext(ctx, 3, prefill_chunk=32)
    for i in (0, 1):  # two finished conversations stay cached
        v = shared.views[i]
        v.acquire()
        v.eval(list(range(15)))
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
    b.eval(list(range(10)))
    # 2 cells left; a (12 cells) asks for 4 rows: nothing fits, so a gets the error
    with pytest.raises(ContextFullError, match="full"):
        a.eval([1, 2, 3, 4], all_logits=True)
    assert a.n_past == 12  # nothing was evaluated for it
    assert b.eval([5], all_logits=True).shape == (1, V)  # the other goes on


def test_the_load_a_sequence_sees_is_the_others_rows():
    shared = SharedContext(FakeContext(), 3)
    seen = []

    def seq(i: int, width: int):
        v = shared.views[i]
        for _ in range(3):
            seen.append((i, shared.load(i)))
            v.eval([1] * width, all_logits=True)

    shared.run([lambda: seq(0, 1), lambda: seq(1, 3), lambda: seq(2, 1)])
    # in the last round, sequence 0 decided while 1 and 2 had their rows from before
    assert seen[-3] == (0, (4, 2.0))
    assert seen[-1] == (2, (4, 2.0))  # 1 row of sequence 0 + 3 of sequence 1


@pytest.mark.parametrize("kw, match", [
    ({"prefill_chunk": 1024, "n_batch": 512}, "--prefill-chunk"),
    ({"prefill_chunk": 0}, "--prefill-chunk"),
    ({"parallel": 0}, "--parallel"),
    ({"parallel": 64, "n_ctx": 2048, "kv_unified": True}, "per sequence"),  # 32 tokens each
    ({"kv_unified": True}, "--kv-unified"),  # one sequence: nothing to share
])
def test_settings_are_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        RuntimeConfig(**kw)


def test_prefill_chunk_follows_the_batch_llama_cpp_allows():
    assert SharedContext(FakeContext(n_batch=32), 2, prefill_chunk=256).prefill_chunk == 32


def test_before_decode_runs_once_before_each_rounds_decode():
    """The server hands the last round's tokens to its event loop there (the worker's
    Outbox): once per round, before that round's llama_decode, never after it."""
    ctx = FakeContext()
    seen: list[int] = []  # decodes done when before_decode was called
    shared = SharedContext(ctx, 2, before_decode=lambda: seen.append(len(ctx.calls)))

    def seq(i: int):
        for step in range(3):
            shared.views[i].eval([i + step], all_logits=True)

    shared.run([lambda i=i: seq(i) for i in range(2)])
    assert seen == list(range(len(ctx.calls)))  # one call per round, each before its decode
    assert shared.stats.decode_seconds > 0


def test_a_rounds_rows_go_in_sequence_order():
    """llama.cpp's split of a batch over per-sequence streams takes ascending sequence
    ids into one micro-batch, so a round in arrival order could cost several graph
    computations: rows are laid out by sequence, whatever order the tasks joined in."""
    ctx = FakeContext()
    shared = SharedContext(ctx, 4)

    def seq(i: int):
        for step in range(3):
            shared.views[i].eval([i + step, i + step + 1], all_logits=True)

    for i in (3, 1, 0, 2):  # joined out of order
        shared.spawn(lambda i=i: seq(i))
    shared.run([])
    assert len(ctx.calls) == 3
    for call in ctx.calls:
        order = [s for s, *_ in call]
        assert order == sorted(order) and set(order) == {0, 1, 2, 3}
        for s in range(4):  # a sequence's rows stay together, in position order
            pos = [p for q, p, *_ in call if q == s]
            assert pos == sorted(pos) and len(pos) == 2
