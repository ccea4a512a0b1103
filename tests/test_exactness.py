"""Exactness you can check on any CPU: the measured bound, exact mode, and verify batches
that see exactly the emitted tokens after every rollback."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.config import GenerationConfig, RuntimeConfig, SpeculativeConfig
from runtime.context import LlamaContext, LlamaModel, Numerics
from runtime.engine import Engine
from runtime.numerics import BatchBound, exact_width, measure_bound
from runtime.speculative import Stats
from tests.exactness import N_CTX, N_THREADS
from tests.test_speculative import COPY, FORCED, GREEDY, PROMPTS, RT, _plain, chat_prompt

EXACT = RuntimeConfig(n_ctx=RT.n_ctx, n_threads=RT.n_threads, exact=True)


def test_swap_margin_is_twice_the_bound():
    b = BatchBound(0.25, 0.1, 10, (2,), 0, 0, 0.0)
    assert b.swap_margin() == 0.5 and b.swap_margin(temp=0.5) == 1.0
    assert "up to 0.25" in b.describe() and not b.exact
    assert BatchBound(0.0, 0.0, 10, (2,), 10, 0, 0.0).describe().startswith(
        "batched and single-token logits are bitwise equal")


@pytest.mark.parametrize("numerics", [Numerics(), Numerics.exact()], ids=["default", "exact"])
def test_measured_bound_covers_the_verify_widths(smollm2_gguf, numerics):
    """The measurement compares every position at every width, and finds a difference
    when there is one: a context whose one-token rows carry a deliberate 0.5 offset must
    measure a bound of at least 0.5."""
    with LlamaModel(smollm2_gguf, repack=numerics.repack) as model:
        ids = model.tokenize(chat_prompt(PROMPTS[0]), True, True)

        def make():
            return LlamaContext(model, N_CTX, n_threads=N_THREADS, numerics=numerics)

        b = measure_bound(make, ids, n_positions=24, widths=(2, 5))
        assert b.n_positions == 24 and b.widths == (2, 5) and b.max_abs >= 0.0
        print(b.describe())

        class Skewed(LlamaContext):
            def eval(self, tokens, all_logits=False):
                rows = super().eval(tokens, all_logits)
                return rows + 0.5 if len(tokens) == 1 else rows

        skewed = measure_bound(lambda: Skewed(model, N_CTX, n_threads=N_THREADS,
                                              numerics=numerics), ids, 8, (2,))
        assert skewed.max_abs >= 0.5 - 1e-6 and skewed.n_identical == 0


def test_exact_width_finds_the_widest_equal_batch(smollm2_gguf):
    """exact_width returns the widest batch equal to one-token steps, and stops at the
    first width that is not (a context whose 4-row batches are skewed gives 3)."""
    with LlamaModel(smollm2_gguf, repack=False) as model:
        ids = model.tokenize("The quick brown fox", True)
        with LlamaContext(model, 256, n_threads=N_THREADS, numerics=Numerics.exact()) as ctx:
            w = exact_width(ctx, ids, 6)
            assert 1 <= w <= 6 and ctx.n_past == 0
            print(f"SmolLM2, exact mode: batches up to {w} rows equal one-token steps")

        class Skewed(LlamaContext):
            def eval(self, tokens, all_logits=False):
                rows = super().eval(tokens, all_logits)
                return rows * 1.5 if len(tokens) >= 4 else rows

        with Skewed(model, 256, n_threads=N_THREADS, numerics=Numerics.exact()) as ctx:
            assert exact_width(ctx, ids, 6) == min(3, w)


def test_padding_keeps_the_cache_equal_to_the_tokens(smollm2_gguf):
    """Exact mode pads one-token steps with a throwaway row; it must leave no cell behind,
    and its one-token logits must equal a batch's rows bitwise."""
    with LlamaModel(smollm2_gguf, repack=False) as model:
        ids = model.tokenize("Once upon a time, there was a", True)
        with LlamaContext(model, 128, n_threads=N_THREADS, numerics=Numerics.exact()) as ctx:
            ctx.eval(ids[:-2])
            a = np.array(ctx.eval([ids[-2]])[0])
            b = np.array(ctx.eval([ids[-1]])[0])
            assert ctx.n_past == len(ids)
            import llama_cpp
            assert llama_cpp.llama_memory_seq_pos_max(ctx._mem, 0) == len(ids) - 1
            ctx.truncate(len(ids) - 2)
            rows = np.array(ctx.eval(ids[-2:], all_logits=True))
        assert np.array_equal(rows[0], a) and np.array_equal(rows[1], b)
        # the context still holds as many tokens as asked for: the last one is a padded
        # one-token step whose throwaway row needs a cell beyond it
        with LlamaContext(model, 64, n_threads=N_THREADS, numerics=Numerics.exact()) as ctx:
            n = ctx.n_ctx
            assert n >= 64
            ctx.eval((ids * n)[: n - 1])
            ctx.eval(ids[:1])
            assert ctx.n_past == n
@pytest.mark.slow
def test_exact_mode_is_token_identical(smollm2_gguf, smollm2_draft_gguf):
    """``--exact``: every draft source, greedy, gives plain decoding's tokens exactly,
    not up to a margin (the rows of a verify batch equal one-token steps bitwise)."""
    rt = RuntimeConfig(n_ctx=RT.n_ctx, n_threads=RT.n_threads, exact=True)
    gen = GenerationConfig(max_tokens=96)
    prompts = [chat_prompt(t) for t in PROMPTS[:6]] + [COPY]
    with Engine(smollm2_gguf, draft=None, runtime=rt, sampling=GREEDY,
                speculative=SpeculativeConfig(drafter="none")) as plain:
        want = [_plain(plain, p, gen) for p in prompts]
    for spec_cfg in (FORCED, SpeculativeConfig(drafter="lookup", draft_max=8, adaptive=False),
                     SpeculativeConfig()):
        with Engine(smollm2_gguf, draft=smollm2_draft_gguf, runtime=rt, sampling=GREEDY,
                    speculative=spec_cfg) as spec:
            assert spec.max_rows is not None and spec.max_rows >= 2
            drafted = 0
            for prompt, ids in zip(prompts, want, strict=True):
                spec.reset()
                _, got, st = spec.complete(prompt, gen)
                drafted += st.n_drafted
                assert got == ids, f"{spec_cfg.drafter}: {prompt[:40]!r} differs in exact mode"
            # forced drafting must really draft; auto may rightly decode plainly on a CPU
            assert drafted > 0 or spec_cfg.adaptive


def _verify_batch_problems(spec: Engine, prompt: list[int], n_tokens: int,
                           monkeypatch) -> tuple[list[str], int]:
    """Decode with forced drafting, recording every verify batch; then check each against
    a fresh context that holds exactly the emitted tokens. Returns (problems, rejections).

    At each step the batch must start where the emitted tokens end (prompt + all but the
    pending token) and its logits must equal, bitwise, a fresh context's for the same
    batch after those tokens: exact mode makes a row independent of its batch, so the
    only way to differ is a cache that still holds something other than the emitted text
    (a stale cell after a rollback, a position off by one)."""
    ctx = spec.ctx
    records: list[tuple[int, list[int], np.ndarray]] = []
    real_eval = ctx.eval

    def recording(tokens, all_logits=False):
        pos = ctx.n_past
        rows = real_eval(tokens, all_logits)
        if all_logits:
            records.append((pos, list(tokens), np.array(rows)))
        return rows

    monkeypatch.setattr(ctx, "eval", recording)
    monkeypatch.setattr(ctx, "backend_argmax", False)  # read the batches' logits
    spec.reset()
    stats = Stats()
    steps = list(spec.decoder.generate(prompt, n_tokens, spec.model.is_eog, stats))
    monkeypatch.setattr(ctx, "eval", real_eval)
    seq = prompt + [t for st in steps for t in st.tokens]
    assert len(records) == len(steps) - 1 > 0
    problems: list[str] = []
    n_emitted = len(steps[0].tokens)
    with LlamaContext(spec.model, N_CTX, n_threads=N_THREADS, numerics=spec.numerics) as ref:
        for (pos, batch, rows), step in zip(records, steps[1:], strict=True):
            end = len(prompt) + n_emitted - 1  # the pending token sits at `end`
            if pos != end or batch[0] != seq[end]:
                problems.append(f"batch at {pos} starting {batch[0]}, but the emitted "
                                f"tokens end at {end} with {seq[end]}")
            if ref.n_past > end:
                ref.truncate(end)
            if ref.n_past < end:
                ref.eval(seq[ref.n_past:end])
            want = np.array(ref.eval(batch, all_logits=True))
            ref.truncate(end)
            if not np.array_equal(want, rows):
                problems.append(f"batch at {pos}: logits differ from a fresh context's by "
                                f"{np.abs(want - rows).max():.4g}")
            n_emitted += len(step.tokens)
    return problems, stats.n_rejections


@pytest.mark.parametrize("broken", [False, True], ids=["real", "truncate-off-by-one"])
def test_verify_batches_see_exactly_the_emitted_tokens(smollm2_gguf, smollm2_draft_gguf,
                                                       monkeypatch, broken):
    """After many accept/reject/rollback steps, each verify batch's logits equal a fresh
    context's that evaluated only the emitted tokens. A deliberately wrong rollback
    (truncate keeping one rejected draft) must be caught."""
    with Engine(smollm2_gguf, draft=smollm2_draft_gguf, runtime=EXACT, sampling=GREEDY,
                speculative=FORCED) as spec:
        if broken:
            real_truncate = spec.ctx.truncate

            def keep_one_stale(n_keep):
                real_truncate(min(n_keep + 1, spec.ctx.n_past))

            monkeypatch.setattr(spec.ctx, "truncate", keep_one_stale)
        prompt = spec.model.tokenize(chat_prompt(PROMPTS[1]), True, True)
        problems, rejections = _verify_batch_problems(spec, prompt, 96, monkeypatch)
    assert rejections >= 5  # rollbacks really happened
    if broken:
        assert problems, "a stale cache after rollback went unnoticed"
        print(f"broken truncate caught: {problems[0]} ({len(problems)} batches)")
    else:
        assert problems == []
