"""Model hyperparameters from a Hugging Face config, written as llama.cpp GGUF metadata.

Supported: llama (Llama 2/3, SmolLM, and Mistral, which llama.cpp runs as llama), qwen2,
qwen3 and gemma3 (text). The values follow llama.cpp's convert_hf_to_gguf.py, so the file
loads in llama.cpp exactly like one made by llama.cpp's own converter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

A = gguf.MODEL_ARCH
# config.json "architectures" entry -> llama.cpp architecture
ARCHITECTURES: dict[str, gguf.MODEL_ARCH] = {
    "LlamaForCausalLM": A.LLAMA,
    "MistralForCausalLM": A.LLAMA,
    "Qwen2ForCausalLM": A.QWEN2,
    "Qwen3ForCausalLM": A.QWEN3,
    "Gemma3ForCausalLM": A.GEMMA3,
    "Gemma3ForConditionalGeneration": A.GEMMA3,  # its text model only
}


@dataclass(frozen=True)
class ModelShape:
    """The few hyperparameters the tensor converter needs."""

    arch: gguf.MODEL_ARCH
    n_layers: int
    n_head: int
    n_head_kv: int
    head_dim: int
    tied_embeddings: bool
    rope: dict  # rope parameters of the full-attention layers


def detect_arch(raw_config: dict, folder: Path) -> gguf.MODEL_ARCH:
    """The llama.cpp architecture for config.json's ``architectures``; ValueError if none."""
    names = raw_config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    got = ", ".join(names) or f"model_type={raw_config.get('model_type')!r}"
    raise ValueError(f"unsupported architecture {got} in {folder}; bridge converts "
                     f"{', '.join(ARCHITECTURES)}")


def text_config(folder: Path):
    """The (text) model config, normalized by transformers (defaults, rope parameters)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True).get_text_config()
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"transformers cannot read {folder / 'config.json'}: {e}") from None


def model_shape(arch: gguf.MODEL_ARCH, cfg) -> ModelShape:
    n_head = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    return ModelShape(
        arch=arch,
        n_layers=cfg.num_hidden_layers,
        n_head=n_head,
        n_head_kv=getattr(cfg, "num_key_value_heads", None) or n_head,
        head_dim=head_dim,
        tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        rope=_rope_params(arch, cfg),
    )


def _rope_params(arch: gguf.MODEL_ARCH, cfg) -> dict:
    params = getattr(cfg, "rope_parameters", None) or {
        "rope_theta": getattr(cfg, "rope_theta", 10000.0), "rope_type": "default"}
    if arch == A.GEMMA3:  # one set per attention type; the global layers' set is the main one
        params = params.get("full_attention", params)
    return dict(params)


def write_hparams(writer: gguf.GGUFWriter, shape: ModelShape, cfg, file_type: int,
                  name: str, n_vocab: int) -> None:
    """Write the architecture's hyperparameters (names from gguf-py's ``Keys``)."""
    w = writer
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_block_count(shape.n_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_head_kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(n_vocab)
    if shape.head_dim != cfg.hidden_size // shape.n_head or shape.arch == A.GEMMA3:
        w.add_key_length(shape.head_dim)
        w.add_value_length(shape.head_dim)
    if shape.arch == A.LLAMA:
        w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(float(shape.rope.get("rope_theta", 10000.0)))
    _write_rope_scaling(w, shape)
    if shape.arch == A.GEMMA3:
        _write_gemma3(w, cfg)


def _write_rope_scaling(w: gguf.GGUFWriter, shape: ModelShape) -> None:
    rope = shape.rope
    kind = (rope.get("rope_type") or "default").lower()
    if kind == "default":
        return
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        if "original_max_position_embeddings" in rope:
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif kind == "llama3" and shape.arch == A.LLAMA:
        pass  # carried by the rope_freqs tensor (llama3_rope_factors)
    else:
        raise ValueError(f"rope scaling type {kind!r} is not supported for {shape.arch.name}")


def _write_gemma3(w: gguf.GGUFWriter, cfg) -> None:
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        raise ValueError("Gemma 3 with attn_logit_softcapping is not supported by llama.cpp")
    if softcap := getattr(cfg, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(float(softcap))
    local = (getattr(cfg, "rope_parameters", None) or {}).get("sliding_attention")
    if local:
        w.add_rope_freq_base_swa(float(local["rope_theta"]))
    # Written per layer so that nothing depends on llama.cpp's built-in period of 6; a draft
    # keeps each layer's own entry. llama.cpp wants at least one sliding layer when a
    # window is set, so a model with none gets no window at all.
    layer_types = getattr(cfg, "layer_types", None) or []
    sliding = [t == "sliding_attention" for t in layer_types]
    if any(sliding) and getattr(cfg, "sliding_window", None):
        w.add_sliding_window(int(cfg.sliding_window))
        w.add_sliding_window_pattern(sliding)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray | None:
    """Per-frequency RoPE divisors for Llama 3.1+ ("llama3" scaling), or None.

    Frequencies with a wavelength shorter than ``old_ctx / high_freq_factor`` keep their
    value, longer than ``old_ctx / low_freq_factor`` are divided by ``factor``, and those in
    between blend smoothly; llama.cpp reads the divisors from the ``rope_freqs`` tensor.
    """
    if (rope.get("rope_type") or "").lower() != "llama3":
        return None
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    lo = float(rope.get("low_freq_factor", 1.0))
    hi = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old_ctx / hi, 1.0, np.where(wavelen > old_ctx / lo, factor, blended))
    return out.astype(np.float32)
