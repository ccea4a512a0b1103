"""The worker: one thread runs every llama.cpp call, one job at a time, in arrival order.

The async handlers only wait on it, so ``/health`` answers and concurrent clients queue
instead of failing. A client that goes away cancels its job, and the worker closes the
engine's generator within a step (its ``finally`` keeps the caches consistent).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from runtime.chat import ChatSession, ChatTemplateError
from runtime.engine import Chunk, Engine
from runtime.serve.openai_api import APIError
from runtime.speculative import Stats

log = logging.getLogger(__name__)

DONE = object()  # the last item of every job that ran to its end


@dataclass(eq=False)  # jobs are compared (and hashed) by identity
class Job:
    """One generation, queued for the worker. Items arrive on ``queue``: ``Chunk``s, then
    ``DONE`` or an exception."""

    start: Callable[[Stats], Iterator[Chunk]]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    stats: Stats = field(default_factory=Stats)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancelled.set()


class Worker:
    """Runs jobs one at a time, in order, on a single thread that owns the engine."""

    def __init__(self, engine: Engine):
        self.engine = engine
        try:
            self.session: ChatSession | None = ChatSession(engine)
            self.no_chat: str | None = None
        except ChatTemplateError as e:  # a base model: /v1/completions only
            self.session, self.no_chat = None, str(e)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bridge-llama")
        self._jobs: set[Job] = set()
        self.n_served = 0  # generations that ran to their end

    def submit(self, start: Callable[[Stats], Iterator[Chunk]]) -> Job:
        job = Job(start, asyncio.get_running_loop())
        self._jobs.add(job)
        self._pool.submit(self._run, job)
        return job

    def _run(self, job: Job) -> None:
        try:
            if job.cancelled.is_set():  # its client left while it waited
                return
            stream = job.start(job.stats)
            try:
                for chunk in stream:
                    job.emit(chunk)
                    if job.cancelled.is_set():
                        break
            finally:
                stream.close()  # the engine's finally: caches end at the emitted tokens
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

    def close(self) -> None:
        """Cancel queued and running jobs and wait for the thread (within a step)."""
        for job in list(self._jobs):
            job.cancelled.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
