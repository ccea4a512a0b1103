"""HF folders whose tokenizer is a SentencePiece ``tokenizer.model`` (Llama 2, Gemma).

No such checkpoint can be downloaded here, so each test trains a small SentencePiece BPE
model with the settings of the real family (byte fallback, split digits, identity
normalization; a leading space for Llama 2, none for Gemma), puts it in a folder with a
tiny random model of that family, exports it with bridge, and checks that llama.cpp
tokenizes as both SentencePiece itself and the HF tokenizer do, and that the model runs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.context import LlamaContext, LlamaModel
from tests.conftest import SAMPLE_TEXT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
pytest.importorskip("google.protobuf")

from exporters.convert import convert_hf  # noqa: E402
from exporters.tokenizer import CHECK_TEXT  # noqa: E402

TEXT = (SAMPLE_TEXT + "\n" + CHECK_TEXT + "\n  leading spaces,\ttabs, 1234567 and ümlauts "
        "and \u4f60\u597d\u4e16\u754c")
_CORPUS = (SAMPLE_TEXT + " The quick brown fox jumps over the lazy dog. 0123456789 "
           "def main():\n    return 42\n" + "Der schnelle braune Fuchs. Le renard brun. ") * 20

# family -> (model config class, model class, tokenizer class, SentencePiece settings,
#            special pieces, extra model config)
FAMILIES = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", "LlamaTokenizer",
               dict(add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1),
               dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"), {}),
    "gemma": ("Gemma3TextConfig", "Gemma3ForCausalLM", "GemmaTokenizer",
              dict(add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                   pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
                   user_defined_symbols=["<start_of_turn>", "<end_of_turn>"]),
              dict(bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"),
              dict(num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                   query_pre_attn_scalar=32, sliding_window=16,
                   layer_types=["sliding_attention", "full_attention"])),
}


def _train(folder, settings: dict) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS.splitlines()), model_prefix=str(folder / "sp"),
        vocab_size=600, model_type="bpe", byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, allow_whitespace_only_pieces=True, minloglevel=2, **settings)
    (folder / "sp.model").rename(folder / "tokenizer.model")
    (folder / "sp.vocab").unlink()


@pytest.fixture(scope="module", params=list(FAMILIES))
def sp_folder(request, tmp_path_factory):
    family = request.param
    config_cls, model_cls, tok_cls, settings, specials, extra = FAMILIES[family]
    folder = tmp_path_factory.mktemp(family)
    _train(folder, settings)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{
        **dict(vocab_size=sp.vocab_size(), hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=1024, bos_token_id=sp.bos_id(),
               eos_token_id=sp.eos_id()), **extra})
    getattr(transformers, model_cls)(config).save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": tok_cls, "add_bos_token": True, "add_eos_token": False,
         **specials}))
    out = folder / f"{family}-F32.gguf"
    convert_hf(folder, out, "F32", family)
    return family, folder, out, sp


def test_llama_cpp_tokenizes_like_sentencepiece_and_hf(sp_folder):
    family, folder, out, sp = sp_folder
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    with LlamaModel(out, vocab_only=True) as model:
        plain = model.tokenize(TEXT, add_special=False, parse_special=False)
        assert plain == sp.encode(TEXT)  # the ground truth: SentencePiece itself
        assert model.tokenize(TEXT, add_special=True, parse_special=True) == hf(TEXT)["input_ids"]
        assert model.tokenize(TEXT, add_special=True, parse_special=True)[0] == sp.bos_id()
        if family == "gemma":  # user-defined control pieces are parsed as one token
            turn = model.tokenize("<start_of_turn>user", add_special=False, parse_special=True)
            assert turn[0] == sp.piece_to_id("<start_of_turn>")


def test_space_prefix_follows_the_model_file(sp_folder):
    family, _, out, _ = sp_folder
    import gguf

    fields = gguf.GGUFReader(out).fields
    assert fields[gguf.Keys.Tokenizer.ADD_PREFIX].contents() is (family == "llama2")
    assert fields[gguf.Keys.Tokenizer.MODEL].contents() == "llama"


def test_sentencepiece_model_runs(sp_folder):
    _, folder, out, sp = sp_folder
    ids = sp.encode(SAMPLE_TEXT)[:48]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].double().numpy()
    with LlamaModel(out) as m, LlamaContext(m, n_ctx=256, n_threads=1) as ctx:
        ours = np.array(ctx.eval(ids, all_logits=True), dtype=np.float64)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
    assert np.abs(ours - ref).max() < 0.05
