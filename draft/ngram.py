"""Model-free drafting: prompt lookup (n-gram suffix match over the prompt and the generated text).

The longest suffix of the sequence (``max_ngram`` tokens down to ``min_ngram``) is looked up among
earlier positions; the tokens that followed each earlier occurrence (most recent first) are candidate
continuations. Distinct continuations become branches of a trie rooted at the last token, which can
stand alone or be merged into a draft model's tree (shared prefixes are reused, new nodes are appended
after the model's, so model-drawn children always come first among siblings).

For lossless sampling, n-gram nodes are deterministic proposals: each is tested against the residual
with a point-mass proposal (``Proposal.deterministic``), which keeps the output distribution exact.
"""

from __future__ import annotations

import torch

from spruce.draft.tree import Proposal, TokenTree


def ngram_continuations(
    tokens: list[int],
    max_ngram: int,
    min_ngram: int,
    length: int,
    max_branches: int,
) -> list[list[int]]:
    """Up to ``max_branches`` distinct continuations of at most ``length`` tokens (longest match wins)."""
    if length <= 0 or max_branches <= 0 or len(tokens) < 2:
        return []
    seq = torch.tensor(tokens, dtype=torch.long)
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        suffix = seq[-n:]
        # [W, n] every earlier window that has at least one token after it
        windows = seq[:-1].unfold(0, n, 1)
        starts = (windows == suffix).all(dim=1).nonzero().flatten().flip(0).tolist()
        found: list[list[int]] = []
        for s in starts:
            cont = tokens[s + n : s + n + length]
            if cont and cont not in found:
                found.append(cont)
                if len(found) == max_branches:
                    break
        if found:
            return found
    return []


def merge_paths(
    tree_tokens: list[int],
    tree_parents: list[int],
    paths: list[list[int]],
    budget: int,
) -> tuple[list[int], list[int], list[int]]:
    """Insert token paths (from the root) into a tree given as token/parent lists, as a trie.

    Existing nodes are reused where tokens agree; at most ``budget`` new nodes are appended.
    Returns the new token and parent lists and the indices of the appended nodes.
    """
    tokens, parents = list(tree_tokens), list(tree_parents)
    child_of = {(parents[i], tokens[i]): i for i in range(1, len(tokens))}
    added: list[int] = []
    for path in paths:
        node = 0
        for tok in path:
            nxt = child_of.get((node, tok))
            if nxt is None:
                if len(added) >= budget:
                    break
                nxt = len(tokens)
                tokens.append(tok)
                parents.append(node)
                child_of[(node, tok)] = nxt
                added.append(nxt)
            node = nxt
    return tokens, parents, added


def merge_ngram_paths(proposal: Proposal, paths: list[list[int]], budget: int) -> Proposal:
    """Merge continuations found by ``ngram_continuations`` (of the tokens whose last one is the tree's
    root) into ``proposal``: at most ``budget`` new nodes, each a deterministic proposal."""
    tree = proposal.tree
    if not paths:
        return proposal
    node_tokens, parents, added = merge_paths(tree.tokens.tolist(), tree.parents.tolist(), paths, budget)
    if not added:
        return proposal
    logprobs = None
    if tree.draft_logprobs is not None:
        # n-gram nodes carry no draft probability: log q is unknown, recorded as 0
        logprobs = torch.cat([tree.draft_logprobs, torch.zeros(len(added))])
    merged = TokenTree.from_parents(node_tokens, parents, logprobs)
    deterministic = torch.zeros(merged.num_nodes, dtype=torch.bool)
    if proposal.deterministic is not None:
        deterministic[: tree.num_nodes] = proposal.deterministic
    deterministic[added] = True
    draft_probs = proposal.draft_probs
    if draft_probs is not None:
        draft_probs = torch.cat([draft_probs, draft_probs.new_zeros(len(added), draft_probs.shape[1])])
    return Proposal(merged, draft_probs, deterministic)
