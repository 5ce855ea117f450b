"""CUDA-graph passes (``spruce.graphs``): the padded static-buffer pass equals the eager packed pass.

CI has no GPU: these run the same bucketed, padded path eagerly (``capture=False``), the reference twin
of the captured graphs, with the Triton kernel interpreted. Capture itself is checked on a GPU
(``evals/gpu_profile.py``'s graph sections)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB, assert_close, build_tiny_model
from spruce.draft.tree import ROOT_PARENT, TokenTree

from spruce import Engine, SamplingParams, SpeculationConfig
from spruce.attention import use_backend
from spruce.config import EngineConfig
from spruce.errors import InvalidRequestError
from spruce.graphs import MIN_KEYS, Bucket, GraphedPasses
from spruce.kvcache import PoolExhaustedError, Segment, SlotKVCache, run_packed

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def model():
    m = build_tiny_model(seed=7, num_attention_heads=4, num_key_value_heads=2)
    use_backend(m, "sdpa")
    return m


def _random_tree(n: int, gen: torch.Generator) -> TokenTree:
    parents = [ROOT_PARENT] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]
    return TokenTree.from_parents(torch.randint(0, TINY_VOCAB, (n,), generator=gen).tolist(), parents)


def _tree_segment(slot: int, tree: TokenTree, prefix: int) -> Segment:
    return Segment(slot, tree.tokens, tree.depth + prefix, tail=None if tree.num_nodes == 1 else tree.ancestor_mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_padded_pass_equals_the_eager_kernel_pass(model, seed):
    """Fresh random prefixes and trees (single nodes among them, so rows and segments are padded): the
    graph path's logits equal the eager kernel pass's, both passes leave the same keys in every slot,
    and the slots' lengths advance alike."""
    gen = torch.Generator().manual_seed(seed)
    pool = SlotKVCache(model, 7, 96)
    graphs = GraphedPasses(model, pool, capture=False)
    slots = [pool.allocate() for _ in range(5)][::-1][: 3 + seed % 3]
    prefixes = [int(torch.randint(1, 40, (1,), generator=gen)) for _ in slots]
    run_packed(model, pool, [Segment(s, torch.randint(0, TINY_VOCAB, (p,), generator=gen), torch.arange(p), logits="none") for s, p in zip(slots, prefixes)])
    sizes = [int(torch.randint(1, 10, (1,), generator=gen)) for _ in slots]
    sizes[0] = 1
    segments = [_tree_segment(s, _random_tree(n, gen), p) for s, n, p in zip(slots, sizes, prefixes)]
    want = run_packed(model, pool, segments, kernel="triton", device_logits=True)
    want_keys = [layer[s, :, : pool.lengths[s]].clone() for layer in pool.keys for s in slots]
    lengths = list(pool.lengths)
    for s, p in zip(slots, prefixes):
        pool.lengths[s] = p
    got = graphs.run(segments)
    assert got is not None
    assert pool.lengths == lengths
    for g, w, n in zip(got, want, sizes):
        assert g.shape == (n, TINY_VOCAB)
        assert_close(g.float(), w.float(), atol=1e-4, what="graph-path verify logits")
    got_keys = [layer[s, :, : pool.lengths[s]] for layer in pool.keys for s in slots]
    for g, w in zip(got_keys, want_keys):
        assert_close(g, w, atol=1e-5, what="keys written by the graph path")


def test_draft_level_pass_equals_the_eager_passes(model):
    """A draft level (each request's new frontier after tree nodes cached by earlier levels, seen through
    a [F, S + F] visibility) and a short causal feed: the graph path against the eager SDPA pass and the
    eager kernel pass, on fresh random data."""
    gen = torch.Generator().manual_seed(9)
    pool = SlotKVCache(model, 5, 128)
    graphs = GraphedPasses(model, pool, capture=False)
    slots = [pool.allocate() for _ in range(3)]
    committed = [int(torch.randint(2, 30, (1,), generator=gen)) for _ in slots]
    cached = [3, 0, 66]  # tree nodes forwarded by earlier levels (66: two mask words)
    run_packed(model, pool, [
        Segment(s, torch.randint(0, TINY_VOCAB, (c + k,), generator=gen), torch.arange(c + k), logits="none")
        for s, c, k in zip(slots, committed, cached)
    ])
    segments = []
    for s, c, k, f in zip(slots, committed, cached, (2, 1, 3)):
        visible = torch.rand(f, k + f, generator=gen) < 0.5
        visible[:, k:] = torch.eye(f, dtype=torch.bool)  # each new node sees itself, not its siblings
        segments.append(Segment(s, torch.randint(0, TINY_VOCAB, (f,), generator=gen), torch.full((f,), c + 1), full=c, tail=visible))
    feed = Segment(pool.allocate(), torch.randint(0, TINY_VOCAB, (5,), generator=gen), torch.arange(5), logits="last")
    segments.append(feed)
    starts = list(pool.lengths)
    results = []
    for path in ("sdpa", "triton", "graph"):
        pool.lengths[:] = starts
        if path == "graph":
            results.append(graphs.run(segments))
        else:
            results.append(run_packed(model, pool, segments, None if path == "sdpa" else "triton", device_logits=True))
    assert results[2] is not None
    for sdpa_rows, kernel_rows, graph_rows in zip(*results):
        assert graph_rows.shape == sdpa_rows.shape
        assert_close(kernel_rows.float(), sdpa_rows.float(), atol=1e-4, what="kernel draft level vs SDPA")
        assert_close(graph_rows.float(), sdpa_rows.float(), atol=1e-4, what="graph draft level vs SDPA")


def test_buckets_round_up_and_reuse(model):
    pool = SlotKVCache(model, 4, 600)
    graphs = GraphedPasses(model, pool, capture=False)
    slots = [pool.allocate() for _ in range(3)]
    pool.lengths[slots[0]], pool.lengths[slots[1]], pool.lengths[slots[2]] = 300, 10, 5
    tree = _random_tree(5, torch.Generator().manual_seed(0))
    segs = [_tree_segment(s, tree, 0) for s in slots]
    assert graphs.bucket(segs) == Bucket(segments=4, longest=8, rows=16, keys=512, tree=8)
    # short contexts share the smallest key bucket; the pool's capacity caps it
    assert graphs.bucket(segs[1:]).keys == MIN_KEYS
    pool.lengths[slots[0]] = 590
    assert graphs.bucket(segs).keys == 600
    # a causal run of tokens is a chain; a draft level's 2-node frontier after 70 cached tree nodes takes
    # a 72-key tree (two mask words) for 2 query rows
    assert graphs.bucket([Segment(slots[1], tree.tokens, tree.depth, logits="last")]) == Bucket(1, 8, 8, MIN_KEYS, 8)
    level = Segment(slots[1], tree.tokens[:2], tree.depth[:2], full=pool.lengths[slots[1]] - 70, tail=torch.ones(2, 72, dtype=torch.bool))
    assert graphs.bucket([level]) == Bucket(1, 2, 2, MIN_KEYS, 128)
    assert graphs.bucket([level]).words == 2
    # no tree-kernel pass: a tail that does not cover the keys after ``full``
    assert graphs.bucket([Segment(slots[0], tree.tokens, tree.depth, full=0, tail=torch.ones(5, 5, dtype=torch.bool))]) is None
    assert graphs.run([]) is None


def test_over_max_graphs_runs_eagerly(model):
    pool = SlotKVCache(model, 3, 64)
    graphs = GraphedPasses(model, pool, capture=False, max_graphs=1)
    slot = pool.allocate()
    gen = torch.Generator().manual_seed(3)
    run_packed(model, pool, [Segment(slot, torch.randint(0, TINY_VOCAB, (4,), generator=gen), torch.arange(4), logits="none")])
    assert graphs.run([_tree_segment(slot, _random_tree(1, gen), 4)]) is not None
    assert pool.lengths[slot] == 5
    # a second bucket (a 3-node tree) is past max_graphs: the caller's eager path runs it, nothing changed
    assert graphs.run([_tree_segment(slot, _random_tree(3, gen), 5)]) is None
    assert pool.lengths[slot] == 5


def test_logits_memory_bounds_the_buckets(model):
    """Each graph keeps its own logits output: buckets past ``max_logits_bytes`` of them run eagerly."""
    pool = SlotKVCache(model, 3, 64)
    row_bytes = TINY_VOCAB * 4  # float32
    graphs = GraphedPasses(model, pool, capture=False, max_logits_bytes=6 * row_bytes)
    slot = pool.allocate()
    gen = torch.Generator().manual_seed(4)
    run_packed(model, pool, [Segment(slot, torch.randint(0, TINY_VOCAB, (4,), generator=gen), torch.arange(4), logits="none")])
    assert graphs.run([_tree_segment(slot, _random_tree(3, gen), 4)]) is not None  # a 4-row bucket
    assert graphs.logits_bytes == 4 * row_bytes
    assert graphs.run([_tree_segment(slot, _random_tree(5, gen), 7)]) is None  # 8 rows would pass the bound
    assert graphs.run([_tree_segment(slot, _random_tree(1, gen), 7)]) is not None  # 1 row fits
    assert graphs.stats()["logits_bytes"] == 5 * row_bytes and pool.lengths[slot] == 8


def _engine(model, draft, cuda_graphs: str) -> Engine:
    from spruce.evals.tiny import byte_tokenizer

    return Engine(model, byte_tokenizer(), draft, EngineConfig(max_batch_size=3, max_seq_len=96, attention_backend="triton", cuda_graphs=cuda_graphs))


@pytest.mark.slow
def test_engine_with_graph_passes_is_lossless():
    """The engine with its verify and decode passes on the graph path (eagerly here) gives plain
    decoding's greedy output, alone and batched, and reports the passes it served."""
    target = build_tiny_model(seed=21, num_attention_heads=4, num_key_value_heads=2)
    draft = build_tiny_model(seed=22, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    prompts = [[5, 6, 7, 8, 5, 6], [9, 10], [11, 12, 13, 11, 12, 13, 11]]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    eager = _engine(target, draft, "off")
    want = [o.token_ids for o in eager.generate(prompts, params, None)]
    # without graphs the draft's levels run through the kernel eagerly
    assert eager.graphs is None and eager.drafter.kernel == "triton" and eager.drafter.graphs is None
    assert [o.token_ids for o in eager.generate(prompts, params, SpeculationConfig(depth=3, top_k=2, budget=5))] == want
    graphed = _engine(target, draft, "on")
    assert graphed.graphs is not None
    got = [o.token_ids for o in graphed.generate(prompts, params, SpeculationConfig(depth=3, top_k=2, budget=5))]
    assert got == want
    got = [o.token_ids for o in graphed.generate(prompts, params, None)]
    assert got == want
    stats = graphed.graphs.stats()
    assert stats["failures"] == [] and stats["passes"] > 0
    telemetry = graphed.speculation_telemetry()
    assert telemetry["cuda_graphs"]["passes"] == stats["passes"]
    # the draft's levels and short feeds took its own graph path
    assert graphed.drafter.kernel == "triton" and telemetry["draft_cuda_graphs"]["passes"] > 0
    assert telemetry["draft_cuda_graphs"]["failures"] == []


def test_cuda_graphs_option_is_checked(model):
    from spruce.evals.tiny import byte_tokenizer

    with pytest.raises(InvalidRequestError, match="cuda_graphs"):
        EngineConfig(cuda_graphs="yes")
    # "on" needs the Triton backend (the graph path is a tree-kernel pass)
    with pytest.raises(InvalidRequestError, match="triton"):
        Engine(model, byte_tokenizer(), None, EngineConfig(attention_backend="sdpa", cuda_graphs="on"))
    # "auto" on a CPU: no graphs
    assert Engine(model, byte_tokenizer(), None, EngineConfig(attention_backend="triton")).graphs is None


def test_a_pass_that_overflows_its_slot_registers_no_bucket(model):
    pool = SlotKVCache(model, 3, 16)
    graphs = GraphedPasses(model, pool, capture=False)
    slot = pool.allocate()
    pool.lengths[slot] = 14
    tree = _random_tree(3, torch.Generator().manual_seed(5))
    with pytest.raises(PoolExhaustedError):
        graphs.run([_tree_segment(slot, tree, 14)])
    assert graphs.stats()["buckets"] == 0 and graphs.logits_bytes == 0 and pool.lengths[slot] == 14
