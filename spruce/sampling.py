"""Sampling distributions: temperature, top-k and top-p applied to logits.

Shared by the drafter and the verifier: the same processing is applied to target and draft logits, so the
distribution that speculation preserves is exactly the one plain sampling draws from. Pure.
"""

from __future__ import annotations

import torch


def sampling_probs(
    # [N, V] float logits
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """[N, V] float32 probabilities after temperature, then top-k, then top-p (nucleus) filtering.

    top-k keeps the k largest logits (ties at the k-th value are all kept); top-p keeps the smallest set of
    most likely tokens whose mass reaches ``top_p`` (the token that crosses the threshold is kept).
    """
    if temperature <= 0:
        raise ValueError("sampling_probs needs temperature > 0; greedy decoding uses argmax")
    scaled = logits.float() / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # mass strictly before each token; a token is kept while that mass is below top_p
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs
