"""Write a layer-pruned draft GGUF that shares the full GGUF's quantized bytes.

The draft is the full model minus some transformer blocks. Every tensor it keeps is copied
byte for byte (same ggml type, same shape, no requantization), and kept blocks are
renumbered ``blk.0..blk.k-1``. The metadata is the full model's with:

- ``block_count`` set to the kept count, and every per-layer array (any array with one
  entry per layer) cut down to the kept layers;
- the sliding-window pattern written explicitly per kept layer from the layers' *original*
  indices: llama.cpp would otherwise recompute it from the new indices (Gemma 3: every 6th
  layer global), giving kept layers the wrong attention type;
- ``bridge.*`` keys (``exporters.keys``) saying which layers were kept and which full
  file the draft belongs to.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import BinaryIO

import gguf

from exporters.loading import block_tensor, field_value, gguf_arch, gguf_block_count, open_gguf
from runtime import keys

log = logging.getLogger(__name__)

GVT = gguf.GGUFValueType
_CHUNK = 16 << 20
# Architectures whose layers bridge knows how to drop: plain stacks of identical blocks
# whose only per-layer metadata is explicit arrays or the sliding-window pattern below.
PRUNABLE = ("llama", "qwen2", "qwen3", "gemma3")
# llama.cpp's built-in sliding-window period when a file carries none (layer i slides
# when i % period < period - 1).
_DEFAULT_SWA_PERIOD = {"gemma3": 6}


def package_version() -> str:
    """bridge's version from the installed package's metadata (the library must not import
    the CLI package ``bridge`` for it); a checkout that was never installed says so."""
    try:
        return metadata.version("bridge-specdec")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class DraftInfo:
    """What the ``bridge.*`` keys record besides the kept layers."""

    method: str
    target_sha256: str
    version: str = field(default_factory=package_version)


def write_draft(full: Path, out: Path, kept: Sequence[int], info: DraftInfo,
                reader: gguf.GGUFReader | None = None) -> None:
    """Write the draft of ``full`` that keeps the layers ``kept`` (original indices) to ``out``.

    Args:
        full: the full GGUF whose tensor bytes are copied.
        out: the draft to write (the caller owns cleanup on failure).
        kept: original indices of the layers to keep.
        info: method and target hash for the ``bridge.*`` keys.
        reader: an already open reader of a file byte-identical to ``full`` (saves
            parsing the metadata twice; large vocabularies take seconds).

    Raises:
        ValueError: ``full`` is not a prunable GGUF, or ``kept`` is empty or out of range.
    """
    reader = reader or open_gguf(full)
    arch = gguf_arch(reader)
    if arch not in PRUNABLE:
        raise ValueError(f"{full.name} is a {arch!r} model; bridge can prune "
                         f"{', '.join(PRUNABLE)}")
    n_layers = gguf_block_count(reader)
    kept = _check_kept(kept, n_layers)
    tensors = _kept_tensors(reader, kept)

    writer = gguf.GGUFWriter(out, arch)
    _copy_metadata(reader, writer, arch, n_layers, kept)
    _write_bridge_keys(writer, n_layers, kept, info)
    write_tensors(writer, full, tensors)
    log.info("draft: kept %d of %d layers; %d tensors copied byte for byte",
             len(kept), n_layers, len(tensors))


def _check_kept(kept: Sequence[int], n_layers: int) -> list[int]:
    kept = sorted(set(int(i) for i in kept))
    if not kept:
        raise ValueError("a draft needs at least one layer")
    if kept[0] < 0 or kept[-1] >= n_layers:
        raise ValueError(f"kept layers {kept} fall outside 0..{n_layers - 1}")
    return kept


def _kept_tensors(reader: gguf.GGUFReader, kept: list[int]) -> list[tuple[str, object]]:
    """(draft name, source tensor) for every tensor the draft keeps, in file order."""
    new_index = {old: new for new, old in enumerate(kept)}
    out = []
    for t in reader.tensors:
        block = block_tensor(t.name)
        if block is None:  # embeddings, output norm, output head, rope factors: unchanged
            out.append((t.name, t))
        elif block[0] in new_index:
            out.append((f"blk.{new_index[block[0]]}.{block[1]}", t))
    return out


def _copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, arch: str,
                   n_layers: int, kept: list[int]) -> None:
    block_count = gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)
    swa = _swa_layers(reader, arch, n_layers)
    swa_keys = {gguf.Keys.Attention.SLIDING_WINDOW.format(arch=arch),
                gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch)}
    # the writer adds general.architecture itself; alignment goes through its own setter
    skip = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.ALIGNMENT}
    if (alignment := field_value(reader, gguf.Keys.General.ALIGNMENT)) is not None:
        writer.add_custom_alignment(int(alignment))
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in skip or (swa is not None and key in swa_keys):
            continue
        vtype = f.types[0]
        value = _raw_value(f)
        if key == block_count:
            value = len(kept)
        elif vtype == GVT.ARRAY and len(value) == n_layers and _per_layer(key):
            value = [value[i] for i in kept]
            log.debug("draft: per-layer %s cut to the kept layers", key)
        writer.add_key_value(key, value, vtype, sub_type=f.types[-1] if vtype == GVT.ARRAY
                             else None)
    if swa is not None:
        _write_swa(writer, reader, arch, [swa[i] for i in kept])


def _raw_value(f) -> object:
    """A field's value for GGUFWriter; strings stay bytes so nothing is re-encoded."""
    vtype = f.types[0]
    if vtype == GVT.STRING:
        return bytes(f.parts[f.data[0]])
    if vtype == GVT.ARRAY and f.types[-1] == GVT.STRING:
        return [bytes(f.parts[i]) for i in f.data]
    return f.contents()


def _per_layer(key: str) -> bool:
    # vocabularies and general info are never per-layer, even if their length happens to
    # equal the layer count
    return not key.startswith(("tokenizer.", "general."))


def _swa_layers(reader: gguf.GGUFReader, arch: str, n_layers: int) -> list[bool] | None:
    """Which original layers use sliding-window attention, as llama.cpp decides it; None
    when the model has no sliding window."""
    window = field_value(reader, gguf.Keys.Attention.SLIDING_WINDOW.format(arch=arch), 0)
    if not window:
        return None
    pattern = field_value(reader, gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch))
    if isinstance(pattern, list):
        return [bool(v) for v in pattern[:n_layers]]
    period = pattern if isinstance(pattern, int) else _DEFAULT_SWA_PERIOD.get(arch)
    if period is None:
        return None
    # llama.cpp's set_swa_pattern: period 0 means every layer slides
    return [period == 0 or i % period < period - 1 for i in range(n_layers)]


def _write_swa(writer: gguf.GGUFWriter, reader: gguf.GGUFReader, arch: str,
               kept_swa: list[bool]) -> None:
    if any(kept_swa):
        window = field_value(reader, gguf.Keys.Attention.SLIDING_WINDOW.format(arch=arch))
        writer.add_sliding_window(int(window))
        writer.add_sliding_window_pattern(kept_swa)
    else:
        # Only global layers were kept. llama.cpp refuses a window with no sliding layer
        # (GGML_ASSERT is_swa_any), and a zero window means "no sliding window" to it.
        writer.add_sliding_window(0)
        log.info("draft: every kept layer uses global attention; no sliding window")


def _write_bridge_keys(writer: gguf.GGUFWriter, n_layers: int, kept: list[int],
                       info: DraftInfo) -> None:
    writer.add_key_value(keys.KEPT_LAYERS, kept, GVT.ARRAY, sub_type=GVT.UINT32)
    writer.add_float32(keys.PRUNE_RATIO, 1.0 - len(kept) / n_layers)
    writer.add_string(keys.METHOD, info.method)
    writer.add_string(keys.VERSION, info.version)
    writer.add_string(keys.TARGET_SHA256, info.target_sha256)
    writer.add_uint32(keys.TARGET_BLOCK_COUNT, n_layers)


def write_tensors(writer: gguf.GGUFWriter, full: Path, tensors: list[tuple[str, object]]
                  ) -> None:
    """Finish ``writer`` (its metadata already added) with ``tensors`` copied byte for byte
    from ``full``: tensor infos, header, metadata, infos, then the data; closes it."""
    for name, t in tensors:
        writer.add_tensor_info(name, t.data.shape, t.data.dtype, int(t.n_bytes),
                               raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    _write_tensor_bytes(writer, full, tensors)
    writer.close()


def _write_tensor_bytes(writer: gguf.GGUFWriter, full: Path,
                        tensors: list[tuple[str, object]]) -> None:
    """Copy each kept tensor's bytes from ``full``, padded exactly as GGUFWriter pads.

    Plain reads (not the reader's memory map) keep resident memory at one chunk.
    """
    assert writer.fout is not None and len(writer.fout) == 1
    fout = writer.fout[0]
    writer.write_padding(fout, fout.tell())  # tensor data starts aligned
    with open(full, "rb") as src:
        for _, t in tensors:
            src.seek(t.data_offset)
            _copy_bytes(src, fout, int(t.n_bytes))
            writer.write_padding(fout, int(t.n_bytes))
    writer.flush()


def _copy_bytes(src: BinaryIO, dst: BinaryIO, n: int) -> None:
    while n > 0:
        block = src.read(min(n, _CHUNK))
        if not block:
            raise ValueError(f"{src.name} ended early while copying tensor data")
        dst.write(block)
        n -= len(block)
