"""Constrained decoding on the real SmolLM2: every answer matches its schema, the tokens are
the target's own choices under the mask (speculative == plain up to near-ties), forced text
is drafted as its own source, and the grammar state is rolled back with the caches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.config import GenerationConfig, RuntimeConfig, SamplingConfig, SpeculativeConfig
from runtime.constraint import ConstraintSpec
from runtime.context import LlamaContext
from runtime.engine import Engine
from runtime.sampling import Sampler, gumbel_noise
from tests.exactness import N_CTX, N_THREADS, batch_bound, first_divergence
from tests.test_speculative import chat_prompt

jsonschema = pytest.importorskip("jsonschema", reason="schema checks need the dev extra")

RT = RuntimeConfig(n_ctx=N_CTX, n_threads=N_THREADS)
GREEDY = SamplingConfig(temp=0.0)
# forced lookup and forced text at a fixed gamma: every step drafts what it can
LOOKUP = SpeculativeConfig(drafter="lookup", draft_max=8, adaptive=False)
PLAIN = SpeculativeConfig(drafter="none")

# Extraction schemas with what llama.cpp's conversion ignored (numeric bounds) and what
# must hold exactly (enums, patterns, array lengths). Strings are bounded, so every answer
# closes well within max_tokens even at temperature 1.
PERSON = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "email", "role"],
          "properties": {"name": {"type": "string", "maxLength": 30},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.[a-z]{2,3}$",
                                   "maxLength": 40},
                         "role": {"enum": ["admin", "user", "guest"]}}}
INVOICE = {"type": "object", "additionalProperties": False,
           "required": ["number", "total", "items"],
           "properties": {"number": {"type": "string", "pattern": "^INV-[0-9]{4}$"},
                          "total": {"type": "number", "minimum": 0, "maximum": 10000},
                          "items": {"type": "array", "minItems": 1, "maxItems": 3,
                                    "items": {"type": "object", "additionalProperties": False,
                                              "required": ["desc", "qty"],
                                              "properties": {
                                                  "desc": {"type": "string", "maxLength": 20},
                                                  "qty": {"type": "integer", "minimum": 1,
                                                          "maximum": 10}}}}}}
LOGLINE = {"type": "object", "additionalProperties": False,
           "required": ["level", "code", "score"],
           "properties": {"level": {"enum": ["DEBUG", "INFO", "WARN", "ERROR"]},
                          "code": {"type": "integer", "minimum": 100, "maximum": 599},
                          "score": {"type": "number", "minimum": 0, "maximum": 1}}}
CASES = [
    (PERSON, "Extract the person as JSON: Alice Smith, 34, alice@example.com, an admin."),
    (INVOICE, "Extract the invoice as JSON: invoice INV-0042, two chairs and one desk, "
              "total 350.50 dollars."),
    (LOGLINE, "Turn this log line into JSON with a confidence score: "
              "2026-12-01 ERROR 503 upstream timeout after 30s."),
]
GEN = GenerationConfig(max_tokens=200)


@pytest.fixture(scope="module")
def engines(smollm2_gguf):
    spec = Engine(smollm2_gguf, draft=None, runtime=RT, speculative=LOOKUP, sampling=GREEDY)
    plain = Engine(smollm2_gguf, draft=None, runtime=RT, speculative=PLAIN, sampling=GREEDY)
    yield spec, plain
    spec.close()
    plain.close()


@pytest.fixture(scope="module")
def bound(smollm2_gguf):
    """How far batched and one-token logits differ on this machine (tests/exactness)."""
    return batch_bound(smollm2_gguf)


def _masked_margin(engine: Engine, spec: ConstraintSpec, prompt: list[int],
                   answer: list[int], sampler: Sampler | None = None) -> float:
    """Constrained plain decoding's own top-2 gap among the tokens the grammar allows
    after ``answer``: ``tests.exactness.plain_margin``'s replay (the prompt as one batch,
    then one token at a time), under the mask; under sampling, the gap of the perturbed
    scores z / temp + G(seed, position, x) over the allowed candidates."""
    c = engine.compile(spec)
    c.bind(len(prompt))
    for t in answer:
        c.consume(t)
    with LlamaContext(engine.model, N_CTX, n_threads=N_THREADS) as ctx:
        row = ctx.eval(prompt)[0]
        for tok in answer:
            row = ctx.eval([tok])[0]
        row = np.array(row, dtype=np.float64)
    if sampler is not None:
        cand, z = sampler.candidates(row, [], c.allowed())
        scores = np.sort(z + gumbel_noise(sampler.seed, len(prompt) + len(answer), cand))
    else:
        scores = np.sort(row[c.allowed()])
    return float(scores[-1] - scores[-2]) if scores.size > 1 else np.inf


@pytest.mark.slow
@pytest.mark.parametrize("schema, text", CASES)
def test_greedy_constrained_speculative_equals_constrained_plain(engines, bound, schema,
                                                                 text):
    """Forced text and lookups drafted under the grammar give the answer constrained plain
    decoding gives: any difference sits where plain decoding's top-2 margin among the
    allowed tokens is within twice this machine's measured batch bound."""
    spec_engine, plain = engines
    spec = ConstraintSpec.from_schema(schema)
    prompt = chat_prompt(text)
    a_text, a_ids, a_stats = spec_engine.complete(prompt, GEN, constraint=spec)
    plain.reset()  # from an empty cache: the shapes _masked_margin replays
    b_text, b_ids, b_stats = plain.complete(prompt, GEN, constraint=spec)
    jsonschema.validate(json.loads(b_text), schema)
    jsonschema.validate(json.loads(a_text), schema)
    assert a_stats.finish_reason == b_stats.finish_reason == "eog"
    # forced text really was drafted, as its own source, and it paid
    assert a_stats.sources["grammar"]["accepted"] > 0
    assert a_stats.tokens_per_step > 1.2
    if a_ids != b_ids:
        i = first_divergence(a_ids, b_ids)
        ids = plain.model.tokenize(prompt, True, True)
        margin = _masked_margin(plain, spec, ids, b_ids[:i])
        limit = bound.swap_margin(0.0)
        assert margin < limit, f"diverged at token {i}: masked margin {margin:.4f} >= {limit:.4g}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_sampled_constrained_answer_is_the_same_with_drafting(engines, bound, seed):
    """The coupled draw among the allowed tokens is a function of (seed, position, token):
    drafting forced text and lookups does not change a sampled constrained answer, except
    where the perturbed scores' top two are within the measured bound."""
    spec_engine, plain = engines
    schema, text = CASES[1]
    spec = ConstraintSpec.from_schema(schema)
    sampling = SamplingConfig(temp=1.0, seed=seed)
    prompt = chat_prompt(text)
    _, a_ids, a_stats = spec_engine.complete(prompt, GEN, constraint=spec, sampling=sampling)
    plain.reset()
    b_text, b_ids, _ = plain.complete(prompt, GEN, constraint=spec, sampling=sampling)
    jsonschema.validate(json.loads(b_text), schema)
    assert a_stats.n_drafted > 0
    if a_ids != b_ids:
        i = first_divergence(a_ids, b_ids)
        ids = plain.model.tokenize(prompt, True, True)
        margin = _masked_margin(plain, spec, ids, b_ids[:i], Sampler(sampling))
        limit = bound.swap_margin(1.0)
        assert margin < limit, f"diverged at token {i}: perturbed margin {margin:.4f}"


@pytest.mark.slow
@pytest.mark.parametrize("temp", [0.0, 1.0])
def test_every_answer_validates(engines, temp):
    """Numeric bounds, enums, patterns and array lengths hold in every answer, greedy and
    at temperature 1 (several seeds)."""
    spec_engine, _ = engines
    seeds = [0] if temp == 0 else [1, 2, 3]
    for schema, text in CASES:
        for seed in seeds:
            sampling = SamplingConfig(temp=temp, seed=seed)
            out, ids, stats = spec_engine.complete(
                chat_prompt(text), GEN, constraint=ConstraintSpec.from_schema(schema),
                sampling=sampling)
            assert stats.finish_reason == "eog", (out, stats.finish_reason)
            jsonschema.validate(json.loads(out), schema)
            # one canonical layout: no whitespace but the separators' single spaces
            assert "\n" not in out and "  " not in out


def test_json_object_gbnf_and_regex(engines):
    spec_engine, _ = engines
    prompt = chat_prompt("Is the sky blue? Answer yes or no.")
    out, _, stats = spec_engine.complete(prompt, GEN,
                                         constraint=ConstraintSpec("gbnf", 'root ::= "yes" | "no"'))
    assert out in ("yes", "no") and stats.finish_reason == "eog"
    out, _, _ = spec_engine.complete(prompt, GEN, constraint=ConstraintSpec("regex", "[0-9]{3}"))
    assert len(out) == 3 and out.isdigit()
    out, _, stats = spec_engine.complete(chat_prompt("Describe a cat as JSON."),
                                         GenerationConfig(max_tokens=400),
                                         constraint=ConstraintSpec("json"))
    if stats.finish_reason == "eog":
        assert isinstance(json.loads(out), dict)
    else:  # only a cut at max_tokens may leave it open, and then it says so
        assert stats.finish_reason == "length"


def test_max_tokens_cut_says_length(engines):
    spec_engine, _ = engines
    schema, text = CASES[0]
    out, ids, stats = spec_engine.complete(chat_prompt(text), GenerationConfig(max_tokens=5),
                                           constraint=ConstraintSpec.from_schema(schema))
    assert stats.finish_reason == "length" and len(ids) == 5


@pytest.mark.parametrize("spec, words", [
    (ConstraintSpec("json_schema", '{"type": "object", "properties": {"a": {"type": 7}}}'),
     "JSON schema"),
    (ConstraintSpec("gbnf", 'root ::= "a'), "grammar"),
    (ConstraintSpec("gbnf", "root ::= undefined_rule"), "grammar"),
    (ConstraintSpec("regex", "[a-"), "regex"),
])
def test_invalid_constraints_are_refused_before_decoding(engines, spec, words):
    spec_engine, _ = engines
    with pytest.raises(ValueError, match=words):
        spec_engine.compile(spec)


@pytest.mark.parametrize("kind, text, words", [
    ("gbnf", "   ", "empty"), ("regex", "", "empty"), ("yaml", "a", "kind"),
])
def test_empty_or_unknown_specs(kind, text, words):
    with pytest.raises(ValueError, match=words):
        ConstraintSpec(kind, text)
    with pytest.raises(ValueError, match="not valid JSON"):
        ConstraintSpec.from_schema("{nope")


def test_stop_string_and_interrupt_roll_the_grammar_back(engines, monkeypatch):
    """The grammar state is a cache like the KV cache: it ends where the returned tokens
    end, after a stop string and after Ctrl-C inside a decode."""
    spec_engine, _ = engines
    schema, text = CASES[0]
    spec = ConstraintSpec.from_schema(schema)
    prompt = chat_prompt(text)
    out, ids, stats = spec_engine.complete(prompt, GenerationConfig(max_tokens=200,
                                                                    stop=('"age"',)),
                                           constraint=spec)
    c = spec_engine.decoder.constraint
    assert stats.finish_reason == "stop" and '"age"' not in out
    assert c.n_consumed == len(ids)
    assert spec_engine.decoder.kv[c.start:] == ids[: len(spec_engine.decoder.kv) - c.start]

    ctx = spec_engine.ctx
    real_eval, calls = ctx.eval, {"n": 0}

    def eval_then_interrupt(tokens, all_logits=False):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_eval(tokens, all_logits)

    monkeypatch.setattr(ctx, "eval", eval_then_interrupt)
    got: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        for chunk in spec_engine.generate(prompt, GEN, constraint=spec):
            got.extend(chunk.tokens)
    monkeypatch.setattr(ctx, "eval", real_eval)
    d = spec_engine.decoder
    c = d.constraint  # each generation moves a matcher of its own (Engine.compile)
    assert c.start + c.n_consumed == len(d.kv) + (d.pending is not None)
    # and the engine answers correctly afterwards
    out, _, stats = spec_engine.complete(prompt, GEN, constraint=spec)
    jsonschema.validate(json.loads(out), schema)


def test_logprobs_come_from_the_masked_rows(engines):
    spec_engine, _ = engines
    prompt = chat_prompt("Is the sky blue? Answer yes or no.")
    yes_no = ConstraintSpec("gbnf", 'root ::= "yes" | "no"')
    chunks = list(spec_engine.generate(prompt, GEN, constraint=yes_no, logprobs=5))
    entries = [e for ch in chunks for e in (ch.logprobs or [])]
    tokens = [t for ch in chunks for t in ch.tokens]
    assert len(entries) == len(tokens) >= 1
    lp, tops = entries[0]
    allowed = {spec_engine.model.token_bytes(t) for t, _ in tops}
    # after the mask only tokens that start "yes" or "no" have any mass
    assert all(b"yes".startswith(b) or b"no".startswith(b) for b in allowed), allowed
    # greedy: the emitted token is the most likely allowed one, and they sum below 1
    assert tops[0][0] == tokens[0] and lp == pytest.approx(tops[0][1])
    assert sum(np.exp(v) for _, v in tops) <= 1.0 + 1e-9


def test_masked_coupled_draw_follows_the_masked_softmax():
    """Chi-square: the coupled draw among allowed tokens is distributed as the softmax of
    the allowed logits (temperature applied), never outside the mask."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, 64).astype(np.float32)
    allowed = np.zeros(64, dtype=bool)
    allowed[[3, 7, 8, 20, 41]] = True
    s = Sampler(SamplingConfig(temp=0.7, top_k=0, top_p=1.0, min_p=0.0, seed=5))
    n = 20000
    counts = np.zeros(64)
    for pos in range(n):
        counts[s.choose(logits, [], pos, allowed)] += 1
    assert counts[~allowed].sum() == 0
    z = logits[allowed].astype(np.float64) / 0.7
    p = np.exp(z - z.max())
    p /= p.sum()
    expected = n * p
    chi2 = float(((counts[allowed] - expected) ** 2 / expected).sum())
    assert chi2 < 18.5  # 4 degrees of freedom, p = 0.001
    # and the draw is the coupled one: the same noise as an unconstrained draw would use
    pos = 123
    cand = np.flatnonzero(allowed)
    want = cand[np.argmax(z + gumbel_noise(s.seed, pos, cand))]
    assert s.choose(logits, [], pos, allowed) == want
