"""Safetensors checkpoints read with numpy alone: headers, shapes and one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor's
name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end
of the header), then the raw little-endian data. Reading it directly (rather than through
``safetensors``' torch or numpy front ends) keeps torch out of the conversion process, which
saves ~330 MiB of resident memory, and handles bfloat16, which numpy has no type for: a
bf16 value is the top half of the float32 with the same bits, so widening is a 16-bit shift.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8}
_ITEMSIZE = {**{k: np.dtype(v).itemsize for k, v in _NP.items()}, "BF16": 2}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype name, shape and absolute byte range."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def load(self) -> np.ndarray:
        """The tensor as float32 (a fresh array; the file mapping is dropped after)."""
        if self.dtype not in _ITEMSIZE:
            raise ValueError(f"{self.path.name}: tensor dtype {self.dtype} is not supported")
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.begin,
                        shape=(self.end - self.begin,))
        # both branches copy, so the mapping is released when ``raw`` goes out of scope
        if self.dtype == "BF16":
            out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw.view(np.dtype(_NP[self.dtype]).newbyteorder("<")).astype(np.float32)
        return out.reshape(self.shape)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor in one .safetensors file (raises ValueError on a damaged header)."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > path.stat().st_size - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(fh.read(n))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path.name} is not a readable safetensors file ({e}); "
                         "re-download the checkpoint") from None
    base = 8 + n
    size = path.stat().st_size
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = (base + int(o) for o in meta["data_offsets"])
        entry = TensorEntry(path, meta["dtype"], tuple(int(d) for d in meta["shape"]),
                            begin, end)
        itemsize = _ITEMSIZE.get(entry.dtype)
        if end > size or (itemsize and end - begin != entry.n_elements * itemsize):
            raise ValueError(f"{path.name} is truncated or corrupt (tensor {name!r} does "
                             "not fit the file); re-download the checkpoint")
        entries[name] = entry
    return entries


def tensor_index(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint in ``folder``, across its shards."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted({folder / f for f in json.loads(index.read_text())["weight_map"]
                         .values()})
    else:
        shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{folder} has no *.safetensors weights (bridge reads safetensors "
                         "checkpoints only, not pytorch_model.bin)")
    entries: dict[str, TensorEntry] = {}
    for shard in shards:
        if not shard.is_file():
            raise ValueError(f"{folder} is missing the shard {shard.name} that its index "
                             "lists; re-download the checkpoint")
        entries.update(read_header(shard))
    return entries
