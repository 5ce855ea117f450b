"""Forward passes with explicit tree masks over a transformers KV cache, and cache surgery.

Shared by the drafter and the verifier (both run a causal LM over tree-shaped queries).
Glossary: T query tokens in this pass, L keys already in the cache, V vocab.

Facts this relies on (transformers 5.x, checked in tests on the installed version):
- a 4D float mask [1, 1, T, L+T] plus ``position_ids`` plus a ``DynamicCache`` runs tree-shaped queries
  in one call; the 4D mask is used as given. Boolean masks are silently wrong under "eager" attention,
  so masks here are additive float (0 = visible, dtype minimum = hidden), which every backend honours.
- the cache keeps per-layer ``keys``/``values`` of shape [1, Hkv, L, D]; ``crop(-n)`` drops the last n
  positions on every supported version (the positive form raises on newer ones).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def additive_mask(
    # [T, L + T] bool, True = the query may attend to that key
    visible: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """[1, 1, T, L+T] additive float mask from a boolean visibility matrix."""
    mask = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]


def prefix_tree_visibility(
    prefix_len: int,
    # [T, T] bool, query i may see tree key j (ancestor or self)
    tree_visible: torch.Tensor,
) -> torch.Tensor:
    """[T, prefix_len + T] bool: every query sees the whole prefix, and its tree ancestors."""
    t = tree_visible.shape[0]
    prefix = torch.ones(t, prefix_len, dtype=torch.bool, device=tree_visible.device)
    return torch.cat([prefix, tree_visible], dim=1)


@torch.inference_mode()
def forward_tokens(
    model: PreTrainedModel,
    cache,
    # [T] int64
    input_ids: torch.Tensor,
    # [T] int64 absolute positions
    positions: torch.Tensor,
    # [1, 1, T, L+T] additive float mask, or None for plain causal attention
    mask: torch.Tensor | None,
    last_only: bool = False,
    attention_kwargs: dict | None = None,
) -> torch.Tensor:
    """Run ``model`` on T new tokens after the L cached ones; returns [T, V] float32 logits.

    ``last_only`` computes logits for the last token only ([1, V]): prefill needs no more, and the
    vocabulary projection over every prompt token would cost more than the rest of the pass.
    The cache grows by T positions. ``attention_kwargs`` reach every attention layer (tree metadata for
    ``spruce.attention``).
    """
    device = model.device
    out = model(
        input_ids=input_ids[None].to(device),
        position_ids=positions[None].to(device),
        attention_mask=None if mask is None else mask.to(device),
        use_cache=True,
        logits_to_keep=1 if last_only else 0,
        **{cache_kwarg(type(model)): cache},
        **(attention_kwargs or {}),
    )
    return out.logits[0].float()


CACHE_KWARGS: dict[type, str] = {}


def cache_kwarg(model_class: type) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); use whichever this version takes."""
    if model_class not in CACHE_KWARGS:
        params = inspect.signature(getattr(model_class, "forward")).parameters
        CACHE_KWARGS[model_class] = "cache" if "cache" in params else "past_key_values"
    return CACHE_KWARGS[model_class]


def cache_length(cache) -> int:
    return int(cache.get_seq_length())


@torch.inference_mode()
def keep_cache_positions(
    cache,
    start: int,
    # [K] int64 positions relative to ``start`` to keep, in order
    keep: torch.Tensor,
) -> None:
    """Keep positions ``[0, start)`` and ``start + keep`` (in that order); drop everything after.

    Used to commit the accepted tree path: the kept slots move down to ``start .. start+K-1``.
    """
    total = cache_length(cache)
    k = keep.numel()
    if k and (int(keep.min()) < 0 or start + int(keep.max()) >= total):
        raise IndexError(f"keep positions {keep.tolist()} out of range for cache tail of {total - start}")
    is_identity = k == 0 or bool((keep == torch.arange(k, device=keep.device)).all())
    if not is_identity:
        for layer in cache.layers:
            idx = (keep + start).to(layer.keys.device)
            # advanced indexing on the right copies first, so overlapping source and destination is safe
            layer.keys[..., start : start + k, :] = layer.keys[..., idx, :]
            layer.values[..., start : start + k, :] = layer.values[..., idx, :]
    drop = total - start - k
    if drop > 0:
        cache.crop(-drop)


def new_cache(model: PreTrainedModel):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)
