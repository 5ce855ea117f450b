"""A draft whose output layer scores part of the vocabulary (``spruce.draft.vocab``): its trees against an
independent twin (the full layer, every other id masked to -inf), per-request full vocabulary, lossless
output through the engine, and the loader's path."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_VOCAB
from spruce.draft.model_drafter import DraftJob, ModelDrafter
from spruce.draft.vocab import NarrowHead, draft_vocab_ids, full_vocab, narrow_head_of, narrow_output_layer
from test_cpu_int8 import needs_w8a8
from test_dynamic_tree import assert_same_trees
from test_engine import prompts

from spruce import Engine, SamplingParams, SpeculationConfig
from spruce.config import EngineConfig
from spruce.errors import InvalidRequestError


class _MaskedHead(torch.nn.Module):
    """The reference: the full output layer, every id outside ``ids`` at -inf."""

    def __init__(self, head: torch.nn.Module, ids: torch.Tensor, vocab: int) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("outside", torch.ones(vocab, dtype=torch.bool).index_fill_(0, ids, False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x).masked_fill(self.outside, float("-inf"))


def _random_ids(seed: int, vocab: int = TINY_VOCAB) -> torch.Tensor:
    """A sorted random half of the vocabulary (fresh per seed), the prompts' low ids included."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(vocab, generator=gen)[: vocab // 2].sort().values


def _narrowed(model: torch.nn.Module, ids: torch.Tensor) -> torch.nn.Module:
    out = copy.deepcopy(model)
    narrow_output_layer(out, ids)
    return out


def _masked(model: torch.nn.Module, ids: torch.Tensor) -> torch.nn.Module:
    out = copy.deepcopy(model)
    out.set_output_embeddings(_MaskedHead(out.get_output_embeddings(), ids, TINY_VOCAB))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_narrow_head_trees_equal_the_masked_full_head(tiny_draft, seed):
    """Every kind of tree (greedy dynamic, static, processed top-k, drawn children), batched, three steps
    with commits: the narrow layer's trees, top-k on the device and whole rows on the host, equal those
    of the full layer with every other id masked, and never hold an id outside the subset."""
    ids = _random_ids(seed)
    masked, narrow = _masked(tiny_draft, ids), _narrowed(tiny_draft, ids)
    for host_rows in (False, True):
        reference = ModelDrafter(masked, TINY_VOCAB, num_slots=4, host_rows=True)
        trees = assert_same_trees(ModelDrafter(narrow, TINY_VOCAB, num_slots=4, host_rows=host_rows), reference)
        allowed = set(ids.tolist())
        assert all(int(t) in allowed for p in trees for t in p.tree.tokens[1:])


def test_a_request_asking_for_the_full_vocabulary_turns_the_pass_full(tiny_draft):
    """One job with ``full_draft_vocab`` makes the whole pass score every id: the batch's trees equal
    those of the unnarrowed draft; alone, the others stay narrow."""
    ids = _random_ids(3)
    specs = [SpeculationConfig(depth=3, top_k=2, budget=5, full_draft_vocab=i == 0) for i in range(3)]
    narrow = ModelDrafter(_narrowed(tiny_draft, ids), TINY_VOCAB, num_slots=4)
    full = ModelDrafter(copy.deepcopy(tiny_draft), TINY_VOCAB, num_slots=3)
    assert_same_trees(narrow, full, specs, steps=2)
    # without the full-vocabulary request the pass is narrow again
    state = narrow.new_state()
    proposal = narrow.propose_batch([DraftJob(state, prompts(1, 30)[0], SpeculationConfig(depth=3, top_k=2, budget=5), 3)])[0]
    assert narrow.head is not None and narrow.head.narrow_on
    assert set(proposal.tree.tokens[1:].tolist()) <= set(ids.tolist())


def test_narrow_draft_keeps_greedy_output_and_the_full_vocab_context(tiny_target, tiny_draft, tokenizer):
    """Through the engine a narrowed draft changes proposals, never the output; ``full_vocab`` lets other
    code (HF assisted generation) use the draft as an ordinary model."""
    ids = _random_ids(4)
    draft = _narrowed(tiny_draft, ids)
    engine = Engine(tiny_target, tokenizer, draft)
    batch = prompts(4, 24)
    params = SamplingParams(max_tokens=20)
    plain = engine.generate(batch, params, speculation=None)
    for spec in (SpeculationConfig(depth=3, top_k=2, budget=6), SpeculationConfig(depth=3, top_k=2, budget=6, full_draft_vocab=True)):
        outs = engine.generate(batch, params, speculation=spec)
        assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
        assert sum(o.stats.drafted for o in outs) > 0
    x = torch.randn(1, tiny_draft.config.hidden_size)
    head = narrow_head_of(draft)
    assert isinstance(head, NarrowHead) and draft.get_output_embeddings()(x).shape[-1] == ids.numel()
    with full_vocab(draft):
        assert draft.get_output_embeddings()(x).shape[-1] == TINY_VOCAB
    assert head.narrow_on


@pytest.mark.parametrize(
    "draft_dtype",
    ["float32", "int8", pytest.param("w8a8", marks=needs_w8a8)],
)
def test_from_pretrained_narrows_the_draft_it_loads(tiny_dirs, draft_dtype):
    """``draft_vocab=N``: the loader narrows the draft before converting its linear layers (both heads
    converted, int8 too); the engine records N; output equals plain decoding's. ``draft_vocab=0``: none."""
    target_dir, draft_dir = tiny_dirs
    engine = Engine.from_pretrained(target_dir, draft_dir, draft_dtype=draft_dtype, draft_vocab=100)
    assert engine.config.draft_vocab == 100
    head = engine.drafter.head
    assert head is not None
    special = {int(i) for i in engine.eos_ids}
    assert set(range(100)) <= set(head.ids.tolist()) and special <= set(head.ids.tolist())
    assert type(head.narrow) is type(head.full)  # converted alike (oneDNN / int8 / small rows)
    if draft_dtype == "w8a8":  # both halves rescored, the one the calibration pass did not run too
        assert head.narrow.w8a8 is not None and head.full.w8a8 is not None and head.narrow.rescore and head.full.rescore
    batch = prompts(3, 30)
    params = SamplingParams(max_tokens=16)
    assert [o.token_ids for o in engine.generate(batch, params)] == [o.token_ids for o in engine.generate(batch, params, speculation=None)]
    whole = Engine.from_pretrained(target_dir, draft_dir, draft_dtype=draft_dtype, draft_vocab=0)
    assert whole.config.draft_vocab == 0 and whole.drafter.head is None


def test_draft_vocab_ids_and_bad_input(tiny_draft):
    assert draft_vocab_ids(10, 4, [9, 2, 50]).tolist() == [0, 1, 2, 3, 9]
    assert draft_vocab_ids(10, 40).tolist() == list(range(10))
    with pytest.raises(ValueError, match="draft vocabulary size"):
        draft_vocab_ids(10, 0)
    with pytest.raises(InvalidRequestError, match="draft_vocab"):
        EngineConfig(draft_vocab=-1)
    model = copy.deepcopy(tiny_draft)
    with pytest.raises(ValueError, match="sorted"):
        narrow_output_layer(model, torch.tensor([3, 1]))
    with pytest.raises(ValueError, match=r"\[0, "):
        narrow_output_layer(model, torch.tensor([0, TINY_VOCAB]))
    narrow_output_layer(model, torch.tensor([0, 1, TINY_VOCAB - 1]))
    with pytest.raises(ValueError, match="already narrowed"):
        narrow_output_layer(model, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="past the target's vocabulary"):
        ModelDrafter(model, TINY_VOCAB - 1)
