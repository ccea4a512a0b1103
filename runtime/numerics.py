"""How far llama.cpp's logits move between a one-token step and a verify batch, measured.

llama.cpp's logits for a position depend on how many tokens share its batch (different
kernels, different summation orders), so speculative decoding can only promise what the
numbers allow. Two logits that each move by at most ``d`` can swap order only when their
gap is below ``2 d``: a greedy answer can leave plain decoding only at a position where the
full model's top-2 margin is within twice this machine's bound. The bound is a property of
the CPU, the build and the model, so it is measured here, never written down.

``measure_bound`` decodes greedily one token at a time (plain decoding's own shapes), then
re-evaluates the same tokens in chunks of each verify width, and compares the rows of the
same positions: the largest absolute difference over the whole vocabulary is the bound.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from runtime.context import LlamaContext

log = logging.getLogger(__name__)

# Verify batches hold the pending token plus gamma drafts: 2, 5 and 9 rows cover gamma 1,
# 4 and 8, the common cases, and every kernel switch seen so far (1 row vs 2+, 4-row gemm
# groups with leftovers, Gemma 3's at 8 rows); 32 rows stand for a prompt chunk, since two
# runs may split a prompt differently (a cached prefix, a chat turn).
DEFAULT_WIDTHS = (2, 3, 5, 9, 32)


@dataclass(frozen=True)
class BatchBound:
    """Per-position largest |logit difference| between one-token and batched evaluation.

    Attributes:
        max_abs: the bound d: the largest difference seen at any position and width.
        median_abs: the median over positions of the per-position largest difference.
        n_positions: positions compared per width.
        widths: batch widths compared against one-token steps.
        n_identical: positions (over all widths) whose rows were bitwise equal.
        argmax_flips: positions whose argmax differed.
        seconds: time the measurement took.
    """

    max_abs: float
    median_abs: float
    n_positions: int
    widths: tuple[int, ...]
    n_identical: int
    argmax_flips: int
    seconds: float

    @property
    def exact(self) -> bool:
        return self.max_abs == 0.0

    def swap_margin(self, temp: float = 0.0) -> float:
        """The top-2 margin below which rounding may swap the two: 2 d (over the
        temperature for the perturbed scores of a sampled draw)."""
        return 2 * self.max_abs / (temp if temp > 0 else 1.0)

    def describe(self) -> str:
        n = self.n_positions * len(self.widths)
        if self.exact:
            return (f"batched and single-token logits are bitwise equal here ({n} rows "
                    f"compared at batch widths {', '.join(map(str, self.widths))})")
        return (f"batched and single-token logits differ by up to {self.max_abs:.3g} here "
                f"(median {self.median_abs:.3g}; {self.n_identical}/{n} rows bitwise equal, "
                f"argmax differs at {self.argmax_flips}); outputs may differ from plain "
                f"decoding where the top-2 margin is below {self.swap_margin():.3g}")

    def as_dict(self) -> dict:
        return {"max_abs": round(self.max_abs, 6), "median_abs": round(self.median_abs, 6),
                "n_positions": self.n_positions, "widths": list(self.widths),
                "n_identical": self.n_identical, "argmax_flips": self.argmax_flips,
                "seconds": round(self.seconds, 2)}


def measure_bound(make_context: Callable[[], LlamaContext], prompt: Sequence[int],
                  n_positions: int = 128, widths: Sequence[int] = DEFAULT_WIDTHS
                  ) -> BatchBound:
    """Measure ``BatchBound`` on fresh contexts from ``make_context`` (the settings under
    test: KV type, flash attention, threads, exact mode).

    Args:
        make_context: builds an empty context of the model and settings to measure.
        prompt: token ids to start from (evaluated as one batch in both passes, as
            plain and speculative decoding both do).
        n_positions: greedy tokens decoded one at a time and compared.
        widths: verify-batch widths to compare against.
    """
    t0 = time.perf_counter()
    prompt = list(prompt)
    with make_context() as ctx:
        if len(prompt) + n_positions + max(widths) > ctx.n_ctx:
            raise ValueError(f"{len(prompt)} prompt + {n_positions} tokens do not fit a "
                             f"context of {ctx.n_ctx}")
        # plain decoding: single[j] is the row of input tokens[j] at position P + j
        single = np.empty((n_positions, ctx.model.n_vocab), dtype=np.float32)
        tokens = [int(np.argmax(ctx.eval(prompt)[-1]))]
        for j in range(n_positions):
            single[j] = ctx.eval([tokens[-1]])[0]
            tokens.append(int(np.argmax(single[j])))
    per_pos: list[float] = []
    identical = flips = 0
    for width in widths:
        batched = np.empty_like(single)
        with make_context() as ctx:
            ctx.eval(prompt)
            for start in range(0, n_positions, width):
                chunk = tokens[start:min(start + width, n_positions)]
                n_real = len(chunk)
                # the last chunk is padded to the same width, as a verify batch with
                # rejected drafts is
                rows = ctx.eval(chunk + [chunk[-1]] * (width - n_real), all_logits=True)
                batched[start:start + n_real] = rows[:n_real]
                ctx.truncate(len(prompt) + start + n_real)
        worst = np.abs(batched - single).max(axis=1)  # 0 exactly where bitwise equal
        per_pos.extend(float(x) for x in worst)
        identical += int((worst == 0).sum())
        flips += int((batched.argmax(axis=1) != single.argmax(axis=1)).sum())
    bound = BatchBound(max(per_pos), statistics.median(per_pos), n_positions,
                       tuple(widths), identical, flips, time.perf_counter() - t0)
    log.info("%s", bound.describe())
    return bound


def measure_shared_bound(make_context: Callable[[int], LlamaContext], prompt: Sequence[int],
                         others: Sequence[Sequence[int]], n_positions: int = 64,
                         widths: Sequence[int] = (1, 3, 5, 2)) -> BatchBound:
    """``BatchBound`` for a sequence that shares its rounds and its unified KV cache with
    others (``runtime.batching``), against plain decoding alone: a row's logits can move
    with the rows beside it and with where its cells sit among the others' cells.

    Plain decoding runs in a one-sequence context from ``make_context(1)``; then the same
    tokens run one a round in a context of ``1 + len(others)`` sequences, each round also
    holding every other sequence's next rows (``widths`` in turn: a plain step, drafts),
    whose rejected tail is removed afterwards so that cells are freed and reused, as
    verification does. ``widths`` in the result are the other sequences' row counts.
    """
    t0 = time.perf_counter()
    prompt = list(prompt)
    n_other = len(others)
    with make_context(1) as ctx:
        single = np.empty((n_positions, ctx.model.n_vocab), dtype=np.float32)
        tokens = [int(np.argmax(ctx.eval(prompt)[-1]))]
        for j in range(n_positions):
            single[j] = ctx.eval([tokens[-1]])[0]
            tokens.append(int(np.argmax(single[j])))
    shared = np.empty_like(single)
    with make_context(1 + n_other) as ctx:
        seqs = [prompt, *map(list, others)]
        rows: list[tuple[int, int, int]] = [(t, p, s) for s, seq in enumerate(seqs)
                                            for p, t in enumerate(seq)]
        for at in range(0, len(rows), ctx.n_batch):
            part = rows[at:at + ctx.n_batch]
            ctx.decode_rows([r[0] for r in part], [r[1] for r in part],
                            [r[2] for r in part], [False] * len(part))
        past = [len(seq) for seq in seqs]
        for j in range(n_positions):
            w = widths[j % len(widths)]
            toks, pos, seq = [tokens[j]], [past[0]], [0]
            for s in range(1, 1 + n_other):
                src = seqs[s]
                toks += [src[(past[s] + i) % len(src)] for i in range(w)]
                pos += list(range(past[s], past[s] + w))
                seq += [s] * w
            out = ctx.decode_rows(toks, pos, seq, [True] + [False] * (len(toks) - 1))
            shared[j] = out[0]
            past[0] += 1
            for s in range(1, 1 + n_other):  # keep one row, as a rejected draft does
                ctx.remove_seq(s, past[s] + 1)
                past[s] += 1
    worst = np.abs(shared - single).max(axis=1)
    bound = BatchBound(float(worst.max()), float(np.median(worst)), n_positions,
                       tuple(widths), int((worst == 0).sum()),
                       int((shared.argmax(axis=1) != single.argmax(axis=1)).sum()),
                       time.perf_counter() - t0)
    log.info("shared rounds: %s", bound.describe())
    return bound


def exact_width(ctx: LlamaContext, probe: Sequence[int], max_width: int) -> int:
    """The widest verify batch whose rows are bitwise equal to one-token steps in ``ctx``
    (1 when even a 2-row batch differs), probing widths 2..``max_width`` once.

    Exact mode caps drafts with it: one such width is enough evidence because a kernel
    switch changes the rounding of practically every row (in Gemma 3 on a Zen 4 CPU, widths
    2-7 matched at all 192 positions tried and width 8 at none). ``ctx`` is left empty.
    """
    probe = list(probe)
    n = len(probe)
    if n < 2:
        raise ValueError("the probe needs at least 2 tokens")
    tokens = [probe[(n + i) % n] for i in range(max_width)]  # any valid tokens will do
    ctx.reset()
    try:
        ctx.eval(probe)
        single = np.stack([np.array(ctx.eval([t])[0]) for t in tokens])
        width = 1
        for w in range(2, max_width + 1):
            ctx.truncate(n)
            if not np.array_equal(np.array(ctx.eval(tokens[:w], all_logits=True)),
                                  single[:w]):
                break
            width = w
    finally:
        ctx.reset()
    return width
