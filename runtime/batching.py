"""Many sequences, one context, one ``llama_decode`` per round: continuous batching.

``SharedContext`` owns the rounds of one multi-sequence ``LlamaContext``. Each sequence is
a *task*: a greenlet (a coroutine with its own stack) that runs the whole single-sequence
loop of ``runtime.speculative`` (draft, verify, commit) with its own sampler, grammar,
drafters and stop strings, through a ``SequenceView`` that offers the single-sequence
methods the loop uses (``eval``, ``eval_argmax``, ``truncate``...). When a task evaluates,
its view hands the rows to the hub and the task pauses there; once every live task has
handed in its rows (or ended), ``round()`` runs one ``llama_decode`` of all of them and
resumes each task with its logits rows. Tasks start (``spawn``) and end between rounds.

Everything runs on one OS thread, the one that calls ``spawn`` and ``round`` (as
llama-server's slots do): no handoff between threads per step. Threads were tried first,
a thread per sequence meeting at a barrier: on a 2-core Xeon (SmolLM2, 2 threads) a step
then took 10.5-11.5 ms against 8.6 ms when one thread did everything, because ggml's CPU
backend keeps OpenMP worker threads per calling thread, spinning after each decode, and
every handoff had to wait for a core.

A round holds at most ``n_batch`` rows: decode steps first, in arrival order, then prompt
chunks, so a long prompt (``prefill_chunk`` rows a round) delays the others' steps by one
chunk's cost, never by the whole prompt. A view used outside a task (one sequence through
``Engine.generate``) runs its round at once, alone.

Cells: by default each sequence has a stream of cells of its own (``n_ctx_seq``), laid out
as a one-sequence cache is, so a row's logits do not depend on the other sequences: on a
2-core Xeon (AVX-512) a sequence's logits in shared rounds were bitwise equal to the same
sequence alone with separate streams, and up to 2.2 apart in one unified cache, where its
cells interleave with the others' and the sums over them group differently. A unified
cache (``unified``, llama-server's ``--kv-unified``) lets any sequence use any cell: a
sequence's cells are its ``n_past`` tokens, idle sequences keep their cache (the prompt
cache of their slot) until a round needs the cells, and then the least recently used go
first (``evicted`` tells their owner). When the live sequences alone need more cells than
there are, a request that does not fit waits for a later round while others run; if no
request of a round fits, the sequence holding the most cells gets ``ContextFullError``
(its answer ends with ``finish_reason: context``), so the rest can go on.

Every round's (rows, seconds) feeds the shared ``CostModel``: the verify curve V(R) the
controllers read is the cost of a whole batch of R rows on this machine, at every width
the load reaches (``runtime.controller``'s batch-aware choice).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from greenlet import greenlet

from runtime.context import ContextFullError, LlamaContext

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    seq: int
    tokens: list[int]
    pos0: int
    all_logits: bool
    prefill: bool  # a prompt chunk (scheduled after the decode steps)
    want_last: bool = True  # the last row's logits (a prompt's inner chunks need none)
    rows: np.ndarray | None = None
    width: int = 0  # rows of the round that took it, every sequence's
    error: BaseException | None = None


@dataclass
class RoundStats:
    """What the rounds did, for ``/metrics`` and the bench (counts only grow)."""

    rounds: int = 0
    rows: int = 0
    evictions: int = 0
    deferred: int = 0  # requests that waited a round for cells or rows
    decode_seconds: float = 0.0  # inside llama_decode (the rest of a round is Python)


class SharedContext:
    """The rounds of one multi-sequence context, on one thread.

    Args:
        ctx: a ``LlamaContext`` made with ``n_seq`` sequences (owned by the caller).
        n_seq: how many sequences (views) share it.
        prefill_chunk: most prompt tokens one sequence evaluates per round.
        on_round: called with (rows, seconds) after every round (the cost model).
        before_decode: called by ``round`` right before its ``llama_decode`` (the server hands
            the tokens of the round before to its event loop there, so that the loop's
            Python runs while ggml computes instead of between decodes, where it would
            hold the GIL the model's thread needs).
    """

    def __init__(self, ctx: LlamaContext, n_seq: int, prefill_chunk: int = 256,
                 on_round=None, before_decode: Callable[[], None] | None = None):
        self.ctx = ctx
        self.n_ctx = ctx.n_ctx_seq  # what one sequence may hold
        self.unified = ctx.n_ctx_seq == ctx.n_ctx and n_seq > 1
        # llama.cpp may have lowered the batch below the configured one (never above n_ctx)
        self.prefill_chunk = max(1, min(prefill_chunk, ctx.n_batch))
        self.on_round = on_round
        self.before_decode = before_decode
        self.stats = RoundStats()
        self._llama = threading.Lock()  # a view used from another thread waits for a round
        self._tasks: dict[greenlet, _Request | None] = {}  # live task -> its submission
        self._last_rows: dict[int, int] = {}  # rows of each sequence's last request
        self.views = [SequenceView(self, s) for s in range(n_seq)]

    # -- tasks ----------------------------------------------------------------------------

    def spawn(self, fn: Callable[[], object]) -> None:
        """Start ``fn`` as a task; it runs now until its first evaluation (or its end).
        ``fn`` must catch its own errors: one that escapes ends ``spawn``/``round``."""
        task = greenlet(fn)
        self._tasks[task] = None
        self._resume(task)

    @property
    def n_tasks(self) -> int:
        return len(self._tasks)

    def run(self, fns: list[Callable[[], object]]) -> None:
        """Run ``fns`` as tasks together, to their ends (a caller's own batch of
        generations: the server's worker spawns and rounds as requests come and go)."""
        for fn in fns:
            self.spawn(fn)
        while self._tasks:
            self.round()

    def close(self) -> None:
        """Forget the tasks (their owner ends them first: ``Worker.close``)."""
        self._tasks.clear()

    def _resume(self, task: greenlet, *value: object) -> None:
        """Switch into ``task`` (with its submission, served; nothing to start it); it
        comes back with its next submission, or ends."""
        try:
            req = task.switch(*value)
        except BaseException:  # the task let an error out: it is over, the caller hears
            self._tasks.pop(task, None)
            raise
        if task.dead:
            del self._tasks[task]
        else:
            assert isinstance(req, _Request)
            self._tasks[task] = req

    def round(self) -> None:
        """One round: decode what the live tasks handed in (within the batch and the
        cells), then resume each task that was served until its next submission."""
        pending = [r for r in self._tasks.values() if r is not None]
        if not pending:
            return
        chosen, failed = self._choose(pending)
        if chosen:
            if self.before_decode is not None:
                self.before_decode()
            self._decode(chosen)
        by_req = {r: t for t, r in self._tasks.items() if r is not None}
        for r in chosen + failed:
            self._last_rows[r.seq] = len(r.tokens)
            task = by_req[r]
            self._tasks[task] = None
            self._resume(task, r)

    # -- what the controllers read --------------------------------------------------------

    def load(self, seq: int) -> tuple[int, float]:
        """(rows, tokens) the other live sequences put in a round: their submission in
        the round being gathered, else their last one. A decode step yields what its
        sequence expects of its drafts (``SequenceView.expected``: E(gamma) at its own
        acceptance; counting it as one token would hide what the others' draft rows earn
        and make one's own drafts look cheaper than they are), a prompt chunk none."""
        rows, tokens = 0, 0.0
        for task, r in self._tasks.items():
            s = r.seq if r is not None else getattr(task, "seq", None)
            if s == seq or s is None:
                continue
            rows += len(r.tokens) if r is not None else self._last_rows.get(s, 1)
            if r is None or not r.prefill:
                tokens += self.views[s].expected()
        return rows, tokens

    # -- rounds ---------------------------------------------------------------------------

    def submit(self, seq: int, tokens: list[int], pos0: int, all_logits: bool,
               prefill: bool, want_last: bool = True) -> tuple[np.ndarray, int]:
        """Evaluate ``tokens`` at positions ``pos0..`` of ``seq`` in the next round that
        takes them. Returns their logits rows (all, or the last only; a read-only view
        valid until the next round) and the round's width."""
        req = _Request(seq, tokens, pos0, all_logits, prefill, want_last)
        current = greenlet.getcurrent()
        if current in self._tasks:
            current.seq = seq  # for load(): whose task this is
            done = current.parent.switch(req)  # the hub resumes us after the round
            assert done is req
        else:  # not a task: a round of its own, now
            chosen, failed = self._choose([req])
            if chosen:
                self._decode(chosen)
        if req.error is not None:
            raise req.error
        return req.rows, req.width

    def _choose(self, pending: list[_Request]) -> tuple[list[_Request], list[_Request]]:
        """(taken, failed): the requests this round takes, decode steps first (arrival
        order), then prompt chunks, within ``n_batch`` rows and the free cells (evicting
        idle caches as needed); when none fits, the one of the sequence holding the most
        cells fails with ``ContextFullError``."""
        order = sorted(pending, key=lambda r: r.prefill)  # stable: arrival order
        rows_left = self.ctx.n_batch
        free = self._free_cells()
        chosen: list[_Request] = []
        for r in order:
            n = len(r.tokens)
            if n > rows_left:
                continue
            if n > free:
                free += self._evict(n - free)
            if n > free:
                continue
            chosen.append(r)
            rows_left -= n
            free -= n
        if not chosen:  # nothing fits: the sequence holding the most cells gives way
            victim = max(order, key=lambda r: self.views[r.seq].n_past)
            victim.error = ContextFullError(
                f"the shared context of {self.n_ctx} tokens is full (sequence {victim.seq} "
                f"holds {self.views[victim.seq].n_past}); raise -c/--ctx or lower --parallel")
            return [], [victim]
        self.stats.deferred += len(order) - len(chosen)
        return chosen, []

    def _free_cells(self) -> int:
        if not self.unified:  # each stream has its own; SequenceView.eval checked them
            return 1 << 30
        return self.n_ctx - sum(v.n_past for v in self.views)

    def _evict(self, need: int) -> int:
        """Drop idle sequences' caches, least recently used first, until ``need`` cells
        are free; returns the cells freed."""
        freed = 0
        idle = sorted((v for v in self.views if not v.busy and v.n_past),
                      key=lambda v: v.last_used)
        for v in idle:
            if freed >= need:
                break
            freed += v.n_past
            v.drop()
            self.stats.evictions += 1
        return freed

    def _decode(self, chosen: list[_Request]) -> None:
        # Rows go in sequence order. With a stream per sequence llama.cpp splits a batch
        # into micro-batches "equally" (llama_batch_allocr::split_equal): one micro-batch
        # takes sequences only while each id is the last one + 1 in batch order, so rows
        # of sequences 3, 2, 1, 0 became four graph computations where 0, 1, 2, 3 is one
        # (SmolLM2, 2-core Xeon: 44.8 against 26.8 ms a round; arrival order after slot
        # choice is any order). In a unified cache the order changes nothing.
        chosen = sorted(chosen, key=lambda r: r.seq)
        tokens: list[int] = []
        pos: list[int] = []
        seq: list[int] = []
        want: list[bool] = []
        for r in chosen:
            n = len(r.tokens)
            tokens.extend(r.tokens)
            pos.extend(range(r.pos0, r.pos0 + n))
            seq.extend([r.seq] * n)
            want.extend([True] * n if r.all_logits else [False] * (n - 1) + [r.want_last])
        start = time.perf_counter()
        try:
            with self._llama:
                out = self.ctx.decode_rows(tokens, pos, seq, want)
        except BaseException as e:
            for r in chosen:
                r.error = e
            return
        seconds = time.perf_counter() - start
        at = 0
        for r in chosen:
            n = len(r.tokens) if r.all_logits else int(r.want_last)
            r.rows, r.width = out[at:at + n], len(tokens)
            at += n
        st = self.stats
        st.rounds += 1
        st.rows += len(tokens)
        st.decode_seconds += seconds
        if self.on_round is not None:
            self.on_round(len(tokens), seconds)

    def remove(self, seq: int, start: int) -> None:
        """Forget positions ``start..`` of ``seq`` in the cache."""
        with self._llama:
            self.ctx.remove_seq(seq, start)

    def save_cells(self, seq: int) -> ctypes.Array:
        """``seq``'s cells, serialized (``LlamaContext.seq_state``)."""
        with self._llama:
            return self.ctx.seq_state(seq)

    def load_cells(self, seq: int, state: ctypes.Array, n_tokens: int) -> None:
        """Make ``seq`` hold ``state`` (``n_tokens`` positions from 0) instead of what it
        held; in a unified cache idle sequences give way for the cells as for a round."""
        view = self.views[seq]
        self.remove(seq, 0)
        view.n_past = 0
        free = self._free_cells()
        if n_tokens > free:
            self._evict(n_tokens - free)
        with self._llama:
            self.ctx.load_seq_state(seq, state)
        view.n_past = n_tokens

    def calibrate(self, widths: tuple[int, ...], repeats: int = 2, context: int = 256
                  ) -> None:
        """Time rounds of each width on a scratch sequence (the last view's, before
        anything is served), so the controllers know V(R) at the widths a full batch
        reaches before the load arrives; each figure is the lower of ``repeats`` runs.
        The rows follow ``context`` tokens, as a conversation's do: attention over an
        empty cache would make every width look cheap."""
        v = self.views[-1]
        assert not v.busy and v.n_past == 0
        n0 = min(context, self.n_ctx // 2, self.ctx.n_batch)
        with self._llama:
            if n0:
                self.ctx.decode_rows([0] * n0, range(n0), [v.seq] * n0, [False] * n0)
            for w in widths:
                if w > self.ctx.n_batch or n0 + w > self.n_ctx:
                    continue
                for _ in range(repeats):
                    start = time.perf_counter()
                    self.ctx.decode_rows([0] * w, range(n0, n0 + w), [v.seq] * w, [True] * w)
                    seconds = time.perf_counter() - start
                    self.ctx.remove_seq(v.seq, n0)
                    if self.on_round is not None:
                        self.on_round(w, seconds)
            self.ctx.remove_seq(v.seq, 0)


class SequenceView:
    """One sequence of a ``SharedContext``, with the single-sequence methods of
    ``LlamaContext`` that ``runtime.speculative`` uses.

    ``busy``: a generation owns it (its cache is not evicted); ``evicted``: its cache was
    dropped while idle (the owner's token list must start over)."""

    def __init__(self, shared: SharedContext, seq: int):
        self.shared = shared
        self.seq = seq
        self.n_past = 0
        self.eval_seconds = 0.0  # time inside rounds (the others' work in them included)
        self.busy = False
        self.evicted = False
        self.last_used = 0.0
        self.rounds = 0       # rounds this sequence took part in
        self.round_rows = 0   # rows of those rounds, every sequence's
        # tokens this sequence's current step should yield (its controller's E(gamma))
        self.expected: Callable[[], float] = lambda: 1.0

    @property
    def n_ctx(self) -> int:
        return self.shared.n_ctx

    def acquire(self) -> bool:
        """Take the sequence for a generation; True when its cache survived since the last
        one (False: it was evicted, and whatever the owner remembers of it is gone)."""
        self.busy = True
        kept, self.evicted = not self.evicted, False
        return kept

    def release(self) -> None:
        self.busy = False
        self.last_used = time.monotonic()

    def drop(self) -> None:
        """Evict (the shared context's call, while the sequence is idle)."""
        self.shared.remove(self.seq, 0)
        self.n_past = 0
        self.evicted = True

    def eval(self, tokens: list[int], all_logits: bool = False) -> np.ndarray:
        if not tokens:
            raise ValueError("eval() needs at least one token")
        if self.n_past + len(tokens) > self.n_ctx:
            raise ContextFullError(f"{self.n_past} + {len(tokens)} tokens exceed the context "
                                   f"of {self.n_ctx}; raise -c/--ctx or shorten the input")
        chunk = len(tokens) if all_logits else self.shared.prefill_chunk
        rows = None
        start = time.perf_counter()
        prefill = not all_logits and len(tokens) > 1  # a prompt: after the others' steps
        for at in range(0, len(tokens), chunk):
            part = tokens[at:at + chunk]
            last = at + chunk >= len(tokens)
            rows, width = self.shared.submit(self.seq, part, self.n_past, all_logits,
                                             prefill, want_last=last)
            self.n_past += len(part)
            self.rounds += 1
            self.round_rows += width
        self.eval_seconds += time.perf_counter() - start
        return rows

    def eval_argmax(self, tokens: list[int], all_rows: bool = False) -> list[int]:
        # a shared round reads logits anyway (llama.cpp's in-graph sampler is per
        # sequence and switching it re-reserves the graph), so numpy takes the argmax
        return np.argmax(self.eval(tokens, all_rows), axis=1).tolist()

    def truncate(self, n_keep: int) -> None:
        if not 0 <= n_keep <= self.n_past:
            raise ValueError(f"truncate({n_keep}) outside 0..{self.n_past}")
        if n_keep < self.n_past:
            self.shared.remove(self.seq, n_keep)
        self.n_past = n_keep

    def reset(self) -> None:
        self.truncate(0)

    def snapshot(self) -> ctypes.Array:
        """This sequence's cells, serialized (a prompt cache in host memory keeps them)."""
        return self.shared.save_cells(self.seq)

    def restore(self, state: ctypes.Array, n_tokens: int) -> None:
        """Hold ``snapshot``'s cells (of this sequence or another) from position 0."""
        self.shared.load_cells(self.seq, state, n_tokens)
