"""runtime.controller on synthetic step costs: when to speculate, how far, and when never."""

from __future__ import annotations

import pytest

from runtime.controller import CostModel, GammaController


def drive(ctrl: GammaController, t1: float, b: float, c: float, alpha_steps, steps=200):
    """Feed the controller steps whose costs follow t_verify(k) = t1 (1 + b (k - 1)) and
    t_draft = c t1; ``alpha_steps(i)`` says how many of the drafts step i accepts."""
    for i in range(steps):
        gamma = ctrl.choose()
        need = ctrl.calibration_need()
        if need == "draft":
            ctrl.observe_draft(c * t1)
        n_extra = 1 if need == "batch" else gamma
        n_acc = min(alpha_steps(i), gamma)
        ctrl.observe(gamma, n_extra, gamma, n_acc, gamma * c * t1, gamma,
                     t1 * (1 + b * n_extra), 1e-5, rejected=n_acc < gamma)
    return ctrl


def test_cpu_like_costs_switch_speculation_off_after_calibration():
    # this machine: a 2-token batch costs 1.3x a step, the draft 0.85x: never pays
    ctrl = drive(GammaController(8), t1=6e-3, b=0.3, c=0.85, alpha_steps=lambda i: 8)
    assert ctrl.disabled_reason and "cannot pay" in ctrl.disabled_reason
    assert ctrl.history[:6].count(0) == 6      # calibration used plain steps only
    assert set(ctrl.history[6:]) == {0}        # and it never drafted afterwards


def test_gpu_like_costs_with_high_acceptance_draft_deep():
    ctrl = drive(GammaController(8), t1=10e-3, b=0.02, c=0.4, alpha_steps=lambda i: 8)
    assert ctrl.disabled_reason is None
    assert ctrl.history[-1] >= 6               # near-free verification: draft far ahead


def test_low_acceptance_turns_gamma_to_zero_then_probes_with_backoff():
    ctrl = drive(GammaController(8), t1=10e-3, b=0.02, c=0.5, alpha_steps=lambda i: 0,
                 steps=400)
    tail = ctrl.history[100:]
    probes = [i for i, g in enumerate(tail) if g > 0]
    assert 0 < len(probes) < 12                # rare probes, not constant drafting
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    assert gaps == sorted(gaps)                # exponential back-off


def test_recovers_when_text_becomes_predictable():
    ctrl = drive(GammaController(8), t1=10e-3, b=0.02, c=0.5,
                 alpha_steps=lambda i: 0 if i < 150 else 8, steps=400)
    assert ctrl.history[-1] > 2


def test_fixed_gamma_ignores_costs():
    ctrl = drive(GammaController(4, adaptive=False), t1=6e-3, b=0.8, c=0.9,
                 alpha_steps=lambda i: 0, steps=20)
    assert set(ctrl.history) == {4} and ctrl.disabled_reason is None


@pytest.mark.parametrize("gamma, alpha, expected", [
    (0, 0.5, 1.0),          # a plain step emits one token
    (3, 1.0, 4.0),          # everything accepted: gamma + 1
    (2, 0.5, 1.75),         # 1 + 0.5 + 0.25
])
def test_expected_tokens(gamma, alpha, expected):
    assert CostModel.expected_tokens(gamma, alpha) == pytest.approx(expected)


def test_verify_cost_fit_extrapolates_linearly():
    c = CostModel()
    for k, t in ((1, 1.0), (2, 1.5), (3, 2.0)):
        c.add_verify(k, t)
    assert c.verify_cost(5) == pytest.approx(3.0)
