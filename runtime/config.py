"""Runtime settings: one validated dataclass per concern, defaults declared once.

The click layer builds these from its options and passes them down unchanged.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from runtime.rpc import Endpoint


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``temp == 0`` is greedy decoding.

    The filters run in llama.cpp's order: the repeat/frequency/presence penalties, DRY,
    top-k, top-p, min-p, then temperature. Defaults are llama.cpp's (its server's for the
    windows), and every penalty is off by default. A window of -1 is the whole context.
    ``runtime.penalties`` has the formulas.
    """

    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64
    dry_sequence_breakers: tuple[str, ...] = ("\n", ":", "\"", "*")
    seed: int | None = None

    def __post_init__(self) -> None:
        _check(0.0 <= self.temp <= 100.0, f"--temp must be in [0, 100], got {self.temp}")
        _check(self.top_k >= 0, f"--top-k must be >= 0 (0 disables it), got {self.top_k}")
        _check(0.0 < self.top_p <= 1.0, f"--top-p must be in (0, 1], got {self.top_p}")
        _check(0.0 <= self.min_p < 1.0, f"--min-p must be in [0, 1), got {self.min_p}")
        _check(0.0 < self.repeat_penalty <= 10.0,
               f"--repeat-penalty must be in (0, 10] (1 disables it), got {self.repeat_penalty}")
        _check(self.repeat_last_n >= -1,
               f"--repeat-last-n must be >= 0, or -1 for the whole context, got "
               f"{self.repeat_last_n}")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            _check(math.isfinite(v) and -100.0 <= v <= 100.0,
                   f"--{name.replace('_', '-')} must be in [-100, 100] (0 disables it; "
                   f"OpenAI's range is [-2, 2]), got {v}")
        _check(math.isfinite(self.dry_multiplier) and 0.0 <= self.dry_multiplier <= 100.0,
               f"--dry-multiplier must be in [0, 100] (0 disables DRY), got "
               f"{self.dry_multiplier}")
        _check(math.isfinite(self.dry_base) and 1.0 <= self.dry_base <= 100.0,
               f"--dry-base must be in [1, 100], got {self.dry_base}")
        _check(self.dry_allowed_length >= 0,
               f"--dry-allowed-length must be >= 0, got {self.dry_allowed_length}")
        _check(self.dry_penalty_last_n >= -1,
               f"--dry-penalty-last-n must be >= 0, or -1 for the whole context, got "
               f"{self.dry_penalty_last_n}")
        breakers = self.dry_sequence_breakers
        _check(isinstance(breakers, tuple) and len(breakers) <= 32 and all(
            isinstance(b, str) and 0 < len(b.encode("utf-8")) <= 40 for b in breakers),
            "--dry-sequence-breaker: give at most 32 breakers (a tuple of strings in "
            "Python), each 1 to 40 bytes long")
        _check(self.seed is None or self.seed >= 0, f"--seed must be >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temp == 0.0

    @property
    def dry_on(self) -> bool:
        return self.dry_multiplier != 0.0 and self.dry_penalty_last_n != 0

    @property
    def repeat_on(self) -> bool:
        """The repeat, frequency or presence penalty acts (llama.cpp's ``penalties``)."""
        return (self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0) and self.repeat_last_n != 0

    @property
    def penalized(self) -> bool:
        """Some penalty changes the logits (they then depend on the tokens so far)."""
        return self.repeat_on or self.dry_on


DRAFTERS = ("auto", "lookup", "pruned", "none")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Draft-then-verify settings.

    Args:
        drafter: where drafts come from: ``auto`` (lookups in the context, plus the pruned
            draft GGUF when there is one), ``lookup``, ``pruned`` or ``none`` (plain).
        draft_max: most tokens drafted per step (gamma's upper bound).
        p_min: stop the pruned draft once its top-1 probability falls below this.
        adaptive: choose the source and gamma online from measured costs and acceptance
            (gamma 0 is plain decoding); off means always draft ``draft_max`` tokens.
        recalibrate: measure this device's costs afresh instead of reusing the profile
            stored by an earlier run with the same files and settings.
        forced_drafts: under a constraint (a JSON schema, a grammar), draft the text it
            forces (a source named ``grammar``); off only to measure what it buys. Plain
            decoding (``drafter="none"``) drafts nothing, forced text included.
    """

    drafter: str = "auto"
    draft_max: int = 8
    p_min: float = 0.5
    adaptive: bool = True
    recalibrate: bool = False
    forced_drafts: bool = True

    def __post_init__(self) -> None:
        _check(self.drafter in DRAFTERS,
               f"--drafter must be one of {', '.join(DRAFTERS)}, got {self.drafter!r}")
        _check(1 <= self.draft_max <= 32, f"--draft-max must be in 1..32, got {self.draft_max}")
        _check(0.0 <= self.p_min < 1.0, f"--p-min must be in [0, 1), got {self.p_min}")


@dataclass(frozen=True)
class RuntimeConfig:
    """llama.cpp resources for the target and draft contexts.

    ``exact`` evaluates the target so that a row's logits do not depend on its batch
    (``runtime.context.Numerics.exact``): greedy output is then token-identical with any
    drafting, at the cost of a two-row batch for every plain step (measured in README).
    ``backend_argmax`` lets llama.cpp take greedy choices inside its graph, so plain
    greedy decoding copies no logits out (``LlamaContext.eval_argmax``).

    ``parallel``: sequences evaluated together (a server's concurrent requests,
    ``runtime.batching``), each with ``n_ctx`` tokens of cache of its own, or, with
    ``kv_unified``, all sharing one cache of ``n_ctx`` tokens (less memory; a sequence's
    logits then move with where the others' cells sit). A long prompt joins the others'
    rounds ``prefill_chunk`` tokens at a time. ``parallel_auto``: ``parallel`` is the least,
    and the engine raises it (``auto_parallel``) while every sequence's cache fits in a
    quarter of the memory available once the model is loaded (a server's default).

    ``rpc``: llama.cpp RPC workers (``rpc-server``) that take the target's offloaded layers
    (``n_gpu_layers`` of them, as with llama.cpp's ``--rpc``); the draft stays on this
    machine unless ``draft_rpc`` names workers for it. ``rpc_timeout``: seconds one
    ``llama_decode`` may wait on the workers before the run ends with an error (ggml-rpc's
    sockets have no timeout of their own); the connection probe waits at most 5 s.
    """

    n_ctx: int = 4096
    n_batch: int = 512
    n_gpu_layers: int = -1  # -1: every layer, when the build has a GPU backend
    n_threads: int | None = None
    exact: bool = False
    backend_argmax: bool = True
    rpc: tuple[Endpoint, ...] = ()
    draft_rpc: tuple[Endpoint, ...] = ()
    rpc_timeout: float = 120.0
    parallel: int = 1
    prefill_chunk: int = 256
    kv_unified: bool = False
    parallel_auto: bool = False

    def __post_init__(self) -> None:
        _check(64 <= self.n_ctx <= 1 << 20, f"-c/--ctx must be in 64..1048576, got {self.n_ctx}")
        _check(1 <= self.n_batch <= 1 << 16, f"--batch must be >= 1, got {self.n_batch}")
        _check(self.n_gpu_layers >= -1, f"-ngl must be >= -1 (-1: all), got {self.n_gpu_layers}")
        _check(self.n_threads is None or self.n_threads >= 1,
               f"--threads must be >= 1, got {self.n_threads}")
        _check(1.0 <= self.rpc_timeout <= 86400.0,
               f"--rpc-timeout must be in 1..86400 seconds, got {self.rpc_timeout}")
        _check(1 <= self.parallel <= 256, f"--parallel must be in 1..256, got {self.parallel}")
        _check(not (self.exact and self.parallel > 1),
               "--exact evaluates one sequence at a time (a shared batch changes how "
               "llama.cpp rounds each row); use --parallel 1 with it")
        _check(1 <= self.prefill_chunk <= self.n_batch,
               f"--prefill-chunk must be in 1..{self.n_batch} (the batch size), got "
               f"{self.prefill_chunk}")
        _check(not (self.kv_unified and self.parallel == 1),
               "--kv-unified shares one cache among --parallel sequences, and there is one "
               "sequence here; drop it or raise --parallel")
        _check(not self.kv_unified or self.n_ctx >= 64 * self.parallel,
               f"-c/--ctx {self.n_ctx} leaves under 64 tokens per sequence for "
               f"--parallel {self.parallel} in a unified cache; raise -c or lower --parallel")

    @property
    def n_ctx_total(self) -> int:
        """Cells of the target's cache: ``n_ctx`` per sequence, or ``n_ctx`` shared."""
        return self.n_ctx if self.kv_unified else self.n_ctx * self.parallel


# `bridge serve`'s sequences unless told: at least llama-server's default slots, and up to
# SERVE_PARALLEL_MAX where their caches fit in KV_SHARE of the memory available. On the
# 2-core Xeon with SmolLM2 at 16 clients, 16 sequences served 140 tok/s against 104 for 4
# (llama-server's 4 slots: 118), and the first token after 0.29 s against 5.07 s
# (bench/results/2026-12-07-parallel-3-xeon-avx512.md).
SERVE_PARALLEL = 4
SERVE_PARALLEL_MAX = 16
KV_SHARE = 0.25


def serve_parallel(exact: bool, pruned: bool = False) -> int:
    """``--parallel``'s default for a server: one sequence under ``--exact``, and when a
    pruned draft is asked for by name (its context drafts for one sequence); else
    SERVE_PARALLEL, which the engine raises with ``auto_parallel`` once it knows the
    model's cache size (``RuntimeConfig.parallel_auto``)."""
    return 1 if exact or pruned else SERVE_PARALLEL


def auto_parallel(least: int, kv_bytes_per_sequence: int, memory: int | None,
                  on_gpu: bool) -> int:
    """The most sequences, doubling from ``least`` up to SERVE_PARALLEL_MAX, whose caches of
    ``kv_bytes_per_sequence`` each fit in KV_SHARE of ``memory`` (``available_memory``);
    ``least`` when the cache lives on a GPU (its memory is not RAM) or memory is unknown."""
    n = least
    if on_gpu or not memory:
        return n
    while 2 * n <= SERVE_PARALLEL_MAX and 2 * n * kv_bytes_per_sequence <= KV_SHARE * memory:
        n *= 2
    return n


def available_memory() -> int | None:
    """Bytes of memory free for new allocations now (Linux's MemAvailable: what the
    weights already loaded and other processes leave), else the machine's RAM, else None.
    Four 7.38B servers side by side took 8.3 GiB each with their caches sized from RAM
    alone, and the kernel killed one."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass(frozen=True)
class GenerationConfig:
    """One answer: how long it may get and where it stops."""

    max_tokens: int = 256
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(self.max_tokens >= 1, f"-n must be >= 1, got {self.max_tokens}")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
