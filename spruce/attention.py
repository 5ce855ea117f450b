"""Tree attention inside a transformers model: a registered attention function, tree metadata passed
explicitly with each forward.

``use_backend(model, name)`` registers ``spruce_tree`` with transformers' ``AttentionInterface`` (and
sdpa's mask builder with ``AttentionMaskInterface``) and switches the model to it. Verification then
passes a ``TreeAttentionMetadata`` as the ``spruce_tree`` keyword of the forward; transformers hands it
to every attention layer, which runs the chosen ``spruce.kernels`` backend over the cache's keys
(prefix + tree). Without metadata the function is plain SDPA with the mask transformers built: prefill
(queries = keys, causal) and one-token decoding keep the usual fast path. A multi-token query after a
cached prefix with no metadata is a tree pass that lost its mask: it raises instead of attending to
everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from spruce.kernels import backend as kernel_backends

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ATTENTION_NAME = "spruce_tree"


@dataclass(frozen=True)
class TreeAttentionMetadata:
    """What one tree pass needs besides q, k, v (one request: the engine is single-request for now)."""

    # [N, W] int64 ancestor-or-self bitmask of each tree node
    tree_mask: torch.Tensor
    # [2] int32 query offsets (0, N) and key offsets (0, P + N)
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    backend: str


def tree_attention_forward(
    module: torch.nn.Module,
    # [B, H, T, D]
    query: torch.Tensor,
    # [B, Hkv, L, D] (the cache, tree keys included)
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    spruce_tree: TreeAttentionMetadata | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature; returns ([B, T, H, D] output, no weights)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if spruce_tree is None:
        if query.shape[2] > 1 and key.shape[2] > query.shape[2]:
            raise RuntimeError(
                f"tree attention got a {query.shape[2]}-token query after {key.shape[2] - query.shape[2]} cached "
                "keys but no tree metadata: pass spruce_tree= (see spruce.attention)"
            )
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise NotImplementedError("tree attention through the model runs one request per pass")
    fn = kernel_backends.get(spruce_tree.backend)
    q = query[0].transpose(0, 1)  # [T, H, D]
    k = key[0].transpose(0, 1)  # [L, Hkv, D]
    v = value[0].transpose(0, 1)
    out, _ = fn(q, k, v, spruce_tree.tree_mask, spruce_tree.cu_seqlens_q, spruce_tree.cu_seqlens_k, scaling)
    return out[None], None


def use_backend(model: PreTrainedModel, name: str) -> None:
    """Route ``model``'s attention through ``tree_attention_forward`` (for any backend but sdpa, which
    keeps transformers' own path with an explicit 4D mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, tree_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    model.set_attn_implementation(ATTENTION_NAME)


def tree_metadata(
    # [N, N] bool ancestor-or-self mask
    ancestors: torch.Tensor,
    prefix_len: int,
    backend: str,
    device: torch.device,
) -> TreeAttentionMetadata:
    from spruce.kernels.reference import pack_bitmask

    n = ancestors.shape[0]
    return TreeAttentionMetadata(
        tree_mask=pack_bitmask(ancestors).to(device),
        cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=device),
        cu_seqlens_k=torch.tensor([0, prefix_len + n], dtype=torch.int32, device=device),
        backend=backend,
    )
