"""A draft model proposes a token tree, keeping its own KV cache across steps.

Draft cache layout during ``propose``: the C committed tokens (the root, ``tokens[-1]``, included), then
the tree nodes that were forwarded to expand them, in forwarding order. After verification, ``commit``
keeps the committed part plus the slots of the accepted path's nodes that were forwarded, so the next
step re-processes only what the draft has not seen: the accepted nodes of the last level and the bonus.

Tree construction (static limits from ``SpeculationConfig``): level by level, the nodes added at the
previous level are expanded into their ``top_k`` most likely children; the ``top_k`` best candidates by
cumulative draft log-probability join the tree, until ``depth`` levels or ``budget`` nodes. The drafter
runs ``depth`` forwards per step: the first over the pending committed tokens, then one per level.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from spruce.config import SpeculationConfig
from spruce.draft.tree import ROOT_PARENT, TokenTree
from spruce.modeling import (
    additive_mask,
    cache_length,
    forward_tokens,
    keep_cache_positions,
    new_cache,
    prefix_tree_visibility,
)


@dataclass
class DraftState:
    """Per-request draft cache and bookkeeping."""

    cache: object
    # committed tokens whose KV is in the cache (always < len(tokens): the root is re-fed)
    cached: int = 0
    # tree node index -> cache slot offset after the committed tokens (set by propose)
    node_slots: dict[int, int] = field(default_factory=dict)
    # committed length C at the last propose
    committed: int = 0


class ModelDrafter:
    """Tree proposer backed by a small causal LM."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def new_state(self) -> DraftState:
        return DraftState(cache=new_cache(self.model))

    def propose(self, state: DraftState, tokens: list[int], config: SpeculationConfig, max_depth: int) -> TokenTree:
        """Build a tree rooted at ``tokens[-1]`` of at most ``min(config.depth, max_depth)`` levels."""
        committed = len(tokens)
        if not 0 <= state.cached < committed or cache_length(state.cache) != state.cached:
            raise RuntimeError(f"draft cache holds {cache_length(state.cache)} positions, state says {state.cached}")
        pending = torch.tensor(tokens[state.cached :], dtype=torch.long)
        positions = torch.arange(state.cached, committed, dtype=torch.long)
        logits = forward_tokens(self.model, state.cache, pending, positions, None, last_only=True)
        state.cached = committed
        state.committed = committed
        state.node_slots = {}

        node_tokens, parents, logprobs = [tokens[-1]], [ROOT_PARENT], [0.0]
        cum = torch.zeros(1)
        frontier = [0]
        depth = min(config.depth, max_depth)
        for level in range(1, depth + 1):
            room = config.budget - (len(node_tokens) - 1)
            if room <= 0:
                break
            # [F, V] draft log-probabilities at each frontier node
            logp = torch.log_softmax(logits, dim=-1)
            top = logp.topk(config.top_k, dim=-1)
            # [F * top_k] cumulative log-probability of each candidate child
            scores = (cum[:, None] + top.values).flatten()
            best = scores.topk(min(config.top_k, room, scores.numel())).indices
            new_nodes = []
            for flat in best.tolist():
                f, r = divmod(flat, config.top_k)
                new_nodes.append(len(node_tokens))
                node_tokens.append(int(top.indices[f, r]))
                parents.append(frontier[f])
                logprobs.append(float(top.values[f, r]))
            cum = scores[best]
            frontier = new_nodes
            if level < depth and len(node_tokens) - 1 < config.budget:
                tree_so_far = TokenTree.from_parents(node_tokens, parents)
                logits = self._forward_level(state, tree_so_far, frontier, committed + level - 1)
        return TokenTree.from_parents(node_tokens, parents, torch.tensor(logprobs, dtype=torch.float32))

    def _forward_level(self, state: DraftState, tree: TokenTree, nodes: list[int], position: int) -> torch.Tensor:
        """Forward ``nodes`` (all at one depth) after the committed tokens and earlier levels; [F, V] logits."""
        slotted = sorted(state.node_slots, key=state.node_slots.__getitem__)
        # [F, S + F]: each new node sees forwarded ancestors (by slot order) and itself
        cols = torch.tensor(slotted + nodes, dtype=torch.long)
        visible = tree.ancestor_mask[torch.tensor(nodes)][:, cols]
        mask = additive_mask(prefix_tree_visibility(state.committed, visible), self.model.dtype)
        ids = tree.tokens[torch.tensor(nodes)]
        positions = torch.full((len(nodes),), position, dtype=torch.long)
        logits = forward_tokens(self.model, state.cache, ids, positions, mask)
        base = len(state.node_slots)
        for i, node in enumerate(nodes):
            state.node_slots[node] = base + i
        return logits

    def commit(self, state: DraftState, accepted_nodes: list[int]) -> None:
        """Keep the committed tokens plus the forwarded prefix of the accepted path (root excluded)."""
        keep = []
        for node in accepted_nodes[1:]:
            if node not in state.node_slots:
                break
            keep.append(state.node_slots[node])
        keep_cache_positions(state.cache, state.committed, torch.tensor(keep, dtype=torch.long))
        state.cached = state.committed + len(keep)
        state.node_slots = {}
