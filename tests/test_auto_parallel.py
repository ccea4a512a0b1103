"""How many sequences `bridge serve` opens when --parallel is not given: at least 4, as
llama-server's default slots, doubled up to 16 while every sequence's KV cache fits in a
quarter of the memory available once the model is loaded, on CPUs
(``runtime.config.auto_parallel``)."""

from __future__ import annotations

import pytest

from runtime.config import SERVE_PARALLEL_MAX, RuntimeConfig, auto_parallel, available_memory

GIB = 1 << 30


@pytest.mark.parametrize("per_sequence, memory, on_gpu, expected", [
    (189 << 20, 24 * GIB, False, 16),   # SmolLM2 at -c 8192 on a 24 GiB machine
    (512 << 20, 16 * GIB, False, 8),    # an 8B's 4096 tokens on a 16 GiB laptop
    (1 << 30, 24 * GIB, False, 4),      # an 8B's 8192 tokens: 8 would take 8 of 24 GiB
    (1 << 30, 2 * GIB, False, 4),       # never below the least
    (1 << 20, 24 * GIB, True, 4),       # the cache on a GPU: its memory is not RAM
    (1 << 20, None, False, 4),          # RAM unknown
])
def test_sequences_double_while_their_caches_fit(per_sequence, memory, on_gpu, expected):
    assert auto_parallel(4, per_sequence, memory, on_gpu) == expected
    assert auto_parallel(4, per_sequence, memory, on_gpu) <= SERVE_PARALLEL_MAX


def test_this_machine_says_its_memory():
    free = available_memory()
    assert 64 << 20 < free
    import os
    assert free <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_the_cache_size_of_a_token(smollm2_gguf):
    """SmolLM2: 30 layers, 3 KV heads of 64 for K and for V, 2 bytes each (F16)."""
    from runtime.context import LlamaModel

    with LlamaModel(smollm2_gguf) as m:
        assert m.kv_bytes_per_token == 30 * 3 * (64 + 64) * 2
    with LlamaModel(smollm2_gguf, vocab_only=True) as m, pytest.raises(ValueError,
                                                                       match="vocabulary"):
        m.kv_bytes_per_token  # noqa: B018


@pytest.mark.parametrize("memory, expected", [(1 << 30, 16), (400 << 20, 8), (100 << 20, 4)])
def test_an_engine_asked_for_at_least_four_opens_what_fits(smollm2_gguf, monkeypatch,
                                                           memory, expected):
    """SmolLM2 at -c 512: 11.25 MiB of cache a sequence, so 16 fit in a quarter of 1 GiB,
    8 in a quarter of 400 MiB, and 100 MiB leaves the least."""
    import runtime.loading
    from runtime.config import SpeculativeConfig
    from runtime.engine import Engine

    monkeypatch.setattr(runtime.loading, "available_memory", lambda: memory)
    monkeypatch.setattr(runtime.loading, "gpu_offload_supported", lambda: False)
    rt = RuntimeConfig(n_ctx=512, n_threads=1, parallel=4, parallel_auto=True)
    with Engine(smollm2_gguf, draft=None, runtime=rt,
                speculative=SpeculativeConfig(drafter="none")) as engine:
        assert engine.runtime.parallel == expected == len(engine.lanes)
        assert len(engine.shared.views) == expected


def test_a_given_count_is_kept(smollm2_gguf):
    from runtime.config import SpeculativeConfig
    from runtime.engine import Engine

    rt = RuntimeConfig(n_ctx=512, n_threads=1, parallel=4)  # --parallel given
    with Engine(smollm2_gguf, draft=None, runtime=rt,
                speculative=SpeculativeConfig(drafter="none")) as engine:
        assert len(engine.lanes) == 4 == engine.runtime.parallel
