"""The exactness rule the tests assert, with the bound measured on this machine.

llama.cpp's logits move by up to ``d`` between a one-token step and a batch
(``runtime.numerics``). Two logits that each move by at most ``d`` can swap order only
when their gap is below ``2 d``. So a speculative answer may leave plain decoding only at
a position where plain decoding's own top-2 margin is below twice the measured bound; with
``--exact`` (``d == 0``) it may not leave it at all.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from runtime.context import LlamaContext, LlamaModel, Numerics
from runtime.numerics import BatchBound, measure_bound, measure_shared_bound
from runtime.sampling import gumbel_noise

# the tests' llama.cpp settings (tests/test_speculative.py's RT)
N_CTX, N_THREADS = 1024, 1
# Prose and code: the bound is the largest difference seen, and it varies with the text
# (Gemma 3 on a Zen 4 CPU: 1.5 after the first, 5.5 after a code prompt).
_BOUND_PROMPTS = ("<|im_start|>user\nExplain how a hash map works.<|im_end|>\n"
                  "<|im_start|>assistant\n",
                  "Write a Python function that returns the n-th Fibonacci number, then "
                  "explain it.")


@cache
def batch_bound(gguf: Path, exact: bool = False) -> BatchBound:
    """This machine's bound for ``gguf`` under the tests' settings, measured once per run."""
    numerics = Numerics.exact() if exact else Numerics()
    with LlamaModel(gguf, repack=numerics.repack) as model:
        bound = max((measure_bound(lambda: LlamaContext(model, N_CTX, n_threads=N_THREADS,
                                                        numerics=numerics),
                                   model.tokenize(p, True, True), n_positions=64)
                     for p in _BOUND_PROMPTS), key=lambda b: b.max_abs)
    print(f"{gguf.name}{' (exact)' if exact else ''}: {bound.describe()}")
    return bound


@cache
def shared_bound(gguf: Path, unified: bool = False) -> BatchBound:
    """The bound for a sequence in shared rounds (``runtime.batching``) against plain
    decoding alone, on this machine: the larger of the verify-batch bound and the shared
    rounds' own (other sequences' rows beside it; with ``unified``, its cells among
    theirs)."""
    alone = batch_bound(gguf)
    with LlamaModel(gguf) as model:
        # the others' prompts are evaluated in the same first round: a longer one makes a
        # wider batch (seen on a 2-core Xeon: bitwise equal beside 20-token prompts, up to
        # 1.0 apart beside a 50-token one)
        others = [model.tokenize(p, True, True) for p in reversed(_BOUND_PROMPTS)]
        others.append(model.tokenize(" ".join(_BOUND_PROMPTS) * 2, True, True))
        shared = max((measure_shared_bound(
            lambda n: LlamaContext(model, N_CTX * n, n_threads=N_THREADS, n_seq=n,
                                   unified=unified),
            model.tokenize(p, True, True), others, n_positions=48)
            for p in _BOUND_PROMPTS), key=lambda b: b.max_abs)
    print(f"{gguf.name} in shared rounds{' (unified)' if unified else ''}: "
          f"{shared.describe()}")
    return max(alone, shared, key=lambda b: b.max_abs)


def plain_margin(model: LlamaModel, prompt: list[int], plain: list[int], sampler=None,
                 numerics: Numerics | None = None) -> float:
    """Plain decoding's own top-2 gap for the token after ``prompt + plain``: a replay of
    plain decoding (the prompt as one batch, then one token at a time), as an engine
    with an empty cache runs it. Under sampling, the gap of the perturbed scores
    z / temp + G(seed, position, x) that the coupled draw maximizes."""
    with LlamaContext(model, N_CTX, n_threads=N_THREADS, numerics=numerics) as ctx:
        row = ctx.eval(prompt)[0]
        for tok in plain:
            row = ctx.eval([tok])[0]
        row = np.array(row, dtype=np.float64)
    if sampler is not None and not sampler.cfg.greedy:
        cand, z = sampler.candidates(row, [])
        row = z + gumbel_noise(sampler.seed, len(prompt) + len(plain), cand)
    row = np.sort(row)
    return float(row[-1] - row[-2])


def first_divergence(a: list[int], b: list[int]) -> int:
    pairs = enumerate(zip(a, b, strict=False))
    return next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))


def same_or_near_tie(model: LlamaModel, prompt, ids_spec: list[int], ids_plain: list[int],
                     bound: BatchBound, sampler=None) -> bool:
    """True when identical. Otherwise assert that the first divergence sits where plain
    decoding's top-2 margin is within twice the measured bound (rounding can swap those);
    a divergence anywhere else is a bug. Returns False after printing the figures."""
    if ids_spec == ids_plain:
        return True
    i = first_divergence(ids_spec, ids_plain)
    ctx = model.tokenize(prompt, True, True) if isinstance(prompt, str) else list(prompt)
    margin = plain_margin(model, ctx, ids_plain[:i], sampler)
    temp = sampler.cfg.temp if sampler is not None else 0.0
    limit = bound.swap_margin(temp)
    assert margin < limit, (f"{str(prompt)[:40]!r}: diverged from plain decoding at token {i} "
                            f"where its top-2 margin is {margin:.4f}, but batched and "
                            f"single-token logits differ by at most {bound.max_abs:.4g} here, "
                            f"so rounding can only swap margins below {limit:.4g}")
    print(f"divergence at token {i}: margin {margin:.4f} < {limit:.4g} (2x the bound)")
    return False
