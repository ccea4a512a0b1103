"""Measured device profiles, stored between runs in the user's cache folder.

A profile is the controller's measured costs (verify curve, draft step, Python overhead)
for one combination of files and settings: target and draft sha256, threads, GPU layers,
batch size and llama.cpp build. A one-shot ``bridge generate`` then starts decided instead
of paying its calibration steps on every run; ``--recalibrate`` measures afresh.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from runtime.config import RuntimeConfig
from runtime.context import llama_cpp_version
from runtime.costs import CostModel
from runtime.files import sha256_file_cached

log = logging.getLogger(__name__)


def profile_key(model: Path, draft: Path | None, sources: list[str], rt: RuntimeConfig) -> str:
    """Which stored profile applies: the same files, sources, threads, offload, batch,
    exact mode, cache layout, RPC workers and llama.cpp build."""
    draft_sha = sha256_file_cached(draft) if draft else "none"
    return (f"{sha256_file_cached(model)}:{draft_sha}:"
            f"{'+'.join(sorted(sources))}:t{rt.n_threads or 'all'}:"
            f"ngl{rt.n_gpu_layers}:b{rt.n_batch}:{'exact:' if rt.exact else ''}"
            f"{('unified:' if rt.kv_unified else 'shared:') if rt.parallel > 1 else ''}"
            f"{'rpc' + ','.join(map(str, rt.rpc)) + ':' if rt.rpc else ''}"
            f"{'draft-rpc' + ','.join(map(str, rt.draft_rpc)) + ':' if rt.draft_rpc else ''}"
            f"llama-cpp-python{llama_cpp_version()}")


def profile_file() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "bridge" / "profiles.json"


def _read() -> dict:
    try:
        data = json.loads(profile_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def load_profile(key: str) -> dict | None:
    """The stored profile for ``key``, or None."""
    entry = _read().get(key)
    return entry if isinstance(entry, dict) else None


def stored_costs(key: str) -> CostModel | None:
    """The costs an earlier run stored under ``key`` (None: they are measured afresh)."""
    stored = load_profile(key)
    return None if stored is None else CostModel.from_profile(stored)


def save_profile(key: str, profile: dict) -> None:
    """Store ``profile`` under ``key``, atomically; a read-only cache is not an error."""
    data = _read()
    data[key] = profile
    path = profile_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        log.debug("could not write %s", path)
