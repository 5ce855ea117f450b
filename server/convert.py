"""Protobuf <-> domain conversion for spruce's own API (the one place that knows both sides)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from spruce.config import SamplingParams, fixed_speculation
from spruce.engine import DEFAULT, Engine, GenerationOutput
from spruce.errors import InvalidRequestError
from spruce.server._gen.spruce.v1 import spruce_pb2 as pb
from spruce.stats import SpecStats
from spruce.stopping import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP

FINISH_REASONS = {
    FINISH_STOP: pb.FINISH_REASON_STOP,
    FINISH_LENGTH: pb.FINISH_REASON_LENGTH,
    FINISH_ABORT: pb.FINISH_REASON_ABORT,
}
_DRAFTERS = {pb.DRAFTER_MODEL: "model", pb.DRAFTER_NGRAM: "ngram", pb.DRAFTER_BOTH: "both"}
_DRAFTER_ENUM = {v: k for k, v in _DRAFTERS.items()}
DEFAULT_MAX_TOKENS = SamplingParams().max_tokens


def prompt_of(request: pb.GenerateRequest, engine: Engine) -> str | list[int]:
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequestError("prompt: set text or token_ids")
    if kind == "token_ids":
        if request.apply_chat_template:
            raise InvalidRequestError("apply_chat_template needs a text prompt, not token_ids")
        return list(request.token_ids.ids)
    if not request.text:
        raise InvalidRequestError("text: the prompt is empty")
    return engine.apply_chat_template(request.text) if request.apply_chat_template else request.text


def sampling_params(options: pb.SamplingOptions) -> SamplingParams:
    """Field by field, so that a bad value's error names the field."""
    if options.max_tokens < 0:
        raise InvalidRequestError(f"sampling.max_tokens must be > 0, got {options.max_tokens}")
    return SamplingParams(
        max_tokens=options.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=float(options.temperature),
        top_p=float(options.top_p) if options.top_p else 1.0,
        top_k=int(options.top_k),
        seed=int(options.seed) if options.HasField("seed") else None,
        stop=tuple(options.stop),
        stop_token_ids=tuple(options.stop_token_ids),
        ignore_eos=options.ignore_eos,
    )


def speculation(options: pb.SpeculationOptions, engine: Engine) -> Any:
    """The request's SpeculationConfig, None (off) or DEFAULT (the server's default)."""
    if options.mode == pb.SPECULATION_MODE_OFF:
        return None
    if options.max_tree_budget < 0:
        raise InvalidRequestError(f"speculation.max_tree_budget must be >= 0, got {options.max_tree_budget}")
    if options.drafter not in (pb.DRAFTER_UNSPECIFIED, *_DRAFTERS):
        raise InvalidRequestError(f"speculation.drafter: unknown value {options.drafter}")
    base = engine.default_speculation
    if base is None:  # the server's default is plain decoding; the request asks for speculation
        base = fixed_speculation(engine.target.device.type, engine.config.dtype, "ngram")
    if options.drafter == pb.DRAFTER_UNSPECIFIED and options.max_tree_budget == 0:
        return DEFAULT if options.mode == pb.SPECULATION_MODE_UNSPECIFIED else base
    fields: dict[str, Any] = {"drafter": _DRAFTERS.get(options.drafter, base.drafter)}
    if options.max_tree_budget:
        fields["budget"] = min(base.budget, options.max_tree_budget) if base.adaptive else options.max_tree_budget
    return dataclasses.replace(base, **fields)


def spec_stats(stats: SpecStats) -> pb.SpeculationStats:
    return pb.SpeculationStats(
        steps=stats.steps,
        draft_tokens=stats.drafted,
        accepted_tokens=stats.accepted,
        mean_accepted_length=stats.mean_accepted_length,
        acceptance_rate=stats.acceptance_rate,
        acceptance_by_depth=stats.acceptance_by_depth,
        drafted_by_depth=stats.drafted_by_depth,
        accepted_by_depth=stats.accepted_by_depth,
        prefill_time_s=stats.prefill_time_s,
        draft_time_s=stats.draft_time_s,
        verify_time_s=stats.verify_time_s,
        wall_time_s=stats.wall_time_s,
        steps_by_tree_size=stats.steps_by_tree_size,
        steps_by_planned_budget=stats.steps_by_planned_budget,
        planned_steps=stats.planned_steps,
        planned_expected_tokens=stats.planned_expected_tokens,
        planned_emitted_tokens=stats.planned_emitted_tokens,
    )


def response(request_id: str, out: GenerationOutput) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=request_id,
        text=out.text,
        token_ids=out.token_ids,
        finish_reason=FINISH_REASONS[out.finish_reason],
        prompt_tokens=len(out.prompt_token_ids),
        completion_tokens=len(out.token_ids),
        stats=spec_stats(out.stats),
    )


def stream_response(request_id: str, token_ids: list[int], text: str, out: GenerationOutput | None) -> pb.GenerateStreamResponse:
    msg = pb.GenerateStreamResponse(request_id=request_id, token_ids=token_ids, text=text)
    if out is not None:
        msg.finished = True
        msg.finish_reason = FINISH_REASONS[out.finish_reason]
        msg.prompt_tokens = len(out.prompt_token_ids)
        msg.completion_tokens = len(out.token_ids)
        msg.stats.CopyFrom(spec_stats(out.stats))
    return msg


def model_info(engine: Engine, served_model_name: str, max_tokens_limit: int) -> pb.ModelInfo:
    c = engine.config
    assert c.drafter is not None  # the engine resolved the default
    return pb.ModelInfo(
        served_model_name=served_model_name,
        target=c.target or "",
        draft=c.draft or "",
        dtype=c.dtype,
        draft_dtype=c.draft_dtype or "",
        device=str(engine.target.device),
        vocab_size=int(engine.target.config.vocab_size),
        max_context_tokens=int(engine.max_context),
        default_drafter=_DRAFTER_ENUM[c.drafter],
        attention_backend=engine.attention_backend,
        max_tokens_limit=max_tokens_limit,
        draft_vocab=engine.draft_vocab,
    )


def server_stats(worker: Any) -> pb.ServerStats:
    t = worker.totals
    s = t.spec
    return pb.ServerStats(
        requests_finished=t.finished,
        requests_failed=t.failed,
        requests_aborted=t.aborted,
        requests_running=worker.running,
        requests_waiting=worker.waiting,
        steps=s.steps,
        draft_tokens=s.drafted,
        accepted_tokens=s.accepted,
        output_tokens=s.output_tokens,
        mean_accepted_length=s.mean_accepted_length,
        acceptance_rate=s.acceptance_rate,
        acceptance_by_depth=s.acceptance_by_depth,
        drafted_by_depth=s.drafted_by_depth,
        accepted_by_depth=s.accepted_by_depth,
        steps_by_tree_size=s.steps_by_tree_size,
        steps_by_planned_budget=s.steps_by_planned_budget,
        kv_cache_tokens=worker.engine.kv_usage()["positions_used"],
        speculation_telemetry_json=json.dumps(worker.engine.speculation_telemetry()),
        planned_steps=s.planned_steps,
        planned_expected_tokens=s.planned_expected_tokens,
        planned_emitted_tokens=s.planned_emitted_tokens,
    )
