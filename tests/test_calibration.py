"""Calibration prompts: files, the held-out split, chat formatting, cached references."""

from __future__ import annotations

import pytest

from exporters import calibration as cal
from exporters.calib_prompts import CALIB_PROMPTS
from runtime.prompts_file import read_prompts


@pytest.mark.parametrize("name, text, expected", [
    ("p.txt", "first\n\n  second  \n", ["first", "second"]),  # blank lines skipped
    ("p.jsonl", '{"prompt": "a"}\n\n{"prompt": "b", "x": 1}\n', ["a", "b"]),
])
def test_read_prompts(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    assert read_prompts(path) == expected
    assert cal.load_prompts(path) == expected  # --calib FILE


def test_load_prompts_defaults_to_the_builtin_set():
    assert cal.load_prompts(None) == [text for _, text in CALIB_PROMPTS]


@pytest.mark.parametrize("name, content, match", [
    ("empty.txt", "\n  \n", "holds no prompt"),
    ("bad.jsonl", "not json\n", "line 1 is not JSON"),
    ("nofield.jsonl", '{"text": "a"}\n', "no string \"prompt\""),
    ("binary.txt", b"\xff\xfe\x00bad", "cannot read"),  # not UTF-8
    ("missing.txt", None, "cannot read"),
])
def test_bad_prompt_files(tmp_path, name, content, match):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_prompts(path)


def test_split_holdout():
    prompts = [f"p{i}" for i in range(8)]
    calib, held = cal.split_holdout(prompts)
    assert held == ["p3", "p7"] and calib == ["p0", "p1", "p2", "p4", "p5", "p6"]
    assert cal.split_holdout(["a"]) == (["a"], ["a"])  # one prompt serves both
    assert cal.split_holdout(["a", "b"]) == (["a"], ["b"])


def test_builtin_prompts_cover_every_kind_on_both_sides():
    kinds = {k for k, _ in CALIB_PROMPTS}
    idx = {k: [i % cal.HOLDOUT_EVERY == cal.HOLDOUT_EVERY - 1
               for i, (kk, _) in enumerate(CALIB_PROMPTS) if kk == k] for k in kinds}
    assert kinds >= {"chat", "code", "math", "prose", "languages"}
    assert all(any(v) and not all(v) for v in idx.values())


def test_until_eos():
    assert cal._until_eos([5, 6, 2, 7], 2) == [5, 6, 2]
    assert cal._until_eos([5, 6], [2, 3]) == [5, 6]


def test_format_prompt_uses_the_chat_template(smollm2_hf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    text = tok.decode(cal.format_prompt(tok, "Hello?"))
    assert "<|im_start|>user\nHello?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


# --- the continuations llama.cpp writes (parallel sequences of one context) -------------

_PROMPTS = ["Write a haiku about autumn rain.", "What is 17 times 23?", "def fibonacci(n):",
            "Name three primary colours."]
# a near-tie: rows evaluated in a batch take other kernels than one row, so a batched
# greedy token may be the teacher-forced runner-up by rounding. The bound is in logits:
# both kernels differ by far less.
_NEAR_TIE = 0.05


def _tokenized(path):
    from runtime.context import LlamaModel

    with LlamaModel(path, vocab_only=True) as m:
        return [m.tokenize(p) for p in _PROMPTS]


def test_one_prompt_continues_as_one_by_one_greedy_decoding(smollm2_gguf):
    import numpy as np

    from runtime.context import LlamaContext, LlamaModel

    ids = _tokenized(smollm2_gguf)[0]
    with cal.open_llamacpp(smollm2_gguf) as llama:
        (cont,) = cal.llamacpp_continuations(llama, [ids], 24, threads=1)
    with LlamaModel(smollm2_gguf, repack=False) as m, LlamaContext(m, 256, n_threads=1) as c:
        first = int(np.argmax(c.eval(ids)[-1]))
        expected = [first] + c.greedy_native(first, 23, m.is_eog)[0]
    assert cont == expected


def test_row_seconds_times_a_prefill_and_leaves_the_model_usable(smollm2_gguf):
    ids = _tokenized(smollm2_gguf)[0]
    with cal.open_llamacpp(smollm2_gguf) as m:
        per_row = cal.llamacpp_row_seconds(m, ids, threads=1)
        # the same open model then writes a continuation
        (cont,) = cal.llamacpp_continuations(m, [ids], 4, threads=1)
    assert 0 < per_row < 1.0  # a 135M model's prefill row: well under a second
    assert len(cont) >= 1


def test_parallel_continuations_are_each_the_models_own_greedy_text(smollm2_gguf):
    import numpy as np

    from runtime.context import LlamaContext, LlamaModel

    prompts, n_new, seen = _tokenized(smollm2_gguf), 20, []
    with cal.open_llamacpp(smollm2_gguf) as llama:
        conts = cal.llamacpp_continuations(llama, prompts, n_new, 1, seen.append)
    assert sum(seen) == cal.generation_rows(prompts, n_new)  # the progress bar ends full
    with LlamaModel(smollm2_gguf, repack=False) as m, LlamaContext(m, 256, n_threads=1) as c:
        for ids, cont in zip(prompts, conts, strict=True):
            # n_new tokens, or fewer ending at the first end-of-generation token
            assert len(cont) == n_new or (m.is_eog(cont[-1]) and len(cont) < n_new)
            assert not any(m.is_eog(t) for t in cont[:-1])
            c.reset()
            logits = np.array(c.eval(ids + cont[:-1], all_logits=True)[len(ids) - 1:])
            chosen = logits[np.arange(len(cont)), cont]
            assert np.all(chosen >= logits.max(-1) - _NEAR_TIE)  # teacher-forced argmax
