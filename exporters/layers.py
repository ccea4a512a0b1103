"""Which layers the draft drops.

Two steps, so that bad options fail before any slow work:

- ``plan_layers(cfg, n_layers)`` validates the request against the model's layer count
  (protected layers, how many to drop) and returns a ``LayerPlan``;
- ``choose_layers(plan, ...)`` picks the layers: the user's ``--drop-layers`` as given, the
  ``even`` placeholder rule, or a scorer from ``exporters.scoring`` run in PyTorch on
  calibration text, with acceptance measured on held-out prompts and, for ``--prune
  auto``, the ratio chosen by predicted speedup (``exporters.autoprune``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import gguf

from exporters.config import (
    AUTO,
    AUTO_METHOD,
    AUTO_METHOD_BUDGET_S,
    MANUAL_METHOD,
    ExportConfig,
)
from exporters.layer_common import AUTO_MAX_FRACTION, layer_report
from exporters.loading import ModelSource
from exporters.report import LayerReport, Stages, log_stages

log = logging.getLogger(__name__)

# greedy stops once calibration agreement falls below this: at alpha = 0.5 a step
# yields at most 2 tokens, which cannot pay for a draft plus a verify pass.
AUTO_STOP_ALPHA = 0.5


@dataclass(frozen=True)
class LayerChoice:
    n_layers: int
    dropped: tuple[int, ...]
    method: str

    @property
    def kept(self) -> tuple[int, ...]:
        gone = set(self.dropped)
        return tuple(i for i in range(self.n_layers) if i not in gone)

    @property
    def ratio(self) -> float:
        return len(self.dropped) / self.n_layers


@dataclass(frozen=True)
class LayerPlan:
    """A validated request. ``n_drop`` is None for ``--prune auto``."""

    cfg: ExportConfig
    n_layers: int
    n_drop: int | None
    protected: frozenset[int]

    @property
    def scored(self) -> bool:
        return self.cfg.drop_layers is None and self.cfg.method != "even"

    @property
    def droppable(self) -> list[int]:
        return [i for i in range(self.n_layers) if i not in self.protected]


def drop_evenly(n_layers: int, n_drop: int) -> list[int]:
    """Placeholder rule: drop ``n_drop`` evenly spaced layers, never the first or last.

    The middle layers 1..n-2 are cut into ``n_drop`` equal stretches and the layer at the
    centre of each stretch is dropped.
    """
    middle = n_layers - 2
    if not 0 < n_drop <= middle:
        raise ValueError(f"the 'even' rule keeps the first and last layer, so it can drop "
                         f"1 to {max(middle, 0)} of {n_layers} layers; asked for {n_drop}")
    # centre of stretch i is (i + 0.5) * middle / n_drop; stretches are >= 1 layer wide
    return [1 + int((i + 0.5) * middle / n_drop) for i in range(n_drop)]


def plan_layers(cfg: ExportConfig, n_layers: int) -> LayerPlan:
    """Validate the requested pruning against ``n_layers`` (raises ValueError)."""
    if cfg.drop_layers is not None:
        bad = [i for i in cfg.drop_layers if i >= n_layers]
        if bad:
            raise ValueError(f"--drop-layers {bad[0]} is out of range: the model has "
                             f"{n_layers} layers, numbered 0 to {n_layers - 1}")
        if len(cfg.drop_layers) >= n_layers:
            raise ValueError(f"--drop-layers drops all {n_layers} layers; keep at least one")
        return LayerPlan(cfg, n_layers, len(cfg.drop_layers), frozenset())
    protected = _protected(cfg, n_layers)
    n_free = n_layers - len(protected)
    if n_free < 1:
        raise ValueError(f"nothing left to drop: the model has {n_layers} layers and "
                         f"{len(protected)} are protected ({sorted(protected)}); pass "
                         "--keep-layers with fewer layers" if cfg.keep_layers is not None else
                         f"the model has only {n_layers} layers, too few to prune (the first "
                         "and last are always kept unless --keep-layers says otherwise)")
    if cfg.prune == AUTO:
        return LayerPlan(cfg, n_layers, None, protected)
    assert isinstance(cfg.prune, float)  # ExportConfig fills in the default
    n_drop = round(cfg.prune * n_layers)
    if n_drop == 0:
        raise ValueError(f"--prune {cfg.prune} drops no layer of {n_layers}; "
                         f"use at least {1 / n_layers:.3f}")
    if n_drop >= n_layers:
        raise ValueError(f"--prune {cfg.prune} drops {n_drop} of {n_layers} layers and "
                         "leaves none; use a smaller ratio")
    if n_drop > n_free:
        raise ValueError(f"--prune {cfg.prune} drops {n_drop} layers but only {n_free} of "
                         f"{n_layers} are not protected; use a smaller ratio or protect "
                         "fewer layers with --keep-layers")
    return LayerPlan(cfg, n_layers, n_drop, protected)


def _protected(cfg: ExportConfig, n_layers: int) -> frozenset[int]:
    if cfg.keep_layers is None:
        return frozenset({0, n_layers - 1})
    bad = [i for i in cfg.keep_layers if i >= n_layers]
    if bad:
        raise ValueError(f"--keep-layers {bad[0]} is out of range: the model has "
                         f"{n_layers} layers, numbered 0 to {n_layers - 1}")
    return frozenset(cfg.keep_layers)


def choose_layers(plan: LayerPlan, source: ModelSource | None = None,
                  full: gguf.GGUFReader | None = None,
                  stages: Stages = log_stages, streamed: str | None = None,
                  deadline: float | None = None) -> tuple[LayerChoice, LayerReport | None]:
    """Pick the layers to drop; scoring methods also return their report.

    Args:
        plan: from ``plan_layers``.
        source: the model to score (needed by scoring methods).
        full: reader of the full GGUF (its tensor sizes give the draft's cost).
        stages: progress reporting for the long stages.
        streamed: the method to score layer by layer from the GGUF
            (``layers_streamed.preflight`` decides it before any work), or None to
            load the model whole.
        deadline: ``time.perf_counter()`` by which scoring should be done (None: no
            time budget); the calibration set is sized to it (``exporters.budget``).
    """
    cfg = plan.cfg
    if cfg.drop_layers is not None:
        return LayerChoice(plan.n_layers, tuple(cfg.drop_layers), MANUAL_METHOD), None
    if not plan.scored:
        assert plan.n_drop is not None
        dropped = drop_evenly(plan.n_layers, plan.n_drop)
        log.info("dropping %d of %d layers %s by the 'even' rule (evenly spaced, never the "
                 "first or last; no scoring)", plan.n_drop, plan.n_layers, dropped)
        return LayerChoice(plan.n_layers, tuple(sorted(dropped)), cfg.method), None
    assert source is not None and full is not None
    if streamed is not None:
        from exporters.layers_streamed import score_layers_streamed

        report = _with_threads(cfg.threads, score_layers_streamed, plan, source, full,
                               streamed, stages, deadline)
    else:
        report = _with_threads(cfg.threads, score_layers, plan, source, full, stages,
                               deadline)
    return LayerChoice(plan.n_layers, tuple(report.dropped), report.method), report


def _with_threads(threads: int | None, fn, *args):
    """``fn(*args)`` with torch limited to ``threads`` CPU threads (None: torch's default),
    restored afterwards: on a shared machine fewer threads than cores can be much faster."""
    if threads is None:
        return fn(*args)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


def score_layers(plan: LayerPlan, source: ModelSource, full: gguf.GGUFReader,
                 stages: Stages = log_stages, deadline: float | None = None) -> LayerReport:
    """Run the configured scorer and measure the result on held-out prompts, on as many
    calibration prompts as are predicted to be done by ``deadline``."""
    import torch

    from exporters import autoprune, budget, calibration
    from exporters.scoring import ScoringContext, draft_agreement, make_scorer, prepare
    from exporters.scoring import progress_units as units
    from exporters.torch_model import LayerRunner, load_for_scoring

    cfg, timings = plan.cfg, {}
    prompts = calibration.load_prompts(cfg.calib)
    profile = cfg.device_profile or autoprune.default_profile()
    costs = autoprune.byte_profile(full, plan.n_layers)

    t = time.perf_counter()
    model, tokenizer, _ = load_for_scoring(source, cfg.score_dtype)
    runner = LayerRunner(model)
    if runner.n_layers != plan.n_layers:
        raise ValueError(f"{source.path.name} has {runner.n_layers} layers in PyTorch but "
                         f"{plan.n_layers} in its GGUF; cannot score it")
    auto = plan.n_drop is None
    max_drop = plan.n_drop or min(len(plan.droppable), math.ceil(AUTO_MAX_FRACTION *
                                                                 plan.n_layers))
    timings["load"] = time.perf_counter() - t
    # said before the slow stages, so that nobody is surprised by hours
    method, sizing = _announce(runner, tokenizer, cfg.method, plan, max_drop, prompts,
                               deadline)
    timings["predicted_total"] = sizing.estimate.total
    calib_p, held_p = budget.subset(prompts, sizing.used)
    prompts = calib_p + held_p
    scorer = make_scorer(method)

    t = time.perf_counter()
    with stages("calibration text (full model's own output)", len(prompts)) as advance:
        # a GGUF's own continuations come from llama.cpp, much faster than PyTorch
        gen = {"gguf_path": source.path if source.kind == "gguf" else None,
               "threads": cfg.threads, "progress": advance}
        calib = prepare(runner, calibration.build_samples(model, tokenizer, runner, calib_p,
                                                          **gen))
        held = prepare(runner, calibration.build_samples(model, tokenizer, runner, held_p,
                                                         **gen))
    timings["calibration"] = time.perf_counter() - t

    t = time.perf_counter()
    with stages(f"scoring layers ({method})",
                units(method, len(calib), max_drop)) as advance:
        ctx = ScoringContext(runner, calib, plan.protected, advance,
                             stop_below=AUTO_STOP_ALPHA if auto else 0.0)
        scores = scorer(ctx, max_drop)
    timings[method] = time.perf_counter() - t
    all_scores = {method: scores.importance}
    # BI costs one pass: a cheap reference curve for the chart (shortlist's scores are BI)
    if method not in ("bi", "shortlist"):
        all_scores["bi"] = make_scorer("bi")(ScoringContext(runner, calib, plan.protected),
                                             1).importance

    t = time.perf_counter()
    counts = sorted(scores.drops) if auto else [plan.n_drop]
    with stages("held-out acceptance", len(counts)) as advance:
        alphas = {}
        for n in counts:
            alphas[n] = draft_agreement(runner, held, scores.drops[n])
            advance(1)
    timings["heldout"] = time.perf_counter() - t
    n_tokens = sum(len(p.sample.top1) for p in calib)
    del model, runner, calib, held  # free the weights before the draft is written
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return layer_report(source.name, plan, method, scores, all_scores, alphas, costs,
                        profile, auto, (len(calib_p), len(held_p), n_tokens), timings,
                        sizing)


def _announce(runner, tokenizer, method: str, plan: LayerPlan, max_drop: int,
              prompts: list[str], deadline: float | None):
    """Probe this machine, size the calibration set to ``deadline`` and log the
    predicted time of the slow stages. ``auto`` becomes shortlist when its scoring over
    every offered prompt is predicted to fit in AUTO_METHOD_BUDGET_S, else bi.

    Returns:
        (the method to run, the ``budget.Sizing``).
    """
    from exporters import budget, calibration, estimate
    from exporters.scoring import shortlist_size

    lens = [len(calibration.format_prompt(tokenizer, p)) for p in prompts]
    n_new = calibration.DEFAULT_NEW_TOKENS
    first = calibration.format_prompt(tokenizer, prompts[0])
    costs = estimate.probe(runner, first + first[-1:] * n_new)

    def predict(m: str, n: int):
        calib_lens, held_lens = budget.subset(lens, n)
        return estimate.predict(costs, m, plan.n_layers, plan.droppable, max_drop,
                                max_drop if plan.n_drop is None else 1, calib_lens,
                                held_lens, n_new, shortlist_size(len(plan.droppable),
                                                                 max_drop))

    if method == AUTO_METHOD:
        est = predict("shortlist", len(prompts))
        method = "shortlist" if est.scoring <= AUTO_METHOD_BUDGET_S else "bi"
        log.info("method: %s (shortlist's scoring is predicted at %.0f s on this machine, "
                 "the budget is %.0f s; --method overrides)", method, est.scoring,
                 AUTO_METHOD_BUDGET_S)
    sizing = budget.fit_prompts(len(prompts), lambda n: predict(method, n),
                                budget.time_left(deadline))
    budget.log_sizing(sizing, method,
                      "; --method shortlist chooses as well at a fraction of the cost"
                      if method == "greedy" else
                      "; --method bi scores in one pass, or --drop-layers skips scoring")
    return method, sizing


def report_paths(full: Path) -> tuple[Path, Path]:
    """``x.gguf`` -> (``x.layers.json``, ``x.layers.png``)."""
    stem = full.name.removesuffix(".gguf")
    return full.with_name(f"{stem}.layers.json"), full.with_name(f"{stem}.layers.png")
