"""The speculative engine: one request at a time, token ids in, token ids (and text) out.

Per request: prefill the target with the prompt minus its last token; then each step the drafter proposes a
tree rooted at the last committed token, the target verifies every node in one pass, the accepted root
path plus the bonus token are committed, and both KV caches keep exactly that path. ``speculation=None``
runs the same loop with a root-only tree: plain target decoding, the baseline for every speedup.

Greedy output is token-identical to plain greedy decoding of the target (see ``spruce.verify.greedy``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch

from spruce.config import EngineConfig, SamplingParams, SpeculationConfig, default_speculation, fixed_speculation
from spruce.costmodel import AcceptanceProfile, CostCurve, StepPolicy, plan_tree
from spruce.draft.model_drafter import DraftSampling, DraftState, ModelDrafter
from spruce.draft.ngram import add_ngram_branches
from spruce.draft.tree import Proposal, TokenTree, path_logprobs
from spruce.errors import InvalidRequestError
from spruce.modeling import forward_tokens, keep_cache_positions, new_cache
from spruce.pairing import (
    check_cache_layout,
    check_pair,
    check_tokenizers,
    eos_ids,
    pick_draft_dtype,
    torch_dtype,
)
from spruce.stats import SpecStats
from spruce.stopping import FINISH_ABORT, StopChecker
from spruce.verify.accept import accept
from spruce.verify.tree_verify import commit_accepted, verify_tree

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Prompt = Union[str, Sequence[int]]


class _Default:
    """Sentinel type: ``speculation`` omitted means the engine's default tree."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default()


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    # "stop" (EOS, stop id or stop string) or "length" (max_tokens or context limit)
    finish_reason: str
    stats: SpecStats
    prompt_token_ids: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
        }


class Engine:
    """Target model (+ optional draft model) with a tokenizer; see ``from_pretrained``."""

    def __init__(
        self,
        target: PreTrainedModel,
        tokenizer,
        draft: PreTrainedModel | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        self.target = target
        self.tokenizer = tokenizer
        check_cache_layout(target)
        if draft is not None:
            check_cache_layout(draft)
        self.drafter = ModelDrafter(draft, int(target.config.vocab_size)) if draft is not None else None
        self.config = config or EngineConfig()
        self.attention_backend = self._setup_attention(self.config.attention_backend)
        self.eos_ids = eos_ids(target, tokenizer)
        self.max_context = int(getattr(target.config, "max_position_embeddings", 0) or 1 << 31)
        if draft is not None:
            check_pair(target, draft)
        # what the cost model learns, engine-wide (see ``spruce.costmodel``)
        self.profile = AcceptanceProfile()
        self.verify_costs = CostCurve()
        self.draft_costs = CostCurve()

    @classmethod
    def from_pretrained(
        cls,
        target: str | Path | None = None,
        draft: str | Path | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        draft_dtype: str | None = None,
        drafter: str = "model",
        trust_remote_code: bool = False,
        attention_backend: str = "auto",
    ) -> Engine:
        """Load target and draft. ``target=None`` and ``draft=None``: the embedded default pair.

        A user-given target with ``draft=None`` loads no draft model (plain decoding unless a draft is
        given). ``draft_dtype=None`` picks bfloat16 on CPUs where it measures clearly faster, else ``dtype``
        (the draft's precision never changes the output). ``drafter`` picks what the default speculation
        uses: "model", "ngram" (prompt lookup; no draft model is loaded) or "both".
        ``attention_backend``: how the target attends over a tree (``spruce.kernels.backend``): auto, sdpa,
        triton, flex or flash.
        """
        from spruce.models import load_causal_lm, load_tokenizer, resolve_model_dir

        config = EngineConfig(
            target=None if target is None else str(target),
            draft=None if draft is None else str(draft),
            device=device,
            dtype=dtype,
            draft_dtype=draft_dtype,
            drafter=drafter,
            trust_remote_code=trust_remote_code,
            attention_backend=attention_backend,
        )
        dev = torch.device(device)
        target_dir = resolve_model_dir(target, "target")
        draft_dir = None
        if drafter != "ngram":
            if draft is not None:
                draft_dir = resolve_model_dir(draft, "draft")
            elif target is None:
                draft_dir = resolve_model_dir(None, "draft")
        tokenizer = load_tokenizer(target_dir, trust_remote_code)
        target_model = load_causal_lm(target_dir, torch_dtype(dtype), dev, trust_remote_code)
        draft_model = None
        if draft_dir is not None:
            chosen = draft_dtype or pick_draft_dtype(dev, dtype, draft_dir)
            draft_model = load_causal_lm(draft_dir, torch_dtype(chosen), dev, trust_remote_code)
            config = dataclasses.replace(config, draft_dtype=chosen)
            check_tokenizers(tokenizer, load_tokenizer(draft_dir, trust_remote_code))
        return cls(target_model, tokenizer, draft_model, config)

    def _setup_attention(self, name: str) -> str:
        """Resolve the tree-attention backend (one switch point: ``spruce.kernels.backend``) and route the
        target's attention through it when it is not transformers' own sdpa path."""
        from spruce.kernels.backend import resolve

        try:
            chosen = resolve(name, self.target.device.type)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        if chosen != "sdpa":
            from spruce.attention import use_backend

            use_backend(self.target, chosen)
        return chosen

    @property
    def default_speculation(self) -> SpeculationConfig | None:
        """What ``generate`` uses when ``speculation`` is omitted (None: plain decoding)."""
        kind = self.config.drafter
        if self.drafter is None:
            if kind == "model":
                return None
            kind = "ngram"  # "both" without a draft model: the n-gram half
        return default_speculation(self.target.device.type, self.config.dtype, kind)

    # ---- public API ---------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        speculation: SpeculationConfig | None | _Default = DEFAULT,
    ) -> list[GenerationOutput]:
        """Generate for each prompt (text, or a list of token ids). Returns one output per prompt.

        ``speculation`` omitted: the default tree for this device and dtype; ``None``: no speculation.
        Each prompt is validated before any is run, so a bad one fails the call before work is spent.
        """
        params = params or SamplingParams()
        spec = self.resolve_speculation(speculation)
        batch = _as_prompt_list(prompts)
        encoded = [self.encode(p) for p in batch]
        return [_final_output(self.run_encoded(ids, params, spec, text_deltas=False)) for ids in encoded]

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        speculation: SpeculationConfig | None | _Default = DEFAULT,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[StreamEvent]:
        """Generate for one prompt, yielding after every target pass: the new token ids and the new text.

        The last event carries the ``GenerationOutput``. ``should_stop`` is asked before each pass (a
        cancelled client, an Abort, a deadline): when it returns True the request ends with finish
        reason "abort" and everything it held is released.
        """
        params = params or SamplingParams()
        spec = self.resolve_speculation(speculation)
        yield from self.run_encoded(self.encode(prompt), params, spec, should_stop)

    def resolve_speculation(self, speculation: SpeculationConfig | None | _Default) -> SpeculationConfig | None:
        """The tree a request will use (``DEFAULT``: the engine's default); raises if this engine cannot
        run it (a model drafter without a draft model)."""
        spec = self.default_speculation if isinstance(speculation, _Default) else speculation
        if spec is not None and spec.uses_model and self.drafter is None:
            raise InvalidRequestError(
                f"drafter {spec.drafter!r} needs a draft model; load one, use drafter='ngram', "
                "or pass speculation=None"
            )
        return spec

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt, validated against the vocabulary and the context length."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise InvalidRequestError("prompt is empty")
        vocab = int(self.target.config.vocab_size)
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        if len(ids) >= self.max_context:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens; the model's context is {self.max_context} "
                "(at least one token must be left to generate)"
            )
        return ids

    def apply_chat_template(self, user_message: str) -> str:
        """Wrap one user message in the tokenizer's chat template (as the instruct models expect)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return user_message
        messages = [{"role": "user", "content": user_message}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def speculation_telemetry(self) -> dict[str, Any]:
        """Engine-wide: the acceptance profile by depth and sibling rank, and the measured pass costs
        (seconds by tree tokens for the target, by levels for the draft)."""
        return {
            "acceptance_profile": self.profile.to_dict(),
            "verify_cost_s_by_tree_tokens": self.verify_costs.to_dict(),
            "draft_cost_s_by_levels": self.draft_costs.to_dict(),
        }

    # ---- the loop -----------------------------------------------------------------------------------

    def run_encoded(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        spec: SpeculationConfig | None,
        should_stop: Callable[[], bool] | None = None,
        text_deltas: bool = True,
    ) -> Iterator[StreamEvent]:
        """``stream`` for a request already encoded (``encode``) and resolved (``resolve_speculation``).

        ``text_deltas=False``: intermediate events carry no text (no per-step decode); the last one
        carries the whole text, as ``generate`` needs."""
        start = time.perf_counter()
        limit = min(params.max_tokens, self.max_context - len(prompt_ids))
        generator = _generator(params.seed)
        req = _Request(
            tokens=list(prompt_ids),
            cache=new_cache(self.target),
            stopper=StopChecker(self.tokenizer, params, self.eos_ids, limit),
            generator=generator,
            draft_state=self.drafter.new_state() if (spec is not None and spec.uses_model and self.drafter) else None,
            sampling=None if params.greedy else DraftSampling(params.temperature, params.top_k, params.top_p, generator),
            # a seed must reproduce its output: seeded sampling gets the fixed tree (``_seeded_tree``)
            adaptive=spec is not None and spec.adaptive and (params.greedy or params.seed is None),
        )
        if len(prompt_ids) > 1:
            prefix = torch.tensor(prompt_ids[:-1])
            forward_tokens(self.target, req.cache, prefix, torch.arange(len(prefix)), None, last_only=True)
        req.stats.prefill_time_s = time.perf_counter() - start
        sent_tokens, sent_text = 0, ""
        while req.stopper.finish_reason is None:
            if should_stop is not None and should_stop():
                req.stopper.abort()
                break
            self._step(req, params, spec)
            if req.stopper.finish_reason is None:
                text = req.stopper.stable_text() if text_deltas else ""
                yield StreamEvent(req.stopper.generated[sent_tokens:], text[len(sent_text) :])
                sent_tokens, sent_text = len(req.stopper.generated), text
        req.stats.wall_time_s = time.perf_counter() - start
        output = GenerationOutput(
            text=req.stopper.text(),
            token_ids=req.stopper.generated,
            finish_reason=req.stopper.finish_reason or FINISH_ABORT,
            stats=req.stats,
            prompt_token_ids=prompt_ids,
        )
        yield StreamEvent(req.stopper.generated[sent_tokens:], output.text[len(sent_text) :], output)

    def _step(self, req: _Request, params: SamplingParams, spec: SpeculationConfig | None) -> None:
        """Draft a tree, verify it in one target pass, commit the accepted path plus the bonus token."""
        t0 = time.perf_counter()
        if spec is not None and spec.adaptive:
            spec = self._planned(req, spec) if req.adaptive else self._seeded_tree(spec)
        proposal = self._propose(req, spec)
        tree = proposal.tree
        t1 = time.perf_counter()
        prefix_len = len(req.tokens) - 1
        logits = verify_tree(self.target, req.cache, tree, prefix_len, self.attention_backend)
        t2 = time.perf_counter()
        result = accept(tree, logits, proposal.draft_probs, params, req.generator, proposal.deterministic)
        commit_accepted(req.cache, prefix_len, result.accepted_nodes)
        accepted_nodes = result.accepted_nodes.tolist()
        if req.model_nodes and self.drafter is not None and req.draft_state is not None:
            self.drafter.commit(req.draft_state, accepted_nodes)
            model_part = torch.arange(tree.num_nodes) < req.model_nodes
            self.profile.record(tree, accepted_nodes, ~model_part)
            if tree.draft_logprobs is not None and not (req.sampling is not None and spec is not None and spec.sampled_children):
                on_path = torch.zeros(req.model_nodes, dtype=torch.bool)
                on_path[[n for n in accepted_nodes if n < req.model_nodes]] = True
                self.profile.record_confidence(path_logprobs(tree)[1 : req.model_nodes].exp(), on_path[1:])
            self.draft_costs.observe(req.model_levels, req.model_draft_s)
        self.verify_costs.observe(tree.num_nodes, t2 - t1)
        emitted = result.emitted_tokens()
        kept = req.stopper.extend(emitted)
        req.tokens.extend(emitted[:kept])
        req.stats.record_step(tree.max_depth, tree.num_draft_nodes, min(kept, result.num_accepted), kept)
        req.stats.draft_time_s += t1 - t0
        req.stats.verify_time_s += time.perf_counter() - t1

    def _seeded_tree(self, spec: SpeculationConfig) -> SpeculationConfig:
        """What a seeded sampling request drafts instead of adaptive trees: a fixed shape for this device
        and dtype, so that what the server measured never changes the random stream's use."""
        fixed = fixed_speculation(self.target.device.type, self.config.dtype, spec.drafter)
        return dataclasses.replace(fixed, sampled_children=spec.sampled_children, ngram_budget=spec.ngram_budget)

    def _planned(self, req: _Request, spec: SpeculationConfig) -> SpeculationConfig | None:
        """This step's tree from the cost model; ``spec``'s depth and budget are the upper bounds.

        The plan (positional acceptance profile x measured costs) decides whether to draft and how wide;
        dynamic trees then expand while the draft's confidence pays for a level and keep the number of
        nodes that maximizes expected tokens per second under the measured verify curve
        (``choose_tree_size``). Sampled-children trees cannot be cut by confidence (it would bias the
        sampling), so they take the plan's budget and depth as they are.
        """
        fixed = dataclasses.replace(spec, adaptive=False)
        req.policy = None
        if not (spec.uses_model and self.drafter is not None):
            return fixed  # the n-gram drafter costs no draft passes; its budget stays as configured
        if not self.draft_costs.known:
            self._calibrate(fixed)
        rates = self.profile.rates()
        plan = plan_tree(rates, self.verify_costs, self.draft_costs, spec.budget, spec.depth)
        if plan.budget == 0:
            req.steps_without_draft += 1
            if req.steps_without_draft < _EXPLORE_EVERY:
                req.stats.record_plan(plan.budget)
                return dataclasses.replace(fixed, drafter="ngram") if spec.uses_ngram else None
            # now and then draft anyway, so that the profile keeps learning
            plan = plan_tree(rates, self.verify_costs, self.draft_costs, spec.budget, spec.depth, min_budget=1)
        req.steps_without_draft = 0
        req.stats.record_plan(plan.budget)
        if req.sampling is not None and spec.sampled_children:
            return dataclasses.replace(fixed, depth=plan.depth, top_k=plan.top_k, budget=plan.budget)
        req.policy = StepPolicy(self.profile.calibration(), rates, self.verify_costs, self.draft_costs)
        return dataclasses.replace(fixed, top_k=plan.top_k)

    def _calibrate(self, spec: SpeculationConfig) -> None:
        """Start-up measurement of the pass costs: the target over 1 .. budget + 1 chain tokens and the draft
        over one token, after a short synthetic prefix (online timings refine both afterwards)."""
        assert self.drafter is not None
        vocab = int(self.target.config.vocab_size)
        prefix = torch.arange(_CALIBRATION_PREFIX) % vocab
        positions = torch.arange(_CALIBRATION_PREFIX)
        cache = new_cache(self.target)
        with torch.inference_mode():
            forward_tokens(self.target, cache, prefix, positions, None, last_only=True)
            sizes = sorted({s for s in _CALIBRATION_SIZES if s <= spec.budget + 1} | {1, spec.budget + 1})
            verify_tree(self.target, cache, TokenTree.root_only(0), _CALIBRATION_PREFIX)  # warm-up
            keep_cache_positions(cache, _CALIBRATION_PREFIX, torch.zeros(0, dtype=torch.long))
            for size in sizes:
                tree = TokenTree.chain(int(prefix[-1]), prefix[: size - 1].tolist())
                timings = []
                for _ in range(_CALIBRATION_REPEATS):
                    t0 = time.perf_counter()
                    verify_tree(self.target, cache, tree, _CALIBRATION_PREFIX, self.attention_backend)
                    timings.append(time.perf_counter() - t0)
                    keep_cache_positions(cache, _CALIBRATION_PREFIX, torch.zeros(0, dtype=torch.long))
                self.verify_costs.observe(size, min(timings))
            draft_cache = new_cache(self.drafter.model)
            forward_tokens(self.drafter.model, draft_cache, prefix, positions, None, last_only=True)
            timings = []
            for _ in range(_CALIBRATION_REPEATS):
                t0 = time.perf_counter()
                forward_tokens(self.drafter.model, draft_cache, prefix[:1], positions[-1:] + 1, None, last_only=True)
                timings.append(time.perf_counter() - t0)
                keep_cache_positions(draft_cache, _CALIBRATION_PREFIX, torch.zeros(0, dtype=torch.long))
            one = min(timings)
        self.draft_costs.observe(1, one)
        self.draft_costs.observe(2, 2 * one)

    def _propose(self, req: _Request, spec: SpeculationConfig | None) -> Proposal:
        # the bonus token always follows, so a tree deeper than remaining - 1 is wasted work
        max_depth = req.stopper.remaining - 1
        proposal = Proposal(TokenTree.root_only(req.tokens[-1]))
        req.model_nodes = 0
        if spec is None or max_depth <= 0:
            return proposal
        if spec.uses_model and self.drafter is not None and req.draft_state is not None:
            t0 = time.perf_counter()
            proposal = self.drafter.propose(req.draft_state, req.tokens, spec, max_depth, req.sampling, req.policy)
            req.model_draft_s = time.perf_counter() - t0
            req.model_nodes = proposal.tree.num_nodes
            req.model_levels = req.draft_state.levels
        if spec.uses_ngram:
            budget = min(spec.ngram_budget, max_depth)
            proposal = add_ngram_branches(proposal, req.tokens, spec.ngram_max, spec.ngram_min, spec.ngram_branches, budget)
        return proposal


@dataclass
class StreamEvent:
    """One step of a streamed generation."""

    # tokens emitted by this pass
    token_ids: list[int]
    # text that became final with this pass (held back: a partial character, a possible stop string)
    text: str
    # set on the last event only
    output: GenerationOutput | None = None


@dataclass
class _Request:
    """State of one running request."""

    # prompt + generated tokens; the target cache holds all but the last
    tokens: list[int]
    cache: object
    stopper: StopChecker
    generator: torch.Generator
    draft_state: DraftState | None
    sampling: DraftSampling | None
    # whether the cost model picks this request's trees
    adaptive: bool = False
    stats: SpecStats = field(default_factory=SpecStats)
    # this step's model tree: its node count (0: none, the draft cache needs no commit), levels, seconds
    model_nodes: int = 0
    model_levels: int = 0
    model_draft_s: float = 0.0
    # consecutive adaptive steps that chose plain decoding
    steps_without_draft: int = 0
    # this step's decisions for a dynamic tree (adaptive speculation)
    policy: StepPolicy | None = None


# ---- helpers ------------------------------------------------------------------------------------------


# Every this many plain steps in a row, an adaptive request drafts anyway so the profile keeps learning.
_EXPLORE_EVERY = 16
# Start-up cost measurement: a short synthetic prefix, and tree sizes to time (up to the budget + 1).
_CALIBRATION_PREFIX = 32
_CALIBRATION_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# timings per size at start-up; the fastest counts (the others met interference)
_CALIBRATION_REPEATS = 2

def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _final_output(events: Iterator[StreamEvent]) -> GenerationOutput:
    event = None
    for event in events:
        pass
    assert event is not None and event.output is not None
    return event.output


def _as_prompt_list(prompts: Any) -> list[Any]:
    if isinstance(prompts, str):
        return [prompts]
    if hasattr(prompts, "tolist"):  # a tensor or array of token ids (1-D) or of prompts (2-D)
        prompts = prompts.tolist()
    items = [p.tolist() if hasattr(p, "tolist") else p for p in prompts]
    if not items:
        raise InvalidRequestError("no prompts given")
    if all(isinstance(p, int) for p in items):
        return [items]
    return items
