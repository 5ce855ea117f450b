"""The speculative engine: continuous batching of many requests, token ids in, token ids (and text) out.

Iteration-level scheduling (``step``): requests wait in a queue until a KV slot is free (pools allocated
once, ``spruce.kvcache``); then every running request takes a speculative step: the drafter proposes a
tree per request rooted at its last committed token (draft forwards batched across requests), ONE target
pass verifies every node of every tree (ragged: each request its own prefix length, tree and mask), and
each request commits its accepted root path plus the bonus token; both KV slots keep exactly that path.
A newly admitted request's prompt rides in that same pass (prefill and first verification share one
read of the weights), so its first tokens come from its first pass; that pass carries no draft-model
tree unless ``SpeculationConfig.draft_on_prefill`` (the first token waits for no draft). A
request leaves the batch, and frees its slots, the moment it finishes, is aborted or fails.
``speculation=None`` runs the same loop with a root-only tree: plain target decoding, the baseline.

Greedy output is token-identical to plain greedy decoding of the target (see ``spruce.verify.greedy``),
whether the request runs alone or batched (up to float rounding of batched matmuls; see tests).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch

from spruce.config import (
    INT8_DRAFT_DTYPES,
    EngineConfig,
    SamplingParams,
    SpeculationConfig,
    default_speculation,
    fixed_speculation,
)
from spruce.costmodel import (
    CONTEXT_EMA,
    AcceptanceProfile,
    CostCurve,
    StepPolicy,
    context_bucket,
)
from spruce.draft.model_drafter import DraftJob, DraftSampling, DraftState, ModelDrafter
from spruce.draft.ngram import merge_ngram_paths, ngram_continuations
from spruce.draft.tree import Proposal, TokenTree, path_logprobs
from spruce.errors import InvalidRequestError
from spruce import parallel
from spruce.graphs import GraphedPasses
from spruce.kvcache import TREE_RESERVE, Segment, SlotKVCache, run_packed
from spruce.lean import LeanDecoder, lean_unsupported
from spruce.pairing import (
    check_cache_layout,
    check_pair,
    check_tokenizers,
    eos_ids,
    pick_draft_dtype,
    torch_dtype,
)
from spruce.planner import Planner
from spruce.stats import SpecStats
from spruce.stopping import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, StopChecker
from spruce.verify.accept import accept

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
        if draft is not None:
            check_pair(target, draft)
        self.config = config or EngineConfig()
        if self.config.drafter is None:  # the default: n-gram tokens beside a draft model's on a CPU
            both = draft is not None and target.device.type == "cpu"
            self.config = dataclasses.replace(self.config, drafter="both" if both else "model")
        # tensor parallelism (``spruce.parallel``): rank 0 decides what timings or entropy would decide
        self.tp = parallel.current(self.config.tensor_parallel)
        self.attention_backend = self._setup_attention(self.config.attention_backend)
        self.eos_ids = eos_ids(target, tokenizer)
        model_context = int(getattr(target.config, "max_position_embeddings", 0) or _DEFAULT_SEQ_LEN)
        self.max_context = min(model_context, self.config.max_seq_len or _DEFAULT_SEQ_LEN)
        # KV pools, allocated once: a slot per running request (+ one for the start-up cost measurement,
        # + one that the graph passes' padding rows write to)
        graphs = self._want_graphs(self.config.cuda_graphs)
        slots, capacity = self.config.max_batch_size + 1 + graphs, self.max_context + TREE_RESERVE
        self.kv = SlotKVCache(target, slots, capacity, shards=self.config.tensor_parallel)
        self.graphs = GraphedPasses(target, self.kv, self.attention_backend) if graphs else None
        # what runs the target's passes (``target_forward``): on a CPU, for the architectures
        # ``spruce.lean`` covers, its lean forward (float32 logits equal to transformers' bit for bit; ~3%
        # off a pass of the embedded target); a sharded target keeps its own forward
        target_forward = LeanDecoder(target) if self.tp is None and lean_unsupported(target) is None else target
        # the draft's passes go through the target's kernel where it reads the pool in place (and its
        # short passes replay graphs when the target's do)
        draft_kernel = "triton" if self.attention_backend == "triton" else None
        self.drafter = (
            ModelDrafter(draft, int(target.config.vocab_size), slots, capacity, kernel=draft_kernel, graphs=graphs)
            if draft is not None else None
        )
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._lock = threading.Lock()
        # tensor parallelism: rank 0's requests not yet announced to the other ranks (the next ``step``
        # does), every rank's requests by their announced key, and whether rank 0 has finished
        self._tp_outbox: list[tuple[Request, tuple]] = []
        self._tp_by_key: dict[int, Request] = {}
        self._tp_keys = itertools.count()
        self._tp_closing = False
        self.tp_done = False
        # adaptive speculation: what the engine measures, and each step's plan (``spruce.planner``)
        self.planner = Planner(target_forward, self.kv, self.drafter, self.attention_backend, self.graphs)

    @property
    def target_forward(self) -> PreTrainedModel | LeanDecoder:
        """What runs the target's passes, the steps' and the planner's cost measurements alike (held by
        the planner); set it to ``target`` for transformers' own forward."""
        return self.planner.target

    @target_forward.setter
    def target_forward(self, forward: PreTrainedModel | LeanDecoder) -> None:
        self.planner.target = forward

    @classmethod
    def from_pretrained(
        cls,
        target: str | Path | None = None,
        draft: str | Path | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        draft_dtype: str | None = None,
        drafter: str | None = None,
        trust_remote_code: bool = False,
        attention_backend: str = "auto",
        max_batch_size: int = EngineConfig.max_batch_size,
        max_seq_len: int = EngineConfig.max_seq_len,
        tensor_parallel: int = EngineConfig.tensor_parallel,
        cuda_graphs: str = EngineConfig.cuda_graphs,
        draft_vocab: int = EngineConfig.draft_vocab,
    ) -> Engine:
        """Load target and draft. ``target=None`` and ``draft=None``: the embedded default pair.

        A user-given target with ``draft=None`` loads no draft model (plain decoding unless a draft is
        given). ``draft_dtype=None`` picks bfloat16 on CPUs where bfloat16 is fast (int8 weights there if torch lacks
        oneDNN), else ``dtype``
        (the draft's precision never changes the output); "int8" keeps the draft's linear weights in int8
        (CPU: a draft step reads half the bytes; ``spruce.kernels.cpu_int8``); "w8a8" also quantizes the
        activations of the layers that read a normalization's output (fbgemm's integer products: faster
        where bfloat16 is emulated). ``drafter`` picks what the default speculation
        uses: "model", "ngram" (prompt lookup; no draft model is loaded) or "both"; None: "both" where a
        draft model is loaded on a CPU, else "model" (a target alone: plain decoding).
        ``attention_backend``: how the target attends over a tree (``spruce.kernels.backend``): auto, sdpa,
        triton, flex or flash. ``max_batch_size`` requests run at once, each with up to ``max_seq_len``
        tokens of context (0: the model's, at most 4096); the KV pools are sized from both.
        ``tensor_parallel`` > 1: the target is sharded over that many processes (run under torchrun, one
        process per device; ``spruce.parallel``); the draft is replicated on each.
        ``cuda_graphs``: the target's verify and decode passes replay CUDA graphs (``spruce.graphs``):
        "auto" (on a GPU with the Triton backend in one process), "on" or "off".
        ``draft_vocab`` > 0: the draft's output layer scores only its first that many token ids plus the
        special tokens (``spruce.draft.vocab``; the output is the same, a draft level reads less, the draft
        proposes a little worse); 0: every id.
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
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            tensor_parallel=tensor_parallel,
            cuda_graphs=cuda_graphs,
            draft_vocab=draft_vocab,
        )
        tp = parallel.init_tensor_parallel(tensor_parallel, device)
        dev = torch.device(device, torch.cuda.current_device()) if tp is not None and device == "cuda" else torch.device(device)
        target_dir = resolve_model_dir(target, "target")
        draft_dir = None
        if drafter != "ngram":
            if draft is not None:
                draft_dir = resolve_model_dir(draft, "draft")
            elif target is None:
                draft_dir = resolve_model_dir(None, "draft")
        tokenizer = load_tokenizer(target_dir, trust_remote_code)
        if tp is not None:
            from transformers import AutoConfig

            parallel.check_shardable(AutoConfig.from_pretrained(target_dir, trust_remote_code=trust_remote_code), tensor_parallel)
        target_model = load_causal_lm(target_dir, torch_dtype(dtype), dev, trust_remote_code, tensor_parallel=tp is not None)
        draft_model = None
        if draft_dir is not None:
            chosen = draft_dtype or pick_draft_dtype(dev, dtype, draft_dir)
            keep, output_ids = draft_vocab, None
            if keep:
                from transformers import AutoConfig

                from spruce.draft.vocab import draft_vocab_ids, special_ids

                draft_cfg = AutoConfig.from_pretrained(draft_dir, trust_remote_code=trust_remote_code, local_files_only=True)
                vocab = min(int(draft_cfg.vocab_size), int(target_model.config.vocab_size))
                output_ids = draft_vocab_ids(vocab, keep, [*special_ids(tokenizer), *eos_ids(target_model, tokenizer)])
                if output_ids.numel() >= vocab:
                    output_ids, keep = None, 0  # nothing to leave out
            draft_model = load_causal_lm(
                draft_dir,
                torch_dtype(chosen),
                dev,
                trust_remote_code,
                int8_weights=chosen in INT8_DRAFT_DTYPES,
                int8_activations=chosen == "w8a8",
                output_ids=output_ids,
            )
            config = dataclasses.replace(config, draft_dtype=chosen, draft_vocab=keep)
            check_tokenizers(tokenizer, load_tokenizer(draft_dir, trust_remote_code))
        return cls(target_model, tokenizer, draft_model, config)

    def _setup_attention(self, name: str) -> str:
        """Resolve the tree-attention backend (one switch point: ``spruce.kernels.backend``) and route the
        target's attention through ``spruce.attention`` (packed passes over the KV pool)."""
        from spruce.attention import use_backend
        from spruce.kernels.backend import resolve

        try:
            chosen = resolve(name, self.target.device.type)
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        use_backend(self.target, chosen)
        return chosen

    def _want_graphs(self, mode: str) -> bool:
        """Whether the target's tree passes run as CUDA graphs (``spruce.graphs``): "auto" on a GPU with
        the Triton backend in one process; "on" wherever the Triton backend runs (on a CPU the same
        padded static-buffer path runs eagerly: the graphs' reference twin)."""
        able = self.attention_backend == "triton" and self.tp is None
        if mode == "on" and not able:
            raise InvalidRequestError(
                f"cuda_graphs='on' needs attention_backend 'triton' and tensor_parallel 1 (a graph replays a "
                f"tree-kernel pass), got {self.attention_backend!r} and {self.config.tensor_parallel}"
            )
        return mode == "on" or mode == "auto" and able and self.target.device.type == "cuda"

    # what the cost model has learned (``spruce.planner``), as before the planner had its own module
    @property
    def profile(self) -> AcceptanceProfile:
        return self.planner.profile

    @property
    def verify_costs(self) -> CostCurve:
        return self.planner.verify_costs

    @property
    def draft_costs(self) -> CostCurve:
        return self.planner.draft_costs

    @property
    def default_speculation(self) -> SpeculationConfig | None:
        """What ``generate`` uses when ``speculation`` is omitted (None: plain decoding)."""
        kind = self.config.drafter
        assert kind is not None  # resolved in __init__
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
        """Generate for each prompt (text, or a list of token ids), all in one batch (up to
        ``max_batch_size`` at once). Returns one output per prompt, in order.

        ``speculation`` omitted: the default tree for this device and dtype; ``None``: no speculation.
        Each prompt is validated before any is run, so a bad one fails the call before work is spent.
        """
        params = params or SamplingParams()
        spec = self.resolve_speculation(speculation)
        batch = _as_prompt_list(prompts)
        encoded = [self.encode(p) for p in batch]
        reqs = [self.add_request(ids, params, spec, text_deltas=False) for ids in encoded]
        for _ in self._drive(reqs):
            pass
        return [_output_of(r) for r in reqs]

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

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """A conversation (``role`` / ``content`` dicts) through the tokenizer's chat template, ready for
        the assistant's turn; without a template, the contents joined by newlines."""
        if not getattr(self.tokenizer, "chat_template", None):
            return "\n".join(m["content"] for m in messages)
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template that rejects the conversation is bad input
            raise InvalidRequestError(f"the chat template rejected these messages: {exc}") from None

    @property
    def draft_vocab(self) -> int:
        """How many token ids the draft's output layer scores (``spruce.draft.vocab``); 0: all of them."""
        head = getattr(self.drafter, "head", None)
        return int(head.ids.numel()) if head is not None else 0

    def speculation_telemetry(self) -> dict[str, Any]:
        """Engine-wide: the acceptance profile by depth and sibling rank, and the measured pass costs
        (seconds by tree tokens for the target, by levels for the draft), and how many token ids the
        draft's output layer scores (``draft_vocab``: 0 = all)."""
        out = self.planner.telemetry()
        out["draft_vocab"] = self.draft_vocab
        out["cuda_graphs"] = self.graphs.stats() if self.graphs is not None else None
        drafter_graphs = getattr(self.drafter, "graphs", None)
        out["draft_cuda_graphs"] = drafter_graphs.stats() if drafter_graphs is not None else None
        return out

    # ---- the scheduler ------------------------------------------------------------------------------

    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        spec: SpeculationConfig | None,
        should_stop: Callable[[], bool] | None = None,
        text_deltas: bool = True,
        _announced: bool = False,
        _seed: int | None = None,
    ) -> Request:
        """Queue a request already encoded (``encode``) and resolved (``resolve_speculation``); ``step``
        admits it when a KV slot is free. Thread-safe (the server adds while its worker steps).
        (``_announced`` / ``_seed``: a tensor-parallel rank other than 0 adding rank 0's request.)

        ``should_stop`` is asked before each step (a cancelled client, an Abort, a deadline): when it
        returns True the request ends with finish reason "abort" and its KV slots are freed.
        ``text_deltas=False``: intermediate events carry no text (no per-step decode)."""
        if len(prompt_ids) >= self.max_context:
            raise InvalidRequestError(
                f"prompt has {len(prompt_ids)} tokens; this engine's context is {self.max_context} "
                "(max_seq_len; at least one token must be left to generate)"
            )
        if spec is not None:
            _check_tree_room(spec)
        limit = min(params.max_tokens, self.max_context - len(prompt_ids))
        seed = _seed if _announced else params.seed
        if seed is None and self.tp is not None and not params.greedy:
            seed = secrets.randbits(63)  # drawn here, announced with the request: every rank samples alike
        generator = _generator(seed)
        req = Request(
            prompt_ids=list(prompt_ids),
            params=params,
            spec=spec,
            tokens=list(prompt_ids),
            stopper=StopChecker(self.tokenizer, params, self.eos_ids, limit),
            generator=generator,
            sampling=None if params.greedy else DraftSampling(params.temperature, params.top_k, params.top_p, generator),
            # a seed must reproduce its output: seeded sampling gets the fixed tree (``_seeded_tree``)
            adaptive=spec is not None and spec.adaptive and (params.greedy or params.seed is None),
            should_stop=should_stop,
            text_deltas=text_deltas,
        )
        with self._lock:
            if self.tp is None or _announced:
                self._waiting.append(req)
            else:  # rank 0: queued at the next step, together with the other ranks
                self._tp_outbox.append((req, (list(prompt_ids), params, spec, text_deltas, seed)))
        return req

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._tp_outbox)

    def kv_usage(self) -> dict[str, int]:
        """The target's KV pool: slots and positions in use (the calibration slot excluded)."""
        return {
            "slots_total": self.kv.num_slots - 1,
            "slots_free": self.kv.free_slots,
            "positions_used": self.kv.used_positions - self.kv.lengths[self.planner.calib_slot],
            "positions_per_slot": self.kv.capacity,
            "positions_total": (self.kv.num_slots - 1) * self.kv.capacity,
        }

    def step(self) -> list[tuple[Request, StreamEvent]]:
        """One iteration: stop what should stop, admit waiting requests into free slots (one packed
        prefill pass), then one speculative step for every running request (batched draft forwards and
        ONE target pass over all their trees). Returns the events of this iteration, per request."""
        events: list[tuple[Request, StreamEvent]] = []
        with self._lock:  # add_request may append from another thread
            current = [*self._running, *self._waiting]
        stops = [req for req in current if req.should_stop is not None and req.should_stop()]
        if self.tp is not None:
            stops = self._tp_sync(stops)
            if self.tp_done:
                return events
        for req in stops:
            req.stopper.abort()
            events.append((req, self._finish(req)))
        self._admit()
        running = [r for r in self._running if r.stopper.finish_reason is None]
        if running:
            self._guarded(self._spec_step, running, events)
        for req in running:
            if req.failed is not None:
                continue
            if req.stopper.finish_reason is not None:
                events.append((req, self._finish(req)))
            elif req.stopper.generated[req.sent_tokens :]:
                text = req.stopper.stable_text() if req.text_deltas else ""
                events.append((req, StreamEvent(req.stopper.generated[req.sent_tokens :], text[len(req.sent_text) :])))
                req.sent_tokens, req.sent_text = len(req.stopper.generated), text
        return events

    # ---- tensor parallelism: every rank steps in lockstep on rank 0's requests -----------------------

    def _tp_sync(self, stops: list[Request]) -> list[Request]:
        """The start of a tensor-parallel step: rank 0 announces the requests added since the last step
        (with their seeds) and the ones to stop (its own clients' decisions); every rank queues and stops
        the same ones. Returns the requests to stop on this rank."""
        assert self.tp is not None
        if self.tp.is_leader:
            with self._lock:
                outbox, self._tp_outbox = self._tp_outbox, []
                for req, _ in outbox:
                    req.tp_key = next(self._tp_keys)
                    self._tp_by_key[req.tp_key] = req
                    self._waiting.append(req)
            payload = ([(r.tp_key, d) for r, d in outbox], [r.tp_key for r in stops], self._tp_closing)
            self.tp.broadcast(payload)
        else:
            announced, stop_keys, closing = self.tp.broadcast(None)
            for key, (prompt_ids, params, spec, text_deltas, seed) in announced:
                req = self.add_request(prompt_ids, params, spec, None, text_deltas, _announced=True, _seed=seed)
                req.tp_key = key
                self._tp_by_key[key] = req
            stops = [self._tp_by_key[k] for k in stop_keys if k in self._tp_by_key]
            self.tp_done = closing
        if self._tp_closing:
            self.tp_done = True
        return stops

    def follow(self) -> None:
        """A tensor-parallel rank other than 0: run rank 0's steps until it finishes (``finish``)."""
        if self.tp is None or self.tp.is_leader:
            raise RuntimeError("follow() is for tensor-parallel ranks other than 0")
        while not self.tp_done:
            self.step()

    def finish(self) -> None:
        """Rank 0 of a tensor-parallel engine: release the other ranks (their ``follow`` returns); a
        no-op without tensor parallelism."""
        if self.tp is not None and self.tp.is_leader and not self.tp_done:
            self._tp_closing = True
            self.step()

    def abort(self, req: Request) -> None:
        """End a request at the next ``step`` (finish reason "abort")."""
        req.should_stop = lambda: True

    def _admit(self) -> list[Request]:
        admitted = []
        with self._lock:
            while self._waiting and self.kv.free_slots and (self.drafter is None or self.drafter.pool.free_slots):
                req = self._waiting.popleft()
                req.slot = self.kv.allocate()
                if req.spec is not None and req.spec.uses_model and self.drafter is not None:
                    req.draft_state = self.drafter.new_state()
                req.start = time.perf_counter()
                self._running.append(req)
                admitted.append(req)
        return admitted

    def _guarded(self, fn: Callable[[list[Request]], None], reqs: list[Request], events: list) -> None:
        """Run a batched phase; if it raises, undo it and run each request alone, so that a request whose
        input makes the model fail ends alone (its error is kept) and the others go on."""
        saved = [self._snapshot(r) for r in reqs]
        try:
            fn(reqs)
            return
        except Exception as exc:  # noqa: BLE001 - any model error: find the request that caused it
            if len(reqs) == 1:
                self._restore(reqs[0], saved[0])
                self._fail(reqs[0], exc, events)
                return
        for req, snap in zip(reqs, saved):
            self._restore(req, snap)
        for req, snap in zip(reqs, saved):
            try:
                fn([req])
            except Exception as exc:  # noqa: BLE001 - it fails alone, with its error
                self._restore(req, snap)
                self._fail(req, exc, events)

    def _snapshot(self, req: Request) -> tuple:
        draft = None
        if req.draft_state is not None and self.drafter is not None:
            st = req.draft_state
            draft = (st.cached, st.offset, dict(st.node_slots), st.committed, st.levels, self.drafter.pool.lengths[st.slot])
        return (len(req.tokens), self.kv.lengths[req.slot] if req.slot is not None else 0, draft, req.generator.get_state(), req.confidence)

    def _restore(self, req: Request, snap: tuple) -> None:
        n_tokens, length, draft, gen_state, req.confidence = snap
        del req.tokens[n_tokens:]
        if req.slot is not None:
            self.kv.lengths[req.slot] = length
        if draft is not None and req.draft_state is not None and self.drafter is not None:
            st = req.draft_state
            st.cached, offset, st.node_slots, st.committed, st.levels, self.drafter.pool.lengths[st.slot] = draft
            if offset != st.offset:  # a windowed catch-up overwrote the slot: the draft starts over
                st.cached = st.offset = st.committed = self.drafter.pool.lengths[st.slot] = 0
                st.node_slots = {}
        req.generator.set_state(gen_state)

    def _fail(self, req: Request, exc: Exception, events: list) -> None:
        log.warning("request failed alone: %s: %s", type(exc).__name__, exc)
        req.failed = exc
        self._release(req)
        events.append((req, StreamEvent([], "", None, exc)))

    def _finish(self, req: Request) -> StreamEvent:
        """The last event of a request; frees its KV slots."""
        self._release(req)
        if req.stopper.finish_reason in (FINISH_STOP, FINISH_LENGTH):
            self.planner.record_output(len(req.stopper.generated), req.stopper.finish_reason == FINISH_STOP)
        req.stats.wall_time_s = time.perf_counter() - req.start if req.start else 0.0
        output = GenerationOutput(
            text=req.stopper.text(),
            token_ids=req.stopper.generated,
            finish_reason=req.stopper.finish_reason or FINISH_ABORT,
            stats=req.stats,
            prompt_token_ids=req.prompt_ids,
        )
        event = StreamEvent(req.stopper.generated[req.sent_tokens :], output.text[len(req.sent_text) :], output)
        req.sent_tokens = len(req.stopper.generated)
        req.output = output
        return event

    def _release(self, req: Request) -> None:
        self._tp_by_key.pop(req.tp_key, None)
        with self._lock:
            if req in self._running:
                self._running.remove(req)
            elif req in self._waiting:
                self._waiting.remove(req)
        if req.slot is not None:
            self.kv.release(req.slot)
            req.slot = None
        if req.draft_state is not None and self.drafter is not None:
            self.drafter.release(req.draft_state)
            req.draft_state = None

    # ---- one iteration's passes ---------------------------------------------------------------------

    def _spec_step(self, reqs: list[Request]) -> None:
        """Draft a tree per request, verify every tree in one target pass, commit each accepted path
        plus its bonus token."""
        t0 = time.perf_counter()
        batch = len(reqs)
        self.planner.begin_step(reqs)
        specs = self.planner.settle(reqs, [self._step_spec(r, batch) for r in reqs])
        self.planner.end_step()
        if self.tp is not None:  # the plan rests on timings, which differ between ranks: rank 0's holds
            specs, policies = self.tp.broadcast((specs, [r.policy for r in reqs]))
            for r, policy in zip(reqs, policies):
                r.policy = policy
        proposals = self._propose(reqs, specs)
        t1 = time.perf_counter()
        segments = [self._verify_segment(r, prop.tree) for r, prop in zip(reqs, proposals)]
        prefilling = [r for r in reqs if not r.prefilled]
        # a pass that prefills is no tree-attention pass (its prompt rows are causal queries)
        logits = self.graphs.run(segments) if self.graphs is not None and not prefilling else None
        if logits is None:
            logits = run_packed(self.target_forward, self.kv, segments, None if prefilling else self.attention_backend, device_logits=True)
        t2 = time.perf_counter()
        if not prefilling:  # the verify curve is for tree passes alone
            self.planner.verify_costs.observe(sum(p.tree.num_nodes for p in proposals), t2 - t1)
        confidence_rows = []
        for r, spec, prop, out in zip(reqs, specs, proposals, logits):
            rows = self._commit(r, spec, prop, out)
            if rows is not None:
                confidence_rows.append((r, rows))
            r.stats.draft_time_s += t1 - t0
            if r.prefilled:
                r.stats.verify_time_s += time.perf_counter() - t1
            else:
                r.stats.prefill_time_s = time.perf_counter() - t1
                r.prefilled = True
        self._update_confidence(confidence_rows)
        self.planner.observe_step(time.perf_counter() - t0)

    @staticmethod
    def _update_confidence(rows: list[tuple[Request, torch.Tensor]]) -> None:
        """The target's confidence (its top probability) at each committed position, folded into each
        request's moving average (the context its next plan is made in): one softmax over all the step's
        committed rows and one copy to the host, not one per request (on a GPU each is a sync)."""
        if not rows:
            return
        tops = torch.softmax(torch.cat([r for _, r in rows]).float(), dim=-1).amax(dim=-1).tolist()
        i = 0
        for req, committed in rows:
            for top in tops[i : i + committed.shape[0]]:
                req.confidence = top if req.confidence is None else (1 - CONTEXT_EMA) * req.confidence + CONTEXT_EMA * top
            i += committed.shape[0]

    def _verify_segment(self, req: Request, tree: TokenTree) -> Segment:
        """The request's part of the target pass: its tree after its committed tokens. A new request's
        prompt (all but its last token, the tree's root) rides in the same pass: prefill and the first
        verification share one read of the weights."""
        assert req.slot is not None
        cached, prefix_len = self.kv.lengths[req.slot], len(req.tokens) - 1
        pending = torch.tensor(req.tokens[cached:prefix_len], dtype=torch.long)
        n, m = pending.numel(), tree.num_nodes
        if n == 0:
            return Segment(req.slot, tree.tokens, tree.depth + prefix_len, tail=None if m == 1 else tree.ancestor_mask)
        # [n + m, n + m]: the prompt rows causal, every tree row sees the whole prompt and its ancestors
        tail = torch.zeros(n + m, n + m, dtype=torch.bool)
        tail[:n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        tail[n:, :n] = True
        tail[n:, n:] = tree.ancestor_mask
        return Segment(
            req.slot,
            torch.cat([pending, tree.tokens]),
            torch.cat([torch.arange(cached, prefix_len), tree.depth + prefix_len]),
            tail=tail,
            logits=m,
        )

    def _commit(self, req: Request, spec: SpeculationConfig | None, proposal: Proposal, logits: torch.Tensor) -> torch.Tensor | None:
        tree = proposal.tree
        prefix_len = len(req.tokens) - 1
        if logits.shape[0] != tree.num_nodes:
            raise RuntimeError(f"the verify pass returned {logits.shape[0]} rows for {tree.num_nodes} tree nodes")
        result = accept(tree, logits, proposal.draft_probs, req.params, req.generator, proposal.deterministic)
        accepted_nodes = result.accepted_nodes.tolist()
        context = context_bucket(req.confidence)  # the context this step was planned in
        assert req.slot is not None
        self.kv.keep(req.slot, prefix_len, accepted_nodes)
        if req.model_nodes and self.drafter is not None and req.draft_state is not None:
            self.drafter.commit(req.draft_state, accepted_nodes)
            model_part = torch.arange(tree.num_nodes) < req.model_nodes
            profile = self.planner.profile_for(req)
            profile.record(tree, accepted_nodes, ~model_part, context)
            if tree.draft_logprobs is not None and not (req.sampling is not None and spec is not None and spec.sampled_children):
                on_path = torch.zeros(req.model_nodes, dtype=torch.bool)
                on_path[[n for n in accepted_nodes if n < req.model_nodes]] = True
                profile.record_confidence(path_logprobs(tree)[1 : req.model_nodes].exp(), on_path[1:])
        if tree.num_nodes > max(req.model_nodes, 1):  # n-gram branches were verified
            self.planner.record_ngram(req, tree, accepted_nodes, req.model_nodes)
        emitted = result.emitted_tokens()
        kept = req.stopper.extend(emitted)
        req.tokens.extend(emitted[:kept])
        if req.policy is not None and req.policy.chosen_expected is not None:
            req.stats.refine_plan(req.policy.chosen_expected)
        req.stats.record_step(tree.max_depth, tree.num_draft_nodes, min(kept, result.num_accepted), kept)
        # the rows whose top probability is the target's confidence at the committed positions
        return logits[result.accepted_nodes] if req.draft_state is not None else None

    def _step_spec(self, req: Request, batch: int) -> SpeculationConfig | None:
        spec = req.spec
        req.policy = None
        if spec is not None and spec.uses_model and not req.prefilled and not spec.draft_on_prefill:
            # no draft model before the prefill pass: the first token as soon as plain decoding's (the
            # draft reading the prompt and building a tree cost 0.5 s of it at 1 request on a 2-core CPU)
            adaptive = spec.adaptive and req.adaptive
            if adaptive:
                req.stats.record_plan(0)
            if not spec.uses_ngram:
                return None
            fixed = dataclasses.replace(spec, adaptive=False)  # as the planner hands out its plans
            return self.planner.ngram_only(req, fixed, batch) if adaptive else dataclasses.replace(fixed, drafter="ngram")
        if spec is not None and spec.adaptive:
            spec = self.planner.plan(req, spec, batch) if req.adaptive else self._seeded_tree(spec)
        return spec

    def _seeded_tree(self, spec: SpeculationConfig) -> SpeculationConfig:
        """What a seeded sampling request drafts instead of adaptive trees: a fixed shape for this device
        and dtype, so that what the server measured never changes the random stream's use."""
        fixed = fixed_speculation(self.target.device.type, self.config.dtype, spec.drafter)
        return dataclasses.replace(fixed, sampled_children=spec.sampled_children, ngram_budget=spec.ngram_budget)

    def _propose(self, reqs: list[Request], specs: list[SpeculationConfig | None]) -> list[Proposal]:
        """Each request's tree: model trees of all requests in one batched propose, n-gram branches
        merged per request."""
        proposals = [Proposal(TokenTree.root_only(r.tokens[-1])) for r in reqs]
        jobs, owners = [], []
        for i, (r, spec) in enumerate(zip(reqs, specs)):
            r.model_nodes = 0
            # the bonus token always follows, so a tree deeper than remaining - 1 is wasted work
            max_depth = r.stopper.remaining - 1
            if spec is None or max_depth <= 0:
                specs[i] = None
                continue
            if spec.uses_model and self.drafter is not None and r.draft_state is not None:
                jobs.append(DraftJob(r.draft_state, r.tokens, spec, max_depth, r.sampling, r.policy))
                owners.append(i)
        if jobs and self.drafter is not None:
            lags = [len(job.tokens) - job.state.cached for job in jobs]
            t0 = time.perf_counter()
            drafted = self.drafter.propose_batch(jobs)
            seconds = time.perf_counter() - t0
            self.planner.observe_draft(len(jobs), lags, max(job.state.levels for job in jobs), seconds)
            for i, job, prop in zip(owners, jobs, drafted):
                proposals[i] = prop
                reqs[i].model_nodes = prop.tree.num_nodes
        for i, (r, spec) in enumerate(zip(reqs, specs)):
            if spec is not None and spec.uses_ngram:
                budget = min(spec.ngram_budget, r.stopper.remaining - 1)
                paths = ngram_continuations(r.tokens, spec.ngram_max, spec.ngram_min, budget, spec.ngram_branches)
                if budget > 0:
                    self.planner.record_lookup(r, bool(paths))
                proposals[i] = merge_ngram_paths(proposals[i], paths, budget)
        return proposals

    # ---- single-request views -----------------------------------------------------------------------

    def run_encoded(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        spec: SpeculationConfig | None,
        should_stop: Callable[[], bool] | None = None,
        text_deltas: bool = True,
    ) -> Iterator[StreamEvent]:
        """``stream`` for a request already encoded (``encode``) and resolved (``resolve_speculation``):
        queues it and drives ``step`` until it ends (other queued requests run alongside). Not for use
        while another thread drives ``step`` (the server's worker does; it uses ``add_request``)."""
        req = self.add_request(prompt_ids, params, spec, should_stop, text_deltas)
        yield from self._drive([req])

    def _drive(self, reqs: list[Request]) -> Iterator[StreamEvent]:
        """Step until every request in ``reqs`` has ended; yields their events (errors re-raised)."""
        pending = set(map(id, reqs))
        try:
            while pending:
                for req, event in self.step():
                    if id(req) not in pending:
                        continue
                    if event.error is not None:
                        raise event.error
                    if event.output is not None:
                        pending.discard(id(req))
                    yield event
        finally:
            for req in reqs:  # a consumer that stopped early: nothing stays allocated
                if id(req) in pending:
                    self._release(req)


@dataclass
class StreamEvent:
    """One step of a streamed generation."""

    # tokens emitted by this pass
    token_ids: list[int]
    # text that became final with this pass (held back: a partial character, a possible stop string)
    text: str
    # set on the last event only
    output: GenerationOutput | None = None
    # set (on the last event, instead of an output) when the request failed
    error: Exception | None = None


@dataclass(eq=False)
class Request:
    """One request inside the engine (``add_request`` returns it; pass it to ``abort``)."""

    prompt_ids: list[int]
    params: SamplingParams
    spec: SpeculationConfig | None
    # prompt + generated tokens; the target's slot holds all but the last
    tokens: list[int]
    stopper: StopChecker
    generator: torch.Generator
    sampling: DraftSampling | None
    # whether the cost model picks this request's trees
    adaptive: bool = False
    should_stop: Callable[[], bool] | None = None
    # tensor parallelism: the key rank 0 announced the request under (-1: not announced)
    tp_key: int = -1
    text_deltas: bool = True
    stats: SpecStats = field(default_factory=SpecStats)
    # KV: the target's slot and the draft's state (its own slot), while admitted
    slot: int | None = None
    draft_state: DraftState | None = None
    prefilled: bool = False
    # perf_counter() at admission
    start: float = 0.0
    # what the caller has been sent so far
    sent_tokens: int = 0
    sent_text: str = ""
    failed: Exception | None = None
    # set when the request ends
    output: GenerationOutput | None = None
    # this step's model tree: its node count (0: none, the draft slot needs no commit)
    model_nodes: int = 0
    # n-gram proposals of this request: tried (parent accepted) and accepted (``Planner.record_ngram``)
    ngram_tried: int = 0
    ngram_accepted: int = 0
    # its n-gram lookups, and those that found a continuation (``Planner.record_lookup``)
    ngram_lookups: int = 0
    ngram_found: int = 0
    # this step's decisions for a dynamic tree (adaptive speculation)
    policy: StepPolicy | None = None
    # the target's recent confidence: its probability of its own top token, a moving average over the
    # committed positions (``spruce.costmodel.context_bucket``); None before its first verify pass
    confidence: float | None = None


def _check_tree_room(spec: SpeculationConfig) -> None:
    """A step writes its tree after the committed tokens: the most it can write must fit the slot's
    reserve (``spruce.kvcache.TREE_RESERVE``)."""
    verify = (sum(1 for _ in spec.tree_paths) if spec.tree_paths else spec.budget) + (spec.ngram_budget if spec.uses_ngram else 0) + 1
    draft = (len(spec.tree_paths) if spec.tree_paths else spec.top_k * spec.depth) + 1
    if max(verify, draft) > TREE_RESERVE:
        raise InvalidRequestError(
            f"this tree writes up to {max(verify, draft)} KV positions per step; at most {TREE_RESERVE} fit "
            "(lower budget, depth x top_k or ngram_budget)"
        )


# ---- helpers ------------------------------------------------------------------------------------------


log = logging.getLogger(__name__)

# a request's context when neither the model nor the configuration says less
_DEFAULT_SEQ_LEN = 4096
def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _output_of(req: Request) -> GenerationOutput:
    assert req.output is not None
    return req.output


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
