"""A draft model proposes a token tree, keeping its own KV cache across steps.

Draft cache layout during ``propose``: the C committed tokens (the root, ``tokens[-1]``, included), then
the tree nodes that were forwarded to expand them, in forwarding order. After verification, ``commit``
keeps the committed part plus the slots of the accepted path's nodes that were forwarded, so the next
step re-processes only what the draft has not seen: the accepted nodes of the last level and the bonus.

Tree construction, three kinds (limits from ``SpeculationConfig``):
- dynamic (EAGLE-2, Li et al. 2024): expansion, then rerank. Level by level, the ``top_k`` candidates of
  the previous level with the highest cumulative draft log-probability are forwarded and each gets its
  ``top_k`` most likely children as candidates; after ``depth`` levels the ``budget`` candidates with
  the highest cumulative log-probability form the tree. A child's score never exceeds its parent's, so
  the kept set is a tree. Used for greedy requests, and for sampling when ``sampled_children`` is off:
  the children are then the top-k of the processed draft distribution, verified as point masses.
- sampled (SpecInfer / Sequoia): children are drawn from the processed draft distribution without
  replacement, level by level, until ``depth`` or ``budget``; no rerank, since keeping or dropping a drawn
  child by its own probability would bias lossless tree sampling (see ``spruce.verify.tree_sampling``).
- static: the fixed rank paths of ``tree_paths``, every step the same shape.
The drafter runs one forward over the pending committed tokens, then one per expanded level; for a batch
of requests, each of those forwards is one packed pass over all of them (``propose_batch``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from spruce.draft.tree import ROOT_PARENT, Proposal, TokenTree
from spruce.draft.vocab import full_vocab, narrow_head_of

from spruce.attention import use_backend
from spruce.config import SpeculationConfig
from spruce.graphs import GraphedPasses
from spruce.kvcache import TREE_RESERVE, Segment, SlotKVCache, run_packed
from spruce.lean import LeanDecoder, lean_unsupported
from spruce.sampling import sampling_probs

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class TreePolicy(Protocol):
    """Per-step decisions for a dynamic tree, from costs the drafter does not know (the engine's cost
    model implements it). Probabilities are the draft's path probabilities, best first."""

    def expand(self, best_probs: list[float], frontier_prob: float, levels: int) -> bool:
        """After ``levels`` draft forwards: is another level worth its cost, given the best candidates so
        far and the best frontier node's probability (an upper bound on anything the level adds)?"""
        ...

    def size(self, best_probs: list[float], levels: int) -> int:
        """How many of the best candidates to verify (0: a plain step)."""
        ...


# the longest per-request feed that runs through the tree kernel (as a causal chain of mask bits); a
# longer catch-up is a prefill, for SDPA's causal path
KERNEL_MAX_FEED = 64

@dataclass
class DraftState:
    """Per-request draft bookkeeping; the KV lives in slot ``slot`` of the drafter's pool."""

    slot: int
    # committed tokens whose KV is in the slot, counted from the start of the request's tokens (always
    # < len(tokens): the root is re-fed)
    cached: int = 0
    # the first committed token the slot holds (> 0 after a windowed catch-up: ``draft_window``); the
    # slot's position i holds token ``offset + i``, at its own RoPE position
    offset: int = 0
    # tree node index -> slot offset after the committed tokens (set by propose)
    node_slots: dict[int, int] = field(default_factory=dict)
    # committed length C at the last propose
    committed: int = 0
    # draft forwards the last propose ran (the pending tokens, then one per expanded level)
    levels: int = 0


@dataclass
class DraftJob:
    """One request's part of a batched ``propose_batch``: the arguments of ``propose``."""

    state: DraftState
    tokens: list[int]
    config: SpeculationConfig
    max_depth: int
    sampling: DraftSampling | None = None
    policy: TreePolicy | None = None


class ModelDrafter:
    """Tree proposer backed by a small causal LM; one KV slot per request in a pre-allocated pool.

    ``propose_batch`` builds the trees of many requests level-synchronously: one packed draft forward
    feeds every request's pending tokens, then one per level forwards every request's frontier that
    is still expanding (``spruce.kvcache``)."""

    def __init__(
        self,
        model: PreTrainedModel,
        vocab_size: int | None = None,
        num_slots: int = 4,
        capacity: int | None = None,
        kernel: str | None = None,
        graphs: bool = False,
        host_rows: bool = False,
        lean: bool = True,
    ) -> None:
        """``vocab_size``: the target's logits width; draft logits are cut or padded to it, so a draft
        never proposes an id the target cannot score and its distributions line up with the target's.
        ``num_slots`` x ``capacity``: the KV pool (default capacity: the model's context, at most 4096,
        plus room for tree nodes). ``kernel="triton"``: levels and short feeds (at most
        ``KERNEL_MAX_FEED`` tokens per request) run through the tree-attention kernel, and with
        ``graphs`` replay CUDA graphs (``spruce.graphs``; one pool slot becomes their scratch slot);
        else SDPA per request. ``host_rows``: the reference path, every frontier's whole logits rows
        copied to the host and its top-k children chosen there (tests and side-by-side timing). ``lean``:
        on a CPU, passes of a model ``spruce.lean`` supports run through its ``LeanDecoder`` (the same
        computation without transformers' per-module overhead) instead of the model's own forward.

        A draft whose output layer is a ``spruce.draft.vocab.NarrowHead`` scores only its ids, unless a
        job asks for the full vocabulary (``SpeculationConfig.full_draft_vocab``: then that whole pass
        does); proposals are mapped back to token ids."""
        self.model = model
        self.host_rows = host_rows
        self.vocab_size = vocab_size
        self.head = narrow_head_of(model)
        if self.head is not None and vocab_size is not None and int(self.head.ids.max()) >= vocab_size:
            raise ValueError(f"the draft's narrow output layer scores ids up to {int(self.head.ids.max())}, past the target's vocabulary ({vocab_size})")
        # the head mode the draft's CUDA graphs were captured with (they replay only that one)
        self._graph_narrow: bool | None = None
        use_backend(model, "sdpa")
        # built after the model's layers were converted (it calls the modules it finds now)
        self.lean = LeanDecoder(model) if lean and lean_unsupported(model) is None else None
        if capacity is None:
            context = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
            capacity = min(context, 4096) + TREE_RESERVE
        # float32 keys on a CPU: a level's few rows per request attend as plain float32 products, 16-27% off
        # a level of 4-16 requests of the embedded draft, ~5% at 1 (kernels/NOTES.md); the draft's KV doubles
        self.pool = SlotKVCache(model, num_slots, capacity, float32_rows=True)
        if kernel not in (None, "triton"):
            raise ValueError(f"the drafter runs its passes through SDPA or the triton kernel, not {kernel!r}")
        self.kernel = kernel
        self.graphs = GraphedPasses(model, self.pool, kernel) if graphs and kernel is not None else None
        # the last propose_batch's first pass (the pending committed tokens): seconds and tokens fed
        self.last_feed: tuple[float, int] = (0.0, 0)

    @property
    def columns(self) -> torch.Tensor | None:
        """The token id of each logits column of the draft's passes now (None: column j is token j)."""
        return self.head.ids if self.head is not None and self.head.narrow_on else None

    def _fit(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits cut to the target's V where the draft's vocabulary is wider (a narrow pass's
        columns are token ids below it already)."""
        v = self.vocab_size
        if self.columns is not None:
            return logits
        return logits[:, :v] if v is not None and logits.shape[-1] > v else logits

    def _logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[F, V] draft logits on the CPU (drawing children is small, sequential work), fit to the
        target's V (padded with -inf where the draft's vocabulary is narrower, and at every id a narrow
        pass did not score)."""
        logits = self._fit(logits).float().cpu()
        v = self.vocab_size
        if self.columns is not None:
            width = v if v is not None else int(self.model.config.vocab_size)
            full = torch.full((logits.shape[0], width), float("-inf"))
            full[:, self.columns.cpu()] = logits
            return full
        if v is None or logits.shape[-1] >= v:
            return logits
        return torch.nn.functional.pad(logits, (0, v - logits.shape[-1]), value=float("-inf"))

    def new_state(self) -> DraftState:
        """A request's state with a fresh slot (``release`` gives it back)."""
        return DraftState(slot=self.pool.allocate())

    def release(self, state: DraftState) -> None:
        self.pool.release(state.slot)

    def propose(
        self,
        state: DraftState,
        tokens: list[int],
        config: SpeculationConfig,
        max_depth: int,
        sampling: DraftSampling | None = None,
        policy: TreePolicy | None = None,
    ) -> Proposal:
        """Build a tree rooted at ``tokens[-1]`` of at most ``min(config.depth, max_depth)`` levels.

        ``policy`` (dynamic trees): decides per step whether to expand another level and how many of the
        best candidates (at most ``config.budget``) to keep; without it, ``min_expand_prob`` and the
        full budget.

        ``sampling=None``: greedy (the most likely children). Otherwise the tree is built on the processed
        draft distribution: drawn children (``config.sampled_children``) or its top-k, as deterministic
        proposals; both keep lossless sampling exact.
        """
        return self.propose_batch([DraftJob(state, tokens, config, max_depth, sampling, policy)])[0]

    def propose_batch(self, jobs: list[DraftJob]) -> list[Proposal]:
        """``propose`` for many requests at once: each tree is exactly what ``propose`` alone would build
        from the same logits; the draft forwards are shared."""
        # a narrowed draft's passes score every id when one of their requests asks to
        if self.head is not None and any(job.config.full_draft_vocab for job in jobs):
            with full_vocab(self.model):
                return self._propose_batch(jobs)
        return self._propose_batch(jobs)

    def _propose_batch(self, jobs: list[DraftJob]) -> list[Proposal]:
        runs = [_Run(job) for job in jobs]
        t0 = time.perf_counter()
        fed, outs = self._feed_pending(runs)
        self._take_rows(runs, outs)
        self.last_feed = (time.perf_counter() - t0, fed)
        level = 1
        active = [run for run in runs if run.depth >= 1]
        while active:
            expanding = [run for run in active if self._grow(run, level)]
            if not expanding:
                break
            outs = self.forward([self._level_segment(run, level) for run in expanding])
            self._take_rows(expanding, outs)
            for run in expanding:
                run.job.state.levels += 1
            level += 1
            active = expanding
        return [self._finish(run) for run in runs]

    @staticmethod
    def max_levels(config: SpeculationConfig, max_depth: int) -> int:
        """Most levels ``propose`` builds for this config (it runs at most that many draft forwards)."""
        if config.tree_paths:
            return min(max(map(len, config.tree_paths)), max_depth)
        # a node at depth d needs d - 1 ancestors in the tree: deeper levels could never be kept
        return min(config.depth, config.budget, max_depth)

    def _grow(self, run: _Run, level: int) -> bool:
        """Add level ``level``'s children to the tree; whether the frontier is forwarded for another."""
        job, tree = run.job, run.tree
        config = job.config
        if run.sampled and run.static is None and config.budget - tree.num_draft_nodes <= 0:
            return False
        if run.static is not None:
            counts = [run.static.get(tree.paths[f], 0) for f in tree.frontier]
        else:
            counts = [config.top_k] * len(tree.frontier)
        if run.generator is not None:
            assert job.sampling is not None
            logq = tree.sampled_logprobs(run.logits, job.sampling)
            if run.static is not None:
                drawn = select_static(logq, counts, run.generator)
            else:
                drawn = select_sampled(logq, config.top_k, config.budget - tree.num_draft_nodes, run.generator)
            picks = [(f, token, float(logq[f, token])) for f, token in drawn]
        else:
            picks = top_picks(*run.top, counts)
        new_nodes = tree.add(picks)
        tree.advance(new_nodes, config.top_k, run.static)
        return (
            level < run.depth
            and bool(tree.frontier)
            and (run.static is not None or tree.worth_expanding(config, run.sampled, job.policy, job.state.levels))
        )

    def _feed_pending(self, runs: list[_Run]) -> tuple[int, list[torch.Tensor]]:
        """Forward the committed tokens each draft has not seen (at most its job's ``draft_window``
        latest: a draft further behind drops its context and reads only those); the tokens fed and the
        [1, V] logits at each root."""
        segments = []
        for run in runs:
            state, tokens = run.job.state, run.job.tokens
            committed = len(tokens)
            if not state.offset <= state.cached < committed or self.pool.lengths[state.slot] != state.cached - state.offset:
                raise RuntimeError(
                    f"draft slot {state.slot} holds {self.pool.lengths[state.slot]} positions, state says "
                    f"{state.cached - state.offset}"
                )
            window = run.job.config.draft_window
            if window and committed - state.cached > window:
                state.cached = state.offset = committed - window
                self.pool.lengths[state.slot] = 0
            pending = torch.tensor(tokens[state.cached :], dtype=torch.long)
            segments.append(Segment(state.slot, pending, torch.arange(state.cached, committed), logits="last"))
            state.cached = state.committed = committed
            state.node_slots = {}
            state.levels = 1
        fed = sum(int(seg.tokens.numel()) for seg in segments)
        return fed, self.forward(segments)

    def _take_rows(self, runs: list[_Run], outs: list[torch.Tensor]) -> None:
        """Give each run its frontier's draft distribution from its rows of a draft pass: the whole rows
        on the host where children are drawn, else only the best ``k`` log q per row and their tokens,
        computed where the pass ran (one [F, k] copy to the host instead of [F, V]: top-k children need
        nothing else). ``host_rows``: the reference, every run's whole rows on the host first."""
        top = [(run, out) for run, out in zip(runs, outs) if run.generator is None]
        for run, out in zip(runs, outs):
            if run.generator is not None:
                run.logits = self._logits(out)
        if not top:
            return
        k = max(run.k for run, _ in top)
        if self.host_rows:
            parts = [top_logprobs(self._logits(out), k, run.job.sampling) for run, out in top]
        else:
            # the greedy runs' rows in one product (on a GPU a batch of requests is then a few kernels,
            # not a few per request); processed distributions per run
            greedy = [out for run, out in top if run.job.sampling is None]
            values, indices = top_logprobs(self._fit(torch.cat(greedy)), k, None) if greedy else (torch.zeros(0), torch.zeros(0))
            parts, g = [], 0
            for run, out in top:
                if run.job.sampling is None:
                    parts.append((values[g : g + out.shape[0]], indices[g : g + out.shape[0]]))
                    g += out.shape[0]
                else:
                    parts.append(top_logprobs(self._fit(out), k, run.job.sampling))
        values = torch.cat([v for v, _ in parts]).cpu()
        indices = torch.cat([i for _, i in parts])
        if self.columns is not None and not self.host_rows:  # (host rows are token ids already)
            indices = self.columns[indices]
        indices = indices.cpu()
        g = 0
        for (run, _), (v, _) in zip(top, parts):
            n = v.shape[0]
            run.top = (values[g : g + n].tolist(), indices[g : g + n].tolist())
            g += n

    def forward(self, segments: list[Segment]) -> list[torch.Tensor]:
        """One packed draft forward: through the kernel (a graph where one serves it) when every segment
        is short, else SDPA per request (a long catch-up is a prefill)."""
        if self.kernel is None or max(int(s.tokens.numel()) for s in segments) > KERNEL_MAX_FEED:
            return run_packed(self.lean or self.model, self.pool, segments)
        out = None
        if self.graphs is not None:
            # graphs replay the head they were captured with: another mode runs eagerly
            narrow = self.columns is not None
            if self._graph_narrow is None:
                self._graph_narrow = narrow
            if narrow == self._graph_narrow:
                out = self.graphs.run(segments)
        return out if out is not None else run_packed(self.model, self.pool, segments, self.kernel, device_logits=True)

    def _level_segment(self, run: _Run, level: int) -> Segment:
        """The frontier (all at one depth), after the committed tokens and earlier levels' nodes."""
        state, tree = run.job.state, run.tree
        nodes = tree.frontier
        slotted = sorted(state.node_slots, key=state.node_slots.__getitem__)
        # [F, S + F]: each new node sees its forwarded ancestors (by slot order) and itself; the root is
        # the last committed token, never a column
        column = {node: j for j, node in enumerate(slotted + nodes)}
        visible = []
        for node in nodes:
            row = [False] * len(column)
            while node > 0:
                if node in column:
                    row[column[node]] = True
                node = tree.parents[node]
            visible.append(row)
        base = len(state.node_slots)
        for i, node in enumerate(nodes):
            state.node_slots[node] = base + i
        position = state.committed + level - 1
        return Segment(
            state.slot,
            torch.tensor([tree.tokens[node] for node in nodes], dtype=torch.long),
            torch.full((len(nodes),), position, dtype=torch.long),
            full=state.committed - state.offset,
            tail=torch.tensor(visible, dtype=torch.bool),
        )

    def _finish(self, run: _Run) -> Proposal:
        job, tree = run.job, run.tree
        state, config = job.state, job.config
        if run.static is None and not run.sampled:
            budget = config.budget
            if job.policy is not None:
                budget = min(budget, job.policy.size(tree.best_probs(budget), state.levels))
            kept = tree.rerank(budget)
            state.node_slots = {kept[old]: slot for old, slot in state.node_slots.items() if old in kept}
        out = TokenTree.from_parents(tree.tokens, tree.parents, torch.tensor(tree.logprobs, dtype=torch.float32))
        if job.sampling is None:
            return Proposal(out)
        if not run.sampled:
            return Proposal(out, None, torch.ones(out.num_nodes, dtype=torch.bool))
        return Proposal(out, _stack_rows(tree.expanded, out.num_nodes, run.logits.shape[-1]))

    def commit(self, state: DraftState, accepted_nodes: list[int]) -> None:
        """Keep the committed tokens plus the forwarded prefix of the accepted path (root excluded)."""
        keep = []
        for node in accepted_nodes[1:]:
            if node not in state.node_slots:
                break
            keep.append(state.node_slots[node])
        self.pool.keep(state.slot, state.committed - state.offset, keep)
        state.cached = state.committed + len(keep)
        state.node_slots = {}


class _Run:
    """One request's tree while ``propose_batch`` builds it."""

    def __init__(self, job: DraftJob) -> None:
        self.job = job
        config = job.config
        self.static = _static_children(config.tree_paths) if config.tree_paths else None
        self.sampled = job.sampling is not None and config.sampled_children
        self.depth = ModelDrafter.max_levels(config, job.max_depth)
        self.generator = job.sampling.generator if self.sampled and job.sampling is not None else None
        # children per frontier node when they are the draft's top-k (not drawn)
        self.k = max(self.static.values()) if self.static is not None else config.top_k
        self.tree = _TreeBuilder(job.tokens[-1])
        # [F, V] draft logits at the current frontier (drawn children)
        self.logits = torch.zeros(0)
        # ([F][k] log q, [F][k] token ids), best first, at the current frontier (top-k children)
        self.top: tuple[list[list[float]], list[list[int]]] = ([], [])


class _TreeBuilder:
    """The tree under construction: node lists, each node's rank path, and the current frontier."""

    def __init__(self, root_token: int) -> None:
        self.tokens, self.parents, self.logprobs = [root_token], [ROOT_PARENT], [0.0]
        # cumulative draft log-probability of every node (the dynamic tree's rerank score)
        self.cums: list[float] = [0.0]
        # sibling-rank path of each node (static trees look their shape up by it)
        self.paths: list[tuple[int, ...]] = [()]
        # nodes whose children are being chosen, and their cumulative draft log-probabilities (float64: the
        # values of ``cums`` exactly, so that no child scores above its parent; see ``rerank``)
        self.frontier = [0]
        self.cum = torch.zeros(1, dtype=torch.float64)
        # node -> the draft distribution its sampled children were drawn from
        self.expanded: dict[int, torch.Tensor] = {}
        # cumulative log-probabilities of the nodes the last ``add`` appended
        self._new_cum = torch.zeros(0, dtype=torch.float64)

    @property
    def num_draft_nodes(self) -> int:
        return len(self.tokens) - 1

    def sampled_logprobs(self, logits: torch.Tensor, sampling: DraftSampling) -> torch.Tensor:
        """[F, V] log q at the frontier, q the processed draft distribution, kept per node: verification
        needs what sampled children were drawn from."""
        q = sampling_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)
        self.expanded.update({node: q[i] for i, node in enumerate(self.frontier)})
        return q.log()

    def add(self, picks: list[tuple[int, int, float]]) -> list[int]:
        """Append the picked (frontier index, token, log q) children; returns their node indices."""
        new_nodes, new_cum = [], []
        cum = self.cum.tolist()
        for rank, (f, token, logq) in _ranked(picks):
            if not math.isfinite(logq):
                continue  # filtered out by top-k / top-p: the target can never accept it
            logq = min(logq, 0.0)  # a log-probability (rounding must not score a child above its parent)
            parent = self.frontier[f]
            new_nodes.append(len(self.tokens))
            self.tokens.append(token)
            self.parents.append(parent)
            self.paths.append(self.paths[parent] + (rank,))
            self.logprobs.append(logq)
            new_cum.append(cum[f] + logq)
            self.cums.append(new_cum[-1])
        self._new_cum = torch.tensor(new_cum, dtype=torch.float64)
        return new_nodes

    def advance(self, new_nodes: list[int], top_k: int, static: dict[tuple[int, ...], int] | None) -> None:
        """The next frontier: new nodes with children in a static shape, else the best ``top_k`` new
        nodes by cumulative draft log-probability."""
        if static is not None:
            keep = [i for i, n in enumerate(new_nodes) if static.get(self.paths[n], 0)]
            order = torch.tensor(keep, dtype=torch.long)
        else:
            order = self._new_cum.argsort(descending=True)[:top_k]
        self.frontier = [new_nodes[i] for i in order.tolist()]
        self.cum = self._new_cum[order]


    def best_probs(self, budget: int) -> list[float]:
        """Path probabilities of the ``budget`` best candidates, descending."""
        return [math.exp(c) for c in sorted(self.cums[1:], reverse=True)[:budget]]

    def worth_expanding(self, config: SpeculationConfig, sampled: bool, policy: TreePolicy | None, levels: int) -> bool:
        """Whether another level can change the tree: room is left (sampled trees), the best frontier path
        is likely enough (``config.min_expand_prob``, or the policy's cost judgement), and (dynamic trees)
        fewer than ``budget`` nodes already outscore it: no descendant of the frontier scores above its
        best, so the rerank would keep exactly those nodes and the level would be wasted work."""
        best = float(self.cum.max())
        if math.exp(best) < config.min_expand_prob:
            return False
        if sampled:
            return self.num_draft_nodes < config.budget
        if sum(1 for c in self.cums[1:] if c > best) >= config.budget:
            return False
        return policy is None or policy.expand(self.best_probs(config.budget), math.exp(best), levels)

    def rerank(self, budget: int) -> dict[int, int]:
        """Keep the root and the ``budget`` nodes with the highest cumulative log-probability (ties: the
        shallower, then the earlier node). Renumbers the nodes in place; returns old -> new index."""
        order = sorted(range(1, len(self.tokens)), key=lambda i: (-self.cums[i], len(self.paths[i]), i))
        kept = [0, *sorted(order[:budget])]
        new_index = {old: new for new, old in enumerate(kept)}
        if any(self.parents[i] not in new_index for i in kept[1:]):
            raise AssertionError("rerank dropped an ancestor of a kept node")
        self.tokens = [self.tokens[i] for i in kept]
        self.parents = [ROOT_PARENT] + [new_index[self.parents[i]] for i in kept[1:]]
        self.logprobs = [self.logprobs[i] for i in kept]
        self.cums = [self.cums[i] for i in kept]
        self.paths = [self.paths[i] for i in kept]
        self.expanded = {new_index[n]: row for n, row in self.expanded.items() if n in new_index}
        return new_index


@dataclass(frozen=True)
class DraftSampling:
    """How the draft samples children: the request's processing and its generator."""

    temperature: float
    top_k: int
    top_p: float
    generator: torch.Generator


def top_logprobs(
    # [F, V] draft logits, on any device
    logits: torch.Tensor,
    k: int,
    sampling: DraftSampling | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([F, k] log q, [F, k] token ids), best first, computed where ``logits`` are: q the draft's
    softmax (greedy trees) or its processed distribution (sampling with top-k children; filtered
    tokens at -inf)."""
    x = logits.float()
    if sampling is None:
        logq = torch.log_softmax(x, dim=-1)
    else:
        logq = sampling_probs(x, sampling.temperature, sampling.top_k, sampling.top_p).log()
    values, indices = logq.topk(min(k, x.shape[-1]), dim=-1)
    return values, indices


def top_picks(values: list[list[float]], indices: list[list[int]], counts: list[int]) -> list[tuple[int, int, float]]:
    """(frontier index, token, log q): the ``counts[f]`` most likely children of frontier node f, in rank
    order, from its best-first top-k rows."""
    return [(f, indices[f][r], values[f][r]) for f, k in enumerate(counts) for r in range(min(k, len(indices[f])))]


def select_sampled(
    # [F, V] draft log-probabilities (-inf where filtered out), frontier in descending score order
    logq: torch.Tensor,
    top_k: int,
    room: int,
    generator: torch.Generator,
) -> list[tuple[int, int]]:
    """Each frontier node in turn gets ``top_k`` children drawn without replacement (Gumbel-top-k: the
    order of log q + Gumbel noise is a sequential draw without replacement), until ``room`` runs out.

    Child counts depend only on the frontier order and q's support, never on the drawn tokens, and each
    node keeps a draw-order prefix: the two conditions of ``spruce.verify.tree_sampling``.
    """
    picks: list[tuple[int, int]] = []
    for f in range(logq.shape[0]):
        k = min(top_k, room - len(picks), int(torch.isfinite(logq[f]).sum()))
        if k <= 0:
            break
        uniform = torch.rand(logq.shape[1], generator=generator, dtype=torch.float64).clamp_(min=1e-300)
        keys = logq[f].double() - torch.log(-torch.log(uniform))
        picks.extend((f, int(t)) for t in keys.topk(k).indices)
    return picks


def select_static(
    # [F, V] draft log-probabilities
    logq: torch.Tensor,
    # children wanted per frontier node (a static shape decides them before any draw)
    counts: list[int],
    generator: torch.Generator,
) -> list[tuple[int, int]]:
    """(frontier index, token): the first ``counts[f]`` draws without replacement from node f, in rank
    order."""
    picks: list[tuple[int, int]] = []
    for f, k in enumerate(counts):
        if k > 0:
            picks.extend((f, t) for _, t in select_sampled(logq[f : f + 1], k, k, generator))
    return picks


def _ranked(picks: list[tuple[int, int, float]]):
    """Yield (rank among the picks of the same frontier node, pick), in order."""
    seen: dict[int, int] = {}
    for pick in picks:
        rank = seen.get(pick[0], 0)
        seen[pick[0]] = rank + 1
        yield rank, pick


def _static_children(paths: tuple[tuple[int, ...], ...]) -> dict[tuple[int, ...], int]:
    """Number of children of each rank path in a static shape (the root is ``()``)."""
    counts: dict[tuple[int, ...], int] = {}
    for p in paths:
        counts[p[:-1]] = counts.get(p[:-1], 0) + 1
    return counts


def _stack_rows(rows: dict[int, torch.Tensor], n: int, vocab: int) -> torch.Tensor:
    out = torch.zeros(n, vocab)
    for node, row in rows.items():
        out[node] = row
    return out
