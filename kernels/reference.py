"""Reference attention: scaled dot-product attention with an explicit boolean mask (the oracle).

Glossary: T queries, S keys (prefix + tree), H query heads, Hkv key/value heads, D head dim.
Slow and obviously correct; every fast tree-attention backend is compared with it in tests.
"""

from __future__ import annotations

import math

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
