"""A draft's output layer over part of its vocabulary (FR-Spec style: Zhao et al. 2025).

On a CPU a draft level is bound by reading the draft's weights, and a small draft's output layer is a
large part of them: the embedded 0.5B draft's [151936 x 896] output layer is 27% of its parameters and
~1/3 of a level's int8 products (one row through it: 32 ms of ~100 ms on the 2-core AVX2 machine; over
the first 32768 ids, 6.7 ms; ``kernels/NOTES.md``). A draft only proposes, the target verifies, so the
draft may score a subset of the tokens: its proposals then come from that subset, and the output is the
target's either way (greedy: token-identical; sampling: the draft distribution q is the softmax over the
subset, zero elsewhere, and multi-draft rejection sampling is exact for any q).

Which subset: a BPE vocabulary lists its tokens in merge order, and a merge was made because the pair was
frequent in the tokenizer's training text, so the first ids are the frequent ones (no corpus needed; the
embedded pair's first 32768 ids hold 92% of Spec-Bench's prompt tokens and 87-99% of what its draft
writes per category, 97% and 95-100% for 65536), plus every special and added token (end of turn, end of
text), which a draft must be able to propose. What the draft loses is the positions where the target's
next token is a rare one; the cost model measures both sides (acceptance and the draft's cost per level)
as for any draft. Measured end to end with 32768 on a 2-core AVX2 CPU: steps ~9% cheaper, 8% fewer
tokens accepted per pass, no clear gain (``evals/results/README.md``): opt-in.

``NarrowHead`` keeps the full output layer beside the narrow one: a pass runs one of them
(``narrow_on``), so a request may still ask for the whole vocabulary (``SpeculationConfig.full_draft_vocab``)
and tests compare the two.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch


def draft_vocab_ids(vocab_size: int, keep: int, extra_ids: Iterable[int] = ()) -> torch.Tensor:
    """[V'] sorted token ids: the first ``keep`` of ``vocab_size`` and every id of ``extra_ids`` (special
    and added tokens) below ``vocab_size``."""
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"draft vocabulary size must be an integer >= 1, got {keep!r}")
    ids = set(range(min(keep, vocab_size)))
    ids.update(int(i) for i in extra_ids if 0 <= int(i) < vocab_size)
    return torch.tensor(sorted(ids), dtype=torch.long)


def special_ids(tokenizer) -> list[int]:
    """Ids of a tokenizer's special and added tokens (end of turn, end of text, tool tags)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    ids.update(int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {}))
    return sorted(ids)


class NarrowHead(torch.nn.Module):
    """An output layer that scores either every token (``full``, the model's own layer) or only ``ids``
    (``narrow``: a linear layer holding those rows of the full weight); ``narrow_on`` picks. Both are
    plain ``nn.Linear`` when built, so the CPU fast paths (``spruce.kernels``) convert them like any
    other linear layer."""

    ids: torch.Tensor

    def __init__(self, full: torch.nn.Linear, ids: torch.Tensor) -> None:
        super().__init__()
        self.full = full
        weight, bias = full.weight, full.bias
        rows = ids.to(weight.device)
        self.narrow = torch.nn.Linear(weight.shape[1], rows.numel(), bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.narrow.weight.copy_(weight.detach()[rows])
            if bias is not None:
                self.narrow.bias.copy_(bias.detach()[rows])
        self.narrow.requires_grad_(False)
        self.register_buffer("ids", rows, persistent=False)
        self.narrow_on = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.narrow(input) if self.narrow_on else self.full(input)

    def extra_repr(self) -> str:
        return f"narrow: {self.ids.numel()} ids"


def narrow_output_layer(model: torch.nn.Module, ids: torch.Tensor) -> NarrowHead:
    """Give ``model`` (a causal LM whose output layer is still an ``nn.Linear``: before any conversion of
    its linear layers) a ``NarrowHead`` over ``ids``; returns it."""
    if narrow_head_of(model) is not None:
        raise ValueError("the model's output layer is already narrowed")
    head = model.get_output_embeddings()  # type: ignore[operator]
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(
            f"narrowing needs the draft's output layer as an nn.Linear, got {type(head).__name__}: narrow it "
            "when loading, before its linear layers are converted (spruce.models.load_causal_lm(output_ids=...))"
        )
    ids = ids.to(torch.long).flatten()
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= head.out_features or bool((ids[1:] <= ids[:-1]).any()):
        raise ValueError(f"narrow output ids must be distinct, sorted and in [0, {head.out_features}), got {ids.numel()} ids")
    wrapped = NarrowHead(head, ids)
    model.set_output_embeddings(wrapped)  # type: ignore[operator]
    return wrapped


def narrow_head_of(model: torch.nn.Module) -> NarrowHead | None:
    """The model's ``NarrowHead``, if its output layer is one."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, NarrowHead) else None


@contextmanager
def full_vocab(model: torch.nn.Module | None) -> Iterator[None]:
    """Within the block, a narrowed model's output layer scores every token id (for code that takes the
    draft as an ordinary causal LM, such as HF assisted generation)."""
    head = None if model is None else narrow_head_of(model)
    if head is None:
        yield
        return
    was = head.narrow_on
    head.narrow_on = False
    try:
        yield
    finally:
        head.narrow_on = was
