"""Many sequences, one KV cache, one ``llama_decode`` per round: continuous batching.

``SharedContext`` owns the rounds of one multi-sequence ``LlamaContext`` (its cache of
``n_ctx`` cells is unified: any sequence may use any cell). Each sequence is driven by its
own thread through a ``SequenceView``, which offers the single-sequence methods the decode
loop uses (``eval``, ``eval_argmax``, ``truncate``...), so every sequence keeps the whole
draft -> verify -> commit loop of ``runtime.speculative`` with its own sampler, grammar,
drafters and stop strings.

A round: every *active* sequence (one that has evaluated in its current generation and
has not gone idle) submits its rows and waits; the thread whose submission completes the
set runs one ``llama_decode`` of all of them and hands each its logits rows. Sequences join
(their first submission) and leave (``idle()``, at the end of a generation) between
rounds. A round holds at most ``n_batch`` rows: decode steps first, oldest sequence first,
then prompt chunks, so a long prompt (``prefill_chunk`` rows a round) delays the others'
steps by one chunk's cost, never by the whole prompt. Every llama.cpp call on the context
holds one lock: llama.cpp contexts are not thread-safe.

Cells: by default each sequence has a stream of cells of its own (``n_ctx_seq``), laid out
as a one-sequence cache is, so a row's logits do not depend on the other sequences: on a
2-core Xeon (AVX-512) a sequence's logits in shared rounds were bitwise equal to the same
sequence alone with separate streams, and up to 2.2 apart in one unified cache, where its
cells interleave with the others' and the sums over them group differently. A unified
cache (``unified``, llama-server's ``--kv-unified``) lets any sequence use any cell: a
sequence's cells are its ``n_past`` tokens, idle sequences keep their cache (the prompt
cache of their slot) until a round needs the cells, and then the least recently used go
first (``evicted`` tells their owner). When the active sequences alone need more cells
than there are, a request that does not fit waits for a later round while others run; if
no request of a round fits, the sequence holding the most cells gets ``ContextFullError``
(its answer ends with ``finish_reason: context``), so the rest can go on.

Every round's (rows, seconds) feeds the shared ``CostModel``: the verify curve V(R) the
controllers read is the cost of a whole batch of R rows on this machine, at every width
the load reaches (``runtime.controller``'s batch-aware choice).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

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
    done: bool = False


@dataclass
class RoundStats:
    """What the rounds did, for ``/metrics`` and the bench (counts only grow)."""

    rounds: int = 0
    rows: int = 0
    seconds: float = 0.0
    evictions: int = 0
    deferred: int = 0  # requests that waited a round for cells or rows
    by_width: dict[int, int] = field(default_factory=dict)  # rows per round -> rounds


class SharedContext:
    """The rounds of one multi-sequence context.

    Args:
        ctx: a ``LlamaContext`` made with ``n_seq`` sequences (owned by the caller).
        n_seq: how many sequences (views) share it.
        prefill_chunk: most prompt tokens one sequence evaluates per round.
        on_round: called with (rows, seconds) after every round (the cost model).
    """

    def __init__(self, ctx: LlamaContext, n_seq: int, prefill_chunk: int = 256,
                 on_round=None):
        self.ctx = ctx
        self.n_ctx = ctx.n_ctx_seq  # what one sequence may hold
        self.unified = ctx.n_ctx_seq == ctx.n_ctx and n_seq > 1
        # llama.cpp may have lowered the batch below the configured one (never above n_ctx)
        self.prefill_chunk = max(1, min(prefill_chunk, ctx.n_batch))
        self.on_round = on_round
        self.stats = RoundStats()
        self._cv = threading.Condition()
        self._llama = threading.Lock()  # every llama.cpp call on ctx
        self._running = False           # a round is decoding (outside _cv)
        self._pending: list[_Request] = []
        self._active: set[int] = set()
        self._last_rows: dict[int, int] = {}  # rows of each active sequence's last request
        self.views = [SequenceView(self, s) for s in range(n_seq)]

    # -- what the controllers read --------------------------------------------------------

    def load(self, seq: int) -> tuple[int, float]:
        """(rows, tokens) the other active sequences put in a round: their submission in
        the round being gathered, else their last one. A decode step is counted as one
        token (its drafts' expected yield is theirs to weigh), a prompt chunk as none."""
        rows, tokens = 0, 0.0
        with self._cv:
            pending = {r.seq: r for r in self._pending}
            active = list(self._active)
        for s in active:
            if s == seq:
                continue
            r = pending.get(s)
            n = len(r.tokens) if r is not None else self._last_rows.get(s, 1)
            rows += n
            tokens += 0.0 if (r is not None and r.prefill) else 1.0
        return rows, tokens

    # -- rounds ---------------------------------------------------------------------------

    def submit(self, seq: int, tokens: list[int], pos0: int, all_logits: bool,
               prefill: bool, want_last: bool = True) -> tuple[np.ndarray, int]:
        """Evaluate ``tokens`` at positions ``pos0..`` of ``seq`` in the next round that
        takes them. Returns their logits rows (all, or the last only; a read-only view
        valid until this sequence submits again or goes idle) and the round's width."""
        req = _Request(seq, tokens, pos0, all_logits, prefill, want_last)
        with self._cv:
            self._active.add(seq)
            self._pending.append(req)
            while not req.done:
                if not self._running and self._ready():
                    self._run_round()
                else:
                    self._cv.wait()
        if req.error is not None:
            raise req.error
        return req.rows, req.width

    def leave(self, seq: int) -> None:
        """``seq`` will not submit again in this generation: rounds stop waiting for it."""
        with self._cv:
            self._active.discard(seq)
            self._last_rows.pop(seq, None)
            if not self._running and self._pending and self._ready():
                self._run_round()
            self._cv.notify_all()  # a waiter may now complete the set

    def _ready(self) -> bool:
        return bool(self._pending) and {r.seq for r in self._pending} >= self._active

    def _run_round(self) -> None:
        """Pick the round's requests, decode them outside the condition, deliver. Called
        with ``_cv`` held; returns with it held."""
        chosen = self._choose()
        self._running = True
        self._cv.release()
        try:
            if chosen:
                self._decode(chosen)
        finally:
            self._cv.acquire()
            self._running = False
            for r in chosen:
                r.done = True
                self._last_rows[r.seq] = len(r.tokens)
            self._cv.notify_all()

    def _choose(self) -> list[_Request]:
        """The requests this round takes: decode steps (oldest first), then prompt chunks,
        within ``n_batch`` rows and the free cells (evicting idle caches as needed)."""
        order = sorted(self._pending, key=lambda r: r.prefill)  # stable: arrival order
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
            victim.done = True
            self._pending.remove(victim)
            self._active.discard(victim.seq)
            self._cv.notify_all()
            return []
        self.stats.deferred += len(order) - len(chosen)
        for r in chosen:
            self._pending.remove(r)
        return chosen

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
        st.seconds += seconds
        st.by_width[len(tokens)] = st.by_width.get(len(tokens), 0) + 1
        if self.on_round is not None:
            self.on_round(len(tokens), seconds)

    def remove(self, seq: int, start: int) -> None:
        """Forget positions ``start..`` of ``seq`` in the cache."""
        with self._llama:
            self.ctx.remove_seq(seq, start)

    def calibrate(self, widths: tuple[int, ...], repeats: int = 2) -> None:
        """Time rounds of each width on an empty scratch sequence (the last view's, before
        anything is served), so the controllers know V(R) at the widths a full batch
        reaches before the load arrives; each figure is the lower of ``repeats`` runs."""
        v = self.views[-1]
        assert not v.busy and v.n_past == 0
        for w in widths:
            if w > self.ctx.n_batch or w > self.n_ctx:
                continue
            for _ in range(repeats):
                start = time.perf_counter()
                with self._llama:
                    self.ctx.decode_rows([0] * w, range(w), [v.seq] * w, [True] * w)
                seconds = time.perf_counter() - start
                self.remove(v.seq, 0)
                if self.on_round is not None:
                    self.on_round(w, seconds)


class SequenceView:
    """One sequence of a ``SharedContext``, with the single-sequence methods of
    ``LlamaContext`` that ``runtime.speculative`` uses.

    ``busy``: a generation owns it (its cache is not evicted); ``evicted``: its cache was
    dropped while idle (the owner's token list must start over)."""

    def __init__(self, shared: SharedContext, seq: int):
        self.shared = shared
        self.seq = seq
        self.n_past = 0
        self.eval_seconds = 0.0  # time inside rounds (waiting for the others included)
        self.busy_since: float | None = None
        self.busy = False
        self.evicted = False
        self.last_used = 0.0
        self.rounds = 0       # rounds this sequence took part in
        self.round_rows = 0   # rows of those rounds, every sequence's

    @property
    def n_ctx(self) -> int:
        return self.shared.n_ctx

    def acquire(self) -> bool:
        """Take the sequence for a generation; True when its cache survived since the last
        one (False: it was evicted, and whatever the owner remembers of it is gone)."""
        with self.shared._cv:
            self.busy = True
            kept = not self.evicted
            self.evicted = False
            return kept

    def release(self) -> None:
        with self.shared._cv:
            self.busy = False
            self.last_used = time.monotonic()

    def drop(self) -> None:
        """Evict: called by the shared context, with its condition held, while idle."""
        self.shared.remove(self.seq, 0)
        self.n_past = 0
        self.evicted = True

    def idle(self) -> None:
        """The generation ended: rounds stop waiting for this sequence."""
        self.shared.leave(self.seq)

    def eval(self, tokens: list[int], all_logits: bool = False) -> np.ndarray:
        if not tokens:
            raise ValueError("eval() needs at least one token")
        if self.n_past + len(tokens) > self.n_ctx:
            raise ContextFullError(f"{self.n_past} + {len(tokens)} tokens exceed the context "
                                   f"of {self.n_ctx}; raise -c/--ctx or shorten the input")
        chunk = len(tokens) if all_logits else self.shared.prefill_chunk
        rows = None
        start = time.perf_counter()
        for at in range(0, len(tokens), chunk):
            part = tokens[at:at + chunk]
            prefill = not all_logits and len(tokens) > 1
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
