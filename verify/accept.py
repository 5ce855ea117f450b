"""One entry point for acceptance: greedy (temperature 0) or lossless tree sampling."""

from __future__ import annotations

import torch

from spruce.config import SamplingParams
from spruce.draft.tree import TokenTree
from spruce.sampling import sampling_probs
from spruce.verify.greedy import VerifyResult, greedy_accept
from spruce.verify.tree_sampling import tree_rejection_sample


def accept(
    tree: TokenTree,
    # [N, V] target logits at each tree node, on any device and in any float dtype
    logits: torch.Tensor,
    # [N, V] draft distributions the children were drawn from; None for greedy or root-only trees
    draft_probs: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator,
    # [N] bool nodes proposed deterministically (n-gram); None = none
    deterministic: torch.Tensor | None = None,
) -> VerifyResult:
    if params.greedy:  # the argmax where the logits are: only N token ids reach the host
        return greedy_accept(tree, logits.argmax(dim=-1))
    target_probs = sampling_probs(logits.float().cpu(), params.temperature, params.top_k, params.top_p)
    if draft_probs is None:
        if tree.num_nodes > 1 and (deterministic is None or not bool(deterministic[1:].all())):
            raise ValueError("sampling over a tree needs the draft distributions its children were drawn from")
        draft_probs = torch.zeros_like(target_probs)
    return tree_rejection_sample(tree, target_probs, draft_probs, generator, deterministic)
