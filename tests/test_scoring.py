"""Layer scorers and the auto-prune cost model, on hand-made tensors and a tiny model."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from exporters import autoprune, estimate, scoring  # noqa: E402
from exporters.calibration import reference  # noqa: E402
from exporters.scoring import (  # noqa: E402
    ScoringContext,
    angular_distance,
    best_block,
    block_influence,
    draft_agreement,
    fit_score,
    make_scorer,
    pick_candidate,
    prepare,
)
from exporters.torch_model import LayerRunner  # noqa: E402

torch.set_num_threads(1)
NOOP_LAYERS = (2, 4)  # layers of the tiny model made exact no-ops


# --- pure functions -----------------------------------------------------------------------

def test_block_influence_of_identity_is_zero():
    h = torch.randn(10, 16)
    assert block_influence(h, h) == pytest.approx(0.0, abs=1e-6)
    assert block_influence(h, -h) == pytest.approx(2.0, abs=1e-6)  # reversed stream
    assert block_influence(h, 3 * h) == pytest.approx(0.0, abs=1e-6)  # scale is ignored


@pytest.mark.parametrize("b, expected", [
    (lambda a: a, 0.0),  # same direction
    (lambda a: -a, 1.0),  # opposite: arccos(-1)/pi
    (lambda a: torch.stack([-a[:, 1], a[:, 0]], 1), 0.5),  # rotated by 90 degrees
])
def test_angular_distance(b, expected):
    a = torch.randn(8, 2)
    assert angular_distance(a, b(a)) == pytest.approx(expected, abs=1e-3)


def test_best_block_picks_smallest_distance_and_spares_protected():
    dist = {0: 0.01, 1: 0.5, 2: 0.2, 3: 0.1, 4: 0.3}
    assert best_block(dist, 2, frozenset()) == (0, 1)
    assert best_block(dist, 2, frozenset({0})) == (3, 4)  # block 0 touches layer 0
    with pytest.raises(ValueError, match="contiguous"):
        best_block({0: 0.1}, 3, frozenset({1}))


def test_pick_candidate_uses_kl_within_margin():
    stats = {1: (100, 5.0), 2: (99, 1.0), 3: (80, 0.1)}
    assert pick_candidate(stats, 1000, margin=0.0) == 1  # strictly most hits
    assert pick_candidate(stats, 1000, margin=0.002) == 2  # 99 ties 100; lower KL wins
    assert pick_candidate(stats, 1000, margin=0.05) == 3  # wide margin: KL decides


def test_fit_score_is_trace_times_variance():
    w = torch.full((4, 4), 2.0)
    assert fit_score(3.0, [w]) == pytest.approx(12.0)  # tr(F)=3, E[w^2]=4


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        make_scorer("magic")


# --- a tiny random Llama with two no-op layers -------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=6, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval().requires_grad_(False)
    for i in NOOP_LAYERS:  # zero projections into the residual stream: layer adds nothing
        model.model.layers[i].self_attn.o_proj.weight.zero_()
        model.model.layers[i].mlp.down_proj.weight.zero_()
    runner = LayerRunner(model)
    ids = [torch.randint(0, 64, (1, 24)) for _ in range(3)]
    preps = prepare(runner, [reference(runner, x, 8) for x in ids])
    return runner, preps


def test_replay_without_drops_matches_the_model(tiny):
    runner, preps = tiny
    p = preps[0]
    ours = runner.logits(runner.run(p.trace, p.trace.h_in[0], 0, set()), p.sample.positions)
    theirs = runner.model(p.sample.ids).logits[0, p.sample.positions]
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert draft_agreement(runner, preps, []) == 1.0
    assert draft_agreement(runner, preps, list(NOOP_LAYERS)) == 1.0  # no-ops change nothing


@pytest.mark.parametrize("method", ["shortlist", "greedy", "bi", "fit"])
def test_scorers_drop_the_noop_layers_first(tiny, method):
    runner, preps = tiny
    ctx = ScoringContext(runner, preps, frozenset({0, 5}))
    scores = make_scorer(method)(ctx, 2)
    assert scores.drops[2] == NOOP_LAYERS
    assert len(scores.importance) == 6


def test_shortlist_searches_only_bi_s_least_important_layers(tiny, monkeypatch):
    runner, preps = tiny
    monkeypatch.setattr(scoring, "SHORTLIST_MIN", 2)  # K = 2 of the 4 droppable layers
    seen = []
    real = scoring._candidate_stats
    monkeypatch.setattr(scoring, "_candidate_stats",
                        lambda r, p, removed, cands, *a: seen.append(tuple(cands))
                        or real(r, p, removed, cands, *a))
    scores = make_scorer("shortlist")(ScoringContext(runner, preps, frozenset({0, 5})), 1)
    assert set(seen) == {NOOP_LAYERS}  # the two no-ops have the lowest BI
    assert scores.drops[1][0] in NOOP_LAYERS
    assert scores.importance == make_scorer("bi")(ScoringContext(runner, preps,
                                                                 frozenset({0, 5})), 1).importance


def test_a_better_rival_set_replaces_greedy_s_pick(tiny):
    runner, preps = tiny
    ctx = ScoringContext(runner, preps, frozenset({0, 5}))
    # greedy may only drop real layers 1 and 3; the rival set (the no-ops) agrees fully
    drops, _ = scoring._eliminate(ctx, 2, [1, 3], "test", rivals={2: NOOP_LAYERS})
    assert drops[1] in {(1,), (3,)} and drops[2] == NOOP_LAYERS
    # a worse rival changes nothing
    drops, _ = scoring._eliminate(ctx, 1, list(NOOP_LAYERS), "test", rivals={1: (1,)})
    assert drops[1][0] in NOOP_LAYERS


@pytest.mark.parametrize("n_droppable, max_drop, k", [
    (28, 1, 6),  # at least SHORTLIST_MIN
    (28, 8, 16),  # 2n
    (4, 3, 4),  # never more than there are
])
def test_shortlist_size(n_droppable, max_drop, k):
    assert scoring.shortlist_size(n_droppable, max_drop) == k


def test_angular_picks_a_block_of_each_length(tiny):
    runner, preps = tiny
    scores = make_scorer("angular")(ScoringContext(runner, preps, frozenset({0, 5})), 3)
    for n, block in scores.drops.items():
        assert len(block) == n and block == tuple(range(block[0], block[0] + n))
        assert 0 not in block and 5 not in block
    assert scores.importance[2] == pytest.approx(0.0, abs=1e-4)  # no-op layer: no turn


# --- auto-prune cost model ----------------------------------------------------------------

@pytest.mark.parametrize("alpha, gamma, expected", [
    (0.0, 4, 1.0),  # nothing accepted: the verifier's own token only
    (1.0, 4, 5.0),  # everything accepted
    (0.5, 1, 1.5),  # 1 + alpha
    (0.8, 3, (1 - 0.8 ** 4) / 0.2),
])
def test_expected_tokens(alpha, gamma, expected):
    assert autoprune.expected_tokens(alpha, gamma) == pytest.approx(expected)


def test_gpu_profile_pays_and_cpu_profile_does_not():
    costs = autoprune.ByteProfile(shared=10, per_layer=[10] * 10)
    alphas = {1: 0.95, 5: 0.9, 8: 0.4}
    drops = {1: [4], 5: [2, 3, 4, 5, 6], 8: list(range(1, 9))}
    gpu = autoprune.decide(alphas, drops, costs, "gpu")
    # half the bytes at alpha 0.9 beats 91% of the bytes at 0.95 and a useless 8-layer cut
    assert gpu.pays and gpu.chosen.n_drop == 5 and gpu.chosen.speedup > 1
    cpu = autoprune.decide(alphas, drops, costs, "cpu")
    assert not cpu.pays and "no ratio pays" in cpu.reason
    assert costs.draft_fraction([0, 1]) == pytest.approx(90 / 110)


def test_speedup_formula():
    # gamma=2, alpha=0.5: E = 1.75; time = 2 * 0.5 + V(3)
    assert autoprune.speedup(0.5, 0.5, "gpu", 2) == pytest.approx(1.75 / 2.0)
    assert autoprune.speedup(0.5, 0.5, "cpu", 2) == pytest.approx(1.75 / (1.0 + 2.2))
    assert math.isclose(autoprune.verify_cost("gpu", 16), 2.0)


def test_best_gamma_comes_from_the_shared_cost_model():
    from runtime import costmodel

    g, s = autoprune.best_gamma(0.9, 0.3, "gpu")
    assert 1 <= g <= autoprune.MAX_GAMMA
    assert s == pytest.approx(costmodel.speedup(g, 0.9, 0.3, costmodel.flat_verify(8)))
    assert autoprune.best_gamma(0.0, 1.0, "cpu")[0] == 1  # never 0, even when nothing pays
    with pytest.raises(ValueError, match="unknown device profile"):
        autoprune.speedup(0.5, 0.5, "tpu", 1)


# --- time estimate ------------------------------------------------------------------------

def test_scoring_passes_rank_the_methods():
    droppable = list(range(1, 31))  # a 32-layer (8B-class) model, first and last kept
    passes = {m: estimate.scoring_passes(m, 32, droppable, 8, 2.0, 16)
              for m in ("bi", "fit", "shortlist", "greedy")}
    assert passes["bi"] == 32 and passes["bi"] < passes["fit"] < passes["shortlist"]
    assert passes["shortlist"] < 0.7 * passes["greedy"]


def test_predict_scales_with_the_measured_costs():
    costs = estimate.PassCosts(gen_step=0.01, token_layers=0.001, head_position=0.0005)
    args = ("shortlist", 30, list(range(1, 29)), 8, 1, [30] * 24, [30] * 8, 64, 16)
    est = estimate.predict(costs, *args)
    assert est.calibration > 0 and est.scoring > 0 and est.heldout > 0
    slow = estimate.predict(estimate.PassCosts(0.1, 0.01, 0.005), *args)
    assert slow.total == pytest.approx(10 * est.total)
    assert estimate.describe(slow, "shortlist").startswith("estimated time: about")


@pytest.mark.parametrize("seconds, text", [(42, "42 s"), (600, "10 min"), (9000, "2.5 h")])
def test_duration(seconds, text):
    assert estimate.duration(seconds) == text


def test_probe_measures_positive_costs(tiny):
    runner, preps = tiny
    costs = estimate.probe(runner, preps[0].sample.ids[0].tolist())
    assert costs.gen_step > 0 and costs.token_layers > 0 and costs.head_position > 0
