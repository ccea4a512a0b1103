"""runtime.models: what the runtime's MODEL argument names (hub ids: tests/test_hub.py)."""

from __future__ import annotations

import pytest

from runtime.models import resolve_gguf


def test_a_file_and_a_bundled_name(smollm2_gguf):
    assert resolve_gguf(str(smollm2_gguf)) == smollm2_gguf
    assert resolve_gguf("smollm2") == smollm2_gguf


def test_a_folder_gives_its_model_not_its_draft(tmp_path):
    for name in ("x-Q8_0.gguf", "x-Q4_K_M.gguf", "x-Q4_K_M.draft.gguf", "notes.txt"):
        (tmp_path / name).write_bytes(b"GGUF")
    assert resolve_gguf(tmp_path) == tmp_path / "x-Q4_K_M.gguf"  # llama.cpp's default quant


@pytest.mark.parametrize("files, message", [
    (["config.json", "model.safetensors"], "is a Hugging Face checkpoint, not GGUF: make a "
                                           "GGUF and its draft with `bridge export"),
    (["x.draft.gguf"], "holds no GGUF model file"),
])
def test_a_folder_without_a_model(tmp_path, files, message):
    for name in files:
        (tmp_path / name).write_text("{}")
    with pytest.raises(ValueError, match=message):
        resolve_gguf(tmp_path)


@pytest.mark.parametrize("spec, error, message", [
    ("missing.gguf", FileNotFoundError, "model file not found: missing.gguf"),
    ("./no/such", FileNotFoundError, "model file not found"),
    ("nonsense", FileNotFoundError, "model not found: 'nonsense' is not a .gguf file, a "
                                    "folder, a bundled name or a Hugging Face id"),
    ("  ", ValueError, "the model argument is empty"),
])
def test_nothing_by_that_name(spec, error, message):
    with pytest.raises(error, match=message):
        resolve_gguf(spec)


def test_revision_is_for_hub_ids_only(smollm2_gguf):
    with pytest.raises(ValueError, match="--revision applies to a Hugging Face id"):
        resolve_gguf(str(smollm2_gguf), revision="main")
