"""The engine on tiny random models: speculation is lossless for greedy decoding, the draft cache stays
consistent, stop conditions and stats hold, and bad input fails clearly."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import EOS_ID, TINY_VOCAB, assert_close
from spruce.draft.model_drafter import ModelDrafter
from spruce.verify.greedy import greedy_accept

from spruce import Engine, SamplingParams, SpeculationConfig
from spruce.errors import InvalidRequestError
from spruce.modeling import forward_tokens, new_cache

SPECS = [
    SpeculationConfig.chain(1),
    SpeculationConfig.chain(4),
    SpeculationConfig(depth=3, top_k=2, budget=6),
    SpeculationConfig(depth=5, top_k=3, budget=12),
]


def prompts(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(1, 20, (1,), generator=gen)),), generator=gen).tolist() for _ in range(n)]


def reference_greedy(model, prompt: list[int], max_tokens: int, eos: int | None = EOS_ID) -> list[int]:
    """Plain greedy decoding with a fresh full forward per token (no cache): the oracle."""
    seq, out = list(prompt), []
    for _ in range(max_tokens):
        ids = torch.tensor(seq)
        token = int(forward_tokens(model, new_cache(model), ids, torch.arange(len(seq)), None)[-1].argmax())
        out.append(token)
        seq.append(token)
        if token == eos:
            break
    return out


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"d{s.depth}k{s.top_k}b{s.budget}")
def test_greedy_speculation_is_lossless(tiny_engine, spec):
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    accepted = 0
    for prompt in prompts(4, seed=spec.budget):
        base = tiny_engine.generate([prompt], params, speculation=None)[0]
        fast = tiny_engine.generate([prompt], params, speculation=spec)[0]
        assert fast.token_ids == base.token_ids
        assert fast.stats.output_tokens == len(fast.token_ids)
        accepted += fast.stats.accepted
    # the comparison has teeth only if drafts were actually accepted
    assert accepted > 0


def test_plain_decoding_matches_uncached_reference(tiny_engine, tiny_target):
    for prompt in prompts(3, seed=7):
        out = tiny_engine.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True), speculation=None)[0]
        assert out.token_ids == reference_greedy(tiny_target, prompt, 16, eos=None)


@pytest.mark.parametrize("spec", SPECS[1:3], ids=["chain4", "tree"])
def test_bad_draft_is_still_lossless(tiny_target, bad_draft, tokenizer, spec):
    engine = Engine(tiny_target, tokenizer, bad_draft)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    for prompt in prompts(3, seed=11):
        base = engine.generate([prompt], params, speculation=None)[0]
        fast = engine.generate([prompt], params, speculation=spec)[0]
        assert fast.token_ids == base.token_ids


@pytest.mark.parametrize("on_prefill", [False, True], ids=["default", "draft_on_prefill"])
def test_prefill_pass_carries_a_draft_tree_only_when_asked(tiny_target, tokenizer, on_prefill):
    """By default the pass that prefills a request verifies no draft-model tree, so its first token waits
    for no draft reading the prompt; with ``draft_on_prefill`` the draft proposes before it and that
    pass commits several tokens. The same tokens either way."""
    engine = Engine(tiny_target, tokenizer, tiny_target)  # the target as its own draft: every draft is accepted
    prompt = prompts(1, 3)[0]
    params = SamplingParams(max_tokens=21, ignore_eos=True)
    spec = dataclasses.replace(SpeculationConfig.chain(4), draft_on_prefill=on_prefill)
    events = list(engine.stream(prompt, params, spec))
    assert len(events[0].token_ids) == (5 if on_prefill else 1)
    out = events[-1].output
    assert out is not None and out.token_ids == engine.generate([prompt], params, None)[0].token_ids
    # 21 tokens: 1 + 4 x 5 (the prefill pass plain), or 4 x 5 + 1 (the last step has no room to draft)
    assert out.stats.acceptance_rate == 1.0 and out.stats.accepted == 16 and out.stats.steps == 5


def test_prefill_pass_keeps_ngram_branches(tiny_engine):
    """With drafter "both" the prefill pass still verifies the n-gram branch (a lookup reads nothing
    first), only the draft model waits for the next step."""
    spec = SpeculationConfig(drafter="both", depth=1, top_k=1, budget=1, ngram_budget=1)
    # the prompt repeats "5 6 7" followed by 8: the lookup proposes 8 after the last 7; at most 2
    # tokens, so only the prefill pass may draft (a deeper tree than remaining - 1 is never built)
    out = tiny_engine.generate([[5, 6, 7, 8, 5, 6, 7]], SamplingParams(max_tokens=2, ignore_eos=True), spec)[0]
    assert out.stats.drafted == 1


def test_draft_equal_target_accepts_all(tiny_target, tokenizer):
    engine = Engine(tiny_target, tokenizer, tiny_target)
    out = engine.generate([prompts(1, 3)[0]], SamplingParams(max_tokens=21, ignore_eos=True), SpeculationConfig.chain(4))[0]
    # 21 tokens in 5-token steps (4 accepted + bonus) -> 5 steps, the last one capped by max_tokens
    assert out.stats.acceptance_rate == 1.0
    assert out.stats.steps == 5
    assert out.stats.accepted_by_depth == out.stats.drafted_by_depth


@pytest.mark.parametrize("spec", SPECS[1:], ids=["chain4", "tree6", "tree12"])
def test_draft_cache_matches_fresh_forward_after_commits(tiny_target, tiny_draft, spec):
    """After each step the draft cache equals a fresh forward over the tokens it claims to hold."""
    drafter = ModelDrafter(tiny_draft)
    state = drafter.new_state()
    tokens = prompts(1, 5)[0] + [1, 2]
    target_cache = new_cache(tiny_target)
    forward_tokens(tiny_target, target_cache, torch.tensor(tokens[:-1]), torch.arange(len(tokens) - 1), None)
    from spruce.verify.tree_verify import commit_accepted, verify_tree

    for _ in range(6):
        tree = drafter.propose(state, tokens, spec, max_depth=spec.depth).tree
        tree.validate()
        assert tree.num_draft_nodes <= spec.budget and tree.max_depth <= spec.depth
        logits = verify_tree(tiny_target, target_cache, tree, len(tokens) - 1)
        result = greedy_accept(tree, logits.argmax(-1))
        commit_accepted(target_cache, len(tokens) - 1, result.accepted_nodes)
        drafter.commit(state, result.accepted_nodes.tolist())
        tokens += result.emitted_tokens()
        fresh = new_cache(tiny_draft)
        forward_tokens(tiny_draft, fresh, torch.tensor(tokens[: state.cached]), torch.arange(state.cached), None)
        pool = drafter.pool
        assert pool.lengths[state.slot] == state.cached
        for layer, want in enumerate(fresh.layers):
            got = pool.keys[layer][state.slot, :, : state.cached][None]
            assert_close(got, want.keys, atol=1e-5, what="draft keys")
        assert state.cached < len(tokens)


def test_stop_conditions(tiny_engine, tokenizer):
    prompt = prompts(1, 21)[0]
    full = tiny_engine.generate([prompt], SamplingParams(max_tokens=30, ignore_eos=True), speculation=None)[0]
    # a stop token id cuts right after that token, with finish reason "stop"
    stop_id = full.token_ids[5]
    first = full.token_ids.index(stop_id)
    out = tiny_engine.generate([prompt], SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=(stop_id,)))[0]
    assert out.token_ids == full.token_ids[: first + 1] and out.finish_reason == "stop"
    # a stop string is cut from the text
    text = tokenizer.decode(full.token_ids, skip_special_tokens=True)
    if len(text) > 8:
        stop = text[4:7]
        out = tiny_engine.generate([prompt], SamplingParams(max_tokens=30, ignore_eos=True, stop=(stop,)))[0]
        assert out.finish_reason == "stop"
        assert out.text == text[: text.find(stop)]
    # max_tokens
    out = tiny_engine.generate([prompt], SamplingParams(max_tokens=7, ignore_eos=True))[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_eos_ends_generation(tiny_target, tiny_draft, tokenizer):
    engine = Engine(tiny_target, tokenizer, tiny_draft)
    # pick the token the target predicts first as "EOS" so the stop happens inside a speculative step
    prompt = prompts(1, 8)[0]
    first = engine.generate([prompt], SamplingParams(max_tokens=3, ignore_eos=True), speculation=None)[0].token_ids
    engine.eos_ids = {first[1]}
    out = engine.generate([prompt], SamplingParams(max_tokens=30), SpeculationConfig.chain(4))[0]
    assert out.token_ids == first[:2] and out.finish_reason == "stop"
    engine.eos_ids = {EOS_ID}


def test_stats_are_consistent(tiny_engine):
    out = tiny_engine.generate(prompts(1, 9), SamplingParams(max_tokens=25, ignore_eos=True), SPECS[2])[0]
    s = out.stats
    assert s.output_tokens == len(out.token_ids) == 25
    assert s.mean_accepted_length == pytest.approx(s.output_tokens / s.steps)
    assert s.accepted + s.steps >= s.output_tokens  # the last step may lose its bonus to max_tokens
    assert sum(s.accepted_by_depth) == s.accepted
    assert all(a <= d for a, d in zip(s.accepted_by_depth, s.drafted_by_depth))
    d = out.to_dict()
    assert set(d) == {"text", "token_ids", "finish_reason", "stats"}
    for key in ("steps", "drafted", "accepted", "mean_accepted_length", "acceptance_by_depth", "wall_time_s"):
        assert key in d["stats"]


def test_sampling_without_speculation_is_seeded(tiny_engine):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=123, ignore_eos=True)
    a = tiny_engine.generate(prompts(1, 4), params, speculation=None)[0].token_ids
    b = tiny_engine.generate(prompts(1, 4), params, speculation=None)[0].token_ids
    assert a == b


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(stop=("",)), "stop"),
    ],
)
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(InvalidRequestError, match=match):
        SamplingParams(**kwargs)


def test_bad_prompts(tiny_engine):
    with pytest.raises(InvalidRequestError, match="empty"):
        tiny_engine.generate("")
    with pytest.raises(InvalidRequestError, match="empty"):
        tiny_engine.generate([[]])
    with pytest.raises(InvalidRequestError, match="context"):
        tiny_engine.generate([[1] * 300])
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        tiny_engine.generate([[1, TINY_VOCAB + 5]])
    with pytest.raises(InvalidRequestError, match="speculation"):
        SpeculationConfig(depth=0)


def test_generation_stops_at_context_limit(tiny_engine):
    out = tiny_engine.generate([[1] * 250], SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_text_prompt_and_chat_template(tiny_engine):
    text = tiny_engine.apply_chat_template("hello")
    assert text.startswith("<|im_start|>user\nhello")
    out = tiny_engine.generate(text, SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and isinstance(out.text, str)


@pytest.mark.parametrize("draft_vocab", [TINY_VOCAB + 7, TINY_VOCAB - 3])
def test_draft_with_other_logits_width(tiny_target, tokenizer, draft_vocab):
    """A draft whose embedding table is padded (or shorter) still pairs: its logits are fit to the target's."""
    from conftest import build_tiny_model

    draft = build_tiny_model(seed=0, vocab_size=draft_vocab)
    engine = Engine(tiny_target, tokenizer, draft)
    spec = SpeculationConfig(depth=2, top_k=2, budget=3)
    prompt = prompts(1, 13)[0]
    base = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True), speculation=None)[0]
    fast = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True), spec)[0]
    assert fast.token_ids == base.token_ids
    sampled = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, seed=1, ignore_eos=True), spec)[0]
    assert len(sampled.token_ids) == 12 and max(sampled.token_ids) < TINY_VOCAB


def test_sliding_window_models_are_rejected(tokenizer):
    from conftest import build_tiny_model

    from spruce.errors import IncompatibleModelsError

    model = build_tiny_model(seed=0, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    with pytest.raises(IncompatibleModelsError, match="full-attention"):
        Engine(model, tokenizer)


def test_prompts_as_tensors(tiny_engine):
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    one = tiny_engine.generate(torch.tensor([5, 6, 7]), params)
    two = tiny_engine.generate(torch.tensor([[5, 6, 7], [8, 9, 10]]), params)
    assert len(one) == 1 and len(two) == 2 and two[0].token_ids == one[0].token_ids


MEDUSA_LIKE = ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0))


def test_static_tree_has_exactly_the_given_shape(tiny_target, tiny_draft):
    drafter = ModelDrafter(tiny_draft)
    state = drafter.new_state()
    spec = SpeculationConfig(tree_paths=MEDUSA_LIKE)
    tree = drafter.propose(state, prompts(1, 2)[0] + [4], spec, max_depth=8).tree
    tree.validate()
    assert tree.num_draft_nodes == len(MEDUSA_LIKE)
    assert sorted(tree.depth.tolist()) == sorted([0] + [len(p) for p in MEDUSA_LIKE])
    # rank 0 at the root is the draft's argmax
    root_children = tree.children(0)
    assert len(root_children) == 3


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_static_tree_generation(tiny_engine, temperature):
    spec = SpeculationConfig(tree_paths=MEDUSA_LIKE)
    params = SamplingParams(max_tokens=20, temperature=temperature, seed=3, ignore_eos=True)
    out = tiny_engine.generate(prompts(1, 6), params, spec)[0]
    assert len(out.token_ids) == 20
    if temperature == 0.0:
        assert out.token_ids == tiny_engine.generate(prompts(1, 6), params, speculation=None)[0].token_ids
        assert out.stats.accepted > 0


@pytest.mark.parametrize(
    "paths,match", [(((1,),), "skips rank"), (((0, 0),), "parent path"), ((), "non-empty"), (((-1,),), "ranks")]
)
def test_bad_static_paths(paths, match):
    with pytest.raises(InvalidRequestError, match=match):
        SpeculationConfig(tree_paths=paths)


def test_stream_adds_up_to_generate(tiny_engine):
    params = SamplingParams(max_tokens=14, ignore_eos=True)
    want = tiny_engine.generate([[9, 8, 7]], params)[0]
    events = list(tiny_engine.stream([9, 8, 7], params))
    assert events[-1].output is not None and all(e.output is None for e in events[:-1])
    assert [t for e in events for t in e.token_ids] == want.token_ids
    assert "".join(e.text for e in events) == want.text == events[-1].output.text


def test_stream_holds_back_a_possible_stop_string(tiny_engine, tokenizer):
    full = tiny_engine.generate([[9, 8, 7]], SamplingParams(max_tokens=14, ignore_eos=True))[0].text
    stop = full[5:8]  # a stop string the text will meet
    events = list(tiny_engine.stream([9, 8, 7], SamplingParams(max_tokens=14, ignore_eos=True, stop=(stop,))))
    sent = ""
    for e in events:
        sent += e.text
        assert stop not in sent
    assert sent == events[-1].output.text == full[: full.find(stop)]


def test_stream_stops_when_asked(tiny_engine):
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    events = list(tiny_engine.stream([1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True), None, should_stop))
    out = events[-1].output
    assert out.finish_reason == "abort" and out.stats.steps == 2 and len(out.token_ids) == 2


def test_stats_merge_adds_counters():
    from spruce.stats import SpecStats

    a, b, both = SpecStats(), SpecStats(), SpecStats()
    for stats, steps in ((a, [(2, 3, 1, 2), (1, 1, 0, 1)]), (b, [(3, 4, 3, 4)])):
        stats.record_plan(4, 2.5)  # settled by the first step that follows
        both.record_plan(4, 2.5)
        for step in steps:
            stats.record_step(*step)
            both.record_step(*step)
    a.merge(b)
    assert a.planned_steps == 2 and a.planned_emitted_tokens == 6
    for key in ("steps", "drafted", "accepted", "output_tokens", "drafted_by_depth", "accepted_by_depth", "steps_by_tree_size",
                "steps_by_planned_budget", "planned_steps", "planned_expected_tokens", "planned_emitted_tokens"):
        assert a.to_dict()[key] == both.to_dict()[key], key


def test_plan_calibration_settles_each_plan_with_its_step():
    """A plan's expectation counts against the next step's emitted tokens; a plain step (budget 0) and a
    step with no plan count in neither."""
    from spruce.stats import SpecStats

    stats = SpecStats()
    stats.record_plan(6, 2.75)
    stats.record_step(3, 6, 2, 3)  # the planned tree: 3 tokens emitted
    stats.record_plan(0, 1.0)
    stats.record_step(0, 0, 0, 1)  # planned plain decoding
    stats.record_step(0, 0, 0, 1)  # no plan (fixed speculation)
    stats.record_plan(2, 1.5)
    stats.record_step(2, 2, 0, 1)
    d = stats.to_dict()
    assert (d["planned_steps"], d["planned_expected_tokens"], d["planned_emitted_tokens"]) == (2, 4.25, 4)
    # a dynamic policy cut the planned tree: its expectation replaces the plan's; without a plan, nothing
    stats.record_plan(9, 4.0)
    stats.refine_plan(1.8)
    stats.record_step(1, 1, 1, 2)
    stats.refine_plan(3.0)
    stats.record_step(0, 0, 0, 1)
    assert (stats.planned_steps, stats.planned_expected_tokens, stats.planned_emitted_tokens) == (3, 6.05, 6)
