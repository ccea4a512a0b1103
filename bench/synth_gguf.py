"""Write a random-weight llama GGUF of a given shape (default: Llama-3-8B's), Q4_0, with
SmolLM2's vocabulary, tokenizer and chat template, for measuring export time and memory
at size.

    python -m bench.synth_gguf bench/work/synth-4096x32-Q4_0.gguf
    python -m bench.synth_gguf small.gguf --hidden 2048 --layers 16 --ffn 5632

Weights are random Q4_0 blocks written straight as bytes (a fixed fp16 scale, uniform
4-bit values: weights uniform on [-8, 7] x scale), one tensor at a time, so the script
needs about one FFN matrix of memory (33 MiB at 8B) and writes at disk speed. Random
weights make the chosen layers meaningless; the time and memory of an export are real.
The file is written to a temporary name and renamed when complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from bench.common import arg_parser
from exporters import testmodels

Q4_0 = gguf.GGMLQuantizationType.Q4_0
BLOCK, BLOCK_BYTES = gguf.GGML_QUANT_SIZES[Q4_0]  # 32 weights in 2 + 16 bytes
# scale 0.003: a weight's standard deviation is about 0.003 x 4.6 = 0.014, near the
# 1/sqrt(4096) of a trained 8B layer, so hidden states stay finite through 32 layers
SCALE = np.float16(0.003).tobytes()


def q4_0(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random Q4_0 bytes [rows, cols / 32 x 18]."""
    blocks = rng.integers(0, 256, size=(rows, cols // BLOCK, BLOCK_BYTES), dtype=np.uint8)
    blocks[:, :, :2] = np.frombuffer(SCALE, dtype=np.uint8)
    return blocks.reshape(rows, -1)


def tensors(hidden: int, layers: int, ffn: int, heads: int, kv_heads: int, vocab: int):
    """(name, rows, cols) of a llama in file order; cols 0 marks a 1-D F32 norm."""
    kv = hidden // heads * kv_heads
    yield "token_embd.weight", vocab, hidden
    for i in range(layers):
        for name, rows, cols in (("attn_norm", hidden, 0), ("attn_q", hidden, hidden),
                                 ("attn_k", kv, hidden), ("attn_v", kv, hidden),
                                 ("attn_output", hidden, hidden), ("ffn_norm", hidden, 0),
                                 ("ffn_gate", ffn, hidden), ("ffn_up", ffn, hidden),
                                 ("ffn_down", hidden, ffn)):
            yield f"blk.{i}.{name}.weight", rows, cols
    yield "output_norm.weight", hidden, 0
    yield "output.weight", vocab, hidden


def write(out: Path, hidden: int, layers: int, ffn: int, heads: int, kv_heads: int,
          tokenizer_from: Path, seed: int = 0) -> None:
    src = gguf.GGUFReader(tokenizer_from)
    vocab = len(src.fields[gguf.Keys.Tokenizer.LIST].data)
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(f"synthetic-{hidden}x{layers}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_context_length(8192)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    for key, field in src.fields.items():  # SmolLM2's tokenizer and chat template
        if key.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), vtype, sub)
    shapes = list(tensors(hidden, layers, ffn, heads, kv_heads, vocab))
    for name, rows, cols in shapes:
        if cols:
            w.add_tensor_info(name, (rows, cols // BLOCK * BLOCK_BYTES), np.dtype(np.uint8),
                              rows * cols // BLOCK * BLOCK_BYTES, raw_dtype=Q4_0)
        else:
            w.add_tensor_info(name, (rows,), np.dtype(np.float32), rows * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _name, rows, cols in shapes:
        w.write_tensor_data(q4_0(rng, rows, cols) if cols else np.ones(rows, np.float32))
    w.close()
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> None:
    p = arg_parser(__spec__.name, __doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    a = p.parse_args(argv)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    write(a.out, a.hidden, a.layers, a.ffn, a.heads, a.kv_heads,
          testmodels.fetch_gguf(testmodels.SMOLLM2))
    n = sum(r * max(c, 1) for _, r, c in tensors(a.hidden, a.layers, a.ffn, a.heads,
                                                  a.kv_heads, 49152))
    print(f"{a.out}: about {n / 1e9:.2f} B parameters, {a.out.stat().st_size / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
