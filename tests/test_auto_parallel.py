"""How many sequences `bridge serve` opens when --parallel is not given: at least 4, as
llama-server's default slots, doubled up to 16 while every sequence's KV cache fits in a
quarter of this machine's RAM, on CPUs (``runtime.config.auto_parallel``)."""

from __future__ import annotations

import pytest

from runtime.config import SERVE_PARALLEL_MAX, RuntimeConfig, auto_parallel, physical_memory

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
    assert physical_memory() > 256 << 20


def test_the_cache_size_of_a_token(smollm2_gguf):
    """SmolLM2: 30 layers, 3 KV heads of 64 for K and for V, 2 bytes each (F16)."""
    from runtime.context import LlamaModel

    with LlamaModel(smollm2_gguf) as m:
        assert m.kv_bytes_per_token == 30 * 3 * (64 + 64) * 2
    with LlamaModel(smollm2_gguf, vocab_only=True) as m, pytest.raises(ValueError,
                                                                       match="vocabulary"):
        m.kv_bytes_per_token  # noqa: B018


def test_an_engine_asked_for_at_least_four_opens_what_fits(smollm2_gguf):
    from runtime.config import SpeculativeConfig
    from runtime.engine import Engine
    from runtime.native import gpu_offload_supported

    rt = RuntimeConfig(n_ctx=512, n_threads=1, parallel=4, parallel_auto=True)
    with Engine(smollm2_gguf, draft=None, runtime=rt,
                speculative=SpeculativeConfig(drafter="none")) as engine:
        want = auto_parallel(4, engine.model.kv_bytes_per_token * 512, physical_memory(),
                             on_gpu=gpu_offload_supported())
        assert engine.runtime.parallel == want == len(engine.lanes)
        assert len(engine.shared.views) == want
    rt = RuntimeConfig(n_ctx=512, n_threads=1, parallel=4)  # --parallel given: kept
    with Engine(smollm2_gguf, draft=None, runtime=rt,
                speculative=SpeculativeConfig(drafter="none")) as engine:
        assert len(engine.lanes) == 4
