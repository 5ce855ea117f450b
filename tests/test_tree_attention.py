"""Tree-attention backends against the float64 reference (CPU: Triton under TRITON_INTERPRET=1, set in
conftest), and the reference against plain causal attention over each node's root path."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_close
from spruce.kernels.reference import (
    masked_attention,
    pack_bitmask,
    tree_attention_reference,
    unpack_bitmask,
)

# where the kernels run: CI interprets Triton on the CPU; on a GPU machine (the device call) the same
# tests run the compiled kernels, inputs built on the CPU and moved there, results compared on the CPU
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# max abs error allowed per input dtype. float32: the kernel's dots run in full float32 under torch's
# default float32 matmul precision ("highest"); when they ran as TF32 (Triton's default, until
# 2026-11-27) the float32 cases reached 2.1e-3 to 2.8e-3 on an H200 against the float64 reference
TOLERANCE = {torch.float32: 2e-3, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def dev(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.to(DEVICE) for t in tensors]


def host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.cpu() for t in tensors]


def random_ancestors(n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, n] bool ancestor-or-self mask of a random tree (node 0 the root, parents before children)."""
    visible = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        parent = int(torch.randint(0, i, (1,), generator=gen))
        visible[i] |= visible[parent]
    return visible


def make_batch(prefixes: list[int], trees: list[int], h: int, hkv: int, d: int, dtype, seed: int = 0):
    """Packed q/k/v, bitmask and offsets for requests with the given prefix lengths and tree sizes."""
    gen = torch.Generator().manual_seed(seed)
    words = max(1, math.ceil(max(trees) / 64))
    masks, ancestors = [], []
    for n in trees:
        a = random_ancestors(n, gen)
        ancestors.append(a)
        masks.append(pack_bitmask(a, words))
    tq, tk = sum(trees), sum(p + n for p, n in zip(prefixes, trees))
    q = torch.randn(tq, h, d, generator=gen).to(dtype)
    k = torch.randn(tk, hkv, d, generator=gen).to(dtype)
    v = torch.randn(tk, hkv, d, generator=gen).to(dtype)
    cu_q = torch.tensor([0, *torch.tensor(trees).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor([p + n for p, n in zip(prefixes, trees)]).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, torch.cat(masks), cu_q, cu_k, ancestors


def test_bitmask_round_trip_including_the_sign_bit():
    gen = torch.Generator().manual_seed(1)
    for n in (1, 63, 64, 65, 130):
        visible = torch.rand(n, n, generator=gen) < 0.5
        words = pack_bitmask(visible)
        assert words.shape == (n, math.ceil(n / 64)) and words.dtype == torch.int64
        assert torch.equal(unpack_bitmask(words, n), visible)


@pytest.mark.parametrize("seed", range(3))
def test_reference_node_equals_causal_attention_over_its_root_path(seed):
    """Tree attention at node i == causal attention at the end of prefix + i's root path."""
    q, k, v, mask, cu_q, cu_k, ancestors = make_batch([7], [12], h=4, hkv=2, d=16, dtype=torch.float64, seed=seed)
    out, lse = tree_attention_reference(q, k, v, mask, cu_q, cu_k)
    prefix = 7
    for i in range(12):
        path = ancestors[0][i].nonzero().flatten()
        keys = torch.cat([torch.arange(prefix), prefix + path])
        visible = torch.ones(1, keys.numel(), dtype=torch.bool)
        o, l = masked_attention(q[i : i + 1].transpose(0, 1), k[keys].transpose(0, 1), v[keys].transpose(0, 1), visible)
        assert_close(out[i], o[:, 0], atol=1e-12, what=f"node {i} output")
        assert_close(lse[i], l[:, 0], atol=1e-12, what=f"node {i} lse")


triton = pytest.importorskip("triton")

CASES = {
    # name: (prefix lengths, tree sizes, H, Hkv, D)
    "gqa": ([40], [16], 4, 2, 32),
    "no_prefix": ([0], [9], 2, 2, 16),
    "odd_t_and_d": ([13], [5], 3, 1, 24),
    "t64": ([20], [64], 2, 1, 16),
    "two_words": ([8], [70], 2, 2, 16),
    "ragged": ([0, 33, 5], [3, 17, 1], 4, 2, 32),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_matches_reference(case, dtype):
    from spruce.kernels.tree_attention import tree_attention

    prefixes, trees, h, hkv, d = CASES[case]
    q, k, v, mask, cu_q, cu_k, _ = make_batch(prefixes, trees, h, hkv, d, dtype, seed=len(case))
    out, lse = host(*tree_attention(*dev(q, k, v, mask, cu_q, cu_k), block_m=16, block_n=16))
    want, want_lse = tree_attention_reference(q.double(), k.double(), v.double(), mask, cu_q, cu_k)
    assert out.dtype == dtype
    assert_close(out.double(), want, atol=TOLERANCE[dtype], what=f"{case} output")
    assert_close(lse.double(), want_lse, atol=TOLERANCE[dtype] * 4, what=f"{case} lse")


@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("case", ["ragged", "two_words"])
def test_triton_split_keys_match_reference(case, splits):
    """Flash-decoding: keys split across programs, partial results merged by log-sum-exp (some splits of
    the shorter requests are empty)."""
    from spruce.kernels.tree_attention import tree_attention

    prefixes, trees, h, hkv, d = CASES[case]
    q, k, v, mask, cu_q, cu_k, _ = make_batch(prefixes, trees, h, hkv, d, torch.float32, seed=splits)
    out, lse = host(*tree_attention(*dev(q, k, v, mask, cu_q, cu_k), block_m=16, block_n=16, num_splits=splits))
    want, want_lse = tree_attention_reference(q.double(), k.double(), v.double(), mask, cu_q, cu_k)
    assert_close(out.double(), want, atol=TOLERANCE[torch.float32], what=f"{case} output, {splits} splits")
    assert_close(lse.double(), want_lse, atol=TOLERANCE[torch.float32], what=f"{case} lse, {splits} splits")


@pytest.mark.parametrize("case", ["t64", "ragged"])
def test_triton_default_launch_configuration(case):
    """Default block shapes and split choice (1 on CPU) against the reference."""
    from spruce.kernels.tree_attention import tree_attention

    prefixes, trees, h, hkv, d = CASES[case]
    q, k, v, mask, cu_q, cu_k, _ = make_batch(prefixes, trees, h, hkv, d, torch.float32, seed=4)
    out, lse = host(*tree_attention(*dev(q, k, v, mask, cu_q, cu_k)))
    want, want_lse = tree_attention_reference(q.double(), k.double(), v.double(), mask, cu_q, cu_k)
    assert_close(out.double(), want, atol=TOLERANCE[torch.float32], what=f"{case} output, default launch")
    assert_close(lse.double(), want_lse, atol=TOLERANCE[torch.float32], what=f"{case} lse, default launch")


def test_default_launch_follows_the_measured_rule(monkeypatch):
    """Split keys only when programs are scarce (under a quarter of the SMs), into at most as many
    splits as keep 2 programs per SM in one wave, each at least 160 keys long; split keys stream in
    32-key blocks up to 8192 keys (132 SMs: an H100 / H200; kernels/NOTES.md, v5)."""
    from spruce.kernels import tree_attention as ta

    monkeypatch.setitem(ta._SM_COUNT, 0, 132)
    gpu = torch.device("cuda", 0)
    assert ta._default_launch(gpu, programs=8, max_k=528) == (4, 32)  # B = 1, P = 512, T = 16: capped by length
    assert ta._default_launch(gpu, programs=8, max_k=4112) == (26, 32)  # B = 1, P = 4096, T = 16
    assert ta._default_launch(gpu, programs=32, max_k=4160) == (8, 32)  # B = 1, T = 64: 256 programs, one wave
    assert ta._default_launch(gpu, programs=32, max_k=16448) == (8, 64)  # long keys: 64-key blocks
    assert ta._default_launch(gpu, programs=8, max_k=100) == (1, 64)  # too short to split
    assert ta._default_launch(gpu, programs=64, max_k=16448) == (1, 64)  # B = 8: enough programs
    assert ta._default_launch(torch.device("cpu"), programs=1, max_k=16448) == (1, 64)


def test_float32_dots_follow_torch_matmul_precision(monkeypatch):
    """float32 inputs get full-precision dots unless torch allows TF32 for float32 matrix products;
    16-bit inputs are unaffected; the interpreter always computes in full precision."""
    from spruce.kernels import tree_attention as ta

    monkeypatch.setattr(ta, "_interpreting", lambda: False)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert ta._dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert ta._dot_precision(torch.float32) == "tf32"
        assert ta._dot_precision(torch.bfloat16) == "ieee"
        monkeypatch.setattr(ta, "_interpreting", lambda: True)
        assert ta._dot_precision(torch.float32) == "ieee"
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("splits", [1, 3])
def test_triton_tree_blocks_across_mask_words(splits):
    """A key block of the tree that starts inside one mask word and ends in the next (70 nodes after an
    8-token prefix; with 3 splits a split starts mid-word), at the default block size."""
    from spruce.kernels.tree_attention import tree_attention

    q, k, v, mask, cu_q, cu_k, _ = make_batch([8, 3], [70, 66], 2, 1, 16, torch.float32, seed=splits)
    out, lse = host(*tree_attention(*dev(q, k, v, mask, cu_q, cu_k), num_splits=splits))
    want, want_lse = tree_attention_reference(q.double(), k.double(), v.double(), mask, cu_q, cu_k)
    assert_close(out.double(), want, atol=TOLERANCE[torch.float32], what=f"output, {splits} splits")
    assert_close(lse.double(), want_lse, atol=TOLERANCE[torch.float32], what=f"lse, {splits} splits")


def test_triton_rejects_a_mask_too_small_for_the_tree():
    from spruce.kernels.tree_attention import tree_attention

    q, k, v, mask, cu_q, cu_k, _ = make_batch([4], [70], 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="mask words"):
        tree_attention(q, k, v, mask[:, :1], cu_q, cu_k)


def to_pool(k: torch.Tensor, cu_k: torch.Tensor, capacity: int, seed: int):
    """The packed keys scattered into a [S, Hkv, capacity, D] pool: request b in a random slot (more slots
    than requests), the rest of the pool random (never to be read)."""
    gen = torch.Generator().manual_seed(seed)
    batch = cu_k.numel() - 1
    slots = torch.randperm(batch + 2, generator=gen)[:batch].to(torch.int32)
    pool = torch.randn(batch + 2, k.shape[1], capacity, k.shape[2], generator=gen).to(k.dtype)
    for b in range(batch):
        start, end = int(cu_k[b]), int(cu_k[b + 1])
        pool[int(slots[b]), :, : end - start] = k[start:end].transpose(0, 1)
    return pool, slots, (cu_k[1:] - cu_k[:-1]).to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["gqa", "no_prefix", "odd_t_and_d", "two_words", "ragged"])
def test_triton_in_place_over_slots_matches_reference(case, dtype):
    """The slotted kernel (keys read in place from a KV pool) equals the reference on the same keys."""
    from spruce.kernels.tree_attention import tree_attention_slots

    prefixes, trees, h, hkv, d = CASES[case]
    q, k, v, mask, cu_q, cu_k, _ = make_batch(prefixes, trees, h, hkv, d, dtype, seed=3 + len(case))
    capacity = int((cu_k[1:] - cu_k[:-1]).max()) + 11
    k_pool, slots, lens = to_pool(k, cu_k, capacity, seed=1)
    v_pool, _, _ = to_pool(v, cu_k, capacity, seed=1)
    out, lse = host(*tree_attention_slots(*dev(q, k_pool, v_pool, mask, cu_q, slots, lens), block_m=16, block_n=16))
    want, want_lse = tree_attention_reference(q.double(), k.double(), v.double(), mask, cu_q, cu_k)
    assert_close(out.double(), want, atol=TOLERANCE[dtype], what=f"{case} output over slots")
    assert_close(lse.double(), want_lse, atol=TOLERANCE[dtype] * 4, what=f"{case} lse over slots")


def test_triton_in_place_split_keys_and_limits():
    from spruce.kernels.tree_attention import tree_attention_slots

    q, k, v, mask, cu_q, cu_k, _ = make_batch(*CASES["ragged"][:2], 4, 2, 32, torch.float32, seed=9)
    k_pool, slots, lens = to_pool(k, cu_k, 64, seed=2)
    v_pool, _, _ = to_pool(v, cu_k, 64, seed=2)
    out, _ = host(*tree_attention_slots(*dev(q, k_pool, v_pool, mask, cu_q, slots, lens), block_m=16, block_n=16, num_splits=3))
    want, _ = tree_attention_reference(q.double(), k.double(), v.double(), mask, cu_q, cu_k)
    assert_close(out.double(), want, atol=TOLERANCE[torch.float32], what="split keys over slots")
    with pytest.raises(ValueError, match="slots of 64 positions"):
        tree_attention_slots(q, k_pool, v_pool, mask, cu_q, slots, lens + 30)
    with pytest.raises(ValueError, match="slots and kv_lens"):
        tree_attention_slots(q, k_pool, v_pool, mask, cu_q, slots[:1], lens)


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_merge_kernel_matches_the_torch_merge(splits):
    """The one-launch merge of split-key partials equals the reference merge, with some splits that saw
    no key (lse -inf) and a row that no split saw."""
    from spruce.kernels.tree_attention import _merge_splits, _merge_splits_kernel

    gen = torch.Generator().manual_seed(splits)
    out = torch.randn(splits, 5, 3, 24, generator=gen)
    lse = torch.randn(splits, 5, 3, generator=gen) * 4
    lse[0, 1] = float("-inf")
    lse[:, 4, 2] = float("-inf")
    got, got_lse = host(*_merge_splits_kernel(*dev(out, lse), torch.float32))
    want, want_lse = _merge_splits(out, lse, torch.float32)
    assert_close(got.double(), want.double(), atol=1e-5, what="merged output")
    assert torch.equal(torch.isinf(got_lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    assert_close(got_lse[finite].double(), want_lse[finite].double(), atol=1e-5, what="merged lse")


def test_kernel_bench_smoke_runs_every_backend(tmp_path):
    """The device script's bench at tiny shapes on the CPU (Triton interpreted): every backend runs and
    matches the reference, the in-place and gathered layouts equal the packed kernel, reports written."""
    import json

    from spruce.kernels.bench import main

    out = tmp_path / "kernels.json"
    assert main(["--smoke", "--sweep", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["rows"]) == 2 and not report.get("partial")
    for row in report["rows"]:
        assert not row["failed"]
        assert {"triton", "triton_slots", "triton_slots_nosplit", "gather_triton", "flex", "flex_prebuilt"} <= set(row["ms"])
        assert row["max_abs_error"]["triton_slots_vs_triton"] == 0.0
        # the prebuilt block mask gives the flex backend's own output (same error against the reference)
        assert row["max_abs_error"]["flex_prebuilt"] == row["max_abs_error"]["flex"]
        assert row["flex_mask_build_ms"] > 0
    assert report["sweep"] and all("ms" in r for r in report["sweep"])
    assert (tmp_path / "kernels.md").read_text().startswith("copy bandwidth")


def test_host_integer_helpers_match_triton():
    """The launcher's plain-Python cdiv and next power of two (Triton's are constexpr functions, slow in
    host code) against Triton's own."""
    import triton
    from spruce.kernels.tree_attention import _cdiv, _pow2

    for a in range(300):
        for b in (1, 3, 16, 64, 128):
            assert _cdiv(a, b) == triton.cdiv(a, b)
    for n in range(1, 5000):
        assert _pow2(n) == triton.next_power_of_2(n)


# ---- a query block that is the last part of a longer tree (a draft level) -------------------------------


def _frontier_batch(prefixes: list[int], trees: list[int], frontiers: list[int], h: int, hkv: int, d: int, dtype, seed: int):
    """Each request's queries are the last ``frontiers[b]`` nodes of its ``trees[b]``-node tree: the full
    batch (every node a query) and the frontier-only batch over the same keys."""
    q, k, v, mask, cu_q, cu_k, _ = make_batch(prefixes, trees, h, hkv, d, dtype, seed=seed)
    rows = torch.cat([torch.arange(int(cu_q[b + 1]) - f, int(cu_q[b + 1])) for b, f in enumerate(frontiers)])
    cu_f = torch.tensor([0, *torch.tensor(frontiers).cumsum(0).tolist()], dtype=torch.int32)
    lens = torch.tensor(trees, dtype=torch.int32)
    return (q, mask, cu_q), (q[rows], mask[rows], cu_f), k, v, cu_k, lens, rows


def test_reference_frontier_rows_equal_the_whole_tree_pass():
    """With ``tree_lens``, queries that are the last nodes of a longer tree get exactly the rows the
    whole tree's pass gives them (the contract a draft level relies on)."""
    (q, mask, cu_q), (fq, fmask, cu_f), k, v, cu_k, lens, rows = _frontier_batch(
        [7, 0, 12], [9, 4, 70], [3, 4, 5], 4, 2, 16, torch.float64, seed=3
    )
    want, want_lse = tree_attention_reference(q, k, v, mask, cu_q, cu_k)
    got, lse = tree_attention_reference(fq, k, v, fmask, cu_f, cu_k, tree_lens=lens)
    assert_close(got, want[rows], atol=1e-12, what="frontier rows")
    assert_close(lse, want_lse[rows], atol=1e-12, what="frontier lse")


@pytest.mark.parametrize("splits", [1, 3])
def test_triton_frontier_queries_match_reference(splits):
    """The kernel with ``tree_lens`` (packed keys and in place over a pool's slots, split keys or not)
    against the float64 reference, on a ragged batch whose trees span one and two mask words."""
    from spruce.kernels.tree_attention import tree_attention, tree_attention_slots

    prefixes, trees, frontiers = [5, 0, 30], [6, 3, 70], [2, 3, 7]
    _, (fq, fmask, cu_f), k, v, cu_k, lens, _ = _frontier_batch(prefixes, trees, frontiers, 4, 2, 16, torch.float32, seed=splits)
    want, want_lse = tree_attention_reference(fq.double(), k.double(), v.double(), fmask, cu_f, cu_k, tree_lens=lens)
    out, lse = host(*tree_attention(*dev(fq, k, v, fmask, cu_f, cu_k), block_m=16, block_n=16, num_splits=splits, tree_lens=lens.to(DEVICE)))
    assert_close(out.double(), want, atol=TOLERANCE[torch.float32], what="packed frontier output")
    assert_close(lse.double(), want_lse, atol=TOLERANCE[torch.float32], what="packed frontier lse")
    # the same keys in a pool of 4 slots (taken out of order), read in place
    cap = max(p + n for p, n in zip(prefixes, trees)) + 3
    k_pool = torch.randn(4, 2, cap, 16)
    v_pool = torch.randn(4, 2, cap, 16)
    slots = torch.tensor([2, 0, 3], dtype=torch.int32)
    for b in range(3):
        k0, k1 = int(cu_k[b]), int(cu_k[b + 1])
        k_pool[slots[b], :, : k1 - k0] = k[k0:k1].transpose(0, 1)
        v_pool[slots[b], :, : k1 - k0] = v[k0:k1].transpose(0, 1)
    kv_lens = (cu_k[1:] - cu_k[:-1]).to(torch.int32)
    out, lse = host(*tree_attention_slots(
        *dev(fq, k_pool, v_pool, fmask, cu_f, slots, kv_lens), block_m=16, block_n=16, num_splits=splits, tree_lens=lens.to(DEVICE)
    ))
    assert_close(out.double(), want, atol=TOLERANCE[torch.float32], what="slotted frontier output")


def test_tree_lens_beyond_the_mask_words_is_refused():
    from spruce.kernels.tree_attention import tree_attention

    _, (fq, fmask, cu_f), k, v, cu_k, lens, _ = _frontier_batch([4], [70], [3], 2, 2, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="mask words"):
        tree_attention(fq, k, v, fmask[:, :1].contiguous(), cu_f, cu_k, tree_lens=lens)
