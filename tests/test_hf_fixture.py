"""The SmolLM2 HF fixture (dequantized through transformers) against the GGUF in llama.cpp."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import SAMPLE_TEXT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_fixture_is_a_real_hf_checkpoint(smollm2_hf):
    config = json.loads((smollm2_hf / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert "quantization_config" not in config  # plain float weights, loadable anywhere
    assert (smollm2_hf / "model.safetensors").stat().st_size > 500e6  # float32
    assert (smollm2_hf / "tokenizer.json").is_file()


def test_same_token_ids(hf_model, smollm2):
    tok, _ = hf_model
    hf_ids = tok(SAMPLE_TEXT)["input_ids"]
    assert hf_ids == smollm2.tokenize(SAMPLE_TEXT, add_special=True, parse_special=True)


def test_close_logits(hf_model, smollm2):
    """llama.cpp runs Q4_1 weights with 8-bit activations; PyTorch runs the same weights
    dequantized in float32. Expect near-identical distributions, and any top-1 difference
    only where the PyTorch model itself has a near-tie."""
    from runtime.context import LlamaContext

    tok, model = hf_model
    ids = tok(SAMPLE_TEXT)["input_ids"]
    with LlamaContext(smollm2, n_ctx=256, n_threads=1) as ctx:
        ours = np.array(ctx.eval(ids, all_logits=True), dtype=np.float64)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].double().numpy()

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    kl = (np.exp(log_softmax(ref)) * (log_softmax(ref) - log_softmax(ours))).sum(-1)
    assert kl.mean() < 0.02, f"mean KL {kl.mean():.4f}"
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.995
    agree = ours.argmax(-1) == ref.argmax(-1)
    assert agree.mean() >= 0.85, f"top-1 agreement {agree.mean():.3f}"
    for pos in np.flatnonzero(~agree):
        top2 = np.sort(ref[pos])[-2:]
        assert top2[1] - top2[0] < 0.5, f"position {pos}: not a near-tie ({top2})"
