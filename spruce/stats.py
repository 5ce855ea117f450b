"""Per-request speculation telemetry: plain counters plus the definitions of what they mean.

Definitions (one place; every sink, from JSON to gRPC to Prometheus, uses these):
- step: one target verify pass. Every output token comes from a step; the first step's pass also
  prefills the prompt (prompt and first tree in one pass), so ``steps`` counts every target pass.
- prefill_time_s: that first pass (prompt + first tree); verify_time_s: the later target passes.
- drafted: draft tokens proposed (tree nodes other than the root), summed over steps.
- accepted: draft tokens that were accepted by verification and emitted. The bonus token is NOT counted.
- mean accepted length: output tokens / steps, i.e. tokens emitted per target pass, COUNTING the bonus
  token. Plain decoding has exactly 1.0; it is the factor by which speculation cuts target passes.
- acceptance rate: accepted / drafted (for a tree, the denominator counts every branch).
- steps by tree size: how many steps verified a tree of n draft nodes (0: plain decoding); with adaptive
  speculation, ``steps_by_planned_budget`` counts the cost model's choices (n-gram nodes come on top).
- plan calibration (adaptive speculation): over the steps the cost model planned a tree for,
  ``planned_expected_tokens`` sums what the verified tree was expected to emit (bonus included) and
  ``planned_emitted_tokens`` what those passes emitted; their ratio says whether the acceptance
  estimates hold. The expectation is the plan's where the tree is built to the plan's shape (sampled
  children), and the dynamic policy's where it cut a greedy tree to size from the draft's confidences.
  n-gram nodes added on top count in the emitted tokens, not in the expectation.
- by depth: ``drafted_by_depth[d-1]`` counts steps whose tree reached depth d, ``accepted_by_depth[d-1]``
  the steps in which a node at depth d was accepted; their ratio is the acceptance rate at depth d.
Output truncation at a stop condition removes tokens from ``accepted`` (they were not emitted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SpecStats:
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    output_tokens: int = 0
    drafted_by_depth: list[int] = field(default_factory=list)
    accepted_by_depth: list[int] = field(default_factory=list)
    steps_by_tree_size: dict[int, int] = field(default_factory=dict)
    steps_by_planned_budget: dict[int, int] = field(default_factory=dict)
    planned_steps: int = 0
    planned_expected_tokens: float = 0.0
    planned_emitted_tokens: int = 0
    # the expectation of the plan made for the coming step (0: no tree planned); not a counter
    _pending_expected: float = field(default=0.0, repr=False, compare=False)
    prefill_time_s: float = 0.0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    wall_time_s: float = 0.0

    def record_step(self, tree_depth: int, num_drafted: int, emitted_draft_tokens: int, emitted: int) -> None:
        """Count one verify pass: a tree of ``tree_depth`` levels, and what of it was emitted."""
        self.steps += 1
        self.drafted += num_drafted
        self.accepted += emitted_draft_tokens
        self.output_tokens += emitted
        self.steps_by_tree_size[num_drafted] = self.steps_by_tree_size.get(num_drafted, 0) + 1
        if self._pending_expected:
            self.planned_steps += 1
            self.planned_expected_tokens += self._pending_expected
            self.planned_emitted_tokens += emitted
            self._pending_expected = 0.0
        _grow(self.drafted_by_depth, tree_depth)
        _grow(self.accepted_by_depth, tree_depth)
        for d in range(tree_depth):
            self.drafted_by_depth[d] += 1
        for d in range(emitted_draft_tokens):
            self.accepted_by_depth[d] += 1

    def merge(self, other: SpecStats) -> None:
        """Add another request's counters to these (server-wide totals); times are not summed."""
        self.steps += other.steps
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.output_tokens += other.output_tokens
        self.planned_steps += other.planned_steps
        self.planned_expected_tokens += other.planned_expected_tokens
        self.planned_emitted_tokens += other.planned_emitted_tokens
        for mine, theirs in ((self.drafted_by_depth, other.drafted_by_depth), (self.accepted_by_depth, other.accepted_by_depth)):
            _grow(mine, len(theirs))
            for i, count in enumerate(theirs):
                mine[i] += count
        for mine_d, theirs_d in (
            (self.steps_by_tree_size, other.steps_by_tree_size),
            (self.steps_by_planned_budget, other.steps_by_planned_budget),
        ):
            for key, count in theirs_d.items():
                mine_d[key] = mine_d.get(key, 0) + count

    def record_plan(self, budget: int, expected_tokens: float = 0.0) -> None:
        """The cost model's choice for the coming step: a tree of ``budget`` nodes (0: plain decoding)
        expected to emit ``expected_tokens`` (bonus included), settled by the step's ``record_step``."""
        self.steps_by_planned_budget[budget] = self.steps_by_planned_budget.get(budget, 0) + 1
        self._pending_expected = expected_tokens if budget else 0.0

    def refine_plan(self, expected_tokens: float) -> None:
        """The verified tree differs from the plan's (a dynamic policy cut it to size): its own
        expectation replaces the plan's for the coming step, if a tree was planned."""
        if self._pending_expected:
            self._pending_expected = expected_tokens

    @property
    def mean_accepted_length(self) -> float:
        return self.output_tokens / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_by_depth(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_by_depth, self.drafted_by_depth)]

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_time_s if self.wall_time_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape of the stats (CLI ``--json``, API): counters plus the derived rates."""
        return {
            "steps": self.steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "output_tokens": self.output_tokens,
            "mean_accepted_length": self.mean_accepted_length,
            "acceptance_rate": self.acceptance_rate,
            "acceptance_by_depth": self.acceptance_by_depth,
            "drafted_by_depth": list(self.drafted_by_depth),
            "accepted_by_depth": list(self.accepted_by_depth),
            "steps_by_tree_size": {str(k): v for k, v in sorted(self.steps_by_tree_size.items())},
            "steps_by_planned_budget": {str(k): v for k, v in sorted(self.steps_by_planned_budget.items())},
            "planned_steps": self.planned_steps,
            "planned_expected_tokens": self.planned_expected_tokens,
            "planned_emitted_tokens": self.planned_emitted_tokens,
            "prefill_time_s": self.prefill_time_s,
            "draft_time_s": self.draft_time_s,
            "verify_time_s": self.verify_time_s,
            "wall_time_s": self.wall_time_s,
            "tokens_per_s": self.tokens_per_s,
        }


def _grow(counts: list[int], length: int) -> None:
    counts.extend([0] * (length - len(counts)))
