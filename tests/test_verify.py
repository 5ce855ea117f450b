"""Tree verification against its reference twin (one sequential pass per root-to-node path), greedy
acceptance on scripted logits, and the cache commit against a fresh forward."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_VOCAB, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from spruce.draft.tree import ROOT_PARENT, TokenTree
from spruce.verify.greedy import greedy_accept
from spruce.verify.tree_verify import commit_accepted, verify_tree

from spruce.modeling import forward_tokens, new_cache

# float64 models: the tree pass and the sequential passes differ only by summation order
F64_ATOL = 1e-9
F32_ATOL = 2e-4


@pytest.fixture(scope="module")
def model64(tiny_target):
    return copy.deepcopy(tiny_target).double()


def random_tree(gen: torch.Generator, n: int) -> TokenTree:
    parents = [ROOT_PARENT] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
    tokens = torch.randperm(TINY_VOCAB, generator=gen)[:n]
    return TokenTree.from_parents(tokens, parents)


def prefilled(model, prefix: torch.Tensor):
    cache = new_cache(model)
    if prefix.numel():
        forward_tokens(model, cache, prefix, torch.arange(prefix.numel()), None)
    return cache


@pytest.mark.parametrize("prefix_len", [0, 1, 9])
@pytest.mark.parametrize("num_nodes", [1, 2, 7, 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_tree_logits_equal_sequential_paths(model64, prefix_len, num_nodes, seed):
    gen = torch.Generator().manual_seed(seed * 100 + num_nodes)
    prefix = torch.randint(0, TINY_VOCAB, (prefix_len,), generator=gen)
    tree = random_tree(gen, num_nodes)
    logits = verify_tree(model64, prefilled(model64, prefix), tree, prefix_len)
    for node in range(tree.num_nodes):
        path = tree.tokens[tree.path_to(node)]
        seq = torch.cat([prefix, path])
        fresh = new_cache(model64)
        expected = forward_tokens(model64, fresh, seq, torch.arange(seq.numel()), None)[-1]
        assert_close(logits[node].double(), expected.double(), atol=F64_ATOL, what=f"node {node}")


def test_tree_logits_float32(tiny_target):
    gen = torch.Generator().manual_seed(5)
    prefix = torch.randint(0, TINY_VOCAB, (12,), generator=gen)
    tree = random_tree(gen, 16)
    logits = verify_tree(tiny_target, prefilled(tiny_target, prefix), tree, 12)
    for node in range(tree.num_nodes):
        seq = torch.cat([prefix, tree.tokens[tree.path_to(node)]])
        expected = forward_tokens(tiny_target, new_cache(tiny_target), seq, torch.arange(seq.numel()), None)[-1]
        assert_close(logits[node], expected, atol=F32_ATOL, what=f"node {node}")


def test_greedy_accept_scripted():
    #        0 (root)
    #      /   \
    #   1:a=5  2:b=6
    #    |       |
    #   3:7     4:8
    tree = TokenTree.from_parents([1, 5, 6, 7, 8], [-1, 0, 0, 1, 2])
    # target argmax per node: root -> 6 (takes node 2), node 2 -> 8 (takes node 4), node 4 -> 42 (bonus)
    argmax = torch.tensor([6, 0, 8, 0, 42])
    result = greedy_accept(tree, argmax)
    assert result.accepted_nodes.tolist() == [0, 2, 4]
    assert result.emitted_tokens() == [6, 8, 42]
    # nothing matches: only the bonus token
    result = greedy_accept(tree, torch.tensor([9, 0, 0, 0, 0]))
    assert result.accepted_nodes.tolist() == [0] and result.emitted_tokens() == [9]


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_greedy_accept_properties(data):
    n = data.draw(st.integers(1, 30))
    parents = [ROOT_PARENT] + [data.draw(st.integers(0, i - 1)) for i in range(1, n)]
    tokens = data.draw(st.lists(st.integers(0, 20), min_size=n, max_size=n))
    # make sibling tokens distinct
    seen: set[tuple[int, int]] = set()
    for i in range(1, n):
        while (parents[i], tokens[i]) in seen:
            tokens[i] += 21
        seen.add((parents[i], tokens[i]))
    tree = TokenTree.from_parents(tokens, parents)
    argmax = torch.tensor(data.draw(st.lists(st.integers(0, 60), min_size=n, max_size=n)))
    result = greedy_accept(tree, argmax)
    path = result.accepted_nodes.tolist()
    # accepted nodes form a root path, each one the target's choice at its parent
    assert path[0] == 0
    for a, b in zip(path, path[1:]):
        assert int(tree.parents[b]) == a and int(tree.tokens[b]) == int(argmax[a])
    # and the walk stopped because no child of the last node matches
    last = path[-1]
    assert all(int(tree.tokens[c]) != int(argmax[last]) for c in tree.children(last))
    assert result.bonus_token == int(argmax[last])


def test_draft_equal_target_accepts_everything(tiny_target):
    """A chain drafted by the target itself (greedy) is accepted in full."""
    gen = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, TINY_VOCAB, (6,), generator=gen)
    root = int(prefix[-1])
    seq = prefix.clone()
    chain = []
    for _ in range(5):
        nxt = int(forward_tokens(tiny_target, new_cache(tiny_target), seq, torch.arange(seq.numel()), None)[-1].argmax())
        chain.append(nxt)
        seq = torch.cat([seq, torch.tensor([nxt])])
    tree = TokenTree.chain(root, chain[:4])
    logits = verify_tree(tiny_target, prefilled(tiny_target, prefix[:-1]), tree, 5)
    result = greedy_accept(tree, logits.argmax(-1))
    assert result.num_accepted == 4
    assert result.emitted_tokens() == chain


@pytest.mark.parametrize("seed", range(4))
def test_cache_after_commit_equals_fresh_forward(model64, seed):
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, TINY_VOCAB, (7,), generator=gen)
    tree = random_tree(gen, 12)
    cache = prefilled(model64, prefix)
    verify_tree(model64, cache, tree, 7)
    # commit an arbitrary root path
    leaf = int(torch.randint(0, tree.num_nodes, (1,), generator=gen))
    path = torch.tensor(tree.path_to(leaf))
    commit_accepted(cache, 7, path)
    seq = torch.cat([prefix, tree.tokens[path]])
    fresh = prefilled(model64, seq)
    assert cache.get_seq_length() == seq.numel()
    for got, want in zip(cache.layers, fresh.layers):
        assert_close(got.keys, want.keys, atol=F64_ATOL, what="keys")
        assert_close(got.values, want.values, atol=F64_ATOL, what="values")
