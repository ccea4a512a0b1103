"""An OpenAI-compatible HTTP server over one ``Engine``: ``bridge serve``.

The engine's KV cache holds ``--parallel`` sequences, each a slot of the worker
(``runtime.serve.worker``), whose one thread runs every llama.cpp call: the running
requests' steps are evaluated together, one ``llama_decode`` a round
(``runtime.batching``), so concurrent clients are served at once and a request joins or
leaves between steps. Requests beyond the slots wait in arrival order; the async handlers
only wait on their job, so ``/health`` always answers. Nothing unbounded runs on that
thread: ``runtime.serve.guard`` bounds the body and checks where it comes from, and
``runtime.serve.admission`` checks sizes and renders, tokenizes and fits the prompt on a
helper thread (large prompts one at a time) before the request joins the queue. Each slot
has its own ``ChatSession`` (the GGUF's own template), which reuses its cached prefix: a
follow-up turn evaluates only its new tokens. A client
that goes away cancels its job, and the worker closes the engine's generator within a step
(its ``finally`` keeps the caches consistent).

A drafting memory (``runtime.drafters.memory``) remembers every finished request, prompt
and answer, and later requests draft from it. Requests draft only from earlier requests made
with the same API key (the scope is a hash of the presented bearer token; without
API keys every request shares one scope); ``"shared_drafts": false`` keeps a request
out of it both ways. The prompt cache follows the same scopes: each slot keeps its last
conversation, a request goes to the free slot of its own scope that holds the longest prefix
of its prompt, and a slot that held another scope's prompt starts empty, so neither
``cache_n`` nor speed tells one key's client what another sent. ``--draft-memory-file``
loads the memory at start and saves it every ``save_seconds`` or ``save_tokens`` added, and
at shutdown.

Tool calls (``tools``, ``tool_choice``): the format is read from the chat template
(``runtime.tools``), tools and tool messages go through the template when it takes them
and into message text otherwise, the answer is decoded under the tools' grammar and ends
before a call that repeats one it made (a stop rule of its decode loop), and it is read
back for calls as it streams (``runtime.tool_reading``, ``runtime.serve.stream``).

Request and response shapes live in ``runtime.serve.openai_api``. Responses carry
llama-server's ``timings`` object, plus bridge's ``mode``, target steps, per-source draft
counts and how full the shared batch was; ``GET /stats`` reports the memory's size, and
``GET /metrics`` the server's counters in Prometheus's text format
(``runtime.serve.metrics``). FastAPI, sse-starlette and uvicorn come with the
``serve`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from runtime import tools
from runtime.config import GenerationConfig
from runtime.constraint import ConstraintSpec
from runtime.drafters.memory import DEFAULT_MAX_TOKENS, DraftMemory
from runtime.engine import Chunk, Engine
from runtime.files import sha256_file_cached
from runtime.serve import admission
from runtime.serve import openai_api as api
from runtime.serve.admission import Limits
from runtime.serve.guard import LOCAL_NAMES, Guard, header_timeout_protocol, key_scope
from runtime.serve.metrics import CONTENT_TYPE, render_metrics
from runtime.serve.openai_api import APIError
from runtime.serve.stream import events, whole
from runtime.serve.worker import (
    Interrupted,
    Slot,
    Worker,
    next_item,
    save_periodically,
    wait_disconnect,
)
from runtime.speculative import Stats
from runtime.tool_reading import CallReading

log = logging.getLogger(__name__)

LOOPBACK = LOCAL_NAMES
WILDCARDS = ("0.0.0.0", "::", "")
SMALL_PROMPT_BYTES = 64 << 10  # tokenized in a few ms: no need to queue for it


@dataclass(frozen=True)
class MemoryConfig:
    """The drafting memory shared across requests.

    Args:
        enabled: False (``--no-shared-drafts``): no memory at all.
        max_tokens: most tokens stored (``--draft-memory``); the oldest requests go first.
        path: load the memory from this file at start and save it there at shutdown, and
            whenever ``save_seconds`` have passed or ``save_tokens`` were added since the
            last save (a crash loses at most that much).
    """

    enabled: bool = True
    max_tokens: int = DEFAULT_MAX_TOKENS
    path: Path | None = None
    save_seconds: float = 60.0
    save_tokens: int = 20_000

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"--draft-memory must be >= 1 token, got {self.max_tokens}")
        if self.save_seconds <= 0 or self.save_tokens < 1:
            raise ValueError("the memory's save interval must be > 0 s and >= 1 token, got "
                             f"{self.save_seconds} s and {self.save_tokens} tokens")
        if self.path is not None and not self.enabled:
            raise ValueError("--draft-memory-file needs the memory; drop --no-shared-drafts")


@dataclass(frozen=True)
class ServerConfig:
    """Where and how ``bridge serve`` listens.

    Args:
        host: interface to bind; anything but loopback exposes the model to the network.
        port: TCP port (0 picks a free one).
        api_keys: when any, every request but ``/health`` needs ``Authorization: Bearer
            KEY`` with one of them; each key is its own scope (prompt cache, memory).
        allowed_hosts: ``Host`` names accepted besides the bound address and localhost
            (``*``: any), against DNS rebinding.
        cors_origins: web origins allowed to call the API from a browser (none: no CORS).
        max_body: most bytes of a request body (413 beyond).
        max_messages: most messages of a chat request.
        context_overflow: what a request too long for the context gets by default:
            ``error`` (400), ``cap`` (a shorter answer) or ``trim`` (oldest turns dropped).
        header_seconds: a connection's request headers must arrive within this time.
        idle_seconds: an idle keep-alive connection is closed after this time.
        body_seconds: a request body must arrive within this time.
        shutdown_seconds: how long in-flight requests may take to finish on Ctrl-C/SIGTERM.
        max_queue: most requests waiting for a free sequence (None: no bound); past it
            503 with ``Retry-After``.
        cache_ram: MiB of conversations' caches kept in host memory when a request cuts
            its slot's (``runtime.serve.prompt_cache``; llama-server's ``--cache-ram``
            and its default; -1: no bound, 0: none).
        memory: the drafting memory across requests.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    max_body: int = 8 << 20
    max_messages: int = 4096
    context_overflow: str = "error"
    header_seconds: float = 10.0
    idle_seconds: float = 5.0
    body_seconds: float = 30.0
    shutdown_seconds: float = 3.0
    max_queue: int | None = None
    cache_ram: int = 8192
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if any(not k.strip() or k != k.strip() or " " in k for k in self.api_keys):
            raise ValueError("API keys must be non-empty and hold no spaces")
        if self.max_queue is not None and self.max_queue < 0:
            raise ValueError(f"--max-queue must be >= 0, got {self.max_queue}")
        if self.cache_ram < -1:
            raise ValueError(f"--cache-ram must be >= -1 (MiB; -1: no bound, 0: off), got "
                             f"{self.cache_ram}")
        if self.max_body < 1024:
            raise ValueError(f"--max-body must be >= 1024 bytes, got {self.max_body}")
        for name in ("header_seconds", "idle_seconds", "body_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        Limits(1, 1, self.max_messages, self.context_overflow)  # validates both

    @property
    def hosts(self) -> tuple[str, ...]:
        """``Host`` names the guard accepts."""
        bound = () if self.host in WILDCARDS else (self.host,)
        return (*bound, *LOOPBACK, *self.allowed_hosts)


def open_memory(cfg: MemoryConfig, model: Path) -> DraftMemory | None:
    """The memory to hand to ``Engine(memory=...)``: None when disabled, else loaded from
    ``cfg.path`` when that file holds one for this very model (a missing, corrupt or
    foreign file logs one warning and gives an empty memory).

    Raises:
        ValueError: ``cfg.path``'s folder does not exist, so it could never be saved.
    """
    if not cfg.enabled:
        return None
    if cfg.path is None:
        return DraftMemory(cfg.max_tokens)
    if not cfg.path.parent.is_dir():
        raise ValueError(f"--draft-memory-file: folder {cfg.path.parent} does not exist")
    memory = DraftMemory.load(cfg.path, sha256_file_cached(model), cfg.max_tokens)
    if memory.n_tokens:
        log.info("draft memory: %d tokens loaded from %s", memory.n_tokens, cfg.path)
    return memory


def save_memory(engine: Engine, cfg: MemoryConfig) -> None:
    """Write the engine's memory to ``cfg.path`` (atomically), if both exist; a failure is
    logged, never raised, so shutdown completes."""
    if cfg.path is None or engine.memory is None:
        return
    try:
        engine.memory.save(cfg.path, sha256_file_cached(engine.model.path))
        log.info("draft memory: %d tokens saved to %s", engine.memory.n_tokens, cfg.path)
    except OSError as e:
        log.error("draft memory not saved to %s: %s", cfg.path, e)


def scope_of(authorization: str | None) -> str:
    """The scope of a request (prompt cache, drafting memory): a hash of its bearer token
    (never the token itself, which would then sit in the memory file), "" without one."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return ""
    return key_scope(token)


# -- the app ------------------------------------------------------------------------------

def create_app(engine: Engine, cfg: ServerConfig | None = None,
               gen: GenerationConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``; its lifespan's end stops the worker.

    Args:
        engine: the loaded model (the caller closes it after the app stops); its
            ``memory``, if any, is the drafting memory shared across requests.
        cfg: the API key, if any, is enforced here.
        gen: default answer length and stop strings; requests override them.
    """
    cfg = cfg or ServerConfig()
    default_gen = gen or GenerationConfig()
    model_id = engine.model.path.name
    model_ids = {model_id, model_id.removesuffix(".gguf")}
    save = (lambda: save_memory(engine, cfg.memory)) if cfg.memory.path is not None else None
    worker = Worker(engine, save, cfg.memory.save_seconds, cfg.memory.save_tokens,
                    cfg.max_queue, None if cfg.cache_ram == -1 else cfg.cache_ram << 20)
    limits = Limits(engine.n_ctx, admission.longest_piece(engine.model, engine.model.n_vocab),
                    cfg.max_messages, cfg.context_overflow)
    # prompts are rendered and tokenized off the model's thread; large ones one at a time,
    # so a burst of huge requests takes one core, not all of them, and small ones (a few
    # ms each) do not wait behind them
    preparing = asyncio.Semaphore(1)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        saver = asyncio.create_task(save_periodically(worker))
        yield
        saver.cancel()
        await asyncio.to_thread(worker.close)

    app = FastAPI(title="bridge", lifespan=lifespan)
    app.state.worker = worker
    app.add_middleware(Guard, hosts=cfg.hosts, origins=cfg.cors_origins, keys=cfg.api_keys,
                       max_body=cfg.max_body, body_seconds=cfg.body_seconds)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> JSONResponse:
        # a bug, not the client's fault: still OpenAI's shape (the log has the traceback)
        return APIError(f"internal error: {type(exc).__name__}", 500,
                        kind="server_error").response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # 404 and 405 in OpenAI's shape, like every other error
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"no such route: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"
                   }.get(exc.status_code, str(exc.detail))
        response = APIError(message, exc.status_code, code=code).response()
        response.headers.update(exc.headers or {})
        return response

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/stats")
    async def stats() -> dict:
        # nbytes takes the memory's lock, which a rebuild may hold a moment: not on the loop
        return await asyncio.to_thread(_server_stats, engine, worker, cfg.memory)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render_metrics(engine, worker), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": model_id, "object": "model", "owned_by": "bridge",
            "created": int(engine.model.path.stat().st_mtime),
            "meta": {"n_ctx": engine.n_ctx,
                     "n_parallel": len(engine.lanes),
                     "draft": engine.draft_path.name if engine.draft_path else None}}]}

    async def read(request: Request, kind: type[api.CompletionBody]) -> api.CompletionBody:
        try:
            payload = json.loads(await request.body())
            body = api.parse(kind, payload)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON: {e}") from None
        except RecursionError:  # json and pydantic recurse per level of nesting
            raise APIError("the request body is nested too deeply") from None
        admission.check_ranges(body)
        if body.model is not None and body.model not in model_ids:
            raise APIError(f"model {body.model!r} does not exist; this server serves "
                           f"{model_id!r}", param="model", code="model_not_found")
        return body

    def overrides(request: Request, body: api.CompletionBody) -> tuple[GenerationConfig, dict]:
        s = api.settings(engine.sampling, default_gen, body)
        # one scope per API key; without keys the presented token means nothing
        scope = scope_of(request.headers.get("authorization")) if cfg.api_keys else ""
        return s.gen, s.overrides(scope)

    async def admit(body: api.CompletionBody, g: GenerationConfig, n_bytes: int, fn, *args
                    ) -> tuple[admission.Admitted, GenerationConfig]:
        """Render, tokenize and fit the prompt off the model's thread; the answer's
        length capped to what the context has left when the policy allows."""
        explicit = (body.max_tokens or body.max_completion_tokens) is not None
        call = (fn, *args, g.max_tokens, explicit, admission.policy_of(body, limits), limits)
        if n_bytes <= SMALL_PROMPT_BYTES:
            adm = await asyncio.to_thread(*call)
        else:
            async with preparing:
                adm = await asyncio.to_thread(*call)
        return adm, dataclasses.replace(g, max_tokens=adm.max_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read(request, api.ChatBody)
        g, kw = overrides(request, body)
        spec = api.tool_spec(body)
        messages = api.messages(body)
        if worker.session is None:
            raise APIError(worker.no_chat, code="no_chat_template")
        admission.check_messages(messages, limits, admission.policy_of(body, limits))
        session = worker.session
        calls = CallReading.of(session, spec)
        if spec.active:
            # every call validates by construction: the answer is decoded under the tools'
            # grammar (the envelope of the template's format around each tool's schema;
            # under auto, free text may come first), which also forces the opening the
            # model would otherwise be handed, so that opening drafts for free
            if kw["constraint"] is not None:
                raise APIError("tools cannot be combined with response_format, json_schema "
                               "or grammar: give the answer's format as a tool instead",
                               param="tools")
            kw["constraint"] = ConstraintSpec("gbnf", calls.grammar)
            calls = dataclasses.replace(calls, prefill="")
        g = dataclasses.replace(g, stop=(*g.stop, *calls.stops))
        messages, tpl_tools = tools.prepare(calls.fmt, messages, spec)
        n_bytes = sum(len(m["content"]) for m in messages)
        fn = functools.partial(admission.admit_chat, tools=tpl_tools, prefill=calls.prefill,
                               tool_text=json.dumps(spec.tools) if spec.tools else "")
        adm, g = await admit(body, g, n_bytes, fn, session.renderer, messages)

        def start(slot: Slot, stats: Stats) -> Iterator[Chunk]:
            # an answer of calls ends before a call that repeats one it made: a rule of
            # this generation's decode loop (a fresh one each), so the repeat's tokens
            # are never emitted, streamed or not
            rule = calls.stop_rule() if spec.active else None
            return slot.session.ask_messages(adm.messages, g, stats, rendered=adm.rendered,
                                             stop_rule=rule, **kw)

        return await respond(request, body, start, chat=True, scope=kw["scope"],
                             key=adm.rendered.text, dropped=adm.dropped,
                             calls=calls if spec.active else None)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read(request, api.CompletionBody)
        g, kw = overrides(request, body)
        prompt = api.completion_prompt(body, engine.model.n_vocab)
        adm, g = await admit(body, g, len(prompt), admission.admit_completion, engine.model,
                             prompt)

        def start(slot: Slot, stats: Stats) -> Iterator[Chunk]:
            return slot.lane.generate(adm.prompt, g, stats, **kw)

        return await respond(request, body, start, chat=False, scope=kw["scope"],
                             key=adm.prompt)

    async def respond(request: Request, body: api.CompletionBody, start, chat: bool,
                      scope: str, key, dropped: int = 0, calls: CallReading | None = None):
        job = worker.submit(start, scope, key)
        watcher = asyncio.ensure_future(wait_disconnect(request))
        try:
            # the first item decides between an HTTP error (prompt too long) and a stream
            first = await next_item(job, watcher)
            if watcher.done():  # both at once: the disconnect must not be lost
                raise Interrupted
            if isinstance(first, Exception):
                raise first
            top = api.head("chat" if chat else "text", body.model or model_id,
                           int(time.time()), uuid.uuid4().hex)
            lp = api.logprob_entries(engine.model) if body.logprobs else None
            if not body.stream:
                answer = await whole(job, first, top, chat, body.return_tokens, watcher,
                                     calls, lp)
                # trimming was asked for; the response says what it cost
                return {**answer, "dropped_messages": dropped} if dropped else answer
        except Interrupted:  # nobody is left to read an answer
            return Response(status_code=499)
        finally:
            watcher.cancel()  # a stream's disconnects are sse-starlette's to watch
            if not body.stream:
                job.cancelled.set()
        usage = body.stream_options is not None and body.stream_options.include_usage
        stopping = anyio.Event()  # set by sse-starlette when the server shuts down
        stream = events(job, first, top, chat, usage, body.return_tokens, stopping, dropped,
                        calls, lp)
        return EventSourceResponse(stream, ping=15, shutdown_event=stopping,
                                   shutdown_grace_period=1.0,
                                   headers={"x-dropped-messages": str(dropped)} if dropped
                                   else None)

    return app


def _server_stats(engine: Engine, worker: Worker, cfg: MemoryConfig) -> dict:
    """``GET /stats``: what the server has done and what its drafting memory holds."""
    memory = engine.memory
    if memory is None:
        why = "--no-shared-drafts" if not cfg.enabled else \
            f"--drafter {engine.spec_cfg.drafter} does not draft from it"
        mem: dict = {"enabled": False, "why": why}
    else:
        mem = {"enabled": True, "tokens": memory.n_tokens, "bytes": memory.nbytes,
               "max_tokens": memory.max_tokens,
               "file": str(cfg.path) if cfg.path is not None else None}
    return {"model": engine.model.path.name, "sources": engine.sources,
            "parallel": len(engine.lanes),
            "slots": [{"id": i, "cached_tokens": s.lane.target.n_past}
                      for i, s in enumerate(worker.slots)],
            "requests_served": worker.n_served,
            "requests_processing": worker.n_running, "requests_deferred": worker.n_queued,
            "memory": mem}


# -- running it ---------------------------------------------------------------------------

def serve(engine: Engine, cfg: ServerConfig, gen: GenerationConfig | None = None,
          sock: socket.socket | None = None) -> None:
    """Serve ``engine`` until Ctrl-C or SIGTERM; return once in-flight streams have ended
    and the worker has stopped (the caller then closes the engine). ``sock``: an already
    listening socket to serve on instead of binding ``cfg.host:cfg.port`` (the private
    one ``runtime.serve.supervisor`` hands its child).

    Raises:
        OSError: the address cannot be bound (port in use, unknown host).
    """
    if sock is not None:
        return _run(engine, cfg, gen, sock)
    if cfg.host not in LOOPBACK:
        log.warning("listening on %s: anyone who can reach this machine can use the model%s",
                    cfg.host, "" if cfg.api_keys else "; consider --api-key-file")
    if cfg.host in WILDCARDS and not cfg.allowed_hosts:
        log.warning("listening on all interfaces: only requests naming localhost in their "
                    "Host header are served; name this machine with --allowed-host")
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    try:
        sock = socket.create_server((cfg.host, cfg.port), family=family)
    except OSError as e:
        raise OSError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    _run(engine, cfg, gen, sock)


def _run(engine: Engine, cfg: ServerConfig, gen: GenerationConfig | None,
         sock: socket.socket) -> None:
    import uvicorn

    port = sock.getsockname()[1]
    app = create_app(engine, cfg, gen)
    server = uvicorn.Server(uvicorn.Config(
        app, log_config=None, timeout_graceful_shutdown=cfg.shutdown_seconds,
        http=header_timeout_protocol(cfg.header_seconds), timeout_keep_alive=cfg.idle_seconds))
    log.info("serving %s on http://%s:%d/v1 (Ctrl-C stops)", engine.model.path.name,
             cfg.host, port)
    try:
        with sock, _signals_end_quietly():
            server.run(sockets=[sock])
    finally:  # also after a forced exit (a second Ctrl-C skips the app's shutdown)
        app.state.worker.close()
        save_memory(engine, cfg.memory)  # the worker has stopped: nothing adds to it now


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
