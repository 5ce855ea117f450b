"""Properties of TokenTree (hypothesis) and its constructors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from spruce.draft.tree import ROOT_PARENT, TokenTree


@st.composite
def trees(draw, max_nodes: int = 40):
    n = draw(st.integers(1, max_nodes))
    parents = [ROOT_PARENT] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    # distinct tokens per node keep sibling tokens distinct
    tokens = draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n, unique=True))
    return TokenTree.from_parents(tokens, parents)


@settings(max_examples=200, deadline=None)
@given(trees())
def test_mask_row_is_parent_row_plus_self(tree: TokenTree):
    tree.validate()
    for i in range(1, tree.num_nodes):
        expected = tree.ancestor_mask[int(tree.parents[i])].clone()
        expected[i] = True
        assert torch.equal(tree.ancestor_mask[i], expected)
    assert torch.equal(tree.depth, tree.ancestor_mask.sum(dim=1) - 1)


@settings(max_examples=200, deadline=None)
@given(trees())
def test_path_to_walks_parents(tree: TokenTree):
    for i in range(tree.num_nodes):
        path = tree.path_to(i)
        assert path[0] == 0 and path[-1] == i and len(path) == int(tree.depth[i]) + 1
        for a, b in zip(path, path[1:]):
            assert int(tree.parents[b]) == a


@settings(max_examples=100, deadline=None)
@given(trees(max_nodes=64))
def test_bitmask_matches_mask(tree: TokenTree):
    bits = tree.ancestor_bitmask()
    for i in range(tree.num_nodes):
        for j in range(tree.num_nodes):
            assert bool((int(bits[i]) >> j) & 1) == bool(tree.ancestor_mask[i, j])


def test_bitmask_limit_is_explicit():
    tree = TokenTree.chain(0, list(range(1, 65)))
    with pytest.raises(ValueError, match="64"):
        tree.ancestor_bitmask()


@settings(max_examples=100, deadline=None)
@given(trees())
def test_index_paths_roundtrip(tree: TokenTree):
    # rank of each node among its siblings, in index order
    ranks, paths = {}, {0: ()}
    for i in range(1, tree.num_nodes):
        p = int(tree.parents[i])
        ranks[p] = ranks.get(p, -1) + 1
        paths[i] = paths[p] + (ranks[p],)
    rebuilt = TokenTree.from_index_paths(
        int(tree.tokens[0]), [paths[i] for i in range(1, tree.num_nodes)], tree.tokens[1:].tolist()
    )
    rebuilt.validate()
    # same multiset of (path tokens) sequences
    def token_paths(t: TokenTree):
        return sorted(tuple(t.tokens[t.path_to(i)].tolist()) for i in range(t.num_nodes))

    assert token_paths(rebuilt) == token_paths(tree)


def test_medusa_style_paths():
    tree = TokenTree.from_index_paths(7, [(0,), (1,), (0, 0), (0, 1), (1, 0)], [10, 11, 12, 13, 14])
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2]
    assert tree.depth.tolist() == [0, 1, 1, 2, 2, 2]
    assert tree.children(1) == [3, 4]


@pytest.mark.parametrize(
    "tokens,parents,match",
    [
        ([1, 2], [0, 0], "root"),
        ([1, 2, 3], [-1, 2, 0], "precede"),
        ([1, 2], [-1], "shape"),
        ([], [], "non-empty"),
    ],
)
def test_bad_trees_raise(tokens, parents, match):
    with pytest.raises(ValueError, match=match):
        TokenTree.from_parents(tokens, parents)


def test_validate_rejects_duplicate_siblings_and_bad_paths():
    with pytest.raises(ValueError, match="repeats token"):
        TokenTree.from_parents([1, 5, 5], [-1, 0, 0]).validate()
    with pytest.raises(ValueError, match="no parent path"):
        TokenTree.from_index_paths(0, [(0, 0)], [3])
