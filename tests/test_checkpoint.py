"""Safetensors reading without torch: every dtype, shards, damaged files, bf16 rounding."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")

from gguf import GGMLQuantizationType as QT  # noqa: E402

from exporters.checkpoint import read_header, tensor_index  # noqa: E402
from exporters.convert import _encode, intermediate_type  # noqa: E402


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=g) * 3
    return {"model.embed_tokens.weight": base.to(torch.bfloat16),
            "a.f16": base.to(torch.float16), "a.f32": base.clone(),
            "a.i64": torch.arange(6).reshape(2, 3)}


def test_every_dtype_reads_as_torch_does(tensors, tmp_path):
    st.save_file(tensors, tmp_path / "model.safetensors")
    index = tensor_index(tmp_path)
    assert set(index) == set(tensors)
    for name, t in tensors.items():
        got = index[name].load()
        assert got.dtype == np.float32 and got.shape == tuple(t.shape)
        np.testing.assert_array_equal(got, t.float().numpy())
    assert intermediate_type(tmp_path) == "BF16"


def test_shards_follow_the_index(tensors, tmp_path):
    names = sorted(tensors)
    st.save_file({n: tensors[n] for n in names[:2]}, tmp_path / "model-00001.safetensors")
    st.save_file({n: tensors[n] for n in names[2:]}, tmp_path / "model-00002.safetensors")
    weight_map = {n: f"model-0000{1 + (i >= 2)}.safetensors" for i, n in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert {n: e.path.name for n, e in tensor_index(tmp_path).items()} == weight_map
    (tmp_path / "model-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="missing the shard model-00002"):
        tensor_index(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_file_is_a_clear_error(tensors, tmp_path, damage):
    path = tmp_path / "model.safetensors"
    st.save_file(tensors, path)
    data = path.read_bytes()
    path.write_bytes(data[:-8] if damage == "truncate" else b"\xff" * 64)
    with pytest.raises(ValueError, match="re-download"):
        read_header(path)


def test_bf16_encoding_rounds_like_torch():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(1)) * 100
    ours = _encode(x.numpy(), QT.BF16).view(np.int16)
    np.testing.assert_array_equal(ours, x.to(torch.bfloat16).view(torch.int16).numpy())
    np.testing.assert_array_equal(_encode(x.numpy(), QT.F16), x.half().numpy())
