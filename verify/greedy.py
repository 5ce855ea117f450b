"""Greedy (temperature 0) acceptance over a token tree.

Terms:
- accepted: a draft node whose token equals the target's argmax at its parent, and whose parent is
  accepted (the root is accepted by definition; it is the last committed token, not a draft).
- bonus: the target's argmax at the deepest accepted node. It is always emitted, so every verify pass
  yields at least one token, and the output is token-identical to target-only greedy decoding
  (by induction: each emitted token is the target's argmax given exactly the tokens before it).

Pure: tensors in, a ``VerifyResult`` out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spruce.draft.tree import TokenTree


@dataclass(frozen=True, eq=False)
class VerifyResult:
    """What one verify pass decided for one request."""

    # [K+1] int64 node indices of the accepted root path, starting with the root (0)
    accepted_nodes: torch.Tensor
    # [K] int64 the accepted draft tokens (root excluded), in order
    accepted_tokens: torch.Tensor
    # the token drawn from the target at the deepest accepted node
    bonus_token: int

    @property
    def num_accepted(self) -> int:
        """Draft tokens accepted (the bonus token is not counted here)."""
        return self.accepted_tokens.numel()

    def emitted_tokens(self) -> list[int]:
        """Tokens to append to the sequence: accepted draft tokens, then the bonus token."""
        return [*self.accepted_tokens.tolist(), self.bonus_token]


def greedy_accept(
    tree: TokenTree,
    # [N] int64 target argmax at each tree node
    target_argmax: torch.Tensor,
) -> VerifyResult:
    """Walk down from the root, following the child whose token equals the target's argmax."""
    if target_argmax.shape != (tree.num_nodes,):
        raise ValueError(f"target_argmax must have shape ({tree.num_nodes},), got {tuple(target_argmax.shape)}")
    target_argmax = target_argmax.cpu()
    parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
    # child lookup: (parent, token) -> node; sibling tokens are distinct (TokenTree invariant)
    child_of = {(parents[i], tokens[i]): i for i in range(1, tree.num_nodes)}
    path = [0]
    while (nxt := child_of.get((path[-1], int(target_argmax[path[-1]])))) is not None:
        path.append(nxt)
    nodes = torch.tensor(path, dtype=torch.long)
    return VerifyResult(
        accepted_nodes=nodes,
        accepted_tokens=tree.tokens[nodes[1:]],
        bonus_token=int(target_argmax[path[-1]]),
    )
