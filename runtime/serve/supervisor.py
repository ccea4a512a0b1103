"""``bridge serve --rpc``: a server that outlives its RPC workers.

ggml-rpc ends the whole process with ``abort()`` when a worker dies mid-command (its
``RPC_STATUS_ASSERT``); no Python code can catch that or carry on with llama.cpp's state
afterwards. So with ``--rpc`` the engine runs in a child process, ``bridge serve`` itself on
a private loopback socket handed down as a file descriptor, and this parent holds the
public socket. It relays every request to the child unchanged (the child applies the
guard, the API keys and the limits), answers ``/health`` itself, and when the child ends:

- the request in flight ends with an OpenAI-style error object naming the lost worker
  (status 502; a stream gets it as its last event);
- a new child starts, which probes the workers again; until it is up, requests get a 503
  error object with the reason, and it is retried with back-off (1 s to 10 s).

What a restart loses: the prompt cache and the drafting memory since its last save
(``--draft-memory-file`` keeps it across restarts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Sequence

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per relayed request otherwise

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "content-length", "proxy-authenticate", "proxy-authorization"}


def _error(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


class Child:
    """One ``bridge serve`` child on an inherited loopback socket; its stderr is relayed
    to ours, and its last ``Error:`` line is kept as the reason it ended."""

    def __init__(self, argv: Sequence[str]):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        fd = self.sock.fileno()
        self.proc = subprocess.Popen([*argv, "--listen-fd", str(fd)], pass_fds=(fd,),
                                     stderr=subprocess.PIPE, text=True, errors="replace")
        self.sock.close()  # the child holds it now
        self.last_error: str | None = None
        self._relay = threading.Thread(target=self._read_stderr, daemon=True)
        self._relay.start()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            sys.stderr.write(line)
            if line.startswith("Error: "):
                self.last_error = line[len("Error: "):].strip()

    def reason(self, timeout: float = 5.0) -> str:
        """Why the child ended (waits for it and for its last words)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._relay.join(timeout)
        return self.last_error or f"the model process ended (exit status {self.proc.returncode})"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._relay.join(5)


def supervise(argv: Sequence[str], host: str, port: int) -> None:
    """Serve on ``host:port`` and relay to children started as ``argv`` (a ``bridge serve``
    command line; ``--listen-fd N`` is appended). Returns on Ctrl-C or SIGTERM.

    Raises:
        OSError: the address cannot be bound.
    """
    import httpx
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        public = socket.create_server((host, port), family=family)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    state: dict = {"child": None, "ready": False, "why": "starting", "stop": False}

    async def keep_child() -> None:
        backoff = 1.0
        while not state["stop"]:
            child = Child(argv)
            state.update(child=child, ready=False)
            async with httpx.AsyncClient(timeout=2) as probe:
                while child.proc.poll() is None and not state["stop"]:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await probe.get(f"http://127.0.0.1:{child.port}/health")
                                ).status_code == 200:
                            break
                    await asyncio.sleep(0.2)
            if child.proc.poll() is None:
                state.update(ready=True, why=None)
                backoff = 1.0
                while child.proc.poll() is None and not state["stop"]:
                    await asyncio.sleep(0.2)
            state["ready"] = False
            if state["stop"]:
                break
            why = await asyncio.to_thread(child.reason)
            state["why"] = why
            log.error("the model process ended: %s; restarting in %g s", why, backoff)
            await asyncio.sleep(backoff)
            backoff = min(10.0, backoff * 2)

    async def health(_request: Request) -> Response:
        if state["ready"]:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "error": state["why"]}, status_code=503)

    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0))

    async def relay(request: Request) -> Response:
        child = state["child"]
        if not state["ready"] or child is None:
            return JSONResponse(_error(f"the model is not available: {state['why']}; "
                                       "retry shortly", "model_unavailable"), status_code=503)
        url = f"http://127.0.0.1:{child.port}{request.url.path}"
        if request.url.query:
            url += f"?{request.url.query}"
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        req = client.build_request(request.method, url, headers=headers,
                                   content=request.stream())
        try:
            upstream = await client.send(req, stream=True)
        except httpx.HTTPError:
            why = await asyncio.to_thread(child.reason)
            return JSONResponse(_error(why, "rpc_worker_lost"), status_code=502)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for part in upstream.aiter_raw():
                    yield part
            except httpx.HTTPError:
                why = await asyncio.to_thread(child.reason)
                # a stream that already began: end it with an error event
                yield f"data: {json.dumps(_error(why, 'rpc_worker_lost'))}\n\n".encode()
            finally:
                await upstream.aclose()

        out = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _HOP]
        return StreamingResponse(body(), status_code=upstream.status_code,
                                 headers=dict(out))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        task = asyncio.create_task(keep_child())
        try:
            yield
        finally:
            state["stop"] = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await client.aclose()

    methods = ["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "HEAD"]
    app = Starlette(routes=[Route("/health", health),
                            Route("/{path:path}", relay, methods=methods)],
                    lifespan=lifespan)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=3))
    log.info("serving on http://%s:%d/v1, the model in a restartable process (--rpc)",
             host, public.getsockname()[1])
    from runtime.serve.app import _signals_end_quietly

    try:
        with public, _signals_end_quietly():
            server.run(sockets=[public])
    finally:
        child = state["child"]
        if child is not None:
            child.stop()
