"""The token tree that a drafter proposes and the target verifies in one pass.

Shape glossary (used in comments on every tensor): N tree nodes (root included), V vocab.

Invariants (checked by ``TokenTree.validate``):
- node 0 is the root: the last committed token, whose KV is not yet in the target's cache; ``parents[0] == -1``;
- every other node's parent index is smaller than its own index (topological order);
- ``depth[i] = depth[parents[i]] + 1``, ``depth[0] = 0``;
- ``ancestor_mask[i, j]`` is True iff j is i or an ancestor of i, so row i = row of parent(i) + {i}
  and ``depth[i] == ancestor_mask[i].sum() - 1``;
- siblings carry distinct tokens (a duplicate would be verified twice for nothing).

Trees are data: ``from_parents`` builds one from a parent array, ``from_index_paths`` from Medusa-style
sibling-rank paths (``(0,)`` is the root's best child, ``(0, 1)`` that child's second-best child, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# Parent index of the root.
ROOT_PARENT = -1
# One int64 word holds the ancestor bits of a tree of at most this many nodes.
BITMASK_WORD_BITS = 64


@dataclass(frozen=True, eq=False)
class TokenTree:
    # [N] int64 token ids; tokens[0] is the root (last committed token)
    tokens: torch.Tensor
    # [N] int64 parent index, -1 for the root
    parents: torch.Tensor
    # [N] float32 log q(token_i | path to parent) under the draft, 0 at the root; None if unknown
    draft_logprobs: torch.Tensor | None = None
    # [N] int64 distance from the root (derived)
    depth: torch.Tensor = field(init=False, repr=False)
    # [N, N] bool, row i marks i and its ancestors (derived)
    ancestor_mask: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        tokens = torch.as_tensor(self.tokens, dtype=torch.long).flatten().cpu()
        parents = torch.as_tensor(self.parents, dtype=torch.long).flatten().cpu()
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "parents", parents)
        if tokens.numel() == 0 or tokens.shape != parents.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)} and parents {tuple(parents.shape)} must be non-empty, same shape")
        n = tokens.numel()
        # Python lists, then one tensor: per-node tensor indexing cost ~20 us a node, and trees are built
        # on the host every step (a 9-node tree: 180 -> 20 us)
        depth = [0] * n
        rows: list[list[bool]] = []
        for i, p in enumerate(parents.tolist()):
            if i == 0:
                if p != ROOT_PARENT:
                    raise ValueError(f"node 0 must be the root (parent {ROOT_PARENT}), got parent {p}")
                row = [False] * n
            elif not 0 <= p < i:
                raise ValueError(f"node {i} has parent {p}; parents must precede their children")
            else:
                row = rows[p].copy()
                depth[i] = depth[p] + 1
            row[i] = True
            rows.append(row)
        object.__setattr__(self, "depth", torch.tensor(depth, dtype=torch.long))
        object.__setattr__(self, "ancestor_mask", torch.tensor(rows, dtype=torch.bool))

    # ---- constructors -------------------------------------------------------------------------------

    @classmethod
    def from_parents(
        cls,
        tokens: Sequence[int] | torch.Tensor,
        parents: Sequence[int] | torch.Tensor,
        draft_logprobs: torch.Tensor | None = None,
    ) -> TokenTree:
        return cls(torch.as_tensor(tokens), torch.as_tensor(parents), draft_logprobs)

    @classmethod
    def root_only(cls, root_token: int) -> TokenTree:
        """The degenerate tree of plain decoding: verify just the last token."""
        return cls.from_parents([root_token], [ROOT_PARENT])

    @classmethod
    def chain(cls, root_token: int, draft_tokens: Sequence[int]) -> TokenTree:
        n = len(draft_tokens)
        return cls.from_parents([root_token, *draft_tokens], [ROOT_PARENT, *range(n)])

    @classmethod
    def from_index_paths(
        cls, root_token: int, paths: Sequence[Sequence[int]], path_tokens: Sequence[int]
    ) -> TokenTree:
        """Build a tree from sibling-rank paths (Medusa choices) and one token per path.

        ``paths[i]`` is the rank path of node i+1 and ``path_tokens[i]`` its token; every path's prefix
        must itself be a listed path (or empty, the root). Paths may come in any order.
        """
        if len(paths) != len(path_tokens):
            raise ValueError(f"{len(paths)} paths but {len(path_tokens)} tokens")
        order = sorted(range(len(paths)), key=lambda i: (len(paths[i]), tuple(paths[i])))
        index: dict[tuple[int, ...], int] = {(): 0}
        tokens, parents = [root_token], [ROOT_PARENT]
        for i in order:
            path = tuple(paths[i])
            if not path or path in index:
                raise ValueError(f"path {path} is empty or repeated")
            if path[:-1] not in index:
                raise ValueError(f"path {path} has no parent path {path[:-1]} in the tree")
            index[path] = len(tokens)
            tokens.append(path_tokens[i])
            parents.append(index[path[:-1]])
        return cls.from_parents(tokens, parents)

    # ---- queries ------------------------------------------------------------------------------------

    @property
    def num_nodes(self) -> int:
        return self.tokens.numel()

    @property
    def num_draft_nodes(self) -> int:
        return self.tokens.numel() - 1

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    def children(self, node: int) -> list[int]:
        return (self.parents == node).nonzero().flatten().tolist()

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to ``node`` inclusive."""
        return self.ancestor_mask[node].nonzero().flatten().tolist()

    def ancestor_bitmask(self) -> torch.Tensor:
        """[N] int64: bit j of word i is set iff j is i or an ancestor of i (trees of <= 64 nodes)."""
        n = self.num_nodes
        if n > BITMASK_WORD_BITS:
            raise ValueError(f"a one-word bitmask holds {BITMASK_WORD_BITS} nodes, tree has {n}")
        weights = torch.ones(n, dtype=torch.long) << torch.arange(n, dtype=torch.long)
        # bit 63 overflows into the sign bit, which is the intended two's-complement pattern
        return (self.ancestor_mask.long() * weights).sum(dim=1)

    def validate(self) -> None:
        """Check every invariant listed in the module docstring; raise ValueError on the first broken one."""
        n = self.num_nodes
        if self.parents[0] != ROOT_PARENT:
            raise ValueError("node 0 must be the root")
        idx = torch.arange(n)
        if n > 1 and not bool(((self.parents[1:] >= 0) & (self.parents[1:] < idx[1:])).all()):
            raise ValueError("every parent must precede its child")
        if bool((self.tokens < 0).any()):
            raise ValueError("token ids must be >= 0")
        if not bool((self.depth == self.ancestor_mask.sum(dim=1) - 1).all()):
            raise ValueError("depth must equal the number of ancestors")
        if not bool(self.ancestor_mask.diagonal().all()):
            raise ValueError("every node must see itself")
        if self.draft_logprobs is not None and self.draft_logprobs.shape != (n,):
            raise ValueError(f"draft_logprobs must have shape ({n},), got {tuple(self.draft_logprobs.shape)}")
        pairs = set()
        for i in range(1, n):
            key = (int(self.parents[i]), int(self.tokens[i]))
            if key in pairs:
                raise ValueError(f"node {i} repeats token {key[1]} among the children of node {key[0]}")
            pairs.add(key)


@dataclass(frozen=True, eq=False)
class Proposal:
    """What a drafter hands to verification: the tree, and how its children were proposed."""

    tree: TokenTree
    # [N, V] draft distribution each node's sampled children were drawn from (zero rows where none were
    # sampled); None for greedy trees
    draft_probs: torch.Tensor | None = None
    # [N] bool: the node was proposed deterministically (n-gram lookup), not drawn from draft_probs;
    # None means no such node
    deterministic: torch.Tensor | None = None


def path_logprobs(tree: TokenTree) -> torch.Tensor:
    """[N] float32 cumulative draft log-probability of each node's root path (the root 0)."""
    if tree.draft_logprobs is None:
        raise ValueError("the tree carries no draft log-probabilities")
    cum = tree.draft_logprobs.clone()
    cum[0] = 0.0
    parents = tree.parents.tolist()
    for i in range(1, tree.num_nodes):
        cum[i] += cum[parents[i]]
    return cum
