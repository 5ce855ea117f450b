"""A pre-allocated KV pool of per-request slots, and ragged packed forward passes over it.

Many requests share one forward: their new tokens are flattened into one [1, T] query (``Segment`` i
owns query rows ``offsets[i] .. offsets[i+1]``), each segment writes its keys and values into its own
slot of the pool, and attends, per segment, to that slot's keys with its own visibility. One weight read
serves every request in the pass; that is what makes batching pay on hardware bound by weight reads.

Pool layout, per layer: keys and values [S, Hkv, C, D] (S slots, C positions per slot). A slot's first
``length`` positions are live. Memory is allocated once, at start (``torch.zeros``: on a CPU the pages
are only touched as slots fill); a request gets a slot when it is admitted and gives it back the moment
it ends, however it ends.

Visibility of a segment of n new tokens written at slot positions ``start .. start + n - 1``:
- keys ``[0, full)`` are visible to every query (the committed prefix);
- keys ``[full, start + n)`` (tree nodes cached earlier, then the new tokens) follow ``tail``, an
  [n, start + n - full] bool matrix; ``tail=None`` means causal (query j sees keys up to ``start + j``).
A tree verify pass is ``full = start`` and ``tail`` = the tree's ancestor mask; a prefill is causal.

RoPE positions are given per token (``positions``) and are independent of slot positions: tree nodes at
one depth share a position but occupy different slots.

This drives a transformers model through two documented seams: a prepared 4D ``attention_mask`` (the
model's mask builders pass it through instead of building one) and an attention function registered
with ``AttentionInterface`` (``spruce.attention``), which receives the ``BatchAttention`` metadata of
the pass. The model calls ``update`` on the cache object once per layer, as it does with its own caches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from spruce.modeling import cache_kwarg

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from spruce.lean import LeanDecoder


# positions a slot keeps beyond a request's context: the tree nodes of one pass (verify) or of the
# expanded levels (draft) are written after the committed tokens before the accepted ones are kept
TREE_RESERVE = 256
# the most query rows of a segment that a float32-rows pool's passes attend to by the plain float32
# computation (``SlotKVCache(float32_rows=True)``): a draft level's frontier or a few pending tokens;
# longer feeds (catch-ups) go through SDPA
FLOAT32_ROWS_MAX = 16


class PoolExhaustedError(RuntimeError):
    """No free slot, or a slot would overflow its capacity (callers check before they ask)."""


@dataclass(frozen=True, eq=False)
class Segment:
    """One request's part of a packed pass."""

    slot: int
    # [n] int64 token ids
    tokens: torch.Tensor
    # [n] int64 RoPE positions
    positions: torch.Tensor
    # keys [0, full) are visible to every query of the segment; None: the slot's length before the pass
    full: int | None = None
    # [n, start + n - full] bool visibility of the tail keys; None: causal
    tail: torch.Tensor | None = None
    # which logits rows the caller wants back: "all", "last", "none", or an int k (the last k rows)
    logits: str | int = "all"


@dataclass(frozen=True, eq=False)
class BatchAttention:
    """What the attention function needs for one packed pass (built once, used by every layer)."""

    # per segment: (first query row, query rows, slot, keys after the write, additive mask or None)
    parts: tuple[tuple[int, int, int, int, torch.Tensor | None], ...]
    # a tree-attention kernel (``spruce.kernels.backend``) instead of SDPA per segment: its name, the
    # [T, W] int64 ancestor bitmask of every query within its own tree, and ragged query / key offsets
    kernel: str | None = None
    tree_mask: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    # [B] int32 slot and key count (prefix + tree) of each segment, for kernels that read the pool in place
    slots: torch.Tensor | None = None
    kv_lens: torch.Tensor | None = None
    # [B] int32 tree keys of each segment when some tree is longer than its queries (a draft level: the
    # new frontier after the nodes cached earlier); None: each tree is its queries
    tree_lens: torch.Tensor | None = None
    # what a backend derives from this pass's layout once and reuses in every layer (flex: its block mask)
    derived: dict = field(default_factory=dict)
    # per segment: its leading query rows that are a plain causal prefill from the slot's first position
    # (row i sees keys 0..i): on a CPU, SDPA's own causal path serves them without a mask
    # (``packed_attention``); 0 everywhere for pools on other devices
    causal_rows: tuple[int, ...] = ()
    # segments of at most ``FLOAT32_ROWS_MAX`` rows and no causal prefill attend by a plain float32
    # computation over the pool's float32 keys (``SlotKVCache(float32_rows=True)``)
    float32_rows: bool = False


class SlotKVCache:
    """The KV pool of one model: ``num_slots`` slots of ``capacity`` positions each."""

    def __init__(self, model: PreTrainedModel, num_slots: int, capacity: int, shards: int = 1, float32_rows: bool = False) -> None:
        """``shards``: the model's heads are split over that many tensor-parallel ranks; this rank's pool
        holds its share of the key/value heads. ``float32_rows`` (used on a CPU only): the pool holds
        float32 keys and values whatever the model computes in, and passes' segments of a few rows attend
        by a plain float32 computation instead of SDPA (``spruce.attention.float32_rows_attention``): for a
        draft, whose few-row levels pay SDPA's ~60-100 us per segment and layer in bfloat16, ~50 this
        way (kernels/NOTES.md)."""
        cfg = model.config
        layers = int(cfg.num_hidden_layers)
        heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads) // shards
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        if num_slots < 1 or capacity < 2:
            raise ValueError(f"a KV pool needs at least 1 slot and 2 positions, got {num_slots} x {capacity}")
        shape = (num_slots, heads, capacity, head_dim)
        self.float32_rows = float32_rows and model.device.type == "cpu"
        dtype = torch.float32 if self.float32_rows else model.dtype
        # never read beyond a slot's length, so left uninitialised: on a CPU the pages stay untouched (and
        # take no memory) until slots fill
        self.keys = [torch.empty(shape, dtype=dtype, device=model.device) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=model.device) for _ in range(layers)]
        self.num_slots = num_slots
        self.capacity = capacity
        self.lengths = [0] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        # set by ``begin`` for the pass in flight: where each new token's key goes
        self._slot_index = torch.zeros(0, dtype=torch.long)
        self._pos_index = torch.zeros(0, dtype=torch.long)
        self.bytes_per_position = 2 * layers * heads * head_dim * self.keys[0].element_size()

    # ---- slots --------------------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def used_positions(self) -> int:
        return sum(self.lengths)

    def allocate(self) -> int:
        if not self._free:
            raise PoolExhaustedError(f"all {self.num_slots} KV slots are in use")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        """Give a slot back (its contents are simply overwritten by the next owner)."""
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self.lengths[slot] = 0
        self._free.append(slot)

    @torch.inference_mode()
    def keep(self, slot: int, start: int, keep: list[int]) -> None:
        """Keep positions ``[0, start)`` and ``start + keep[i]`` (moved to ``start + i``); drop the rest."""
        length = self.lengths[slot]
        if any(not 0 <= k < length - start for k in keep):
            raise IndexError(f"keep {keep} out of range for slot {slot}'s tail of {length - start}")
        if keep != list(range(len(keep))):
            src = torch.tensor(keep, dtype=torch.long, device=self.keys[0].device) + start
            for pool in (*self.keys, *self.values):
                # advanced indexing on the right copies first: overlapping source and destination is safe
                pool[slot, :, start : start + len(keep)] = pool[slot, :, src]
        self.lengths[slot] = start + len(keep)

    # ---- one packed pass ----------------------------------------------------------------------------

    def begin(self, segments: list[Segment], kernel: str | None = None) -> BatchAttention:
        """Reserve the positions the pass writes and build its attention metadata (additive masks in the
        pool's dtype, which attention runs in). ``kernel``: a tree
        pass for that tree-attention backend (``tree_segment``: every key before ``full`` visible, the
        rest by the segment's ``tail``); its segments need no additive masks."""
        device = self.keys[0].device
        slots, poss, parts, causal = [], [], [], []
        offset = 0
        for seg in segments:
            n = int(seg.tokens.numel())
            start = self.lengths[seg.slot]
            if start + n > self.capacity:
                raise PoolExhaustedError(f"slot {seg.slot} holds {start} positions; {n} more exceed its {self.capacity}")
            slots.append(torch.full((n,), seg.slot, dtype=torch.long))
            poss.append(torch.arange(start, start + n))
            mask = _segment_mask(seg, start, n)
            causal.append(_causal_rows(mask) if device.type == "cpu" and start == 0 and mask is not None else 0)
            additive = None if mask is None or kernel is not None else _additive(mask, self.keys[0].dtype, device)
            parts.append((offset, n, seg.slot, start + n, additive))
            offset += n
        self._slot_index = torch.cat(slots).to(device)
        self._pos_index = torch.cat(poss).to(device)
        meta = BatchAttention(tuple(parts), causal_rows=tuple(causal), float32_rows=self.float32_rows and kernel is None)
        if kernel is not None:
            meta = _kernel_metadata(meta, segments, kernel, device)
        for seg in segments:
            self.lengths[seg.slot] += int(seg.tokens.numel())
        return meta

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' cache hook: write this layer's new [1, Hkv, T, D] keys and values into their
        slots; returns the whole pool of this layer (the attention function reads its slots)."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[self._slot_index, :, self._pos_index] = key[0].transpose(0, 1).to(keys.dtype)
        values[self._slot_index, :, self._pos_index] = value[0].transpose(0, 1).to(values.dtype)
        return keys, values


def tree_segment(seg: Segment, start: int) -> torch.Tensor | None:
    """[n, t] bool: the visibility of segment ``seg`` (written at slot position ``start``) over its last
    t = start + n - full keys, every earlier key visible to every query: what a tree-attention kernel
    takes. One token or a causal run is a chain. None if the tail is no such block."""
    n = int(seg.tokens.numel())
    full = start if seg.full is None else seg.full
    width = start + n - full
    if seg.tail is None:
        return torch.ones(n, width, dtype=torch.bool).tril(width - n)
    tail = seg.tail.to(torch.bool).cpu()
    return tail if tuple(tail.shape) == (n, width) else None


def _kernel_metadata(meta: BatchAttention, segments: list[Segment], kernel: str, device: torch.device) -> BatchAttention:
    from spruce.kernels.reference import WORD_BITS, pack_bitmask

    trees = []
    for seg, (_, n, _, length, _) in zip(segments, meta.parts):
        tree = tree_segment(seg, length - n)
        if tree is None:
            raise ValueError("a kernel pass takes tree segments only: visible keys, then a tail over the last ones")
        trees.append(tree)
    words = max(1, -(-max(t.shape[1] for t in trees) // WORD_BITS))
    cu_q, cu_k = [0], [0]
    for _, n, _, length, _ in meta.parts:
        cu_q.append(cu_q[-1] + n)
        cu_k.append(cu_k[-1] + length)
    longer = any(t.shape[1] != t.shape[0] for t in trees)
    return BatchAttention(
        meta.parts,
        kernel,
        torch.cat([pack_bitmask(t, words) for t in trees]).to(device),
        torch.tensor(cu_q, dtype=torch.int32, device=device),
        torch.tensor(cu_k, dtype=torch.int32, device=device),
        torch.tensor([slot for _, _, slot, _, _ in meta.parts], dtype=torch.int32, device=device),
        torch.tensor([length for *_, length, _ in meta.parts], dtype=torch.int32, device=device),
        torch.tensor([t.shape[1] for t in trees], dtype=torch.int32, device=device) if longer else None,
        derived={"longest_tree": max(t.shape[1] for t in trees)},
    )


def wanted_rows(seg: Segment, n: int) -> int:
    """How many of the segment's last logits rows the caller wants (``Segment.logits``)."""
    return seg.logits if isinstance(seg.logits, int) else {"all": n, "last": 1, "none": 0}[seg.logits]


def _segment_mask(seg: Segment, start: int, n: int) -> torch.Tensor | None:
    """[n, start + n] bool visibility, or None when every query sees every key (one-token decode)."""
    full = start if seg.full is None else seg.full
    if not 0 <= full <= start:
        raise ValueError(f"full={full} must lie within the slot's {start} cached positions")
    width = start + n - full
    if seg.tail is None:
        if n == 1:
            return None
        tail = torch.ones(n, width, dtype=torch.bool).tril(width - n)
    else:
        tail = seg.tail.to(torch.bool).cpu()
        if tail.shape != (n, width):
            raise ValueError(f"tail visibility must be [{n}, {width}], got {list(tail.shape)}")
        if bool(tail.all()):
            return None
    return torch.cat([torch.ones(n, full, dtype=torch.bool), tail], dim=1)


def _causal_rows(visible: torch.Tensor) -> int:
    """How many leading rows of a [n, n] visibility (a segment written from position 0) are causal."""
    n = visible.shape[0]
    same = (visible == torch.ones(n, n, dtype=torch.bool).tril()).all(dim=1)
    return int(same.int().cumprod(0).sum())


def _additive(visible: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(visible.shape, dtype=dtype)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask.to(device)


@torch.inference_mode()
def run_packed(
    # a model on spruce's attention function, or its ``spruce.lean.LeanDecoder``
    model: PreTrainedModel | LeanDecoder,
    cache: SlotKVCache,
    segments: list[Segment],
    kernel: str | None = None,
    device_logits: bool = False,
) -> list[torch.Tensor]:
    """One forward of ``model`` over every segment; returns each segment's requested logits rows as
    float32 [rows, V] (CPU): all rows, the last one or last k, or none (an empty tensor).
    ``device_logits``: the rows stay where the model ran, in its dtype (a verify pass over many trees
    need not copy every row's logits to the host: greedy acceptance needs only their argmax).

    The model must have been switched to ``spruce.attention``'s attention function (``use_backend``).
    ``kernel``: a tree-attention backend name for a verify pass (tree segments only); None or "sdpa":
    SDPA per segment on views of the pool.
    """
    if not segments:
        return []
    meta = cache.begin(segments, None if kernel in (None, "sdpa") else kernel)
    tokens = torch.cat([s.tokens for s in segments])
    positions = torch.cat([s.positions for s in segments])
    rows: list[int] = []
    spans: list[tuple[int, int]] = []
    for (offset, n, *_), seg in zip(meta.parts, segments):
        wanted = range(offset + n - wanted_rows(seg, n), offset + n)
        spans.append((len(rows), len(rows) + len(wanted)))
        rows.extend(wanted)
    device = model.device
    # a prepared 4D mask is passed through as is by transformers' mask builders (the attention function
    # reads the pass's own masks from ``spruce_batch``): this placeholder only stops them building one
    placeholder = torch.zeros(1, 1, 1, 1, dtype=model.dtype, device=device)
    out = model(
        input_ids=tokens[None].to(device),
        position_ids=positions[None].to(device),
        attention_mask=placeholder,
        use_cache=True,
        logits_to_keep=torch.tensor(rows or [0], dtype=torch.long, device=device),
        spruce_batch=meta,
        **{cache_kwarg(type(model)): cache},
    )
    if not rows:
        logits = torch.zeros(0, 0)
    else:
        logits = out.logits[0] if device_logits else out.logits[0].float().cpu()
    return [logits[a:b] for a, b in spans]

