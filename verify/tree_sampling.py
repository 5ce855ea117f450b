"""Lossless speculative SAMPLING over a token tree: multi-draft rejection sampling without replacement.

Terms. p_u: the target's sampling distribution at node u (temperature, top-k, top-p applied); q_u: the
draft distribution that u's children were drawn from. accepted: a child that passed its rejection test,
so its token is emitted and the walk moves to it. recovered: the token drawn from the final residual
when every child of the current node was rejected. bonus: the token drawn from p at an accepted leaf
(a node without children). Each verify pass emits the accepted tokens plus exactly one recovered-or-bonus
token; ``VerifyResult.bonus_token`` holds that last token either way.

Algorithm (SpecTr / Sequoia / SpecExec style). At the current node u, with children c_1..c_m drawn from
q_u sequentially without replacement (in tree index order), start with r = p_u, s = q_u, and for i = 1..m:
  accept x_i = token(c_i) with probability min(1, r(x_i) / s(x_i)); if accepted, move to c_i;
  else r <- norm(max(r - s, 0)) and s <- s with x_i removed, renormalized.
If all are rejected, draw the recovered token from r.

Proof sketch. Claim: given the history, the token emitted at u is distributed as r. One test: x ~ s is
accepted with prob min(1, r(x)/s(x)), so P(emit y via x) = min(s(y), r(y)); rejection has prob
1 - sum_y min(s(y), r(y)) = sum_y (r(y) - min(s(y), r(y))), and the remaining process emits from
norm(max(r - s, 0)) by induction, so P(emit y) = min(s, r)(y) + (r - min(s, r))(y) = r(y). The induction
holds because, given x_i was rejected, the next draft is distributed as s with x_i removed (sampling
without replacement), independent of the test's uniform, and a rejected x_i has r(x_i) <= s(x_i), so the
residual gives it no mass. With m = 0 the token is drawn from r = p_u directly. Applied at each accepted
node in turn (the children of an accepted node are fresh draws from q given its path), every emitted
token is distributed as p given all tokens before it: the output distribution is exactly the target's,
for ANY draft distribution q, as long as (a) each node's children are a draw-order prefix of sequential
draws from q_u, and (b) how many children a node gets does not depend on those children's draws.
``spruce.draft.model_drafter`` builds sampling trees that way.

Deterministic children (n-gram lookup) are the special case of a point-mass proposal at x: the test
accepts with probability min(1, r(x)/1) = r(x) and the residual max(r - delta_x, 0) is r with x removed,
so the same argument holds; they are tested after the sampled siblings (their presence may depend on
those draws, which are already history by then).

Pure: tensors and a ``torch.Generator`` in, a ``VerifyResult`` out.
"""

from __future__ import annotations

import torch

from spruce.draft.tree import TokenTree
from spruce.verify.greedy import VerifyResult

# Residual masses below this are treated as empty (float round-off after subtracting two distributions).
_EMPTY_MASS = 1e-12


def _normalize(dist: torch.Tensor) -> torch.Tensor | None:
    total = dist.sum()
    return dist / total if total > _EMPTY_MASS else None


def _draw(dist: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(dist, 1, generator=generator))


def tree_rejection_sample(
    tree: TokenTree,
    # [N, V] float target sampling distribution at each node
    target_probs: torch.Tensor,
    # [N, V] float draft distribution each node's sampled children were drawn from (other rows unused)
    draft_probs: torch.Tensor,
    generator: torch.Generator,
    # [N] bool: node proposed deterministically (point-mass proposal); None = none is
    deterministic: torch.Tensor | None = None,
) -> VerifyResult:
    """Walk the tree from the root, testing children in index order (see the module docstring).

    A deterministic child x is tested with the point mass at x as its proposal: accepted with
    probability r(x), else r <- r with x removed. Sampled children must precede deterministic siblings.
    """
    n = tree.num_nodes
    if target_probs.shape[0] != n or draft_probs.shape != target_probs.shape:
        raise ValueError(f"probs must be [N={n}, V], got {tuple(target_probs.shape)} and {tuple(draft_probs.shape)}")
    target_probs, draft_probs = target_probs.double().cpu(), draft_probs.double().cpu()
    fixed = [False] * n if deterministic is None else deterministic.tolist()
    tokens = tree.tokens.tolist()
    path = [0]
    while True:
        node = path[-1]
        residual = target_probs[node].clone()
        proposal: torch.Tensor | None = draft_probs[node].clone()
        accepted, seen_fixed = None, False
        for child in tree.children(node):
            x = tokens[child]
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            if fixed[child]:
                seen_fixed = True
                if u < float(residual[x]):
                    accepted = child
                    break
                residual[x] = 0.0
                renormed = _normalize(residual)
                if renormed is None:
                    raise ValueError(f"residual at node {node} vanished: target mass is all on rejected tokens")
                residual = renormed
                continue
            if seen_fixed:
                raise ValueError(f"node {node}: sampled child {child} follows a deterministic sibling")
            if proposal is None:
                raise ValueError(f"node {node} has more children than its draft distribution has tokens")
            if proposal[x] > 0 and u * float(proposal[x]) < float(residual[x]):
                accepted = child
                break
            renormed = _normalize(torch.clamp(residual - proposal, min=0.0))
            # None: r == s up to round-off, so x would have been accepted surely; numerical corner only
            residual = renormed if renormed is not None else target_probs[node].clone()
            proposal[x] = 0.0
            # any positive mass left is a valid distribution: the drafter drew from exactly these weights
            total = proposal.sum()
            proposal = proposal / total if total > 0 else None
        if accepted is None:
            last = _draw(residual, generator)
            break
        path.append(accepted)
    nodes = torch.tensor(path, dtype=torch.long)
    return VerifyResult(accepted_nodes=nodes, accepted_tokens=tree.tokens[nodes[1:]], bonus_token=last)
