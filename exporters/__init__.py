"""bridge's exporter: load a causal LM in PyTorch, score its layers, write the full GGUF
and the layer-pruned draft GGUF, and report the scores."""
