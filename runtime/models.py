"""The model argument of every runtime command (chat, generate, serve, bench, ``--draft``).

MODEL is, in this order: an existing GGUF file; an existing folder (its GGUF, chosen as a
GGUF repo's is); a bundled name (``smollm2``, ``gemma3``); or a Hugging Face id,
``org/name-GGUF`` or ``org/name-GGUF:Q4_K_M`` as llama.cpp's ``-hf`` takes it (see
``runtime.hub``), downloaded into the HF cache on first use.
"""

from __future__ import annotations

import logging
from pathlib import Path

from runtime import bundled, hub

log = logging.getLogger(__name__)

SPEC_HELP = "a .gguf file, a folder, a bundled name or a Hugging Face id (org/name-GGUF[:QUANT])"


def resolve_gguf(spec: str | Path, revision: str | None = None, what: str = "model") -> Path:
    """The GGUF that ``spec`` names, downloaded first when it is a hub id not yet cached.

    Args:
        spec: the command's MODEL (or ``--draft``) argument.
        revision: a branch, tag or commit of a hub id (``--revision``).
        what: ``model`` or ``draft``, for the messages.

    Raises:
        FileNotFoundError: nothing by that name exists.
        ValueError: it exists but holds no GGUF, or ``revision`` was given for a local file.
        runtime.hub.HubError: a hub id that cannot be fetched (the message says why).
    """
    text = str(spec).strip()
    if not text:
        raise ValueError(f"the {what} argument is empty: give {SPEC_HELP}")
    path = Path(text).expanduser()
    if path.exists():
        _no_revision(revision, str(path))
        return _gguf_in(path) if path.is_dir() else path
    if text.lower() in bundled.BUNDLED:
        _no_revision(revision, text)
        found = bundled.resolve_bundled(text)
        assert found is not None
        return found
    parsed = hub.HubSpec.parse(text, revision)
    if parsed is not None:
        return hub.resolve(parsed, "gguf").path
    if text.lower().endswith(".gguf") or text[0] in "./~":
        raise FileNotFoundError(f"{what} file not found: {path}")
    raise FileNotFoundError(f"{what} not found: {text!r} is not {SPEC_HELP}; bundled names "
                            f"are {', '.join(bundled.BUNDLED)}")


def _no_revision(revision: str | None, what: str) -> None:
    if revision:
        raise ValueError(f"--revision applies to a Hugging Face id, not to {what}; drop it")


def _gguf_in(folder: Path) -> Path:
    """A folder's GGUF: its only one, or the one a hub repo's default rule picks."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    chosen = hub.choose_gguf(names, None)
    if chosen is None:
        if "config.json" in names:
            raise ValueError(f"{folder} is a Hugging Face checkpoint, not GGUF: make a GGUF "
                             f"and its draft with `bridge export {folder}`, then run the file "
                             "it writes")
        raise ValueError(f"{folder} holds no GGUF model file; give the file itself")
    if len(hub.gguf_quants(names)) > 1:
        log.info("%s holds several GGUFs; using %s (give the file to choose another)",
                 folder, chosen[0])
    return folder / chosen[0]
