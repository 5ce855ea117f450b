"""Adaptive speculation: what the engine measures (acceptance by position, pass costs) and, each step,
the tree each adaptive request drafts (``spruce.costmodel`` does the math; this holds the state).

Measured, engine-wide: the acceptance profile (one for greedy requests, one for sampling); the target's
seconds per pass by tokens in the pass; the draft's seconds by levels, per batch size; the draft's
seconds per token when it catches up on tokens it has not seen. The first adaptive step times both
models in calibration slots of their KV pools.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch

from spruce.config import SpeculationConfig
from spruce.costmodel import (
    COST_EMA,
    NGRAM_PRIOR_MATCH,
    NGRAM_PRIOR_RATE,
    PLAN_MARGIN,
    AcceptanceProfile,
    CostCurve,
    PassCost,
    StepPolicy,
    TreePlan,
    catch_up_tokens,
    choose_ngram_budget,
    context_bucket,
    expected_output_tokens,
    ngram_token_s,
    plan_tree,
    prompt_bucket,
    shrunk,
)
from spruce.draft.tree import TokenTree
from spruce.kvcache import Segment, SlotKVCache, run_packed

# A draft that lags by more tokens than this (a prompt it has not seen, plain steps since it last ran)
# catches up with a prefill-like pass first: drafting must pay for that (``catch_up_tokens``).
STEADY_LAG = 8
# Every this many engine steps in a row without a draft, one adaptive request drafts anyway (the profile
# keeps learning) ...
EXPLORE_EVERY = 16
# ... as long as such drafts have cost at most this share of the engine's step time (under load, where
# the plan decodes plainly, an exploring draft and its catch-up cost a whole step's worth of time on a
# CPU: measured at concurrency 8, every 16 steps was 2-3% of the run)
EXPLORE_SHARE = 0.01
# ... reading at most this many of the tokens its draft has not seen ...
EXPLORE_WINDOW = 64
# ... and only where drafting would pay at that batch size if the draft were rejected this share as often
# as measured (a workload whose acceptance rose that much would be worth noticing; if even that would not
# make a tree pay at this load, there is nothing to learn)
EXPLORE_OPTIMISM = 0.5
# A catch-up pays only over the steps on which the request will then draft. Under load most steps may
# decode plainly anyway (a partial step does not pay, ``settle``): the share of caught-up requests whose
# plan drafted and that did draft is measured per batch size, over about this many such request-steps,
# starting from this many pseudo-observations of "drafted" (at concurrency 8 on a 2-core CPU, 78 of 554
# request-steps drafted, and catch-ups priced as if all would took 5.5 of the draft's 6.7 s)
KEEP_HORIZON = 64
KEEP_PRIOR = 4.0
# Re-planning: the tree search (``plan_tree``) costs milliseconds of host time, nothing beside a CPU's
# 250 ms step but 20% of a CUDA-graphed 8 ms step (H200, 2026-11-27: the default plan, deciding plain
# decoding at every step, ran 1.2-1.3x plain decoding's step time). A plan is reused for the same kind of
# request, bounds and batch size for as many steps as keep planning under this share of the measured
# step time ...
PLAN_HOST_SHARE = 0.02
# ... and at most this many steps (the profile and the curves move slowly; a batch size is its own plan)
PLAN_MAX_AGE = 16
# ... from a table of at most this many plans (cleared when full)
MAX_PLANS = 1024
# Start-up cost measurement: a short synthetic prefix, and tree sizes to time (up to the budget + 1).
CALIBRATION_PREFIX = 32
# the draft's catch-up is also timed over this many tokens at start-up (a 32-token pass is mostly
# per-pass overhead: per token it measured 2x a 512-token one)
CATCH_UP_REFERENCE = 256
_CALIBRATION_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# timings per size at start-up; the fastest counts (the others met interference)
_CALIBRATION_REPEATS = 2


class Planner:
    """The engine's adaptive-speculation state. Each step: ``begin_step``, ``plan`` per adaptive request
    (its tree limits and dynamic-tree policy for this step, or None: plain decoding), ``end_step``; the
    engine reports what it timed (``verify_costs``, ``observe_draft``) and accepted (``profile``)."""

    def __init__(self, target, kv: SlotKVCache, drafter: Any, attention_backend: str, graphs: Any = None) -> None:
        self.target, self.kv, self.drafter, self.attention_backend = target, kv, drafter, attention_backend
        # the engine's CUDA-graph passes (``spruce.graphs``), if any: calibration times the pass the steps run
        self.graphs = graphs
        # calibration slots, held for the engine's life
        self.calib_slot = kv.allocate()
        self.draft_calib_slot = drafter.pool.allocate() if drafter is not None else -1
        # acceptance is measured apart for greedy and for sampling requests: a sampled token is accepted
        # with the target's probability of it, a greedy one when it is the target's argmax, so the rates
        # (and the confidence calibration) differ; a server serving both would mix them otherwise
        self.profile = AcceptanceProfile()
        self.sampling_profile = AcceptanceProfile()
        self.verify_costs = CostCurve()
        self.draft_costs_by_batch: dict[int, CostCurve] = {1: _draft_curve()}
        self.draft_costs = self.draft_costs_by_batch[1]
        # the draft's seconds to read n tokens it has not seen, by n (bucketed: ``observe_draft``)
        self.draft_catch_up = CostCurve()
        # plans by (sampling, context, budget, depth bound, batch size), with the step each was made on
        # (reused while younger than ``plan_every``); whether this step planned for an adaptive request;
        # the engine steps in a row that drafted nothing
        self._plans: dict[tuple[bool, int | None, int, int, int], tuple[TreePlan, int]] = {}
        self._planned_this_step = False
        self._steps = 0
        # seconds of one plan search and of one engine step (EMAs; PLAN_HOST_SHARE)
        self.plan_s = 0.0
        self.mean_step_s = 0.0
        self._steps_without_draft = 0
        self._drafted_this_step = False
        # the one request that drafts on an exploration step
        self._explorer: Any = None
        # seconds of the steps on which an adaptive request planned, and of the draft's work on exploration
        # steps (EXPLORE_SHARE)
        self.step_s = 0.0
        self.explore_s = 0.0
        # this step's requests that plan a model tree (the explorer aside), with their plans (``settle``)
        self._step_drafting: list[tuple[Any, TreePlan]] = []
        # by batch size: [drafted, planned] (decayed) over caught-up requests whose plan drafted
        self.keep_drafting: dict[int, list[float]] = {}
        self._step_caught_up = 0
        # n-gram proposals over all requests: those tried (their parent was accepted) and accepted; lookups
        # and those that found a continuation; the same four by prompt length (``prompt_bucket``): a
        # request's own counts shrink toward its prompt length's, which shrink toward all requests'
        self.ngram_tried = 0.0
        self.ngram_accepted = 0.0
        self.ngram_lookups = 0.0
        self.ngram_found = 0.0
        self.ngram_by_prompt: dict[tuple[bool, int], list[float]] = {}
        # ended requests: how many ended by EOS or a stop string, and the tokens all of them generated
        self.outputs_stopped = 0
        self.outputs_tokens = 0
        # this step's acceptance rates and confidence calibration by (sampling, context) (profiles change
        # only at commit)
        self._step_profiles: dict[tuple[bool, int | None], tuple[torch.Tensor, torch.Tensor]] = {}

    def begin_step(self, reqs: list[Any]) -> None:
        self._steps += 1
        self._planned_this_step = False
        self._step_profiles.clear()
        self._drafted_this_step = False
        self._explorer = None
        self._step_drafting = []
        self._step_caught_up = 0
        due = self._steps_without_draft + 1 >= EXPLORE_EVERY and self.explore_s <= EXPLORE_SHARE * self.step_s
        if due:  # the adaptive request whose draft lags least
            lags = {id(r): len(r.tokens) - r.draft_state.cached for r in reqs if r.adaptive and r.draft_state is not None}
            explorer = min((r for r in reqs if id(r) in lags), key=lambda r: lags[id(r)], default=None)
            if explorer is not None and self._could_pay(explorer, len(reqs)):
                self._explorer = explorer
            elif explorer is not None:  # nothing to learn at this load: look again in EXPLORE_EVERY steps
                self._steps_without_draft = 0

    def _could_pay(self, req: Any, batch: int) -> bool:
        """Whether drafting would pay at this batch size if the draft were better than measured (each
        measured rejection rate times EXPLORE_OPTIMISM): if not, an exploring draft can teach the plan
        nothing it would act on, and costs a step's worth of draft work for it (a 2-core CPU at 16
        requests, 2026-11-27: four explorations of a 1-node tree, 2.1 s of a 176 s run)."""
        spec = req.spec
        if spec is None or not (spec.uses_model and self.verify_costs.known and self.draft_costs.known):
            return True
        rates = self.profile_for(req).rates(context_bucket(req.confidence))
        optimistic = 1.0 - (1.0 - rates) * EXPLORE_OPTIMISM
        verify, draft = _BatchCurve(self.verify_costs, batch), self.draft_curve(batch)
        return plan_tree(optimistic, verify, draft, spec.budget, spec.depth, margin=PLAN_MARGIN).budget > 0

    def end_step(self) -> None:
        if self._planned_this_step:  # adaptive requests: count the steps in a row on which none drafted
            self._steps_without_draft = 0 if self._drafted_this_step else self._steps_without_draft + 1

    def observe_step(self, seconds: float) -> None:
        """A whole speculative step's seconds (draft, target pass, commit), counted where an adaptive
        request planned: exploration's share and the plans' reuse are shares of those steps' time (a
        fixed tree's long steps beside them would let exploration spend more on the adaptive ones)."""
        if not self._planned_this_step:
            return
        self.step_s += seconds
        self.mean_step_s = _ema(self.mean_step_s, seconds)

    @property
    def plan_every(self) -> int:
        """Steps a plan is reused for: planning stays under PLAN_HOST_SHARE of the step time."""
        if not self.mean_step_s:
            return 1
        return max(1, min(PLAN_MAX_AGE, math.ceil(self.plan_s / (PLAN_HOST_SHARE * self.mean_step_s))))

    def observe_draft(self, batch: int, lags: list[int], levels: int, seconds: float) -> None:
        """One batched propose of ``batch`` requests' trees (those that drafted, not the step's whole
        batch): the curve by levels at that batch size (steady steps) and the catch-up curve; on an
        exploration step where only the explorer drafted, the exploration's cost."""
        if self._explorer is not None and batch == 1 and not self._step_drafting:
            self.explore_s += seconds
        if max(lags) <= STEADY_LAG:
            self.draft_costs_by_batch.setdefault(batch, _draft_curve()).observe(levels, seconds)
        feed_s, fed = self.drafter.last_feed
        if fed >= CALIBRATION_PREFIX:  # a catch-up pass: its own cost curve
            self.observe_catch_up(fed, feed_s)

    def observe_catch_up(self, fed: int, seconds: float) -> None:
        """A draft pass that read ``fed`` tokens, as a point of the catch-up curve at the nearest power
        of two (its time scaled to that size: locally a catch-up costs in proportion to its tokens)."""
        bucket = 2 ** round(math.log2(fed))
        self.draft_catch_up.observe(bucket, seconds * bucket / fed)

    def telemetry(self) -> dict[str, Any]:
        return {
            "acceptance_profile": self.profile.to_dict(),
            "acceptance_profile_sampling": self.sampling_profile.to_dict(),
            "verify_cost_s_by_tree_tokens": self.verify_costs.to_dict(),
            "draft_cost_s_by_levels": self.draft_costs.to_dict(),
            "draft_cost_s_by_batch_and_levels": {str(b): c.to_dict() for b, c in sorted(self.draft_costs_by_batch.items()) if c.known},
            "draft_catch_up_s_per_token": self.draft_catch_up(CATCH_UP_REFERENCE) / CATCH_UP_REFERENCE if self.draft_catch_up.known else 0.0,
            "draft_catch_up_s_by_tokens": self.draft_catch_up.to_dict(),
            "exploration_share": self.explore_s / self.step_s if self.step_s else 0.0,
            "keep_drafting_share_by_batch": {str(b): d / p for b, (d, p) in sorted(self.keep_drafting.items())},
            # n-gram lookups by prompt length (the bucket's shortest prompt), greedy and sampling apart
            "ngram_by_prompt_tokens": self._ngram_table(sampling=False),
            "ngram_by_prompt_tokens_sampling": self._ngram_table(sampling=True),
        }

    def _ngram_table(self, sampling: bool) -> dict[str, dict[str, float]]:
        """Lookups, the share that found a continuation, n-gram tokens tried (parent accepted) and the
        share accepted, by prompt length."""
        return {
            str(2 ** (b - 1) if b else 0): {
                "lookups": int(n),
                "match_rate": found / n if n else 0.0,
                "tried": int(tried),
                "accept_rate": accepted / tried if tried else 0.0,
            }
            for (s, b), (n, found, tried, accepted) in sorted(self.ngram_by_prompt.items())
            if s == sampling
        }

    def plan(self, req: Any, spec: SpeculationConfig, batch: int) -> SpeculationConfig | None:
        """This step's tree from the cost model; ``spec``'s depth and budget are the upper bounds.

        The plan (positional acceptance profile x measured costs) decides whether to draft and how wide;
        dynamic trees then expand while the draft's confidence pays for a level and keep the number of
        nodes that maximizes expected tokens per second under the measured verify curve
        (``choose_tree_size``). Sampled-children trees cannot be cut by confidence (it would bias the
        sampling), so they take the plan's budget and depth as they are.

        Under load (``batch`` requests in the step) every request's nodes share one target pass: the
        costs are those of the batch as if each request chose like this one (verify cost at ``batch``
        times the tree's tokens, draft cost per level measured at this batch size), so the plan shrinks
        trees, down to plain decoding, as the pass grows.
        """
        if not (spec.uses_model and self.drafter is not None):
            fixed = dataclasses.replace(spec, adaptive=False)
            return self.ngram_only(req, fixed, batch) if spec.uses_ngram else fixed
        if not self.draft_costs.known:
            self.calibrate(dataclasses.replace(spec, adaptive=False))
        sampling, context = not req.params.greedy, context_bucket(req.confidence)

        def step_profile() -> tuple[torch.Tensor, torch.Tensor]:
            if (sampling, context) not in self._step_profiles:
                profile = self.profile_for(req)
                self._step_profiles[sampling, context] = (profile.rates(context), profile.calibration())
            return self._step_profiles[sampling, context]

        # (on a fast device a step is milliseconds: a request that decodes plainly this step, the usual
        # case under load, builds nothing here that it does not use)
        verify = _BatchCurve(self.verify_costs, batch)
        self._planned_this_step = True
        key = (sampling, context, spec.budget, spec.depth, batch)
        made = self._plans.get(key)
        # a plan to decode plainly stands for PLAN_MAX_AGE steps: under load it is the usual plan of every
        # request, and re-made each step it was ~1% of a 2-core CPU's step at 16 requests (exploration
        # keeps learning meanwhile; a plan that drafts is re-made as ``plan_every`` says)
        if made is not None and self._steps - made[1] < (PLAN_MAX_AGE if made[0].budget == 0 else self.plan_every):
            plan = made[0]
        else:
            t0 = time.perf_counter()
            plan = plan_tree(step_profile()[0], verify, self.draft_curve(batch), spec.budget, spec.depth, margin=PLAN_MARGIN)
            seconds = time.perf_counter() - t0
            self.plan_s = _ema(self.plan_s, seconds)
            if len(self._plans) >= MAX_PLANS:  # requests' own bounds vary: keep the table small
                self._plans.clear()
            self._plans[key] = (plan, self._steps)
        budget, window = plan.budget, 0
        lag = len(req.tokens) - req.draft_state.cached if req.draft_state is not None else 0
        if budget and lag <= STEADY_LAG and req is not self._explorer:
            self._step_caught_up += 1
        if budget and lag > STEADY_LAG and self.draft_catch_up.known:
            # the tokens it will draft for: its remaining ones, on the share of steps that draft
            remaining = self.expected_remaining(req) * self.keep_share(batch)
            # priced against what the request decodes at without its draft: plainly, or with lookups alone
            # (a summary that copies its article gains more from them than from reading it: ``ngram_token_s``)
            read = catch_up_tokens(lag, self.draft_catch_up, remaining, plan, self.undrafted_token_s(req, spec, verify), batch, PLAN_MARGIN)
            budget = budget if read else 0
            window = read if read < lag else 0
        if budget == 0 and req is self._explorer:
            # now and then one request drafts anyway, so that the profile keeps learning (reading
            # little: a draft far behind reads the latest EXPLORE_WINDOW tokens)
            plan = plan_tree(step_profile()[0], verify, self.draft_curve(batch), spec.budget, spec.depth, min_budget=1)
            budget = plan.budget
            window = EXPLORE_WINDOW if lag > EXPLORE_WINDOW else 0
        self._drafted_this_step |= budget > 0
        req.stats.record_plan(budget, plan.expected_tokens)
        if budget == 0:
            return self.ngram_only(req, dataclasses.replace(spec, adaptive=False), batch) if spec.uses_ngram else None
        fixed = dataclasses.replace(spec, adaptive=False)
        if window and not 0 < fixed.draft_window <= window:  # a request's own smaller window stands
            fixed = dataclasses.replace(fixed, draft_window=window)
        draft = self.draft_curve(batch)
        if req is not self._explorer:
            self._step_drafting.append((req, plan))
        if spec.uses_ngram:  # n-gram tokens on top of the model's tree: only as many as pay for their pass
            k = choose_ngram_budget(
                self.ngram_rate(req), spec.ngram_budget, verify, PLAN_MARGIN, plan.expected_tokens, plan.budget, draft(plan.depth)
            )
            fixed = dataclasses.replace(fixed, ngram_budget=k) if k else dataclasses.replace(fixed, drafter="model")
        if req.sampling is not None and spec.sampled_children:
            return dataclasses.replace(fixed, depth=plan.depth, top_k=plan.top_k, budget=plan.budget)
        rates, calibration = step_profile()
        req.policy = StepPolicy(calibration, rates, verify, draft)
        return dataclasses.replace(fixed, top_k=plan.top_k)

    def settle(self, reqs: list[Any], specs: list[SpeculationConfig | None]) -> list[SpeculationConfig | None]:
        """The step as a whole. Each plan priced the batch as if every request drafted like it; when only
        some of them draft (the others could not pay to bring their draft up to date, or are not
        adaptive), the draft's levels still cost a pass each, for fewer requests' gain. Priced again with
        the requests that do draft: if the step beats plain decoding of the whole batch by less than the
        plan's margin, those requests decode plainly this step (the exploring request still drafts)."""
        drafting, batch = self._step_drafting, len(reqs)
        if not drafting or len(drafting) == batch:
            self._observe_keep(batch, drafted=True)
            return specs
        verify = self.verify_costs
        nodes = sum(plan.budget for _, plan in drafting)
        seconds = self.draft_curve(len(drafting))(max(plan.depth for _, plan in drafting)) + verify(batch + nodes)
        tokens = batch - len(drafting) + sum(plan.expected_tokens for _, plan in drafting)
        if tokens / seconds >= (1.0 + PLAN_MARGIN) * batch / verify(batch):
            self._observe_keep(batch, drafted=True)
            return specs
        self._observe_keep(batch, drafted=False)
        index = {id(r): i for i, r in enumerate(reqs)}
        for req, plan in drafting:
            i = index[id(req)]
            spec = specs[i]
            assert spec is not None  # a request that plans a model tree returned its spec
            req.policy = None
            planned = req.stats.steps_by_planned_budget
            planned[plan.budget] -= 1
            if not planned[plan.budget]:
                del planned[plan.budget]
            req.stats.record_plan(0)
            specs[i] = self.ngram_only(req, spec, batch) if spec.uses_ngram else None
        explorer = index.get(id(self._explorer))
        self._drafted_this_step = explorer is not None and specs[explorer] is not None
        return specs

    def _observe_keep(self, batch: int, drafted: bool) -> None:
        """This step's caught-up requests whose plan drafted: whether they did draft (``keep_share``).

        A step with none of them is no evidence either way, and the share moves back toward "drafted" by
        1 / KEEP_HORIZON of the gap: without that, a low share is a trap. Catch-ups priced on it are
        declined, so newly arrived requests never catch up, no caught-up request is left to plan a tree
        and correct the share, and that batch size decodes plainly for good (load harness, 2-core CPU,
        2026-11-28: at 4 requests after the 1- and 2-request phases, share 0.18, 332 of 362 request-steps
        plain, 1.05x; a fresh engine at 4 requests: share 0.98, 1.22x)."""
        n = self._step_caught_up
        counts = self.keep_drafting.get(batch)
        if not n:
            if counts is not None:
                counts[0] += (counts[1] - counts[0]) / KEEP_HORIZON
            return
        if counts is None:
            counts = self.keep_drafting[batch] = [KEEP_PRIOR, KEEP_PRIOR]
        decay = (1.0 - 1.0 / KEEP_HORIZON) ** n
        counts[0] = counts[0] * decay + (n if drafted else 0)
        counts[1] = counts[1] * decay + n

    def keep_share(self, batch: int) -> float:
        """The measured share of steps at this batch size on which a caught-up request whose plan drafts
        does draft (1.0 until measured)."""
        drafted, planned = self.keep_drafting.get(batch, (1.0, 1.0))
        return drafted / planned

    def ngram_only(self, req: Any, spec: SpeculationConfig, batch: int) -> SpeculationConfig | None:
        """No draft model this step: the n-gram tokens worth verifying, from the request's measured
        n-gram acceptance (shrunk toward all requests') and the verify curve at this batch size; None
        (plain decoding) when none pays."""
        if not self.verify_costs.known:
            return dataclasses.replace(spec, drafter="ngram")  # nothing measured yet: as configured
        k = choose_ngram_budget(self.ngram_rate(req), spec.ngram_budget, _BatchCurve(self.verify_costs, batch), PLAN_MARGIN)
        return dataclasses.replace(spec, drafter="ngram", ngram_budget=k) if k else None

    def profile_for(self, req: Any) -> AcceptanceProfile:
        """The acceptance profile a request's trees are planned with and recorded in (greedy or sampling)."""
        return self.profile if req.params.greedy else self.sampling_profile

    def record_output(self, generated: int, stopped: bool) -> None:
        """An ended request: its tokens, and whether EOS or a stop string ended it (not max_tokens)."""
        self.outputs_tokens += generated
        self.outputs_stopped += stopped

    def expected_remaining(self, req: Any) -> float:
        """The tokens this request can be expected to generate still: exactly its remaining budget
        when nothing but max_tokens can end it, else from the measured output lengths."""
        if req.params.ignore_eos and not req.params.stop:
            return float(req.stopper.remaining)
        return expected_output_tokens(req.stopper.remaining, self.outputs_stopped, self.outputs_tokens)

    def _ngram_counts(self, req: Any) -> list[float]:
        """[lookups, found, tried, accepted] of the requests with this one's prompt length and mode (a
        sampled n-gram token lands with the target's probability of it, a greedy one when it is the
        argmax)."""
        key = (not req.params.greedy, prompt_bucket(len(req.prompt_ids)))
        return self.ngram_by_prompt.setdefault(key, [0.0, 0.0, 0.0, 0.0])

    def ngram_rate(self, req: Any) -> float:
        """P(an n-gram token is accepted | its parent was), for this request."""
        _, _, tried, accepted = self._ngram_counts(req)
        return shrunk(NGRAM_PRIOR_RATE, (req.ngram_accepted, req.ngram_tried), (accepted, tried), (self.ngram_accepted, self.ngram_tried))

    def ngram_match(self, req: Any) -> float:
        """P(a lookup finds a continuation at all), for this request."""
        lookups, found, _, _ = self._ngram_counts(req)
        return shrunk(NGRAM_PRIOR_MATCH, (req.ngram_found, req.ngram_lookups), (found, lookups), (self.ngram_found, self.ngram_lookups))

    def undrafted_token_s(self, req: Any, spec: SpeculationConfig, verify: PassCost) -> float:
        """Seconds per token of this request without its draft model: plain decoding, or lookups alone
        where its spec uses them and they pay (``ngram_token_s``)."""
        if not spec.uses_ngram:
            return verify(1)
        rate = self.ngram_rate(req)
        k = choose_ngram_budget(rate, spec.ngram_budget, verify, PLAN_MARGIN)
        return ngram_token_s(rate, self.ngram_match(req), k, verify) if k else verify(1)

    def record_lookup(self, req: Any, found: bool) -> None:
        """One n-gram lookup for this request, and whether it found a continuation."""
        counts = self._ngram_counts(req)
        counts[0] += 1
        counts[1] += found
        req.ngram_lookups += 1
        req.ngram_found += found
        self.ngram_lookups += 1
        self.ngram_found += found

    def record_ngram(self, req: Any, tree: TokenTree, accepted_nodes: list[int], first: int) -> None:
        """Count the n-gram nodes (indices ``first`` on) whose parent was accepted, and those accepted."""
        on_path = set(accepted_nodes)
        parents = tree.parents.tolist()
        tried = [n for n in range(max(first, 1), tree.num_nodes) if parents[n] in on_path]
        hits = sum(n in on_path for n in tried)
        req.ngram_tried += len(tried)
        req.ngram_accepted += hits
        self.ngram_tried += len(tried)
        self.ngram_accepted += hits
        counts = self._ngram_counts(req)
        counts[2] += len(tried)
        counts[3] += hits

    def draft_curve(self, batch: int) -> CostCurve:
        """The draft's seconds by levels at this batch size (the nearest measured size until this one is)."""
        known = [b for b, c in self.draft_costs_by_batch.items() if c.known]
        if batch in known or not known:
            return self.draft_costs_by_batch.setdefault(batch, _draft_curve())
        return self.draft_costs_by_batch[min(known, key=lambda b: abs(math.log(b / batch)))]

    def calibrate(self, spec: SpeculationConfig) -> None:
        """Start-up measurement of the pass costs, in the engine's own calibration slot: the target over
        1 .. budget + 1 chain tokens and the draft over one token, after a short synthetic prefix (online
        timings refine both afterwards)."""
        assert self.drafter is not None
        vocab = int(self.target.config.vocab_size)
        prefix = torch.arange(CALIBRATION_PREFIX) % vocab
        positions = torch.arange(CALIBRATION_PREFIX)
        slot = self.calib_slot
        self.kv.lengths[slot] = 0
        run_packed(self.target, self.kv, [Segment(slot, prefix, positions, logits="none")])
        sizes = sorted({s for s in _CALIBRATION_SIZES if s <= spec.budget + 1} | {1, spec.budget + 1})
        for size in [1, *sizes]:  # the first pass warms up
            tree = TokenTree.chain(int(prefix[-1]), prefix[: size - 1].tolist())
            timings = []
            for _ in range(_CALIBRATION_REPEATS):
                t0 = time.perf_counter()
                tail = None if size == 1 else tree.ancestor_mask
                segment = Segment(slot, tree.tokens, tree.depth + CALIBRATION_PREFIX, tail=tail)
                if self.graphs is None or self.graphs.run([segment]) is None:
                    run_packed(self.target, self.kv, [segment], self.attention_backend)
                timings.append(time.perf_counter() - t0)
                self.kv.keep(slot, CALIBRATION_PREFIX, [])
            self.verify_costs.observe(size, min(timings))
        dslot = self.draft_calib_slot
        pool = self.drafter.pool
        # the catch-up curve's first points (the first pass warms up), ending with the prefix in the slot
        for i, n in enumerate((CALIBRATION_PREFIX, CATCH_UP_REFERENCE, CALIBRATION_PREFIX)):
            pool.lengths[dslot] = 0
            t0 = time.perf_counter()
            self.drafter.forward([Segment(dslot, torch.arange(n) % vocab, torch.arange(n), logits="last")])
            if i:
                self.draft_catch_up.observe(n, time.perf_counter() - t0)
        timings = []
        for _ in range(_CALIBRATION_REPEATS):
            t0 = time.perf_counter()
            self.drafter.forward([Segment(dslot, prefix[:1], positions[-1:] + 1, logits="last")])
            timings.append(time.perf_counter() - t0)
            pool.keep(dslot, CALIBRATION_PREFIX, [])
        one = min(timings)
        self.draft_costs.observe(1, one)
        self.draft_costs.observe(2, 2 * one)


def _ema(mean: float, seconds: float) -> float:
    """A moving average of timings (COST_EMA), starting at the first one (0.0: none yet)."""
    return seconds if not mean else (1 - COST_EMA) * mean + COST_EMA * seconds


class _BatchCurve:
    """The verify curve seen by one request of a batch whose requests all choose like it: n tokens
    per request cost what a pass over ``batch * n`` tokens costs."""

    def __init__(self, curve: CostCurve, batch: int) -> None:
        self.curve, self.batch = curve, batch

    def __call__(self, size: int) -> float:
        return self.curve(self.batch * size)


def _draft_curve() -> CostCurve:
    """The draft's seconds by levels (at one batch size): each level is a pass of its own, so fewer
    levels than any measured cost their share of the fewest measured (``CostCurve(proportional=True)``)."""
    return CostCurve(proportional=True)
