"""What the two ways of scoring layers share (``exporters.layers`` in memory,
``exporters.layers_streamed`` one layer at a time): the auto ratio's bound, which path a
model takes, and the report of the choice. Both import this; neither imports the other
(``exporters.layers`` reaches the streamed path through its ``streamed`` argument).
"""

from __future__ import annotations

import logging

from exporters.config import AUTO_METHOD, STREAMED_METHODS, ExportConfig
from exporters.loading import ModelSource
from exporters.report import LayerReport

log = logging.getLogger(__name__)

# --prune auto considers dropping up to this fraction of the layers
AUTO_MAX_FRACTION = 0.5


def streamed_method(cfg: ExportConfig, source: ModelSource) -> str | None:
    """The method to score ``source`` with one layer in memory at a time, or None for
    the in-memory path: a GGUF with ``bi`` or ``angular`` always streams; with ``auto``
    it streams ``bi`` when its float32 weights would not fit in RAM (shortlist would have
    to load them; on such a model shortlist's replays also take hours on a CPU)."""
    if source.kind != "gguf":
        return None
    if cfg.method in STREAMED_METHODS:
        return cfg.method
    if cfg.method == AUTO_METHOD:
        from exporters.torch_model import fits_in_float32

        if not fits_in_float32(source):
            log.info("method: bi, streamed layer by layer (the float32 model does not fit in "
                     "RAM, so shortlist, which loads it whole, is out; --method overrides)")
            return "bi"
    return None


def layer_report(name: str, plan, method: str, scores, all_scores, alphas: dict,
                 costs, profile: str, auto: bool, counts: tuple[int, int, int],
                 timings: dict, sizing) -> LayerReport:
    """The report of a layer choice (``plan``: an ``exporters.layers.LayerPlan``), in
    memory or streamed: with ``--prune auto`` the
    ratio the cost model prefers from the held-out acceptance ``alphas``, else the plan's;
    ``counts`` are (calibration prompts, held-out prompts, scored tokens); ``sizing``
    the ``budget.Sizing`` that chose how many of the offered prompts were used."""
    from exporters import autoprune

    decision = autoprune.decide(alphas, scores.drops, costs, profile) if auto else None
    n_drop = decision.chosen.n_drop if decision else plan.n_drop
    dropped = scores.drops[n_drop]
    c_draft = costs.draft_fraction(dropped)
    gamma, speed = autoprune.best_gamma(alphas[n_drop], c_draft, profile)
    return LayerReport(
        model=name, n_layers=plan.n_layers, method=method,
        protected=sorted(plan.protected), dropped=list(dropped), scores=all_scores,
        heldout_alpha=alphas[n_drop], calib_prompts=counts[0],
        heldout_prompts=counts[1], calib_tokens=counts[2], device_profile=profile,
        draft_bytes_fraction=c_draft, gamma=gamma, predicted_speedup=speed,
        seconds=timings, auto=_auto_dict(decision), prompts_offered=sizing.offered,
        time_budget_s=plan.cfg.time_budget)


def _auto_dict(decision) -> dict | None:
    if decision is None:
        return None
    return {"chosen_n_drop": decision.chosen.n_drop, "pays": decision.pays,
            "reason": decision.reason,
            "candidates": [vars(c) for c in decision.candidates]}
