"""Layer scorers: which layers can a draft drop and still agree with the full model?

Every scorer is made by ``make_scorer(method)`` and has the signature
``scorer(ctx: ScoringContext, max_drop: int) -> LayerScores``: per-layer importance (for
the report) and, for every n = 1..max_drop, the n layers to drop. Costs below are for L
layers and N calibration tokens, in units of one full forward pass F over them.

- ``bi`` (ShortGPT, Men et al. 2024): Block Influence BI_i = 1 - mean_t cos(h_i, h_{i+1}),
  the input and output of layer i. A layer that barely turns the residual stream matters
  little. Cost: 1 F. Drops the n lowest-BI layers.
- ``angular`` (Gromov et al. 2024): d(l, n) = mean_t arccos(cos(h_l, h_{l+n})) / pi, the
  angle the residual stream turns across n contiguous layers; drop the block [l, l+n)
  with the smallest d. Cost: 1 F (every (l, n) comes from the same hidden states).
- ``fit`` (after SDFP's Fisher pruning): removing layer i is, exactly, zeroing its output
  projections W (attention o_proj and MLP down_proj write into the residual stream). A
  second-order Taylor expansion of the loss gives dL ~ 1/2 sum_p F_pp dW_p^2; with the
  isotropic approximation this is tr(F_i) x Var(dW_i), the Fisher-information trace of
  those weights times the variance of the perturbation dW = -W. F_pp = E[g_p^2] is the
  empirical Fisher of the loss "predict the full model's own token". Cost: about 3 F
  (forward + backward); gradients are folded into a running sum as each one arrives, so
  memory stays at the weights plus activations.
- ``greedy`` (acceptance-aware elimination): at each step drop the layer whose removal
  keeps the draft's top-1 agreement with the full model highest, KL to the full model as a
  tie-break among candidates within ``TIE_MARGIN`` of the best agreement (differences that
  small are calibration noise: preferring the smoother KL generalizes better to held-out
  text). Cost: a candidate c only reruns layers c+1..L-1 from the current draft's cached
  input to layer c, so a step costs about L/2 layer passes per candidate: ~L/2 F per
  step, ~n L/2 F for n layers (SmolLM2, L=30: ~15 F per step).
- ``shortlist`` (the default: greedy at a fraction of the cost): score every layer once
  with ``bi``, keep the K = max(2n, ``SHORTLIST_MIN``) layers it ranks least important,
  and run ``greedy`` over those K only. At each step, bi's own set of that size is
  measured too and replaces greedy's when it agrees more on the calibration text, so the
  result never agrees less than bi's there. Layers below the lowest shortlisted one are
  never removed, so their output is computed once and every replay starts above them.
  After the first step only the ``SHORTLIST_RECHECK`` best candidates of the previous
  step are measured again (lazy greedy). Cost: 1 F for bi, K candidates at the first
  step, at most ``SHORTLIST_RECHECK`` + 1 at each later one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from exporters.calibration import Sample
from exporters.config import SCORING_METHODS
from exporters.torch_model import LayerRunner, Trace

log = logging.getLogger(__name__)

# shortlist: greedy searches at least this many of bi's least important layers (and
# 2n for n layers dropped), so it has room to swap bi's picks for better ones
SHORTLIST_MIN = 6
# ...and after its first step re-measures only this many of the best candidates
SHORTLIST_RECHECK = 4
# Greedy candidates within this fraction of scored tokens of the best agreement count are
# tied; KL decides among them (0.3% of ~1,500 tokens is ~4 tokens: noise level).
TIE_MARGIN = 0.003

Progress = Callable[[int], None]  # advance by n units


@dataclass
class Prepared:
    """A calibration sample with its full-model trace (masks, rotary tables, embeddings)."""

    sample: Sample
    trace: Trace


@dataclass
class ScoringContext:
    runner: LayerRunner
    calib: list[Prepared]
    protected: frozenset[int]
    progress: Progress = field(default=lambda n: None)
    # greedy stops early once calibration agreement falls below this (--prune auto:
    # no draft that disagrees this often can pay)
    stop_below: float = 0.0

    @property
    def n_layers(self) -> int:
        return self.runner.n_layers

    @property
    def droppable(self) -> list[int]:
        return [i for i in range(self.n_layers) if i not in self.protected]


@dataclass
class LayerScores:
    """``importance[i]``: higher means layer i matters more. ``drops[n]``: n layers to drop."""

    method: str
    importance: list[float]
    drops: dict[int, tuple[int, ...]]


Scorer = Callable[[ScoringContext, int], LayerScores]


def prepare(runner: LayerRunner, samples: Sequence[Sample]) -> list[Prepared]:
    return [Prepared(s, runner.trace(s.ids, keep_h=False)) for s in samples]


# --- agreement with the full model --------------------------------------------------------

def agreement(logits: torch.Tensor, sample: Sample) -> tuple[int, float]:
    """(top-1 matches, summed KL) of draft ``logits`` [n, V] against the full model.

    KL(p_full || q_draft) is truncated to the full model's top-k tokens:
    sum_k p_k (log p_k - log q_k); the tail mass beyond top-k is small and shared.
    """
    logq = torch.log_softmax(logits.float(), -1)
    hits = int((logits.argmax(-1) == sample.top1).sum())
    lp = sample.top_lp
    kl = float((lp.exp() * (lp - logq.gather(-1, sample.top_ix))).sum())
    return hits, kl


@torch.no_grad()
def draft_agreement(runner: LayerRunner, preps: Sequence[Prepared],
                    dropped: Sequence[int]) -> float:
    """Teacher-forced top-1 agreement of the draft without ``dropped`` (0..1)."""
    skip = frozenset(dropped)
    hits = total = 0
    for p in preps:
        h = runner.run(p.trace, p.trace.h_in[0], 0, skip)
        hits += agreement(runner.logits(h, p.sample.positions), p.sample)[0]
        total += len(p.sample.top1)
    return hits / max(total, 1)


# --- bi and angular: geometry of the full model's hidden states ---------------------------

def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token cosine similarity of [T, H] states (fp32)."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> float:
    """BI = 1 - mean_t cos(h_in[t], h_out[t]); 0 for a layer that changes nothing."""
    return float(1.0 - cosine(h_in, h_out).mean())


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean_t arccos(cos(a[t], b[t])) / pi, in [0, 1]."""
    return float(torch.arccos(cosine(a, b).clamp(-1.0, 1.0)).mean() / math.pi)


def best_block(dist: dict[int, float], n: int, protected: frozenset[int]) -> tuple[int, ...]:
    """The block [l, l+n) with the smallest angular distance that spares ``protected``."""
    ok = [s for s in dist if not protected.intersection(range(s, s + n))]
    if not ok:
        raise ValueError(f"no {n} contiguous unprotected layers for the angular method; "
                         "protect fewer layers or drop fewer")
    start = min(ok, key=lambda s: dist[s])
    return tuple(range(start, start + n))


def _states(runner: LayerRunner, p: Prepared) -> list[torch.Tensor]:
    """The full model's residual stream at every layer boundary: L + 1 states [T, H],
    one prompt at a time (positions from 1: the BOS state is an outlier sink)."""
    h = p.trace.h_in[0]
    states = [h[0, 1:]]
    for i in range(runner.n_layers):
        h = runner.layer(i, h, p.trace)
        states.append(h[0, 1:])
    return states


@torch.no_grad()
def score_bi(ctx: ScoringContext, max_drop: int) -> LayerScores:
    L = ctx.n_layers
    bi = [0.0] * L
    for p in ctx.calib:
        s = _states(ctx.runner, p)
        for i in range(L):
            bi[i] += block_influence(s[i], s[i + 1]) / len(ctx.calib)
        ctx.progress(1)
    order = sorted(ctx.droppable, key=lambda i: bi[i])
    return LayerScores("bi", bi, {n: tuple(sorted(order[:n])) for n in range(1, max_drop + 1)})


@torch.no_grad()
def score_angular(ctx: ScoringContext, max_drop: int) -> LayerScores:
    L = ctx.n_layers
    # d[n][l] for every block length up to max_drop, summed over prompts
    d = {n: dict.fromkeys(range(L - n + 1), 0.0) for n in range(1, max_drop + 1)}
    for p in ctx.calib:
        s = _states(ctx.runner, p)
        for n, row in d.items():
            for start in row:
                row[start] += angular_distance(s[start], s[start + n]) / len(ctx.calib)
        ctx.progress(1)
    drops = {n: best_block(d[n], n, ctx.protected) for n in d}
    return LayerScores("angular", [d[1][i] for i in range(L)], drops)


# --- fit: Fisher trace x perturbation variance -------------------------------------------

def _out_projections(layer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Weights whose zeroing removes the layer: the projections into the residual stream."""
    return [m.weight for name, m in layer.named_modules()
            if name.endswith(("o_proj", "down_proj")) and hasattr(m, "weight")]


def fit_score(fisher_trace: float, weights: Sequence[torch.Tensor]) -> float:
    """tr(F) x Var(dW) with dW = -W: the isotropic second-order loss increase (x2)."""
    n = sum(w.numel() for w in weights)
    var = sum(float(w.float().pow(2).sum()) for w in weights) / max(n, 1)
    return fisher_trace * var


def score_fit(ctx: ScoringContext, max_drop: int) -> LayerScores:
    runner = ctx.runner
    params = [_out_projections(layer) for layer in runner.layers]
    trace = [0.0] * ctx.n_layers
    hooks = []
    for i, ps in enumerate(params):
        for w in ps:
            w.requires_grad_(True)
            hooks.append(w.register_post_accumulate_grad_hook(_fold_grad(trace, i)))
    try:
        for p in ctx.calib:
            with torch.enable_grad():
                h = runner.run(p.trace, p.trace.h_in[0], 0, frozenset())
                logits = runner.logits(h, p.sample.positions)
                # empirical Fisher of the per-token loss, averaged over tokens
                loss = torch.nn.functional.cross_entropy(logits, p.sample.top1)
                loss.backward()
            ctx.progress(1)
    finally:
        for hk in hooks:
            hk.remove()
        for ps in params:
            for w in ps:
                w.requires_grad_(False)
                w.grad = None
    fit = [fit_score(trace[i] / len(ctx.calib), params[i]) for i in range(ctx.n_layers)]
    order = sorted(ctx.droppable, key=lambda i: fit[i])
    return LayerScores("fit", fit, {n: tuple(sorted(order[:n])) for n in range(1, max_drop + 1)})


def _fold_grad(acc: list[float], i: int):
    def hook(w: torch.Tensor) -> None:
        acc[i] += float(w.grad.float().pow(2).sum())  # tr(F) += sum_p g_p^2
        w.grad = None  # never hold a model's worth of gradients
    return hook


# --- greedy: acceptance-aware elimination ------------------------------------------------

def pick_candidate(stats: dict[int, tuple[int, float]], n_tokens: int,
                   margin: float = TIE_MARGIN) -> int:
    """The candidate with the most top-1 hits; KL breaks ties within ``margin``."""
    best = max(hits for hits, _ in stats.values())
    tied = [c for c, (hits, _) in stats.items() if hits >= best - margin * n_tokens]
    return min(tied, key=lambda c: (stats[c][1], c))


@torch.no_grad()
def _candidate_stats(runner: LayerRunner, p: Prepared, removed: frozenset[int],
                     candidates: Sequence[int], stats: dict[int, list],
                     h: torch.Tensor | None = None, start: int = 0) -> None:
    """Add one prompt's (hits, KL) for removing each candidate on top of ``removed``.

    ``h``: the draft's input to layer ``start`` (default: the embeddings, ``start`` 0);
    no layer below ``start`` may be removed or be a candidate.
    """
    h = p.trace.h_in[0] if h is None else h
    before: dict[int, torch.Tensor] = {}  # the current draft's input to each candidate
    for i in range(start, runner.n_layers):
        if i in candidates:
            before[i] = h
        if i not in removed:
            h = runner.layer(i, h, p.trace)
    for c in candidates:
        hc = runner.run(p.trace, before[c], c + 1, removed)
        hits, kl = agreement(runner.logits(hc, p.sample.positions), p.sample)
        stats[c][0] += hits
        stats[c][1] += kl


@torch.no_grad()
def _set_stats(runner: LayerRunner, p: Prepared, removed: frozenset[int],
               h: torch.Tensor | None = None, start: int = 0) -> tuple[int, float]:
    """One prompt's (hits, KL) for the draft without ``removed``, from ``h`` at ``start``."""
    h = runner.run(p.trace, p.trace.h_in[0] if h is None else h, start, removed)
    return agreement(runner.logits(h, p.sample.positions), p.sample)


def _eliminate(ctx: ScoringContext, max_drop: int, pool: Sequence[int], method: str,
               rivals: dict[int, tuple[int, ...]] | None = None,
               start: int = 0, prefix: Sequence[torch.Tensor] | None = None,
               recheck: int | None = None
               ) -> tuple[dict[int, tuple[int, ...]], dict[int, float]]:
    """Greedy elimination over ``pool``: (drops per n, agreement lost by each pool layer
    alone). ``rivals[n]``, when given, is another n-layer set measured at step n; the
    better of the two (hits, then KL) is kept and the search goes on from it.
    ``prefix[k]``: prompt k's hidden state at the input of layer ``start`` (<= min(pool)).
    ``recheck``: after the first step, measure only this many of the best candidates.
    """
    removed: list[int] = []
    drops: dict[int, tuple[int, ...]] = {}
    alone: dict[int, float] = {}
    last: dict[int, tuple[int, float]] = {}  # each candidate's latest (hits, KL)
    n_tokens = sum(len(p.sample.top1) for p in ctx.calib)
    for step in range(1, max_drop + 1):
        cands = [i for i in pool if i not in removed]
        if recheck is not None and last:
            # lazy greedy: a layer that was a poor candidate last step rarely becomes the
            # best one now, so only the ``recheck`` best of last step are measured again
            cands = sorted(cands, key=lambda c: (-last[c][0], last[c][1]))[:recheck]
        stats = {c: [0, 0.0] for c in cands}
        rival = rivals.get(step) if rivals else None
        # rival = removed + one candidate (sets of size step and step - 1): that candidate
        # measures it already
        if rival is not None and len(set(rival) - set(removed)) == 1 \
                and set(rival) - set(removed) <= set(cands):
            rival = None
        rival_stats = [0, 0.0]
        for k, p in enumerate(ctx.calib):
            h = prefix[k] if prefix is not None else None
            _candidate_stats(ctx.runner, p, frozenset(removed), cands, stats, h, start)
            if rival is not None:
                hits, kl = _set_stats(ctx.runner, p, frozenset(rival), h, start)
                rival_stats[0] += hits
                rival_stats[1] += kl
            ctx.progress(1)
        if step == 1:  # importance = agreement lost by removing the layer alone
            alone = {c: 1.0 - stats[c][0] / n_tokens for c in cands}
        last.update({c: (n, kl) for c, (n, kl) in stats.items()})
        pick = pick_candidate({c: (n, kl) for c, (n, kl) in stats.items()}, n_tokens)
        removed.append(pick)
        hits = stats[pick][0]
        if rival is not None and (rival_stats[0], -rival_stats[1]) > (hits, -stats[pick][1]):
            log.info("%s step %d: the rival set %s agrees more than %s (%d vs %d tokens); "
                     "going on from it", method, step, list(rival), sorted(removed),
                     rival_stats[0], hits)
            removed, hits = list(rival), rival_stats[0]
        drops[step] = tuple(sorted(removed))
        alpha = hits / n_tokens
        log.info("%s step %d: drop %s (calibration agreement %.3f)", method, step,
                 list(drops[step]), alpha)
        if alpha < ctx.stop_below:
            ctx.progress(len(ctx.calib) * (max_drop - step))  # the bar ends full
            break
    return drops, alone


def score_greedy(ctx: ScoringContext, max_drop: int) -> LayerScores:
    drops, alone = _eliminate(ctx, max_drop, ctx.droppable, "greedy")
    importance = [alone.get(i, 0.0) for i in range(ctx.n_layers)]
    return LayerScores("greedy", importance, drops)


def shortlist_size(n_droppable: int, max_drop: int) -> int:
    """K: how many of bi's least important layers the shortlist search considers."""
    return min(n_droppable, max(2 * max_drop, SHORTLIST_MIN))


@torch.no_grad()
def score_shortlist(ctx: ScoringContext, max_drop: int) -> LayerScores:
    bi = score_bi(ctx, max_drop)
    order = sorted(ctx.droppable, key=lambda i: bi.importance[i])
    pool = sorted(order[:shortlist_size(len(order), max_drop)])
    log.info("shortlist: greedy over bi's %d least important layers %s", len(pool), pool)
    start = pool[0]  # nothing below it is ever removed: run those layers once
    prefix = [ctx.runner.run(p.trace, p.trace.h_in[0], 0, frozenset(), stop=start)
              for p in ctx.calib]
    drops, _ = _eliminate(ctx, max_drop, pool, "shortlist", rivals=bi.drops, start=start,
                          prefix=prefix, recheck=SHORTLIST_RECHECK)
    # importance: bi's, the one score every layer has (the search sees only the shortlist)
    return LayerScores("shortlist", bi.importance, drops)


_SCORERS: dict[str, Scorer] = {"shortlist": score_shortlist, "greedy": score_greedy,
                               "bi": score_bi, "angular": score_angular, "fit": score_fit}
assert set(_SCORERS) == set(SCORING_METHODS), "exporters.config.SCORING_METHODS is stale"


def make_scorer(method: str) -> Scorer:
    """The scorer for ``method`` (one of ``exporters.config.SCORING_METHODS``)."""
    try:
        return _SCORERS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose one of "
                         f"{', '.join(SCORING_METHODS)}") from None


def progress_units(method: str, n_prompts: int, max_drop: int) -> int:
    """How many ``progress`` units a scorer reports (for a progress bar's total)."""
    per_prompt = {"greedy": max_drop, "shortlist": 1 + max_drop}.get(method, 1)
    return n_prompts * per_prompt
