"""bridge: lossless self-speculative decoding for llama.cpp models.

The exporter (``exporters/``) writes a full GGUF plus a layer-pruned draft GGUF that
shares the full file's quantized bytes; the runtime (``runtime/``) drives both through
llama-cpp-python and emits exactly what the full model alone would.

    import bridge
    with bridge.load("model.gguf") as engine:      # finds model.draft.gguf beside it
        text, tokens, stats = engine.complete("Hello", bridge.GenerationConfig(max_tokens=32))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["__version__", "load", "GenerationConfig", "SamplingConfig", "SpeculativeConfig",
           "RuntimeConfig"]

if TYPE_CHECKING:
    from runtime.engine import Engine


def load(model, draft="auto", **configs) -> Engine:
    """Load ``model`` (and its draft) for generation; see ``runtime.engine.Engine``.

    Args:
        model: the full GGUF: a path, a bundled name or a Hugging Face id
            (``"org/name-GGUF:Q4_K_M"``, downloaded once into the HF cache).
        draft: a draft GGUF (a path or a hub id), ``"auto"`` (``MODEL.draft.gguf``, or the
            draft ``bridge export`` wrote for this model) or None.
        **configs: ``runtime=``, ``speculative=``, ``sampling=`` settings objects.
    """
    from runtime.engine import Engine  # llama.cpp loads only when a model does
    from runtime.models import resolve_gguf

    if draft not in (None, "auto"):
        draft = resolve_gguf(draft, what="draft")
    return Engine(resolve_gguf(model), draft=draft, **configs)


def __getattr__(name: str):
    # the settings dataclasses, re-exported lazily for `bridge.GenerationConfig(...)`
    if name in ("GenerationConfig", "SamplingConfig", "SpeculativeConfig", "RuntimeConfig"):
        from runtime import config

        return getattr(config, name)
    raise AttributeError(f"module 'bridge' has no attribute {name!r}")
