"""Lossless tree sampling: the distribution of generated tokens with speculation equals the target's.

Scripted language models over a 5-token vocabulary give exact target probabilities for every sequence; the
real child selection (``select_sampled``) and acceptance (``tree_rejection_sample``) run over trees of
several shapes. A chi-square goodness-of-fit test compares the empirical distribution of the first
tokens with the exact one. Seeds are fixed, so each test is deterministic; the threshold (p < 1e-4 fails)
is loose enough that a correct sampler passes for essentially any seed and tight enough that a biased
one (e.g. accepting drafts by q alone) fails by orders of magnitude (see test_biased_sampler_is_caught).
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from spruce.draft.model_drafter import select_sampled
from spruce.draft.ngram import merge_paths
from spruce.draft.tree import ROOT_PARENT, TokenTree
from spruce.verify.greedy import VerifyResult
from spruce.verify.tree_sampling import tree_rejection_sample

from spruce.sampling import sampling_probs

V = 5
SAMPLES = 20_000
P_VALUE_FLOOR = 1e-4


class ScriptedLM:
    """p(. | context) from a fixed random table keyed by the context (logits scaled by ``sharpness``)."""

    def __init__(self, seed: int, sharpness: float) -> None:
        self.seed, self.sharpness = seed, sharpness

    @functools.cache
    def logits(self, context: tuple[int, ...]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(hash((self.seed, context)) % (2**31))
        return torch.randn(V, generator=gen, dtype=torch.float64) * self.sharpness

    @functools.cache
    def probs(self, context: tuple[int, ...], temperature: float) -> torch.Tensor:
        return sampling_probs(self.logits(context)[None], temperature)[0]


def fixed_path(context: tuple[int, ...]) -> list[int]:
    """A deterministic 'lookup' continuation, a function of the context only (like an n-gram match)."""
    return [(sum(context) + 1) % V, (3 * sum(context)) % V]


def draft_tree(
    draft: ScriptedLM, context: tuple[int, ...], depth: int, top_k: int, budget: int, temp: float, gen,
    fixed_budget: int = 0,
):
    """Level-by-level tree as the model drafter builds it in sampling mode, plus an optional
    deterministic branch merged as the n-gram drafter does; returns (tree, q rows, paths, fixed flags)."""
    tokens, parents, q_rows = [context[-1]], [ROOT_PARENT], {}
    paths = {0: context}
    frontier, cum = [0], torch.zeros(1, dtype=torch.float64)
    for _ in range(depth):
        room = budget - (len(tokens) - 1)
        if room <= 0:
            break
        q = torch.stack([draft.probs(paths[f], temp) for f in frontier])
        for i, f in enumerate(frontier):
            q_rows[f] = q[i]
        logq = q.double().log()
        picks = select_sampled(logq, top_k, room, gen)
        new, new_cum = [], []
        for f, tok in picks:
            node = len(tokens)
            tokens.append(tok)
            parents.append(frontier[f])
            paths[node] = paths[frontier[f]] + (tok,)
            new.append(node)
            new_cum.append(float(cum[f] + logq[f, tok]))
        order = torch.tensor(new_cum).argsort(descending=True)[:top_k].tolist()
        frontier = [new[i] for i in order]
        cum = torch.tensor(new_cum, dtype=torch.float64)[order]
    tokens, parents, added = merge_paths(tokens, parents, [fixed_path(context)], fixed_budget)
    for node in added:
        paths[node] = paths[parents[node]] + (tokens[node],)
    tree = TokenTree.from_parents(tokens, parents)
    q_all = torch.zeros(tree.num_nodes, V, dtype=torch.float64)
    for node, row in q_rows.items():
        q_all[node] = row
    fixed = torch.zeros(tree.num_nodes, dtype=torch.bool)
    fixed[added] = True
    return tree, q_all, paths, fixed


def generate(target, draft, prompt, n_tokens, shape, temp, gen, accept=tree_rejection_sample) -> tuple[int, ...]:
    context = tuple(prompt)
    while len(context) - len(prompt) < n_tokens:
        depth, top_k, budget, *fixed_budget = shape
        tree, q, paths, fixed = draft_tree(draft, context, depth, top_k, budget, temp, gen, *fixed_budget)
        p = torch.stack([target.probs(paths[i], temp) for i in range(tree.num_nodes)])
        result: VerifyResult = accept(tree, p, q, gen, fixed)
        context = context + tuple(result.emitted_tokens())
    return context[len(prompt) : len(prompt) + n_tokens]


def exact_distribution(target, prompt, n_tokens, temp) -> dict[tuple[int, ...], float]:
    out = {}
    for seq in itertools.product(range(V), repeat=n_tokens):
        prob, ctx = 1.0, tuple(prompt)
        for tok in seq:
            prob *= float(target.probs(ctx, temp)[tok])
            ctx = ctx + (tok,)
        out[seq] = prob
    return out


def chi_square_p_value(counts: dict, expected: dict[tuple[int, ...], float], n: int) -> float:
    # merge outcomes with tiny expected counts into one bin so the chi-square approximation holds
    stat, dof, small_obs, small_exp = 0.0, -1, 0.0, 0.0
    for seq, prob in expected.items():
        e, o = prob * n, counts.get(seq, 0)
        if e < 5:
            small_obs, small_exp = small_obs + o, small_exp + e
            continue
        stat += (o - e) ** 2 / e
        dof += 1
    if small_exp > 0:
        stat += (small_obs - small_exp) ** 2 / max(small_exp, 1e-9)
        dof += 1
    # survival function of chi-square(dof) at stat
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


def empirical(target, draft, shape, temp, n_tokens, seed, accept=tree_rejection_sample):
    gen = torch.Generator().manual_seed(seed)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(SAMPLES):
        seq = generate(target, draft, (1, 2), n_tokens, shape, temp, gen, accept)
        counts[seq] = counts.get(seq, 0) + 1
    return counts


TARGET = ScriptedLM(seed=1, sharpness=1.5)
CLOSE_DRAFT = ScriptedLM(seed=1, sharpness=1.0)  # same ranking, flatter
BAD_DRAFT = ScriptedLM(seed=7, sharpness=3.0)  # unrelated and overconfident

CASES = {
    "chain3": ((3, 1, 3), CLOSE_DRAFT),
    "width2_depth2": ((2, 2, 4), CLOSE_DRAFT),
    "width3_depth3": ((3, 3, 9), CLOSE_DRAFT),
    "bad_draft_tree": ((2, 3, 6), BAD_DRAFT),
    "draft_is_target": ((3, 2, 6), TARGET),
    "width_covers_vocab": ((1, 5, 5), BAD_DRAFT),
    "tree_plus_fixed_branch": ((2, 2, 4, 2), CLOSE_DRAFT),
    "fixed_branch_only": ((1, 1, 0, 2), BAD_DRAFT),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_first_two_tokens_follow_target(case):
    shape, draft = CASES[case]
    counts = empirical(TARGET, draft, shape, temp=1.0, n_tokens=2, seed=sorted(CASES).index(case))
    p_value = chi_square_p_value(counts, exact_distribution(TARGET, (1, 2), 2, 1.0), SAMPLES)
    assert p_value > P_VALUE_FLOOR, f"{case}: chi-square p = {p_value:.2e}"


@pytest.mark.slow
def test_first_three_tokens_follow_target_at_temperature_0_7():
    counts = empirical(TARGET, CLOSE_DRAFT, (3, 2, 6), temp=0.7, n_tokens=3, seed=5)
    p_value = chi_square_p_value(counts, exact_distribution(TARGET, (1, 2), 3, 0.7), SAMPLES)
    assert p_value > P_VALUE_FLOOR, f"chi-square p = {p_value:.2e}"


def _accept_by_draft_only(tree, target_probs, draft_probs, gen, fixed=None):
    """A deliberately wrong sampler: always accepts the first child (emits draft samples)."""
    path = [0]
    while kids := tree.children(path[-1]):
        path.append(kids[0])
    nodes = torch.tensor(path)
    bonus = int(torch.multinomial(target_probs[path[-1]].float(), 1, generator=gen))
    return VerifyResult(nodes, tree.tokens[nodes[1:]], bonus)


def test_biased_sampler_is_caught():
    counts = empirical(TARGET, BAD_DRAFT, (2, 1, 2), temp=1.0, n_tokens=2, seed=3, accept=_accept_by_draft_only)
    p_value = chi_square_p_value(counts, exact_distribution(TARGET, (1, 2), 2, 1.0), SAMPLES)
    assert p_value < 1e-12


def test_draft_equal_target_accepts_more_than_bad_draft():
    gen = torch.Generator().manual_seed(0)
    def mean_accepted(draft):
        total = 0
        for _ in range(500):
            tree, q, paths, _ = draft_tree(draft, (1, 2), 3, 1, 3, 1.0, gen)
            p = torch.stack([TARGET.probs(paths[i], 1.0) for i in range(tree.num_nodes)])
            total += tree_rejection_sample(tree, p, q, gen).num_accepted
        return total / 500
    assert mean_accepted(TARGET) > 2.5 > mean_accepted(BAD_DRAFT)


def test_select_sampled_keeps_draw_order_prefixes_and_counts():
    gen = torch.Generator().manual_seed(0)
    logq = torch.log_softmax(torch.randn(3, 10, generator=gen), dim=-1)
    logq[1, 3:] = float("-inf")  # only 3 tokens possible at frontier node 1
    picks = select_sampled(logq, top_k=4, room=9, generator=gen)
    per = [[t for f, t in picks if f == i] for i in range(3)]
    assert [len(x) for x in per] == [4, 3, 2]  # node 1 limited by its support, node 2 by the room
    assert all(len(set(x)) == len(x) for x in per)
    assert set(per[1]) <= {0, 1, 2}


def test_confident_draft_with_tiny_tail_does_not_crash():
    """q puts ~all mass on one token: after rejecting it, the rest (1e-14) is still a distribution."""
    tree = TokenTree.from_parents([0, 1, 2], [-1, 0, 0])
    q = torch.tensor([[0.0, 1 - 1e-14, 1e-14, 0.0, 0.0]] * 3, dtype=torch.float64)
    p = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 3, dtype=torch.float64)
    for seed in range(40):
        result = tree_rejection_sample(tree, p, q, torch.Generator().manual_seed(seed))
        assert result.emitted_tokens()[0] in (1, 3)
