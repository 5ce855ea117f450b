"""One target forward over every node of a token tree, and the cache commit that follows.

Layout of the target's KV cache at the start of a step: the P committed tokens before the root (the
root itself, the last committed token, is not yet cached). The verify pass appends all N tree nodes
(root first) with positions ``P + depth`` and a mask where each node sees the whole prefix and its own
ancestors. After acceptance, ``commit_accepted`` keeps the prefix plus the accepted root path, so the
cache again holds every committed token except the new root (the bonus token).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from spruce.draft.tree import TokenTree
from spruce.modeling import additive_mask, forward_tokens, keep_cache_positions, prefix_tree_visibility

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def tree_positions(
    tree: TokenTree,
    prefix_len: int,
) -> torch.Tensor:
    """[N] int64 absolute positions: the root sits right after the prefix, children one further each level."""
    return tree.depth + prefix_len


def tree_mask(tree: TokenTree, prefix_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, N, P+N] additive mask: full prefix, then ancestors-or-self within the tree."""
    return additive_mask(prefix_tree_visibility(prefix_len, tree.ancestor_mask), dtype)


def verify_tree(
    model: PreTrainedModel,
    cache,
    tree: TokenTree,
    prefix_len: int,
    attention_backend: str = "sdpa",
) -> torch.Tensor:
    """Run the target over all tree nodes in one pass; returns [N, V] float32 logits.

    For a single-node tree (plain decoding) no mask is built: the model's own causal path is used.
    ``attention_backend`` other than sdpa: the model was switched with ``spruce.attention.use_backend``
    and the tree goes to the kernel as bitmask metadata instead of a [N, P+N] mask.
    """
    positions = tree_positions(tree, prefix_len)
    if tree.num_nodes == 1:
        return forward_tokens(model, cache, tree.tokens, positions, None)
    if attention_backend == "sdpa":
        return forward_tokens(model, cache, tree.tokens, positions, tree_mask(tree, prefix_len, model.dtype))
    from spruce.attention import tree_metadata

    meta = tree_metadata(tree.ancestor_mask, prefix_len, attention_backend, model.device)
    return forward_tokens(model, cache, tree.tokens, positions, None, attention_kwargs={"spruce_tree": meta})


def commit_accepted(
    cache,
    prefix_len: int,
    # [K+1] int64 accepted node indices, root first
    accepted_nodes: torch.Tensor,
) -> None:
    """Keep the prefix and the accepted path's KV (tree node i sits at cache slot ``prefix_len + i``)."""
    keep_cache_positions(cache, prefix_len, accepted_nodes)
