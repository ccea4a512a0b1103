"""File identity shared by the runtime, the exporter and the model fetchers: sha256 of a
file (hashed once per path, size and mtime), where a draft sits beside its full model, and
an index of exported drafts by their full model's sha256.

The index is how ``bridge chat org/name-GGUF:Q4_K_M`` finds the draft that ``bridge export``
wrote into another folder: the full GGUF stays in the Hugging Face cache, so no draft can sit
beside it, but the draft records the sha256 of the file it was cut from
(``keys.TARGET_SHA256``), and the same sha256 keys the index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from runtime import keys

log = logging.getLogger(__name__)

_CHUNK = 1 << 22


def cache_dir() -> Path:
    """bridge's own cache folder: ``$XDG_CACHE_HOME/bridge``, else ``~/.cache/bridge``."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bridge"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _sha_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def sha256_file_cached(path: Path) -> str:
    """``sha256_file``, remembered per (path, size, mtime) in ~/.cache/bridge, so a
    multi-GB model is hashed once rather than at every start."""
    key = _sha_key(path)
    cache = _read_json("sha256.json")
    if key not in cache:
        cache[key] = sha256_file(path)
        _write_json("sha256.json", cache)
    return cache[key]


def remember_sha256(path: Path, sha256: str) -> None:
    """Record ``path``'s sha256 computed elsewhere (a download hashes what it fetched), so
    ``sha256_file_cached`` does not read the file again."""
    cache = _read_json("sha256.json")
    cache[_sha_key(path)] = sha256
    _write_json("sha256.json", cache)


def draft_path_for(full: Path) -> Path:
    """Where ``bridge export`` writes ``full``'s draft and the runtime looks for it:
    ``x.gguf`` -> ``x.draft.gguf`` (a name without ``.gguf`` just gains the suffix)."""
    return full.with_name(full.name.removesuffix(keys.FULL_SUFFIX) + keys.DRAFT_SUFFIX)


def remember_draft(draft: Path, target_sha256: str) -> None:
    """Index ``draft`` under the sha256 of the full GGUF it was cut from (newest first).
    Entries whose file is gone or rewritten are dropped on the way, so the index holds no
    more than the drafts that exist."""
    draft = draft.resolve()
    st = draft.stat()
    entry = {"path": str(draft), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    index = {sha: [e for e in entries if _current(e) and e["path"] != entry["path"]]
             for sha, entries in _read_json("drafts.json").items() if isinstance(entries, list)}
    index[target_sha256] = [entry, *index.get(target_sha256, [])]
    _write_json("drafts.json", {sha: entries for sha, entries in index.items() if entries})


def drafts_for(target_sha256: str) -> list[Path]:
    """The indexed drafts of the full GGUF with this sha256, newest first. An entry whose
    file is gone or was rewritten since (another size or mtime) is skipped: it may no
    longer be this model's draft."""
    entries = _read_json("drafts.json").get(target_sha256, [])
    return [Path(e["path"]) for e in entries if isinstance(entries, list) and _current(e)]


def _current(entry: object) -> bool:
    """The indexed file still exists, with the size and mtime it was indexed with."""
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        return False
    try:
        st = Path(entry["path"]).stat()
    except OSError:
        return False
    return (st.st_size, st.st_mtime_ns) == (entry.get("size"), entry.get("mtime_ns"))


def _read_json(name: str) -> dict:
    try:
        data = json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(name: str, data: dict) -> None:
    path = cache_dir() / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:  # a read-only home must not stop a chat or an export
        log.debug("could not write %s", path)
