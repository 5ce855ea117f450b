"""CUDA graphs of a model's tree-kernel passes (verify and plain decode) over a ``SlotKVCache``.

Why: an eager pass is host-bound on a GPU. On an H200 an 8B-shaped target's verify pass took 27-54 ms
through the tree kernel while reading its 16 GB of weights takes ~3.8 ms, and the draft's level ~21 ms
(``kernels/NOTES.md``): Python and kernel launches, not the GPU, set the pace. A captured graph replays
every kernel of a pass with one launch.

Shapes are fixed inside a graph, so passes are bucketed by (segments B, longest segment n, total rows T,
keys K), each rounded up to a power of two (K at least ``MIN_KEYS``, at most the pool's capacity), and a
pass is padded to its bucket:
- rows past the real ones belong to no segment: token 0 at position 0, their keys and values written to
  a scratch slot of the pool that no request owns; no query attends to them and their logits are dropped;
- segments past the real ones have no rows and no keys (the scratch slot, length 0): the kernel's programs
  for them return at once.
The tree-attention kernel is launched for n rows per segment and K keys (its grid and its key splits) and
reads every segment's real row offsets, slot and key count from device memory, so one graph serves every
pass of its bucket. The cache's key/value write reads its slot and position indices from device memory
too. A replay needs two host-to-device copies (the pass's int64 and int32 metadata, into the graph's
static buffers) and returns the real rows' logits as a copy (they survive the next replay).

A bucket is captured at its first pass: two eager passes on a side stream (Triton compiles, cuBLAS picks
its kernels), then the capture. Rewriting a pass's keys and values is idempotent (same tokens, same
slots), so the warm-up passes do no harm. A bucket whose capture raises, and every bucket past
``max_graphs`` or past ``max_logits_bytes`` of logits outputs, is left to the caller's eager path
(``run`` returns None).

Reference twin: with ``capture=False`` (a CPU) the same padded static-buffer path runs eagerly; tests
compare it with ``run_packed`` on fresh random inputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from spruce.kvcache import BatchAttention, PoolExhaustedError, Segment, SlotKVCache, tree_segment, wanted_rows
from spruce.modeling import cache_kwarg

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

# the smallest key bucket: shorter contexts share one graph (programs past a request's keys return early)
MIN_KEYS = 256
# bits per tree-mask word (``spruce.kernels.reference.WORD_BITS``)
_WORD_BITS = 64


def _pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class Bucket:
    """The static shape of a captured pass."""

    segments: int
    # query rows of the largest segment
    longest: int
    rows: int
    keys: int
    # keys of the largest tree (its queries, or a draft level's frontier after nodes cached earlier)
    tree: int

    @property
    def words(self) -> int:
        return -(-self.tree // _WORD_BITS)


class _Pass:
    """One bucket's static buffers, the attention metadata built on them, and its graph."""

    def __init__(self, bucket: Bucket, kernel: str, device: torch.device, dtype: torch.dtype) -> None:
        t, b, w = bucket.rows, bucket.segments, bucket.words
        # int64: input ids, positions, the cache write's slot and position indices, the tree mask words
        self.ints = torch.zeros(4 * t + t * w, dtype=torch.long, device=device)
        # int32: query offsets [b + 1], slots [b], key counts [b], tree keys [b]
        self.int32 = torch.zeros(4 * b + 1, dtype=torch.int32, device=device)
        self.input_ids = self.ints[:t].view(1, t)
        self.positions = self.ints[t : 2 * t].view(1, t)
        self.slot_index = self.ints[2 * t : 3 * t]
        self.pos_index = self.ints[3 * t : 4 * t]
        self.meta = BatchAttention(
            (),
            kernel,
            tree_mask=self.ints[4 * t :].view(t, w),
            cu_seqlens_q=self.int32[: b + 1],
            slots=self.int32[b + 1 : 2 * b + 1],
            kv_lens=self.int32[2 * b + 1 : 3 * b + 1],
            tree_lens=self.int32[3 * b + 1 :],
            derived={"longest": (bucket.longest, bucket.keys, bucket.tree)},
        )
        # transformers' mask builders pass a prepared 4D mask through (see ``run_packed``)
        self.placeholder = torch.zeros(1, 1, 1, 1, dtype=dtype, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None


class GraphedPasses:
    """Tree-kernel passes of ``model`` over ``cache``, one CUDA graph per bucket (see the module doc).

    ``run(segments)`` takes what ``run_packed(model, cache, segments, kernel, device_logits=True)`` takes
    for a tree-kernel pass (``spruce.kvcache.tree_segment``: a verify or decode pass, a draft level, a
    short causal feed) and returns the same rows, or None where this pass is not served by a graph."""

    def __init__(
        self,
        model: PreTrainedModel,
        cache: SlotKVCache,
        kernel: str = "triton",
        capture: bool | None = None,
        max_graphs: int = 48,
        max_rows: int = 1024,
        max_logits_bytes: int = 2 << 30,
    ) -> None:
        """``max_graphs`` buckets at most, each of at most ``max_rows`` tokens; every graph keeps its own
        [rows, vocab] logits output (a 1024-row bucket of a 128k vocabulary in bf16: 263 MB), so buckets
        past ``max_logits_bytes`` of those in all run eagerly too."""
        self.model = model
        self.cache = cache
        self.kernel = kernel
        self.capture = model.device.type == "cuda" if capture is None else capture
        self.max_graphs = max_graphs
        self.max_rows = max_rows
        self.max_logits_bytes = max_logits_bytes
        self.logits_bytes = 0
        self._row_bytes = int(model.config.vocab_size) * torch.tensor([], dtype=model.dtype).element_size()
        # padding rows write their keys here; no request ever owns it
        self.scratch = cache.allocate()
        self._passes: dict[Bucket, _Pass | None] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        # passes served (replayed, or run eagerly on the static buffers without capture), replays, captures
        self.passes = 0
        self.replays = 0
        self.captures = 0
        self.failures: list[str] = []

    def bucket(self, segments: list[Segment]) -> Bucket | None:
        """The bucket of a pass, or None if it is no tree-kernel pass or too large for a graph."""
        shaped = self._shape(segments)
        return None if shaped is None else shaped[0]

    def _shape(self, segments: list[Segment]) -> tuple[Bucket, list[torch.Tensor]] | None:
        """The pass's bucket and each segment's tree visibility (``tree_segment``, built once per pass:
        ``_fill`` packs them)."""
        if not segments:
            return None
        trees = []
        for seg in segments:
            tree = tree_segment(seg, self.cache.lengths[seg.slot])
            if tree is None:
                return None
            trees.append(tree)
        sizes = [t.shape[0] for t in trees]
        rows = _pow2(sum(sizes))
        if rows > self.max_rows:
            return None
        keys = max(self.cache.lengths[s.slot] + n for s, n in zip(segments, sizes))
        keys = min(max(MIN_KEYS, _pow2(keys)), self.cache.capacity)
        return Bucket(_pow2(len(segments)), _pow2(max(sizes)), rows, keys, _pow2(max(t.shape[1] for t in trees))), trees

    @property
    def graphs(self) -> int:
        return sum(p is not None and p.graph is not None for p in self._passes.values())

    @torch.inference_mode()
    def run(self, segments: list[Segment]) -> list[torch.Tensor] | None:
        shaped = self._shape(segments)
        if shaped is None:
            return None
        bucket, trees = shaped
        size = bucket.rows * self._row_bytes
        if bucket not in self._passes:
            if len(self._passes) >= self.max_graphs or self.logits_bytes + size > self.max_logits_bytes:
                return None
            p = _Pass(bucket, self.kernel, self.model.device, self.model.dtype)
            total = self._fill(p, bucket, segments, trees)  # before it counts: a pass that does not fit raises here
            self._passes[bucket] = p
            self.logits_bytes += size
            if self.capture:
                try:
                    self._capture(p)
                except Exception as exc:  # noqa: BLE001 - this bucket runs eagerly from now on; the error is kept
                    log.warning("CUDA graph capture failed for %s: %s", bucket, exc)
                    self.failures.append(f"{bucket}: {type(exc).__name__}: {exc}")
                    self._passes[bucket] = None
                    self.logits_bytes -= size
                    return None
        else:
            cached = self._passes[bucket]
            if cached is None:
                return None
            p = cached
            total = self._fill(p, bucket, segments, trees)
        if p.graph is not None:
            p.graph.replay()
            self.replays += 1
        else:
            p.logits = self._forward(p)
        self.passes += 1
        for seg in segments:
            self.cache.lengths[seg.slot] += int(seg.tokens.numel())
        assert p.logits is not None
        logits = p.logits[:total].clone()
        out, offset = [], 0
        for seg in segments:
            n = int(seg.tokens.numel())
            out.append(logits[offset + n - wanted_rows(seg, n) : offset + n])
            offset += n
        return out

    def _fill(self, p: _Pass, bucket: Bucket, segments: list[Segment], trees: list[torch.Tensor]) -> int:
        """Copy the pass's metadata into ``p``'s static buffers; returns its real row count. Built in
        lists and whole tensors (one mask packing for all segments), not per-segment slices: this is
        host time on every pass."""
        from spruce.kernels.reference import WORD_BITS, pack_bitmask

        t, b, w = bucket.rows, bucket.segments, bucket.words
        tokens: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        slots: list[int] = []
        pos_index: list[int] = []
        ends: list[int] = []
        seg_slots: list[int] = []
        lengths: list[int] = []
        widths: list[int] = []
        visible = torch.zeros(t, w * WORD_BITS, dtype=torch.bool)
        row = 0
        for seg, tree in zip(segments, trees):
            n = int(seg.tokens.numel())
            start = self.cache.lengths[seg.slot]
            if start + n > self.cache.capacity:
                raise PoolExhaustedError(f"slot {seg.slot} holds {start} positions; {n} more exceed its {self.cache.capacity}")
            tokens.append(seg.tokens)
            positions.append(seg.positions)
            slots.extend([seg.slot] * n)
            pos_index.extend(range(start, start + n))
            visible[row : row + n, : tree.shape[1]] = tree
            row += n
            ends.append(row)
            seg_slots.append(seg.slot)
            lengths.append(start + n)
            widths.append(tree.shape[1])
        # padding: rows with no segment write to the scratch slot (at positions nothing reads back);
        # segments with no rows read nothing
        pad, empty = t - row, b - len(segments)
        zeros = torch.zeros(pad, dtype=torch.long)
        ints = torch.cat([
            *tokens, zeros,
            *positions, zeros,
            torch.tensor(slots, dtype=torch.long), torch.full((pad,), self.scratch, dtype=torch.long),
            torch.tensor(pos_index, dtype=torch.long), torch.arange(pad) % self.cache.capacity,
            pack_bitmask(visible, w).flatten(),
        ])
        int32 = torch.tensor(
            [0, *ends, *[row] * empty, *seg_slots, *[self.scratch] * empty, *lengths, *[0] * empty, *widths, *[0] * empty],
            dtype=torch.int32,
        )
        p.ints.copy_(ints)
        p.int32.copy_(int32)
        return row

    def _forward(self, p: _Pass) -> torch.Tensor:
        """The model over ``p``'s static buffers; [rows, V] logits in the model's dtype."""
        self.cache._slot_index, self.cache._pos_index = p.slot_index, p.pos_index
        out = self.model(
            input_ids=p.input_ids,
            position_ids=p.positions,
            attention_mask=p.placeholder,
            use_cache=True,
            logits_to_keep=0,
            spruce_batch=p.meta,
            **{cache_kwarg(type(self.model)): self.cache},
        )
        return out.logits[0]

    def _capture(self, p: _Pass) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(p)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            p.logits = self._forward(p)
        p.graph = graph
        self.captures += 1

    def stats(self) -> dict:
        return {
            "graphs": self.graphs,
            "buckets": len(self._passes),
            "logits_bytes": self.logits_bytes,
            "passes": self.passes,
            "replays": self.replays,
            "captures": self.captures,
            "failures": list(self.failures),
        }
