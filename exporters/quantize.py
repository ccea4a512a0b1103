"""Quantize a GGUF with llama.cpp's own quantizer (``llama_model_quantize``).

Using llama.cpp's quantizer, rather than reimplementing it, means the per-tensor type
choices of the K-quant mixes (Q4_K_M keeps some tensors at Q6_K, falls back where a row
length is not a multiple of 256, ...) are exactly llama.cpp's.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import llama_cpp

import runtime.context  # noqa: F401  (routes llama.cpp's log output through logging)
from exporters.config import QUANT_TYPES
from runtime.native import usable_cores

log = logging.getLogger(__name__)


def llama_ftype(quant: str) -> int:
    """llama.cpp's ``llama_ftype`` value for a type name such as ``Q4_K_M``."""
    # llama-cpp-python names them LLAMA_FTYPE_MOSTLY_<NAME> (LLAMA_FTYPE_ALL_F32 for F32)
    for prefix in ("LLAMA_FTYPE_MOSTLY_", "LLAMA_FTYPE_ALL_"):
        value = getattr(llama_cpp, prefix + quant, None)
        if value is not None:
            assert value == QUANT_TYPES[quant], f"{quant}: llama.cpp and gguf-py disagree"
            return int(value)
    raise ValueError(f"this llama.cpp build cannot quantize to {quant}")


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None,
             allow_requantize: bool = False, copy_only: bool = False) -> None:
    """Write ``src`` quantized to ``quant`` at ``dst``.

    Args:
        src: an F32/F16/BF16 GGUF (or a quantized one with ``allow_requantize``); the
            first file of a split GGUF reads the whole model.
        dst: the output path, always one file (the caller owns cleanup on failure).
        quant: llama.cpp type name, e.g. ``Q4_K_M``.
        threads: quantizer threads (None: all cores).
        allow_requantize: permit an already quantized input (loses more precision).
        copy_only: copy every tensor as it is (``quant`` is then the input's own type):
            how a split GGUF becomes one file without any loss.

    Raises:
        OSError: llama.cpp reported a failure (a full disk, an unsupported type...).
    """
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype(quant)
    params.nthread = threads or usable_cores()
    params.allow_requantize = allow_requantize
    params.only_copy = copy_only
    if copy_only:
        log.info("joining %s's split files into one GGUF (tensors copied as they are)",
                 src.name)
    else:
        log.info("quantizing %s to %s with llama.cpp (%d threads)", src.name, quant,
                 params.nthread)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        free = _free_bytes(dst.parent)
        raise OSError(f"llama.cpp could not quantize {src.name} to {quant} (rc={rc}); its "
                      f"log above says why (a full disk: {free / 2**30:.1f} GiB free in "
                      f"{dst.parent}; some IQ types need an importance matrix)")


def _free_bytes(folder: Path) -> int:
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize
