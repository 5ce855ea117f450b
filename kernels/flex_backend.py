"""Tree attention with torch's FlexAttention: the tree mask as a ``mask_mod`` over the packed batch.

Same contract as ``kernels.tree_attention.tree_attention`` (packed queries and keys, ``cu_seqlens``
offsets, ancestor bitmasks). All requests are laid out as one sequence (B = 1): a query sees a key iff
both belong to the same request and the key is in that request's prefix or is an ancestor-or-self of
the query's node. The block mask lets FlexAttention skip blocks no query can see (other requests).
A second portable path: it runs wherever torch does (compiled on GPU, eager on CPU in tests).
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, create_block_mask, flex_attention

# bits per mask word (int64)
WORD_BITS = 64


_COMPILED = None


def _compiled():
    """flex_attention compiled once (on a GPU the uncompiled form materializes the full score matrix)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(flex_attention, dynamic=True)
    return _COMPILED


def _owner(cu: torch.Tensor, total: int) -> torch.Tensor:
    """[total] request index of each packed position."""
    return torch.bucketize(torch.arange(total, device=cu.device), cu[1:].to(torch.int64), right=True)


def tree_block_mask(
    # [Tq, W] int64 ancestor-or-self bitmask
    tree_mask: torch.Tensor,
    # [B+1] query offsets
    cu_seqlens_q: torch.Tensor,
    # [B+1] key offsets
    cu_seqlens_k: torch.Tensor,
    tq: int,
    tk: int,
    device: torch.device,
) -> BlockMask:
    """The packed batch's tree mask as a FlexAttention block mask. It depends on the pass's layout only,
    so a model builds it once per pass and every layer reuses it (``flex_tree_attention(block_mask=)``)."""
    cu_q, cu_k = cu_seqlens_q.to(device, torch.int64), cu_seqlens_k.to(device, torch.int64)
    q_owner, k_owner = _owner(cu_q, tq), _owner(cu_k, tk)
    n_q = cu_q[1:] - cu_q[:-1]
    prefix = (cu_k[1:] - cu_k[:-1]) - n_q
    # per key: its index in its request's tree (negative: a prefix key)
    tree_index = torch.arange(tk, device=device) - cu_k[k_owner] - prefix[k_owner]
    words = tree_mask.to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        j = tree_index[kv_idx]
        jj = torch.clamp(j, min=0)
        bit = (words[q_idx, jj // WORD_BITS] >> (jj % WORD_BITS)) & 1
        return (q_owner[q_idx] == k_owner[kv_idx]) & ((j < 0) | (bit == 1))

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=tq, KV_LEN=tk, device=device)


def flex_tree_attention(
    # [Tq, H, D]
    q: torch.Tensor,
    # [Tk, Hkv, D]
    k: torch.Tensor,
    # [Tk, Hkv, D]
    v: torch.Tensor,
    # [Tq, W] int64 ancestor-or-self bitmask
    tree_mask: torch.Tensor,
    # [B+1] query offsets
    cu_seqlens_q: torch.Tensor,
    # [B+1] key offsets
    cu_seqlens_k: torch.Tensor,
    scale: float | None = None,
    # ``tree_block_mask`` of these arguments, when the caller keeps it between layers
    block_mask: BlockMask | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ([Tq, H, D] output, [Tq, H] float32 natural-log log-sum-exp)."""
    tq, tk = q.shape[0], k.shape[0]
    if block_mask is None:
        block_mask = tree_block_mask(tree_mask, cu_seqlens_q, cu_seqlens_k, tq, tk, q.device)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    attend = _compiled() if q.is_cuda else flex_attention
    out, aux = attend(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1], return_aux=AuxRequest(lse=True),
    )
    return out[0].transpose(0, 1), aux.lse[0].transpose(0, 1).float()
