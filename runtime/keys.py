"""GGUF metadata keys that bridge writes into a draft, and the draft's file suffix.

They live in runtime/ because the runtime reads them and must not import the exporter.

Only string constants live here, so any reader (the runtime included) can import this
module without pulling in torch, transformers or the rest of the exporter. llama.cpp exposes
these keys through ``llama_model_meta_val_str`` like any other metadata.
"""

# Original (full-model) indices of the layers the draft keeps, ascending: uint32 array.
KEPT_LAYERS = "bridge.kept_layers"
# Fraction of the full model's layers that were dropped: float32.
PRUNE_RATIO = "bridge.prune_ratio"
# How the dropped layers were chosen ("even" placeholder rule, "manual" list, ...): string.
METHOD = "bridge.method"
# bridge version that wrote the draft: string.
VERSION = "bridge.version"
# sha256 (hex) of the whole full GGUF file this draft was cut from: string.
TARGET_SHA256 = "bridge.target_sha256"
# block_count of the full model: uint32.
TARGET_BLOCK_COUNT = "bridge.target_block_count"

# The runtime finds a draft beside its full model: "<stem>.gguf" -> "<stem>.draft.gguf".
FULL_SUFFIX = ".gguf"
DRAFT_SUFFIX = ".draft.gguf"
