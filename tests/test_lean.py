"""``spruce.lean.LeanDecoder`` against the model's own transformers forward, on the same packed passes:
float32 logits and caches bit for bit, bfloat16 and int8 drafts too; the drafter's trees through either;
the models it declines, and why."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_VOCAB, assert_close, build_tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from spruce.draft.model_drafter import DraftJob, ModelDrafter
from spruce.draft.tree import ROOT_PARENT, TokenTree
from spruce.kernels.cpu_int8 import use_int8_weights, w8a8_available

from spruce import SpeculationConfig
from spruce.attention import use_backend
from spruce.kvcache import Segment, SlotKVCache, run_packed
from spruce.lean import LeanDecoder, lean_unsupported


def _llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    shape = {"vocab_size": TINY_VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    config = LlamaConfig(**{**shape, **overrides})
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def _tree(n: int, gen: torch.Generator) -> TokenTree:
    parents = [ROOT_PARENT] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
    return TokenTree.from_parents(torch.randint(0, TINY_VOCAB, (n,), generator=gen).tolist(), parents)


def _passes(gen: torch.Generator, requests: list[tuple[int, int]]) -> list[list[Segment]]:
    """A prefill of every request in one pass (last rows' logits), then one pass of a tree per request,
    then a pass of one token for each (slots 0..R-1)."""
    prefixes = [torch.randint(0, TINY_VOCAB, (p,), generator=gen) for p, _ in requests]
    trees = [_tree(n, gen) for _, n in requests]
    prefill = [Segment(i, p, torch.arange(len(p)), logits="last") for i, p in enumerate(prefixes)]
    verify = [Segment(i, t.tokens, t.depth + len(p), tail=t.ancestor_mask) for i, (p, t) in enumerate(zip(prefixes, trees))]
    decode = [
        Segment(i, torch.randint(0, TINY_VOCAB, (1,), generator=gen), torch.tensor([len(p) + t.num_nodes]))
        for i, (p, t) in enumerate(zip(prefixes, trees))
    ]
    return [prefill, verify, decode]


def _run_both(model, passes: list[list[Segment]], slots: int) -> tuple[list, list, SlotKVCache, SlotKVCache]:
    use_backend(model, "sdpa")
    lean = LeanDecoder(model)
    pools = SlotKVCache(model, slots, 64), SlotKVCache(model, slots, 64)
    for pool in pools:
        for _ in range(slots):
            pool.allocate()
    want = [run_packed(model, pools[0], segments) for segments in passes]
    got = [run_packed(lean, pools[1], segments) for segments in passes]
    return want, got, pools[0], pools[1]


@settings(max_examples=15, deadline=None)
@given(
    requests=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 8)), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
    arch=st.sampled_from(["qwen2", "llama"]),
)
def test_lean_forward_equals_the_model_bit_for_bit_in_float32(requests, seed, arch):
    """Prefill, trees and one-token passes of ragged requests: every logits row and every cached key
    and value the same as the model's own forward writes, in float32 exactly."""
    model = build_tiny_model(seed=3) if arch == "qwen2" else _llama(seed=3)
    want, got, pool_want, pool_got = _run_both(model, _passes(torch.Generator().manual_seed(seed), requests), len(requests))
    for w_pass, g_pass in zip(want, got):
        for w, g in zip(w_pass, g_pass):
            assert torch.equal(w, g)
    assert pool_want.lengths == pool_got.lengths
    for slot, length in enumerate(pool_want.lengths[: len(requests)]):  # the positions written
        for layer in range(len(pool_want.keys)):
            assert torch.equal(pool_want.keys[layer][slot, :, :length], pool_got.keys[layer][slot, :, :length])
            assert torch.equal(pool_want.values[layer][slot, :, :length], pool_got.values[layer][slot, :, :length])


@pytest.mark.parametrize("kind", ["bfloat16", "int8", "w8a8"])
def test_lean_forward_tracks_the_model_in_low_precision(kind):
    """A bfloat16 model, and drafts whose linear layers were converted (int8 weights; w8a8, whose q/k/v
    and gate/up share products): the lean forward calls the same modules, so it agrees with the model's
    forward to the rounding of bfloat16 (elementwise ops may fuse differently there)."""
    if kind == "w8a8" and not w8a8_available():
        pytest.skip("no fbgemm dynamic linear here")
    model = build_tiny_model(seed=4)
    if kind == "bfloat16":
        model = model.to(torch.bfloat16)
    else:
        use_int8_weights(model, activations=kind == "w8a8")
    passes = _passes(torch.Generator().manual_seed(9), [(12, 5), (3, 1), (7, 8)])
    want, got, *_ = _run_both(model, passes, 3)
    for w_pass, g_pass in zip(want, got):
        for w, g in zip(w_pass, g_pass):
            scale = float(w.float().abs().max())
            tol = 2e-2 * scale if kind == "bfloat16" else 1e-5 * scale
            assert_close(g.float(), w.float(), atol=tol, what=kind)


def test_drafter_builds_the_same_trees_through_either_forward(tiny_draft):
    """The drafter's default CPU path is the lean forward: trees, draft log-probabilities and the state
    after commits as with the model's own forward, over several steps of two requests."""
    lean, model = ModelDrafter(copy.deepcopy(tiny_draft), TINY_VOCAB, num_slots=2), ModelDrafter(copy.deepcopy(tiny_draft), TINY_VOCAB, num_slots=2, lean=False)
    assert lean.lean is not None and model.lean is None
    gen = torch.Generator().manual_seed(2)
    tokens = [torch.randint(0, TINY_VOCAB, (n,), generator=gen).tolist() for n in (17, 6)]
    states = {id(d): [d.new_state(), d.new_state()] for d in (lean, model)}
    spec = SpeculationConfig(depth=3, top_k=2, budget=5)
    for _ in range(3):
        trees = []
        for drafter in (lean, model):
            jobs = [DraftJob(state, toks, spec, 3) for state, toks in zip(states[id(drafter)], tokens)]
            trees.append([p.tree for p in drafter.propose_batch(jobs)])
        for a, b in zip(*trees):
            assert a.tokens.tolist() == b.tokens.tolist() and torch.equal(a.parents, b.parents)
            assert torch.equal(a.draft_logprobs, b.draft_logprobs)
        for i, tree in enumerate(trees[0]):
            accepted = tree.path_to(tree.num_nodes - 1)  # some root path, as if verified
            for drafter in (lean, model):
                drafter.commit(states[id(drafter)][i], accepted)
            tokens[i] = tokens[i] + tree.tokens[accepted[1:]].tolist() + [int(torch.randint(0, TINY_VOCAB, (1,), generator=gen))]


def test_lean_declines_what_it_does_not_compute():
    assert lean_unsupported(build_tiny_model(seed=0)) is None and lean_unsupported(_llama()) is None
    assert "activation" in lean_unsupported(build_tiny_model(seed=0, hidden_act="gelu"))
    scaled = _llama(rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert "RoPE" in lean_unsupported(scaled)
    with pytest.raises(ValueError, match="RoPE"):
        LeanDecoder(scaled)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32)).eval()
    assert "model type 'gpt2'" in lean_unsupported(gpt2)
    assert ModelDrafter(build_tiny_model(seed=0, hidden_act="gelu"), TINY_VOCAB, num_slots=1).lean is None
    with pytest.raises(ValueError, match="packed passes only"):
        LeanDecoder(build_tiny_model(seed=0))(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))


def test_a_hooked_model_runs_its_own_forward():
    """A forward hook on a module the loop skips (the model, a decoder layer) sees every pass: the lean
    forward hands such passes to the model's own forward; without hooks it runs its loop."""
    model = build_tiny_model(seed=6)
    use_backend(model, "sdpa")
    lean = LeanDecoder(model)
    pool = SlotKVCache(model, 1, 32)
    slot = pool.allocate()
    seen: list[str] = []
    for module, name in ((model, "model"), (model.model.layers[1], "layer")):
        handle = module.register_forward_pre_hook(lambda m, args, kwargs, name=name: seen.append(name), with_kwargs=True)
        assert lean.hooked()
        run_packed(lean, pool, [Segment(slot, torch.tensor([5, 6]), torch.arange(pool.lengths[slot], pool.lengths[slot] + 2))])
        handle.remove()
    assert seen == ["model", "layer"]  # each pass through the model's own forward, which ran the layer's
    assert not lean.hooked()
    run_packed(lean, pool, [Segment(slot, torch.tensor([7]), torch.tensor([pool.lengths[slot]]))])
    assert seen == ["model", "layer"]


def test_engine_passes_go_through_the_lean_forward(tiny_target, tiny_draft, tokenizer):
    """On a CPU the engine's target passes (prefill, verification, plain decoding) and the drafter's run
    the lean forward; the outputs, plain and speculative, equal those of an engine on transformers'
    forwards token for token."""
    from test_engine import prompts

    from spruce import Engine, SamplingParams

    lean = Engine(copy.deepcopy(tiny_target), tokenizer, copy.deepcopy(tiny_draft))
    model = Engine(copy.deepcopy(tiny_target), tokenizer, copy.deepcopy(tiny_draft))
    assert isinstance(lean.target_forward, LeanDecoder) and lean.drafter.lean is not None
    model.target_forward = model.target
    assert model.planner.target is model.target
    model.drafter.lean = None
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    batch = prompts(3, 4)
    for spec in (None, SpeculationConfig(depth=3, top_k=2, budget=5)):
        got = [o.token_ids for o in lean.generate(batch, params, speculation=spec)]
        want = [o.token_ids for o in model.generate(batch, params, speculation=spec)]
        assert got == want
