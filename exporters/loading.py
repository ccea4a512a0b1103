"""Resolve ``MODEL`` to something the exporter can read, and open GGUF files safely.

MODEL may be a Hugging Face folder, a ``.gguf`` file, a bundled short name (``smollm2``,
``gemma3``), or a Hugging Face id (``runtime.hub``): ``org/name`` (its safetensors
checkpoint, or its GGUF when it has no checkpoint) or ``org/name-GGUF[:QUANT]``, fetched into
the Hugging Face cache (or read from it offline).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gguf

from exporters.config import QUANT_TYPES
from runtime import bundled, hub

log = logging.getLogger(__name__)

# A trailing quant tag on a GGUF stem ("...-Q4_K_M", "....q8_0"), matched against
# llama.cpp's own type names only. It is dropped from the output name, which gets the
# real type from the file's metadata.
_QUANT_TAG = re.compile(
    r"[-._](" + "|".join(sorted(map(re.escape, QUANT_TYPES), key=len, reverse=True)) + r")$",
    re.IGNORECASE,
)
# The part suffix of a split GGUF ("...-00001-of-00003"), llama.cpp's naming.
_SPLIT_PART = re.compile(r"-\d{5}-of-\d{5}$", re.IGNORECASE)
# A per-layer GGUF tensor, "blk.<layer>.<rest>" (llama.cpp's naming for every arch).
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved MODEL: ``kind`` says how to read ``path``; ``name`` names the outputs.
    ``cached``: the file lives in the Hugging Face cache, which bridge does not own, so an
    export refers to it rather than copying it (unless asked)."""

    kind: Literal["hf", "gguf"]
    path: Path
    name: str
    cached: bool = False


def resolve_model(spec: str, revision: str | None = None) -> ModelSource:
    """Map MODEL (path, bundled name or hub id) to a ``ModelSource``.

    Args:
        spec: the MODEL argument.
        revision: a branch, tag or commit of a hub id.

    Raises:
        FileNotFoundError: nothing by that name exists.
        ValueError: it exists but is not a model bridge can read.
        runtime.hub.HubError: a hub id that cannot be fetched (the message says why).
    """
    path = Path(spec).expanduser()
    if path.exists():
        _no_revision(revision, spec)
        return _from_path(path)
    if spec.lower() in bundled.BUNDLED:
        _no_revision(revision, spec)
        gguf_path = bundled.resolve_bundled(spec)
        assert gguf_path is not None
        return _from_path(gguf_path)
    parsed = hub.HubSpec.parse(spec, revision)
    if parsed is not None:
        model = hub.resolve(parsed, "export")
        if model.kind == "hf":
            return ModelSource("hf", model.path, parsed.repo.split("/")[-1], cached=True)
        # no open_gguf here: the download checked its sha256, and parsing a large
        # vocabulary's metadata takes seconds (the export opens it once, next)
        return ModelSource("gguf", model.path, gguf_base_name(model.path), cached=True)
    raise FileNotFoundError(
        f"model not found: {spec!r} is not a file, a folder, a bundled name "
        f"({', '.join(bundled.BUNDLED)}), or a Hugging Face id (org/name, "
        "org/name-GGUF:Q4_K_M)"
    )


def _no_revision(revision: str | None, spec: str) -> None:
    if revision:
        raise ValueError(f"--revision applies to a Hugging Face id, not to {spec}; drop it")


def _from_path(path: Path) -> ModelSource:
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json; expected a Hugging Face model folder "
                             "(config.json, *.safetensors, tokenizer files)")
        return ModelSource("hf", path.resolve(), path.resolve().name)
    if path.suffix.lower() == ".gguf":
        open_gguf(path)  # fail early on a truncated or corrupt file
        return ModelSource("gguf", path.resolve(), gguf_base_name(path))
    raise ValueError(f"{path} is neither a .gguf file nor a Hugging Face model folder")


def gguf_base_name(path: Path) -> str:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` -> ``SmolLM2-135M-Instruct`` (and
    ``x-Q8_0-00001-of-00002.gguf`` -> ``x``)."""
    stem = path.name[: -len(".gguf")] if path.name.lower().endswith(".gguf") else path.stem
    stem = _SPLIT_PART.sub("", stem) or stem
    return _QUANT_TAG.sub("", stem) or stem


def gguf_split_count(reader: gguf.GGUFReader) -> int:
    """How many files the model is split in (1: not split); llama.cpp loads the first
    and finds the others beside it."""
    return int(field_value(reader, gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 1))


def open_gguf(path: Path) -> gguf.GGUFReader:
    """Open a GGUF for reading; a truncated or corrupt file raises ValueError.

    The reader is shared with the next call on the same unchanged file (same inode, size
    and mtime): gguf-py parses a 49k-token vocabulary's metadata in seconds, and one export
    reads its input in several stages. Callers only read from it."""
    try:
        st = Path(path).stat()
    except OSError:
        return _open_gguf(Path(path))  # says what is wrong with the path
    return _open_cached(Path(path).resolve(), (st.st_dev, st.st_ino, st.st_size,
                                               st.st_mtime_ns))


@contextlib.contextmanager
def one_parse(path: Path | None, reader: gguf.GGUFReader | None = None):
    """transformers reads a GGUF for the config, the tokenizer and the weights (four times
    to load a model for scoring), each time with a new gguf-py reader, whose parse of Gemma
    3's 262k-token vocabulary takes about 25 s on a 2-core Xeon: for the duration, a
    reader of ``path`` is ``reader``, else the one ``open_gguf`` holds (callers only read
    from it; any other file gets its own)."""
    if path is None:
        yield
        return
    real, target = gguf.GGUFReader, Path(path).resolve()
    shared = reader if reader is not None else open_gguf(path)

    def shared_or_new(p, mode="r"):
        return shared if mode == "r" and Path(p).resolve() == target else real(p, mode)

    gguf.GGUFReader = shared_or_new  # transformers imports it from gguf at each call
    try:
        yield
    finally:
        gguf.GGUFReader = real


@functools.lru_cache(maxsize=2)  # the input and the file an export just wrote
def _open_cached(path: Path, version: tuple[int, int, int, int]) -> gguf.GGUFReader:
    return _open_gguf(path)


def _open_gguf(path: Path) -> gguf.GGUFReader:
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf-py raises many kinds on bad input
        raise ValueError(f"{path} is not a valid GGUF file, or is truncated "
                         f"({type(e).__name__}: {e})") from None
    size = path.stat().st_size
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ValueError(f"{path} is truncated: its tensors need {end} bytes, "
                         f"the file has {size}")
    if gguf.Keys.General.ARCHITECTURE not in reader.fields:
        raise ValueError(f"{path} has no {gguf.Keys.General.ARCHITECTURE}; not a model GGUF")
    return reader


def field_value(reader: gguf.GGUFReader, key: str, default=None):
    """A metadata value as a Python scalar/list, or ``default`` when absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_arch(reader: gguf.GGUFReader) -> str:
    return field_value(reader, gguf.Keys.General.ARCHITECTURE)


def gguf_block_count(reader: gguf.GGUFReader) -> int:
    key = gguf.Keys.LLM.BLOCK_COUNT.format(arch=gguf_arch(reader))
    n = field_value(reader, key)
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"{reader.data.filename} has no valid {key}")
    return n


def block_tensor(name: str) -> tuple[int, str] | None:
    """``"blk.12.attn_q.weight"`` -> ``(12, "attn_q.weight")``; None for a shared tensor
    (embeddings, output norm and head, rope factors)."""
    m = _BLOCK.match(name)
    return (int(m[1]), m[2]) if m else None


def gguf_quant_name(reader: gguf.GGUFReader) -> str:
    """The file's ``general.file_type`` as a llama.cpp type name (``Q4_K_M``, ``F16``...)."""
    ftype = field_value(reader, gguf.Keys.General.FILE_TYPE)
    for name, value in QUANT_TYPES.items():
        if value == ftype:
            return name
    raise ValueError(f"{reader.data.filename} has general.file_type={ftype!r}, which bridge "
                     "cannot name; pass --quant explicitly")


def read_hf_config(folder: Path) -> dict:
    """config.json as a dict; ValueError when it is not readable JSON."""
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {folder / 'config.json'}: {e}") from None
