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
from spruce.kvcache import FLOAT32_ROWS_MAX, BatchAttention

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ATTENTION_NAME = "spruce_tree"
# the same function without the missing-metadata check: models on transformers' sdpa path (4D masks) that
# also run packed passes (``spruce.kvcache``)
PACKED_NAME = "spruce_packed"


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
    spruce_batch: BatchAttention | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature; returns ([B, T, H, D] output, no weights)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if spruce_batch is not None:
        return packed_attention(query, key, value, spruce_batch, scaling), None
    if spruce_tree is None:
        strict = getattr(getattr(module, "config", None), "_attn_implementation", None) == ATTENTION_NAME
        if strict and query.shape[2] > 1 and key.shape[2] > query.shape[2]:
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


def packed_attention(
    # [1, H, T, D] the queries of every segment, flattened
    query: torch.Tensor,
    # [S, Hkv, C, D] the whole KV pool of this layer (``spruce.kvcache.SlotKVCache.update``)
    key: torch.Tensor,
    value: torch.Tensor,
    meta: BatchAttention,
    scaling: float | None,
) -> torch.Tensor:
    """[1, T, H, D]: each segment's queries over its own slot's keys, with its own mask (SDPA per
    segment on views of the pool: no copy of the cache). Keys are never repeated for grouped-query
    heads: the heads are folded into query rows, or SDPA's grouped-query mode runs (``_sdpa``)."""
    if meta.kernel is not None:
        return _kernel_attention(query, key, value, meta, scaling)
    groups = query.shape[1] // key.shape[1]
    # on a CPU, SDPA's grouped-query mode beats folding for masked multi-row queries (the folded mask is
    # g times larger): 2.6x at 256 rows x 2000 keys, equal at 16 rows; folding stays best for one row.
    # CUDA keeps the fold (its grouped-query mode with a mask falls back to the math kernel).
    cpu = query.device.type == "cpu"
    outs = []
    for i, (offset, n, slot, length, mask) in enumerate(meta.parts):
        k, v = key[slot, :, :length], value[slot, :, :length]
        q = query[0, :, offset : offset + n]  # [H, n, D]
        causal = meta.causal_rows[i] if meta.causal_rows else 0
        if meta.float32_rows and not causal and n <= FLOAT32_ROWS_MAX:
            outs.append(float32_rows_attention(q, k, v, mask, scaling, groups).to(query.dtype).transpose(0, 1))
            continue
        q = q.to(k.dtype)  # a float32 pool under a lower-precision model (``SlotKVCache(float32_rows=True)``)
        pieces = []
        if causal:  # a prefill's causal rows: no mask (7x faster than the folded mask at 2000 tokens)
            pieces.append(_sdpa(q[:, :causal], k[:, :causal], v[:, :causal], None, scaling, groups, is_causal=True))
        if causal < n:
            rest = None if mask is None else mask[causal:]
            grouped = cpu and rest is not None and n - causal > 1
            pieces.append(_sdpa(q[:, causal:], k, v, rest, scaling, groups, fold=not grouped))
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        outs.append(out.to(query.dtype).transpose(0, 1))
    return torch.cat(outs)[None]


def float32_rows_attention(
    # [H, n, D]
    q: torch.Tensor,
    # [Hkv, L, D] float32
    k: torch.Tensor,
    v: torch.Tensor,
    # [n, L] float32 additive, or None
    mask: torch.Tensor | None,
    scaling: float | None,
    groups: int,
) -> torch.Tensor:
    """[H, n, D] float32: a few query rows' attention as plain float32 products over a float32 pool's
    keys (heads folded as in ``_sdpa``). On a 2-core CPU (kernels/NOTES.md) ~50 us per segment and layer
    where SDPA takes ~80 (float32) to ~100 (bfloat16): a draft level's attention, per request."""
    heads, n, dim = q.shape
    kv_heads = k.shape[0]
    scale = dim**-0.5 if scaling is None else scaling
    rows = q.to(torch.float32).reshape(kv_heads, groups * n, dim)
    scores = torch.bmm(rows, k.transpose(1, 2)).mul_(scale)
    if mask is not None:  # [Hkv, groups, n, L] + [n, L]
        scores.view(kv_heads, groups, n, -1).add_(mask)
    return torch.bmm(scores.softmax(-1), v).reshape(heads, n, dim)


def _sdpa(
    # [H, n, D]
    q: torch.Tensor,
    # [Hkv, L, D]
    k: torch.Tensor,
    v: torch.Tensor,
    # [n, L] additive, or None
    mask: torch.Tensor | None,
    scaling: float | None,
    groups: int,
    fold: bool = False,
    is_causal: bool = False,
) -> torch.Tensor:
    """[H, n, D] SDPA of one segment's queries over its keys. ``fold``: the g query heads that share a
    KV head become g x n rows of it (keys never repeated, the mask repeated g times); else SDPA's
    grouped-query mode."""
    heads, n, dim = q.shape
    if fold:
        kv_heads = k.shape[0]
        if mask is not None and groups > 1:
            mask = mask.repeat(groups, 1)
        out = torch.nn.functional.scaled_dot_product_attention(q.reshape(kv_heads, groups * n, dim), k, v, attn_mask=mask, scale=scaling)
        return out.reshape(heads, n, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=groups > 1
    )
    return out[0]


def _kernel_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, meta: BatchAttention, scaling: float | None) -> torch.Tensor:
    """A verify pass through a tree-attention kernel. The Triton kernel reads every request's keys in
    place from its slot of the pool; the other backends take a packed key layout, so each segment's slot
    is gathered into it (a copy per layer: ``gathered_kernel_attention``, also the reference the
    in-place path is tested against)."""
    if meta.kernel == "triton":
        from spruce.kernels.tree_attention import tree_attention_slots

        assert meta.tree_mask is not None and meta.cu_seqlens_q is not None
        assert meta.slots is not None and meta.kv_lens is not None
        longest = meta.derived.get("longest")
        if longest is None:  # once per pass, not per layer (the launch's host time is the kernel's floor)
            longest = meta.derived["longest"] = (
                max(n for _, n, *_ in meta.parts),
                max(length for *_, length, _ in meta.parts),
                meta.derived.get("longest_tree", max(n for _, n, *_ in meta.parts)),
            )
        out, _ = tree_attention_slots(
            query[0].transpose(0, 1), key, value, meta.tree_mask, meta.cu_seqlens_q, meta.slots, meta.kv_lens, scaling,
            max_seqlen_q=longest[0], max_seqlen_k=longest[1], tree_lens=meta.tree_lens, max_tree=longest[2],
        )
        return out[None]
    if meta.tree_lens is not None:
        raise ValueError(f"only the triton backend takes trees longer than their queries (a draft level), not {meta.kernel!r}")
    return gathered_kernel_attention(query, key, value, meta, scaling)


def gathered_kernel_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, meta: BatchAttention, scaling: float | None) -> torch.Tensor:
    """[1, T, H, D]: each segment's slot gathered into the packed [sum(P_i + N_i), Hkv, D] key layout,
    then the kernel backend ``meta.kernel`` over it."""
    assert meta.kernel is not None and meta.tree_mask is not None
    assert meta.cu_seqlens_q is not None and meta.cu_seqlens_k is not None
    k = torch.cat([key[slot, :, :length].transpose(0, 1) for _, _, slot, length, _ in meta.parts])
    v = torch.cat([value[slot, :, :length].transpose(0, 1) for _, _, slot, length, _ in meta.parts])
    q = query[0].transpose(0, 1)
    if meta.kernel == "flex":  # its block mask depends on the pass's layout only: built once per pass
        from spruce.kernels.flex_backend import flex_tree_attention, tree_block_mask

        if "flex_block_mask" not in meta.derived:
            meta.derived["flex_block_mask"] = tree_block_mask(
                meta.tree_mask, meta.cu_seqlens_q, meta.cu_seqlens_k, q.shape[0], k.shape[0], q.device
            )
        out, _ = flex_tree_attention(
            q, k, v, meta.tree_mask, meta.cu_seqlens_q, meta.cu_seqlens_k, scaling, block_mask=meta.derived["flex_block_mask"]
        )
        return out[None]
    fn = kernel_backends.get(meta.kernel)
    out, _ = fn(q, k, v, meta.tree_mask, meta.cu_seqlens_q, meta.cu_seqlens_k, scaling)
    return out[None]


def use_backend(model: PreTrainedModel, name: str) -> None:
    """Route ``model``'s attention through ``tree_attention_forward``. For a kernel backend, a tree pass
    must carry its metadata (it raises otherwise); for "sdpa", a pass without metadata keeps
    transformers' own SDPA path with the mask it was given, and packed passes work as with any backend."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    chosen = PACKED_NAME if name == "sdpa" else ATTENTION_NAME
    AttentionInterface.register(chosen, tree_attention_forward)
    AttentionMaskInterface.register(chosen, sdpa_mask)
    if model.config._attn_implementation != chosen:
        model.set_attn_implementation(chosen)


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
