"""runtime.serve.guard on a stand-in app (no model): the checks that keep web pages, rebinding
DNS names, unkeyed clients, oversized bodies and slow clients away from `bridge serve`."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="bridge serve needs the serve extra")
httpx = pytest.importorskip("httpx", reason="the server tests need the dev extra")
uvicorn = pytest.importorskip("uvicorn", reason="bridge serve needs the serve extra")

from starlette.testclient import TestClient  # noqa: E402

from runtime.serve.guard import Guard, header_timeout_protocol, host_name  # noqa: E402

JSON = {"content-type": "application/json"}


async def _echo(scope, receive, send):
    """Answers 200 with the body it was given."""
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body or b"ok"})


def _client(**kw) -> TestClient:
    kw.setdefault("hosts", ("testserver", "localhost", "127.0.0.1", "::1"))
    return TestClient(Guard(_echo, **kw), raise_server_exceptions=True)


def _error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    return err


@pytest.mark.parametrize("header, name", [
    ("127.0.0.1:8080", "127.0.0.1"), ("[::1]:8080", "::1"), ("LocalHost", "localhost"),
    ("example.com.", "example.com"), ("::1", "::1"),  # a bare IPv6 address: no port to cut
])
def test_host_name(header, name):
    assert host_name(header) == name


def test_posts_must_be_json():
    c = _client()
    # text/plain is what a web page can send cross-origin without a preflight
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        err = _error(c.post("/v1/x", content=b"{}", headers={"content-type": kind}), 415,
                     "unsupported_media_type")
        assert "application/json" in err["message"]
    _error(c.post("/v1/x", content=b"{}"), 415, "unsupported_media_type")  # none at all
    r = c.post("/v1/x", content=b"{}", headers={"content-type":
                                                 "application/json; charset=utf-8"})
    assert r.status_code == 200 and r.text == "{}"
    assert c.get("/v1/models").status_code == 200  # a GET has no body to check


def test_host_header_is_checked():
    c = _client()
    for host in ("evil.example", "evil.example:8080", "127.0.0.1.nip.io"):
        err = _error(c.get("/v1/models", headers={"host": host}), 403, "host_not_allowed")
        assert "--allowed-host" in err["message"]
    for host in ("localhost:8080", "127.0.0.1:8080", "[::1]:8080"):
        assert c.get("/v1/models", headers={"host": host}).status_code == 200
    c = _client(hosts=("127.0.0.1", "localhost", "box.lan"))
    assert c.get("/v1/models", headers={"host": "box.lan:9000"}).status_code == 200
    assert _client(hosts=("*",)).get("/", headers={"host": "any.example"}).status_code == 200


def test_cors_is_off_by_default_and_an_allow_list():
    c = _client()
    r = c.post("/v1/x", json={}, headers={"origin": "http://evil.example"})
    _error(r, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in r.headers
    r = c.get("/v1/models")
    assert not any(k.startswith("access-control") for k in r.headers)
    c = _client(origins=("https://app.example",))
    r = c.post("/v1/x", json={"a": 1}, headers={"origin": "https://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == \
        "https://app.example"
    pre = c.options("/v1/x", headers={"origin": "https://app.example",
                                      "access-control-request-method": "POST"})
    assert pre.status_code == 204 and "POST" in pre.headers["access-control-allow-methods"]
    assert "content-type" in pre.headers["access-control-allow-headers"].lower()
    _error(c.options("/v1/x", headers={"origin": "https://other.example"}), 403,
           "origin_not_allowed")


def test_api_keys_each_work_and_401_names_the_scheme():
    c = _client(keys=("alpha", "beta"))
    for headers in ({}, {"authorization": "Bearer gamma"}, {"authorization": "alpha"}):
        r = c.get("/v1/models", headers=headers)
        _error(r, 401, "invalid_api_key")
        assert r.headers["www-authenticate"].startswith("Bearer")
    for key in ("alpha", "beta"):
        assert c.get("/v1/models", headers={"authorization": f"Bearer {key}"}
                     ).status_code == 200
    assert c.get("/health").status_code == 200


def test_body_size_limit():
    c = _client(max_body=1000)
    assert c.post("/v1/x", content=b"x" * 1000, headers=JSON).status_code == 200
    err = _error(c.post("/v1/x", content=b"x" * 1001, headers=JSON), 413, "request_too_large")
    assert "--max-body" in err["message"]

    def chunks():  # no Content-Length: the limit holds on the bytes as they come
        for _ in range(5):
            yield b"x" * 300
    _error(c.post("/v1/x", content=chunks(), headers=JSON), 413, "request_too_large")


def test_bodies_in_flight_are_bounded_together():
    """Many large bodies at once cannot exhaust memory: past max_buffered, a 503."""
    guard = Guard(_echo, hosts=("testserver",), max_body=1000, max_buffered=1500)
    c = TestClient(guard)
    guard.buffered = 1000  # as if another large body were being held
    _error(c.post("/v1/x", content=b"x" * 600, headers=JSON), 503, "server_busy")
    assert guard.buffered == 1000  # this request's bytes were given back
    guard.buffered = 0
    assert c.post("/v1/x", content=b"x" * 600, headers=JSON).status_code == 200
    assert guard.buffered == 0


def _serve(app, protocol) -> tuple[uvicorn.Server, int, threading.Thread]:
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, http=protocol, log_config=None,
                                           timeout_keep_alive=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return server, sock.getsockname()[1], thread


def test_slow_headers_and_slow_bodies_are_cut_off():
    server, port, thread = _serve(Guard(_echo, hosts=("127.0.0.1",), body_seconds=0.5),
                                  header_timeout_protocol(0.5))
    try:
        # headers that never finish: the connection is closed, not held
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            start = time.monotonic()
            assert s.recv(1024) == b""  # closed by the server
            assert time.monotonic() - start < 3
        # a body announced but never sent: 408 in OpenAI's shape
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            reply = b""
            for _ in range(10):  # headers and body may come in separate segments
                part = s.recv(4096)
                reply += part
                if not part or b"request_timeout" in reply:
                    break
            assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply
        # a normal request on the same server still works
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)
        assert r.status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)


def test_guard_passes_websocket_and_lifespan_untouched():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    asyncio.run(Guard(app, hosts=())({"type": "lifespan"}, None, None))
    assert seen == ["lifespan"]
