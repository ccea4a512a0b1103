"""ggml's dequantizers (``exporters.dequant``) against gguf-py's, the reference."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from exporters import dequant


def _one_tensor_per_type(reader):
    seen = {}
    for t in reader.tensors:
        seen.setdefault(t.tensor_type, t)
    return list(seen.values())


@pytest.mark.parametrize("model", ["smollm2_reader", "gemma3_reader"])
def test_every_type_of_the_bundled_models_equals_gguf_py_bit_for_bit(model, request):
    tensors = _one_tensor_per_type(request.getfixturevalue(model))
    fast = 0
    for t in tensors:
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        for threads in (1, 3):
            got = dequant.dequantize(t.data, t.tensor_type, threads)
            assert got.dtype == np.float32 and got.shape == want.shape, t.name
            assert got.flags.writeable and got.flags.c_contiguous
            assert np.array_equal(got, want), (t.name, t.tensor_type.name, threads)
        fast += dequant.converter(t.tensor_type) is not None
    # the quantized types go through ggml (the float ones may stay with gguf-py)
    quantized = [t for t in tensors if t.tensor_type not in (
        gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
        gguf.GGMLQuantizationType.BF16)]
    assert quantized and fast >= len(quantized)


def test_row_subsets_and_large_splits(smollm2_reader):
    t = next(t for t in smollm2_reader.tensors
             if t.name == "token_embd.weight")
    rows = np.array([5, 1, 40000, 5], dtype=np.int64)
    assert np.array_equal(dequant.dequantize(t.data[rows], t.tensor_type, 2),
                          gguf.quants.dequantize(t.data[rows], t.tensor_type))
    # the whole 49,152 x 576 table: large enough to be split over threads
    assert np.array_equal(dequant.dequantize(t.data, t.tensor_type, 2),
                          gguf.quants.dequantize(t.data, t.tensor_type))


def test_a_mismatched_table_falls_back_to_gguf_py(smollm2_reader, monkeypatch):
    t = next(t for t in smollm2_reader.tensors
             if t.tensor_type == gguf.GGMLQuantizationType.Q4_1)
    dequant.converter.cache_clear()
    sizes = dict(gguf.GGML_QUANT_SIZES)
    sizes[t.tensor_type] = (32, 99)  # "another ggml": the block bytes disagree
    monkeypatch.setattr(gguf, "GGML_QUANT_SIZES", sizes)
    try:
        assert dequant.converter(t.tensor_type) is None
    finally:
        dequant.converter.cache_clear()
    monkeypatch.undo()
    assert dequant.converter(t.tensor_type) is not None
    assert np.array_equal(dequant.dequantize(t.data, t.tensor_type),
                          gguf.quants.dequantize(t.data, t.tensor_type))
