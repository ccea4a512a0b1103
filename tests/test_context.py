"""runtime.context on the real SmolLM2 GGUF: tokenizing, evaluating, rolling back."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.context import ContextFullError, LlamaContext


def test_model_metadata(smollm2):
    assert smollm2.n_layer == 30
    assert smollm2.n_vocab == 49152
    assert smollm2.meta("general.architecture") == "llama"
    assert smollm2.meta("no.such.key") is None
    assert "<|im_start|>" in smollm2.chat_template()


def test_tokenize_roundtrip(smollm2):
    from tests.conftest import SAMPLE_TEXT

    ids = smollm2.tokenize(SAMPLE_TEXT, add_special=False, parse_special=True)
    assert len(ids) > 50
    assert smollm2.detokenize(ids, special=True) == SAMPLE_TEXT
    # chat markup is one special token when parsed, several plain tokens when not
    im_start = smollm2.tokenize("<|im_start|>", add_special=False, parse_special=True)
    assert len(im_start) == 1
    assert len(smollm2.tokenize("<|im_start|>", add_special=False, parse_special=False)) > 1
    assert smollm2.is_eog(smollm2.tokenize("<|im_end|>", False, True)[0])
    assert not smollm2.is_eog(ids[0])


def test_eval_rows_and_rollback_are_consistent(smollm2):
    """Logits after a rollback and re-eval equal those of a fresh context."""
    ids = smollm2.tokenize("Once upon a time, in a land far away,", add_special=False)
    with LlamaContext(smollm2, n_ctx=256, n_batch=64, n_threads=1) as ctx:
        all_rows = np.array(ctx.eval(ids, all_logits=True))
        assert all_rows.shape == (len(ids), smollm2.n_vocab)
        assert ctx.n_past == len(ids)
        ctx.truncate(len(ids) - 3)
        again = np.array(ctx.eval(ids[-3:], all_logits=True))
    with LlamaContext(smollm2, n_ctx=256, n_batch=64, n_threads=1) as fresh:
        last = fresh.eval(ids)  # only the last row is computed
        assert last.shape == (1, smollm2.n_vocab)
        assert not last.flags.writeable
        np.testing.assert_allclose(last[0], all_rows[-1], atol=1e-3)
    np.testing.assert_allclose(again, all_rows[-3:], atol=1e-3)


def test_long_input_is_chunked_by_n_batch(smollm2):
    ids = smollm2.tokenize("word " * 150, add_special=False)
    with LlamaContext(smollm2, n_ctx=512, n_batch=32, n_threads=1) as ctx:
        row = np.array(ctx.eval(ids))
        assert ctx.n_past == len(ids) > 32
    with LlamaContext(smollm2, n_ctx=512, n_batch=512, n_threads=1) as one_shot:
        ref = np.array(one_shot.eval(ids))
    # Kernels differ with batch size, so rows are close, not bit-identical.
    assert row.argmax() == ref.argmax()
    assert np.abs(row - ref).max() < 1.5


def test_context_full_and_bad_rollback_raise(smollm2):
    with LlamaContext(smollm2, n_ctx=64, n_batch=64, n_threads=1) as ctx:
        with pytest.raises(ContextFullError, match="exceed the context"):
            ctx.eval([100] * (ctx.n_ctx + 1))
        assert ctx.n_past == 0  # nothing was evaluated
        ctx.eval([100, 101])
        with pytest.raises(ValueError, match="outside"):
            ctx.truncate(5)
        with pytest.raises(ValueError):
            ctx.eval([])


def test_missing_and_invalid_model_files(tmp_path):
    from runtime.context import LlamaModel

    with pytest.raises(FileNotFoundError):
        LlamaModel(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ValueError, match="could not load"):
        LlamaModel(bad)


@pytest.mark.parametrize("which", ["smollm2_gguf", "gemma3_gguf"])
def test_backend_argmax_is_the_argmax_of_the_same_batch(which, request):
    """llama.cpp's in-graph argmax (backend sampling) must choose what numpy's argmax of
    the very same batch's logits chooses, row for row, for the widths verification uses,
    and switching between the two paths in one context must keep the cache intact.
    Both paths see identical batches, so this holds on any CPU (an exact tie of two
    maxima could break it: ggml keeps the last, numpy the first; none occurs here)."""
    from runtime.context import LlamaModel

    with LlamaModel(request.getfixturevalue(which)) as model:
        ids = model.tokenize("The history of science is the story of how people came to "
                             "understand the world, one careful measurement at a time. " * 2, True)
        assert len(ids) >= 25
        with LlamaContext(model, n_ctx=256, n_threads=1) as ctx:
            for width in (1, 2, 3, 5, 9, 17):
                ctx.reset()
                ctx.eval(ids[:8])
                want = np.argmax(np.array(ctx.eval(ids[8:8 + width], all_logits=True)),
                                 axis=1).tolist()
                ctx.truncate(8)
                got = ctx.eval_argmax(ids[8:8 + width], all_rows=True)
                assert ctx.n_past == 8 + width
                assert got == want, f"width {width}: {got} != {want}"
                ctx.truncate(8)
                assert ctx.eval_argmax(ids[8:8 + width]) == want[-1:]
            # back to logits after the argmax path: the same rows as before
            ctx.truncate(8)
            again = np.argmax(np.array(ctx.eval(ids[8:25], all_logits=True)), axis=1)
            assert again.tolist() == want
        with LlamaContext(model, n_ctx=256, n_threads=1, backend_argmax=False) as raw:
            raw.eval(ids[:8])
            assert raw.eval_argmax(ids[8:25], all_rows=True) == want


def test_native_greedy_loops_agree(smollm2):
    """The two llama.cpp baselines bench compares against (CPU sampler, backend argmax)
    decode the same tokens as bridge's own argmax."""
    ids = smollm2.tokenize("Once upon a time, in a land far away,", add_special=False)
    out = []
    for backend in (False, True):
        with LlamaContext(smollm2, n_ctx=256, n_threads=1) as ctx:
            first = ctx.eval_argmax(ids)[-1]
            toks, secs = ctx.greedy_native(first, 24, smollm2.is_eog, backend=backend)
            assert ctx.n_past == len(ids) + len(toks) and secs > 0
            out.append(toks)
    with LlamaContext(smollm2, n_ctx=256, n_threads=1, backend_argmax=False) as ctx:
        tok, mine = ctx.eval_argmax(ids)[-1], []
        for _ in range(24):
            tok = ctx.eval_argmax([tok])[-1]
            mine.append(tok)
    assert out[0] == out[1] == mine[: len(out[0])]
