"""How long layer scoring will take, measured and said before the slow part starts.

A few small forward passes (``probe``) give three costs on this machine: one generation
step for a batch of prompts, one token through every layer, and one position through the
output head. The stages are then counted in those units (``predict``):

- calibration text: ``n_new`` generation steps per batch of ``GEN_BATCH`` prompts, plus two
  full passes over each text (the full model's reference answers, and the trace that
  scoring replays);
- scoring: ``bi`` and ``angular`` run every layer once; ``fit`` a forward and a backward
  (about 3 passes, head included); ``greedy`` reruns, for every candidate layer c at every
  step, the layers above c and the head; ``shortlist`` does the same over its K candidates
  at the first step and a few at each later one, plus one ``bi`` pass. Candidates are
  assumed spread evenly over the layers, so the figure is an estimate, not a bound;
- held-out acceptance: one draft pass over the held-out texts per drop count.

On SmolLM2 and a 2-core CPU the probe takes well under a second; on an 8B model on a CPU
it takes about as long as one calibration prompt's reference pass.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from exporters.calibration import GEN_BATCH
from exporters.scoring import SHORTLIST_RECHECK
from exporters.torch_model import LayerRunner

log = logging.getLogger(__name__)

# fit: a forward pass, plus a backward pass that costs about twice as much
_FIT_PASSES = 3.0


@dataclass(frozen=True)
class PassCosts:
    """Seconds for: one generation step of ``GEN_BATCH`` prompts; one token through all
    layers; one position through the final norm and output head."""

    gen_step: float
    token_layers: float
    head_position: float


@dataclass(frozen=True)
class Estimate:
    calibration: float
    scoring: float
    heldout: float

    @property
    def total(self) -> float:
        return self.calibration + self.scoring + self.heldout


@torch.no_grad()
def probe(runner: LayerRunner, ids: Sequence[int]) -> PassCosts:
    """Time small passes over ``ids`` (one calibration text, about the real length)."""
    device = runner.head.weight.device
    step = torch.tensor([[ids[0]]] * GEN_BATCH, device=device)
    seq = torch.tensor([list(ids)], device=device)
    # the fastest of two runs: a first call for a new shape allocates and picks kernels,
    # and a shared machine adds noise that only ever slows a run down
    gen_step = _timed(lambda: runner.model(input_ids=step, use_cache=False))
    trace_s = _timed(lambda: runner.trace(seq, keep_h=False))
    h = runner.trace(seq, keep_h=False).h_out
    head_s = _timed(lambda: runner.logits(h, slice(0, seq.shape[1])))
    return PassCosts(gen_step, trace_s / seq.shape[1], head_s / seq.shape[1])


def _timed(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def scoring_passes(method: str, n_layers: int, droppable: Sequence[int], max_drop: int,
                   head_layers: float, shortlist: int,
                   recheck: int = SHORTLIST_RECHECK) -> float:
    """Scoring cost in layer passes over the calibration text (the head counted as
    ``head_layers`` layers)."""
    L, n = n_layers, max_drop
    if method in ("bi", "angular"):
        return float(L)
    if method == "fit":
        return _FIT_PASSES * (L + head_layers)
    if method not in ("greedy", "shortlist"):
        raise ValueError(f"no cost model for method {method!r}")
    # a candidate reruns the layers above it (about half of them on average) and the head
    mean_rerun = sum(L - 1 - c for c in droppable) / max(len(droppable), 1) + head_layers
    if method == "greedy":
        return sum(L + (len(droppable) - s) * mean_rerun for s in range(n))
    pool = min(shortlist, len(droppable))
    later = min(recheck, pool) + 1  # the best of last step, and bi's own set
    return L + n * L + (pool + (n - 1) * later) * mean_rerun


def predict(costs: PassCosts, method: str, n_layers: int, droppable: Sequence[int],
            max_drop: int, n_counts: int, calib_lens: Sequence[int],
            held_lens: Sequence[int], n_new: int, shortlist: int) -> Estimate:
    """Seconds for the calibration text, scoring and held-out stages.

    Args:
        costs: from ``probe``.
        calib_lens, held_lens: prompt lengths in tokens (each text adds ``n_new``).
        n_counts: drop counts whose held-out acceptance is measured.
        shortlist: K of the shortlist method.
    """
    calib_tokens = sum(calib_lens) + n_new * len(calib_lens)
    held_tokens = sum(held_lens) + n_new * len(held_lens)
    n_prompts = len(calib_lens) + len(held_lens)
    n_batches = -(-len(calib_lens) // GEN_BATCH) - (-len(held_lens) // GEN_BATCH)
    layer = costs.token_layers / n_layers  # one token through one layer
    # the head runs on the scored positions only, about n_new per text
    head_layers = costs.head_position * n_new / (layer * (calib_tokens / len(calib_lens)))
    text = (n_batches * n_new * costs.gen_step
            + 2 * (calib_tokens + held_tokens) * costs.token_layers
            + n_prompts * n_new * costs.head_position)
    passes = scoring_passes(method, n_layers, droppable, max_drop, head_layers, shortlist)
    heldout = n_counts * (held_tokens * costs.token_layers
                          + len(held_lens) * n_new * costs.head_position)
    return Estimate(text, passes * layer * calib_tokens, heldout)


def describe(est: Estimate, method: str) -> str:
    return (f"estimated time: about {duration(est.total)} (calibration text "
            f"{duration(est.calibration)}, scoring by {method} {duration(est.scoring)}, "
            f"held-out acceptance {duration(est.heldout)})")


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --- the layer-streamed path (exporters.stream) -------------------------------------------

@dataclass(frozen=True)
class StreamCosts:
    """Seconds for: reading and dequantizing one layer from the GGUF; one token through
    one layer; one scored position through the output head (dequantized each pass)."""

    load_layer: float
    token_layer: float
    head_position: float
    head_load: float


@torch.no_grad()
def probe_streamed(src, text) -> StreamCosts:
    """Time layer 0 of ``src`` (``stream.GGUFLayers``) on one calibration ``text``."""
    t = time.perf_counter()
    layer = src.layer(0)
    load = time.perf_counter() - t
    h = src.embed(text.ids)
    run = _timed(lambda: layer(h, **text.kwargs[0]))
    rows = h[0, text.positions]
    head = _timed(lambda: src.top1(rows), repeats=1)
    # the head's cost: a fixed dequantization plus a per-position product; a 1-position
    # run separates the two
    one = _timed(lambda: src.top1(rows[:1]), repeats=1)
    per_pos = max(head - one, 0.0) / max(len(rows) - 1, 1)
    return StreamCosts(load, run / len(text.ids), per_pos, one)


def predict_streamed(costs: StreamCosts, generation: float, method: str, n_layers: int,
                     calib_lens: Sequence[int], held_lens: Sequence[int], n_new: int,
                     n_counts: int) -> Estimate:
    """Seconds for the streamed stages, from ``probe_streamed`` and the predicted time
    of llama.cpp's calibration text (``generation``: every row it evaluates costs about
    what a row of the first prompt's prefill did, ``calibration.llamacpp_continuations``).

    scoring (bi, angular): every layer read once and run over the calibration tokens.
    held-out: every layer read again and run over the held-out tokens once for the full
    model and once per draft (a draft skips a few layers and shares the full model's
    states up to the first: counted as full), then one head pass over all scored
    positions of every track.
    """
    if method not in ("bi", "angular"):
        raise ValueError(f"method {method!r} does not stream")
    scoring = n_layers * (costs.load_layer + costs.token_layer * sum(calib_lens))
    tracks = 1 + n_counts
    heldout = (n_layers * (costs.load_layer + costs.token_layer * sum(held_lens) * tracks)
               + costs.head_load + costs.head_position * n_new * len(held_lens) * tracks)
    return Estimate(generation, scoring, heldout)
