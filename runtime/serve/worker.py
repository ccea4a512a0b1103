"""The worker of ``bridge serve``: one thread runs every llama.cpp call, jobs in arrival
order, up to ``--parallel`` of them at once.

The engine has one ``Lane`` per sequence of its KV cache (``--parallel``); each is a
``Slot`` here. A job waits in one FIFO queue until a slot is free, then runs on the free
slot whose cache holds the longest prefix of its prompt within the same scope (llama-server's
slot similarity; a slot of another scope is emptied first, so neither ``cache_n`` nor speed
tells one key's client what another sent). Running jobs are tasks of
``runtime.batching.SharedContext`` on the worker's one thread: one ``llama_decode`` a round
advances every running sequence, and jobs start and end between rounds. With one sequence
a job simply runs to its end. ``--max-queue`` bounds the queue: past it a request gets 503
with ``Retry-After``.

The async handlers wait on a job's queue of items (``Chunk``s, then ``DONE`` or an error).
A job whose client went away is cancelled: its thread closes the generator within a step
(its ``finally`` keeps every cache consistent) and empties the slot's cache, so nothing of
a cancelled sequence stays in the KV cache. The drafting memory is saved between jobs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from fastapi import Request

from runtime.chat import ChatSession, ChatTemplateError
from runtime.context import ContextFullError
from runtime.engine import Chunk, Engine, Lane
from runtime.serve.openai_api import APIError
from runtime.serve.prompt_cache import MIN_TOKENS, Entry, PromptCache
from runtime.speculative import Stats, common_prefix

log = logging.getLogger(__name__)

DONE = object()


class Slot:
    """One sequence of the engine and the conversation its cache holds."""

    def __init__(self, engine: Engine, lane: Lane):
        self.lane = lane
        self.scope = ""       # whose prompt the cache holds
        self.last_used = 0.0
        try:
            self.session: ChatSession | None = ChatSession(engine, lane=lane)
        except ChatTemplateError:  # a base model: /v1/completions only
            self.session = None

    def reuse(self, job: Job) -> int:
        """How much of ``job``'s prompt this slot's cache already holds (-1: another
        scope's cache, which the job may not see)."""
        if job.scope != self.scope:
            return -1
        if isinstance(job.key, str):
            held = self.session.cached_text if self.session is not None else ""
        else:
            held = self.lane.tokens
        return common_prefix(held, job.key or "")

    def cut_by(self, job: Job) -> bool:
        """Whether ``job`` would cut what this slot's cache holds (its conversation then
        worth keeping in host memory first)."""
        if len(self.lane.tokens) < MIN_TOKENS:
            return False
        if job.scope != self.scope or self.session is None or not isinstance(job.key, str):
            return self.reuse(job) < len(self.lane.tokens)
        return self.reuse(job) < len(self.session.cached_text)

    def snapshot(self) -> Entry:
        """The conversation this slot's cache holds, its cells copied out."""
        text, ids = self.session.held() if self.session is not None else (None, None)
        return Entry(self.scope, list(self.lane.tokens), self.lane.snapshot(), text, ids)

    def restore(self, entry: Entry) -> None:
        """Hold ``entry``'s conversation instead (of the same scope as this slot)."""
        self.lane.restore(entry.tokens, entry.state)
        if self.session is not None:
            self.session.adopt(entry.text or "", entry.ids or [])

    def clear(self) -> None:
        """Empty the cache (and the conversation it held)."""
        if self.session is not None:
            self.session.reset()
        else:
            self.lane.reset()


# A cache holding this many more characters of a chat (or tokens of a completion's prompt)
# than another is worth choosing, or putting back from host memory; closer than that (a
# chat template's opening, a shared first word) it is a tie: a prefill of ~16 tokens costs
# less than a gap in the running sequences, or than a copy of a whole conversation's cells.
REUSE_SLACK = 64
REUSE_SLACK_TOKENS = 16


def slack(job: Job) -> int:
    """``REUSE_SLACK`` in the unit of ``job``'s key (characters or tokens)."""
    return REUSE_SLACK if isinstance(job.key, str) else REUSE_SLACK_TOKENS


def pick_slot(free: list[Slot], slots: list[Slot], job: Job, streams: bool) -> Slot:
    """The free slot a job runs on: the one whose cache holds the longest prefix of its
    prompt in its scope (llama-server's slot similarity). With ``streams`` (a cache stream
    per sequence), of the slots within ``slack`` of that prefix, the one that keeps the
    running sequences' ids consecutive: llama.cpp's equal split puts sequences into one
    graph computation only while each id is the previous + 1, so running 0 and 3 costs two
    graphs where 0 and 1 cost one (SmolLM2, 2-core Xeon AVX-512, a row each at 300 tokens:
    sequences 0, 3 took 24.7 ms a round against 16.7 for 0, 1; and 0, 1, 3 28.8 against
    22.6 for 0, 1, 2). Then the least recently used."""
    reuse = {id(s): s.reuse(job) for s in free}
    if not streams:
        return max(free, key=lambda s: (reuse[id(s)], -s.last_used))
    best = max(reuse.values())
    floor = max(best - slack(job), 0) if best >= 0 else -1  # its scope's before another's
    near = [s for s in free if reuse[id(s)] >= floor]
    running = {s.lane.target.seq for s in slots if s not in free}

    def gaps(slot: Slot) -> int:
        ids = running | {slot.lane.target.seq}
        return max(ids) - min(ids) + 1 - len(ids)
    return min(near, key=lambda s: (gaps(s), -reuse[id(s)], s.last_used))


@dataclass(eq=False)  # jobs are compared (and hashed) by identity
class Job:
    """One generation, queued for a slot. Items arrive on ``queue``: ``Chunk``s, then
    ``DONE`` or an exception. ``key``: the start of its prompt (the rendered chat text, or
    the completion's token ids), for choosing the slot whose cache holds most of it."""

    start: Callable[[Slot, Stats], Iterator[Chunk]]
    loop: asyncio.AbstractEventLoop
    scope: str = ""
    key: str | list[int] | None = None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    stats: Stats = field(default_factory=Stats)
    cancelled: threading.Event = field(default_factory=threading.Event)
    outbox: Outbox | None = None  # set: items wait there for the next hand-over

    def emit(self, item: object) -> None:
        if self.outbox is not None:
            self.outbox.put(self, item)
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancelled.set()


class Outbox:
    """Items of many jobs handed to their event loop together, once a round.

    With shared rounds, every running job has a token after each ``llama_decode``. Handed
    over one by one, each would wake the event loop while the model's thread is between
    decodes, and the loop's Python (queues, SSE framing, socket writes) would take the GIL
    that thread needs for its own Python, so the loop's work would add to every round. Handed
    over together right before the next decode (``SharedContext.before_decode``), the loop
    works while ggml computes, and the GIL is free then. Used on the model's thread only.
    """

    def __init__(self) -> None:
        self._items: list[tuple[Job, object]] = []

    def put(self, job: Job, item: object) -> None:
        self._items.append((job, item))

    def flush(self) -> None:
        if not self._items:
            return
        items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, object]]] = {}
        for job, item in items:
            by_loop.setdefault(job.loop, []).append((job, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                for job, _ in batch:
                    job.cancelled.set()


def _deliver(batch: list[tuple[Job, object]]) -> None:
    for job, item in batch:
        job.queue.put_nowait(item)


@dataclass
class Totals:
    """What the server has done, for ``/metrics`` (counts only grow)."""

    requests: int = 0
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    predicted_tokens: int = 0
    predicted_seconds: float = 0.0
    target_steps: int = 0
    sources: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, s: Stats) -> None:
        self.requests += 1
        self.prompt_tokens += s.n_prompt_new
        self.prompt_seconds += s.prompt_seconds
        self.predicted_tokens += s.n_tokens
        self.predicted_seconds += s.decode_seconds
        self.target_steps += s.n_steps
        for name, v in s.sources.items():
            mine = self.sources.setdefault(name, {"drafted": 0, "accepted": 0})
            mine["drafted"] += v["drafted"]
            mine["accepted"] += v["accepted"]


class Worker:
    """Runs jobs on the engine's slots, one thread per slot, in arrival order.

    Args:
        engine: the loaded model.
        save: saves the drafting memory (None: it has no file); called between jobs,
            when ``save_tokens`` were added since the last save or ``save_seconds`` have
            passed with anything unsaved.
        max_queue: most jobs waiting for a slot (None: no bound); past it, 503.
        cache_ram: bytes of conversations' caches kept in host memory when a job cuts
            its slot's (``runtime.serve.prompt_cache``; None: no bound, 0: none). Shared
            rounds only: one sequence's context also holds a draft model's cells.
    """

    def __init__(self, engine: Engine, save: Callable[[], None] | None = None,
                 save_seconds: float = 60.0, save_tokens: int = 20_000,
                 max_queue: int | None = None, cache_ram: int | None = 0):
        self.engine = engine
        self.prompt_cache = PromptCache(cache_ram) \
            if engine.shared is not None and cache_ram != 0 else None
        self.save, self.save_seconds, self.save_tokens = save, save_seconds, save_tokens
        self.max_queue = max_queue
        self._unsaved, self._saved_at = 0, time.monotonic()
        self.slots = [Slot(engine, lane) for lane in engine.lanes]
        self.session = self.slots[0].session  # the chat template's reader (renderer, tools)
        self.no_chat: str | None = None
        if self.session is None:
            try:
                ChatSession(engine)
            except ChatTemplateError as e:
                self.no_chat = str(e)
        self._cv = threading.Condition()
        self._save_lock = threading.Lock()
        self._queue: deque[Job] = deque()
        self._free = list(self.slots)
        # a cache stream per sequence: llama.cpp computes a round in one graph only when
        # its sequences' ids are consecutive (see pick_slot)
        self._streams = engine.shared is not None and not engine.shared.unified
        self._jobs: set[Job] = set()
        self._closing = False
        self.n_served = 0  # generations that ran to their end with their client there
        self.n_running = 0
        self.totals = Totals()
        # shared rounds: a round's items reach the event loop together (see Outbox)
        self._outbox = Outbox() if engine.shared is not None else None
        if engine.shared is not None:
            engine.shared.before_decode = self._outbox.flush
        self._thread = threading.Thread(target=self._loop, name="bridge-llama", daemon=True)
        self._thread.start()

    @property
    def n_queued(self) -> int:
        """Requests waiting for a sequence (beyond those a free slot is about to take)."""
        return max(0, len(self._queue) - len(self._free))

    def submit(self, start: Callable[[Slot, Stats], Iterator[Chunk]], scope: str = "",
               key: str | list[int] | None = None) -> Job:
        """Queue a job.

        Raises:
            APIError: 503 when ``max_queue`` jobs already wait (with ``Retry-After``).
        """
        job = Job(start, asyncio.get_running_loop(), scope, key, outbox=self._outbox)
        with self._cv:
            # would this job wait behind more than max_queue others for a sequence?
            if self.max_queue is not None and \
                    len(self._queue) + 1 - len(self._free) > self.max_queue:
                raise APIError(f"the server is busy: {self.n_queued} requests already "
                               "wait for a free sequence (--max-queue); retry shortly",
                               503, code="server_busy", kind="server_error",
                               headers={"Retry-After": "1"})
            self._jobs.add(job)
            self._queue.append(job)
            self._cv.notify()
        return job

    def _loop(self) -> None:
        """The model's thread: start queued jobs on free slots, then run a round."""
        shared = self.engine.shared
        while True:
            with self._cv:
                while not (self._closing or self._queue or (shared and shared.n_tasks)):
                    self._cv.wait()
                if self._closing and not (shared and shared.n_tasks):
                    return
                starts = []
                while self._queue and self._free and not self._closing:
                    job = self._queue.popleft()
                    slot = pick_slot(self._free, self.slots, job, self._streams)
                    self._free.remove(slot)
                    self.n_running += 1
                    starts.append((job, slot))
            try:
                for job, slot in starts:
                    if shared is None:  # one sequence: the job runs to its end, here
                        self._run(job, slot)
                    else:
                        shared.spawn(functools.partial(self._run, job, slot))
                if shared is not None:
                    shared.round()
            except Exception:  # _run answers its job's errors; this is a bug of ours
                log.exception("the model's thread caught an error; it goes on")
            finally:
                if self._outbox is not None:  # what the last round's ends emitted
                    self._outbox.flush()

    def _enter(self, slot: Slot, job: Job) -> None:
        """Make the slot's cache the job's to use: kept if it is the same scope's and
        survived (an idle cache may be evicted for another sequence's cells), else empty."""
        kept = slot.lane.target.acquire()
        cache = self.prompt_cache
        if cache is not None and kept and slot.cut_by(job):
            cache.add(slot.snapshot())  # the conversation the job is about to cut
        if not kept or job.scope != slot.scope:
            slot.clear()
            slot.scope = job.scope
        if cache is not None:
            entry, n = cache.find(job.scope, job.key)
            if entry is not None and n - max(slot.reuse(job), 0) >= slack(job):
                try:
                    slot.restore(cache.use(entry, whole=entry.within(job.key)))
                except ContextFullError:  # no cells for it now: the prompt is evaluated
                    slot.clear()

    def _run(self, job: Job, slot: Slot) -> None:
        target = slot.lane.target
        try:
            if job.cancelled.is_set():  # its client left while it waited
                return
            self._enter(slot, job)
            stream = job.start(slot, job.stats)
            try:
                for chunk in stream:
                    job.emit(chunk)
                    if job.cancelled.is_set():
                        break
            finally:
                stream.close()  # the engine's finally: caches end at the emitted tokens
                with self._cv:
                    self._unsaved += job.stats.n_prompt + job.stats.n_tokens
                    self.totals.add(job.stats)
            if job.cancelled.is_set():
                slot.clear()  # a cancelled sequence leaves nothing in the KV cache
            else:
                with self._cv:
                    self.n_served += 1
            job.emit(DONE)
        except ValueError as e:  # the request's fault (prompt too long, bad template...)
            job.emit(APIError(str(e)))
        except ContextFullError as e:  # the shared cache had no room for this prompt now
            slot.clear()
            job.emit(APIError(str(e), 503, code="context_full", kind="server_error",
                              headers={"Retry-After": "1"}))
        except Exception as e:
            log.exception("generation failed; resetting this sequence's caches")
            slot.clear()
            job.emit(APIError(f"generation failed: {e}", 500, kind="server_error"))
        finally:
            target.release()
            with self._cv:
                self._jobs.discard(job)
                slot.last_used = time.monotonic()
                self._free.append(slot)
                self.n_running -= 1
            self.save_if_due()

    def save_if_due(self) -> None:
        """Save the drafting memory when ``save_tokens`` were added since the last save,
        or ``save_seconds`` have passed with anything unsaved (the memory's own lock keeps
        what the running jobs add consistent with the file)."""
        if self.save is None or not self._unsaved:
            return
        with self._save_lock:
            late = time.monotonic() - self._saved_at >= self.save_seconds
            if self._unsaved >= self.save_tokens or late:
                self.save()
                self._unsaved, self._saved_at = 0, time.monotonic()

    def save_soon(self) -> None:
        """A timed save (the timer's call), on a thread of its own (the memory's lock
        keeps it consistent with what the model's thread adds meanwhile)."""
        if not self._closing:
            threading.Thread(target=self.save_if_due, name="bridge-save", daemon=True).start()

    def close(self) -> None:
        """Cancel queued and running jobs and wait for the thread: each running job ends
        within a step (its ``finally`` keeps the caches consistent)."""
        with self._cv:
            self._closing = True
            for job in list(self._jobs):
                job.cancelled.set()
            self._queue.clear()
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)


async def wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Interrupted(Exception):
    """The client went away, or the server is stopping, before the job's next item."""


async def next_item(job: Job, watcher: asyncio.Future) -> object:
    """The job's next item, unless ``watcher`` (disconnect or shutdown) completes first."""
    if not job.queue.empty() and not watcher.done():  # already here: no task to wait on
        return job.queue.get_nowait()
    getter = asyncio.ensure_future(job.queue.get())
    await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if not getter.done():
        getter.cancel()
        raise Interrupted
    return getter.result()


async def save_periodically(worker: Worker) -> None:
    """Ask for a timed save of the drafting memory now and then, so an idle server also
    saves what the last requests added (the worker skips it when nothing is due)."""
    if worker.save is None:
        return
    while True:
        await asyncio.sleep(min(worker.save_seconds, 30.0))
        worker.save_soon()
