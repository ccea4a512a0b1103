"""Hugging Face checkpoint -> F32/F16/BF16 GGUF, written with gguf-py, one tensor at a time.

Two passes keep memory flat: the first reads only safetensors headers and plans every
output tensor (name, shape, type); the header and tensor index are written from that plan;
the second pass loads, converts and writes one tensor at a time. So at most one tensor is
in memory (plus its converted copy), never a second copy of the model. Tensors are read
with numpy (``exporters.checkpoint``): torch is never imported here.

The layout follows llama.cpp's own converter (convert_hf_to_gguf.py):
- llama-family Q/K rows are permuted from HF's rotate-half RoPE layout to llama.cpp's;
- Gemma stores RMSNorm weights as ``w`` and computes ``x * (1 + w)``; llama.cpp computes
  ``x * w``, so norm weights are written as ``1 + w``;
- 1-D tensors (norms, biases) stay F32; a tied output head is not written (llama.cpp
  reuses the token embedding).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import quantize

from exporters import hparams as hp
from exporters.checkpoint import TensorEntry, tensor_index
from exporters.loading import read_hf_config
from exporters.tokenizer import load_vocab, write_vocab

log = logging.getLogger(__name__)

T = gguf.MODEL_TENSOR
QT = gguf.GGMLQuantizationType
# output type name -> (ggml type of its 2-D tensors, llama file type)
OUT_TYPES: dict[str, tuple[QT, int]] = {
    "F32": (QT.F32, gguf.LlamaFileType.ALL_F32),
    "F16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
# ggml type -> bytes per element of the written array
_ITEMSIZE = {QT.F32: 4, QT.F16: 2, QT.BF16: 2}
# Checkpoint tensors with no place in a text GGUF.
_SKIP_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                  "model.multi_modal_projector.")
_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class _Planned:
    """One output tensor: where it comes from and what it becomes."""

    name: str
    shape: tuple[int, ...]  # numpy order
    qtype: QT
    load: Callable[[], np.ndarray]  # float32 array, already transformed


def convert_hf(folder: Path, out: Path, out_type: str, name: str) -> int:
    """Write the checkpoint in ``folder`` as an ``out_type`` GGUF at ``out``.

    Args:
        folder: Hugging Face model folder (config.json, *.safetensors, tokenizer).
        out: the GGUF to write (the caller owns cleanup on failure).
        out_type: "F32", "F16" or "BF16".
        name: written as ``general.name``.

    Returns:
        The model's layer count.
    """
    qtype, file_type = OUT_TYPES[out_type]
    arch = hp.detect_arch(read_hf_config(folder), folder)
    cfg = hp.text_config(folder)
    shape = hp.model_shape(arch, cfg)
    files = tensor_index(folder)
    n_vocab = _embedding_rows(files)
    vocab = load_vocab(folder, n_vocab, sentencepiece_space_prefix=arch != hp.A.GEMMA3)
    plan = _plan(files, shape, len(vocab.tokens), qtype)

    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])
    hp.write_hparams(writer, shape, cfg, int(file_type), name, len(vocab.tokens))
    write_vocab(writer, vocab)
    del vocab  # the token lists are in the writer now
    for p in plan:
        nbytes = int(np.prod(p.shape)) * _ITEMSIZE[p.qtype]
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), nbytes,
                               raw_dtype=p.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for p in plan:
        writer.write_tensor_data(_encode(p.load(), p.qtype))
    writer.close()
    log.info("converted %s (%s, %d layers, %d tensors) to %s", name, arch.name,
             shape.n_layers, len(plan), out_type)
    return shape.n_layers


def intermediate_type(folder: Path) -> str:
    """The float type to convert to before quantizing: BF16 for a bfloat16 checkpoint
    (F16 could overflow its range), else F16."""
    files = tensor_index(folder)
    name = next((n for n in files if n.endswith("embed_tokens.weight")), next(iter(files)))
    return "BF16" if files[name].dtype == "BF16" else "F16"


def _embedding_rows(files: dict[str, TensorEntry]) -> int:
    name = next((n for n in files if n.endswith("embed_tokens.weight")), None)
    if name is None:
        raise ValueError("the checkpoint has no embed_tokens.weight tensor")
    return files[name].shape[0]


def _plan(files: dict[str, TensorEntry], shape: hp.ModelShape, n_vocab: int, qtype: QT
          ) -> list[_Planned]:
    names = gguf.get_tensor_name_map(shape.arch, shape.n_layers)
    plan: list[_Planned] = []
    for src in files:
        key = _text_name(src)
        if key is None or (key == "lm_head.weight" and shape.tied_embeddings):
            continue
        mapped = names.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ValueError(f"cannot map checkpoint tensor {src!r} to a llama.cpp "
                             f"{shape.arch.name} tensor")
        kind, gguf_name = mapped
        dims = files[src].shape
        if kind in (T.TOKEN_EMBD, T.OUTPUT):  # rows beyond the vocabulary are never used
            dims = (min(dims[0], n_vocab), *dims[1:])
        transform = _transform(shape, kind, key, dims)
        plan.append(_Planned(gguf_name, dims, QT.F32 if len(dims) == 1 else qtype,
                             _loader(files[src], transform)))
    factors = hp.llama3_rope_factors(shape.rope, shape.head_dim)
    if factors is not None:
        plan.append(_Planned(gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight", factors.shape,
                             QT.F32, lambda: factors))
    plan.sort(key=lambda p: _order(p.name))
    return plan


def _text_name(src: str) -> str | None:
    """The text model's tensor name, or None for tensors a text GGUF does not hold."""
    if src.startswith(_SKIP_PREFIXES) or src.endswith(_SKIP_SUFFIXES):
        return None
    # Gemma3ForConditionalGeneration: model.language_model.X / language_model.model.X
    return src.replace("language_model.", "")


def _order(name: str) -> tuple[int, int, str]:
    """token_embd first, then the blocks in order, then the output tensors."""
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith("token_embd") else 2, 0, name)


def _transform(shape: hp.ModelShape, kind: T, key: str, dims: tuple[int, ...]
               ) -> Callable[[np.ndarray], np.ndarray]:
    steps: list[Callable[[np.ndarray], np.ndarray]] = []
    if kind in (T.TOKEN_EMBD, T.OUTPUT):
        steps.append(lambda t: t[: dims[0]])
    if shape.arch == hp.A.LLAMA and kind == T.ATTN_Q:
        steps.append(lambda t: permute_qk(t, shape.n_head))
    if shape.arch == hp.A.LLAMA and kind == T.ATTN_K:
        steps.append(lambda t: permute_qk(t, shape.n_head_kv))
    if shape.arch == hp.A.GEMMA3 and key.endswith("norm.weight"):
        steps.append(lambda t: t + 1.0)

    def apply(t: np.ndarray) -> np.ndarray:
        for step in steps:
            t = step(t)
        return t

    return apply


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp's interleaved RoPE pairs, per head.

    Within each head, HF keeps the first halves of all RoPE pairs, then the second halves;
    llama.cpp's llama kernels expect them interleaved (x0, y0, x1, y1, ...).
    """
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def _loader(entry: TensorEntry, transform: Callable[[np.ndarray], np.ndarray]
            ) -> Callable[[], np.ndarray]:
    return lambda: transform(entry.load())


def _encode(t: np.ndarray, qtype: QT) -> np.ndarray:
    t = np.ascontiguousarray(t, dtype=np.float32)
    if qtype == QT.BF16:  # round to nearest even, as ggml does
        return quantize(t, QT.BF16)
    if qtype == QT.F16:
        return t.astype(np.float16)
    return t
