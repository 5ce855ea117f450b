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
from typing import TYPE_CHECKING

import torch

from spruce.config import SpeculationConfig
from spruce.draft.tree import ROOT_PARENT, Proposal, TokenTree
from spruce.modeling import (
    additive_mask,
    cache_length,
    forward_tokens,
    keep_cache_positions,
    new_cache,
    prefix_tree_visibility,
)
from spruce.sampling import sampling_probs

if TYPE_CHECKING:
    from transformers import PreTrainedModel


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

    def __init__(self, model: PreTrainedModel, vocab_size: int | None = None) -> None:
        """``vocab_size``: the target's logits width; draft logits are cut or padded to it, so a draft
        never proposes an id the target cannot score and its distributions line up with the target's."""
        self.model = model
        self.vocab_size = vocab_size

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[F, V] draft logits on the CPU (tree building is small, sequential work), fit to the target's V."""
        logits = logits.float().cpu()
        v = self.vocab_size
        if v is None or logits.shape[-1] == v:
            return logits
        if logits.shape[-1] > v:
            return logits[:, :v]
        return torch.nn.functional.pad(logits, (0, v - logits.shape[-1]), value=float("-inf"))

    def new_state(self) -> DraftState:
        return DraftState(cache=new_cache(self.model))

    def propose(
        self,
        state: DraftState,
        tokens: list[int],
        config: SpeculationConfig,
        max_depth: int,
        sampling: DraftSampling | None = None,
    ) -> Proposal:
        """Build a tree rooted at ``tokens[-1]`` of at most ``min(config.depth, max_depth)`` levels.

        ``sampling=None``: greedy trees (the most likely children). Otherwise children are drawn from the
        processed draft distribution without replacement, as lossless tree sampling requires.
        """
        committed = len(tokens)
        if not 0 <= state.cached < committed or cache_length(state.cache) != state.cached:
            raise RuntimeError(f"draft cache holds {cache_length(state.cache)} positions, state says {state.cached}")
        pending = torch.tensor(tokens[state.cached :], dtype=torch.long)
        positions = torch.arange(state.cached, committed, dtype=torch.long)
        logits = self._logits(forward_tokens(self.model, state.cache, pending, positions, None, last_only=True))
        state.cached = committed
        state.committed = committed
        state.node_slots = {}

        node_tokens, parents, logprobs = [tokens[-1]], [ROOT_PARENT], [0.0]
        # rank path of each node (static trees)
        node_paths: list[tuple[int, ...]] = [()]
        static = _static_children(config.tree_paths) if config.tree_paths else None
        expanded: dict[int, torch.Tensor] = {}
        cum = torch.zeros(1)
        frontier = [0]
        depth = min(config.depth if config.tree_paths is None else max(map(len, config.tree_paths)), max_depth)
        for level in range(1, depth + 1):
            room = config.budget - (len(node_tokens) - 1)
            if static is None and room <= 0:
                break
            if sampling is None:
                # [F, V] draft log-probabilities at each frontier node
                logq = torch.log_softmax(logits, dim=-1)
            else:
                q = sampling_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
                expanded.update({node: q[i] for i, node in enumerate(frontier)})
                logq = q.log()
            if static is not None:
                counts = [static.get(node_paths[f], 0) for f in frontier]
                picks = select_static(logq, counts, None if sampling is None else sampling.generator)
            elif sampling is None:
                picks = select_greedy(logq, cum, config.top_k, room)
            else:
                picks = select_sampled(logq, cum, config.top_k, room, sampling.generator)
            new_nodes, new_cum = [], []
            for rank, (f, token) in _ranked(picks):
                new_nodes.append(len(node_tokens))
                node_tokens.append(token)
                parents.append(frontier[f])
                node_paths.append(node_paths[frontier[f]] + (rank,))
                logprobs.append(float(logq[f, token]))
                new_cum.append(float(cum[f] + logq[f, token]))
            cum_all = torch.tensor(new_cum)
            if static is not None:
                # the next level expands the new nodes that have children in the static shape
                order = torch.tensor([i for i, n in enumerate(new_nodes) if static.get(node_paths[n], 0)], dtype=torch.long)
            else:
                # the next level expands the best top_k new nodes (by cumulative draft log-probability)
                order = cum_all.argsort(descending=True)[: config.top_k]
            frontier = [new_nodes[i] for i in order.tolist()]
            cum = cum_all[order]
            more = (len(node_tokens) - 1 < config.budget) if static is None else bool(frontier)
            if level < depth and more:
                tree_so_far = TokenTree.from_parents(node_tokens, parents)
                logits = self._logits(self._forward_level(state, tree_so_far, frontier, committed + level - 1))
        tree = TokenTree.from_parents(node_tokens, parents, torch.tensor(logprobs, dtype=torch.float32))
        return Proposal(tree, _stack_rows(expanded, tree.num_nodes, logits.shape[-1]) if sampling is not None else None)

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


@dataclass(frozen=True)
class DraftSampling:
    """How the draft samples children: the request's processing and its generator."""

    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator


def select_greedy(
    # [F, V] draft log-probabilities, frontier in descending score order
    logq: torch.Tensor,
    # [F] cumulative log-probability of each frontier node
    cum: torch.Tensor,
    top_k: int,
    room: int,
) -> list[tuple[int, int]]:
    """(frontier index, token) of the best ``min(top_k, room)`` children by cumulative log-probability."""
    k = min(top_k, logq.shape[-1])
    top = logq.topk(k, dim=-1)
    scores = (cum[:, None] + top.values).flatten()
    best = scores.topk(min(k, room, scores.numel())).indices.tolist()
    return [(f, int(top.indices[f, r])) for f, r in (divmod(i, k) for i in best)]


def select_sampled(
    # [F, V] draft log-probabilities (-inf where filtered out), frontier in descending score order
    logq: torch.Tensor,
    # [F] cumulative log-probability of each frontier node (unused: counts must not depend on draws)
    cum: torch.Tensor,
    top_k: int,
    room: int,
    generator: torch.Generator,
) -> list[tuple[int, int]]:
    """Each frontier node in turn gets ``top_k`` children drawn without replacement (Gumbel-top-k: the
    order of log q + Gumbel noise is a sequential draw without replacement), until ``room`` runs out.

    Child counts depend only on the frontier order and q's support, never on the drawn tokens, and each
    node keeps a draw-order prefix: the two conditions of ``spruce.verify.tree_sampling``.
    """
    del cum
    picks: list[tuple[int, int]] = []
    for f in range(logq.shape[0]):
        k = min(top_k, room - len(picks), int(torch.isfinite(logq[f]).sum()))
        if k <= 0:
            break
        uniform = torch.rand(logq.shape[1], generator=generator, dtype=torch.float64).clamp_(min=1e-300)
        keys = logq[f].double() - torch.log(-torch.log(uniform))
        picks.extend((f, int(t)) for t in keys.topk(k).indices)
    return picks


def select_static(
    # [F, V] draft log-probabilities
    logq: torch.Tensor,
    # children wanted per frontier node (a static shape decides them before any draw)
    counts: list[int],
    generator: torch.Generator | None,
) -> list[tuple[int, int]]:
    """(frontier index, token): the ``counts[f]`` most likely tokens of node f (greedy), or its first
    ``counts[f]`` draws without replacement (sampling), in rank order."""
    picks: list[tuple[int, int]] = []
    for f, k in enumerate(counts):
        if k <= 0:
            continue
        if generator is None:
            picks.extend((f, int(t)) for t in logq[f].topk(min(k, logq.shape[-1])).indices)
        else:
            picks.extend((f, t) for _, t in select_sampled(logq[f : f + 1], torch.zeros(1), k, k, generator))
    return picks


def _ranked(picks: list[tuple[int, int]]):
    """Yield (rank among the picks of the same frontier node, pick), in order."""
    seen: dict[int, int] = {}
    for f, token in picks:
        rank = seen.get(f, 0)
        seen[f] = rank + 1
        yield rank, (f, token)


def _static_children(paths: tuple[tuple[int, ...], ...]) -> dict[tuple[int, ...], int]:
    """Number of children of each rank path in a static shape (the root is ``()``)."""
    counts: dict[tuple[int, ...], int] = {}
    for p in paths:
        counts[p[:-1]] = counts.get(p[:-1], 0) + 1
    return counts


def _stack_rows(rows: dict[int, torch.Tensor], n: int, vocab: int) -> torch.Tensor:
    out = torch.zeros(n, vocab)
    for node, row in rows.items():
        out[node] = row
    return out
