"""``--prune auto``: pick the ratio whose predicted speculative speedup is highest.

Model of one speculative step with a draft of gamma tokens and per-token acceptance alpha
(the draft's held-out top-1 agreement with the full model); the formulas themselves live
in ``runtime.costmodel``, shared with the runtime's controller and the bench:

- expected tokens per step (Leviathan et al. 2023): E = (1 - alpha^(gamma+1)) / (1 - alpha);
- time per step, in units of one plain full-model step: gamma * c_draft + V(gamma + 1),
  where c_draft is the bytes a draft step reads over the bytes a full step reads (decoding
  is memory-bound: layers kept + output head, which on Gemma 3 270M outweighs all layers),
  and V(k) the cost of verifying k tokens in one batch, from a device profile;
- speedup = E / time. Plain decoding is 1.0; speculation pays only above it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import gguf

from exporters.loading import block_tensor
from runtime import costmodel

MAX_GAMMA = 8
# Verify cost of k tokens relative to one (runtime.costmodel): measured 1 + 0.6 (k - 1) on
# the project's 2-core CPU (SmolLM2 Q4_1); about flat up to k = 8 on GPUs, then linear.
_VERIFY: dict[str, costmodel.VerifyCost] = {"cpu": costmodel.linear_verify(0.6),
                                            "gpu": costmodel.flat_verify(8)}
PROFILES = tuple(_VERIFY)


def verify_cost(profile: str, k: int) -> float:
    """V(k) of ``profile``, in plain steps."""
    return _verify(profile)(k)


def _verify(profile: str) -> costmodel.VerifyCost:
    try:
        return _VERIFY[profile]
    except KeyError:
        raise ValueError(f"unknown device profile {profile!r}; choose one of "
                         f"{', '.join(PROFILES)}") from None


def default_profile() -> str:
    """``gpu`` when llama.cpp can offload to a GPU, else ``cpu``."""
    from runtime.native import gpu_offload_supported

    return "gpu" if gpu_offload_supported() else "cpu"


def expected_tokens(alpha: float, gamma: int) -> float:
    """E = (1 - alpha^(gamma+1)) / (1 - alpha): tokens emitted per verify step."""
    return costmodel.expected_tokens(gamma, alpha)


def speedup(alpha: float, c_draft: float, profile: str, gamma: int) -> float:
    """Predicted speedup over plain decoding at ``gamma`` drafted tokens per step."""
    return costmodel.speedup(gamma, alpha, c_draft, _verify(profile))


def best_gamma(alpha: float, c_draft: float, profile: str) -> tuple[int, float]:
    """(gamma, speedup) with the highest predicted speedup, gamma in 1..MAX_GAMMA.

    gamma = 0 (plain decoding) is left out: the report states what the draft would do.
    Both profiles have V(1) = 1, so tokens per unit cost is already the speedup.
    """
    return costmodel.best_gamma(alpha, c_draft, _verify(profile), MAX_GAMMA, gamma_min=1)


@dataclass(frozen=True)
class ByteProfile:
    """Bytes one decode step reads: the output head (+ final norm) and each layer."""

    shared: int
    per_layer: list[int]

    def draft_fraction(self, dropped: Sequence[int]) -> float:
        """c_draft: a draft step's bytes over a full step's."""
        gone = sum(self.per_layer[i] for i in set(dropped))
        total = self.shared + sum(self.per_layer)
        return (total - gone) / total


def byte_profile(reader: gguf.GGUFReader, n_layers: int) -> ByteProfile:
    """Per-layer and shared bytes from a GGUF's tensor sizes.

    The token embedding is read one row per token, so it counts only when it doubles as
    the output head (tied embeddings, no ``output.weight``).
    """
    per_layer = [0] * n_layers
    names = {t.name for t in reader.tensors}
    shared = 0
    for t in reader.tensors:
        if block := block_tensor(t.name):
            per_layer[block[0]] += int(t.n_bytes)
        elif t.name != "token_embd.weight" or "output.weight" not in names:
            shared += int(t.n_bytes)
    return ByteProfile(shared, per_layer)


@dataclass(frozen=True)
class Candidate:
    n_drop: int
    alpha: float
    c_draft: float
    gamma: int
    speedup: float


@dataclass(frozen=True)
class AutoDecision:
    chosen: Candidate
    pays: bool
    reason: str
    candidates: list[Candidate]


def decide(alphas: Mapping[int, float], drops: Mapping[int, Sequence[int]],
           costs: ByteProfile, profile: str) -> AutoDecision:
    """The drop count with the best predicted speedup, and why, in words."""
    cands = []
    for n in sorted(alphas):
        c = costs.draft_fraction(drops[n])
        g, s = best_gamma(alphas[n], c, profile)
        cands.append(Candidate(n, alphas[n], c, g, s))
    best = max(cands, key=lambda c: c.speedup)
    n_layers = len(costs.per_layer)
    if best.speedup > 1.0:
        reason = (f"dropping {best.n_drop}/{n_layers} layers: held-out acceptance "
                  f"{best.alpha:.2f}, draft reads {best.c_draft:.0%} of the full model's "
                  f"bytes, {best.gamma} drafted tokens per step; predicted "
                  f"{best.speedup:.2f}x on the '{profile}' profile")
        return AutoDecision(best, True, reason, cands)
    reason = (f"no ratio pays on the '{profile}' profile: the best, {best.n_drop}/{n_layers} "
              f"layers dropped (acceptance {best.alpha:.2f}, draft {best.c_draft:.0%} of "
              f"the bytes), predicts {best.speedup:.2f}x, below plain decoding; the draft "
              f"is written at that ratio anyway and the runtime will decode plainly unless "
              f"it measures better")
    return AutoDecision(best, False, reason, cands)
