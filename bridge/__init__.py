"""bridge: lossless self-speculative decoding for llama.cpp models.

The exporter (``exporters/``) writes a full GGUF plus a layer-pruned draft GGUF that
shares the full file's quantized bytes; the runtime (``runtime/``) drives both through
llama-cpp-python and emits exactly what the full model alone would.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
