"""An OpenAI-compatible HTTP server over one ``Engine``: ``bridge serve``.

One model has one KV cache, so one worker thread runs every llama.cpp call and requests are
served one at a time, in arrival order; the async handlers only wait on it, so ``/health``
answers and concurrent clients queue instead of failing. Chat requests go through one
``ChatSession`` (the GGUF's own template), which reuses the cached prefix: a follow-up turn
evaluates only its new tokens. A client that goes away cancels its job, and the worker
closes the engine's generator within a step (its ``finally`` keeps the caches consistent).

Responses carry llama-server's ``timings`` object, plus bridge's ``mode`` and per-source
draft counts. FastAPI, sse-starlette and uvicorn come with the ``serve`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette import EventSourceResponse
from starlette.datastructures import Headers

from runtime.chat import ChatSession, ChatTemplateError
from runtime.config import GenerationConfig, SamplingConfig, SpeculativeConfig
from runtime.engine import Chunk, Engine
from runtime.speculative import Stats

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
# engine finish reasons -> OpenAI's; "context" (the context filled up) is kept as is
FINISH_REASONS = {"eog": "stop", "stop": "stop", "length": "length", "context": "context"}


@dataclass(frozen=True)
class ServerConfig:
    """Where and how ``bridge serve`` listens.

    Args:
        host: interface to bind; anything but loopback exposes the model to the network.
        port: TCP port (0 picks a free one).
        api_key: when set, every request but ``/health`` needs ``Authorization: Bearer KEY``.
        shutdown_seconds: how long in-flight requests may take to finish on Ctrl-C/SIGTERM.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    shutdown_seconds: float = 3.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key must not be empty")


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` object."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# -- request bodies ---------------------------------------------------------------------

class _Body(BaseModel):
    # clients send fields bridge has no use for (user, metadata, ...): accept and ignore
    model_config = ConfigDict(extra="allow")


class SpeculativeOverride(BaseModel):
    """llama-server's per-request ``"speculative"`` object; bridge takes its ``n_max``."""

    model_config = ConfigDict(extra="forbid")
    n_max: int | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class CompletionBody(_Body):
    model: str | None = None
    prompt: str | list[str] | list[int]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # llama-server's extensions, same meaning as in bridge
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    speculative: SpeculativeOverride | None = None
    logprobs: bool | int | None = None
    echo: bool = False


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None


class ChatBody(CompletionBody):
    prompt: None = None
    messages: list[Message] = Field(min_length=1)
    tools: list | None = None


# -- the worker: every llama.cpp call on one thread ---------------------------------------

_DONE = object()


@dataclass(eq=False)  # jobs are compared (and hashed) by identity
class Job:
    """One generation, queued for the worker. Items arrive on ``queue``: ``Chunk``s, then
    ``_DONE`` or an exception."""

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
            job.emit(_DONE)
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


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Interrupted(Exception):
    """The client went away, or the server is stopping, before the job's next item."""


async def _next_item(job: Job, watcher: asyncio.Future) -> object:
    """The job's next item, unless ``watcher`` (disconnect or shutdown) completes first."""
    getter = asyncio.ensure_future(job.queue.get())
    await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if not getter.done():
        getter.cancel()
        raise _Interrupted
    return getter.result()


# -- translating requests -----------------------------------------------------------------

def _parse(model: type[BaseModel], payload: object) -> BaseModel:
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise APIError(f"{loc}: {err['msg']}" if loc else err["msg"],
                       param=loc or None) from None


# fields bridge would otherwise silently ignore, and why they are refused when set
_REFUSED = {
    "presence_penalty": "only 0 is supported (llama.cpp's repeat penalty is a different "
                        "thing: pass repeat_penalty)",
    "frequency_penalty": "only 0 is supported (llama.cpp's repeat penalty is a different "
                         "thing: pass repeat_penalty)",
    "logprobs": "logprobs are not supported", "echo": "echo is not supported",
    "tools": "tools are not supported",
}


def _settings(engine: Engine, default_gen: GenerationConfig, body: CompletionBody
              ) -> tuple[GenerationConfig, SamplingConfig, int | None]:
    """The request's settings: the server's defaults (from the command line), overridden by
    what the request names. The dataclasses validate and word the errors."""
    if body.n not in (None, 1):
        raise APIError(f"n must be 1, got {body.n}: bridge serves one choice per request",
                       param="n")
    for name, why in _REFUSED.items():
        if getattr(body, name, None):
            raise APIError(f"{name}: {why}", param=name)
    given = {k: v for k, v in (("temp", body.temperature), ("top_p", body.top_p),
                               ("top_k", body.top_k), ("min_p", body.min_p),
                               ("repeat_penalty", body.repeat_penalty), ("seed", body.seed))
             if v is not None}
    try:
        sampling = dataclasses.replace(engine.sampling, **given)
    except ValueError as e:
        raise APIError(str(e)) from None
    draft_max = body.speculative.n_max if body.speculative is not None else None
    if draft_max is not None:
        try:
            SpeculativeConfig(draft_max=draft_max)
        except ValueError as e:
            raise APIError(f"speculative.n_max: {e}", param="speculative.n_max") from None
    n = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    if n is not None and n < 1:
        raise APIError(f"max_tokens must be >= 1, got {n}", param="max_tokens")
    stop = default_gen.stop if body.stop is None else \
        tuple(s for s in ([body.stop] if isinstance(body.stop, str) else body.stop) if s)
    gen = dataclasses.replace(default_gen, max_tokens=n or default_gen.max_tokens, stop=stop)
    return gen, sampling, draft_max


def _messages(body: ChatBody) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(body.messages):
        content = m.content or ""
        if isinstance(content, list):  # content parts: text only
            parts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(f"messages.{i}.content: only text parts are supported, "
                                   f"got type {part.get('type')!r}", param=f"messages.{i}")
                parts.append(part["text"])
            content = "".join(parts)
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise APIError("the last message must be a user message", param="messages")
    return out


def timings(stats: Stats) -> dict:
    """llama-server's ``timings`` object, plus bridge's mode and per-source draft counts."""
    s = stats.as_dict()
    pn, pms = s["n_prompt_evaluated"], s["prompt_seconds"] * 1e3
    dn, dms = s["n_tokens"], s["decode_seconds"] * 1e3
    return {"cache_n": s["n_prompt"] - pn, "prompt_n": pn, "prompt_ms": round(pms, 3),
            "prompt_per_token_ms": round(pms / pn, 3) if pn else 0.0,
            "prompt_per_second": round(1e3 * pn / pms, 3) if pms > 0 else 0.0,
            "predicted_n": dn, "predicted_ms": round(dms, 3),
            "predicted_per_token_ms": round(dms / dn, 3) if dn else 0.0,
            "predicted_per_second": s["tokens_per_s"],
            "draft_n": s["n_drafted"], "draft_n_accepted": s["n_accepted"],
            "mode": s["mode"], "sources": s.get("sources", {})}


def _finish(stats: Stats) -> str | None:
    return FINISH_REASONS.get(stats.finish_reason, stats.finish_reason)


def _usage(stats: Stats, n_completion: int) -> dict:
    return {"prompt_tokens": stats.n_prompt, "completion_tokens": n_completion,
            "total_tokens": stats.n_prompt + n_completion}


# -- the app ------------------------------------------------------------------------------

def create_app(engine: Engine, cfg: ServerConfig | None = None,
               gen: GenerationConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``; its lifespan's end stops the worker.

    Args:
        engine: the loaded model (the caller closes it after the app stops).
        cfg: the API key, if any, is enforced here.
        gen: default answer length and stop strings; requests override them.
    """
    cfg = cfg or ServerConfig()
    default_gen = gen or GenerationConfig()
    model_id = engine.model.path.name
    model_ids = {model_id, model_id.removesuffix(".gguf")}
    worker = Worker(engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await asyncio.to_thread(worker.close)

    app = FastAPI(title="bridge", lifespan=lifespan)
    app.state.worker = worker
    if cfg.api_key:
        app.add_middleware(_BearerAuth, key=cfg.api_key)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": model_id, "object": "model", "owned_by": "bridge",
            "created": int(engine.model.path.stat().st_mtime),
            "meta": {"n_ctx": engine.ctx.n_ctx,
                     "draft": engine.draft_path.name if engine.draft_path else None}}]}

    async def read(request: Request, kind: type[CompletionBody]) -> CompletionBody:
        try:
            payload = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON: {e}") from None
        body = _parse(kind, payload)
        if body.model is not None and body.model not in model_ids:
            raise APIError(f"model {body.model!r} does not exist; this server serves "
                           f"{model_id!r}", param="model", code="model_not_found")
        return body

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read(request, ChatBody)
        g, sampling, draft_max = _settings(engine, default_gen, body)
        messages = _messages(body)
        if worker.session is None:
            raise APIError(worker.no_chat, code="no_chat_template")
        session = worker.session

        def start(stats: Stats) -> Iterator[Chunk]:
            return session.ask_messages(messages, g, stats, sampling=sampling,
                                        draft_max=draft_max)

        return await respond(request, body, start, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read(request, CompletionBody)
        g, sampling, draft_max = _settings(engine, default_gen, body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError("one prompt per request", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise APIError("the prompt is empty", param="prompt")
        if isinstance(prompt, list) and not all(0 <= t < engine.model.n_vocab for t in prompt):
            raise APIError(f"prompt: token ids must be in 0..{engine.model.n_vocab - 1}",
                           param="prompt")

        def start(stats: Stats) -> Iterator[Chunk]:
            return engine.generate(prompt, g, stats, sampling=sampling, draft_max=draft_max)

        return await respond(request, body, start, chat=False)

    async def respond(request: Request, body: CompletionBody, start, chat: bool):
        job = worker.submit(start)
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            # the first item decides between an HTTP error (prompt too long) and a stream
            first = await _next_item(job, watcher)
            if watcher.done():  # both at once: the disconnect must not be lost
                raise _Interrupted
            if isinstance(first, Exception):
                raise first
            head = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()), "model": body.model or model_id}
            if not body.stream:
                return await _whole(job, first, head, chat, watcher)
        except _Interrupted:  # nobody is left to read an answer
            return Response(status_code=499)
        finally:
            watcher.cancel()  # a stream's disconnects are sse-starlette's to watch
            if not body.stream:
                job.cancelled.set()
        usage = body.stream_options is not None and body.stream_options.include_usage
        stopping = anyio.Event()  # set by sse-starlette when the server shuts down
        return EventSourceResponse(_events(job, first, head, chat, usage, stopping), ping=15,
                                   shutdown_event=stopping, shutdown_grace_period=1.0)

    return app


async def _whole(job: Job, item: object, head: dict, chat: bool,
                 watcher: asyncio.Future) -> dict:
    text, n = [], 0
    while item is not _DONE:
        if isinstance(item, Exception):
            raise item
        text.append(item.text)
        n += len(item.tokens)
        item = await _next_item(job, watcher)
    reason = _finish(job.stats)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                  "logprobs": None, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": reason}
    return {**head, "choices": [choice], "usage": _usage(job.stats, n),
            "timings": timings(job.stats)}


async def _events(job: Job, item: object, head: dict, chat: bool, include_usage: bool,
                  stopping: anyio.Event) -> AsyncIterator[dict]:
    """SSE events in OpenAI's chunk format (sse-starlette frames them). A client
    disconnect cancels this generator; a server shutdown ends it with an error event.
    Either way the job is cancelled."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(text: str | None, reason: str | None, **extra) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            if text is not None and first:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None,
                      "finish_reason": reason}
        return {"data": json.dumps({**head, "choices": [choice], **extra},
                                   ensure_ascii=False)}

    first, n = True, 0
    watcher = asyncio.ensure_future(stopping.wait())
    try:
        while item is not _DONE:
            if isinstance(item, APIError):
                yield {"data": json.dumps(item.body())}
                return
            n += len(item.tokens)
            if item.text or first:
                yield chunk(item.text, None)
                first = False
            try:
                item = await _next_item(job, watcher)
            except _Interrupted:
                err = APIError("the server is shutting down; the answer was cut short", 503,
                               kind="server_error", code="shutting_down")
                yield {"data": json.dumps(err.body())}
                return
        usage = _usage(job.stats, n)
        yield chunk(None, _finish(job.stats), usage=usage, timings=timings(job.stats))
        if include_usage:
            yield {"data": json.dumps({**head, "choices": [], "usage": usage})}
        yield {"data": "[DONE]"}
    finally:
        watcher.cancel()
        job.cancelled.set()


class _BearerAuth:
    """ASGI middleware: 401 unless ``Authorization: Bearer KEY`` (``/health`` is open)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            auth = Headers(scope=scope).get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode(), self.key):
                err = APIError("missing or wrong API key: send 'Authorization: Bearer KEY'",
                               401, code="invalid_api_key", kind="authentication_error")
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


# -- running it ---------------------------------------------------------------------------

def serve(engine: Engine, cfg: ServerConfig, gen: GenerationConfig | None = None) -> None:
    """Serve ``engine`` until Ctrl-C or SIGTERM; return once in-flight streams have ended
    and the worker has stopped (the caller then closes the engine).

    Raises:
        OSError: the address cannot be bound (port in use, unknown host).
    """
    import uvicorn

    if cfg.host not in LOOPBACK:
        log.warning("listening on %s: anyone who can reach this machine can use the model%s",
                    cfg.host, "" if cfg.api_key else "; consider --api-key")
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    try:
        sock = socket.create_server((cfg.host, cfg.port), family=family)
    except OSError as e:
        raise OSError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    port = sock.getsockname()[1]
    app = create_app(engine, cfg, gen)
    server = uvicorn.Server(uvicorn.Config(
        app, log_config=None, timeout_graceful_shutdown=cfg.shutdown_seconds))
    log.info("serving %s on http://%s:%d/v1 (Ctrl-C stops)", engine.model.path.name,
             cfg.host, port)
    try:
        with sock, _signals_end_quietly():
            server.run(sockets=[sock])
    finally:  # also after a forced exit (a second Ctrl-C skips the app's shutdown)
        app.state.worker.close()


@contextlib.contextmanager
def _signals_end_quietly():
    """uvicorn re-raises the signal that stopped it once it has shut down cleanly; let that
    be a normal return rather than a KeyboardInterrupt or a kill by SIGTERM."""
    previous = {sig: signal.signal(sig, lambda *_: None)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
