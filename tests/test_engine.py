"""runtime.engine: draft sources, the drafting memory across requests, stored profiles."""

from __future__ import annotations

import pytest

from runtime.config import GenerationConfig, RuntimeConfig, SamplingConfig, SpeculativeConfig
from runtime.drafters.memory import DraftMemory
from runtime.engine import Engine

RT = RuntimeConfig(n_ctx=1024, n_threads=1)
GREEDY = SamplingConfig(temp=0)
RECORDS = ["Alice Martin, Paris, 34", "Bob Chen, Toronto, 29", "Carla Diaz, Madrid, 41"]


def prompt(record: str) -> str:
    return ("<|im_start|>user\nWrite this record as JSON with the keys name, city and age: "
            f"{record}<|im_end|>\n<|im_start|>assistant\n")


def test_memory_drafts_from_earlier_requests_without_changing_output(smollm2_gguf):
    forced = SpeculativeConfig(drafter="lookup", draft_max=8, adaptive=False)
    memory = DraftMemory(max_tokens=10_000)
    gen = GenerationConfig(max_tokens=48)
    with Engine(smollm2_gguf, draft=None, runtime=RT, sampling=GREEDY, speculative=forced,
                memory=memory) as eng, \
            Engine(smollm2_gguf, draft=None, runtime=RT, sampling=GREEDY,
                   speculative=SpeculativeConfig(drafter="none")) as plain:
        assert eng.sources == ["lookup", "memory"]
        outs, stats = [], []
        for rec in RECORDS:
            _, ids, st = eng.complete(prompt(rec), gen, scope="k1")
            outs.append(ids)
            stats.append(st)
        assert memory.n_tokens > 0
        later = stats[-1].sources.get("memory", {"accepted": 0})
        assert later["accepted"] > 0                       # drafted from requests 1 and 2
        for rec, ids in zip(RECORDS, outs, strict=True):   # greedy output unchanged
            assert ids == plain.complete(prompt(rec), gen)[1]
        # another scope never drafts from k1's requests; an opted-out request is not stored
        n = memory.n_tokens
        _, _, st = eng.complete(prompt(RECORDS[0]), gen, scope="k2", use_memory=False)
        assert "memory" not in st.sources and memory.n_tokens == n
        _, _, st = eng.complete(prompt(RECORDS[1]), gen, scope="k2")
        assert st.sources.get("memory", {"drafted": 0})["drafted"] == 0


def test_stored_profile_skips_calibration(smollm2_gguf, tmp_path, monkeypatch):
    """A one-shot run stores the measured costs; the next run with the same files and
    settings starts decided (no calibration steps), unless --recalibrate."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    gen = GenerationConfig(max_tokens=24)
    spec = SpeculativeConfig(drafter="lookup")
    with Engine(smollm2_gguf, draft=None, runtime=RT, sampling=GREEDY, speculative=spec) as e:
        assert not e.controller.calibrated_from_profile
        e.complete("The capital of France is", gen)
    assert (tmp_path / "bridge" / "profiles.json").is_file()
    with Engine(smollm2_gguf, draft=None, runtime=RT, sampling=GREEDY, speculative=spec) as e:
        assert e.controller.calibrated_from_profile
        assert e.controller.calibration_need() is None
    again = SpeculativeConfig(drafter="lookup", recalibrate=True)
    with Engine(smollm2_gguf, draft=None, runtime=RT, sampling=GREEDY, speculative=again) as e:
        assert not e.controller.calibrated_from_profile


def test_per_call_overrides_are_restored(smollm2_gguf):
    with Engine(smollm2_gguf, draft=None, runtime=RT, sampling=GREEDY) as eng:
        eng.complete("Hello", GenerationConfig(max_tokens=4),
                     sampling=SamplingConfig(temp=0.9, seed=3), draft_max=2)
        assert eng.sampler.cfg == GREEDY and eng.controller.draft_max == 8


@pytest.mark.parametrize("drafter, sources", [("auto", ["lookup"]), ("none", []),
                                              ("lookup", ["lookup"])])
def test_sources_without_a_draft_file(smollm2_gguf, drafter, sources):
    with Engine(smollm2_gguf, runtime=RT, speculative=SpeculativeConfig(drafter=drafter)) as e:
        assert e.sources == sources
