"""Prompt-lookup drafting: suffix matching, trie merging, and lossless use through the engine."""

from __future__ import annotations

import pytest
import torch
from spruce.draft.ngram import merge_ngram_paths, merge_paths, ngram_continuations
from spruce.draft.tree import Proposal, TokenTree

from spruce import Engine, SamplingParams, SpeculationConfig


def test_longest_suffix_wins_and_recent_first():
    #        0  1  2  3  4  5  6  7  8  9 10
    tokens = [5, 1, 2, 9, 7, 1, 2, 8, 3, 1, 2]
    # suffix (1, 2) occurs at 1 and 5: most recent first -> 8 3 ..., then 9 7 ...
    assert ngram_continuations(tokens, 3, 1, 2, 2) == [[8, 3], [9, 7]]
    # a longer suffix (3, 1, 2) does not occur earlier, (2,) alone would, but (1, 2) is longer
    assert ngram_continuations(tokens, 3, 2, 3, 1) == [[8, 3, 1]]
    assert ngram_continuations([1, 2, 3], 3, 1, 2, 2) == []
    assert ngram_continuations([4], 3, 1, 2, 2) == []


def test_continuation_stops_at_sequence_end_and_dedups():
    tokens = [1, 2, 1, 2, 1, 2]
    assert ngram_continuations(tokens, 2, 2, 4, 3) == [[1, 2], [1, 2, 1, 2]]


def test_merge_paths_reuses_prefixes_and_respects_budget():
    tokens, parents, added = merge_paths([0, 4, 5], [-1, 0, 1], [[4, 5, 6], [4, 7], [9, 9, 9]], budget=3)
    assert tokens == [0, 4, 5, 6, 7, 9] and parents == [-1, 0, 1, 2, 1, 0]
    assert added == [3, 4, 5]
    TokenTree.from_parents(tokens, parents).validate()


def test_merged_ngram_branches_are_deterministic_nodes():
    model_tree = TokenTree.chain(2, [1, 2])
    probs = torch.rand(3, 10)
    paths = ngram_continuations([1, 2, 3, 4, 1, 2], 2, 1, 3, 1)
    merged = merge_ngram_paths(Proposal(model_tree, probs), paths, budget=3)
    # suffix (1, 2) -> continuation 3 4 1, a new branch under the root
    assert merged.tree.tokens.tolist() == [2, 1, 2, 3, 4, 1]
    assert merged.deterministic.tolist() == [False, False, False, True, True, True]
    assert merged.draft_probs.shape == (6, 10) and torch.equal(merged.draft_probs[:3], probs)


REPEATING = [7, 8, 9, 10, 11, 12, 7, 8, 9, 10, 11, 12, 7, 8]


@pytest.mark.parametrize("drafter", ["ngram", "both"])
def test_ngram_greedy_is_lossless(tiny_target, tiny_draft, tokenizer, drafter):
    engine = Engine(tiny_target, tokenizer, tiny_draft if drafter == "both" else None)
    spec = SpeculationConfig(drafter=drafter, depth=2, top_k=1, budget=2, ngram_min=1, ngram_budget=4)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    drafted = 0
    for prompt in (REPEATING, [3, 4, 3, 4, 3, 4, 3], [100, 50, 100, 51, 100]):
        base = engine.generate([prompt], params, speculation=None)[0]
        fast = engine.generate([prompt], params, speculation=spec)[0]
        assert fast.token_ids == base.token_ids
        drafted += fast.stats.drafted
    assert drafted > 0


def test_ngram_alone_needs_no_draft_model(tiny_target, tokenizer):
    engine = Engine(tiny_target, tokenizer, None)
    out = engine.generate([REPEATING], SamplingParams(max_tokens=8, ignore_eos=True), SpeculationConfig(drafter="ngram"))[0]
    assert len(out.token_ids) == 8
    with pytest.raises(Exception, match="draft model"):
        engine.generate([REPEATING], SamplingParams(max_tokens=8), SpeculationConfig(drafter="model"))


def test_ngram_sampling_is_seeded(tiny_target, tiny_draft, tokenizer):
    engine = Engine(tiny_target, tokenizer, tiny_draft)
    spec = SpeculationConfig(drafter="both", depth=2, top_k=2, budget=3, ngram_min=1)
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=9, ignore_eos=True)
    a = engine.generate([REPEATING], params, spec)[0]
    b = engine.generate([REPEATING], params, spec)[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 20


def test_engine_from_pretrained_with_ngram_drafter(tiny_dirs):
    target_dir, draft_dir = tiny_dirs
    engine = Engine.from_pretrained(target=target_dir, draft=draft_dir, drafter="ngram")
    assert engine.drafter is None
    assert engine.default_speculation is not None and engine.default_speculation.drafter == "ngram"
    out = engine.generate("abcabcabcab", SamplingParams(max_tokens=6, ignore_eos=True))[0]
    assert len(out.token_ids) == 6


def test_default_drafter_is_both_with_a_draft_model_and_plain_without(tiny_target, tiny_draft, tokenizer, tiny_dirs):
    """No drafter given: n-gram tokens beside the draft model's where one is loaded; a target alone
    decodes plainly (it never starts prompt lookup unasked); an explicit choice stands."""
    from spruce.config import EngineConfig

    paired = Engine(tiny_target, tokenizer, tiny_draft)
    assert paired.config.drafter == "both"
    spec = paired.default_speculation
    assert spec is not None and spec.drafter == "both" and spec.adaptive and spec.ngram_budget > 0
    alone = Engine(tiny_target, tokenizer)
    assert alone.config.drafter == "model" and alone.default_speculation is None
    from spruce.server._gen.spruce.v1 import spruce_pb2 as pb
    from spruce.server.convert import model_info

    assert model_info(paired, "spruce", 64).default_drafter == pb.DRAFTER_BOTH  # what clients are told
    assert model_info(alone, "spruce", 64).default_drafter == pb.DRAFTER_MODEL
    chosen = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(drafter="model"))
    assert chosen.default_speculation is not None and chosen.default_speculation.drafter == "model"
    target_dir, draft_dir = tiny_dirs
    assert Engine.from_pretrained(target=target_dir, draft=draft_dir).config.drafter == "both"
    assert Engine.from_pretrained(target=target_dir).default_speculation is None
    prompt = [3, 4, 5, 3, 4, 5, 3, 4]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    assert paired.generate(prompt, params)[0].token_ids == alone.generate(prompt, params)[0].token_ids
