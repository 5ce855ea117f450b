"""The continuous-batching engine: ragged packed passes equal per-request reference passes, a request's
output and stats are the same alone or batched, KV slots are freed however a request ends, and a request
that breaks the model fails alone."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import TINY_VOCAB, assert_close, build_tiny_model, perturbed_copy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from spruce.draft.tree import ROOT_PARENT, TokenTree
from spruce.verify.tree_verify import verify_tree

from spruce import Engine, SamplingParams, SpeculationConfig
from spruce.attention import packed_attention, use_backend
from spruce.config import EngineConfig
from spruce.errors import InvalidRequestError
from spruce.kvcache import PoolExhaustedError, Segment, SlotKVCache, run_packed
from spruce.modeling import forward_tokens, new_cache

SPECS = {
    "plain": None,
    "chain3": SpeculationConfig.chain(3),
    "tree": SpeculationConfig(depth=3, top_k=2, budget=6),
    "static": SpeculationConfig(tree_paths=((0,), (1,), (0, 0), (0, 0, 0))),
    "ngram": SpeculationConfig(drafter="ngram", ngram_budget=4),
    "both": SpeculationConfig(drafter="both", depth=2, top_k=2, budget=3),
    "adaptive": SpeculationConfig(depth=4, top_k=2, budget=6, adaptive=True),
}


def _prompts(n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(1, 24, (1,), generator=gen))
        # repeats in some prompts, so that n-gram lookup finds matches
        base = torch.randint(0, 256, (max(1, length // 2),), generator=gen).tolist()
        out.append((base * 3)[:length])
    return out


# ---- the packed pass against per-request reference passes ---------------------------------------------


@pytest.fixture(scope="module")
def packed_model():
    model = build_tiny_model(seed=5, num_attention_heads=4, num_key_value_heads=2)
    reference = copy.deepcopy(model)
    use_backend(model, "sdpa")
    return model, reference


def _random_tree(n: int, gen: torch.Generator) -> TokenTree:
    parents = [ROOT_PARENT] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
    tokens = torch.randint(0, TINY_VOCAB, (n,), generator=gen).tolist()
    return TokenTree.from_parents(tokens, parents)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    requests=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 9)), min_size=1, max_size=5),
    seed=st.integers(0, 2**31 - 1),
)
def test_packed_tree_pass_matches_each_request_alone(packed_model, requests, seed):
    """Ragged packing: prompts of any lengths prefilled in one pass, then a tree per request verified in
    one pass, give each request the logits of its own DynamicCache passes (offsets, masks, positions)."""
    model, reference = packed_model
    gen = torch.Generator().manual_seed(seed)
    pool = SlotKVCache(model, 6, 48)
    slots = [pool.allocate() for _ in requests]
    prefixes = [torch.randint(0, TINY_VOCAB, (p,), generator=gen) for p, _ in requests]
    trees = [_random_tree(n, gen) for _, n in requests]
    last = run_packed(model, pool, [Segment(s, p, torch.arange(len(p)), logits="last") for s, p in zip(slots, prefixes)])
    got = run_packed(
        model,
        pool,
        [Segment(s, t.tokens, t.depth + len(p), tail=t.ancestor_mask) for s, p, t in zip(slots, prefixes, trees)],
    )
    for prefix, tree, got_last, got_tree in zip(prefixes, trees, last, got):
        cache = new_cache(reference)
        want_last = forward_tokens(reference, cache, prefix, torch.arange(len(prefix)), None, last_only=True)
        assert_close(got_last, want_last, atol=1e-4, what="prefill logits")
        assert_close(got_tree, verify_tree(reference, cache, tree, len(prefix)), atol=1e-4, what="tree logits")
    assert pool.lengths[: len(requests)] == [len(p) + t.num_nodes for p, t in zip(prefixes, trees)]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), groups=st.sampled_from([1, 3]), float32_rows=st.booleans())
def test_packed_attention_paths_match_a_per_row_reference(seed, groups, float32_rows):
    """Every SDPA path of the packed pass (a prefill's causal rows unmasked, grouped-query masked rows,
    folded one-row queries) and the float32 rows of a ``float32_rows`` pool (every segment but the
    prefill) against a float64 softmax over each row's visible keys: a prompt fused with its first
    tree, a causal chunk after cached keys, a tree after a prefix, a one-token decode."""
    gen = torch.Generator().manual_seed(seed)
    model = build_tiny_model(seed=0, num_attention_heads=2 * groups, num_key_value_heads=2)
    pool = SlotKVCache(model, 4, 64, float32_rows=float32_rows)
    slots = [pool.allocate() for _ in range(4)]
    for slot, cached in zip(slots, (0, 7, 9, 5)):
        pool.lengths[slot] = cached
    prompt, tree, chunk = int(torch.randint(2, 20, (1,), generator=gen)), _random_tree(5, gen), 6
    fused = torch.zeros(prompt + 5, prompt + 5, dtype=torch.bool)
    fused[:prompt, :prompt] = torch.ones(prompt, prompt, dtype=torch.bool).tril()
    fused[prompt:, :prompt] = True
    fused[prompt:, prompt:] = tree.ancestor_mask
    segments = [
        Segment(slots[0], torch.zeros(prompt + 5, dtype=torch.long), torch.arange(prompt + 5), tail=fused),
        Segment(slots[1], torch.zeros(chunk, dtype=torch.long), torch.arange(chunk)),
        Segment(slots[2], tree.tokens, tree.depth + 9, tail=tree.ancestor_mask),
        Segment(slots[3], torch.zeros(1, dtype=torch.long), torch.arange(1)),
    ]
    visible = [fused, torch.ones(chunk, 7 + chunk, dtype=torch.bool).tril(7), torch.cat([torch.ones(5, 9, dtype=torch.bool), tree.ancestor_mask], 1), torch.ones(1, 6, dtype=torch.bool)]
    meta = pool.begin(segments)
    # the prompt's rows at least (a tree's leading chain is causal too); the other segments start later
    assert meta.causal_rows[0] >= prompt and meta.causal_rows[1:] == (0, 0, 0)
    assert meta.float32_rows == float32_rows
    heads, kv_heads, dim = 2 * groups, 2, 8
    rows = sum(int(s.tokens.numel()) for s in segments)
    query = torch.randn(1, heads, rows, dim, generator=gen)
    key = torch.randn(4, kv_heads, 64, dim, generator=gen)
    value = torch.randn(4, kv_heads, 64, dim, generator=gen)
    got = packed_attention(query, key, value, meta, 0.3)[0]
    offset = 0
    for slot, vis in zip(slots, visible):
        n, length = vis.shape
        q = query[0, :, offset : offset + n].double()
        k = key[slot, :, :length].double().repeat_interleave(groups, 0)
        v = value[slot, :, :length].double().repeat_interleave(groups, 0)
        scores = (q @ k.transpose(1, 2) * 0.3).masked_fill(~vis, float("-inf"))
        want = (scores.softmax(-1) @ v).transpose(0, 1)
        assert_close(got[offset : offset + n], want.float(), atol=1e-5, what=f"slot {slot} attention")
        offset += n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_rows_pool_under_a_bfloat16_model(seed):
    """A ``float32_rows`` pool (a draft's on a CPU) keeps float32 keys under a bfloat16 model: a prefill,
    a tree level after it for several requests and a one-token step give the logits of the model's own
    bfloat16 pool to bfloat16's rounding, and stay as close to the float32 model's as that pool does."""
    gen = torch.Generator().manual_seed(seed)
    exact = build_tiny_model(seed=seed, num_attention_heads=6, num_key_value_heads=2)
    model = copy.deepcopy(exact).to(torch.bfloat16)
    use_backend(exact, "sdpa")
    use_backend(model, "sdpa")
    pools = {
        "float32 rows": (model, SlotKVCache(model, 3, 64, float32_rows=True)),
        "bfloat16": (model, SlotKVCache(model, 3, 64)),
        "exact": (exact, SlotKVCache(exact, 3, 64)),
    }
    assert pools["float32 rows"][1].keys[0].dtype == torch.float32 and pools["bfloat16"][1].keys[0].dtype == torch.bfloat16
    prompts = [torch.randint(0, TINY_VOCAB, (int(torch.randint(3, 20, (1,), generator=gen)),), generator=gen) for _ in range(3)]
    trees = [_random_tree(int(torch.randint(1, 6, (1,), generator=gen)), gen) for _ in prompts]
    steps = [
        [Segment(i, p, torch.arange(len(p)), logits="last") for i, p in enumerate(prompts)],
        [Segment(i, t.tokens, t.depth + len(p), tail=t.ancestor_mask) for i, (p, t) in enumerate(zip(prompts, trees))],
    ]
    ids = torch.randint(0, TINY_VOCAB, (1,), generator=gen)
    got = {}
    for name, (m, pool) in pools.items():
        for _ in prompts:
            pool.allocate()
        got[name] = [torch.cat(run_packed(m, pool, segs)) for segs in steps]
        got[name].append(run_packed(m, pool, [Segment(0, ids, torch.tensor([pool.lengths[0]]))])[0])
    for i, what in enumerate(("prefill", "tree level", "one-token step")):
        a, b, want = got["float32 rows"][i], got["bfloat16"][i], got["exact"][i]
        assert_close(a, b, atol=0.1, what=f"{what}: float32 rows against the bfloat16 pool")
        assert (a - want).abs().max() <= 1.5 * (b - want).abs().max() + 1e-3, what


@pytest.mark.parametrize("kernel", ["triton", "flex"])
def test_kernel_verify_pass_matches_the_sdpa_pass(packed_model, kernel):
    """A verify pass through a kernel backend (Triton: keys read in place from the pool's slots; flex:
    slots gathered into its packed layout) gives the logits of the SDPA pass over the same pool."""
    pytest.importorskip("triton")
    model, _ = packed_model
    gen = torch.Generator().manual_seed(11)
    pool = SlotKVCache(model, 5, 64)
    # slots taken out of order, so a request's slot index differs from its place in the batch
    slots = [pool.allocate() for _ in range(5)][::-2]
    prefixes = [torch.randint(0, TINY_VOCAB, (p,), generator=gen) for p in (9, 1, 23)]
    trees = [_random_tree(n, gen) for n in (5, 1, 12)]
    run_packed(model, pool, [Segment(s, p, torch.arange(len(p)), logits="none") for s, p in zip(slots, prefixes)])
    segments = [Segment(s, t.tokens, t.depth + len(p), tail=t.ancestor_mask) for s, p, t in zip(slots, prefixes, trees)]
    want = run_packed(model, pool, segments)
    for s, p in zip(slots, prefixes):
        pool.lengths[s] = len(p)
    got = run_packed(model, pool, segments, kernel=kernel)
    for g, w in zip(got, want):
        assert_close(g, w, atol=1e-4, what=f"{kernel} verify logits")


def test_flex_builds_its_block_mask_once_per_pass(packed_model, monkeypatch):
    """FlexAttention's block mask depends on the pass's layout only: one build per pass, not per layer."""
    from spruce.kernels import flex_backend

    calls = []
    build = flex_backend.create_block_mask
    monkeypatch.setattr(flex_backend, "create_block_mask", lambda *a, **k: calls.append(1) or build(*a, **k))
    model, _ = packed_model
    assert model.config.num_hidden_layers > 1
    pool = SlotKVCache(model, 2, 32)
    slots = [pool.allocate(), pool.allocate()]
    gen = torch.Generator().manual_seed(2)
    run_packed(model, pool, [Segment(s, torch.randint(0, TINY_VOCAB, (5,), generator=gen), torch.arange(5), logits="none") for s in slots])
    trees = [_random_tree(n, gen) for n in (3, 4)]
    run_packed(model, pool, [Segment(s, t.tokens, t.depth + 5, tail=t.ancestor_mask) for s, t in zip(slots, trees)], kernel="flex")
    assert len(calls) == 1


def test_keep_moves_the_accepted_path_and_frees_the_rest(packed_model):
    model, reference = packed_model
    pool = SlotKVCache(model, 2, 32)
    slot = pool.allocate()
    prefix = torch.arange(7) + 10
    tree = TokenTree.from_parents([3, 4, 5, 6, 7], [ROOT_PARENT, 0, 0, 2, 3])
    run_packed(model, pool, [Segment(slot, prefix, torch.arange(7), logits="none")])
    run_packed(model, pool, [Segment(slot, tree.tokens, tree.depth + 7, tail=tree.ancestor_mask)])
    pool.keep(slot, 7, [0, 2, 3])
    cache = new_cache(reference)
    forward_tokens(reference, cache, torch.cat([prefix, torch.tensor([3, 5, 6])]), torch.arange(10), None)
    assert pool.lengths[slot] == 10
    for layer, want in enumerate(cache.layers):
        assert_close(pool.keys[layer][slot, :, :10][None], want.keys, atol=1e-5, what="kept keys")
        assert_close(pool.values[layer][slot, :, :10][None], want.values, atol=1e-5, what="kept values")


def test_pool_limits_are_errors(packed_model):
    model, _ = packed_model
    pool = SlotKVCache(model, 1, 8)
    slot = pool.allocate()
    with pytest.raises(PoolExhaustedError, match="slots"):
        pool.allocate()
    with pytest.raises(PoolExhaustedError, match="exceed"):
        run_packed(model, pool, [Segment(slot, torch.arange(9), torch.arange(9))])
    assert pool.lengths[slot] == 0
    with pytest.raises(ValueError, match="tail visibility"):
        run_packed(model, pool, [Segment(slot, torch.arange(3), torch.arange(3), tail=torch.ones(2, 2, dtype=torch.bool))])
    pool.release(slot)
    with pytest.raises(ValueError, match="not allocated"):
        pool.release(slot)


# ---- the engine: alone or batched ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(tiny_target, tiny_draft, tokenizer):
    """(batched engine with 4 slots, a separate engine that runs each request alone)."""
    return (
        Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=4)),
        Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=1)),
    )


@pytest.mark.parametrize("name", list(SPECS))
def test_greedy_batch_equals_alone(engines, name):
    """Seven requests on four slots (three wait and join as others finish), ragged prompts and lengths:
    every request's tokens and per-request stats equal its run alone."""
    batched, alone = engines
    spec = SPECS[name]
    prompts = _prompts(7, seed=len(name))
    params = [SamplingParams(max_tokens=6 + 3 * i, ignore_eos=True) for i in range(len(prompts))]
    reqs = [batched.add_request(p, sp, spec, text_deltas=False) for p, sp in zip(prompts, params)]
    for _ in batched._drive(reqs):
        pass
    for req, prompt, sp in zip(reqs, prompts, params):
        want = alone.generate([prompt], sp, spec)[0]
        assert req.output is not None and req.output.token_ids == want.token_ids
        if spec is not None and not spec.adaptive:  # adaptive trees follow what the engine measured
            got_stats, want_stats = req.output.stats.to_dict(), want.stats.to_dict()
            for key in ("steps", "drafted", "accepted", "drafted_by_depth", "accepted_by_depth", "steps_by_tree_size"):
                assert got_stats[key] == want_stats[key], key
    assert batched.kv_usage()["slots_free"] == 4 and batched.kv_usage()["positions_used"] == 0


def test_greedy_batch_matches_plain_reference(engines):
    """Batched speculation against plain decoding (the oracle) on the same prompts."""
    batched, alone = engines
    prompts = _prompts(5, seed=11)
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    got = batched.generate(prompts, params, SPECS["tree"])
    want = [alone.generate([p], params, speculation=None)[0] for p in prompts]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert sum(g.stats.accepted for g in got) > 0


def test_seeded_sampling_batch_equals_alone(engines):
    batched, alone = engines
    prompts = _prompts(4, seed=3)
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=1234, ignore_eos=True)
    spec = SpeculationConfig(depth=2, top_k=2, budget=4)
    got = batched.generate(prompts, params, spec)
    want = [alone.generate([p], params, spec)[0] for p in prompts]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_abort_and_finish_mid_batch_free_every_slot(tiny_target, tiny_draft, tokenizer):
    engine = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=3))
    initial = engine.kv_usage(), engine.drafter.pool.free_slots
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    spec = SPECS["tree"]
    long_a = engine.add_request([1, 2, 3], params, spec)
    short = engine.add_request([4, 5], SamplingParams(max_tokens=3, ignore_eos=True), spec)
    long_b = engine.add_request([6, 7, 8, 9], params, spec)
    queued = engine.add_request([10, 11], params, spec)  # waits: three slots
    ended: dict[int, str] = {}
    for _ in range(3):
        for req, event in engine.step():
            if event.output is not None:
                ended[id(req)] = event.output.finish_reason
    assert engine.num_running == 3 and engine.num_waiting == 0  # short finished, queued took its slot
    assert ended == {id(short): "length"}
    engine.abort(long_a)
    stop_b = {"now": False}
    long_b.should_stop = lambda: stop_b["now"]
    stop_b["now"] = True
    for req, event in engine.step():
        if event.output is not None:
            ended[id(req)] = event.output.finish_reason
    assert ended[id(long_a)] == "abort" and ended[id(long_b)] == "abort"
    assert engine.num_running == 1
    engine.abort(queued)
    engine.step()
    assert not engine.has_work()
    assert (engine.kv_usage(), engine.drafter.pool.free_slots) == initial


def test_a_request_that_breaks_the_model_fails_alone(tiny_target, tiny_draft, tokenizer):
    target = copy.deepcopy(tiny_target)

    def explode(module, args, kwargs):
        if bool((kwargs["input_ids"] == 13).any()):
            raise RuntimeError("boom")

    target.register_forward_pre_hook(explode, with_kwargs=True)
    engine = Engine(target, tokenizer, tiny_draft, EngineConfig(max_batch_size=4))
    alone = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=1))
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    spec = SPECS["chain3"]
    prompts = [[5, 6, 7], [13, 14], [20, 21, 22, 23]]
    reqs = [engine.add_request(p, params, spec) for p in prompts]
    errors, outputs = {}, {}
    while engine.has_work():
        for req, event in engine.step():
            if event.error is not None:
                errors[id(req)] = event.error
            elif event.output is not None:
                outputs[id(req)] = event.output
    assert list(errors) == [id(reqs[1])] and "boom" in str(errors[id(reqs[1])])
    for i in (0, 2):
        assert outputs[id(reqs[i])].token_ids == alone.generate([prompts[i]], params, spec)[0].token_ids
    assert engine.kv_usage()["slots_free"] == 4
    with pytest.raises(RuntimeError, match="boom"):  # the single-request views re-raise it
        engine.generate([[13]], params, spec)
    assert engine.kv_usage()["slots_free"] == 4


def test_context_and_tree_limits_are_clear_errors(tiny_target, tiny_draft, tokenizer):
    engine = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=1, max_seq_len=16))
    assert engine.max_context == 16
    with pytest.raises(InvalidRequestError, match="max_seq_len"):
        engine.add_request(list(range(16)), SamplingParams(), None)
    with pytest.raises(InvalidRequestError, match="KV positions"):
        engine.add_request([1, 2], SamplingParams(), SpeculationConfig(depth=100, top_k=4, budget=300))
    out = engine.generate([list(range(10))], SamplingParams(max_tokens=50, ignore_eos=True))[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"
    with pytest.raises(InvalidRequestError, match="max_batch_size"):
        EngineConfig(max_batch_size=0)


def test_bfloat16_batch_equals_alone(tokenizer):
    """What holds in bfloat16: the packed pass computes each request's rows with the same kernels, so
    on this model batched greedy output still equals alone (float32 is the guarantee; bfloat16 rounding
    of batched matmuls may differ on other hardware)."""
    target = build_tiny_model(seed=0).to(torch.bfloat16)
    draft = perturbed_copy(build_tiny_model(seed=0), noise=0.1, seed=1).to(torch.bfloat16)
    batched = Engine(target, tokenizer, draft, EngineConfig(dtype="bfloat16", max_batch_size=4))
    alone = Engine(copy.deepcopy(target), tokenizer, draft, EngineConfig(dtype="bfloat16", max_batch_size=1))
    prompts = _prompts(4, seed=21)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    got = batched.generate(prompts, params, SPECS["tree"])
    want = [alone.generate([p], params, SPECS["tree"])[0] for p in prompts]
    agree = sum(g.token_ids == w.token_ids for g, w in zip(got, want))
    assert agree == len(prompts)


def test_packed_pass_on_a_llama_model():
    """Another architecture through the same seams (Llama builds its masks differently from Qwen2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config._attn_implementation = "sdpa"
    reference = LlamaForCausalLM(config).eval()
    model = copy.deepcopy(reference)
    use_backend(model, "sdpa")
    pool = SlotKVCache(model, 2, 64)
    a, b = pool.allocate(), pool.allocate()
    pa, pb = torch.randint(0, 300, (9,)), torch.randint(0, 300, (4,))
    run_packed(model, pool, [Segment(a, pa, torch.arange(9), logits="none"), Segment(b, pb, torch.arange(4), logits="none")])
    tree = _random_tree(6, torch.Generator().manual_seed(1))
    tree = TokenTree.from_parents(tree.tokens % 300, tree.parents)
    got = run_packed(model, pool, [Segment(a, tree.tokens, tree.depth + 9, tail=tree.ancestor_mask), Segment(b, torch.tensor([7]), torch.tensor([4]))])
    cache = new_cache(reference)
    forward_tokens(reference, cache, pa, torch.arange(9), None)
    assert_close(got[0], verify_tree(reference, cache, tree, 9), atol=1e-4, what="llama tree logits")
    cache_b = new_cache(reference)
    forward_tokens(reference, cache_b, pb, torch.arange(4), None)
    assert_close(got[1], forward_tokens(reference, cache_b, torch.tensor([7]), torch.tensor([4]), None), atol=1e-4, what="llama decode")


def test_drafter_reports_its_catch_up_pass(tiny_draft):
    """The engine prices catching a draft up by the feed pass alone (``last_feed``), not the levels."""
    from spruce.draft.model_drafter import DraftJob, ModelDrafter

    drafter = ModelDrafter(tiny_draft, TINY_VOCAB, num_slots=2)
    assert drafter.pool.float32_rows  # on a CPU its levels attend in float32 (test_float32_rows_pool_...)
    a, b = drafter.new_state(), drafter.new_state()
    spec = SpeculationConfig(depth=3, top_k=2, budget=4)
    drafter.propose_batch([DraftJob(a, list(range(40)), spec, 3), DraftJob(b, list(range(5)), spec, 3)])
    seconds, fed = drafter.last_feed
    assert fed == 45 and seconds > 0
    assert a.levels > 1 and b.levels > 1  # the levels ran after the feed, and are not in it


def test_windowed_catch_up_drafts_from_the_latest_tokens(tiny_draft):
    """A draft that reads only the latest ``draft_window`` tokens (at their own RoPE positions) builds
    the tree a fresh draft builds from those tokens alone (relative positions are what RoPE sees), and
    stays in step with it after commits."""
    from spruce.draft.model_drafter import ModelDrafter

    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, TINY_VOCAB, (50,), generator=gen).tolist()
    windowed, fresh = ModelDrafter(tiny_draft, TINY_VOCAB, num_slots=1), ModelDrafter(tiny_draft, TINY_VOCAB, num_slots=1)
    a, b = windowed.new_state(), fresh.new_state()
    spec = SpeculationConfig(depth=3, top_k=2, budget=4)
    # the draft read 10 tokens earlier, then fell 40 behind: it drops them and reads the latest 16
    windowed.propose(a, tokens[:10], spec, 3)
    windowed.commit(a, [0])
    got = windowed.propose(a, tokens, dataclasses.replace(spec, draft_window=16), 3)
    assert a.offset == 34 and windowed.last_feed[1] == 16 and windowed.pool.lengths[a.slot] - len(a.node_slots) == 16
    want = fresh.propose(b, tokens[34:], spec, 3)
    assert got.tree.tokens.tolist() == want.tree.tokens.tolist()
    assert got.tree.parents.tolist() == want.tree.parents.tolist()
    assert_close(got.tree.draft_logprobs, want.tree.draft_logprobs, atol=1e-4, what="windowed draft log-probs")
    # commit the same path in both, then a steady step: still the same tree
    path = [0, 1]
    windowed.commit(a, path)
    fresh.commit(b, path)
    more = torch.randint(0, TINY_VOCAB, (2,), generator=gen).tolist()
    got = windowed.propose(a, tokens + [int(got.tree.tokens[1])] + more, dataclasses.replace(spec, draft_window=16), 3)
    want = fresh.propose(b, tokens[34:] + [int(want.tree.tokens[1])] + more, spec, 3)
    assert got.tree.tokens.tolist() == want.tree.tokens.tolist()
    assert a.offset == 34  # a lag within the window reads on from where the slot is


def test_windowed_drafts_stay_lossless(tiny_target, tiny_draft, tokenizer):
    """Greedy output with a draft that sees only a short window equals plain decoding, alone and batched."""
    engine = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=3))
    prompts = _prompts(3, seed=21)
    params = SamplingParams(max_tokens=24)
    plain = engine.generate(prompts, params, speculation=None)
    windowed = SpeculationConfig(depth=3, top_k=2, budget=4, draft_window=8)
    assert [o.token_ids for o in engine.generate(prompts, params, speculation=windowed)] == [o.token_ids for o in plain]


def test_device_logits_are_the_same_rows_unconverted():
    """``device_logits``: the verify rows stay in the model's dtype where it ran (no host copy); the
    default returns them as float32 on the host: the same values, and greedy acceptance takes the
    same argmax from either."""
    from spruce.verify.accept import accept

    model = build_tiny_model(seed=2).to(torch.bfloat16)
    use_backend(model, "sdpa")
    gen = torch.Generator().manual_seed(4)
    tree = _random_tree(6, gen)
    prefix = torch.randint(0, TINY_VOCAB, (9,), generator=gen)
    rows = []
    for device_logits in (False, True):
        pool = SlotKVCache(model, 1, 32)
        slot = pool.allocate()
        run_packed(model, pool, [Segment(slot, prefix, torch.arange(9), logits="none")])
        rows.append(run_packed(model, pool, [Segment(slot, tree.tokens, tree.depth + 9, tail=tree.ancestor_mask)], device_logits=device_logits)[0])
    host, device = rows
    assert host.dtype == torch.float32 and device.dtype == torch.bfloat16
    assert torch.equal(host, device.float())
    params = SamplingParams()
    one, two = (accept(tree, x, None, params, torch.Generator()) for x in (host, device))
    assert one.accepted_nodes.tolist() == two.accepted_nodes.tolist() and one.bonus_token == two.bonus_token


def test_draft_costs_are_keyed_by_the_requests_that_drafted(tiny_target, tiny_draft, tokenizer):
    """Plans price a batch where every request drafts with the draft curve at that many requests: a
    step where one of three requests drafts is a one-request draft pass, not a three-request one."""
    engine = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=3))
    planner = engine.planner
    before = {b: dict(c.points) for b, c in planner.draft_costs_by_batch.items()}
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    drafting = engine.add_request([1, 2, 3], params, SPECS["tree"])
    plain = [engine.add_request(p, params, None) for p in ([4, 5, 6], [7, 8])]
    for _ in engine._drive([drafting, *plain]):
        pass
    assert drafting.output is not None and drafting.output.stats.drafted > 0
    changed = {b for b, c in planner.draft_costs_by_batch.items() if c.points != before.get(b)}
    assert changed == {1}
