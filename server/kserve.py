"""KServe v2 / Triton ``inference.GRPCInferenceService`` on the same engine, with the tensors Triton's
vLLM and TensorRT-LLM models use, so existing Triton clients and gateways work unchanged.

Inputs: ``text_input`` BYTES (required), ``max_tokens`` (INT32/UINT32/INT64, shape [1] or [1, 1]),
optional ``stream``, ``temperature``, ``top_p``, ``top_k``, ``random_seed``, ``sampling_parameters`` (a
JSON string with the same keys plus ``stop``), ``exclude_input_in_output``. BYTES arrive either as
``raw_input_contents`` (each element a 4-byte little-endian length, then the bytes) or typed
``contents.bytes_contents``; both are accepted. Outputs: ``text_output`` BYTES, ``finish_reason`` BYTES,
``prompt_tokens`` / ``completion_tokens`` INT32, all as raw contents (never mixed with typed ones). The
model is decoupled: ``ModelStreamInfer`` sends one response per step and marks the last with the
``triton_final_response`` parameter. The message stubs are tritonclient's (the protocol's own).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from spruce import __version__
from spruce.config import SamplingParams
from spruce.engine import DEFAULT
from spruce.errors import InvalidRequestError, NotFoundError
from spruce.server.service import status_of, submit
from spruce.server.worker import EngineWorker

_INT_TYPES = {"INT32": "<i4", "UINT32": "<u4", "INT64": "<i8", "UINT64": "<u8"}
_FLOAT_TYPES = {"FP32": "<f4", "FP64": "<f8"}
_INPUTS = [
    ("text_input", "BYTES", [1]),
    ("max_tokens", "INT32", [1]),
    ("stream", "BOOL", [1]),
    ("temperature", "FP32", [1]),
    ("top_p", "FP32", [1]),
    ("top_k", "INT32", [1]),
    ("random_seed", "UINT64", [1]),
    ("sampling_parameters", "BYTES", [1]),
    ("exclude_input_in_output", "BOOL", [1]),
]
_OUTPUTS = [("text_output", "BYTES", [-1]), ("finish_reason", "BYTES", [-1]), ("prompt_tokens", "INT32", [-1]), ("completion_tokens", "INT32", [-1])]
_OPTIONAL = {"stream", "temperature", "top_p", "top_k", "random_seed", "sampling_parameters", "exclude_input_in_output", "max_tokens"}


def add_to_server(servicer: KServeServicer, server: grpc.Server) -> None:
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)


def _decode_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    out, pos = [], 0
    for _ in range(count):
        if pos + 4 > len(raw):
            raise InvalidRequestError(f"input {name}: BYTES raw content is truncated")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        out.append(raw[pos : pos + n])
        pos += n
    if pos != len(raw):
        raise InvalidRequestError(f"input {name}: BYTES raw content has {len(raw) - pos} extra bytes")
    return out


def _encode_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _tensors(request: pb.ModelInferRequest) -> dict[str, list[Any]]:
    """Each input as a flat list of Python values, whichever way it was sent."""
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidRequestError(f"{len(request.inputs)} inputs but {len(request.raw_input_contents)} raw contents")
    values: dict[str, list[Any]] = {}
    for i, tensor in enumerate(request.inputs):
        count = int(np.prod(tensor.shape)) if tensor.shape else 1
        if count != 1 or len(tensor.shape) > 2:
            raise InvalidRequestError(f"input {tensor.name}: shape {list(tensor.shape)}, expected [1] or [1, 1]")
        raw = request.raw_input_contents[i] if request.raw_input_contents else None
        dt = tensor.datatype
        if dt == "BYTES":
            items = _decode_bytes(raw, count, tensor.name) if raw is not None else list(tensor.contents.bytes_contents)
        elif dt in _INT_TYPES or dt in _FLOAT_TYPES or dt == "BOOL":
            if raw is not None:
                np_type = _INT_TYPES.get(dt) or _FLOAT_TYPES.get(dt) or "?"
                if len(raw) != np.dtype(np_type).itemsize * count:
                    raise InvalidRequestError(f"input {tensor.name}: {len(raw)} bytes for {count} {dt}")
                items = np.frombuffer(raw, dtype=np_type).tolist()
            else:
                c = tensor.contents
                items = list(
                    c.int_contents or c.int64_contents or c.uint_contents or c.uint64_contents
                    or c.fp32_contents or c.fp64_contents or c.bool_contents
                )
        else:
            raise InvalidRequestError(f"input {tensor.name}: unsupported datatype {dt}")
        if len(items) != count:
            raise InvalidRequestError(f"input {tensor.name}: {len(items)} values for shape {list(tensor.shape)}")
        values[tensor.name] = items
    return values


def _request_of(values: dict[str, list[Any]]) -> tuple[str, SamplingParams, bool, bool]:
    """(prompt text, sampling params, stream, exclude_input_in_output) from the decoded tensors."""
    unknown = set(values) - _OPTIONAL - {"text_input"}
    if unknown:
        raise InvalidRequestError(f"unknown inputs {sorted(unknown)}; expected text_input and {sorted(_OPTIONAL)}")
    if "text_input" not in values:
        raise InvalidRequestError("input text_input is required")
    try:
        text = values["text_input"][0].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError("input text_input is not valid UTF-8") from None
    extra: dict[str, Any] = {}
    if "sampling_parameters" in values:
        try:
            extra = json.loads(values["sampling_parameters"][0].decode("utf-8") or "{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequestError(f"input sampling_parameters is not a JSON object: {exc}") from None
        if not isinstance(extra, dict):
            raise InvalidRequestError("input sampling_parameters must be a JSON object")

    def pick(name: str, default: Any) -> Any:
        return values[name][0] if name in values else extra.get(name, default)

    seed = pick("random_seed", extra.get("seed"))
    stop = extra.get("stop", ())
    params = SamplingParams(
        max_tokens=int(pick("max_tokens", SamplingParams().max_tokens)),
        temperature=float(pick("temperature", 0.0)),
        top_p=float(pick("top_p", 1.0)),
        top_k=int(pick("top_k", 0)),
        seed=None if seed is None else int(seed),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
    )
    return text, params, bool(pick("stream", False)), bool(pick("exclude_input_in_output", False))


def _response(name: str, request_id: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int, final: bool | None) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name=name, model_version="1", id=request_id)
    for out_name, datatype, _ in _OUTPUTS:
        resp.outputs.add(name=out_name, datatype=datatype, shape=[1])
    resp.raw_output_contents.extend([
        _encode_bytes([text.encode("utf-8")]),
        _encode_bytes([finish.encode("utf-8")]),
        np.array([prompt_tokens], dtype="<i4").tobytes(),
        np.array([completion_tokens], dtype="<i4").tobytes(),
    ])
    if final is not None:
        resp.parameters["triton_final_response"].bool_param = final
    return resp


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, worker: EngineWorker, served_model_name: str) -> None:
        self.worker = worker
        self.name = served_model_name

    def _check_model(self, name: str, version: str = "") -> None:
        if name != self.name:
            raise NotFoundError(f"unknown model {name!r}; this server serves {self.name!r}")
        if version not in ("", "1"):
            raise NotFoundError(f"model {name!r} has no version {version!r} (only 1)")

    def _ready(self) -> bool:
        try:
            return bool(self.worker.accepting)
        except Exception:
            return False

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready())

    def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == self.name and request.version in ("", "1") and self._ready())

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="spruce", version=__version__, extensions=[])

    def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext) -> pb.ModelMetadataResponse:
        self._check_model(request.name, request.version)
        meta = pb.ModelMetadataResponse(name=self.name, versions=["1"], platform="spruce")
        for name, datatype, shape in _INPUTS:
            meta.inputs.add(name=name, datatype=datatype, shape=shape)
        for name, datatype, shape in _OUTPUTS:
            meta.outputs.add(name=name, datatype=datatype, shape=shape)
        return meta

    def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.ServicerContext) -> pb.ModelConfigResponse:
        self._check_model(request.name, request.version)
        config = mc.ModelConfig(name=self.name, backend="spruce", max_batch_size=0)
        config.model_transaction_policy.decoupled = True
        for name, datatype, shape in _INPUTS:
            config.input.add(name=name, data_type=getattr(mc, "TYPE_" + ("STRING" if datatype == "BYTES" else datatype)), dims=shape, optional=name in _OPTIONAL)
        for name, datatype, shape in _OUTPUTS:
            config.output.add(name=name, data_type=getattr(mc, "TYPE_" + ("STRING" if datatype == "BYTES" else datatype)), dims=shape)
        return pb.ModelConfigResponse(config=config)

    def _generate(self, request: pb.ModelInferRequest, context: grpc.ServicerContext, streaming: bool) -> Iterator[pb.ModelInferResponse]:
        self._check_model(request.model_name, request.model_version)
        text, params, stream, exclude_input = _request_of(_tensors(request))
        stream = stream and streaming
        job = submit(self.worker, context, text, params, DEFAULT, request.id, text_deltas=stream)
        for event in self.worker.events(job):
            out = event.output
            if stream:
                if out is None:
                    yield _response(self.name, request.id, event.text, "", len(job.prompt_ids), 0, False)
                else:
                    yield _response(self.name, request.id, event.text, out.finish_reason, len(out.prompt_token_ids), len(out.token_ids), True)
            elif out is not None:
                full = out.text if exclude_input else text + out.text
                yield _response(self.name, request.id, full, out.finish_reason, len(out.prompt_token_ids), len(out.token_ids), True if streaming else None)

    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        responses = list(self._generate(request, context, streaming=False))
        return responses[-1]

    def ModelStreamInfer(self, request_iterator: Iterator[pb.ModelInferRequest], context: grpc.ServicerContext) -> Iterator[pb.ModelStreamInferResponse]:
        for request in request_iterator:
            try:
                for resp in self._generate(request, context, streaming=True):
                    yield pb.ModelStreamInferResponse(infer_response=resp)
            except Exception as exc:  # a failed request reports in-band; the stream goes on
                code = status_of(exc)
                yield pb.ModelStreamInferResponse(error_message=f"{code.name}: {exc}")
