"""Choosing the draft tree from measurements: acceptance profile x pass costs (Sequoia-style).

Terms.
- a[d][r], the positional acceptance rate: the probability that the child of sibling rank r (0 = the
  draft's first choice) at depth d is accepted, given that its parent was accepted and the child exists.
  With greedy verification (and with sampling, where siblings are tested in rank order) the events "rank
  r is accepted" are disjoint among siblings, so a node's probability of being on the accepted path is the
  product of a[.][.] along its root path, and the expected tokens per step are 1 (the bonus or recovered
  token) plus the sum of those products over the tree (Sequoia, Chen et al. 2024).
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

import dataclasses
import heapq
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
# The confidence threshold for expanding a level never exceeds this (a very slow draft should be turned
# off by the plan, not by a threshold no path can meet).
MAX_EXPAND_THRESHOLD = 0.9
# Bounds on the confidence calibration (a draft is neither trusted blindly nor written off by a few steps).
MIN_CALIBRATION, MAX_CALIBRATION = 0.25, 2.0
# Weight of a new timing in the moving average of a pass cost, and the most a single timing may count
# for relative to the current average (a spike from another process must not dominate).
COST_EMA = 0.2
SPIKE_FACTOR = 2.0


class AcceptanceProfile:
    """Online counts of tried / accepted draft nodes by depth and sibling rank (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # [MAX_DEPTH, MAX_RANK] nodes whose parent was accepted, and those accepted
        self.tried = torch.zeros(MAX_DEPTH, MAX_RANK, dtype=torch.float64)
        self.accepted = torch.zeros(MAX_DEPTH, MAX_RANK, dtype=torch.float64)
        # sum over verified trees of the draft's path probabilities, and of the draft tokens accepted
        self.predicted_total = 0.0
        self.accepted_total = 0.0

    def record_confidence(self, predicted: float, accepted: int) -> None:
        """One verified tree: the sum of its nodes' draft path probabilities and how many were accepted."""
        with self._lock:
            self.predicted_total += predicted
            self.accepted_total += accepted

    @property
    def calibration(self) -> float:
        """Accepted draft tokens per unit of draft path probability: the factor that turns the draft's
        confidence into an acceptance estimate (1 before any evidence)."""
        with self._lock:
            ratio = (self.accepted_total + PRIOR_WEIGHT) / (self.predicted_total + PRIOR_WEIGHT)
        return min(max(ratio, MIN_CALIBRATION), MAX_CALIBRATION)

    def record(
        self,
        tree: TokenTree,
        # [K+1] accepted node indices, root first
        accepted_nodes: list[int],
        # [N] bool nodes to leave out (n-gram proposals); None keeps all
        exclude: torch.Tensor | None = None,
    ) -> None:
        on_path = set(accepted_nodes)
        parents = tree.parents.tolist()
        depth = tree.depth.tolist()
        ranks: dict[int, int] = {}
        cells = []
        for node in range(1, tree.num_nodes):
            rank = ranks.get(parents[node], 0)
            ranks[parents[node]] = rank + 1
            if exclude is not None and bool(exclude[node]):
                continue
            if parents[node] in on_path:
                cells.append((min(depth[node], MAX_DEPTH) - 1, min(rank, MAX_RANK - 1), node in on_path))
        with self._lock:
            for d, r, hit in cells:
                self.tried[d, r] += 1
                self.accepted[d, r] += hit

    def rates(self) -> torch.Tensor:
        """[MAX_DEPTH, MAX_RANK] smoothed a[d][r], non-increasing in r.

        Each cell shrinks toward its rank's rate pooled over depths, which shrinks toward the prior, so a
        depth never tried borrows what the shallower ones measured."""
        with self._lock:
            tried, accepted = self.tried.clone(), self.accepted.clone()
        prior = PRIOR_RATE * PRIOR_DECAY ** torch.arange(MAX_RANK, dtype=torch.float64)
        pooled = (accepted.sum(0) + PRIOR_WEIGHT * prior) / (tried.sum(0) + PRIOR_WEIGHT)
        rates = (accepted + PRIOR_WEIGHT * pooled) / (tried + PRIOR_WEIGHT)
        return torch.cummin(rates, dim=1).values

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            tried, accepted = self.tried.clone(), self.accepted.clone()
        used = int((tried.sum(1) > 0).sum())
        return {
            "confidence_calibration": self.calibration,
            "tried_by_depth_rank": tried[:used].long().tolist(),
            "accepted_by_depth_rank": accepted[:used].long().tolist(),
            "rates_by_depth_rank": self.rates()[: max(used, 1)].tolist(),
        }


class CostCurve:
    """Seconds per pass as a function of its size: measured points, thread-safe.

    Robust to the spikes a shared machine produces: an update moves the average by at most
    ``COST_EMA`` of twice the current value, and a pass is never assumed to cost more than a measured
    larger one (cost is non-decreasing in size), so one slow sample cannot make a size look expensive
    forever when the plan then avoids re-measuring it. Between points, linear interpolation.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.points: dict[int, float] = {}

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
        with self._lock:
            pts = sorted(self.points.items())
        out: list[tuple[int, float]] = []
        floor = float("inf")
        for size, seconds in reversed(pts):
            floor = min(floor, seconds)
            out.append((size, floor))
        return out[::-1]

    def __call__(self, size: int) -> float:
        pts = self._monotone()
        if not pts:
            raise ValueError("no cost measured yet")
        below = [p for p in pts if p[0] <= size]
        above = [p for p in pts if p[0] > size]
        if below and below[-1][0] == size:
            return below[-1][1]
        if below and above:
            (x0, y0), (x1, y1) = below[-1], above[0]
            return y0 + (y1 - y0) * (size - x0) / (x1 - x0)
        if above:  # smaller than anything measured: a pass never costs less than the smallest
            return above[0][1]
        if len(below) == 1:
            return below[0][1]
        (x0, y0), (x1, y1) = below[-2], below[-1]
        return y1 + max(0.0, (y1 - y0) / (x1 - x0)) * (size - x1)

    def to_dict(self) -> dict[str, float]:
        return {str(k): v for k, v in self._monotone()}


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
    # expand another draft level only if its best path's draft probability (the draft's confidence, a
    # proxy for the chance it is accepted) is worth a level's cost at the plan's tokens per second
    min_expand_prob: float = 0.0

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
    a = rates.tolist()
    # heap of (-probability, tie-break, rank path, parent's probability)
    heap = [(-a[0][0], 0, (0,), 1.0)]
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
    verify_cost: CostCurve,
    draft_cost: CostCurve,
    max_budget: int,
    max_depth: int,
    min_budget: int = 0,
    calibration: float = 1.0,
) -> TreePlan:
    """The (budget, depth) that maximizes expected tokens per second, or budget 0 when nothing pays
    (``min_budget=1``: the best tree with at least one node)."""
    plain = TreePlan(0, 0, 1, 1.0, verify_cost(1))
    best: TreePlan | None = plain if min_budget == 0 else None
    for depth in range(1, min(max_depth, max_budget) + 1):
        shape = best_shape(rates, max_budget, depth)
        step_draft = draft_cost(depth)
        expected = 1.0
        for n, (_, p) in enumerate(shape, start=1):
            expected += p
            seconds = step_draft + verify_cost(n + 1)
            if best is None or expected / seconds > best.tokens_per_s:
                paths = tuple(path for path, _ in shape[:n])
                best = TreePlan(n, depth, _top_k_for(paths), expected, seconds, paths)
    if best is None or best.budget == 0:
        return plain
    level_cost = max(0.0, draft_cost(2) - draft_cost(1))
    threshold = level_cost * best.tokens_per_s / calibration
    return dataclasses.replace(best, min_expand_prob=min(MAX_EXPAND_THRESHOLD, threshold))


def choose_tree_size(
    # draft path probabilities of the candidate nodes, best first
    probs: list[float],
    calibration: float,
    draft_seconds: float,
    verify_cost: CostCurve,
) -> int:
    """How many of the best candidates to verify this step: the n maximizing expected tokens per second,
    (1 + sum of the n calibrated probabilities) / (draft_seconds + V(n + 1)), with the measured verify
    curve (steps in it included). n = 0 is plain decoding (the draft work is already spent)."""
    best_n, best_rate, expected = 0, 1.0 / (draft_seconds + verify_cost(1)), 1.0
    for n, p in enumerate(probs, start=1):
        expected += min(1.0, calibration * p)
        rate = expected / (draft_seconds + verify_cost(n + 1))
        if rate > best_rate:
            best_n, best_rate = n, rate
    return best_n


def _top_k_for(paths: tuple[tuple[int, ...], ...]) -> int:
    """Children per expanded node and nodes expanded per level that the dynamic builder needs to be able
    to grow this shape."""
    children = max(p[-1] for p in paths) + 1
    parents = set(p[:-1] for p in paths if len(p) > 1)
    per_level: dict[int, int] = {}
    for p in parents:
        per_level[len(p)] = per_level.get(len(p), 0) + 1
    return max(children, *per_level.values()) if per_level else children
