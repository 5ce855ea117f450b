"""Choosing the draft tree from measurements: acceptance profile x pass costs (Sequoia-style).

Terms.
- a[d][r], the positional acceptance rate: the probability that the child of sibling rank r (0 = the
  draft's first choice) at depth d is accepted, given that its parent was accepted and the child exists.
  With greedy verification (and with sampling, where siblings are tested in rank order) the events "rank
  r is accepted" are disjoint among siblings, so a node's probability of being on the accepted path is the
  product of a[.][.] along its root path, and the expected tokens per step are 1 (the bonus or recovered
  token) plus the sum of those products over the tree (Sequoia, Chen et al. 2024).
- context c: how sure the target has been of the request's recent tokens (a moving average of its
  probability of its own top token over the last committed positions), in CONTEXT_BUCKETS buckets. The
  profile is kept per context too, each cell shrunk toward the pooled one: acceptance follows context
  (the draft agrees where the text is predictable), so a step plans with the rates of its request's
  current context, not only the server's average.
- verify cost V(n): seconds of one target pass over n tree tokens (the root included); draft cost D(d):
  seconds of the draft's work for a tree of d levels (one forward over the pending tokens plus d - 1).

For each depth limit d, the tree of n nodes with the largest expected tokens under the profile is built
greedily (every child is worth at most its parent and, with a[d][.] made non-increasing in r, at most
its elder sibling, so taking the best available node each time is optimal). The plan maximizes
E(n, d) / (D(d) + V(n + 1)) over n <= max budget, d <= max depth, and n = 0 (plain decoding, V(1)).

Both inputs are measured: the profile online from every verified tree (per engine, i.e. per server), the
costs at start-up (a few timed passes) and then online (exponential moving average per size).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from spruce.draft.tree import TokenTree

# Depths and ranks the profile tracks; deeper or later-ranked nodes share the last cell.
MAX_DEPTH = 8
MAX_RANK = 8
# Prior before any measurement: rank r accepted with probability PRIOR_RATE * PRIOR_DECAY**r, worth
# PRIOR_WEIGHT observations (a few steps of evidence override it).
PRIOR_RATE = 0.6
PRIOR_DECAY = 0.4
PRIOR_WEIGHT = 4.0
# Contexts: buckets of equal width over the target's recent confidence (``context_bucket``), and the
# weight of the newest position in its moving average. Measured on the embedded pair (teacher-forced
# over its own greedy answers to 18 Spec-Bench prompts, 541 positions): the draft's first choice matched
# the target's at 0.85-0.88 of positions whose recent confidence was above 0.8, 0.63-0.73 between 0.4
# and 0.8; the request's own past acceptance predicted less (R^2 0.05 against 0.07-0.10).
CONTEXT_BUCKETS = 5
CONTEXT_EMA = 0.5
# n-gram proposals: the prior of P(token accepted | parent accepted) before any is measured, and of
# P(a lookup finds a continuation)
NGRAM_PRIOR_RATE = 0.3
NGRAM_PRIOR_MATCH = 0.5
# Levels the expansion decision looks ahead.
LOOKAHEAD = 4
# Buckets of draft path probability for the confidence calibration (0-0.1, ..., 0.9-1).
CONFIDENCE_BUCKETS = 10
# Weight of a new timing in the moving average of a pass cost, and the most a single timing may count
# for relative to the current average (a spike from another process must not dominate).
COST_EMA = 0.2
# a planned tree must beat plain decoding's expected tokens per second by this fraction: host-side work
# per drafted step (tree building, acceptance, KV moves) is not in the measured pass costs
PLAN_MARGIN = 0.1
SPIKE_FACTOR = 2.0


class AcceptanceProfile:
    """Online counts of tried / accepted draft nodes by depth and sibling rank (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # [MAX_DEPTH, MAX_RANK] nodes whose parent was accepted, and those accepted
        self.tried = torch.zeros(MAX_DEPTH, MAX_RANK, dtype=torch.float64)
        self.accepted = torch.zeros(MAX_DEPTH, MAX_RANK, dtype=torch.float64)
        # calibration of the draft's confidence: model nodes by the bucket of their draft path
        # probability, and how many of them ended on the accepted path
        self.conf_tried = torch.zeros(CONFIDENCE_BUCKETS, dtype=torch.float64)
        self.conf_accepted = torch.zeros(CONFIDENCE_BUCKETS, dtype=torch.float64)
        # the same counts as tried / accepted, by the request's context when the tree was drafted
        self.ctx_tried = torch.zeros(CONTEXT_BUCKETS, MAX_DEPTH, MAX_RANK, dtype=torch.float64)
        self.ctx_accepted = torch.zeros(CONTEXT_BUCKETS, MAX_DEPTH, MAX_RANK, dtype=torch.float64)

    def record_confidence(
        self,
        # [M] draft path probability of each model node (root excluded)
        probs: torch.Tensor,
        # [M] bool: the node is on the accepted path
        accepted: torch.Tensor,
    ) -> None:
        buckets = (probs.double() * CONFIDENCE_BUCKETS).long().clamp_(0, CONFIDENCE_BUCKETS - 1)
        with self._lock:
            self.conf_tried += torch.bincount(buckets, minlength=CONFIDENCE_BUCKETS).double()
            self.conf_accepted += torch.bincount(buckets, weights=accepted.double(), minlength=CONFIDENCE_BUCKETS)

    def calibration(self) -> torch.Tensor:
        """[CONFIDENCE_BUCKETS] P(a node is accepted | its draft path probability falls in bucket b),
        non-decreasing in b, each bucket shrunk toward its centre (a calibrated draft) until measured.
        A reliability table: drafts are over-confident on some text and under-confident on other."""
        with self._lock:
            tried, accepted = self.conf_tried.clone(), self.conf_accepted.clone()
        centres = (torch.arange(CONFIDENCE_BUCKETS, dtype=torch.float64) + 0.5) / CONFIDENCE_BUCKETS
        weights = tried + PRIOR_WEIGHT
        est = (accepted + PRIOR_WEIGHT * centres) / weights
        return torch.tensor(_isotonic(est.tolist(), weights.tolist()), dtype=torch.float64)

    def record(
        self,
        tree: TokenTree,
        # [K+1] accepted node indices, root first
        accepted_nodes: list[int],
        # [N] bool nodes to leave out (n-gram proposals); None keeps all
        exclude: torch.Tensor | None = None,
        # the request's context bucket when it drafted (``context_bucket``); None: pooled only
        context: int | None = None,
    ) -> None:
        on_path = set(accepted_nodes)
        parents = tree.parents.tolist()
        depth = tree.depth.tolist()
        excluded = exclude.tolist() if exclude is not None else None
        ranks: dict[int, int] = {}
        rows, cols, hits = [], [], []
        for node in range(1, tree.num_nodes):
            rank = ranks.get(parents[node], 0)
            ranks[parents[node]] = rank + 1
            if excluded is not None and excluded[node]:
                continue
            if parents[node] in on_path:
                rows.append(min(depth[node], MAX_DEPTH) - 1)
                cols.append(min(rank, MAX_RANK - 1))
                hits.append(float(node in on_path))
        if not rows:
            return
        # one scatter-add per table (the host does this for every request every step)
        index = (torch.tensor(rows), torch.tensor(cols))
        ones, hit = torch.ones(len(rows), dtype=torch.float64), torch.tensor(hits, dtype=torch.float64)
        with self._lock:
            self.tried.index_put_(index, ones, accumulate=True)
            self.accepted.index_put_(index, hit, accumulate=True)
            if context is not None:
                self.ctx_tried[context].index_put_(index, ones, accumulate=True)
                self.ctx_accepted[context].index_put_(index, hit, accumulate=True)

    def rates(self, context: int | None = None) -> torch.Tensor:
        """[MAX_DEPTH, MAX_RANK] smoothed a[d][r], non-increasing in r; with ``context``, the rates
        measured in that context bucket.

        Each cell shrinks toward its rank's rate pooled over depths, which shrinks toward the prior, so a
        depth never tried borrows what the shallower ones measured; a context's cell shrinks toward the
        cell pooled over contexts (a context never measured plans with the server's rates)."""
        with self._lock:
            tried, accepted = self.tried.clone(), self.accepted.clone()
            if context is not None:
                ctx_tried, ctx_accepted = self.ctx_tried[context].clone(), self.ctx_accepted[context].clone()
        prior = PRIOR_RATE * PRIOR_DECAY ** torch.arange(MAX_RANK, dtype=torch.float64)
        pooled = (accepted.sum(0) + PRIOR_WEIGHT * prior) / (tried.sum(0) + PRIOR_WEIGHT)
        rates = torch.cummin((accepted + PRIOR_WEIGHT * pooled) / (tried + PRIOR_WEIGHT), dim=1).values
        if context is None:
            return rates
        return torch.cummin((ctx_accepted + PRIOR_WEIGHT * rates) / (ctx_tried + PRIOR_WEIGHT), dim=1).values

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            tried, accepted = self.tried.clone(), self.accepted.clone()
        used = int((tried.sum(1) > 0).sum())
        return {
            "acceptance_by_confidence_bucket": self.calibration().tolist(),
            "tried_by_depth_rank": tried[:used].long().tolist(),
            "accepted_by_depth_rank": accepted[:used].long().tolist(),
            "rates_by_depth_rank": self.rates()[: max(used, 1)].tolist(),
            # per context bucket (the target's recent confidence, low to high): first-choice nodes tried
            # at depth 1, and the rate planned with there
            "depth1_first_choice_by_context": [
                [int(self.ctx_tried[c, 0, 0]), float(self.rates(c)[0, 0])] for c in range(CONTEXT_BUCKETS)
            ],
        }


def context_bucket(confidence: float | None) -> int | None:
    """The context bucket of a request whose recent confidence (the target's probability of its own top
    token, averaged) is ``confidence``; None before the target has scored any of its positions."""
    if confidence is None:
        return None
    return min(int(confidence * CONTEXT_BUCKETS), CONTEXT_BUCKETS - 1)


def _isotonic(values: list[float], weights: list[float]) -> list[float]:
    """Weighted least-squares non-decreasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values, weights):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, c2 = blocks.pop()
            v1, w1, c1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, c1 + c2])
    return [mean for mean, _, count in blocks for _ in range(int(count))]


class CostCurve:
    """Seconds per pass as a function of its size: measured points, thread-safe.

    Robust to the spikes a shared machine produces: an update moves the average by at most
    ``COST_EMA`` of twice the current value, and a pass is never assumed to cost more than a measured
    larger one (cost is non-decreasing in size), so one slow sample cannot make a size look expensive
    forever when the plan then avoids re-measuring it. Between points, linear interpolation; beyond the
    largest, the last segment's slope or the average slope over the measured range, whichever is steeper.

    Below the smallest measured size: a pass never costs less than the smallest one (a target pass of
    1 token costs about what one of 3 does), or, ``proportional=True``, a share of it in proportion to
    the size (a draft's levels: each is a pass of its own, so 1 level costs about a third of 3; priced
    like 3, a batch size whose trees all had 3 levels would never try 1 or 2: measured on a 2-core CPU,
    2026-11-28, at 4 to 16 requests where only 3-level trees had run).
    """

    def __init__(self, proportional: bool = False) -> None:
        self._lock = threading.Lock()
        self.points: dict[int, float] = {}
        # the origin (0, 0 s) is a point of the curve (interpolation and extrapolation see it)
        self.proportional = proportional
        # (the points it was built from, sizes, monotone seconds): rebuilt when ``points`` differ from
        # them; a plan prices tens of thousands of sizes per second under load (profiled: rebuilding the
        # envelope on every lookup was 60% of planning time)
        self._envelope: tuple[tuple[tuple[int, float], ...], list[int], list[float]] = ((), [], [])

    def __getstate__(self) -> dict:
        """A snapshot without the lock (tensor-parallel ranks receive rank 0's curves pickled)."""
        with self._lock:
            return {"points": dict(self.points), "proportional": self.proportional}

    def __setstate__(self, state: dict) -> None:
        self._lock = threading.Lock()
        self.points = state["points"]
        self.proportional = state.get("proportional", False)
        self._envelope = ((), [], [])

    def observe(self, size: int, seconds: float) -> None:
        with self._lock:
            old = self.points.get(size)
            if old is None:
                self.points[size] = seconds
            else:
                self.points[size] = (1 - COST_EMA) * old + COST_EMA * min(seconds, SPIKE_FACTOR * old)

    @property
    def known(self) -> bool:
        return bool(self.points)

    def _monotone(self) -> list[tuple[int, float]]:
        sizes, seconds = self._envelope_now()
        return [(size, cost) for size, cost in zip(sizes, seconds) if size]

    def _envelope_now(self) -> tuple[list[int], list[float]]:
        with self._lock:
            points = tuple(self.points.items())  # also catches points set directly (tests, tools)
            if points != self._envelope[0]:
                floor, sizes, seconds = float("inf"), [], []
                for size, cost in sorted(points, reverse=True):
                    floor = min(floor, cost)
                    sizes.append(size)
                    seconds.append(floor)
                if self.proportional and sizes:
                    sizes.append(0)
                    seconds.append(0.0)
                self._envelope = (points, sizes[::-1], seconds[::-1])
            return self._envelope[1], self._envelope[2]

    def __call__(self, size: int) -> float:
        sizes, seconds = self._envelope_now()
        if not sizes:
            raise ValueError("no cost measured yet")
        cut = bisect.bisect_right(sizes, size)  # sizes[:cut] <= size < sizes[cut:]
        if cut and sizes[cut - 1] == size:
            return seconds[cut - 1]
        if 0 < cut < len(sizes):
            x0, y0, x1, y1 = sizes[cut - 1], seconds[cut - 1], sizes[cut], seconds[cut]
            return y0 + (y1 - y0) * (size - x0) / (x1 - x0)
        if cut == 0:  # smaller than anything measured: a pass never costs less than the smallest
            return seconds[0]
        if len(sizes) == 1:
            return seconds[0]
        # beyond the largest measured pass: the steeper of the last segment and the chord over the whole
        # measured range (the monotone floor flattens a top segment whenever a larger pass happened to
        # time faster; a flat slope would price a pass of 16 x 17 tokens like one of 17)
        x0, y0, x1, y1 = sizes[-2], seconds[-2], sizes[-1], seconds[-1]
        slope = max(0.0, (y1 - y0) / (x1 - x0), (y1 - seconds[0]) / (x1 - sizes[0]))
        return y1 + slope * (size - x1)

    def to_dict(self) -> dict[str, float]:
        return {str(k): v for k, v in self._monotone()}


# seconds of a pass by its size: a ``CostCurve``, or a view of one (the engine's batch-scaled curve)
PassCost = Callable[[int], float]


@dataclass(frozen=True)
class TreePlan:
    """What the cost model chose for one step."""

    # draft nodes (0: plain decoding), levels, and the children per expanded node the shape needs
    budget: int
    depth: int
    top_k: int
    expected_tokens: float
    expected_step_s: float
    # the shape the expectation was computed for, as sibling-rank paths
    paths: tuple[tuple[int, ...], ...] = field(default=())

    @property
    def tokens_per_s(self) -> float:
        return self.expected_tokens / self.expected_step_s


def best_shape(
    # [MAX_DEPTH, MAX_RANK] positional acceptance rates, non-increasing in rank
    rates: torch.Tensor,
    budget: int,
    depth: int,
) -> list[tuple[tuple[int, ...], float]]:
    """The ``budget`` nodes of largest path probability with at most ``depth`` levels, best first, as
    (sibling-rank path, probability of being accepted). Every prefix of the list is the best tree of its
    size (Sequoia's positional model)."""
    a: list[list[float]] = rates.tolist()
    # heap of (-probability, tie-break, rank path, parent's probability)
    heap: list[tuple[float, int, tuple[int, ...], float]] = [(-a[0][0], 0, (0,), 1.0)]
    out: list[tuple[tuple[int, ...], float]] = []
    tie = 1
    while heap and len(out) < budget:
        neg, _, path, parent_p = heapq.heappop(heap)
        p = -neg
        out.append((path, p))
        d, r = len(path), path[-1]
        if r + 1 < MAX_RANK:  # the next sibling
            heapq.heappush(heap, (-parent_p * a[min(d, MAX_DEPTH) - 1][r + 1], tie, path[:-1] + (r + 1,), parent_p))
            tie += 1
        if d < depth:  # the first child
            heapq.heappush(heap, (-p * a[min(d + 1, MAX_DEPTH) - 1][0], tie, path + (0,), p))
            tie += 1
    return out


def plan_tree(
    rates: torch.Tensor,
    verify_cost: PassCost,
    draft_cost: PassCost,
    max_budget: int,
    max_depth: int,
    min_budget: int = 0,
    margin: float = 0.0,
) -> TreePlan:
    """The (budget, depth) that maximizes expected tokens per second, or budget 0 when nothing pays
    (``min_budget=1``: the best tree with at least one node). ``margin``: a tree must beat plain
    decoding's expected tokens per second by this fraction (what the curves do not time: building the
    tree, acceptance, moving KV)."""
    # each pass size priced once (a curve lookup is a bisection; the search below reads each size per depth)
    verify = [verify_cost(n) for n in range(1, max_budget + 2)]
    plain = TreePlan(0, 0, 1, 1.0 + margin, verify[0])
    best: TreePlan | None = plain if min_budget == 0 else None
    shape: list[tuple[tuple[int, ...], float]] = []
    for depth in range(1, min(max_depth, max_budget) + 1):
        # a best shape that did not reach the last depth bound is also the best under this one
        if not shape or max(len(path) for path, _ in shape) == depth - 1:
            shape = best_shape(rates, max_budget, depth)
        step_draft = draft_cost(depth)
        expected = 1.0
        for n, (_, p) in enumerate(shape, start=1):
            expected += p
            seconds = step_draft + verify[n]
            if best is None or expected / seconds > best.tokens_per_s:
                paths = tuple(path for path, _ in shape[:n])
                best = TreePlan(n, depth, _top_k_for(paths), expected, seconds, paths)
    if best is plain:
        return TreePlan(0, 0, 1, 1.0, verify[0])
    return best or plain


def choose_tree_size(
    # estimated acceptance probabilities of the candidate nodes, best first
    accept_probs: list[float],
    draft_seconds: float,
    verify_cost: PassCost,
) -> int:
    """How many of the best candidates to verify this step: the n maximizing expected tokens per second,
    (1 + sum of the n acceptance probabilities) / (draft_seconds + V(n + 1)), with the measured verify
    curve (steps in it included). n = 0 is plain decoding (the draft work is already spent)."""
    best_n, best_rate, expected = 0, 1.0 / (draft_seconds + verify_cost(1)), 1.0
    for n, p in enumerate(accept_probs, start=1):
        expected += p
        rate = expected / (draft_seconds + verify_cost(n + 1))
        if rate > best_rate:
            best_n, best_rate = n, rate
    return best_n


def choose_ngram_budget(
    # P(an n-gram token is accepted | its parent was): the request's measured rate
    rate: float,
    max_budget: int,
    verify_cost: PassCost,
    margin: float = 0.0,
    # the step without n-gram tokens: its expected tokens, verified draft nodes and draft seconds
    # (plain decoding by default: 1 token, no node, no draft)
    base_tokens: float = 1.0,
    base_nodes: int = 0,
    draft_seconds: float = 0.0,
) -> int:
    """How many n-gram tokens to add to a step: a continuation's d-th token lands with probability
    rate^d, and k more tokens make the pass k longer; the k maximizing expected tokens per second, if it
    beats the step without them by ``margin`` (else 0). The lookup itself costs nothing."""
    def value(k: int) -> float:
        return (base_tokens + sum(rate**d for d in range(1, k + 1))) / (draft_seconds + verify_cost(base_nodes + k + 1))

    best = max(range(max_budget + 1), key=value)
    return best if best and value(best) >= (1.0 + margin) * value(0) else 0


def shrunk(prior: float, *levels: tuple[float, float]) -> float:
    """A rate from (hits, trials) counts at nested levels, most specific first (a request, its kind, all
    requests): each level's estimate is shrunk toward the next one's by PRIOR_WEIGHT pseudo-observations,
    the last toward ``prior``."""
    estimate = prior
    for hits, trials in reversed(levels):
        estimate = (hits + PRIOR_WEIGHT * estimate) / (trials + PRIOR_WEIGHT)
    return estimate


def ngram_token_s(rate: float, match: float, budget: int, verify_cost: PassCost) -> float:
    """Seconds per token decoding with lookups alone: a lookup finds a continuation with probability
    ``match`` (then ``budget`` tokens ride the pass, the d-th landing with probability rate^d), else the
    pass verifies nothing but the bonus token."""
    tokens = 1.0 + match * sum(rate**d for d in range(1, budget + 1))
    return (match * verify_cost(budget + 1) + (1.0 - match) * verify_cost(1)) / tokens


def prompt_bucket(prompt_tokens: int) -> int:
    """Prompts by length for the n-gram statistics: bucket b holds 2^(b-1) .. 2^b - 1 tokens (how much
    of an answer its prompt can supply grows with it: summaries and retrieved passages)."""
    return max(0, prompt_tokens).bit_length()


# Output lengths: before any request has ended, answers are taken to end (EOS or a stop string) after
# this many tokens on average, with the weight of one request
PRIOR_OUTPUT_TOKENS = 256


def expected_output_tokens(
    # tokens the request may still generate (max_tokens - generated)
    remaining: int,
    # requests that ended by EOS or a stop string, and all the tokens that ended requests generated
    stopped: int,
    generated: int,
) -> float:
    """Expected tokens a request still generates: each token ends it with the measured probability
    h = (stopped + 1) / (generated + PRIOR_OUTPUT_TOKENS) (a geometric length, capped by ``remaining``):
    (1 - (1 - h)^remaining) / h. A server whose answers end by EOS long before ``max_tokens`` does not
    price a catch-up as if every answer ran to it."""
    h = (stopped + 1) / (generated + PRIOR_OUTPUT_TOKENS)
    if remaining <= 0:
        return 0.0
    return (1.0 - (1.0 - h) ** remaining) / h


# a draft that cannot read a whole prompt may read its latest tokens instead, spending at most this share
# of the saving its plan expects (a windowed draft proposes worse than one that read everything)
CATCH_UP_SHARE = 0.5
# ... and at least this many tokens (with less context a draft proposes poorly)
MIN_DRAFT_WINDOW = 256


def catch_up_tokens(
    # committed tokens the draft has not seen (a prompt never drafted, or plain steps since it last ran)
    lag: int,
    # the draft's seconds to read n tokens it has not seen (a prefill-like pass), measured
    catch_up_cost: PassCost,
    # tokens the request can be expected to generate still (``expected_output_tokens``)
    remaining: float,
    plan: TreePlan,
    # seconds per token without the draft model (plain decoding, or lookups alone: ``ngram_token_s``)
    undrafted_token_s: float,
    # requests sharing each pass
    batch: int = 1,
    margin: float = 0.0,
) -> int:
    """How many of the ``lag`` tokens the draft reads before it drafts for this request: all of them,
    only the latest (a window: ``SpeculationConfig.draft_window``), or none (0: decode without the
    draft: plainly or with lookups alone).

    In the batch's wall time the plan saves ``remaining x (undrafted s/token - planned s/token)``, a saving
    the ``batch`` requests make together (each step serves them all), so this request's share is that
    / ``batch``; the catch-up pass stalls the whole batch. The draft reads everything when that costs
    less than the share (by ``margin``); else the latest tokens that cost at most ``CATCH_UP_SHARE`` of
    it, if at least ``MIN_DRAFT_WINDOW`` do. Long prompts with short answers read a window or stay
    plain, as do new requests joining a large batch."""
    saved = remaining * (undrafted_token_s - plan.expected_step_s / plan.expected_tokens) / batch
    if saved <= 0:
        return 0
    if catch_up_cost(lag) * (1.0 + margin) <= saved:
        return lag
    budget = CATCH_UP_SHARE * saved
    if lag <= MIN_DRAFT_WINDOW or catch_up_cost(MIN_DRAFT_WINDOW) > budget:
        return 0
    lo, hi = MIN_DRAFT_WINDOW, lag  # cost(lo) fits, cost(hi) does not: the longest window that fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if catch_up_cost(mid) <= budget else (lo, mid)
    return lo


class StepPolicy:
    """The engine's ``spruce.draft.model_drafter.TreePolicy`` for one step: draft confidences turned into
    acceptance estimates by the measured calibration table, costs from the measured curves.

    Expand another level iff growing the best frontier path by k more levels (k <= LOOKAHEAD) raises the
    step's expected tokens per second: the path's gain is its acceptance estimate times the rank-0
    acceptance rates of the next depths, its cost k draft forwards plus k more verified tokens."""

    def __init__(self, calibration: torch.Tensor, rates: torch.Tensor, verify_cost: PassCost, draft_cost: PassCost) -> None:
        self._calibration = calibration.tolist()
        self._next_rate = rates[:, 0].tolist()
        self.verify_cost = verify_cost
        self.draft_cost = draft_cost
        # tokens per pass the tree chosen by ``size`` is expected to emit (bonus included); None until then
        self.chosen_expected: float | None = None

    def accept_prob(self, draft_prob: float) -> float:
        bucket = min(int(draft_prob * CONFIDENCE_BUCKETS), CONFIDENCE_BUCKETS - 1)
        return self._calibration[bucket]

    def _choose(self, best_probs: list[float], levels: int) -> tuple[int, float]:
        """How many of the best candidates to verify after ``levels`` draft levels, and the tokens that
        tree is expected to emit (bonus included)."""
        accept = [self.accept_prob(p) for p in best_probs]
        n = choose_tree_size(accept, self.draft_cost(levels), self.verify_cost)
        return n, 1.0 + sum(accept[:n])

    def size(self, best_probs: list[float], levels: int) -> int:
        n, self.chosen_expected = self._choose(best_probs, levels)
        return n

    def expand(self, best_probs: list[float], frontier_prob: float, levels: int) -> bool:
        n, expected = self._choose(best_probs, levels)
        seconds = self.draft_cost(levels) + self.verify_cost(n + 1)
        # look ahead up to LOOKAHEAD levels: verify costs are not convex (on a CPU a 3-token pass can
        # cost 1.4x a 2-token one, and 5 tokens barely more than 3), so one level may not pay where two do
        path = self.accept_prob(frontier_prob)
        gain = 0.0
        for k in range(1, LOOKAHEAD + 1):
            path *= self._next_rate[min(levels + k - 1, MAX_DEPTH - 1)]
            gain += path
            cost = (self.draft_cost(levels + k) - self.draft_cost(levels)) + (self.verify_cost(n + 1 + k) - self.verify_cost(n + 1))
            if (expected + gain) * seconds > expected * (seconds + max(cost, 1e-9)):
                return True
        return False


def _top_k_for(paths: tuple[tuple[int, ...], ...]) -> int:
    """Children per expanded node and nodes expanded per level that the dynamic builder needs to be able
    to grow this shape."""
    children = max(p[-1] for p in paths) + 1
    parents = set(p[:-1] for p in paths if len(p) > 1)
    per_level: dict[int, int] = {}
    for p in parents:
        per_level[len(p)] = per_level.get(len(p), 0) + 1
    return max(children, *per_level.values()) if per_level else children
