"""Layer-streamed scoring from a GGUF (exporters.stream) against the in-memory path.

The streamed layers are transformers' own modules with weights dequantized from the same
file, so on the bundled SmolLM2 and Gemma 3 the scores, the chosen layers and the
held-out agreement must equal the in-memory path's within float32 rounding.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from exporters import estimate  # noqa: E402
from exporters.calibration import format_prompt, reference  # noqa: E402
from exporters.config import ExportConfig  # noqa: E402
from exporters.layer_common import streamed_method  # noqa: E402
from exporters.layers_streamed import check_memory, stream_need  # noqa: E402
from exporters.loading import ModelSource, open_gguf, resolve_model  # noqa: E402
from exporters.scoring import (  # noqa: E402
    Prepared,
    ScoringContext,
    draft_agreement,
    make_scorer,
)
from exporters.stream import (  # noqa: E402
    GGUFLayers,
    check_streamable,
    score_streamed,
    streamed_agreement,
)
from exporters.torch_model import LayerRunner, load_for_scoring  # noqa: E402

PROMPTS = ["Write a haiku about autumn rain.", "What is 17 times 23?",
           "def fibonacci(n):", "Explain photosynthesis in one sentence."]
# a fixed continuation stands in for generated text: both paths score the same tokens
CONTINUATION = " The answer, step by step: first we look at the question, then we write."
# float32 sums of cosines over ~100 tokens: rounding differs only in summation order
TOL = 1e-5


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def both(request):
    """(streamed GGUFLayers, in-memory LayerRunner, [(ids, start)]) for one model."""
    path = request.getfixturevalue(f"{request.param}_gguf")
    model, tok, _ = load_for_scoring(resolve_model(str(path)), "float32")
    texts = []
    for p in PROMPTS:
        ids = format_prompt(tok, p)
        texts.append((ids + tok(CONTINUATION, add_special_tokens=False)["input_ids"],
                      len(ids) - 1))
    return GGUFLayers(path), LayerRunner(model), texts


def _in_memory(runner, texts):
    return [Prepared(s, runner.trace(s.ids, keep_h=False)) for s in
            (reference(runner, torch.tensor([ids]), start) for ids, start in texts)]


@pytest.mark.parametrize("method, max_drop", [("bi", 4), ("angular", 3)])
def test_streamed_scores_equal_the_in_memory_ones(both, method, max_drop):
    src, runner, texts = both
    protected = frozenset({0, src.n_layers - 1})
    streamed = score_streamed(src, method, [src.text(i, s) for i, s in texts], max_drop,
                              protected)
    ctx = ScoringContext(runner, _in_memory(runner, texts), protected)
    whole = make_scorer(method)(ctx, max_drop)
    assert streamed.importance == pytest.approx(whole.importance, abs=TOL)
    assert streamed.drops == whole.drops  # hence the same layers are chosen


def test_streamed_heldout_agreement_equals_the_in_memory_one(both):
    src, runner, texts = both
    drops = {1: (3,), 2: (3, 5)}
    streamed = streamed_agreement(src, [src.text(i, s) for i, s in texts], drops)
    preps = _in_memory(runner, texts)
    for n, dropped in drops.items():
        assert streamed[n] == pytest.approx(draft_agreement(runner, preps, dropped), abs=1e-9)


def test_head_slices_give_the_in_memory_logits(both):
    src, runner, texts = both
    ids, start = texts[0]
    h = runner.trace(torch.tensor([ids]), keep_h=False).h_out
    whole = runner.logits(h, slice(0, len(ids)))
    streamed = src.logits(h[0])
    assert torch.allclose(streamed, whole, atol=1e-4)
    assert torch.equal(src.top1(h[0]), whole.argmax(-1))


def test_loading_a_gguf_parses_it_once(smollm2_gguf, monkeypatch):
    """transformers opens a GGUF for its config, its tokenizer and its weights; each parse
    of Gemma 3's vocabulary takes about 25 s, so loading and streaming must share one."""
    import gguf

    from exporters import loading

    parsed: list[Path] = []
    real = gguf.GGUFReader

    def counting(path, mode="r"):
        parsed.append(Path(path))
        return real(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    loading._open_cached.cache_clear()  # as a fresh process finds it
    load_for_scoring(resolve_model(str(smollm2_gguf)), "float32")
    GGUFLayers(smollm2_gguf)
    assert len(parsed) == 1, parsed
    assert gguf.GGUFReader is counting  # put back as it was
    with loading.one_parse(smollm2_gguf):
        assert gguf.GGUFReader(str(smollm2_gguf)) is loading.open_gguf(smollm2_gguf)
    assert len(parsed) == 1


def test_an_unsupported_architecture_is_one_line_naming_the_fallback():
    with pytest.raises(ValueError, match="--drop-layers") as e:
        check_streamable("rwkv6", Path("x.gguf"))
    assert "\n" not in str(e.value) and "rwkv6" in str(e.value)


@pytest.mark.parametrize("kind, method, expected", [
    ("gguf", "bi", "bi"),          # bi and angular always stream from a GGUF
    ("gguf", "angular", "angular"),
    ("gguf", "shortlist", None),   # replays need the whole model
    ("hf", "bi", None),            # a HF folder has no GGUF to stream from yet
])
def test_which_exports_stream(kind, method, expected, smollm2_gguf):
    source = ModelSource(kind, smollm2_gguf, "m")
    assert streamed_method(ExportConfig(model="m", method=method), source) == expected


def test_auto_streams_bi_when_the_float32_model_does_not_fit(smollm2_gguf, monkeypatch):
    from exporters import torch_model

    source = ModelSource("gguf", smollm2_gguf, "m")
    monkeypatch.setattr(torch_model, "_free", lambda device: 1 << 20)
    assert streamed_method(ExportConfig(model="m"), source) == "bi"
    monkeypatch.setattr(torch_model, "_free", lambda device: 1 << 40)
    assert streamed_method(ExportConfig(model="m"), source) is None


def test_memory_check_refuses_before_any_work(smollm2_gguf, monkeypatch):
    import psutil

    reader = open_gguf(smollm2_gguf)
    need = stream_need(reader, 32, 2)
    assert need < 2 << 30  # SmolLM2 streams in well under 2 GiB
    free = type("VM", (), {"available": need - 1})()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)
    with pytest.raises(ValueError, match="layer by layer needs about"):
        check_memory(reader, smollm2_gguf, 32, 2)


def test_streamed_estimate_scales_with_layers_and_tokens():
    costs = estimate.StreamCosts(load_layer=1.0, token_layer=0.01, head_position=0.001,
                                 head_load=2.0)
    one = estimate.predict_streamed(costs, 3.0, "bi", 10, [100] * 4, [100] * 2, 64, 1)
    two = estimate.predict_streamed(costs, 3.0, "bi", 20, [100] * 4, [100] * 2, 64, 1)
    assert one.calibration == 3.0
    assert one.scoring == 10 * (1.0 + 0.01 * 400)
    assert two.scoring == 2 * one.scoring
    with pytest.raises(ValueError, match="does not stream"):
        estimate.predict_streamed(costs, 3.0, "greedy", 10, [100], [100], 64, 1)
