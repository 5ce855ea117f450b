"""The SMG worker protocol: ``vllm.grpc.engine.VllmEngine`` on spruce's gRPC port.

The Shepherd Model Gateway (``smg``, formerly sgl-router) drives vLLM, SGLang and TensorRT-LLM workers
over gRPC: it tokenizes, routes, and detokenizes itself, and sends workers token ids. This servicer
answers the vLLM flavour of that protocol (message types from the ``smg-grpc-proto`` package), so a
gateway pointed at ``grpc://HOST:PORT`` takes spruce for a vLLM worker:

- ``Generate`` (server streaming): token ids in, token ids out. Streaming requests get one chunk per
  engine step (the tokens that step accepted), then a ``complete`` carrying the last step's tokens and
  the finish reason, as vLLM's servicer does (the gateway accumulates the chunks); non-streaming
  requests get one ``complete`` with every token. ``spec_accepted_tokens`` / ``spec_draft_tokens``
  carry the request's speculation counts. A client that goes away, or an ``Abort`` with its request
  id, stops the request at the next step and frees its KV slot.
- ``HealthCheck``, ``GetModelInfo``, ``GetServerInfo``, ``GetLoads`` (running / waiting requests and
  KV use, for the gateway's load-aware policies), ``GetTokenizer`` (the loaded tokenizer as a zip),
  ``FlushCache`` (spruce keeps no prefix cache: a no-op that says so). The gateway needs no
  ``--model-path``: ``GetModelInfo`` names a directory the tokenizer was exported to, which a gateway
  on the same host reads and one elsewhere, not finding it, fetches through ``GetTokenizer``.
- ``SubscribeKvEvents``: spruce keeps no shared prefix cache, so there are no KV events; the stream
  carries the engine's load once a second (load-only batches), which spares the gateway its polling.
- Not served (UNIMPLEMENTED with a reason): ``Embed``, profiling.

Sampling fields spruce does not implement (penalties, min_p, min_tokens, logit_bias, logprobs, n > 1,
structured-output constraints, multimodal inputs) are refused with INVALID_ARGUMENT naming the field,
never silently ignored: they would change the output.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc
from spruce.server.service import submit

from spruce.config import SamplingParams
from spruce.engine import DEFAULT, GenerationOutput
from spruce.errors import InvalidRequestError, UnavailableError

SERVICE = "vllm.grpc.engine.VllmEngine"
# seconds between two load records on a SubscribeKvEvents stream
LOAD_PUSH_S = 1.0
# GetTokenizer's zip goes out in pieces of this size
TOKENIZER_CHUNK_BYTES = 1 << 20
# the files a gateway builds a tokenizer from (what ``save_pretrained`` writes, plus a chat template)
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json", "config.json",
)


def sampling_params(p: vpb.SamplingParams, max_tokens_default: int) -> SamplingParams:
    """The gateway's sampling fields -> spruce's; raises ``InvalidRequestError`` naming a field spruce
    cannot honour. Unset fields take vLLM's defaults (temperature 1, top_p 1, no top_k)."""
    refused = {
        "n": p.n > 1,
        "min_p": p.min_p != 0.0,
        "frequency_penalty": p.frequency_penalty != 0.0,
        "presence_penalty": p.presence_penalty != 0.0,
        "repetition_penalty": p.repetition_penalty not in (0.0, 1.0),
        "min_tokens": p.min_tokens > 0,
        "logit_bias": len(p.logit_bias) > 0,
        "logprobs": p.HasField("logprobs"),
        "prompt_logprobs": p.HasField("prompt_logprobs"),
    }
    for name, bad in refused.items():
        if bad:
            raise InvalidRequestError(f"sampling_params.{name} is not supported by this server (spruce)")
    constraint = p.WhichOneof("constraint")
    if constraint is not None:
        raise InvalidRequestError(f"sampling_params.{constraint}: structured outputs are not supported by this server (spruce)")
    return SamplingParams(
        max_tokens=p.max_tokens if p.HasField("max_tokens") else max_tokens_default,
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.top_p > 0 else 1.0,
        top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
    )


def _prompt(request: vpb.GenerateRequest) -> str | list[int]:
    if request.HasField("mm_inputs") or len(request.extra_mm_inputs) or request.HasField("media_refs"):
        raise InvalidRequestError("multimodal inputs: this server (spruce) serves a text-only model")
    kind = request.WhichOneof("input")
    if kind == "tokenized":
        ids = list(request.tokenized.input_ids)
        if not ids:
            raise InvalidRequestError("tokenized.input_ids: empty prompt")
        truncate = request.sampling_params.truncate_prompt_tokens
        if request.sampling_params.HasField("truncate_prompt_tokens") and truncate > 0:
            ids = ids[-truncate:]
        return ids
    if kind == "text":
        if not request.text:
            raise InvalidRequestError("text: empty prompt")
        return request.text
    raise InvalidRequestError("GenerateRequest needs tokenized input_ids or text")


class VllmEngineServicer(vpb_grpc.VllmEngineServicer):
    """``worker``: the ``EngineWorker`` (a stand-in that raises ``UnavailableError`` while loading)."""

    def __init__(self, worker: Any, served_model_name: str) -> None:
        self.worker = worker
        self.served_model_name = served_model_name
        self.started = time.time()
        self.last_receive = 0.0
        self._tokenizer_dir: Path | None = None
        self._tokenizer_zip: tuple[bytes, str] | None = None
        self._zip_lock = threading.Lock()
        self._closed = threading.Event()

    # ---- generation ---------------------------------------------------------------------------------

    def Generate(self, request: vpb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[vpb.GenerateResponse]:
        self.last_receive = time.time()
        worker = self.worker
        prompt = _prompt(request)
        params = sampling_params(request.sampling_params, worker.max_tokens_limit)
        job = submit(worker, context, prompt, params, DEFAULT, request.request_id, text_deltas=False)
        prompt_tokens = len(job.prompt_ids)
        for event in worker.events(job):
            if event.output is None:
                if request.stream and event.token_ids:
                    yield _chunk(event.token_ids, prompt_tokens)
                continue
            if request.stream:
                if event.token_ids:
                    yield _chunk(event.token_ids, prompt_tokens)
                yield _complete(event.token_ids, event.output, prompt_tokens, params, worker.engine)
            else:
                yield _complete(event.output.token_ids, event.output, prompt_tokens, params, worker.engine)

    def Abort(self, request: vpb.AbortRequest, context: grpc.ServicerContext) -> vpb.AbortResponse:
        for request_id in request.request_ids:
            self.worker.abort(request_id)  # unknown or finished ids: nothing to stop
        return vpb.AbortResponse()

    # ---- management ---------------------------------------------------------------------------------

    def HealthCheck(self, request: vpb.HealthCheckRequest, context: grpc.ServicerContext) -> vpb.HealthCheckResponse:
        try:
            accepting = bool(self.worker.accepting)
        except UnavailableError:
            return vpb.HealthCheckResponse(healthy=False, message="loading the models")
        return vpb.HealthCheckResponse(healthy=accepting, message="healthy" if accepting else "draining")

    def GetModelInfo(self, request: vpb.GetModelInfoRequest, context: grpc.ServicerContext) -> vpb.GetModelInfoResponse:
        engine = self.worker.engine
        cfg = engine.target.config
        tok = engine.tokenizer
        return vpb.GetModelInfoResponse(
            model_path=engine.config.target or "",
            is_generation=True,
            max_context_length=int(engine.max_context),
            vocab_size=int(cfg.vocab_size),
            supports_vision=False,
            served_model_name=self.served_model_name,
            # a gateway on this host loads it from here; one elsewhere finds no such path and fetches
            # the same files through GetTokenizer
            tokenizer_path=str(self._tokenizer_files()[0]),
            model_type=str(getattr(cfg, "model_type", "") or ""),
            architectures=list(getattr(cfg, "architectures", None) or []),
            eos_token_ids=sorted(int(i) for i in engine.eos_ids),
            pad_token_id=int(getattr(tok, "pad_token_id", None) or 0),
            bos_token_id=int(getattr(tok, "bos_token_id", None) or 0),
            max_req_input_len=int(engine.max_context) - 1,
        )

    def GetServerInfo(self, request: vpb.GetServerInfoRequest, context: grpc.ServicerContext) -> vpb.GetServerInfoResponse:
        worker = self.worker
        engine = worker.engine
        return vpb.GetServerInfoResponse(
            active_requests=worker.running + worker.waiting,
            is_paused=not worker.accepting,
            last_receive_timestamp=self.last_receive,
            uptime_seconds=time.time() - self.started,
            # the protocol this worker speaks (what the gateway keys on), not the engine behind it
            server_type="vllm-grpc",
            data_parallel_size=1,
            model_dtype=f"torch.{engine.config.dtype}",
            attention_backend=engine.attention_backend,
            max_num_seqs=int(engine.config.max_batch_size),
        )

    def GetLoads(self, request: vpb.GetLoadsRequest, context: grpc.ServicerContext) -> vpb.GetLoadsResponse:
        from spruce import __version__

        worker = self.worker
        engine = worker.engine
        usage = engine.kv_usage()
        total = usage["positions_total"]
        load = vpb.SchedulerLoad(
            dp_rank=0,
            num_running_reqs=worker.running,
            num_waiting_reqs=worker.waiting,
            num_total_reqs=worker.running + worker.waiting,
            num_used_tokens=usage["positions_used"],
            max_total_num_tokens=total,
            token_usage=usage["positions_used"] / max(1, total),
            max_running_requests=int(engine.config.max_batch_size),
        )
        return vpb.GetLoadsResponse(
            timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            version=f"spruce {__version__}",
            dp_rank_count=1,
            loads=[load],
        )

    def GetTokenizer(self, request: common_pb2.GetTokenizerRequest, context: grpc.ServicerContext) -> Iterator[common_pb2.GetTokenizerChunk]:
        data, digest = self._tokenizer_bundle()
        for start in range(0, len(data), TOKENIZER_CHUNK_BYTES):
            end = start + TOKENIZER_CHUNK_BYTES
            yield common_pb2.GetTokenizerChunk(data=data[start:end], sha256=digest if end >= len(data) else "")

    def FlushCache(self, request: common_pb2.FlushCacheRequest, context: grpc.ServicerContext) -> common_pb2.FlushCacheResponse:
        return common_pb2.FlushCacheResponse(success=True, message="spruce keeps no prefix cache: nothing to flush")

    def SubscribeKvEvents(self, request: common_pb2.SubscribeKvEventsRequest, context: grpc.ServicerContext) -> Iterator[common_pb2.KvEventBatch]:
        """No KV events (spruce keeps no shared prefix cache), but the engine's load, pushed every
        ``LOAD_PUSH_S`` as load-only batches: the gateway then needs no ``GetLoads`` polling."""
        sample = 0
        while context.is_active() and not self._closed.is_set():
            sample += 1
            yield common_pb2.KvEventBatch(sequence_number=0, timestamp=time.time(), load=self._engine_load(sample))
            self._closed.wait(LOAD_PUSH_S)

    def close(self) -> None:
        """Ends the load streams and removes the exported tokenizer (server shutdown)."""
        self._closed.set()
        if self._tokenizer_dir is not None:
            shutil.rmtree(self._tokenizer_dir, ignore_errors=True)

    def _engine_load(self, sample: int) -> common_pb2.EngineLoad:
        worker = self.worker
        engine = worker.engine
        usage = engine.kv_usage()
        total = usage["positions_total"]
        return common_pb2.EngineLoad(
            running_requests=worker.running,
            waiting_requests=worker.waiting,
            token_usage=usage["positions_used"] / max(1, total),
            max_running_requests=int(engine.config.max_batch_size),
            sample=sample,
            load_only=True,
            num_used_tokens=usage["positions_used"],
            max_total_num_tokens=total,
        )

    # ---- not served: UNIMPLEMENTED with a reason (the gateway falls back) ---------------------------

    def Embed(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise NotImplementedError("Embed: spruce serves generation only")

    def StartProfile(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise NotImplementedError("StartProfile: not served by spruce")

    def StopProfile(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise NotImplementedError("StopProfile: not served by spruce")

    def _tokenizer_files(self) -> tuple[Path, list[Path]]:
        """The loaded tokenizer exported once to a scratch directory (removed on ``close``)."""
        with self._zip_lock:
            if self._tokenizer_dir is None:
                out = Path(tempfile.mkdtemp(prefix="spruce-tokenizer-"))
                export_tokenizer(self.worker.engine, out)
                self._tokenizer_dir = out
            return self._tokenizer_dir, sorted(p for p in self._tokenizer_dir.iterdir() if p.name in _TOKENIZER_FILES)

    def _tokenizer_bundle(self) -> tuple[bytes, str]:
        """Those files as a zip (made once), and its sha256."""
        _, files = self._tokenizer_files()
        with self._zip_lock:
            if self._tokenizer_zip is None:
                buf = io.BytesIO()
                with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                    for path in files:
                        zf.write(path, path.name)
                data = buf.getvalue()
                self._tokenizer_zip = (data, hashlib.sha256(data).hexdigest())
            return self._tokenizer_zip


def export_tokenizer(engine: Any, out_dir: Path) -> list[Path]:
    """Write the engine's tokenizer (with its chat template and the target's config) to ``out_dir``:
    the local tokenizer directory a gateway such as SMG loads (``--model-path DIR``). Returns the
    files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    engine.tokenizer.save_pretrained(str(out_dir))
    template = getattr(engine.tokenizer, "chat_template", None)
    if isinstance(template, str) and not (out_dir / "chat_template.jinja").exists():
        (out_dir / "chat_template.jinja").write_text(template)
    engine.target.config.to_json_file(str(out_dir / "config.json"))
    return sorted(p for p in out_dir.iterdir() if p.name in _TOKENIZER_FILES)


def _chunk(token_ids: list[int], prompt_tokens: int) -> vpb.GenerateResponse:
    return vpb.GenerateResponse(
        chunk=vpb.GenerateStreamChunk(token_ids=token_ids, prompt_tokens=prompt_tokens, completion_tokens=len(token_ids))
    )


def _complete(
    token_ids: list[int], out: GenerationOutput, prompt_tokens: int, params: SamplingParams, engine: Any
) -> vpb.GenerateResponse:
    complete = vpb.GenerateComplete(
        output_ids=token_ids,
        finish_reason=out.finish_reason,
        prompt_tokens=prompt_tokens,
        completion_tokens=len(token_ids),
        spec_accepted_tokens=out.stats.accepted,
        spec_draft_tokens=out.stats.drafted,
    )
    matched = _matched_stop(out, params, engine)
    if isinstance(matched, int):
        complete.matched_token_id = matched
    elif isinstance(matched, str):
        complete.matched_stop_str = matched
    return vpb.GenerateResponse(complete=complete)


def _matched_stop(out: GenerationOutput, params: SamplingParams, engine: Any) -> int | str | None:
    """What ended a "stop" finish: the stop token id (EOS or a requested one), or the stop string."""
    if out.finish_reason != "stop" or not out.token_ids:
        return None
    last = out.token_ids[-1]
    if last in params.stop_token_ids or (not params.ignore_eos and last in engine.eos_ids):
        return int(last)
    if params.stop:
        text = engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        hits = [(i, s) for s in params.stop if (i := text.find(s)) >= 0]
        if hits:
            return min(hits)[1]
    return None


def add_to_server(servicer: VllmEngineServicer, server: grpc.Server) -> None:
    vpb_grpc.add_VllmEngineServicer_to_server(servicer, server)
