"""Tree attention through the model: every backend gives the logits of transformers' own path with an
explicit 4D mask, prefill and decoding keep working, a tree pass without metadata raises, and the flash
split (prefix + tree merged by log-sum-exp) is exact."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, build_tiny_model
from spruce.draft.tree import TokenTree
from spruce.kernels import backend as kernel_backends
from spruce.kernels.flash_backend import merge, split_tree_attention
from spruce.kernels.reference import masked_attention, tree_attention_reference
from spruce.verify.tree_verify import verify_tree
from test_tree_attention import TOLERANCE, make_batch

from spruce.attention import tree_metadata
from spruce.config import EngineConfig
from spruce.engine import Engine
from spruce.errors import InvalidRequestError
from spruce.modeling import forward_tokens, new_cache

PORTABLE = ["triton", "flex", "sdpa"]


def _switched(model, name: str):
    from spruce.attention import use_backend

    other = copy.deepcopy(model)
    use_backend(other, name)
    return other


def _random_tree(n: int, seed: int) -> TokenTree:
    gen = torch.Generator().manual_seed(seed)
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
    tokens = torch.randint(0, 250, (n,), generator=gen).tolist()
    return TokenTree.from_parents(tokens, parents)


@pytest.fixture(scope="module")
def gqa_target():
    return build_tiny_model(seed=3, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("backend", PORTABLE)
def test_verify_logits_match_the_4d_mask_path(gqa_target, backend):
    model = _switched(gqa_target, backend)
    prefix = torch.arange(11) + 3
    tree = _random_tree(9, seed=4)
    want_cache, got_cache = new_cache(gqa_target), new_cache(model)
    forward_tokens(gqa_target, want_cache, prefix, torch.arange(11), None)
    forward_tokens(model, got_cache, prefix, torch.arange(11), None)  # prefill through the switched model
    want = verify_tree(gqa_target, want_cache, tree, 11)
    # the kernel path (for "sdpa" too: the packed sdpa_tree_attention rather than transformers' 4D mask)
    meta = tree_metadata(tree.ancestor_mask, 11, backend, torch.device("cpu"))
    got = forward_tokens(model, got_cache, tree.tokens, tree.depth + 11, None, attention_kwargs={"spruce_tree": meta})
    assert_close(got, want, atol=1e-4, what=f"{backend} tree logits")


def test_tree_query_without_metadata_raises(gqa_target):
    model = _switched(gqa_target, "triton")
    cache = new_cache(model)
    forward_tokens(model, cache, torch.arange(5), torch.arange(5), None)
    with pytest.raises(RuntimeError, match="no tree metadata"):
        forward_tokens(model, cache, torch.arange(3), torch.tensor([5, 6, 6]), None)


@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_engine_with_backend_generates_the_same_tokens(tiny_target, tiny_draft, tokenizer, backend):
    from spruce import SamplingParams, SpeculationConfig

    spec = SpeculationConfig(depth=3, top_k=2, budget=5)
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    # a ragged batch: the kernel gets every request's prefix and tree in one packed call
    prompts = [[4, 5, 6, 7], [9] * 11, [30, 31]]
    want = Engine(tiny_target, tokenizer, tiny_draft).generate(prompts, params, spec)
    engine = Engine(copy.deepcopy(tiny_target), tokenizer, tiny_draft, EngineConfig(attention_backend=backend))
    assert engine.attention_backend == backend
    got = engine.generate(prompts, params, spec)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert all(g.stats.drafted > 0 for g in got)


def test_backend_resolution():
    assert kernel_backends.resolve("auto", "cpu") == "sdpa"
    assert kernel_backends.resolve("flex", "cpu") == "flex"
    with pytest.raises(ValueError, match="flash"):
        kernel_backends.resolve("flash", "cpu")
    with pytest.raises(ValueError, match="one of"):
        kernel_backends.resolve("fast", "cpu")
    with pytest.raises(InvalidRequestError, match="flash"):
        Engine(build_tiny_model(seed=0), None, None, EngineConfig(attention_backend="flash"))


@pytest.mark.parametrize("case", [([0, 30], [4, 12]), ([17], [64])], ids=["ragged_with_empty_prefix", "t64"])
def test_flash_split_and_merge_is_exact(case):
    """The flash backend's split, with reference halves (flash-attn itself needs a GPU)."""
    from spruce.kernels.tree_attention import tree_attention

    prefixes, trees = case
    q, k, v, mask, cu_q, cu_k, _ = make_batch(prefixes, trees, 4, 2, 16, torch.float32)

    def prefix_reference(q, k, v, cu_q, cu_k, scale):
        """Every prefix key visible, per request (an empty prefix: output 0, lse -inf)."""
        outs, lses = [], []
        for b in range(cu_q.numel() - 1):
            qb = q[cu_q[b] : cu_q[b + 1]].double().transpose(0, 1)
            kb = k[cu_k[b] : cu_k[b + 1]].double().transpose(0, 1)
            vb = v[cu_k[b] : cu_k[b + 1]].double().transpose(0, 1)
            o, l = masked_attention(qb, kb, vb, torch.ones(qb.shape[1], kb.shape[1], dtype=torch.bool), scale)
            outs.append(o.transpose(0, 1))
            lses.append(l.transpose(0, 1))
        return torch.cat(outs), torch.cat(lses)

    out, lse = split_tree_attention(q, k, v, mask, cu_q, cu_k, None, prefix_reference, tree_attention)
    out = out.float()
    want, want_lse = tree_attention_reference(q.double(), k.double(), v.double(), mask, cu_q, cu_k)
    assert_close(out.double(), want, atol=TOLERANCE[torch.float32], what="merged output")
    assert_close(lse.double(), want_lse, atol=TOLERANCE[torch.float32], what="merged lse")


def test_merge_of_an_empty_half_is_the_other_half():
    gen = torch.Generator().manual_seed(0)
    o, l = torch.randn(3, 2, 8, generator=gen), torch.randn(3, 2, generator=gen)
    out, lse = merge(torch.zeros_like(o), torch.full_like(l, float("-inf")), o, l)
    assert_close(out, o, atol=1e-6, what="output")
    assert_close(lse, l, atol=1e-6, what="lse")
