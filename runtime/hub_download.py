"""One file of a Hub repo into the standard Hugging Face cache, resumable across runs.

huggingface_hub does the HTTP and owns the cache layout: ``get_hf_file_metadata`` is the
HEAD (ETag, size, commit, the Hub's redirects), ``http_get`` the ranged GET with its own
retries and progress bar, and ``hf_hub_download`` writes the cache's ``refs/`` and links
the file into ``snapshots/<commit>/``. This module adds one thing huggingface_hub 2.x gave
up: a partial download that survives the process. ``hf_hub_download`` writes to a
process-unique temporary file and deletes it on any failure, so a connection drop that
outlasts its five retries, a full disk or Ctrl-C would restart a 5 GB file from zero.
Here the bytes go to ``blobs/<etag>.incomplete`` (the name huggingface_hub itself resumed
from before 1.0), which the next run continues with a Range request, as llama.cpp's
``-hf`` and ``ollama pull`` do. A finished LFS file is checked against its sha256 (its
ETag) before it is renamed to its blob, so spliced runs cannot leave a corrupt model.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from runtime.files import remember_sha256, sha256_file

log = logging.getLogger(__name__)

# an LFS file's ETag is the sha256 of its bytes; a small git file's is a git blob sha1
_LFS_ETAG = re.compile(r"^[0-9a-f]{64}$")
# a line on a non-terminal at most this often while one file downloads
_LINE_EVERY_S = 10.0
# files smaller than this download without lines of their own (DEBUG only)
_QUIET_BELOW = 10_000_000


class HubError(OSError):
    """The Hub or the cache could not give the model; the message says what to do."""


@dataclass(frozen=True)
class HubEnv:
    """Where and how to reach the Hub, read from huggingface_hub at call time, so
    ``HF_ENDPOINT``, ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN``
    (or ``hf auth login``'s token) mean what they mean to every other HF tool."""

    endpoint: str
    cache: Path
    offline: bool
    token: str | None

    @classmethod
    def current(cls) -> HubEnv:
        from huggingface_hub import constants, get_token

        return cls(constants.ENDPOINT.rstrip("/"), Path(constants.HF_HUB_CACHE),
                   constants.is_offline_mode(), get_token())

    def storage(self, repo: str) -> Path:
        """The repo's folder in the cache (``models--org--name``)."""
        from huggingface_hub.file_download import repo_folder_name

        return self.cache / repo_folder_name(repo_id=repo, repo_type="model")


def in_hf_cache(path: Path) -> bool:
    """``path`` lies in the Hugging Face cache (where bridge writes nothing beside it)."""
    try:
        from huggingface_hub import constants
    except ImportError:  # no huggingface_hub: nothing came from its cache
        return False
    # both resolved: a snapshot's file is a link to a blob, also in the cache
    return Path(constants.HF_HUB_CACHE).resolve() in Path(path).resolve().parents


def fetch_file(env: HubEnv, repo: str, revision: str, commit: str, filename: str) -> Path:
    """The cached path of ``filename`` at ``commit``, downloaded first if it is missing.

    Args:
        env: endpoint, cache, token.
        repo: ``org/name``.
        revision: what the user asked for (a branch, tag or commit), recorded in
            ``refs/`` so an offline run finds the same commit.
        commit: the commit that revision resolved to.
        filename: the file's path in the repo.

    Raises:
        HubError: the download broke off (a rerun resumes it), the disk is full, or the
            bytes failed their sha256 check.
        huggingface_hub's HfHubHTTPError and httpx2's errors: the caller explains them.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.utils import WeakFileLock

    pointer = env.storage(repo) / "snapshots" / commit / filename
    if pointer.is_file():
        return pointer  # cached: no request at all
    url = hf_hub_url(repo, filename, revision=commit, endpoint=env.endpoint)
    meta = get_hf_file_metadata(url, token=env.token, endpoint=env.endpoint)
    if not meta.etag:
        raise HubError(f"{env.endpoint} sent no ETag for {repo}/{filename}; is HF_ENDPOINT "
                       "a Hugging Face Hub?")
    blob = env.storage(repo) / "blobs" / meta.etag
    blob.parent.mkdir(parents=True, exist_ok=True)
    # the lock huggingface_hub takes for this blob: two downloads never share a partial
    lock = env.cache / ".locks" / env.storage(repo).name / f"{meta.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if not blob.is_file():
            _download(env, url, meta, blob, filename)
    # the blob is in place: huggingface_hub links it into snapshots/ and records the ref
    return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=env.cache,
                                token=env.token, endpoint=env.endpoint))


def _download(env: HubEnv, url: str, meta, blob: Path, filename: str) -> None:
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    partial = blob.with_name(blob.name + ".incomplete")
    have = partial.stat().st_size if partial.is_file() else 0
    size = meta.size
    if size is not None and have > size:  # not a prefix of this file: start again
        partial.unlink()
        have = 0
    if size is not None:
        _check_space(blob.parent, size - have, filename)
    headers = build_hf_headers(token=env.token)
    if urlparse(meta.location).netloc != urlparse(url).netloc:
        headers.pop("authorization", None)  # a CDN that the Hub redirects to gets no token
    # a config or tokenizer file is a blink: only the big files get lines of their own
    level = logging.INFO if size is None or size >= _QUIET_BELOW else logging.DEBUG
    if have:
        log.log(level, "resuming %s at %s of %s", filename, human_size(have),
                human_size(size))
    else:
        log.log(level, "downloading %s (%s)", filename, human_size(size))
    start = time.monotonic()
    try:
        with open(partial, "ab") as f:
            http_get(meta.location, f, resume_size=have, headers=headers, expected_size=size,
                     displayed_filename=filename, tqdm_class=progress_class())
    except httpx2.TransportError as e:
        got = partial.stat().st_size if partial.is_file() else 0
        raise HubError(f"the download of {filename} broke off at {human_size(got)} of "
                       f"{human_size(size)} ({type(e).__name__}: {_first_line(e)}); run the "
                       "same command again to resume it") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise HubError(f"the disk is full: {filename} stopped at "
                           f"{human_size(partial.stat().st_size)} of {human_size(size)} in "
                           f"{blob.parent}; free some space (or point HF_HOME at a larger "
                           "disk) and run again to resume") from None
        if size is not None and partial.is_file() and partial.stat().st_size > size:
            partial.unlink()  # more bytes than the file has: nothing to resume from
        raise HubError(f"downloading {filename} failed ({_first_line(e)}); run again "
                       "to resume") from None
    sha = None
    if _LFS_ETAG.match(meta.etag):
        sha = sha256_file(partial)
        if sha != meta.etag:
            partial.unlink()
            raise HubError(f"{filename} failed its sha256 check (got {sha[:12]}..., the Hub "
                           f"says {meta.etag[:12]}...); the download was removed, run again")
    os.chmod(partial, 0o644)
    os.replace(partial, blob)
    if sha is not None:
        remember_sha256(blob, sha)  # the runtime's draft check needs it: no second read
    seconds = max(time.monotonic() - start, 1e-3)
    got = blob.stat().st_size - have
    log.log(level, "downloaded %s: %s in %.1f s (%s/s)", filename, human_size(got), seconds,
            human_size(got / seconds))


def _check_space(folder: Path, need: int, filename: str) -> None:
    free = shutil.disk_usage(folder).free
    if need > free:
        raise HubError(f"not enough disk space for {filename}: it needs {human_size(need)} "
                       f"more, {human_size(free)} are free in {folder}; free some space or "
                       "point HF_HOME at a larger disk")


def progress_class():
    """huggingface_hub's bar on a terminal (None: its default); elsewhere a log line
    every ``_LINE_EVERY_S`` seconds, so a log file shows progress without bar redraws."""
    if sys.stderr.isatty():
        return None
    from huggingface_hub.utils import tqdm as hf_tqdm

    class LogLines(hf_tqdm):
        def __init__(self, *args, **kwargs):
            if kwargs.get("disable") is None:  # None: tqdm would hide it off a terminal
                kwargs["disable"] = False
            kwargs["file"] = io.StringIO()  # nothing is drawn: display() logs instead
            # the caller logs the first and the last line: those are skipped here
            self._last_line = time.monotonic()
            self._first_n = kwargs.get("initial", 0)
            super().__init__(*args, **kwargs)

        def display(self, msg=None, pos=None) -> bool:
            now = time.monotonic()
            if now - self._last_line >= _LINE_EVERY_S and \
                    self.n not in (self._first_n, self.total):
                self._last_line = now
                pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
                log.info("%s: %s of %s%s", self.desc, human_size(self.n),
                         human_size(self.total), pct)
            return True

    return LogLines


def human_size(n: float | None) -> str:
    if n is None:
        return "? bytes"
    for unit in ("bytes", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
