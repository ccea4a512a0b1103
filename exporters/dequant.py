"""Dequantizing GGUF tensors with ggml's own row converters.

gguf-py's numpy dequantizer builds every block through a chain of whole-array
temporaries: one Q4_0 FFN matrix of an 8B model (14336 x 4096) takes 0.7 s on a Zen 4
core, and a streamed export dequantizes every layer twice (scoring, then held-out
acceptance): about 2 minutes of an 8B export. ggml's ``to_float`` for the same type, in
the libggml-base that llama-cpp-python loaded (``runtime.native.ggml_library``), writes
the same float32 values in 0.05 s, and it runs without the GIL, so the rows are split
over the scoring threads.

The converter comes from ``ggml_get_type_traits(type)`` through ctypes. The struct's
layout is the pinned llama.cpp's (``ggml.h``); before a type's converter is trusted, its
name, block size and block bytes are checked against gguf-py's table of the same type,
and any mismatch (another ggml, a type ggml cannot convert) falls back to gguf-py, which
is the reference: ``tests/test_dequant.py`` checks the two agree bit for bit on every type
of the bundled models.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from concurrent.futures import ThreadPoolExecutor

import gguf
import numpy as np

log = logging.getLogger(__name__)

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
# rows below this many float32 outputs are converted on one thread: starting a second
# costs more than it saves
_SPLIT_MIN = 1 << 20


class _Traits(ctypes.Structure):
    # struct ggml_type_traits, ggml.h of the pinned llama.cpp
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        from runtime.native import ggml_library

        lib = ggml_library("ggml-base")
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        return lib
    except (ImportError, OSError, AttributeError) as e:
        log.debug("ggml's dequantizers are not available (%s); using gguf-py's", e)
        return None


@functools.cache
def converter(qtype: gguf.GGMLQuantizationType):
    """ggml's ``to_float`` for ``qtype``, or None when gguf-py must convert it."""
    lib = _library()
    if lib is None or qtype not in gguf.GGML_QUANT_SIZES:
        return None
    traits = lib.ggml_get_type_traits(int(qtype)).contents
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    name = (traits.type_name or b"").decode(errors="replace")
    if (name.upper() != qtype.name or traits.blck_size != block
            or traits.type_size != nbytes or not traits.to_float):
        log.debug("ggml's traits of %s do not match gguf-py's (%s, %d, %d); using gguf-py",
                  qtype.name, name, traits.blck_size, traits.type_size)
        return None
    return _TO_FLOAT(traits.to_float)


def dequantize(data: np.ndarray, qtype: gguf.GGMLQuantizationType,
               threads: int = 1) -> np.ndarray:
    """float32 values of GGUF tensor ``data`` (rows of blocks, as gguf-py reads them),
    shaped as ``gguf.quants.dequantize`` shapes them; always a new, writable array."""
    fn = converter(qtype)
    if fn is None or data.ndim == 0 or data.dtype != np.uint8:
        w = gguf.quants.dequantize(data, qtype)
        return w if w.flags.writeable and w.flags.c_contiguous else np.array(w)
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    src = np.ascontiguousarray(data)
    rows = src.reshape(-1, src.shape[-1])
    cols = rows.shape[1] // nbytes * block
    out = np.empty((rows.shape[0], cols), dtype=np.float32)

    def convert(a: int, b: int) -> None:
        fn(rows[a:b].ctypes.data, out[a:b].ctypes.data, (b - a) * cols)

    n = max(1, min(threads, out.size // _SPLIT_MIN, rows.shape[0]))
    if n == 1:
        convert(0, rows.shape[0])
    else:
        cuts = [rows.shape[0] * k // n for k in range(n + 1)]
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(convert, cuts[:-1], cuts[1:]))
    return out.reshape(*src.shape[:-1], cols)
