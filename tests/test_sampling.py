"""Sampling distributions (temperature, top-k, top-p) and speculative sampling through the engine."""

from __future__ import annotations

import pytest
import torch
from test_tree_sampling import P_VALUE_FLOOR, chi_square_p_value

from spruce import Engine, SamplingParams, SpeculationConfig
from spruce.modeling import forward_tokens, new_cache
from spruce.sampling import sampling_probs


def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.allclose(sampling_probs(logits, 1.0), torch.softmax(logits, -1))
    assert torch.allclose(sampling_probs(logits, 0.5), torch.softmax(logits * 2, -1))
    with pytest.raises(ValueError):
        sampling_probs(logits, 0.0)


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[0.1, 3.0, 2.0, -1.0, 2.5]])
    probs = sampling_probs(logits, 1.0, top_k=2)
    assert (probs[0] > 0).tolist() == [False, True, False, False, True]
    assert torch.allclose(probs.sum(), torch.tensor(1.0))


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs_in = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs_in.log()
    kept = sampling_probs(logits, 1.0, top_p=0.8) > 0
    assert kept.tolist() == [[True, True, False, False]]
    kept = sampling_probs(logits, 1.0, top_p=0.81) > 0
    assert kept.tolist() == [[True, True, True, False]]
    out = sampling_probs(logits, 1.0, top_p=0.8)
    assert torch.allclose(out[0, :2], torch.tensor([0.625, 0.375]))


def test_top_k_then_top_p():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    out = sampling_probs(logits, 1.0, top_k=3, top_p=0.7)
    # top-3 renormalized: 0.444, 0.333, 0.222 -> nucleus 0.7 keeps the first two
    assert (out > 0).tolist() == [[True, True, False, False]]


def test_speculative_sampling_is_seeded(tiny_engine):
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=42, ignore_eos=True)
    spec = SpeculationConfig(depth=3, top_k=2, budget=5)
    a = tiny_engine.generate([[3, 4, 5]], params, spec)[0].token_ids
    b = tiny_engine.generate([[3, 4, 5]], params, spec)[0].token_ids
    c = tiny_engine.generate([[3, 4, 5]], SamplingParams(max_tokens=16, temperature=0.8, seed=43, ignore_eos=True), spec)[0]
    assert a == b and len(a) == 16
    assert c.token_ids != a


TOP_K = 6
ENGINE_SAMPLES = 3000


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [
        SpeculationConfig.chain(2),
        SpeculationConfig(depth=2, top_k=3, budget=6),
        SpeculationConfig(tree_paths=((0,), (1,), (0, 0), (0, 1))),
        SpeculationConfig(depth=3, top_k=2, budget=5, sampled_children=False),
    ],
    ids=["chain2", "tree", "static", "dynamic_topk"],
)
def test_engine_first_two_tokens_follow_target(tiny_target, tiny_draft, tokenizer, spec):
    engine = Engine(tiny_target, tokenizer, tiny_draft)
    prompt = [10, 20, 30]
    # exact distribution of the first two tokens under top-k sampling of the target
    first = sampling_probs(forward_tokens(tiny_target, new_cache(tiny_target), torch.tensor(prompt), torch.arange(3), None)[-1:], 1.0, TOP_K)[0]
    expected = {}
    for a in first.nonzero().flatten().tolist():
        ctx = torch.tensor(prompt + [a])
        second = sampling_probs(forward_tokens(tiny_target, new_cache(tiny_target), ctx, torch.arange(4), None)[-1:], 1.0, TOP_K)[0]
        for b in second.nonzero().flatten().tolist():
            expected[(a, b)] = float(first[a] * second[b])
    counts: dict[tuple[int, ...], int] = {}
    accepted = 0
    for seed in range(ENGINE_SAMPLES):
        out = engine.generate([prompt], SamplingParams(max_tokens=3, temperature=1.0, top_k=TOP_K, seed=seed, ignore_eos=True), spec)[0]
        key = tuple(out.token_ids[:2])
        counts[key] = counts.get(key, 0) + 1
        accepted += out.stats.accepted
    assert set(counts) <= set(expected)
    assert accepted > ENGINE_SAMPLES // 4  # speculation actually took part
    p_value = chi_square_p_value(counts, expected, ENGINE_SAMPLES)
    assert p_value > P_VALUE_FLOOR, f"chi-square p = {p_value:.2e}"
