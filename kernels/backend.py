"""The one switch point for tree attention: which backend computes it, chosen by name or detected.

Backends (same packed contract: ``(q, k, v, tree_mask, cu_seqlens_q, cu_seqlens_k, scale) -> (out, lse)``):
- ``sdpa``: torch's scaled_dot_product_attention with an explicit boolean mask per request; runs
  anywhere, the slow path on a GPU (the [N, P+N] mask defeats the fused kernels).
- ``triton``: ``kernels.tree_attention`` (needs a GPU, or ``TRITON_INTERPRET=1`` in tests).
- ``flex``: ``kernels.flex_backend`` (torch's FlexAttention).
- ``flash``: ``kernels.flash_backend``, flash-attn for the prefix + Triton for the tree (needs the
  ``flash_attn`` package and a GPU).
``auto`` picks flash, then triton on a CUDA device, and sdpa elsewhere.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from spruce.kernels.reference import per_request

BACKENDS = ("sdpa", "triton", "flex", "flash")
TreeAttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _sdpa_masked(
    # [H, N, D]
    q: torch.Tensor,
    # [Hkv, S, D]
    k: torch.Tensor,
    # [Hkv, S, D]
    v: torch.Tensor,
    # [N, S] bool
    visible: torch.Tensor,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA with an explicit mask; the lse (needed for merges) from the same scores in float32."""
    group = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(group, 0)
    v = v.repeat_interleave(group, 0)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    s = (q.float() @ k.float().transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    return out, torch.logsumexp(s.masked_fill(~visible, float("-inf")), -1)


def sdpa_tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tree_mask: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per request (``kernels.reference.per_request``): SDPA with the explicit [N, P+N] mask."""
    return per_request(q, k, v, tree_mask, cu_seqlens_q, cu_seqlens_k, scale, _sdpa_masked)


def available(name: str, device_type: str) -> str | None:
    """None if backend ``name`` can run on ``device_type``, else the reason it cannot."""
    if name == "sdpa":
        return None
    if name == "flex":
        return None if hasattr(torch.nn.attention, "flex_attention") else "this torch has no FlexAttention"
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if device_type != "cuda":
        return f"{name} needs a CUDA device (Triton's CPU interpreter is for tests only)"
    if name == "flash" and importlib.util.find_spec("flash_attn") is None:
        return "the flash_attn package is not installed (pip install 'spruce[gpu]')"
    return None


def resolve(name: str, device_type: str) -> str:
    """The backend to use: ``name`` itself if it can run here, the best available for ``auto``."""
    if name == "auto":
        for candidate in ("flash", "triton"):
            if available(candidate, device_type) is None:
                return candidate
        return "sdpa"
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be auto or one of {BACKENDS}, got {name!r}")
    reason = available(name, device_type)
    if reason is not None and not (name == "triton" and _interpreting()):
        raise ValueError(f"attention backend {name!r} cannot run here: {reason}")
    return name


def get(name: str) -> TreeAttentionFn:
    """The tree-attention function of a resolved backend."""
    if name == "sdpa":
        return sdpa_tree_attention
    if name == "triton":
        from spruce.kernels.tree_attention import tree_attention

        return tree_attention
    if name == "flex":
        from spruce.kernels.flex_backend import flex_tree_attention

        return flex_tree_attention
    if name == "flash":
        from spruce.kernels.flash_backend import flash_tree_attention

        return flash_tree_attention
    raise ValueError(f"unknown attention backend {name!r}")


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"
