"""Tree attention as two exact halves: the prefix with flash-attn (no mask), the tree with the Triton
kernel, merged by log-sum-exp.

For one query, attention over keys A and B from their separate results (o_A, l_A) and (o_B, l_B), l the
natural-log log-sum-exp of the scaled scores: l = logaddexp(l_A, l_B), o = o_A exp(l_A - l) + o_B exp(l_B - l).
That is exact (softmax over A u B reweights each half by its share of the total mass). A request with
no prefix has l_A = -inf and contributes nothing from it.

Used when the ``flash_attn`` package is installed (a GPU machine); ``split_tree_attention`` takes the two
halves as functions, so the split and merge are tested on CPU with reference halves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# (q [Tq,H,D], k [Tk,Hkv,D], v, cu_q, cu_k, scale) -> (out [Tq,H,D], lse [Tq,H]) with every key visible
PrefixAttention = Callable[..., tuple[torch.Tensor, torch.Tensor]]
# the tree-attention contract of ``kernels.tree_attention.tree_attention``
TreeAttention = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def merge(
    # [Tq, H, D] and [Tq, H] from the first key set
    o_a: torch.Tensor,
    lse_a: torch.Tensor,
    # [Tq, H, D] and [Tq, H] from the second
    o_b: torch.Tensor,
    lse_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the union of two disjoint key sets."""
    lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - lse).nan_to_num(0.0)[..., None]
    w_b = torch.exp(lse_b - lse).nan_to_num(0.0)[..., None]
    return (o_a.float() * w_a + o_b.float() * w_b).to(o_a.dtype), lse


def split_tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float | None,
    prefix_attention: PrefixAttention,
    tree_attention: TreeAttention,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix keys with ``prefix_attention``, tree keys with ``tree_attention`` (prefix 0), merged."""
    cu_q = cu_seqlens_q.to(torch.int64)
    cu_k = cu_seqlens_k.to(torch.int64)
    n_q = cu_q[1:] - cu_q[:-1]
    prefix = (cu_k[1:] - cu_k[:-1]) - n_q
    pre_idx = torch.cat([torch.arange(int(s), int(s + p)) for s, p in zip(cu_k[:-1], prefix)]).to(k.device)
    tree_idx = torch.cat([torch.arange(int(s + p), int(e)) for s, p, e in zip(cu_k[:-1], prefix, cu_k[1:])]).to(k.device)
    cu_pre = torch.cat([prefix.new_zeros(1), prefix.cumsum(0)]).to(torch.int32).to(q.device)
    o_pre, l_pre = prefix_attention(q, k[pre_idx], v[pre_idx], cu_seqlens_q, cu_pre, scale)
    o_tree, l_tree = tree_attention(q, k[tree_idx], v[tree_idx], tree_mask, cu_seqlens_q, cu_seqlens_q, scale)
    return merge(o_pre, l_pre, o_tree, l_tree)


def flash_prefix_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """flash-attn varlen over the prefixes, every key visible; lse as [Tq, H] (requests with no prefix
    get -inf, output 0)."""
    from flash_attn import flash_attn_varlen_func

    lens_q, lens_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]
    out, lse, _ = flash_attn_varlen_func(
        q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), int(lens_q.max()), max(1, int(lens_k.max())),
        softmax_scale=scale, causal=False, return_attn_probs=True,
    )
    lse = lse.transpose(0, 1).float()
    empty = torch.repeat_interleave(lens_k == 0, lens_q.to(torch.int64))
    lse[empty] = float("-inf")
    out[empty] = 0
    return out, lse


def flash_tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    from spruce.kernels.tree_attention import tree_attention

    return split_tree_attention(
        q, k, v, tree_mask, cu_seqlens_q, cu_seqlens_k, scale, flash_prefix_attention, tree_attention
    )
