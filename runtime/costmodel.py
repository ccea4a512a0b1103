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


def best_gamma(alpha: float, c_draft: float, verify: VerifyCost, gamma_max: int,
               gamma_min: int = 0, overheads: tuple[float, float] = (0.0, 0.0)
               ) -> tuple[int, float]:
    """(gamma, tokens per unit cost) maximizing E(gamma) / T(gamma) over gamma_min..gamma_max.

    ``overheads`` = (per plain step, per speculative step), e.g. Python time in seconds.
    """
    def rate(g: int) -> float:
        return expected_tokens(g, alpha) / step_cost(g, c_draft, verify, overheads[g > 0])

    return max(((g, rate(g)) for g in range(gamma_min, gamma_max + 1)), key=lambda gr: gr[1])


def linear_verify(slope: float) -> VerifyCost:
    """V(k) = 1 + slope * (k - 1), in plain steps (slope 1: batching buys nothing)."""
    return lambda k: 1.0 + slope * (k - 1)


def flat_verify(k_flat: int = 8) -> VerifyCost:
    """V(k) = max(1, k / k_flat): a GPU, nearly flat up to k_flat tokens."""
    return lambda k: max(1.0, k / k_flat)
