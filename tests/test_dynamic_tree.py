"""The dynamic (EAGLE-2) draft tree against a slow twin that runs every root path with a fresh full forward."""

from __future__ import annotations

import pytest
import torch
from spruce.draft.model_drafter import DraftSampling, ModelDrafter, _TreeBuilder
from test_engine import prompts

from spruce import SpeculationConfig
from spruce.modeling import forward_tokens, new_cache


def _logq(model, seq: list[int]) -> torch.Tensor:
    logits = forward_tokens(model, new_cache(model), torch.tensor(seq), torch.arange(len(seq)), None)[-1]
    return torch.log_softmax(logits.float(), dim=-1)


def reference_dynamic_tree(model, tokens: list[int], depth: int, top_k: int, budget: int) -> set[tuple[int, ...]]:
    """EAGLE-2 spelled out: expand the best ``top_k`` candidates of each level into their ``top_k`` most
    likely children, then keep the ``budget`` candidates with the highest cumulative log-probability.
    Returns the kept nodes as token paths from the root."""
    frontier: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
    pool: list[tuple[tuple[int, ...], float]] = []
    for _ in range(min(depth, budget)):
        level = []
        for path, cum in frontier:
            logq = _logq(model, tokens + list(path))
            top = logq.topk(top_k)
            level += [(path + (int(t),), cum + float(v)) for v, t in zip(top.values, top.indices)]
        pool += level
        frontier = sorted(level, key=lambda c: -c[1])[:top_k]
    kept = sorted(pool, key=lambda c: (-c[1], len(c[0])))[:budget]
    return {path for path, _ in kept}


def _token_paths(tree) -> set[tuple[int, ...]]:
    toks = tree.tokens.tolist()
    return {tuple(toks[i] for i in tree.path_to(n)[1:]) for n in range(1, tree.num_nodes)}


@pytest.mark.parametrize("shape", [(3, 2, 4), (4, 3, 9), (2, 4, 8), (5, 1, 3)], ids=lambda s: f"d{s[0]}k{s[1]}b{s[2]}")
@pytest.mark.parametrize("seed", [0, 1])
def test_dynamic_tree_equals_reference(tiny_draft, shape, seed):
    depth, top_k, budget = shape
    tokens = prompts(1, seed)[0] + [7]
    drafter = ModelDrafter(tiny_draft)
    proposal = drafter.propose(drafter.new_state(), tokens, SpeculationConfig(depth=depth, top_k=top_k, budget=budget), depth)
    tree = proposal.tree
    tree.validate()
    assert tree.num_draft_nodes == budget
    assert _token_paths(tree) == reference_dynamic_tree(tiny_draft, tokens, depth, top_k, budget)
    # each node's recorded log q is the draft's own on its root path
    for node in range(1, tree.num_nodes):
        path = tree.path_to(node)
        want = _logq(tiny_draft, tokens + tree.tokens[path[1:-1]].tolist())[int(tree.tokens[node])]
        assert abs(float(tree.draft_logprobs[node]) - float(want)) < 1e-4


def test_dynamic_topk_sampling_tree_is_deterministic_proposals(tiny_draft):
    """With ``sampled_children=False`` a sampling request gets the dynamic tree of the PROCESSED draft
    distribution, every node marked deterministic (verified as a point mass)."""
    tokens = prompts(1, 3)[0] + [7]
    drafter = ModelDrafter(tiny_draft)
    spec = SpeculationConfig(depth=3, top_k=2, budget=5, sampled_children=False)
    sampling = DraftSampling(temperature=0.7, top_k=3, top_p=1.0, generator=torch.Generator().manual_seed(0))
    proposal = drafter.propose(drafter.new_state(), tokens, spec, 3, sampling)
    assert proposal.draft_probs is None
    assert proposal.deterministic is not None and bool(proposal.deterministic.all())
    proposal.tree.validate()
    # top_k=3 filtering: every proposed token is among the draft's 3 most likely at its parent
    for node in range(1, proposal.tree.num_nodes):
        path = proposal.tree.path_to(node)
        logq = _logq(tiny_draft, tokens + proposal.tree.tokens[path[1:-1]].tolist())
        assert int(proposal.tree.tokens[node]) in logq.topk(3).indices.tolist()


def test_confidence_threshold_stops_expansion(tiny_draft):
    tokens = prompts(1, 4)[0] + [7]
    drafter = ModelDrafter(tiny_draft)
    state = drafter.new_state()
    spec = SpeculationConfig(depth=4, top_k=2, budget=6, min_expand_prob=1.0)
    tree = drafter.propose(state, tokens, spec, 4).tree
    assert tree.max_depth == 1 and state.levels == 1  # no path is certain: only the root was expanded
    full_state = drafter.new_state()
    full = drafter.propose(full_state, tokens, SpeculationConfig(depth=4, top_k=2, budget=6), 4).tree
    assert full.max_depth > 1 and full_state.levels > 1


@pytest.mark.parametrize("vocab", [None, 250], ids=["same_vocab", "wider_draft"])
def test_top_children_on_the_device_equal_whole_rows_on_the_host(tiny_draft, vocab):
    """Top-k children chosen from [F, k] rows computed where the draft ran (one small copy per pass)
    build the same trees as the reference that copies every frontier's whole [F, V] logits to the host:
    a batch mixing greedy dynamic and static trees, a processed top-k tree and a drawn one, over three
    steps with commits (the drafts' caches stay in step too)."""
    import copy

    model = copy.deepcopy(tiny_draft).to("cuda" if torch.cuda.is_available() else "cpu")
    trees = assert_same_trees(ModelDrafter(model, vocab, num_slots=4), ModelDrafter(model, vocab, num_slots=4, host_rows=True))
    if vocab is not None:
        assert all(int(t) < vocab for p in trees for t in p.tree.tokens[1:])


# a batch of every kind of tree: greedy dynamic, static, processed top-k (sampling), drawn children
MIXED_SPECS = [
    SpeculationConfig(depth=3, top_k=2, budget=5),
    SpeculationConfig(tree_paths=((0,), (1,), (0, 0), (0, 1), (0, 0, 0))),
    SpeculationConfig(depth=3, top_k=3, budget=6, sampled_children=False),
    SpeculationConfig(depth=3, top_k=2, budget=5),
]
MIXED_SAMPLINGS = [None, None, (0.8, 5, 0.9), (0.7, 0, 1.0)]


def assert_same_trees(fast: ModelDrafter, reference: ModelDrafter, specs=None, steps: int = 3) -> list:
    """Both drafters build the same trees (tokens, parents, draft log-probabilities, drawn children's
    distributions) for ``specs`` (default: ``MIXED_SPECS`` with ``MIXED_SAMPLINGS``) in one batch over
    ``steps`` steps, each committing the first child of every tree and one more token; returns the last
    step's proposals."""
    from spruce.draft.model_drafter import DraftJob

    specs = specs or MIXED_SPECS
    samplings = MIXED_SAMPLINGS[: len(specs)] + [None] * (len(specs) - len(MIXED_SAMPLINGS))
    runs = []
    for drafter in (fast, reference):
        states = [drafter.new_state() for _ in specs]
        gens = [torch.Generator().manual_seed(5 + i) for i in range(len(specs))]
        runs.append((drafter, states, gens))
    tokens = [prompts(1, 20 + i)[0] + [7] for i in range(len(specs))]
    for step in range(steps):
        trees = []
        for drafter, states, gens in runs:
            jobs = [
                DraftJob(st, list(toks), spec, 3, None if s is None else DraftSampling(*s, generator=gen))
                for st, toks, spec, s, gen in zip(states, tokens, specs, samplings, gens)
            ]
            trees.append(drafter.propose_batch(jobs))
        for got, want in zip(*trees):
            assert got.tree.tokens.tolist() == want.tree.tokens.tolist(), f"step {step}"
            assert got.tree.parents.tolist() == want.tree.parents.tolist()
            assert torch.allclose(got.tree.draft_logprobs, want.tree.draft_logprobs, atol=1e-5)
            assert (got.draft_probs is None) == (want.draft_probs is None)
            if got.draft_probs is not None:
                assert torch.allclose(got.draft_probs, want.draft_probs, atol=1e-6)
        assert any(p.tree.num_nodes > 1 for p in trees[0])
        # accept each tree's first child (where there is one), as verification would, then one more token
        for i, proposal in enumerate(trees[0]):
            path = [0, 1] if proposal.tree.num_nodes > 1 else [0]
            for drafter, states, _ in runs:
                drafter.commit(states[i], path)
            tokens[i] += [int(proposal.tree.tokens[n]) for n in path[1:]] + [11 + step]
    return trees[0]


def test_rerank_keeps_the_parent_of_a_certain_child():
    """A child the draft is certain of (log q = 0: a sharp distribution at temperature 0.7 rounds to
    probability 1) scores exactly its parent's cumulative log-probability, never above it, so a budget
    that keeps the child keeps the parent (the frontier's scores once went through float32, which moved
    -0.7 up to -0.69999999, and the rerank dropped the parent: "rerank dropped an ancestor")."""
    tree = _TreeBuilder(root_token=0)
    parent = tree.add([(0, 5, -0.7), (0, 6, -2.0)])[0]
    tree.advance([parent, parent + 1], top_k=1, static=None)
    (child,) = tree.add([(0, 7, 0.0)])
    assert tree.cums[child] == tree.cums[parent]
    kept = tree.rerank(budget=1)
    assert kept == {0: 0, parent: 1} and tree.tokens == [0, 5]
