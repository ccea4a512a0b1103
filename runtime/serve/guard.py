"""The HTTP checks in front of ``bridge serve``'s app, as one ASGI middleware.

A server on loopback is still reachable from every web page the user opens: a browser
sends a cross-origin ``text/plain`` POST without asking first, and a DNS-rebinding page
reaches 127.0.0.1 under its own host name. So, before any handler runs:

1. ``Host`` must name the bound address, ``localhost`` or an ``--allowed-host`` (or ``*``);
2. a request carrying an ``Origin`` must come from a ``--cors-origin``; those get CORS
   headers, and their preflights are answered; without the option no CORS header is sent;
3. with API keys, ``Authorization: Bearer KEY`` (``/health`` and preflights are open);
4. a POST body must be ``application/json`` (a browser cannot send that cross-origin
   without a preflight, which step 2 refuses);
5. the body is read here, at most ``max_body`` bytes within ``body_seconds``, and replayed
   to the app: an oversized body costs a 413 before any parsing, and a client that
   disconnects mid-body ends here quietly, with no traceback in the log.

Every refusal is an OpenAI-style error object. Bodies past this point are whole and small.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Iterable

from starlette.datastructures import Headers
from uvicorn.protocols.http.h11_impl import H11Protocol

from runtime.serve.openai_api import APIError

log = logging.getLogger(__name__)

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
_METHODS = "GET, POST, OPTIONS"
_ALLOW_HEADERS = "Authorization, Content-Type"


def key_scope(token: str) -> str:
    """The scope of a request made with API key ``token``: a hash of it (never the token
    itself, which would then sit in the memory file)."""
    return hashlib.sha256(token.strip().encode()).hexdigest()[:16]


def host_name(host_header: str) -> str:
    """The host part of a ``Host`` header, lowercased: ``[::1]:8080`` -> ``::1``."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        h = h.partition(":")[0]
    return h.rstrip(".")


class Guard:
    """ASGI middleware doing the five checks above.

    Args:
        app: the app behind it.
        hosts: host names (no port) a request's ``Host`` may carry; ``*`` allows any.
        origins: browser origins (``https://app.example``) allowed cross-origin access.
        keys: the API keys; empty means no key is needed.
        max_body: most bytes a request body may have (413 beyond).
        body_seconds: a body must arrive within this many seconds (408 otherwise), so a
            client trickling bytes cannot hold a connection open indefinitely.
        max_buffered: most body bytes held for all requests in flight together (503
            beyond; default 8 bodies of ``max_body``), so many large bodies at once cannot
            exhaust memory.
    """

    def __init__(self, app, hosts: Iterable[str], origins: Iterable[str] = (),
                 keys: Iterable[str] = (), max_body: int = 8 << 20,
                 body_seconds: float = 30.0, max_buffered: int | None = None):
        self.app = app
        self.hosts = {host_name(h) for h in hosts}
        self.origins = {o.rstrip("/").lower() for o in origins}
        self.keys = [k.strip().encode() for k in keys]
        self.max_body, self.body_seconds = max_body, body_seconds
        self.max_buffered = max_buffered if max_buffered is not None else 8 * max_body
        self.buffered = 0  # body bytes held by requests in flight (one event loop: no lock)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        err = self._check_host(headers)
        origin = headers.get("origin")
        if err is None and origin is not None and origin.rstrip("/").lower() not in self.origins:
            err = APIError(f"requests from web pages at {origin} are not allowed; start the "
                           "server with --cors-origin ORIGIN to allow them", 403,
                           code="origin_not_allowed", kind="permission_error")
        if err is not None:
            await _respond(err, scope, receive, send)
            return
        if origin is not None:
            send = _with_cors(send, origin)
            if scope["method"] == "OPTIONS":  # a preflight: carries no credentials
                await _send_empty(send, 204, [
                    (b"access-control-allow-methods", _METHODS.encode()),
                    (b"access-control-allow-headers", _ALLOW_HEADERS.encode()),
                    (b"access-control-max-age", b"600")])
                return
        err = self._check_key(scope, headers)
        if err is None and scope["method"] == "POST":
            err = _check_json(headers)
        if err is not None:
            await _respond(err, scope, receive, send)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        held = [0]  # bytes of this body counted in self.buffered
        try:
            try:
                body = await self._read_body(headers, receive, held)
            except APIError as e:
                await _respond(e, scope, receive, send)
                return
            if body is None:  # the client went away mid-body: nobody to answer
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.buffered -= held[0]

    def _check_host(self, headers: Headers) -> APIError | None:
        if "*" in self.hosts:
            return None
        name = host_name(headers.get("host", ""))
        if name in self.hosts:
            return None
        return APIError(f"Host {name or '(none)'!r} is not allowed (DNS rebinding guard); "
                        "start the server with --allowed-host NAME to allow it", 403,
                        code="host_not_allowed", kind="permission_error")

    def _check_key(self, scope, headers: Headers) -> APIError | None:
        if not self.keys or scope["path"] == "/health":
            return None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token.strip().encode()
        # compare against every key, so the time taken does not say which one matched
        ok = scheme.lower() == "bearer" and sum(
            hmac.compare_digest(given, k) for k in self.keys) > 0
        if ok:
            return None
        return APIError("missing or wrong API key: send 'Authorization: Bearer KEY'", 401,
                        code="invalid_api_key", kind="authentication_error")

    async def _read_body(self, headers: Headers, receive, held: list[int]) -> bytes | None:
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise _too_large(self.max_body)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.body_seconds):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body:
                        raise _too_large(self.max_body)
                    self.buffered += len(chunk)
                    held[0] += len(chunk)
                    if self.buffered > self.max_buffered:
                        raise APIError("the server holds too many large requests at once; "
                                       "retry shortly", 503, code="server_busy",
                                       kind="server_error")
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise APIError(f"the request body did not arrive within {self.body_seconds:g} s",
                           408, code="request_timeout") from None


async def _respond(err: APIError, scope, receive, send) -> None:
    response = err.response()
    if err.status == 401:  # RFC 9110: a 401 names the scheme it wants
        response.headers["WWW-Authenticate"] = 'Bearer realm="bridge"'
    await response(scope, receive, send)


def _too_large(limit: int) -> APIError:
    return APIError(f"the request body is larger than {limit} bytes (the server's "
                    "--max-body)", 413, code="request_too_large")


def _check_json(headers: Headers) -> APIError | None:
    kind = headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind == "application/json":
        return None
    return APIError(f"POST bodies must be sent as 'Content-Type: application/json', got "
                    f"{kind or 'none'!r}", 415, param="content-type",
                    code="unsupported_media_type")


def _replay(body: bytes, receive):
    """A ``receive`` that hands the app the body already read, then the client's own
    messages (its disconnect, which the server watches for)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_cors(send, origin: str):
    async def cors_send(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [
                *message.get("headers", []),
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"vary", b"Origin")]}
        await send(message)

    return cors_send


async def _send_empty(send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request line and headers have
    not all arrived ``seconds`` after it opened or after its last response (uvicorn has an
    idle timeout between requests but none for slowly sent headers)."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(seconds, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a request is under way: its headers are complete

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def read_keys_file(path) -> tuple[str, ...]:
    """API keys from a file, one per line (blank lines and ``#`` comments skipped), so that
    keys stay out of the process list; a file others can read is warned about.

    Raises:
        ValueError: the file cannot be read or holds no key.
    """
    from pathlib import Path

    path = Path(path)
    try:
        lines = path.read_text().splitlines()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--api-key-file {path}: cannot read it: {e}") from None
    keys = tuple(k.strip() for k in lines if k.strip() and not k.lstrip().startswith("#"))
    if not keys:
        raise ValueError(f"--api-key-file {path} holds no key (one per line)")
    if any(" " in k for k in keys):
        raise ValueError(f"--api-key-file {path}: a key holds a space; one key per line")
    if mode & 0o077:
        log.warning("%s can be read by other users of this machine; chmod 600 it", path)
    return keys
