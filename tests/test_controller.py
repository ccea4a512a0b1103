"""runtime.controller on simulated step costs: when to speculate, from which source, how far,
and that nothing can switch speculation off by mistake."""

from __future__ import annotations

import sys
import types

import pytest

from runtime import costmodel
from runtime.controller import (
    GRAMMAR,
    PLAIN_STEP,
    PRUNED,
    GammaController,
    Offer,
    StepPlan,
    StepRecord,
)
from runtime.costs import CostModel

# Verify curves in units of one plain step, V(k) for k = 1..9.
COMMITTED_CPU = {1: 1.0, 2: 1.3, 3: 1.7, 4: 2.1, 5: 2.45, 8: 3.5}   # bench/results CPU
AVX2_EPYC = {1: 1.0, 2: 1.8, 3: 2.8, 4: 3.8, 5: 4.3, 8: 5.3}        # near-linear
GPU = {k: 1.0 for k in range(1, 17)}                                # flat


def curve(points: dict[int, float]):
    """Piecewise-linear V(k) through ``points``."""
    ks = sorted(points)

    def v(k: int) -> float:
        if k in points:
            return points[k]
        lo = max(x for x in ks if x < k) if k > ks[0] else ks[0]
        hi = min((x for x in ks if x > k), default=None)
        if hi is None:
            a, b = ks[-2], ks[-1]
            return points[b] + (points[b] - points[a]) / (b - a) * (k - b)
        return points[lo] + (points[hi] - points[lo]) * (k - lo) / (hi - lo)

    return v


class Sim:
    """Drives a controller the way the decode loop does, on simulated costs: verifying k
    tokens costs t1 * V(k), a pruned draft step c * t1; ``accept(i, source, n)`` says how
    many of the n drafts of step i the target keeps."""

    def __init__(self, ctrl: GammaController, v, c: float, accept, t1: float = 10e-3):
        self.ctrl, self.v, self.c, self.accept, self.t1 = ctrl, v, c, accept, t1
        self.seen = 0  # tokens the pruned draft has read

    def run(self, steps: int, offers=lambda i: {PRUNED: Offer(8)}, pos: int = 0) -> None:
        for i in range(steps):
            plan = self.ctrl.choose(offers(i))
            source, gamma = plan.source, plan.gamma
            if plan.times_draft_step:
                self.ctrl.observe_draft(self.c * self.t1)
            n_acc = min(self.accept(i, source, gamma), gamma)
            catchup = 0
            if source == PRUNED:
                catchup = max(0, pos - self.seen - 1)  # the draft reads what it missed
                self.seen = pos + n_acc + 1
            k = gamma + 1 if gamma else plan.verify_rows
            self.ctrl.observe(StepRecord(
                source=source if gamma else None, gamma=gamma, n_verified=k,
                n_drafted=gamma, n_accepted=n_acc, match_len=3,
                draft_seconds=gamma * self.c * self.t1 if source == PRUNED else 1e-6,
                draft_evals=gamma, catchup_seconds=catchup * 0.05 * self.t1,
                n_catchup=catchup, verify_seconds=self.t1 * self.v(k),
                overhead_seconds=1e-5))
            pos += n_acc + 1
        return pos


def test_cpu_like_costs_keep_the_pruned_draft_out():
    # the committed CPU: a 2-token batch costs 1.3x a step, the draft 0.85x: never pays
    ctrl = GammaController(8)
    Sim(ctrl, curve(COMMITTED_CPU), 0.85, lambda i, s, n: n).run(200)
    assert ctrl.disabled_reason and "cannot pay" in ctrl.disabled_reason
    assert list(ctrl.history)[:8].count(0) == 8  # calibration used plain steps only
    assert PRUNED not in ctrl.source_history   # and it never drafted with it afterwards


def test_gpu_like_costs_with_high_acceptance_draft_deep():
    ctrl = GammaController(8)
    Sim(ctrl, curve(GPU), 0.4, lambda i, s, n: n).run(200)
    assert ctrl.disabled_reason is None
    assert ctrl.history[-1] >= 6               # near-free verification: draft far ahead


def test_gpu_long_prompt_chat_turns_and_probes_never_disable_speculation():
    """Issue 11: catch-up (a 2,000-token prompt, chat turns, the tokens emitted during
    long plain runs) is charged per token apart from drafting, so it cannot inflate the
    draft's cost c and switch speculation off."""
    ctrl = GammaController(8)
    acc = {"on": True}
    sim = Sim(ctrl, curve(GPU), 0.5, lambda i, s, n: n if acc["on"] else 0)
    pos = sim.run(5, pos=2000)                # the draft never read the 2,000-token prompt
    for turn in range(4):                     # chat turns: 300 new tokens each time
        pos = sim.run(30, pos=pos + 300)
        assert ctrl.disabled_reason is None, turn
    acc["on"] = False                         # unpredictable text: long plain runs
    pos = sim.run(600, pos=pos)
    assert ctrl.disabled_reason is None
    acc["on"] = True                          # predictable again: a probe must bring it back
    sim.run(600, pos=pos)
    assert ctrl.disabled_reason is None
    assert ctrl.costs.draft == pytest.approx(0.5 * 10e-3)
    assert ctrl.history[-1] >= 6
    assert ctrl.costs.catchup_per_token == pytest.approx(0.05 * 10e-3)


def test_verdict_is_reexamined_when_costs_change():
    """A draft wrongly timed as slow (e.g. the machine was busy) is re-timed by a later
    probe, and the 'cannot pay' verdict lifts with the new cost."""
    ctrl = GammaController(8)
    sim = Sim(ctrl, curve(GPU), 3.0, lambda i, s, n: n)
    sim.run(20)
    assert ctrl.disabled_reason is not None
    sim.c = 0.4                                # the real cost
    sim.run(600)
    assert ctrl.disabled_reason is None
    assert ctrl.source_history[-1] == PRUNED and ctrl.history[-1] >= 6


def test_low_acceptance_turns_gamma_to_zero_then_probes_with_backoff():
    ctrl = GammaController(8)
    Sim(ctrl, curve(GPU), 0.5, lambda i, s, n: 0).run(400)
    tail = list(ctrl.history)[100:]
    probes = [i for i, g in enumerate(tail) if g > 0]
    assert 0 < len(probes) < 12                # rare probes, not constant drafting
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    assert gaps == sorted(gaps)                # exponential back-off


def test_recovers_when_text_becomes_predictable():
    ctrl = GammaController(8)
    Sim(ctrl, curve(GPU), 0.5, lambda i, s, n: 0 if i < 150 else n).run(400)
    assert ctrl.history[-1] > 2


def test_fixed_gamma_ignores_costs():
    ctrl = GammaController(4, adaptive=False)
    Sim(ctrl, curve(AVX2_EPYC), 0.9, lambda i, s, n: 0).run(20)
    assert set(ctrl.history) == {4} and ctrl.disabled_reason is None


def test_fixed_gamma_takes_the_longest_context_match():
    """Fixed gamma drafts from the lookup that matched the most context, not the one
    that offers the most tokens (a short in-request match pads its draft to n_max)."""
    ctrl = GammaController(16, adaptive=False, has_pruned=False)
    memory, lookup = StepPlan(source="memory", gamma=5), StepPlan(source="lookup", gamma=16)
    assert ctrl.choose({"lookup": Offer(16, 1), "memory": Offer(5, 8)}) == memory
    assert ctrl.choose({"lookup": Offer(16, 8), "memory": Offer(5, 8)}) == lookup
    assert ctrl.choose({"lookup": Offer(16, 3), "memory": Offer(0, 0)}) == lookup
    assert ctrl.choose({"lookup": Offer(0), "memory": Offer(0)}) == PLAIN_STEP


def lookup_offers(i):
    """A copy-heavy answer: long lookup matches on most steps."""
    return {"lookup": Offer(8, 6 if i % 4 else 0)} if i % 4 else {"lookup": Offer(0)}


def copy_accept(i, source, n):
    return n if source == "lookup" else 0


@pytest.mark.parametrize("points, pays", [(COMMITTED_CPU, True), (GPU, True)])
def test_lookup_is_chosen_where_it_pays(points, pays):
    ctrl = GammaController(8, has_pruned=False)
    Sim(ctrl, curve(points), 0.0, copy_accept).run(300, lookup_offers)
    late = list(ctrl.source_history)[100:]
    assert (late.count("lookup") > 100) == pays


def test_lookup_on_a_near_linear_cpu_never_loses_much():
    """Issue 12: on a CPU where batching buys almost nothing (the AVX2 EPYC's curve),
    replaying the controller's own choices through the cost model must stay >= 0.97x
    plain, whether lookups are right or wrong."""
    v = curve(AVX2_EPYC)
    for accept in (copy_accept, lambda i, s, n: 0, lambda i, s, n: n // 2):
        ctrl = GammaController(8, has_pruned=False)
        sim = Sim(ctrl, v, 0.0, accept)
        tokens = cost = 0.0
        for i in range(400):
            before = len(ctrl.history)
            sim.run(1, lambda j, i=i: lookup_offers(i))
            g = ctrl.history[before]
            src = ctrl.source_history[before]
            n_acc = min(accept(i, src, g), g) if g else 0
            tokens += n_acc + 1
            cost += v(g + 1)
        assert tokens / cost >= 0.97, (tokens / cost)


def test_lookup_acceptance_is_tracked_per_match_length():
    ctrl = GammaController(8, has_pruned=False)
    ctrl.acceptance("lookup", 1).add(8, 0)
    ctrl.acceptance("lookup", 6).add(8, 8)
    assert ctrl.acceptance("lookup", 1).alpha < 0.2 < 0.8 < ctrl.acceptance("lookup", 5).alpha


def test_profile_round_trip_starts_decided():
    ctrl = GammaController(8)
    Sim(ctrl, curve(GPU), 0.4, lambda i, s, n: n).run(50)
    stored = ctrl.costs.to_profile()
    again = GammaController(8, costs=CostModel.from_profile(stored))
    assert again.calibration_need() is None
    plan = again.choose({PRUNED: Offer(8)})
    assert plan.source == PRUNED and plan.gamma > 0  # no calibration steps: decided at once


@pytest.mark.parametrize("gamma, alpha, expected", [
    (0, 0.5, 1.0),          # a plain step emits one token
    (3, 1.0, 4.0),          # everything accepted: gamma + 1
    (2, 0.5, 1.75),         # 1 + 0.5 + 0.25
])
def test_expected_tokens(gamma, alpha, expected):
    assert costmodel.expected_tokens(gamma, alpha) == pytest.approx(expected)


def test_speedup_formula():
    # E(2, 0.5) = 1.75 over 2 * 0.5 + V(3) = 1 + 2 = 3 plain steps
    assert costmodel.speedup(2, 0.5, 0.5, costmodel.linear_verify(1.0)) == pytest.approx(
        1.75 / 4.0)
    assert costmodel.best_gamma(1.0, 0.0, costmodel.flat_verify(8), 8)[0] == 7


def test_with_a_stream_per_sequence_drafts_beside_others_pay_for_a_graph_of_their_own():
    """llama.cpp's equal split puts a sequence's draft rows beside one-row steps into a
    graph of their own: V(R_o + 1) + V(gamma), not V(R_o + gamma + 1). On a CPU-like line
    (SmolLM2 on the 2-core Xeon: 11.6 ms a graph of one row, 5.3 ms a row more) drafts at
    90% acceptance pay in a shared round priced as one graph, and not as two."""
    v = costmodel.linear_verify(5.3 / 11.6)
    assert costmodel.round_cost(3, v, 15, split=True) == pytest.approx(v(16) + v(3))
    assert costmodel.round_cost(3, v, 15) == pytest.approx(v(19))
    assert costmodel.round_cost(3, v, 0, split=True) == pytest.approx(v(4))  # alone: one
    assert costmodel.round_cost(0, v, 15, split=True) == pytest.approx(v(16))
    others = (3, 3.0)
    assert costmodel.best_gamma(0.9, 0.0, v, 8, others=others)[0] > 0
    assert costmodel.best_gamma(0.9, 0.0, v, 8, others=others, split=True)[0] == 0
    # alone in its round the split changes nothing
    assert costmodel.best_gamma(0.9, 0.0, v, 8, split=True) == costmodel.best_gamma(0.9, 0.0, v, 8)
    ctrl = GammaController(8, has_pruned=False, load=lambda: others, split=True,
                           costs=CostModel.from_profile({"verify": {"1": 1.0, "16": 7.9}}))
    assert ctrl._best(0.9, 0.0, 8)[0] == 0
    ctrl.split = False
    assert ctrl._best(0.9, 0.0, 8)[0] > 0


def _calibrated(verify: dict[int, float]) -> GammaController:
    costs = CostModel.from_profile({"verify": {str(k): v for k, v in verify.items()}})
    return GammaController(8, has_pruned=False, costs=costs)


def test_a_marginal_bet_is_not_taken():
    """A draft predicted to win ~2% is left alone (the estimates' noise is larger than
    that); one predicted to win clearly is taken."""
    ctrl = _calibrated({1: 1.0, 2: 1.9, 4: 3.7, 8: 7.3})  # batching buys almost nothing
    acc = ctrl.acceptance("lookup", 4)
    acc.acc, acc.tried = 0.94, 1.0  # E(1) / V(2) = 1.94 / 1.9: +2%
    assert ctrl.choose({"lookup": Offer(8, 6)}) == PLAIN_STEP
    acc.acc = 1.0  # E(8) / V(9) = 9 / 8.2: +10%
    assert ctrl.choose({"lookup": Offer(8, 6)}) == StepPlan(source="lookup", gamma=8)


# the AVX-512 EPYC of bench/results/2026-12-02-structured-*: a batch costs more than its
# tokens would in plain steps, so no draft can pay
BATCH_COSTLY_CPU = {1: 1.0, 2: 4.1, 3: 5.9, 4: 7.8}


@pytest.mark.parametrize("points, pays", [(BATCH_COSTLY_CPU, False), (GPU, True)])
def test_forced_text_is_taken_where_it_pays_and_never_probed(points, pays):
    """A constraint's forced text (acceptance ~1) is drafted whenever the verify curve
    lets it pay; where batching costs too much it is never probed, since a probe could
    only confirm an acceptance that is known already."""
    ctrl = GammaController(draft_max=8, has_pruned=False)
    Sim(ctrl, curve(points), 0.0, lambda i, s, n: n).run(
        400, offers=lambda i: {GRAMMAR: Offer(4, 4)})
    drafted = sum(1 for g in list(ctrl.history)[10:] if g > 0)
    assert drafted > 300 if pays else drafted == 0


def _asked(ctrl: GammaController, offers: dict[str, Offer]) -> dict[str, Offer]:
    """The offers the decode loop collects: lookup-like sources only when wanted."""
    return {n: o for n, o in offers.items() if n == PRUNED or ctrl.wants(n)}


@pytest.mark.parametrize("points,c,accept", [
    (AVX2_EPYC, 0.9, lambda i, s, n: n // 3),          # nothing pays: plain, probes
    (COMMITTED_CPU, 0.85, lambda i, s, n: n if i % 40 < 20 else 0),  # lookups come and go
    (GPU, 0.3, lambda i, s, n: n - 1 if i % 7 else 0),  # drafting most steps
], ids=["avx2-epyc", "committed-cpu", "gpu"])
def test_plain_now_decides_as_asking_every_source_would(points, c, accept):
    """The decode loop's shortcut (``plain_now``: a step certainly plain, no source asked)
    must make exactly the decisions of asking the sources and calling ``choose``, step for
    step, with the same probes and back-off, whatever the costs and acceptances."""
    def offers(i: int) -> dict[str, Offer]:
        return {"lookup": Offer(8, 1 + i % 5), "memory": Offer(6 if i % 3 else 0, 2),
                PRUNED: Offer(8)}

    runs = []
    for shortcut in (True, False):
        ctrl, v = GammaController(8), curve(points)
        shortcuts = 0
        for i in range(600):
            o = offers(i)
            if shortcut and ctrl.plain_now(o):
                plan = PLAIN_STEP
                shortcuts += 1
            else:
                plan = ctrl.choose(_asked(ctrl, o))
            source, gamma = plan.source, plan.gamma
            if plan.times_draft_step:
                ctrl.observe_draft(c * 10e-3)
            n_acc = min(accept(i, source, gamma), gamma)
            k = gamma + 1 if gamma else plan.verify_rows
            ctrl.observe(StepRecord(
                source=source if gamma else None, gamma=gamma, n_verified=k,
                n_drafted=gamma, n_accepted=n_acc,
                match_len=o[source].match_len if source else 0,
                draft_seconds=gamma * c * 10e-3 if source == PRUNED else 1e-6,
                draft_evals=gamma, verify_seconds=10e-3 * v(k), overhead_seconds=1e-5))
        runs.append((ctrl.history, ctrl.source_history, ctrl._backoff, ctrl._since_probe,
                     shortcuts))
    assert runs[0][:4] == runs[1][:4]
    assert runs[0][4] > 0 or sum(runs[0][0]) > 0  # the shortcut was taken, or drafting won


def test_the_choice_history_stays_bounded_in_a_long_run():
    """A server's controller lives for weeks: what it keeps of past steps is bounded."""
    from runtime.controller import _HISTORY_MAX

    ctrl = GammaController(4, adaptive=False, has_pruned=False)
    for i in range(3 * _HISTORY_MAX):
        ctrl.choose({"lookup": Offer(4, match_len=2)} if i % 2 else {})
    assert len(ctrl.history) <= _HISTORY_MAX and len(ctrl.source_history) <= _HISTORY_MAX
    assert list(ctrl.history)[-2:] == [0, 4]  # the newest are kept


def _footprint(root: object) -> int:
    """Bytes held by ``root`` and by everything it reaches through attributes (``__dict__``
    and slots) and containers, each object counted once; functions (the load callback)
    and classes are not the controller's state."""
    seen: set[int] = set()
    stack, total = [root], 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.FunctionType, types.MethodType)):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack += [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += obj
        if hasattr(obj, "__dict__"):
            stack.append(vars(obj))
        stack += [getattr(obj, s) for cls in type(obj).__mro__
                  for s in getattr(cls, "__slots__", ()) if hasattr(obj, s)]
    return total


def _serve(ctrl: GammaController, steps: int, shared: bool, every: int) -> list[int]:
    """Drive one lane's controller as ``bridge serve`` does, request after request, and
    return its footprint every ``every`` steps. Each request sets its own gamma cap (the
    lane's per-request ``draft_max``), may run under a grammar (forced text is a source)
    or keep out of the memory, and copies its context or not, so calibration, drafting,
    probes, back-off, re-timing and the certainly-plain shortcut all run. In a shared batch
    the other sequences' load changes from step to step and whole rounds are timed, as
    ``runtime.batching`` times them; alone, the pruned draft is a source too."""
    v = curve(COMMITTED_CPU)
    loads = [(0, 0.0), (3, 3.2), (7, 9.5), (15, 16.0), (1, 1.0)]
    load_now = [loads[0]]
    if shared:
        ctrl.load = lambda: load_now[0]
    footprints = []
    step = request = 0
    while step < steps:
        # a request: its cap and its sources, fixed for its steps; the draft model's step
        # costs 0.3 or 1.5 target steps (a busy machine), by turns of 50 requests
        ctrl.draft_max = 1 + request % 16
        c = 0.3 if request // 50 % 2 else 1.5
        constrained, use_memory, copies = request % 5 == 0, request % 7 != 3, request % 4 == 0
        for i in range(40 + request * 37 % 160):
            if step == steps:
                break
            load_now[0] = loads[step // 3 % len(loads)]
            offers = {"lookup": Offer(8, 1 + i % 6)}
            if use_memory:
                offers["memory"] = Offer(6 if i % 3 else 0, 2 + i % 5)
            if constrained:
                offers[GRAMMAR] = Offer(3, 3)
            if not shared:
                offers[PRUNED] = Offer(8)
            plan = PLAIN_STEP if ctrl.plain_now(offers) else ctrl.choose(_asked(ctrl, offers))
            if plan.times_draft_step:
                ctrl.observe_draft(c * 10e-3)
            gamma = plan.gamma
            n_acc = gamma if copies or plan.source == GRAMMAR else 0
            k = gamma + 1 if gamma else plan.verify_rows
            if shared:  # the round: every sequence's rows, timed whole
                ctrl.costs.add_verify(load_now[0][0] + k, 10e-3 * v(load_now[0][0] + k))
            ctrl.observe(StepRecord(
                source=plan.source if gamma else None, gamma=gamma, n_verified=k,
                n_drafted=gamma, n_accepted=n_acc,
                match_len=offers[plan.source].match_len if gamma else 0,
                draft_seconds=gamma * c * 10e-3 if plan.source == PRUNED else 1e-6,
                draft_evals=gamma, catchup_seconds=1e-4 * (i == 0), n_catchup=int(i == 0),
                verify_seconds=10e-3 * v(k), overhead_seconds=1e-5 * (1 + step % 3)))
            step += 1
            if step % every == 0:
                footprints.append(_footprint(ctrl))
        request += 1
    return footprints


@pytest.mark.parametrize("shared", [True, False], ids=["shared-batch", "alone"])
def test_a_serving_controller_holds_its_memory_flat_for_100k_steps(shared):
    """Issue 36: a server's controller lives as long as the server. Driven for 100,000
    steps over some 800 requests, what it holds (its histories, acceptances, cost figures,
    caches of verdicts: all it reaches) after step 10,000 stays within 4 KiB of its
    largest in the first 10,000 steps. The slack covers what moves without growing (each
    figure is a new float every step, the memo of the verify curve empties at refits);
    a list appended once per step would add 8 bytes a step, 720 KB here."""
    ctrl = GammaController(8, has_pruned=not shared, costs=CostModel(smooth=shared))
    footprints = _serve(ctrl, 100_000, shared, every=2_000)
    early, late = max(footprints[:5]), max(footprints[5:])
    assert late <= early + 4096, (early, late, footprints)
