"""A Hugging Face tokenizer as llama.cpp vocabulary metadata.

Three kinds, chosen from the files present (as llama.cpp's convert_hf_to_gguf.py does):

- ``tokenizer.model`` (SentencePiece: Gemma, Llama 2, Mistral v0.1): llama.cpp model "llama";
- a ``tokenizer.json`` BPE with byte fallback (SentencePiece converted to HF): "llama";
- a byte-level BPE ``tokenizer.json`` (Llama 3, SmolLM, Qwen): llama.cpp model "gpt2" with a
  named pre-tokenizer. llama.cpp cannot read HF's pre-tokenizer description, so the name is
  found the way llama.cpp's converter finds it: tokenize a fixed check string and look the
  hash of the ids up in a table of known tokenizers.

Whether BOS/EOS are added is taken from what the HF tokenizer actually does, not from
config flags, so llama.cpp adds exactly the tokens HF adds.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import gguf

log = logging.getLogger(__name__)

# llama.cpp's check string (convert_hf_to_gguf.py, get_vocab_base_pre): it exercises
# whitespace runs, emoji, digits, CJK, Khmer, Cyrillic, quotes and contractions.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) "
    "\U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 "
    "\U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
    "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a"
    "\u0438 ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256(str(ids of CHECK_TEXT)) -> llama.cpp pre-tokenizer name, for the tokenizers of the
# architectures bridge converts (values from llama.cpp's convert_hf_to_gguf.py).
PRE_TOKENIZERS: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}

# Added tokens some models forget to flag as special (llama.cpp's does_token_look_special).
_SPECIAL_LOOKING = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")


@dataclass
class Vocab:
    """Everything llama.cpp needs to tokenize like the HF tokenizer."""

    model: str  # llama.cpp tokenizer model: "gpt2" or "llama"
    pre: str  # pre-tokenizer name
    tokens: list[str | bytes]
    toktypes: list[int]
    special: gguf.SpecialVocab
    scores: list[float] | None = None
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool | None = None


def load_vocab(folder: Path, n_vocab: int, sentencepiece_space_prefix: bool = True) -> Vocab:
    """Read the tokenizer in ``folder``; ``n_vocab`` is the model's embedding row count.

    Args:
        folder: the Hugging Face model folder.
        n_vocab: rows of the embedding matrix; BPE vocabularies are padded to it.
        sentencepiece_space_prefix: whether SentencePiece adds a leading space (Gemma: no).
    """
    tok = _hf_tokenizer(folder)
    if (folder / "tokenizer.model").is_file():
        vocab = _sentencepiece_vocab(folder, n_vocab)
        if vocab.add_space_prefix is None:  # the model file did not say
            vocab.add_space_prefix = sentencepiece_space_prefix
    elif _is_byte_fallback_bpe(folder):
        vocab = _llama_hf_vocab(folder)
    else:
        vocab = _bpe_vocab(tok, folder, n_vocab)
    _set_add_special_from_behaviour(tok, vocab)
    return vocab


def write_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.toktypes)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.remove_extra_whitespaces is not None:
        writer.add_remove_extra_whitespaces(vocab.remove_extra_whitespaces)
    vocab.special.add_to_gguf(writer, quiet=True)


def verify_tokenizer(gguf_path: Path, folder: Path) -> bool:
    """True when llama.cpp, reading ``gguf_path``, tokenizes a varied check text exactly
    as the HF tokenizer in ``folder`` does (special tokens, BOS/EOS included)."""
    from runtime.context import LlamaModel

    text = CHECK_TEXT + "\nThe year 1969: def f(x):\n    return x ** 2  # ok? Ünïcödé!"
    expected = _hf_tokenizer(folder).encode(text)
    with LlamaModel(gguf_path, vocab_only=True) as model:
        got = model.tokenize(text, add_special=True, parse_special=True)
    if got != expected:
        first = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False))
                      if a != b),
                     min(len(got), len(expected)))
        log.warning("llama.cpp tokenizes differently from the HF tokenizer from token %d "
                    "on (%d vs %d tokens); outputs may differ slightly", first, len(got),
                    len(expected))
    return got == expected


def _hf_tokenizer(folder: Path):
    """The folder's tokenizer, as ``AutoTokenizer`` would build it.

    The class named in tokenizer_config.json is loaded directly when transformers has it:
    that is the class ``AutoTokenizer`` picks, and going through ``AutoTokenizer`` itself
    imports torch (~330 MiB resident) into a conversion that never needs it.
    """
    import transformers

    name = _tokenizer_config(folder).get("tokenizer_class")
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoTokenizer
    try:
        return cls.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the tokenizer in {folder}: {e}") from None


def _tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        raise ValueError(
            f"this tokenizer's BPE pre-tokenizer is not one bridge knows (check hash "
            f"{digest[:16]}...); known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}"
        )
    return name


def _bpe_vocab(tok, folder: Path, n_vocab: int) -> Vocab:
    pre = pre_tokenizer_name(tok)
    by_id = {i: t for t, i in tok.get_vocab().items()}
    if max(by_id) >= n_vocab:
        raise ValueError(f"tokenizer has id {max(by_id)} but the model has {n_vocab} rows")
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens: list[str | bytes] = []
    toktypes: list[int] = []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:  # embedding rows with no token
            tokens.append(f"[PAD{i}]")
            toktypes.append(gguf.TokenType.UNUSED)
        elif text in added:
            # llama.cpp matches added tokens on normalized text, so store them normalized
            if not decoder[i].normalized:
                text = tok.decode(tok.encode(text, add_special_tokens=False))
            if decoder[i].special or _looks_special(text):
                toktypes.append(gguf.TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                toktypes.append(gguf.TokenType.USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(text)
            toktypes.append(gguf.TokenType.NORMAL)
    special = gguf.SpecialVocab(folder, load_merges=True)
    # byte-level BPE encodes spaces itself; llama.cpp's default for "gpt2", made explicit
    return Vocab("gpt2", pre, tokens, toktypes, special, add_space_prefix=False)


def _sentencepiece_vocab(folder: Path, n_vocab: int) -> Vocab:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(folder / "tokenizer.model"))
    size = min(sp.vocab_size(), n_vocab)
    tokens: list[str | bytes] = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    toktypes = [int(gguf.TokenType.UNUSED)] * n_vocab
    proto = _sp_proto(folder / "tokenizer.model")
    for i in range(size):
        tokens[i] = sp.IdToPiece(i).encode()
        scores[i] = sp.GetScore(i)
        # the model file's own piece types (they include USER_DEFINED: pieces matched whole
        # before the merges, like Gemma's turn markers); without protobuf, the processor's
        toktypes[i] = (_SP_TYPES.get(proto.pieces[i].type, gguf.TokenType.NORMAL)
                       if proto is not None else _sp_type(sp, i))
    for i, entry in _added_tokens_decoder(folder).items():
        if i >= n_vocab:
            continue
        text: str = entry["content"]
        if entry.get("special") or _looks_special(text):
            toktypes[i] = gguf.TokenType.CONTROL
        else:
            text = text.replace("\u2581", " ")  # llama.cpp expects user tokens pre-normalized
            toktypes[i] = gguf.TokenType.USER_DEFINED
        tokens[i] = text.encode()
        scores[i] = -1000.0
    special = gguf.SpecialVocab(folder, n_vocab=n_vocab)
    vocab = Vocab("llama", "default", tokens, toktypes, special, scores=scores)
    if proto is not None:  # llama.cpp must prepend a space and squeeze runs as SP does
        vocab.add_space_prefix = proto.normalizer_spec.add_dummy_prefix
        vocab.remove_extra_whitespaces = proto.normalizer_spec.remove_extra_whitespaces
    return vocab


# SentencePiece ModelProto.SentencePiece.Type -> llama.cpp token type
_SP_TYPES = {1: gguf.TokenType.NORMAL, 2: gguf.TokenType.UNKNOWN, 3: gguf.TokenType.CONTROL,
             4: gguf.TokenType.USER_DEFINED, 5: gguf.TokenType.UNUSED, 6: gguf.TokenType.BYTE}


def _sp_proto(path: Path):
    """The parsed tokenizer.model, or None without protobuf (then the normalizer settings
    fall back to the architecture's convention)."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except (ImportError, TypeError):  # no protobuf, or one too old for the generated code
        return None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return proto


def _sp_type(sp, i: int) -> int:
    if sp.IsUnknown(i):
        return gguf.TokenType.UNKNOWN
    if sp.IsControl(i):
        return gguf.TokenType.CONTROL
    if sp.IsUnused(i):
        return gguf.TokenType.UNUSED
    if sp.IsByte(i):
        return gguf.TokenType.BYTE
    return gguf.TokenType.NORMAL


def _llama_hf_vocab(folder: Path) -> Vocab:
    hf = gguf.LlamaHfVocab(folder)
    tokens, scores, toktypes = [], [], []
    for text, score, toktype in hf.all_tokens():
        tokens.append(text)
        scores.append(score)
        toktypes.append(int(toktype))
    special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
    return Vocab("llama", "default", tokens, toktypes, special, scores=scores)


def _is_byte_fallback_bpe(folder: Path) -> bool:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{folder} has neither tokenizer.model nor tokenizer.json")
    model = json.loads(path.read_text(encoding="utf-8")).get("model", {})
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _added_tokens_decoder(folder: Path) -> dict[int, dict]:
    decoder = _tokenizer_config(folder).get("added_tokens_decoder", {})
    return {int(i): entry for i, entry in decoder.items()}


def _looks_special(text: str) -> bool:
    return (text in _SPECIAL_LOOKING
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _set_add_special_from_behaviour(tok, vocab: Vocab) -> None:
    """Set add_bos/add_eos to what the HF tokenizer really does on a plain text."""
    plain = tok.encode("a", add_special_tokens=False)
    full = tok.encode("a", add_special_tokens=True)
    ids = vocab.special.special_token_ids
    add_bos = len(full) > len(plain) and full[0] == ids.get("bos", tok.bos_token_id)
    add_eos = len(full) > len(plain) and full[-1] == ids.get("eos", tok.eos_token_id)
    for kind, value in (("bos", add_bos), ("eos", add_eos)):
        declared = vocab.special.add_special_token.get(kind)
        if declared is not None and declared != value:
            log.info("tokenizer config says add_%s_token=%s but the tokenizer %s it; "
                     "writing what it does", kind, declared, "adds" if value else "omits")
        vocab.special.add_special_token[kind] = value
