"""The penalties (repeat, frequency, presence) and DRY against a direct, slow transcription
of llama.cpp's rules, on random histories; the sequence-breaker table on a toy
vocabulary; and the settings' validation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from runtime.config import SamplingConfig
from runtime.penalties import Breakers, Penalties
from runtime.sampling import Sampler, verify

# a toy vocabulary: token id -> text; "\n" and ":" are breakers, "ab" a two-token one
PIECES = [b"a", b"b", b"c", b"d", b"\n", b"x:", b"e", b"a", b" b", b"ca"]


def _tokenize(data: bytes) -> list[int]:
    """Greedy longest-first over PIECES (good enough for the breakers' tails)."""
    out, i = [], 0
    order = sorted(range(len(PIECES)), key=lambda t: -len(PIECES[t]))
    while i < len(data):
        for t in order:
            if data.startswith(PIECES[t], i):
                out.append(t)
                i += len(PIECES[t])
                break
        else:
            raise ValueError(data)
    return out


def test_breakers_table_follows_llama_cpp():
    b = Breakers.build(PIECES, _tokenize, ("\n", ":", "ab"))
    # whole inside one token: "\n" itself, "x:" contains ":"
    assert b.single.tolist() == [t in (4, 5) for t in range(len(PIECES))]
    # "ab": tokens ending in "a" ("a" twice, "ca") are heads with the tail "b"
    assert b.tails == {0: ((1,),), 7: ((1,),), 9: ((1,),)}
    assert b.is_head[[0, 4, 5, 7, 9]].all() and not b.is_head[[1, 2, 3, 6, 8]].any()


def test_rep_limit_counts_tokens_after_the_last_breaker():
    b = Breakers.build(PIECES, _tokenize, ("\n", "ab"))
    assert b.rep_limit(np.array([2, 2, 2])) == 3           # no breaker: all of it
    assert b.rep_limit(np.array([2, 4, 2, 3])) == 2        # "\n" then two tokens
    assert b.rep_limit(np.array([2, 0, 1, 3, 3])) == 2     # "a" "b" then two
    assert b.rep_limit(np.array([2, 0, 3, 3])) == 4        # "a" without its "b"
    assert b.rep_limit(np.array([3, 0])) == 2              # a head with no room for its tail


def _naive_repeat(row, h, cfg):
    row = row.copy()
    win = h if cfg.repeat_last_n < 0 else h[max(0, len(h) - cfg.repeat_last_n):]
    for t in set(win):
        c = list(win).count(t)
        z = row[t]
        z = z * cfg.repeat_penalty if z <= 0 else z / cfg.repeat_penalty
        row[t] = z - c * cfg.frequency_penalty - cfg.presence_penalty
    return row


def _naive_dry(row, h, cfg, br: Breakers):
    """llama.cpp's DRY written out plainly: every earlier position's match length."""
    row = row.copy()
    n_win = len(h) if cfg.dry_penalty_last_n < 0 else min(len(h), cfg.dry_penalty_last_n)
    h = list(h[len(h) - n_win:])
    n, allowed = len(h), cfg.dry_allowed_length
    if n <= allowed:
        return row
    limit = n
    for i in range(n):  # step 1, from the end
        tok = h[n - 1 - i]
        if br.single[tok]:
            limit = i
            break
        best = -1
        for tail in br.tails.get(tok, ()):
            k = len(tail)
            if best < k <= i and tuple(h[n - i:n - i + k]) == tail:
                best = k
        if best >= 0:
            limit = i - best
            break
    if limit < allowed:
        return row
    worst: dict[int, int] = {}
    for j in range(n - 1):
        length = 0
        while length <= j and h[j - length] == h[n - 1 - length]:
            length += 1
        length = min(length, limit)
        if length >= allowed:
            t = h[j + 1]
            worst[t] = max(worst.get(t, 0), length)
    max_exp = int(88.7228391 / math.log(cfg.dry_base)) if cfg.dry_base > 1.000001 else 0
    for t, length in worst.items():
        if br.single[t]:
            continue
        e = length - allowed
        if max_exp:
            e = min(e, max_exp)
        row[t] -= cfg.dry_multiplier * cfg.dry_base ** e
    return row


@pytest.mark.parametrize("seed", range(40))
def test_penalties_equal_the_plain_rules(seed):
    rng = np.random.default_rng(seed)
    br = Breakers.build(PIECES, _tokenize, ("\n", ":", "ab"))
    n_vocab = len(PIECES)
    # few symbols, some periodic stretches: long repeats and breakers both occur
    period = rng.integers(1, 6)
    base = rng.integers(0, n_vocab, size=period)
    length = int(rng.integers(1, 90))
    h = np.resize(base, length)
    noise = rng.random(length) < 0.15
    h[noise] = rng.integers(0, n_vocab, size=int(noise.sum()))
    cfg = SamplingConfig(
        repeat_penalty=float(rng.choice([1.0, 1.3, 0.8])),
        repeat_last_n=int(rng.choice([-1, 0, 8, 64])),
        frequency_penalty=float(rng.choice([0.0, 0.5, -0.3])),
        presence_penalty=float(rng.choice([0.0, 0.7])),
        dry_multiplier=float(rng.choice([0.0, 0.8, 2.0])),
        dry_base=float(rng.choice([1.0, 1.75, 3.0])),
        dry_allowed_length=int(rng.choice([0, 1, 2, 4])),
        dry_penalty_last_n=int(rng.choice([-1, 16, 64])))
    row = rng.normal(size=n_vocab) * 3
    want = _naive_repeat(row, list(h), cfg) if cfg.repeat_last_n else row.copy()
    if cfg.dry_on:
        want = _naive_dry(want, list(h), cfg, br)
    pen = Penalties.of(cfg, lambda _: br)
    got = row.copy()
    if pen is not None:
        pen.apply(got, list(h))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_dry_exponent_is_clamped_like_llama_cpp():
    """A repeat longer than the float range allows: the penalty stops growing (finite)."""
    br = Breakers.build(PIECES, _tokenize, ())
    cfg = SamplingConfig(dry_multiplier=1.0, dry_base=10.0, dry_allowed_length=0,
                         dry_penalty_last_n=-1)
    h = [2] * 200
    row = np.zeros(len(PIECES))
    Penalties.of(cfg, lambda _: br).apply(row, h)
    assert row[2] == -10.0 ** int(88.7228391 / math.log(10.0))
    np.testing.assert_array_equal(row, _naive_dry(np.zeros(len(PIECES)), h, cfg, br))


def test_verify_scores_each_draft_with_the_history_before_it():
    """DRY under speculation: row i is penalized after history + drafts[:i], so drafting a
    repeat does not let it through; the same tokens as one step at a time."""
    br = Breakers.build(PIECES, _tokenize, ())
    s = Sampler(SamplingConfig(temp=0, dry_multiplier=5.0, dry_allowed_length=2),
                lambda _: br)
    history = [2, 3, 6, 2, 3]  # "c d e c d": the next "e" would repeat three tokens
    row = np.zeros(len(PIECES))
    row[6], row[1] = 2.0, 1.0  # the model prefers "e", then "b"
    rows = np.stack([row, row, row])
    plain = []  # one token at a time
    h = list(history)
    for _ in range(3):
        tok = s.choose(row, h, len(h))
        plain.append(tok)
        h.append(tok)
    n_acc, nxt = verify(s, rows, plain[:2], list(history), len(history))
    assert (n_acc, nxt) == (2, plain[2])
    assert plain[0] == 1  # the penalty really changed the choice
    # a draft that repeats is rejected at that row
    assert verify(s, rows, [6], list(history), len(history)) == (0, 1)


@pytest.mark.parametrize("bad, word", [
    (dict(frequency_penalty=math.inf), "frequency-penalty"),
    (dict(presence_penalty=-101.0), "presence-penalty"),
    (dict(dry_multiplier=-1.0), "dry-multiplier"),
    (dict(dry_base=0.5), "dry-base"),
    (dict(dry_allowed_length=-1), "dry-allowed-length"),
    (dict(dry_penalty_last_n=-2), "dry-penalty-last-n"),
    (dict(repeat_last_n=-2), "repeat-last-n"),
    (dict(dry_sequence_breakers=("",)), "dry-sequence-breaker"),
    (dict(dry_sequence_breakers=("x" * 41,)), "dry-sequence-breaker"),
])
def test_bad_penalty_settings_name_the_option(bad, word):
    with pytest.raises(ValueError, match=word):
        SamplingConfig(**bad)


def test_no_penalty_means_the_plain_fast_path():
    assert Sampler(SamplingConfig(temp=0)).plain_greedy
    assert Sampler(SamplingConfig(temp=0, repeat_penalty=1.0, repeat_last_n=0,
                                  frequency_penalty=0.5)).plain_greedy  # window 0: off
    s = Sampler(SamplingConfig(temp=0, frequency_penalty=0.5))
    assert not s.plain_greedy and s.history_window == 64
    with pytest.raises(ValueError, match="vocabulary"):
        Sampler(SamplingConfig(dry_multiplier=0.8))  # DRY needs the model's tokens


# -- on the real model: the same tokens as plain decoding with the same penalties ---------

def test_penalties_under_drafts_equal_plain_decoding(smollm2_gguf, smollm2_draft_gguf):
    """Greedy and coupled-sampled answers with frequency/presence penalties and DRY are
    token-identical to plain decoding with the same settings, under forced pruned drafts
    and forced lookups (``--exact``: a verify row equals a one-token step bitwise, so any
    difference is the penalty state, not the batch). The penalties really act (the
    answers differ from unpenalized ones) and the drafts really run."""
    from runtime.config import GenerationConfig, RuntimeConfig, SpeculativeConfig
    from runtime.engine import Engine
    from tests.test_speculative import COPY, FORCED, RT, chat_prompt

    rt = RuntimeConfig(n_ctx=RT.n_ctx, n_threads=RT.n_threads, exact=True)
    gen = GenerationConfig(max_tokens=80)
    prompts = [COPY, chat_prompt("List ten fruits, one per line, then list them again.")]
    settings = [SamplingConfig(temp=0, dry_multiplier=0.8, frequency_penalty=0.3,
                               presence_penalty=0.2),
                SamplingConfig(temp=0.9, seed=7, dry_multiplier=1.5, dry_allowed_length=1,
                               dry_penalty_last_n=-1, repeat_penalty=1.1)]
    lookup = SpeculativeConfig(drafter="lookup", draft_max=8, adaptive=False)
    with Engine(smollm2_gguf, draft=None, runtime=rt,
                speculative=SpeculativeConfig(drafter="none")) as plain:
        want = {}
        for i, sampling in enumerate(settings):
            for j, p in enumerate(prompts):
                plain.reset()
                want[i, j] = plain.complete(p, gen, sampling=sampling)[1]
                plain.reset()
                free = dataclasses.replace(sampling, dry_multiplier=0.0, repeat_penalty=1.0,
                                           frequency_penalty=0.0, presence_penalty=0.0)
                assert plain.complete(p, gen, sampling=free)[1] != want[i, j], \
                    "the penalties changed nothing: the test would prove nothing"
    for spec_cfg in (FORCED, lookup):
        with Engine(smollm2_gguf, draft=smollm2_draft_gguf, runtime=rt,
                    speculative=spec_cfg) as spec:
            drafted = 0
            for i, sampling in enumerate(settings):
                for j, p in enumerate(prompts):
                    spec.reset()
                    _, got, st = spec.complete(p, gen, sampling=sampling)
                    drafted += st.n_drafted
                    assert got == want[i, j], f"{spec_cfg.drafter}, settings {i}, prompt {j}"
            assert drafted > 0


def test_a_pruned_draft_the_grammar_cuts_to_nothing_is_rolled_back(smollm2_gguf,
                                                                  smollm2_draft_gguf,
                                                                  monkeypatch):
    """Regression: a pruned draft that the grammar cut to nothing skipped the drafters'
    rollback, so the draft's cache kept its own proposal; once another source drafted
    several tokens, a later step failed ("draft cache diverged", a 500 from the server,
    seen with a penalty and a pydantic schema). Every step that asked a drafter leaves
    each drafter's cache a prefix of the emitted tokens."""
    from runtime.config import GenerationConfig, RuntimeConfig
    from runtime.constraint import ConstraintSpec
    from runtime.engine import Engine
    from tests.test_speculative import FORCED, chat_prompt

    with Engine(smollm2_gguf, draft=smollm2_draft_gguf,
                runtime=RuntimeConfig(n_ctx=1024, n_threads=1), speculative=FORCED,
                sampling=SamplingConfig(temp=0, repeat_penalty=1.1)) as e:
        d = e.decoder
        pruned = d.drafters["pruned"]
        problems: list[str] = []
        real_step = d._step

        def step(budget, is_eog):
            # the grammar rejects every draft this step: the proposal is cut to nothing
            monkeypatch.setattr(d.constraint, "validate", lambda tokens: 0)
            out = real_step(budget, is_eog)
            seq = d.kv + [d.pending]
            if pruned._seen != seq[:len(pruned._seen)]:
                problems.append(f"the draft's cache holds {len(pruned._seen)} tokens, "
                                f"not a prefix of the {len(seq)} emitted")
            return out

        monkeypatch.setattr(d, "_step", step)
        _, toks, st = e.complete(chat_prompt("Give a JSON object about a cat."),
                                 GenerationConfig(max_tokens=24),
                                 constraint=ConstraintSpec("json"))
        assert st.n_steps > 3 and problems == []
