"""A Hugging Face Hub on loopback: the API shape huggingface_hub's client uses, served from
local files, so tests run the real client (``HF_ENDPOINT`` pointing here) end to end.

The routes are those huggingface_hub 2.x calls, read from its source (``hf_api.model_info``,
``file_download.get_hf_file_metadata`` and ``http_get``) and checked against this server's
log:

- ``GET /api/models/{org}/{name}[/revision/{rev}]``: the model info (``sha``, ``siblings``,
  ``gated``); an unknown repo is ``RepoNotFound``, 401 to an anonymous client and 404 to
  one with a token (as the Hub answers), an unknown revision 404 ``RevisionNotFound``.
- ``HEAD|GET /{org}/{name}/resolve/{rev}/{path}``: a small file is served here with its
  git ``ETag``; a large one (an LFS file) is a 302 to the "CDN" with ``X-Linked-Etag`` (its
  sha256) and ``X-Linked-Size``, as the Hub does. Every answer carries ``X-Repo-Commit``.
  A gated repo answers 401 ``GatedRepo`` without its token.
- ``GET /api/agent-harnesses``: huggingface_hub's own telemetry (which AI agent runs it),
  fetched once a day into ``HF_HOME`` unless ``HF_HUB_DISABLE_TELEMETRY`` is set.
- ``GET /cdn/{sha256}`` on a second loopback address (127.0.0.2, another host, so the
  client treats it as a CDN and sends no token): the bytes, honouring ``Range``.

``FakeHub.drop`` makes the next downloads of a file break off mid-body, and ``FakeHub.log``
lists every request, so tests can assert what was (not) asked.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

_LFS_MIN = 1 << 20  # the Hub keeps files from about this size in LFS
_CHUNK = 1 << 20
_hashes: dict[tuple[str, int, int], str] = {}


def sha256_of(path: Path) -> str:
    """A file's sha256, computed once per test session."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(_CHUNK):
                digest.update(block)
        _hashes[key] = digest.hexdigest()
    return _hashes[key]


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    """A repo: its files (repo path -> local file), one commit, and an optional token that
    a gated repo requires."""

    repo_id: str
    files: dict[str, Path]
    gated_token: str | None = None
    commit: str = ""

    def __post_init__(self) -> None:
        if not self.commit:
            self.commit = hashlib.sha1(self.repo_id.encode()).hexdigest()

    def is_lfs(self, path: str) -> bool:
        return self.files[path].stat().st_size >= _LFS_MIN


@dataclass
class _Drop:
    after: int  # bytes the first broken answer delivers
    times: int  # broken answers left (the ones after the first deliver nothing)
    sent_first: bool = False


@dataclass
class FakeHub:
    """The server; ``url`` is its endpoint (``HF_ENDPOINT``)."""

    repos: dict[str, FakeRepo] = field(default_factory=dict)
    log: list[tuple[str, str]] = field(default_factory=list)  # (method, path + range)
    drops: dict[str, _Drop] = field(default_factory=dict)  # sha256 -> fault

    def add(self, repo_id: str, files: dict[str, Path], gated_token: str | None = None
            ) -> FakeRepo:
        repo = FakeRepo(repo_id, dict(files), gated_token)
        self.repos[repo_id] = repo
        return repo

    def drop(self, repo_id: str, path: str, after: int, times: int = 1) -> None:
        """The next ``times`` downloads of ``path`` break off: the first after ``after``
        bytes, the others before any byte (so the client's retries make no progress)."""
        self.drops[sha256_of(self.repos[repo_id].files[path])] = _Drop(after, times)

    def reset(self) -> None:
        self.log.clear()
        self.drops.clear()

    def requests(self, kind: str = "") -> list[tuple[str, str]]:
        """The logged requests whose path contains ``kind`` (``/api/``, ``/resolve/``,
        ``/cdn/``)."""
        return [r for r in self.log if kind in r[1]]

    # -- serving ------------------------------------------------------------------------

    def start(self) -> FakeHub:
        handler = _make_handler(self)
        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler)]
        port = self._servers[0].server_address[1]
        try:  # the CDN: another host (127.0.0.2, still loopback) on the same port
            self._servers.append(ThreadingHTTPServer(("127.0.0.2", port), handler))
            self.cdn = f"http://127.0.0.2:{port}"
        except OSError:  # no 127.0.0.2 here: the CDN shares the Hub's host
            self.cdn = f"http://127.0.0.1:{port}"
        self.url = f"http://127.0.0.1:{port}"
        for server in self._servers:
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()


_API = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
_RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_CDN = re.compile(r"^/cdn/([0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def _make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # the hub keeps its own log
            pass

        def do_HEAD(self) -> None:
            self._route(head=True)

        def do_GET(self) -> None:
            self._route(head=False)

        def _route(self, head: bool) -> None:
            path = unquote(urlparse(self.path).path)
            rng = self.headers.get("Range")
            hub.log.append((self.command, path + (f" {rng}" if rng else "")))
            if m := _API.match(path):
                return self._model_info(m[1], m[2])
            if m := _RESOLVE.match(path):
                return self._resolve(m[1], m[2], m[3], head)
            if m := _CDN.match(path):
                return self._cdn(m[1], head)
            if path == "/api/agent-harnesses":  # huggingface_hub's telemetry, daily
                body = json.dumps({"standardEnvVars": [], "harnesses": {}}).encode()
                return self._send(200, {"Content-Type": "application/json"}, body)
            self._error(404, "", "not a route of the fake hub")

        def _repo(self, repo_id: str, rev: str | None) -> FakeRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:  # the Hub: 401 to an anonymous client, 404 to a signed-in one
                code = 404 if self.headers.get("Authorization") else 401
                self._error(code, "RepoNotFound", "Repository not found")
                return None
            if rev not in (None, "main", repo.commit):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", repo)
                return None
            return repo

        def _model_info(self, repo_id: str, rev: str | None) -> None:
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            body = json.dumps({
                "id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit,
                "private": False, "gated": "manual" if repo.gated_token else False,
                "disabled": False, "tags": [], "downloads": 0, "likes": 0,
                "siblings": [{"rfilename": f} for f in sorted(repo.files)],
            }).encode()
            self._send(200, {"Content-Type": "application/json"}, body)

        def _resolve(self, repo_id: str, rev: str, path: str, head: bool) -> None:
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            if repo.gated_token and self.headers.get("Authorization") != \
                    f"Bearer {repo.gated_token}":
                return self._error(401, "GatedRepo", f"Access to model {repo_id} is "
                                   "restricted. You must have access to it and be "
                                   "authenticated to access it. Please log in.", repo)
            if path not in repo.files:
                return self._error(404, "EntryNotFound", f"{path} does not exist", repo)
            local = repo.files[path]
            if repo.is_lfs(path):
                sha = sha256_of(local)
                self._send(302, {"Location": f"{hub.cdn}/cdn/{sha}",
                                 "X-Repo-Commit": repo.commit, "X-Linked-Etag": f'"{sha}"',
                                 "X-Linked-Size": str(local.stat().st_size),
                                 "ETag": f'"{git_blob_sha1(sha.encode())}"'}, b"")
                return
            data = local.read_bytes()
            self._send(200, {"X-Repo-Commit": repo.commit,
                             "ETag": f'"{git_blob_sha1(data)}"'}, b"" if head else data,
                       length=len(data))

        def _cdn(self, sha: str, head: bool) -> None:
            local = next((p for r in hub.repos.values() for p in r.files.values()
                          if p.stat().st_size >= _LFS_MIN and sha256_of(p) == sha), None)
            if local is None:
                return self._error(404, "", "no such blob")
            size = local.stat().st_size
            start, end, status = 0, size - 1, 200
            if (rng := self.headers.get("Range")) and (m := _RANGE.match(rng)):
                start, end, status = int(m[1]), int(m[2] or size - 1), 206
            headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(end - start + 1))
            self.end_headers()
            if head:
                return
            fault = hub.drops.get(sha)
            budget = None
            if fault is not None and fault.times > 0:
                fault.times -= 1
                budget = 0 if fault.sent_first else fault.after
                fault.sent_first = True
            with open(local, "rb") as f:
                f.seek(start)
                left = end - start + 1
                while left > 0:
                    n = min(_CHUNK, left) if budget is None else min(_CHUNK, left, budget)
                    if n == 0:
                        break
                    block = f.read(n)
                    self.wfile.write(block)
                    left -= len(block)
                    if budget is not None:
                        budget -= len(block)
            if left > 0:  # break off mid-body, as a dropped connection does
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

        def _error(self, code: int, error_code: str, message: str,
                   repo: FakeRepo | None = None) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if error_code:
                headers["X-Error-Code"] = error_code
            if repo is not None:
                headers["X-Repo-Commit"] = repo.commit
            self._send(code, headers, json.dumps({"error": message}).encode())

        def _send(self, code: int, headers: dict, body: bytes, length: int | None = None
                  ) -> None:
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            self.end_headers()
            if body and self.command != "HEAD":
                self.wfile.write(body)

    return Handler
