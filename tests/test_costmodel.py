"""The cost model that picks the tree: shapes against brute force, the profile's counting, cost curves,
and the engine's adaptive speculation (lossless, reproducible with a seed, plain decoding when drafting
cannot pay)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spruce.draft.tree import TokenTree
from test_engine import prompts, reference_greedy

from spruce import Engine, SamplingParams, SpeculationConfig
from spruce.costmodel import (
    MAX_DEPTH,
    MAX_RANK,
    AcceptanceProfile,
    CostCurve,
    StepPolicy,
    best_shape,
    choose_ngram_budget,
    choose_tree_size,
    plan_tree,
)


def _random_rates(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rates = torch.rand(MAX_DEPTH, MAX_RANK, generator=gen, dtype=torch.float64)
    return torch.cummin(rates, dim=1).values


def _value(rates: torch.Tensor, paths) -> float:
    total = 0.0
    for path in paths:
        p = 1.0
        for d, r in enumerate(path):
            p *= float(rates[d, r])
        total += p
    return total


def _closed(paths: set[tuple[int, ...]]) -> bool:
    return all((len(p) == 1 or p[:-1] in paths) and (p[-1] == 0 or p[:-1] + (p[-1] - 1,) in paths) for p in paths)


def brute_force_best(rates: torch.Tensor, n: int, depth: int, width: int = 3) -> float:
    """Best expected accepted tokens over every valid tree of n nodes (ranks < width, depth levels)."""
    candidates = [p for d in range(1, depth + 1) for p in itertools.product(range(width), repeat=d)]
    best = 0.0
    for subset in itertools.combinations(candidates, n):
        if _closed(set(subset)):
            best = max(best, _value(rates, subset))
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,depth", [(1, 1), (3, 2), (4, 3), (5, 2)])
def test_best_shape_is_optimal(seed, n, depth):
    rates = _random_rates(seed)
    rates[:, 3:] = 0.0  # keep the brute force small: at most 3 children per node
    shape = best_shape(rates, n, depth)
    paths = [p for p, _ in shape]
    assert len(paths) == n and _closed(set(paths)) and max(map(len, paths)) <= depth
    assert _value(rates, paths) == pytest.approx(brute_force_best(rates, n, depth), abs=1e-12)
    assert [p for _, p in shape] == sorted((p for _, p in shape), reverse=True)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 16), st.sampled_from([1.0, 0.3, 0.05]))
def test_plan_maximizes_tokens_per_second(seed, max_depth, max_budget, scale):
    """The plan's expected tokens/s equals the best over every (n, d) computed the slow way (low
    acceptance too: shallow best shapes, which the search reuses for deeper bounds)."""
    gen = torch.Generator().manual_seed(seed)
    rates = _random_rates(seed) * scale
    verify, draft = CostCurve(), CostCurve()
    for size in range(1, max_budget + 2):
        verify.observe(size, 0.1 + float(torch.rand(1, generator=gen)) * 0.02 * size)
    draft.observe(1, float(torch.rand(1, generator=gen)) * 0.05)
    draft.observe(2, 2 * draft(1))
    plan = plan_tree(rates, verify, draft, max_budget, max_depth)
    best = 1.0 / verify(1)
    for d in range(1, min(max_depth, max_budget) + 1):
        for n in range(1, max_budget + 1):
            shape = best_shape(rates, n, d)  # fewer than n nodes when the ranks run out
            best = max(best, (1 + sum(p for _, p in shape)) / (draft(d) + verify(len(shape) + 1)))
    assert plan.tokens_per_s == pytest.approx(best, rel=1e-9)
    assert plan.budget <= max_budget and plan.depth <= max_depth
    if plan.budget:
        assert len(plan.paths) == plan.budget and max(p[-1] for p in plan.paths) < plan.top_k


def test_flat_costs_pick_big_trees_and_steep_costs_pick_none():
    rates = torch.full((MAX_DEPTH, MAX_RANK), 0.3, dtype=torch.float64)
    rates[:, 0] = 0.8
    flat, steep, draft = CostCurve(), CostCurve(), CostCurve()
    for size in (1, 33):
        flat.observe(size, 0.010)
    steep.observe(1, 0.25)
    steep.observe(2, 0.60)
    steep.observe(3, 0.90)
    draft.observe(1, 0.001)
    big = plan_tree(rates, flat, draft, 32, 8)
    assert big.budget >= 16 and big.depth >= 4
    assert plan_tree(rates, steep, draft, 32, 8).budget == 0
    assert plan_tree(rates, steep, draft, 32, 8, min_budget=1).budget >= 1


def test_cost_curve_interpolates_and_extrapolates():
    c = CostCurve()
    with pytest.raises(ValueError):
        c(1)
    c.observe(1, 1.0)
    c.observe(5, 3.0)
    assert c(3) == pytest.approx(2.0)
    assert c(0) == pytest.approx(1.0)
    assert c(7) == pytest.approx(4.0)
    c.observe(5, 4.0)  # moving average toward the new timing
    assert 3.0 < c(5) < 4.0


def test_profile_counts_tried_and_accepted_by_depth_and_rank():
    # root -> a(rank 0) -> c(0), d(1); root -> b(rank 1) -> e(0); accepted path root, a, d
    tree = TokenTree.from_parents([0, 1, 2, 3, 4, 5], [-1, 0, 0, 1, 1, 2])
    prof = AcceptanceProfile()
    prof.record(tree, [0, 1, 4])
    assert prof.tried[0, :2].tolist() == [1, 1] and prof.accepted[0, :2].tolist() == [1, 0]
    # depth 2: c and d tried (parent a accepted), e not (parent b rejected)
    assert prof.tried[1, :2].tolist() == [1, 1] and prof.accepted[1, :2].tolist() == [0, 1]
    assert prof.tried.sum() == 4
    excluded = AcceptanceProfile()
    excluded.record(tree, [0, 1, 4], exclude=torch.tensor([False, False, True, False, False, False]))
    assert excluded.tried[0].sum() == 1


def test_profile_rates_converge_and_borrow_across_depths():
    prof = AcceptanceProfile()
    chain = TokenTree.chain(0, [1])
    for i in range(400):
        prof.record(chain, [0, 1] if i % 4 else [0])  # rank 0 at depth 1 accepted 3/4 of the time
    rates = prof.rates()
    assert rates[0, 0] == pytest.approx(0.75, abs=0.02)
    assert rates[3, 0] == pytest.approx(0.75, abs=0.05)  # depth 4 never seen: borrows depth 1's
    assert bool((rates[:, 1:] <= rates[:, :-1]).all())


# ---- the engine ----------------------------------------------------------------------------------------

ADAPTIVE = SpeculationConfig(depth=4, top_k=2, budget=6, adaptive=True)


def _engine_with_costs(tiny_target, tiny_draft, tokenizer, verify_s: float, draft_s: float) -> Engine:
    """An engine whose pass costs are set, not timed: the plans do not depend on this machine's load."""
    engine = Engine(tiny_target, tokenizer, tiny_draft)
    for size in range(1, 10):
        engine.verify_costs.observe(size, verify_s)
    engine.draft_costs.observe(1, draft_s)
    engine.draft_costs.observe(2, 2 * draft_s)
    return engine


def test_adaptive_greedy_is_lossless_and_reports_its_plans(tiny_target, tiny_draft, tokenizer):
    # flat verify cost and a cheap draft (a GPU-like machine): the plans draft trees
    engine = _engine_with_costs(tiny_target, tiny_draft, tokenizer, verify_s=0.01, draft_s=0.0001)
    for prompt in prompts(3, 11):
        out = engine.generate([prompt], SamplingParams(max_tokens=12), ADAPTIVE)[0]
        assert out.token_ids == reference_greedy(tiny_target, prompt, 12)[: len(out.token_ids)]
        assert sum(out.stats.steps_by_planned_budget.values()) == out.stats.steps
        assert sum(out.stats.steps_by_tree_size.values()) == out.stats.steps
        assert out.stats.drafted > 0
        # every step planned with a tree settles its plan's expectation against what the pass emitted
        stats = out.stats
        assert stats.planned_steps == sum(n for budget, n in stats.steps_by_planned_budget.items() if budget > 0) > 0
        assert stats.planned_expected_tokens >= stats.planned_steps  # a plan expects the bonus token at least
        assert stats.planned_steps <= stats.planned_emitted_tokens <= stats.output_tokens
    profile = engine.speculation_telemetry()["acceptance_profile"]
    assert sum(map(sum, profile["tried_by_depth_rank"])) > 0


def test_step_policy_remembers_the_expectation_of_the_tree_it_chose():
    """``size`` keeps 1 + the acceptance estimates of the nodes it chose: what the step's tree is expected
    to emit, settled against the pass in the request's plan calibration."""
    from spruce.costmodel import CONFIDENCE_BUCKETS, CostCurve, StepPolicy

    calibration = torch.linspace(0.05, 0.95, CONFIDENCE_BUCKETS)
    verify, draft = CostCurve(), CostCurve()
    for n, s in ((1, 1.0), (2, 1.0), (4, 1.0), (8, 1.0), (16, 1.6)):
        verify.observe(n, s)
    draft.observe(1, 0.01)
    draft.observe(2, 0.02)
    policy = StepPolicy(calibration, torch.full((10, 8), 0.5), verify, draft)
    assert policy.chosen_expected is None
    probs = [0.99, 0.9, 0.5, 0.02]
    n = policy.size(probs, 2)
    accept = [policy.accept_prob(p) for p in probs]
    assert 0 < n <= len(probs)
    assert policy.chosen_expected == pytest.approx(1.0 + sum(accept[:n]))


def test_first_adaptive_step_measures_the_costs(tiny_target, tiny_draft, tokenizer):
    engine = Engine(tiny_target, tokenizer, tiny_draft)
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3), ADAPTIVE)
    telemetry = engine.speculation_telemetry()
    measured = set(telemetry["verify_cost_s_by_tree_tokens"])
    assert {"1", "2", "4", str(ADAPTIVE.budget + 1)} <= measured
    assert all(v > 0 for v in telemetry["draft_cost_s_by_levels"].values())


def test_adaptive_falls_back_to_plain_decoding_when_drafting_cannot_pay(tiny_target, tiny_draft, tokenizer):
    # a draft pass that costs far more than any target pass: no tree can pay for it
    engine = _engine_with_costs(tiny_target, tiny_draft, tokenizer, verify_s=0.01, draft_s=10.0)
    out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=20, ignore_eos=True), ADAPTIVE)[0]
    planned = out.stats.steps_by_planned_budget
    assert planned.get(0, 0) >= 15  # plain decoding, except the exploration step every 16
    assert out.token_ids == reference_greedy(tiny_target, [5, 6, 7], 20, eos=None)


def test_seeded_sampling_ignores_what_the_server_learned(tiny_target, tiny_draft, tokenizer):
    engine = Engine(tiny_target, tokenizer, tiny_draft)
    params = SamplingParams(max_tokens=16, temperature=0.9, seed=7, ignore_eos=True)
    first = engine.generate([[1, 2, 3]], params, ADAPTIVE)[0]
    assert not first.stats.steps_by_planned_budget  # fixed limits, no plans
    engine.generate(prompts(4, 2), SamplingParams(max_tokens=16), ADAPTIVE)  # the profile moves
    engine.draft_costs.observe(1, 5.0)
    again = engine.generate([[1, 2, 3]], params, ADAPTIVE)[0]
    assert again.token_ids == first.token_ids


def test_adaptive_and_static_paths_are_exclusive():
    with pytest.raises(Exception, match="adaptive"):
        SpeculationConfig(tree_paths=((0,),), adaptive=True)


def test_tree_size_stops_before_a_step_in_the_verify_curve():
    verify = CostCurve()
    for size, seconds in ((1, 0.40), (2, 0.41), (3, 0.60), (8, 0.72)):
        verify.observe(size, seconds)
    probs = [0.9, 0.3, 0.2, 0.1, 0.05]
    # 1 node: 1.9 / 0.51 = 3.7 tok/s; 2 nodes cross the step to 0.6 s: 2.2 / 0.70 = 3.1, and later
    # nodes add too little to climb back (5 nodes: 2.55 / 0.77 = 3.3)
    assert choose_tree_size(probs, 0.1, verify) == 1
    assert choose_tree_size([0.99] * 7, 0.1, verify) == 7
    assert choose_tree_size([0.01], 0.1, verify) == 0
    # a draft that is right twice as often as it says
    steep = CostCurve()
    steep.observe(1, 0.4)
    steep.observe(2, 0.5)
    # plain: 1 / 0.5 = 2.0 tok/s; one node: 1.15 / 0.6 = 1.9; if it is accepted 30% of the time, 2.2
    assert choose_tree_size([0.15], 0.1, steep) == 0
    assert choose_tree_size([0.3], 0.1, steep) == 1


def test_confidence_calibration_learns_an_overconfident_draft():
    prof = AcceptanceProfile()
    gen = torch.Generator().manual_seed(0)
    probs = torch.full((2000,), 0.85)
    accepted = torch.rand(2000, generator=gen) < 0.3  # says 85%, right 30% of the time
    prof.record_confidence(probs, accepted)
    table = prof.calibration()
    assert table[8] == pytest.approx(0.3, abs=0.03)
    assert bool((table[1:] >= table[:-1]).all())  # isotonic: buckets 3-7 are pooled down with bucket 8
    assert table[0] == pytest.approx(0.05, abs=1e-9)  # unmeasured and below: its centre


def test_step_policy_expands_only_when_a_level_pays():
    rates = torch.full((MAX_DEPTH, MAX_RANK), 0.8, dtype=torch.float64)
    calibration = AcceptanceProfile().calibration()
    verify, cheap, dear = CostCurve(), CostCurve(), CostCurve()
    verify.observe(1, 0.4)
    verify.observe(17, 0.45)
    for curve, level in ((cheap, 0.01), (dear, 1.0)):
        curve.observe(1, level)
        curve.observe(2, 2 * level)
    assert StepPolicy(calibration, rates, verify, cheap).expand([0.9, 0.8], 0.8, 2)
    assert not StepPolicy(calibration, rates, verify, dear).expand([0.9, 0.8], 0.8, 2)
    assert not StepPolicy(calibration, rates, verify, cheap).expand([0.9, 0.8], 0.01, 2)


def test_cost_curve_resists_spikes_and_stays_monotone():
    c = CostCurve()
    c.observe(2, 1.0)
    c.observe(2, 100.0)  # another process stole the CPU for one pass
    assert c(2) <= 1.2 + 1e-12
    c.observe(3, 5.0)  # a spike at the first (and only) sample of a size ...
    c.observe(7, 1.5)
    assert c(3) == pytest.approx(1.5)  # ... is capped by the larger pass measured since
    assert c(5) == pytest.approx(1.5)


def test_cost_curve_beyond_its_largest_point_is_never_flat():
    """A larger pass that timed faster flattens the top of the monotone curve; extrapolating that flat
    segment priced a 16-request batch of 17-token trees (272 tokens) like one tree: the chord over the
    measured range prices it instead."""
    c = CostCurve()
    for size, seconds in ((1, 0.37), (4, 0.60), (16, 0.95), (17, 0.93)):
        c.observe(size, seconds)
    assert c(16) == pytest.approx(0.93)  # the floor: 16 never costs more than a measured 17
    chord = (0.93 - 0.37) / 16
    assert c(272) == pytest.approx(0.93 + chord * 255)
    assert c(272) > 8 * c(17)
    steep = CostCurve()  # a last segment steeper than the chord keeps its own slope
    for size, seconds in ((1, 0.3), (8, 0.31), (9, 0.5)):
        steep.observe(size, seconds)
    assert steep(11) == pytest.approx(0.5 + 2 * 0.19)


def test_a_proportional_curve_prices_fewer_levels_than_measured_by_their_share():
    """A draft's levels are passes of their own: where only 3-level trees ran, 1 level costs a third of
    them (a verify curve keeps its floor: a 1-token pass costs what the smallest measured one does)."""
    import pickle

    levels, passes = CostCurve(proportional=True), CostCurve()
    for curve in (levels, passes):
        curve.observe(3, 0.06)
    assert levels(1) == pytest.approx(0.02) and levels(2) == pytest.approx(0.04)
    assert levels(6) == pytest.approx(0.12)  # beyond: the chord from the origin
    assert passes(1) == pytest.approx(0.06) and passes(6) == pytest.approx(0.06)
    levels.observe(5, 0.11)
    assert levels(4) == pytest.approx(0.085) and levels(1) == pytest.approx(0.02)
    assert levels.to_dict() == {"3": pytest.approx(0.06), "5": pytest.approx(0.11)}  # measured points only
    again = pickle.loads(pickle.dumps(levels))  # tensor-parallel ranks receive the curves pickled
    assert again.proportional and again(1) == pytest.approx(0.02)


def test_a_batch_size_measured_only_at_three_levels_can_plan_one():
    """Under load the verify curve steepens and only a shallow tree pays. At a batch size whose trees
    all had 3 levels, every depth was priced like 3 (1 level too dear, 4 too cheap) and no other depth
    was ever drafted there to correct it: the planner prices levels by their share and plans 1 level."""
    from spruce.planner import Planner

    planner = object.__new__(Planner)  # only the curves are read
    planner.draft_costs_by_batch = {}
    draft = planner.draft_curve(8)
    draft.observe(3, 0.168)
    verify = CostCurve()
    for size, seconds in ((8, 0.160), (16, 0.206), (24, 0.30), (32, 0.34), (40, 0.39)):
        verify.observe(size, seconds)

    def per_request(n: int) -> float:  # every request of the batch drafting like this one
        return verify(8 * n)

    rates = torch.full((MAX_DEPTH, MAX_RANK), 0.02, dtype=torch.float64)
    rates[:, 0] = 0.9  # a confident context
    plan = plan_tree(rates, per_request, draft, 6, 4, margin=0.1)
    assert (plan.budget, plan.depth) == (1, 1)
    assert plan.tokens_per_s > 1.1 * 8 / 0.160 / 8
    flat = CostCurve()
    flat.observe(3, 0.168)
    # priced like 3 levels, every depth costs the same: the deepest chain looks free and is chosen
    assert plan_tree(rates, per_request, flat, 6, 4, margin=0.1).depth == 4


def test_step_policy_looks_past_a_step_in_the_verify_curve():
    """One more level crosses the 2 -> 3 token step and does not pay alone; three more levels do."""
    rates = torch.full((MAX_DEPTH, MAX_RANK), 0.9, dtype=torch.float64)
    calibration = AcceptanceProfile().calibration()
    verify, draft = CostCurve(), CostCurve()
    for size, seconds in ((1, 0.40), (2, 0.43), (3, 0.65), (4, 0.66), (5, 0.67), (6, 0.68)):
        verify.observe(size, seconds)
    draft.observe(1, 0.02)
    draft.observe(2, 0.04)
    policy = StepPolicy(calibration, rates, verify, draft)
    now = 1.95 / (0.02 + 0.43)  # one node verified: 4.33 tok/s
    one_more = (1.95 + 0.95 * 0.9) / (0.04 + 0.65)  # 4.07: worse
    two_more = (1.95 + 0.95 * 0.9 + 0.95 * 0.81) / (0.06 + 0.66)  # 5.0: better
    assert one_more < now < two_more
    assert policy.expand([0.95], 0.95, 1)
    assert not StepPolicy(calibration, rates * 0.3, verify, draft).expand([0.95], 0.95, 1)


def test_catch_up_reads_everything_that_pays_else_a_window():
    from spruce.costmodel import CATCH_UP_SHARE, MIN_DRAFT_WINDOW, TreePlan, catch_up_tokens

    assert CATCH_UP_SHARE == 0.5 and MIN_DRAFT_WINDOW == 256
    # the plan makes a token cost 0.2 s instead of 0.4 s: 0.2 s saved per remaining token
    plan = TreePlan(budget=4, depth=2, top_k=2, expected_tokens=2.0, expected_step_s=0.4)

    def cost(n: int) -> float:  # 0.1 s per pass + 10 ms a token
        return 0.1 + 0.01 * n

    # 40 tokens left: 8 s saved; everything costing under that is read
    assert catch_up_tokens(700, cost, 40, plan, 0.4) == 700
    # with a 10% margin 790 tokens (8.0 s) no longer fit: a window of what 4 s buys (390 tokens)
    assert catch_up_tokens(790, cost, 40, plan, 0.4, margin=0.1) == 390
    assert catch_up_tokens(2000, cost, 40, plan, 0.4) == 390
    assert catch_up_tokens(2000, cost, 400, plan, 0.4) == 2000  # a longer answer pays for all
    # in a batch of 4 the saving is shared: a quarter of it is this request's, 2 s: a 190-token window
    # would be below MIN_DRAFT_WINDOW, so none, unless the whole lag fits
    assert catch_up_tokens(1000, cost, 40, plan, 0.4, batch=4) == 0
    assert catch_up_tokens(150, cost, 40, plan, 0.4, batch=4) == 150
    # a plan no faster than plain decoding never pays for catching up
    slow = TreePlan(budget=4, depth=2, top_k=2, expected_tokens=1.0, expected_step_s=0.4)
    assert catch_up_tokens(10, cost, 1000, slow, 0.4) == 0


def test_a_long_prompt_short_answer_drafts_from_a_window(tokenizer, monkeypatch):
    """The draft's catch-up is priced on its measured curve: a prompt whose full read costs more than
    the expected saving is read only in part (its latest tokens), or not at all when even the shortest
    window costs too much; one that costs little is read whole; the output stays the target's either
    way. Costs are set and frozen, not timed."""
    from conftest import build_tiny_model, perturbed_copy
    from spruce.draft.model_drafter import ModelDrafter

    from spruce.config import EngineConfig

    tiny_target = build_tiny_model(seed=0, max_position_embeddings=2048)
    tiny_draft = perturbed_copy(tiny_target, noise=0.1, seed=1)
    monkeypatch.setattr(CostCurve, "observe", lambda self, size, seconds: None)
    windows: list[int] = []
    propose_batch = ModelDrafter.propose_batch
    monkeypatch.setattr(ModelDrafter, "propose_batch", lambda self, jobs: (windows.extend(j.config.draft_window for j in jobs), propose_batch(self, jobs))[1])
    long_prompt = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(max_tokens=12, ignore_eos=True)

    def run(per_token_s: float, prompt: list[int]) -> tuple[list[int], Any]:
        """A fresh engine (the prior acceptance profile), costs set; the windows its drafts read."""
        windows.clear()
        engine = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_seq_len=1100))
        engine.verify_costs.points.update({size: 0.01 for size in range(1, 10)})
        engine.draft_costs.points.update({1: 0.0001, 2: 0.0002})
        engine.planner.draft_catch_up.points.update({n: per_token_s * n for n in (32, 1024)})
        out = engine.generate([prompt], params, ADAPTIVE)[0]
        assert out.token_ids == reference_greedy(tiny_target, prompt, 12, eos=None)
        return windows[:], out

    # 12 tokens save at most 12 x 0.01 s; at 1 ms a token half of that reads 60 < 256 tokens: plain
    seen, out = run(1e-3, long_prompt)
    assert out.stats.steps_by_planned_budget.get(0, 0) >= 1 and seen in ([], [64])  # (or one explorer)
    # at 0.09 ms a token it can read some of the prompt: a window between 256 and 999 tokens
    seen, out = run(9e-5, long_prompt)
    assert seen and 256 <= seen[0] < 1000
    # a short prompt is read whole
    seen, out = run(9e-5, long_prompt[:200])
    assert seen and seen[0] == 0


def test_expected_output_follows_how_answers_end(tiny_target, tiny_draft, tokenizer):
    """The catch-up is priced on the tokens a request can be expected to generate: max_tokens caps it,
    answers that end by EOS early (measured over ended requests) shorten it, ignore_eos makes it exact."""
    from types import SimpleNamespace

    from spruce.costmodel import PRIOR_OUTPUT_TOKENS, expected_output_tokens

    h = 1 / PRIOR_OUTPUT_TOKENS
    assert expected_output_tokens(40, 0, 0) == pytest.approx((1 - (1 - h) ** 40) / h)
    assert 35 < expected_output_tokens(40, 0, 0) < 40 and expected_output_tokens(0, 0, 0) == 0
    # 100 answers of 20 tokens ended by EOS: a 4000-token budget is expected to bring ~20 more
    assert expected_output_tokens(4000, 100, 2000) == pytest.approx(2256 / 101, rel=1e-3)
    # answers cut by max_tokens only: the estimate grows toward the budget
    assert expected_output_tokens(40, 0, 100_000) > 39.9
    engine = Engine(tiny_target, tokenizer, tiny_draft)
    engine.generate([[5, 6, 7]], SamplingParams(max_tokens=8, ignore_eos=True), ADAPTIVE)
    assert (engine.planner.outputs_stopped, engine.planner.outputs_tokens) == (0, 8)
    for stop in (False, True):
        params = SamplingParams(max_tokens=4000, ignore_eos=stop)
        req = SimpleNamespace(params=params, stopper=SimpleNamespace(remaining=4000))
        assert (engine.planner.expected_remaining(req) == 4000) == stop


def test_plan_margin_keeps_plain_decoding_when_a_tree_barely_pays():
    rates = torch.full((MAX_DEPTH, MAX_RANK), 0.1)
    verify, draft = CostCurve(), CostCurve()
    verify.observe(1, 1.0)
    verify.observe(2, 1.0)
    draft.observe(1, 0.05)
    draft.observe(2, 0.1)
    # one node: (1 + 0.1) tokens in 1.05 s, 4.8% better than plain decoding
    assert plan_tree(rates, verify, draft, 1, 1).budget == 1
    assert plan_tree(rates, verify, draft, 1, 1, margin=0.1).budget == 0
    assert plan_tree(rates, verify, draft, 1, 1, margin=0.1).expected_tokens == 1.0


def _engine_under_cpu_like_costs(tiny_target, tiny_draft, tokenizer, monkeypatch) -> Engine:
    """An engine for 8 requests whose verify curve is flat up to 4 tokens, then linear (as on a CPU),
    with a cheap draft; the costs are set and frozen, not timed."""
    from spruce.config import EngineConfig

    engine = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=8))
    for size in range(1, 129):
        engine.verify_costs.observe(size, 0.01 * max(1.0, size / 4))
    engine.draft_costs.observe(1, 0.0005)
    engine.draft_costs.observe(2, 0.001)
    monkeypatch.setattr(CostCurve, "observe", lambda self, size, seconds: None)
    return engine


def test_under_load_adaptive_plans_shrink_to_plain_decoding(tiny_target, tiny_draft, tokenizer, monkeypatch):
    """A verify curve flat up to 4 tokens, then linear (as on a CPU): alone, trees are nearly free and
    the plan drafts; eight requests in one pass make every drafted token cost, and the plan decodes
    plainly (but for the exploration step). The costs are set and frozen, not timed."""
    engine = _engine_under_cpu_like_costs(tiny_target, tiny_draft, tokenizer, monkeypatch)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    alone = engine.generate(prompts(1, 5), params, ADAPTIVE)[0].stats.steps_by_planned_budget
    assert sum(n for budget, n in alone.items() if budget > 0) > alone.get(0, 0)
    batch = engine.generate(prompts(8, 6), params, ADAPTIVE)
    engine_steps = max(out.stats.steps for out in batch)
    drafted = sum(n for out in batch for budget, n in out.stats.steps_by_planned_budget.items() if budget > 0)
    assert drafted <= engine_steps // 16 + 1  # one request on an exploration step
    assert all(out.stats.steps_by_planned_budget.get(0, 0) >= out.stats.steps - 2 for out in batch)


def _engine_where_a_better_draft_would_pay(tiny_target, tiny_draft, tokenizer, monkeypatch) -> Engine:
    """An engine for 8 requests whose verify curve is flat up to 16 tokens, with a draft level of 0.3x a
    pass and a measured acceptance of 0.3: no tree pays, but one would if the draft were rejected half as
    often. Costs and profile set and frozen."""
    from spruce.config import EngineConfig

    engine = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=8))
    for size in range(1, 129):
        engine.verify_costs.observe(size, 0.01 * max(1.0, size / 16))
    engine.draft_costs.observe(1, 0.003)
    engine.draft_costs.observe(2, 0.006)
    for tried, accepted in ((engine.planner.profile.tried, engine.planner.profile.accepted),
                            (engine.planner.profile.ctx_tried, engine.planner.profile.ctx_accepted)):
        tried[:] = 1e4
        accepted[:] = 0.3e4
    monkeypatch.setattr(CostCurve, "observe", lambda self, size, seconds: None)
    monkeypatch.setattr(AcceptanceProfile, "record", lambda self, *args, **kwargs: None)
    return engine


@pytest.mark.parametrize("overspent", [False, True])
def test_exploration_keeps_to_its_share_of_step_time(tiny_target, tiny_draft, tokenizer, monkeypatch, overspent):
    """Where the plan decodes plainly but a better draft would pay, one request explores every
    EXPLORE_EVERY steps only while exploring drafts have cost at most EXPLORE_SHARE of the step time:
    never once they have overspent."""
    from spruce.planner import EXPLORE_EVERY, EXPLORE_SHARE

    engine = _engine_where_a_better_draft_would_pay(tiny_target, tiny_draft, tokenizer, monkeypatch)
    planner = engine.planner
    planner.step_s = 1e6  # a long-running server
    planner.explore_s = 2 * EXPLORE_SHARE * planner.step_s if overspent else 0.0
    spent = planner.explore_s
    batch = engine.generate(prompts(8, 6), SamplingParams(max_tokens=40, ignore_eos=True), ADAPTIVE)
    engine_steps = max(out.stats.steps for out in batch)
    drafted = sum(n for out in batch for budget, n in out.stats.steps_by_planned_budget.items() if budget > 0)
    if overspent:
        assert drafted == 0 and planner.explore_s == spent
    else:
        assert 1 <= drafted <= engine_steps // EXPLORE_EVERY + 1 and planner.explore_s > 0
    assert 0 < engine.speculation_telemetry()["exploration_share"] < 1


def test_no_exploration_where_even_a_better_draft_would_not_pay(tiny_target, tiny_draft, tokenizer, monkeypatch):
    """A verify curve that grows past 4 tokens, at 8 requests a pass: no tree would pay even with a draft
    rejected half as often as measured, so no request explores (an exploring draft would cost a step's
    draft work and teach the plan nothing it would act on); outputs stay plain decoding's."""
    engine = _engine_under_cpu_like_costs(tiny_target, tiny_draft, tokenizer, monkeypatch)
    planner = engine.planner
    planner.step_s = 1e6
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    batch = engine.generate(prompts(8, 6), params, ADAPTIVE)
    assert max(out.stats.steps for out in batch) > 16  # past the first exploration's due step
    assert all(set(out.stats.steps_by_planned_budget) == {0} for out in batch) and planner.explore_s == 0
    assert [out.token_ids for out in batch] == [out.token_ids for out in engine.generate(prompts(8, 6), params, None)]


def test_a_step_where_few_requests_draft_is_priced_again(tiny_target, tiny_draft, tokenizer):
    """Plans price the batch as if every request drafted alike. When only one of four can (the others'
    drafts are far behind and reading their prompts would not pay), the draft's levels cost the same for
    one request's gain: the step is priced again and decodes plainly. All four drafting keep their plans."""
    from types import SimpleNamespace

    from spruce.config import EngineConfig
    from spruce.stats import SpecStats

    engine = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=4))
    planner = engine.planner
    planner.verify_costs.points.update({n: 0.01 for n in range(1, 65)})
    for batch in (1, 4):
        planner.draft_costs_by_batch.setdefault(batch, CostCurve()).points.update({1: 0.002, 2: 0.004})
    planner.draft_catch_up.points.update({32: 1.0, 1024: 32.0})  # reading a prompt costs seconds

    def req(lag: int) -> SimpleNamespace:
        tokens = list(range(100))
        return SimpleNamespace(
            tokens=tokens, draft_state=SimpleNamespace(cached=len(tokens) - lag), sampling=None, policy=None, confidence=None,
            stopper=SimpleNamespace(remaining=50), stats=SpecStats(), params=SamplingParams(max_tokens=50),
        )

    def step(reqs):
        planner.begin_step(reqs)
        specs = planner.settle(reqs, [planner.plan(r, ADAPTIVE, len(reqs)) for r in reqs])
        planner.end_step()
        return specs

    steady = [req(1) for _ in range(4)]
    assert all(spec is not None for spec in step(steady))
    assert all(r.stats.steps_by_planned_budget.get(0) is None for r in steady)
    mixed = [req(1)] + [req(100) for _ in range(3)]
    assert step(mixed) == [None] * 4
    assert all(r.stats.steps_by_planned_budget == {0: 1} for r in mixed)


def test_catch_ups_are_priced_on_the_steps_that_keep_drafting(tiny_target, tiny_draft, tokenizer):
    """A lagging draft's catch-up pays only over the steps on which its request will then draft. At a
    batch size where caught-up requests' plans keep being cancelled (partial steps that do not pay), the
    measured share falls and the same catch-up is no longer read; other batch sizes keep theirs. Steps
    with no caught-up request bring it back (else no request would ever catch up there again)."""
    from types import SimpleNamespace

    from spruce.config import EngineConfig
    from spruce.planner import KEEP_HORIZON
    from spruce.stats import SpecStats

    engine = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=4))
    planner = engine.planner
    planner.verify_costs.points.update({n: 0.01 for n in range(1, 65)})
    for batch in (1, 4):
        planner.draft_costs_by_batch.setdefault(batch, CostCurve()).points.update({1: 0.002, 2: 0.004})
    planner.draft_catch_up.points.update({32: 0.032, 1024: 1.024})  # 1 ms a token

    def req(lag: int) -> SimpleNamespace:
        tokens = list(range(100))
        return SimpleNamespace(
            tokens=tokens, draft_state=SimpleNamespace(cached=len(tokens) - lag), sampling=None, policy=None, confidence=None,
            stopper=SimpleNamespace(remaining=50), stats=SpecStats(), params=SamplingParams(max_tokens=50),
            adaptive=False,  # no exploring request in these steps
        )

    def step(reqs):
        planner.begin_step(reqs)
        specs = planner.settle(reqs, [planner.plan(r, ADAPTIVE, len(reqs)) for r in reqs])
        planner.end_step()
        return specs

    assert planner.keep_share(4) == 1.0
    assert all(spec is not None for spec in step([req(40) for _ in range(4)]))  # 40 ms each: they read
    # one caught-up request among three far behind: the step is cancelled, again and again
    for _ in range(2 * KEEP_HORIZON):
        assert step([req(1)] + [req(100) for _ in range(3)]) == [None] * 4
    assert planner.keep_share(4) < 0.1 and planner.keep_share(1) == 1.0
    assert step([req(40) for _ in range(4)]) == [None] * 4
    assert all(spec is not None for spec in step([req(40)]))  # alone, the catch-up still pays
    assert engine.speculation_telemetry()["keep_drafting_share_by_batch"]["4"] < 0.1
    # steps where the caught-up requests draft bring the share back
    for _ in range(2 * KEEP_HORIZON):
        step([req(1) for _ in range(4)])
    assert planner.keep_share(4) > 0.8
    # a low share is no trap: steps without a caught-up request (all declined their catch-ups, so none
    # could correct it) move it back, and the catch-ups are read again
    for _ in range(2 * KEEP_HORIZON):
        step([req(1)] + [req(100) for _ in range(3)])
    assert planner.keep_share(4) < 0.2
    assert step([req(40) for _ in range(4)]) == [None] * 4
    for _ in range(3 * KEEP_HORIZON):
        assert step([req(100) for _ in range(4)]) == [None] * 4
    assert planner.keep_share(4) > 0.9
    assert all(spec is not None for spec in step([req(40) for _ in range(4)]))


def test_ngram_budget_follows_acceptance_and_verify_cost():
    flat, steep = CostCurve(), CostCurve()
    for size in range(1, 9):
        flat.observe(size, 1.0)
        steep.observe(size, float(size))
    assert choose_ngram_budget(0.9, 4, flat) == 4  # free tokens that land: all of them
    assert choose_ngram_budget(0.0, 4, flat) == 0  # tokens that never land: none
    assert choose_ngram_budget(0.9, 4, steep) == 0  # each token costs a pass: plain decoding wins
    # a token that barely pays: (1 + 0.12) / 1.05 is 6.7% better than plain decoding, under a 10% margin
    barely = CostCurve()
    barely.observe(1, 1.0)
    barely.observe(2, 1.05)
    assert choose_ngram_budget(0.12, 1, barely) == 1
    assert choose_ngram_budget(0.12, 1, barely, margin=0.1) == 0


def test_ngram_drafting_adapts_per_request(tiny_target, tokenizer, monkeypatch):
    """Adaptive n-gram speculation (no draft model): a request whose n-gram proposals keep landing keeps
    them; one whose proposals never land decodes plainly once that is measured. Output stays lossless."""
    from spruce.config import EngineConfig

    engine = Engine(tiny_target, tokenizer, None, EngineConfig(drafter="ngram"))
    for size in range(1, 9):
        engine.verify_costs.observe(size, 0.01 * (1 + 0.05 * (size - 1)))
    monkeypatch.setattr(CostCurve, "observe", lambda self, size, seconds: None)  # frozen, not timed
    spec = SpeculationConfig(drafter="ngram", ngram_budget=4, adaptive=True)
    planner = engine.planner

    class Req:  # what the planner reads of a request
        def __init__(self, tried: int, accepted: int) -> None:
            self.ngram_tried, self.ngram_accepted = tried, accepted
            self.ngram_lookups = self.ngram_found = 0
            self.prompt_ids = [0] * 24
            self.params = SamplingParams()

    good, bad = Req(40, 36), Req(40, 0)
    assert planner.plan(good, spec, 1).ngram_budget == 4
    assert planner.plan(bad, spec, 1) is None
    # end to end: equal to plain decoding whatever the plan chose
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompt = [5, 6, 7, 8] * 6
    want = engine.generate([prompt], params, None)[0].token_ids
    assert engine.generate([prompt], params, spec)[0].token_ids == want
    assert planner.ngram_tried >= 0 and planner.ngram_accepted <= planner.ngram_tried
    # its lookups are counted, by prompt length too (the repeated prompt always finds a continuation)
    assert 0 < planner.ngram_found <= planner.ngram_lookups
    by_prompt = engine.speculation_telemetry()["ngram_by_prompt_tokens"]["16"]
    assert by_prompt["lookups"] == planner.ngram_lookups and by_prompt["match_rate"] > 0.5


def test_ngram_step_seconds_count_lookups_that_find_nothing():
    from spruce.costmodel import ngram_token_s, prompt_bucket

    verify = CostCurve()
    for size in range(1, 9):
        verify.observe(size, 1.0 + 0.1 * (size - 1))
    # nothing found: a plain step per token; always found and always landing: k + 1 tokens a pass
    assert ngram_token_s(0.9, 0.0, 4, verify) == pytest.approx(1.0)
    assert ngram_token_s(1.0, 1.0, 3, verify) == pytest.approx(1.3 / 4)
    # found half the time, each token landing with 0.5: (0.5 x 1.2 + 0.5 x 1.0) / (1 + 0.5 x 0.75)
    assert ngram_token_s(0.5, 0.5, 2, verify) == pytest.approx(1.1 / 1.375)
    rng = torch.Generator().manual_seed(0)
    for _ in range(200):
        rate, match, k = torch.rand(3, generator=rng).tolist()
        k = 1 + int(k * 6)
        now = ngram_token_s(rate, match, k, verify)
        # tokens that land more often never make a token dearer; more matches do not either, where the
        # k tokens pay for their pass when found (else they do, as plain decoding would win)
        assert ngram_token_s(min(1.0, rate + 0.1), match, k, verify) <= now + 1e-12
        pays = ngram_token_s(rate, 1.0, k, verify) <= 1.0
        assert (ngram_token_s(rate, min(1.0, match + 0.1), k, verify) <= now + 1e-12) == pays or match > 0.9
    assert [prompt_bucket(n) for n in (0, 1, 2, 3, 4, 511, 512, 1023, 1024)] == [0, 1, 2, 2, 3, 9, 10, 10, 11]


def test_rates_shrink_through_nested_levels():
    from spruce.costmodel import PRIOR_WEIGHT, shrunk

    assert shrunk(0.3) == 0.3  # nothing measured: the prior
    assert shrunk(0.3, (0, 0), (0, 0)) == pytest.approx(0.3)  # empty levels pass the prior through
    assert shrunk(0.3, (9000, 10000)) == pytest.approx(0.9, abs=1e-3)  # much evidence overrides it
    # a request with 2 of 2 landed, its kind 10 of 40, all requests 100 of 200
    pooled = (100 + PRIOR_WEIGHT * 0.3) / (200 + PRIOR_WEIGHT)
    kind = (10 + PRIOR_WEIGHT * pooled) / (40 + PRIOR_WEIGHT)
    assert shrunk(0.3, (2, 2), (10, 40), (100, 200)) == pytest.approx((2 + PRIOR_WEIGHT * kind) / (2 + PRIOR_WEIGHT))


def test_catch_up_is_priced_against_lookups_alone(tokenizer, monkeypatch):
    """With drafter "both", a long prompt's catch-up must save more than lookups alone would: where
    the requests of its prompt length have measured lookups that match and land, it reads nothing and
    verifies lookups alone; where they measured lookups that never match, it reads the prompt. A short
    prompt's statistics do not decide for a long one. Costs are set and frozen, not timed; the output
    is the target's either way."""
    from conftest import build_tiny_model, perturbed_copy
    from spruce.draft.model_drafter import ModelDrafter

    from spruce.config import EngineConfig

    tiny_target = build_tiny_model(seed=0, max_position_embeddings=2048)
    tiny_draft = perturbed_copy(tiny_target, noise=0.1, seed=1)
    monkeypatch.setattr(CostCurve, "observe", lambda self, size, seconds: None)
    fed: list[int] = []
    propose_batch = ModelDrafter.propose_batch
    monkeypatch.setattr(ModelDrafter, "propose_batch", lambda self, jobs: (fed.extend(len(j.tokens) - j.state.cached for j in jobs), propose_batch(self, jobs))[1])
    prompt = torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(4)).tolist()
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    spec = SpeculationConfig(drafter="both", depth=4, top_k=2, budget=6, ngram_budget=4, adaptive=True)

    def run(found: float, accepted: float, prompt_tokens: int, sampling: bool = False) -> Any:
        fed.clear()
        engine = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_seq_len=1100))
        engine.verify_costs.points.update({size: 0.01 for size in range(1, 20)})
        engine.draft_costs.points.update({1: 0.0001, 2: 0.0002})
        # reading the 600-token prompt costs 0.03 s: under what the model's trees would save (12 tokens
        # of 0.01 s), not under what they save beyond lookups that land
        engine.planner.draft_catch_up.points.update({n: 5e-5 * n for n in (32, 1024)})
        planner = engine.planner
        planner.ngram_by_prompt[sampling, prompt_bucket(prompt_tokens)] = [1000.0, 1000.0 * found, 1000.0, 1000.0 * accepted]
        out = engine.generate([prompt], params, spec)[0]
        assert out.token_ids == reference_greedy(tiny_target, prompt, 12, eos=None)
        return out

    from spruce.costmodel import prompt_bucket

    caught_up = run(found=0.0, accepted=0.0, prompt_tokens=600)
    assert fed and max(fed) > 500 and caught_up.stats.drafted > 0
    lookups = run(found=1.0, accepted=1.0, prompt_tokens=600)
    assert not fed or max(fed) <= 64  # (at most an exploring draft's window)
    assert lookups.stats.steps_by_planned_budget.get(0, 0) >= 10
    # the same statistics measured on short prompts, or by sampling requests: the long greedy one is
    # priced on the pooled prior
    run(found=1.0, accepted=1.0, prompt_tokens=20)
    assert fed and max(fed) > 500
    run(found=1.0, accepted=1.0, prompt_tokens=600, sampling=True)
    assert fed and max(fed) > 500


@pytest.mark.parametrize("ngram_hits", [0, 1000])
def test_adaptive_model_and_ngram_drafting_is_lossless_either_way(tiny_target, tiny_draft, tokenizer, ngram_hits):
    """drafter "both" under the cost model: with n-gram proposals that never land the plan drops them
    (the model's tree alone), with ones that always land it keeps them; the output is plain decoding's."""
    engine = Engine(tiny_target, tokenizer, tiny_draft)
    engine.planner.ngram_tried, engine.planner.ngram_accepted = 1000.0, float(ngram_hits)
    spec = SpeculationConfig(drafter="both", depth=3, top_k=2, budget=4, ngram_budget=3, adaptive=True)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    prompt = [9, 8, 7, 6, 5] * 4
    assert engine.generate([prompt], params, spec)[0].token_ids == engine.generate([prompt], params, None)[0].token_ids



def test_greedy_and_sampling_requests_keep_their_own_acceptance_profiles(tiny_target, tiny_draft, tokenizer, monkeypatch):
    """A sampled draft token is accepted with the target's probability of it, a greedy one when it is
    the argmax: the engine measures the two apart, each request records into and plans from its own
    mode's profile. With costs frozen so that only a likely tree pays, a greedy profile that measured
    high acceptance drafts while a sampling profile that measured little decodes plainly."""
    from spruce.config import EngineConfig

    engine = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=2))
    planner = engine.planner
    spec = SpeculationConfig(depth=2, top_k=1, budget=2, adaptive=False)
    engine.generate(prompts(1, 3), SamplingParams(max_tokens=8, ignore_eos=True), spec)
    greedy_tried = float(planner.profile.tried.sum())
    assert greedy_tried > 0 and float(planner.sampling_profile.tried.sum()) == 0
    engine.generate(prompts(1, 4), SamplingParams(max_tokens=8, temperature=0.8, ignore_eos=True), spec)
    assert float(planner.sampling_profile.tried.sum()) > 0 and float(planner.profile.tried.sum()) == greedy_tried
    assert "acceptance_profile_sampling" in engine.speculation_telemetry()

    for profile, rate in ((planner.profile, 0.95), (planner.sampling_profile, 0.05)):
        # pooled and by context (the context a step plans in follows the target's confidence, which
        # follows the unseeded sampled tokens: the first runs' counts by context made this flaky)
        for tried, accepted in ((profile.tried, profile.accepted), (profile.ctx_tried, profile.ctx_accepted)):
            tried[:] = 1000.0
            accepted[:] = 1000.0 * rate
    planner.verify_costs.points.clear()
    planner.verify_costs.points.update({1: 0.01, 2: 0.012, 3: 0.014})
    planner.draft_costs.points.update({1: 0.001, 2: 0.002})
    monkeypatch.setattr(CostCurve, "observe", lambda self, size, seconds: None)
    greedy = engine.generate(prompts(1, 5), SamplingParams(max_tokens=10, ignore_eos=True), ADAPTIVE)[0]
    sampled = engine.generate(prompts(1, 6), SamplingParams(max_tokens=10, temperature=0.8, ignore_eos=True), ADAPTIVE)[0]
    # plain only on its prefill pass (which carries no draft-model tree), a tree on every later step
    assert greedy.stats.steps_by_planned_budget.get(0, 0) == 1 and greedy.stats.drafted > 0
    assert set(sampled.stats.steps_by_planned_budget) == {0}


def test_profile_by_context_shrinks_toward_the_pooled_rates():
    from spruce.costmodel import CONTEXT_BUCKETS, context_bucket

    assert context_bucket(None) is None and context_bucket(0.0) == 0 and context_bucket(1.0) == CONTEXT_BUCKETS - 1
    chain = TokenTree.chain(0, [1, 2])
    prof = AcceptanceProfile()
    for _ in range(50):
        prof.record(chain, [0, 1, 2], context=4)  # a sure context: both nodes accepted
        prof.record(chain, [0], context=1)  # an unsure one: the first rejected
    prof.record(chain, [0, 1], context=None)  # no context yet: pooled only
    assert prof.ctx_tried.sum() == prof.tried.sum() - 2
    pooled, sure, unsure, unseen = prof.rates(), prof.rates(4), prof.rates(1), prof.rates(2)
    assert unsure[0, 0] < 0.1 < pooled[0, 0] < 0.9 < sure[0, 0]
    assert torch.equal(unseen, pooled)  # a context never measured plans with the server's rates
    assert (torch.diff(sure, dim=1) <= 0).all() and (torch.diff(unsure, dim=1) <= 0).all()
    table = prof.to_dict()["depth1_first_choice_by_context"]
    assert [t for t, _ in table] == [0, 50, 0, 0, 50]


def test_plans_follow_the_requests_context(tiny_target, tiny_draft, tokenizer):
    """The same server profile, two requests: one whose target has been sure of its recent tokens
    drafts (the draft agrees there), one whose target has not decodes plainly; costs frozen so that only
    likely trees pay. The engine tracks each request's confidence from its verify passes."""
    from types import SimpleNamespace

    from spruce.config import EngineConfig
    from spruce.stats import SpecStats

    engine = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=2))
    out = engine.generate(prompts(1, 7), SamplingParams(max_tokens=6, ignore_eos=True), SpeculationConfig(depth=2, top_k=1, budget=2))[0]
    prof = engine.planner.profile
    # the prefill pass drafts nothing and gives the request its first confidence: every tree has a context
    assert out.stats.drafted > 0 and 0 < prof.ctx_tried.sum() == prof.tried.sum()
    prof.ctx_tried.zero_()
    prof.tried.zero_()
    spec = SpeculationConfig(depth=2, top_k=1, budget=2, draft_on_prefill=True)
    out = engine.generate(prompts(1, 7), SamplingParams(max_tokens=6, ignore_eos=True), spec)[0]
    assert out.stats.drafted > 0 and 0 < prof.ctx_tried.sum() < prof.tried.sum()  # a tree before any context

    planner = engine.planner
    planner.profile = prof = AcceptanceProfile()
    chain = TokenTree.chain(0, [1, 2])
    for _ in range(100):
        prof.record(chain, [0, 1, 2], context=4)
        prof.record(chain, [0], context=1)
    planner.verify_costs.points.clear()
    planner.verify_costs.points.update({1: 0.01, 2: 0.012, 3: 0.014})
    planner.draft_costs.points.update({1: 0.001, 2: 0.002})

    def req(confidence: float | None) -> SimpleNamespace:
        tokens = list(range(20))
        return SimpleNamespace(
            tokens=tokens, draft_state=SimpleNamespace(cached=len(tokens)), sampling=None, policy=None, confidence=confidence,
            stopper=SimpleNamespace(remaining=50), stats=SpecStats(), params=SamplingParams(max_tokens=50),
        )

    sure, unsure = req(0.95), req(0.3)
    planner.begin_step([sure, unsure])
    assert planner.plan(sure, ADAPTIVE, 1) is not None
    assert planner.plan(unsure, ADAPTIVE, 1) is None


def test_plans_are_reused_while_planning_would_cost_a_share_of_the_step(tiny_target, tiny_draft, tokenizer):
    """A plan is made again only when it is ``plan_every`` steps old: as many steps as keep the measured
    search time under PLAN_HOST_SHARE of the measured step time (1 where steps are slow, as on a CPU;
    up to PLAN_MAX_AGE where a step is a few milliseconds); a new batch size gets its own plan at once.
    A plan to decode plainly stands for PLAN_MAX_AGE steps whatever the step time."""
    from types import SimpleNamespace

    from spruce.config import EngineConfig
    from spruce.planner import PLAN_HOST_SHARE, PLAN_MAX_AGE
    from spruce.stats import SpecStats

    engine = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=2))
    planner = engine.planner
    planner.verify_costs.points.update({n: 0.01 for n in range(1, 65)})
    for batch in (1, 2):
        planner.draft_costs_by_batch.setdefault(batch, CostCurve()).points.update({1: 0.001, 2: 0.002})
    req = SimpleNamespace(
        tokens=list(range(20)), draft_state=SimpleNamespace(cached=19), sampling=None, policy=None, confidence=None,
        stopper=SimpleNamespace(remaining=50), stats=SpecStats(), params=SamplingParams(max_tokens=50),
        adaptive=False,  # no exploring request in these steps
    )

    def budget(batch: int = 1) -> int:
        planner.begin_step([req])
        spec = planner.plan(req, ADAPTIVE, batch)
        planner.end_step()
        return spec.budget if spec is not None else 0

    assert planner.plan_every == 1  # nothing timed yet
    planner.mean_step_s, planner.plan_s = 0.25, 0.002  # a CPU: planning is 0.8% of a step
    assert planner.plan_every == 1
    planner.mean_step_s = 0.002 / (2.5 * PLAN_HOST_SHARE)  # planning would be 40% of a step: every 3rd
    assert planner.plan_every == 3
    planner.mean_step_s = 1e-6
    assert planner.plan_every == PLAN_MAX_AGE
    planner.mean_step_s = 0.002 / (2.5 * PLAN_HOST_SHARE)
    assert budget() > 0
    planner.verify_costs.points.update({n: 0.01 * n for n in range(1, 65)})  # trees no longer pay
    planner.plan_s = 0.002  # (each search updates the EMA; keep the reuse at 3 steps)
    assert budget() > 0 and budget() > 0  # the plan made two steps ago still stands
    assert budget(batch=2) == 0  # another batch size: planned now, with the new curve
    planner.plan_s = 0.002
    assert budget() == 0  # older than three steps: planned again
    # a plan to decode plainly stands longer: PLAN_MAX_AGE steps, even where planning is cheap
    planner.mean_step_s, planner.plan_s = 0.25, 0.002
    planner.verify_costs.points.update({n: 0.01 for n in range(1, 65)})  # trees pay again
    assert all(budget() == 0 for _ in range(PLAN_MAX_AGE - 1))
    assert budget() > 0
