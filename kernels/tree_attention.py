"""Tree attention in Triton: one pass over prefix + tree keys, the tree mask as ancestor bitmasks.

Glossary: B requests, Tq packed tree queries (all requests' nodes, request after request), Tk packed keys,
H query heads, Hkv key/value heads (GQA: G = H // Hkv query heads per key/value head), D head dim,
W = ceil(max tree size / 64) int64 mask words per query.

Layout (``cu_seqlens`` style, as flash-attn's varlen API): request b owns queries
``cu_q[b] .. cu_q[b+1]`` (its N_b tree nodes, root first) and keys ``cu_k[b] .. cu_k[b+1]``: its prefix
of P_b = K_b - N_b committed tokens, then its N_b tree nodes in the same order as the queries. A query
sees its whole prefix, and tree key j iff bit j of its mask words is set (``mask[i, j // 64] >> (j % 64)``):
the node's ancestors and itself. Any tree size works (W words per query); 64 nodes fit one word.
``tree_attention_slots`` reads the keys in place from a KV pool instead ([S, Hkv, C, D], as
``spruce.kvcache.SlotKVCache`` keeps them): request b's keys are ``pool[slots[b], :, :kv_lens[b]]``, so a
batched verify pass needs no gather of every request's cache into a packed copy.

Kernel (FlashAttention-2 style): each program takes one key/value head of one request and a block of
rows, a row being (tree node, query head of that group), so every key block is loaded once for all G
heads that read it. With few such programs (small batches, the usual decode case) the keys are split
into ranges run by separate programs and the partial results merged by log-sum-exp (flash-decoding). It streams the keys in blocks with an online softmax in base 2 (exp2, the scale
folded with log2 e), first the prefix without any mask work, then the tree keys with the bit test.
Returns the output and the natural-log log-sum-exp per (query, head), so partial results over other
key sets can be merged exactly (see ``kernels.flash_backend.merge``).

Under ``TRITON_INTERPRET=1`` (CPU tests) ``tl.dot`` on bfloat16 multiplies raw bit patterns
(triton-lang/triton#11584): operands are upcast to float32 there. On a GPU, float32 inputs follow
``torch.get_float32_matmul_precision()`` as torch's own float32 matrix products do: ``"highest"`` (torch's
default) computes the dots in full float32 (``input_precision="ieee"``), ``"high"``/``"medium"`` allow
TF32. Triton's own default, TF32 always, made a float32 engine on a GPU differ from its float32 SDPA twin
by TF32 rounding (2e-3 at the kernel's output): enough to flip near-tied greedy tokens.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# log2(e): exp(x) == exp2(x * LOG2E); the kernel works in base 2.
LOG2E = 1.4426950408889634
# bits per mask word (int64).
WORD_BITS = 64


@triton.jit
def _tree_attn_kernel(
    Q, K, V, O, LSE, MASK,
    CU_Q, CU_K, SLOTS, TREE_LENS,
    stride_qt, stride_qh, stride_ks, stride_kt, stride_kh, stride_vs, stride_vt, stride_vh,
    stride_os, stride_ot, stride_oh, stride_ls, stride_lt,
    stride_mt,
    qk_scale,  # softmax scale * log2(e)
    num_splits,
    split_len,  # keys per split, a multiple of BLOCK_N
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SLOTTED: tl.constexpr,
    HAS_TREE_LENS: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    block_m = pid // num_splits
    split = pid % num_splits
    q_start = tl.load(CU_Q + b)
    n_q = tl.load(CU_Q + b + 1) - q_start
    if SLOTTED:
        # keys in place in a KV pool [slots, Hkv, capacity, D]: request b reads slot SLOTS[b], its
        # first CU_K[b] positions (a length per request, not an offset)
        slot = tl.load(SLOTS + b).to(tl.int64)
        n_k = tl.load(CU_K + b)
        K = K + slot * stride_ks
        V = V + slot * stride_vs
    else:
        k_start = tl.load(CU_K + b)
        n_k = tl.load(CU_K + b + 1) - k_start
        K = K + k_start.to(tl.int64) * stride_kt
        V = V + k_start.to(tl.int64) * stride_vt
    # the tree part: the last t_len keys (the queries are its last n_q nodes; t_len = n_q for a verify pass)
    if HAS_TREE_LENS:
        t_len = tl.load(TREE_LENS + b)
    else:
        t_len = n_q
    prefix = n_k - t_len
    if block_m * BLOCK_M >= n_q * GROUP:
        return
    # this program's keys: [lo, hi) of the request's prefix + tree
    lo = split * split_len
    hi = tl.minimum(lo + split_len, n_k)
    # rows: (node, head in group), node-major
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    node = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    row_ok = rows < n_q * GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + (q_start + node)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)

    # the prefix: every key visible. Whole blocks need no mask at all (rows past the last node have
    # q = 0: finite scores, never stored); only the last, partial block checks its bounds
    prefix_hi = tl.minimum(hi, prefix)
    full_hi = lo + (tl.maximum(prefix_hi - lo, 0) // BLOCK_N) * BLOCK_N
    for start in range(lo, full_hi, BLOCK_N):
        m_i, l_i, acc = _attend_full_block(
            q, K, V, start + offs_n, kvh, m_i, l_i, acc,
            stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, offs_d, d_ok, UPCAST, DOT_PRECISION, BLOCK_D == HEAD_DIM,
        )
    if full_hi < prefix_hi:
        cols = full_hi + offs_n
        visible = (cols < prefix_hi)[None, :] & row_ok[:, None]
        m_i, l_i, acc = _attend_block(
            q, K, V, cols, kvh, visible, m_i, l_i, acc,
            stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, offs_d, d_ok, UPCAST, DOT_PRECISION,
        )
    # the tree: key j visible iff bit j of the query node's ancestor mask is set
    tree_hi = hi - prefix
    for start in range(tl.maximum(lo, prefix) - prefix, tree_hi, BLOCK_N):
        j = start + offs_n
        j_ok = j < tree_hi
        if BLOCK_N <= 64:
            # the block spans at most two mask words: load them once per row, not once per (row, key)
            w0 = start // 64
            last_w = (tl.minimum(start + BLOCK_N, tree_hi) - 1) // 64
            row_words = MASK + (q_start + node) * stride_mt
            word0 = tl.load(row_words + w0, mask=row_ok, other=0)
            word1 = tl.load(row_words + w0 + 1, mask=row_ok & (last_w > w0), other=0)
            words = tl.where(((j // 64) == w0)[None, :], word0[:, None], word1[:, None])
        else:
            word_ptrs = MASK + (q_start + node)[:, None] * stride_mt + (j // 64)[None, :]
            words = tl.load(word_ptrs, mask=row_ok[:, None] & j_ok[None, :], other=0)
        bits = (words >> (j % 64).to(tl.int64)[None, :]) & 1
        visible = (bits != 0) & j_ok[None, :] & row_ok[:, None]
        m_i, l_i, acc = _attend_block(
            q, K, V, prefix + j, kvh, visible, m_i, l_i, acc,
            stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, offs_d, d_ok, UPCAST, DOT_PRECISION,
        )

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = O + split * stride_os + (q_start + node)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    # base-2 log-sum-exp times ln 2: the natural-log LSE (-inf where this split saw no key)
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(LSE + split * stride_ls + (q_start + node) * stride_lt + head, lse, mask=row_ok)


@triton.jit
def _attend_full_block(
    q, K, V, key_rows, kvh, m_i, l_i, acc,
    stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, offs_d, d_ok, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_D: tl.constexpr,
):
    """One key block that every row sees: no visibility mask, no -inf handling (scores are finite)."""
    k_ptrs = K + key_rows[None, :] * stride_kt + kvh * stride_kh + offs_d[:, None]
    v_ptrs = V + key_rows[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :]
    if EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_block(
    q, K, V, key_rows, kvh, visible, m_i, l_i, acc,
    stride_kt, stride_kh, stride_vt, stride_vh, qk_scale, offs_d, d_ok, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One key block of the online softmax; ``visible`` [BLOCK_M, BLOCK_N] says which scores count."""
    key_ok = tl.max(visible.to(tl.int32), 0) > 0
    k = tl.load(
        K + key_rows[None, :] * stride_kt + kvh * stride_kh + offs_d[:, None],
        mask=key_ok[None, :] & d_ok[:, None], other=0.0,
    )
    v = tl.load(
        V + key_rows[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
        mask=key_ok[:, None] & d_ok[None, :], other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # rows that have seen nothing yet keep m = -inf: shift by 0 there to avoid inf - inf
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _merge_kernel(
    OUT_PART, LSE_PART, O, LSE,
    num_splits,
    stride_ps, stride_ls,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One (query, head) row: the exact softmax over all key splits, each split's output weighted by
    exp(lse_s - lse) (splits that saw no key have lse -inf and weight 0)."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < num_splits
    lse = tl.load(LSE_PART + offs_s * stride_ls + row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)
    total = tl.sum(w, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    part = tl.load(
        OUT_PART + offs_s[:, None] * stride_ps + row * HEAD_DIM + offs_d[None, :],
        mask=s_ok[:, None] & d_ok[None, :], other=0.0,
    )
    total_safe = tl.where(total > 0, total, 1.0)
    out = tl.sum(part * w[:, None], 0) / total_safe
    tl.store(O + row * HEAD_DIM + offs_d, out.to(O.dtype.element_ty), mask=d_ok)
    tl.store(LSE + row, tl.where(total > 0, m_safe + tl.log(total_safe), float("-inf")))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Host-side integer helpers. The launch runs once per layer of every pass, and its host time is the
# kernel's floor at decode sizes (kernels/NOTES.md, v4: 145 us a call on an H200's host against ~35 us
# for an SDPA call): ``triton.cdiv`` and ``triton.next_power_of_2`` are Triton constexpr functions there,
# several microseconds a call in host code; these are plain Python.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def tree_attention(
    # [Tq, H, D] packed tree queries (last dim contiguous)
    q: torch.Tensor,
    # [Tk, Hkv, D] packed keys: each request's prefix, then its tree nodes
    k: torch.Tensor,
    # [Tk, Hkv, D]
    v: torch.Tensor,
    # [Tq, W] int64 ancestor-or-self bitmask of each query node over its request's tree
    tree_mask: torch.Tensor,
    # [B+1] int32 query offsets
    cu_seqlens_q: torch.Tensor,
    # [B+1] int32 key offsets
    cu_seqlens_k: torch.Tensor,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    tree_lens: torch.Tensor | None = None,
    max_tree: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ([Tq, H, D] output in q's dtype, [Tq, H] float32 natural-log log-sum-exp).

    ``num_splits`` > 1 splits every request's keys into that many ranges handled by separate programs
    (flash-decoding), merged exactly by log-sum-exp; None picks it from the GPU's size (1 on CPU).
    ``max_seqlen_q`` / ``max_seqlen_k``: the longest request's tree and keys, when the caller knows them
    (saves reading the offsets back from the GPU, a synchronization).
    ``tree_lens`` ([B] int32): request b's tree is its last ``tree_lens[b]`` keys and its queries are
    the tree's last nodes (a draft level: the new frontier after nodes cached earlier); mask words then
    cover ``tree_lens[b]`` bits. None: the tree is the queries themselves. ``max_tree``: its largest
    value, when the caller knows it."""
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"packed k and v must be [Tk, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    max_k = max_seqlen_k if max_seqlen_k is not None else _longest(cu_seqlens_k)
    # packed keys as a pool of one slot: (slot, token, head) strides
    ks, vs = k.stride(), v.stride()
    k_strides = (0, ks[0], ks[1])
    v_strides = (0, vs[0], vs[1])
    return _launch(q, k, v, k_strides, v_strides, tree_mask, cu_seqlens_q, cu_seqlens_k, None, max_k,
                   scale, block_m, block_n, num_splits, max_seqlen_q, num_warps, num_stages, tree_lens, max_tree)


def tree_attention_slots(
    # [Tq, H, D] packed tree queries (last dim contiguous)
    q: torch.Tensor,
    # [S, Hkv, C, D] a KV pool (``spruce.kvcache.SlotKVCache``): request b's keys are
    # k_pool[slots[b], :, :kv_lens[b]], its prefix then its tree nodes
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    # [Tq, W] int64 ancestor-or-self bitmask of each query node over its request's tree
    tree_mask: torch.Tensor,
    # [B+1] int32 query offsets
    cu_seqlens_q: torch.Tensor,
    # [B] int32 slot of each request
    slots: torch.Tensor,
    # [B] int32 keys of each request (prefix + tree)
    kv_lens: torch.Tensor,
    scale: float | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_splits: int | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    tree_lens: torch.Tensor | None = None,
    max_tree: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tree_attention`` reading each request's keys in place from its slot of a KV pool (no gather
    into a packed copy). Same outputs."""
    if k_pool.dim() != 4 or v_pool.shape != k_pool.shape:
        raise ValueError(f"k_pool and v_pool must be [S, Hkv, C, D], got {tuple(k_pool.shape)} and {tuple(v_pool.shape)}")
    batch = cu_seqlens_q.numel() - 1
    if slots.shape != (batch,) or kv_lens.shape != (batch,):
        raise ValueError(f"slots and kv_lens must be [{batch}], got {tuple(slots.shape)} and {tuple(kv_lens.shape)}")
    max_k = max_seqlen_k if max_seqlen_k is not None else (int(kv_lens.max()) if batch else 0)
    if max_k > k_pool.shape[2]:
        raise ValueError(f"a request reads {max_k} keys from slots of {k_pool.shape[2]} positions")
    ks, vs = k_pool.stride(), v_pool.stride()
    k_strides = (ks[0], ks[2], ks[1])
    v_strides = (vs[0], vs[2], vs[1])
    return _launch(q, k_pool, v_pool, k_strides, v_strides, tree_mask, cu_seqlens_q, kv_lens, slots, max_k,
                   scale, block_m, block_n, num_splits, max_seqlen_q, num_warps, num_stages, tree_lens, max_tree)


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    # (slot, token, head) element strides of k and v
    k_strides: tuple[int, int, int],
    v_strides: tuple[int, int, int],
    tree_mask: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    # packed: [B+1] key offsets; slotted: [B] key lengths
    keys: torch.Tensor,
    slots: torch.Tensor | None,
    max_k: int,
    scale: float | None,
    block_m: int | None,
    block_n: int | None,
    num_splits: int | None,
    max_seqlen_q: int | None,
    num_warps: int | None,
    num_stages: int | None,
    tree_lens: torch.Tensor | None = None,
    max_tree: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    tq, h, d = q.shape
    hkv = k.shape[-3] if slots is not None else k.shape[1]
    if h % hkv:
        raise ValueError(f"{h} query heads do not group over {hkv} key/value heads")
    if tree_mask.dtype != torch.int64 or tree_mask.shape[0] != tq:
        raise ValueError(f"tree_mask must be int64 [{tq}, W], got {tuple(tree_mask.shape)} {tree_mask.dtype}")
    q_strides = q.stride()
    if q_strides[-1] != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v need a contiguous last (head) dimension")
    batch = cu_seqlens_q.numel() - 1
    max_q = max_seqlen_q if max_seqlen_q is not None else _longest(cu_seqlens_q)
    if tree_lens is not None and tree_lens.shape != (batch,):
        raise ValueError(f"tree_lens must be [{batch}], got {tuple(tree_lens.shape)}")
    if max_tree is None:
        max_tree = max_q if tree_lens is None else (int(tree_lens.max()) if batch else 0)
    if max_tree > tree_mask.shape[1] * WORD_BITS:
        raise ValueError(f"a tree of {max_tree} nodes needs {math.ceil(max_tree / WORD_BITS)} mask words, got {tree_mask.shape[1]}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group = h // hkv
    if block_m is None:
        # 64-row programs with Triton's default warps and stages: on an H200 (kernels/NOTES.md, v3)
        # faster than 128-row ones with 8 warps at every measured shape once the tree part loads one
        # mask word per row (v2, before that change, had favoured 128 rows at T = 64)
        block_m = 64
    row_blocks = _cdiv(max(max_q * group, 1), block_m)
    if num_splits is None or block_n is None:
        auto_splits, auto_block_n = _default_launch(q.device, batch * hkv * row_blocks, max_k)
        num_splits = auto_splits if num_splits is None else num_splits
        block_n = auto_block_n if block_n is None else block_n
    split_len = _cdiv(_cdiv(max(max_k, 1), num_splits), block_n) * block_n
    if num_splits == 1:
        out = torch.empty_like(q)[None]
        lse = torch.empty(1, tq, h, dtype=torch.float32, device=q.device)
    else:  # partial results per split, merged below
        out = torch.empty(num_splits, tq, h, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(num_splits, tq, h, dtype=torch.float32, device=q.device)
    if tq == 0:
        return out[0].to(q.dtype), lse[0]
    grid = (row_blocks * num_splits, batch, hkv)
    # launch options (Triton's defaults where not given)
    options = {name: value for name, value in (("num_warps", num_warps), ("num_stages", num_stages)) if value is not None}
    _tree_attn_kernel[grid](
        q, k, v, out, lse, tree_mask,
        cu_seqlens_q, keys, slots if slots is not None else keys, tree_lens if tree_lens is not None else keys,
        q_strides[0], q_strides[1], *k_strides, *v_strides,
        *out.stride()[:3], *lse.stride()[:2],
        tree_mask.stride(0),
        scale * LOG2E,
        num_splits,
        split_len,
        GROUP=group,
        HEAD_DIM=d,
        BLOCK_D=max(16, _pow2(d)),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        UPCAST=_interpreting() or q.dtype == torch.float32,
        DOT_PRECISION=_dot_precision(q.dtype),
        SLOTTED=slots is not None,
        HAS_TREE_LENS=tree_lens is not None,
        **options,
    )
    if num_splits == 1:
        return out[0], lse[0]
    return _merge_splits_kernel(out, lse, q.dtype)


def _dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: full float32 for float32 inputs unless torch allows TF32 for float32
    matrix products (``torch.set_float32_matmul_precision``); for 16-bit inputs it changes nothing."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest" and not _interpreting():
        return "tf32"
    return "ieee"


def _merge_splits_kernel(
    # [S, Tq, H, D] float32 partial outputs (contiguous)
    out: torch.Tensor,
    # [S, Tq, H] float32 partial log-sum-exps (contiguous)
    lse: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_merge_splits`` in one launch (the reference is several torch kernels: on a GPU each launch
    costs more than this small merge itself)."""
    splits, tq, h, d = out.shape
    merged = torch.empty(tq, h, d, dtype=dtype, device=out.device)
    total = torch.empty(tq, h, dtype=torch.float32, device=out.device)
    _merge_kernel[(tq * h,)](
        out, lse, merged, total, splits, out.stride(0), lse.stride(0),
        HEAD_DIM=d, BLOCK_S=max(2, _pow2(splits)), BLOCK_D=max(16, _pow2(d)),
        num_warps=2,
    )
    return merged, total


def _longest(cu_seqlens: torch.Tensor) -> int:
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0


def _merge_splits(
    # [S, Tq, H, D] float32 partial outputs
    out: torch.Tensor,
    # [S, Tq, H] float32 partial log-sum-exps (-inf: the split saw no key)
    lse: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax over all splits: each split's output weighted by its share exp(lse_s - lse)."""
    total = torch.logsumexp(lse, dim=0)
    weights = torch.exp(lse - total[None]).nan_to_num(0.0)
    return (out * weights[..., None]).sum(0).to(dtype), total


# Aim for this many programs per SM before splitting the keys (flash-decoding): a decode-sized batch
# has too few (request, head, row block) programs to keep a GPU busy over long prefixes. Whole waves
# only: rounding the split count up (v4) put B = 1, P = 4096, T = 64 at 9 splits = 288 programs, past
# the 2 x 132 that run at once on an H200, and the last ones ran as a second wave (40 us; 8 splits:
# 26 us; kernels/NOTES.md, "v5", 2026-11-27).
_PROGRAMS_PER_SM = 2
# never split a request's keys into pieces shorter than this (v5 curves at B = 1: P = 512 fastest at
# 4 splits of 144-160 keys; 3 splits of 192 under the v4 rule of 4 blocks of 64 cost 1.5x that)
_MIN_KEYS_PER_SPLIT = 160
# no split at all once there are SMs / _NO_SPLIT_DIVISOR programs or more: on an H200
# (kernels/NOTES.md, v3) split keys were slower than one pass at 64 and 256 programs (up to 1.8x at
# B = 32, P = 512, T = 16; one shape, B = 8, P = 16384, T = 16, lost 12% without them) and 1.2-5x faster
# at 8-32 programs
_NO_SPLIT_DIVISOR = 4
# split keys stream in blocks of 32 up to this many keys, of 64 beyond: at B = 1 (v5 curves) 32-key
# blocks were 1.05-1.5x faster up to P = 4096 and 14% slower at P = 16384, T = 64
_NARROW_BLOCK_MAX_KEYS = 8192
_BLOCK_N = 64

_SM_COUNT: dict[int, int] = {}


def _default_launch(device: torch.device, programs: int, max_k: int) -> tuple[int, int]:
    """(key splits, key block width) for ``programs`` (request, KV head, row block) programs."""
    if device.type != "cuda":
        return 1, _BLOCK_N
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    sms = _SM_COUNT[index]
    if programs * _NO_SPLIT_DIVISOR >= sms:
        return 1, _BLOCK_N
    wanted = _PROGRAMS_PER_SM * sms // max(programs, 1)
    splits = max(1, min(wanted, _cdiv(max_k, _MIN_KEYS_PER_SPLIT)))
    return splits, 32 if splits > 1 and max_k <= _NARROW_BLOCK_MAX_KEYS else _BLOCK_N
