"""The worker of ``bridge serve``: every llama.cpp call on one thread, one job at a time.

One model has one KV cache, so jobs run in arrival order on a single thread that owns the
engine; the async handlers wait on a job's queue of items (``Chunk``s, then ``DONE`` or an
error). The KV cache holds one scope's prompt at a time (see ``Worker._enter_scope``), and
the drafting memory is saved on this thread, between jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import Request

from runtime.chat import ChatSession, ChatTemplateError
from runtime.engine import Chunk, Engine
from runtime.serve.openai_api import APIError
from runtime.speculative import Stats

log = logging.getLogger(__name__)

DONE = object()


@dataclass(eq=False)  # jobs are compared (and hashed) by identity
class Job:
    """One generation, queued for the worker. Items arrive on ``queue``: ``Chunk``s, then
    ``DONE`` or an exception."""

    start: Callable[[Stats], Iterator[Chunk]]
    loop: asyncio.AbstractEventLoop
    scope: str = ""
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    stats: Stats = field(default_factory=Stats)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancelled.set()


class Worker:
    """Runs jobs one at a time, in order, on a single thread that owns the engine.

    Args:
        engine: the loaded model.
        save: saves the drafting memory (None: it has no file); called on this thread,
            when ``save_tokens`` were added since the last save or ``save_seconds`` have
            passed with anything unsaved.
    """

    def __init__(self, engine: Engine, save: Callable[[], None] | None = None,
                 save_seconds: float = 60.0, save_tokens: int = 20_000):
        self.engine = engine
        self.save, self.save_seconds, self.save_tokens = save, save_seconds, save_tokens
        self.kv_scope = ""  # whose prompt the KV cache holds
        self._unsaved, self._saved_at = 0, time.monotonic()
        try:
            self.session: ChatSession | None = ChatSession(engine)
            self.no_chat: str | None = None
        except ChatTemplateError as e:  # a base model: /v1/completions only
            self.session, self.no_chat = None, str(e)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bridge-llama")
        self._jobs: set[Job] = set()
        self.n_served = 0  # generations that ran to their end with their client there

    def submit(self, start: Callable[[Stats], Iterator[Chunk]], scope: str = "") -> Job:
        job = Job(start, asyncio.get_running_loop(), scope)
        self._jobs.add(job)
        self._pool.submit(self._run, job)
        return job

    def _enter_scope(self, scope: str) -> None:
        """Start from an empty KV cache when the last prompt came from another scope: a
        reused prefix (``cache_n``, and the speed it buys) would tell this client what
        the other one sent."""
        if scope != self.kv_scope:
            if self.session is not None:
                self.session.reset()
            else:
                self.engine.reset()
            self.kv_scope = scope

    def _run(self, job: Job) -> None:
        try:
            if job.cancelled.is_set():  # its client left while it waited
                return
            self._enter_scope(job.scope)
            stream = job.start(job.stats)
            try:
                for chunk in stream:
                    job.emit(chunk)
                    if job.cancelled.is_set():
                        break
            finally:
                stream.close()  # the engine's finally: caches end at the emitted tokens
                self._unsaved += job.stats.n_prompt + job.stats.n_tokens
            if not job.cancelled.is_set():
                self.n_served += 1
            job.emit(DONE)
        except ValueError as e:  # the request's fault (prompt too long, bad template...)
            job.emit(APIError(str(e)))
        except Exception as e:
            log.exception("generation failed; resetting the model's caches")
            self.engine.reset()
            job.emit(APIError(f"generation failed: {e}", 500, kind="server_error"))
        finally:
            self._jobs.discard(job)
            self.save_if_due()

    def save_if_due(self) -> None:
        """Save the drafting memory when ``save_tokens`` were added since the last save,
        or ``save_seconds`` have passed with anything unsaved. Runs on the worker's
        thread (after a job, or queued by the timer), so no job adds to it meanwhile."""
        if self.save is None or not self._unsaved:
            return
        late = time.monotonic() - self._saved_at >= self.save_seconds
        if self._unsaved >= self.save_tokens or late:
            self.save()
            self._unsaved, self._saved_at = 0, time.monotonic()

    def save_soon(self) -> None:
        """Queue a timed save behind the running job (the timer's call)."""
        with contextlib.suppress(RuntimeError):  # the pool is shut down: shutdown saves
            self._pool.submit(self.save_if_due)

    def close(self) -> None:
        """Cancel queued and running jobs and wait for the thread (within a step)."""
        for job in list(self._jobs):
            job.cancelled.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


async def wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Interrupted(Exception):
    """The client went away, or the server is stopping, before the job's next item."""


async def next_item(job: Job, watcher: asyncio.Future) -> object:
    """The job's next item, unless ``watcher`` (disconnect or shutdown) completes first."""
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
