"""File hashing shared by the runtime (draft identity), the exporter and the model fetcher."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from runtime import keys

log = logging.getLogger(__name__)

_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def sha256_file_cached(path: Path) -> str:
    """``sha256_file``, remembered per (path, size, mtime) in ~/.cache/bridge, so a
    multi-GB model is hashed once rather than at every start."""
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    cache_file = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bridge" \
        / "sha256.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = sha256_file(path)
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:  # a read-only home must not stop a chat
            log.debug("could not write %s", cache_file)
    return cache[key]


def draft_path_for(full: Path) -> Path:
    """Where ``bridge export`` writes ``full``'s draft and the runtime looks for it:
    ``x.gguf`` -> ``x.draft.gguf`` (a name without ``.gguf`` just gains the suffix)."""
    return full.with_name(full.name.removesuffix(keys.FULL_SUFFIX) + keys.DRAFT_SUFFIX)
