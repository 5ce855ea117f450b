"""Reference attention: scaled dot-product attention with an explicit boolean mask (the oracle).

Glossary: T queries, S keys (prefix + tree), H query heads, Hkv key/value heads, D head dim.
Slow and obviously correct; every fast tree-attention backend is compared with it in tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def masked_attention(
    # [H, T, D]
    q: torch.Tensor,
    # [Hkv, S, D]
    k: torch.Tensor,
    # [Hkv, S, D]
    v: torch.Tensor,
    # [T, S] bool, True = visible
    visible: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ([H, T, D] output, [H, T] log-sum-exp of the scaled scores, natural log).

    Grouped-query attention: query head h reads key/value head ``h // (H // Hkv)``.
    A query row that sees no key gets output 0 and lse -inf.
    """
    h, hkv = q.shape[0], k.shape[0]
    if h % hkv:
        raise ValueError(f"{h} query heads do not group over {hkv} key/value heads")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k = k.repeat_interleave(h // hkv, dim=0)
    v = v.repeat_interleave(h // hkv, dim=0)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    return probs @ v, lse


# bits per ancestor-mask word (int64)
WORD_BITS = 64


def pack_bitmask(
    # [N, N] bool, True where node j (column) is visible to node i (row): its ancestors and itself
    visible: torch.Tensor,
    words: int | None = None,
) -> torch.Tensor:
    """[N, W] int64: bit j % 64 of word j // 64 is ``visible[i, j]`` (W = ceil(N / 64) unless given)."""
    n = visible.shape[0]
    words = max(1, -(-n // WORD_BITS)) if words is None else words
    padded = torch.zeros(n, words * WORD_BITS, dtype=torch.bool, device=visible.device)
    padded[:, : visible.shape[1]] = visible
    bits = padded.view(n, words, WORD_BITS).to(torch.int64)
    weights = torch.ones(WORD_BITS, dtype=torch.int64, device=visible.device) << torch.arange(WORD_BITS, device=visible.device)
    # bit 63 is the sign bit: the sum wraps to the two's complement value, which is what we want
    return (bits * weights).sum(-1)


def unpack_bitmask(
    # [N, W] int64
    words: torch.Tensor,
    n: int,
) -> torch.Tensor:
    """[N, n] bool, the inverse of ``pack_bitmask``."""
    j = torch.arange(n, device=words.device)
    return ((words[:, j // WORD_BITS] >> (j % WORD_BITS)) & 1).bool()


# (q [H, N, D], k [Hkv, S, D], v [Hkv, S, D], visible [N, S] bool, scale) -> ([H, N, D], [H, N] lse)
MaskedAttention = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def per_request(
    # [Tq, H, D] packed tree queries
    q: torch.Tensor,
    # [Tk, Hkv, D] packed keys: each request's prefix, then its tree nodes
    k: torch.Tensor,
    # [Tk, Hkv, D]
    v: torch.Tensor,
    # [Tq, W] int64 ancestor-or-self bitmask per query
    tree_mask: torch.Tensor,
    # [B+1] query offsets
    cu_seqlens_q: torch.Tensor,
    # [B+1] key offsets
    cu_seqlens_k: torch.Tensor,
    scale: float | None,
    attend: MaskedAttention,
    # [B] the tree's keys per request (its last ones); None: as many as its queries
    tree_lens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ragged tree-attention contract spelled out: each request's queries attend, through
    ``attend``, to its whole prefix and to the tree keys their mask words name (their ancestors and
    themselves). The tree is a request's last ``tree_lens[b]`` keys, by default as many as its queries.
    Returns ([Tq, H, D], [Tq, H] lse)."""
    outs, lses = [], []
    for b in range(cu_seqlens_q.numel() - 1):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        k0, k1 = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        n = q1 - q0
        tree = n if tree_lens is None else int(tree_lens[b])
        prefix = (k1 - k0) - tree
        visible = torch.cat(
            [torch.ones(n, prefix, dtype=torch.bool, device=q.device), unpack_bitmask(tree_mask[q0:q1], tree)], dim=1
        )
        o, lse = attend(q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1), visible, scale)
        outs.append(o.transpose(0, 1))
        lses.append(lse.transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


def tree_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float | None = None,
    tree_lens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle for the packed contract (shapes as ``per_request``): ``masked_attention`` per request."""
    return per_request(q, k, v, tree_mask, cu_seqlens_q, cu_seqlens_k, scale, masked_attention, tree_lens)
