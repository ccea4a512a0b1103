"""The speculation cost model: one home for the formulas that the controller, the bench and
the exporter's ``--prune auto`` all use.

A step drafts gamma tokens at cost c each and verifies gamma + 1 tokens in one batch at
cost V(gamma + 1); all costs are in one unit (seconds, or multiples of a plain step).
With per-token acceptance alpha (drafts accepted independently until the first rejection;
Leviathan et al. 2023) a step emits in expectation

    E(gamma) = 1 + alpha + ... + alpha^gamma = (1 - alpha^(gamma + 1)) / (1 - alpha)

tokens, so speculation runs at E(gamma) / (gamma * c + V(gamma + 1)) tokens per unit of
cost, against 1 / V(1) for plain decoding:

    speedup(gamma) = E(gamma) * V(1) / (gamma * c + V(gamma + 1)).

In a batch shared with other sequences (``runtime.batching``), whose rows R_o yield T_o
tokens per round, one sequence's gamma changes the whole round, and the round's throughput
is what counts:

    rate(gamma) = (T_o + E(gamma)) / (gamma * c + V(R_o + gamma + 1)),

so a draft row is worth adding only while its expected yield beats what it adds to the
round's cost for everyone. With R_o = T_o = 0 this is the single-sequence rate. As the
batch fills on a CPU, V grows about linearly in R and drafts shrink to zero by themselves;
on a nearly flat curve (a GPU) they stay.

With a cache stream per sequence, llama.cpp splits a round "equally"
(``llama_batch_allocr::split_equal``): the first micro-batch takes as many rows from each
sequence as the narrowest has, so beside one-row steps a sequence's draft rows form a
graph computation of their own, and the round costs

    V(R_o + 1) + V(gamma)          (gamma > 0, R_o > 0; ``split``)

instead of V(R_o + gamma + 1): the second graph pays its fixed part again. On the 2-core
Xeon with SmolLM2, 16 one-row sequences took 107.6 ms a round and, with drafts beside,
157.6 ms for 18.7 rows (``bench/results/2026-12-07-parallel-3-xeon-avx512.md``).
"""

from __future__ import annotations

from collections.abc import Callable

VerifyCost = Callable[[int], float]  # k -> cost of evaluating k tokens in one batch


def expected_tokens(gamma: int, alpha: float) -> float:
    """E(gamma) = (1 - alpha^(gamma + 1)) / (1 - alpha): tokens emitted per step."""
    if gamma <= 0:
        return 1.0
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def step_cost(gamma: int, c_draft: float, verify: VerifyCost, overhead: float = 0.0) -> float:
    """gamma * c + V(gamma + 1) + overhead: the cost of one step (gamma = 0: a plain one)."""
    return gamma * c_draft + verify(gamma + 1) + overhead


def speedup(gamma: int, alpha: float, c_draft: float, verify: VerifyCost) -> float:
    """E(gamma) * V(1) / (gamma * c + V(gamma + 1)): tokens per unit cost against plain."""
    return expected_tokens(gamma, alpha) * verify(1) / step_cost(gamma, c_draft, verify)


def round_cost(gamma: int, verify: VerifyCost, rows_others: int = 0,
               split: bool = False) -> float:
    """What a round costs with ``gamma`` draft rows of one sequence beside its own step and
    the others' ``rows_others`` rows: V(R_o + gamma + 1), or with ``split`` (a stream per
    sequence) V(R_o + 1) + V(gamma) once others share the round."""
    if split and gamma > 0 and rows_others > 0:
        return verify(rows_others + 1) + verify(gamma)
    return verify(rows_others + gamma + 1)


def batch_rate(gamma: int, alpha: float, c_draft: float, verify: VerifyCost,
               overhead: float = 0.0, others: tuple[int, float] = (0, 0.0),
               split: bool = False) -> float:
    """(T_o + E(gamma)) / (gamma * c + round_cost + overhead): tokens per unit cost of a
    round whose other sequences put ``others`` = (R_o rows, T_o tokens) in it."""
    rows, tokens = others
    return (tokens + expected_tokens(gamma, alpha)) / (
        gamma * c_draft + round_cost(gamma, verify, rows, split) + overhead)


def best_gamma(alpha: float, c_draft: float, verify: VerifyCost, gamma_max: int,
               gamma_min: int = 0, overheads: tuple[float, float] = (0.0, 0.0),
               others: tuple[int, float] = (0, 0.0), split: bool = False
               ) -> tuple[int, float]:
    """(gamma, tokens per unit cost) maximizing ``batch_rate`` over gamma_min..gamma_max
    (alone in its batch, ``others`` = (0, 0): E(gamma) / T(gamma)).

    ``overheads`` = (per plain step, per speculative step), e.g. Python time in seconds.
    """
    def rate(g: int) -> float:
        return batch_rate(g, alpha, c_draft, verify, overheads[g > 0], others, split)

    return max(((g, rate(g)) for g in range(gamma_min, gamma_max + 1)), key=lambda gr: gr[1])


def linear_verify(slope: float) -> VerifyCost:
    """V(k) = 1 + slope * (k - 1), in plain steps (slope 1: batching buys nothing)."""
    return lambda k: 1.0 + slope * (k - 1)


def flat_verify(k_flat: int = 8) -> VerifyCost:
    """V(k) = max(1, k / k_flat): a GPU, nearly flat up to k_flat tokens."""
    return lambda k: max(1.0, k / k_flat)
