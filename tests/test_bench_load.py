"""The load benchmark's closed loop on the tiny pair: it keeps c requests in flight, finishes every
request, and (greedy) gives every configuration plain decoding's outputs. No timings are asserted."""

from __future__ import annotations

from spruce.evals.bench_load import closed_loop, summarize

from spruce import Engine, SamplingParams, SpeculationConfig
from spruce.config import EngineConfig


def test_closed_loop_runs_every_request_and_stays_lossless(tiny_target, tiny_draft, tokenizer):
    engine = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=3))
    prompts = [[5, 6, 7], [40, 41, 42, 43], [9], [100, 101, 102, 100, 101]]
    params = SamplingParams(max_tokens=7, ignore_eos=True)
    plain = closed_loop(engine, prompts, 3, 7, params, None)
    tree = closed_loop(engine, prompts, 3, 7, params, SpeculationConfig(depth=3, top_k=2, budget=4))
    assert plain["requests"] == tree["requests"] == 7
    assert plain["output_tokens"] == 7 * 7
    assert tree["outputs"] == plain["outputs"]
    assert tree["mean_accepted_length"] > plain["mean_accepted_length"] == 1.0
    assert 0 < plain["latency_p50_s"] <= plain["latency_p99_s"]
    assert not engine.has_work() and engine.kv_usage()["slots_free"] == 3


def test_rounds_sum_tokens_and_time_and_pool_the_latencies(tiny_target, tiny_draft, tokenizer):
    """Several alternating runs of one configuration (``--rounds``): tokens/s is all tokens over all
    wall time, latency quantiles come from every run's gaps, plan counts add up."""
    engine = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=2))
    prompts = [[5, 6, 7], [40, 41, 42, 43]]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    spec = SpeculationConfig(depth=2, top_k=1, budget=2, adaptive=True)
    runs = [closed_loop(engine, prompts, 2, 3, params, spec) for _ in range(2)]
    both = summarize(runs)
    assert both["requests"] == 6 and both["output_tokens"] == 30
    assert both["wall_s"] == runs[0]["wall_s"] + runs[1]["wall_s"]
    assert both["tokens_per_s"] == 30 / both["wall_s"]
    assert both["gaps"] == runs[0]["gaps"] + runs[1]["gaps"] and both["steps"] == runs[0]["steps"] + runs[1]["steps"]
    for budget in set(runs[0]["steps_by_planned_budget"]) | set(runs[1]["steps_by_planned_budget"]):
        want = sum(r["steps_by_planned_budget"].get(budget, 0) for r in runs)
        assert both["steps_by_planned_budget"][budget] == want
