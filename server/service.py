"""spruce.v1.SpruceService: a thin adapter from protobuf to the engine worker and back.

Errors are not handled here: ``ErrorInterceptor`` maps spruce's exceptions to gRPC status codes for
every RPC of every service on the server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from spruce.errors import DeadlineExceededError, InvalidRequestError, NotFoundError, OverloadedError, UnavailableError
from spruce.server import convert
from spruce.server._gen.spruce.v1 import spruce_pb2 as pb
from spruce.server._gen.spruce.v1 import spruce_pb2_grpc as pb_grpc
from spruce.server.worker import EngineWorker, Job

log = logging.getLogger(__name__)

STATUS = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    # an RPC a service does not serve (generated stubs raise it too)
    NotImplementedError: grpc.StatusCode.UNIMPLEMENTED,
}


def status_of(exc: BaseException) -> grpc.StatusCode:
    for kind, code in STATUS.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


class _Undecodable:
    """Stands in for a request message that did not parse (invalid UTF-8 in a string field, bad wire
    format), so the handler can answer INVALID_ARGUMENT instead of gRPC's generic INTERNAL."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _safe(deserializer: Callable | None) -> Callable | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Undecodable(exc)

    return parse


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns exceptions raised by any handler into a status code and a message naming what was wrong;
    unexpected ones are logged and become INTERNAL (the server itself keeps running). Requests that do
    not parse get INVALID_ARGUMENT."""

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        kinds = (
            ("unary_unary", grpc.unary_unary_rpc_method_handler, _guard_unary),
            ("unary_stream", grpc.unary_stream_rpc_method_handler, _guard_stream),
            ("stream_stream", grpc.stream_stream_rpc_method_handler, _guard_stream),
        )
        for attr, make, guard in kinds:
            fn = getattr(handler, attr)
            if fn is not None:
                return make(
                    guard(fn),
                    request_deserializer=_safe(handler.request_deserializer),
                    response_serializer=handler.response_serializer,
                )
        return handler


def _checked(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise InvalidRequestError(f"the request message does not parse (invalid UTF-8 in a string field?): {request.error}")
    return request


def _checked_stream(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        yield _checked(request)


def _fail(context: grpc.ServicerContext, exc: Exception) -> None:
    code = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("internal error")
    context.abort(code, str(exc) or type(exc).__name__)


def _guard_unary(fn: Callable) -> Callable:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(_checked(request), context)
        except grpc.RpcError:
            raise
        except Exception as exc:
            _fail(context, exc)

    return wrapped


def _guard_stream(fn: Callable) -> Callable:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            if isinstance(request, Iterator):
                request = _checked_stream(request)
            yield from fn(_checked(request), context)
        except grpc.RpcError:
            raise
        except Exception as exc:
            _fail(context, exc)

    return wrapped


def submit(
    worker: EngineWorker, context: grpc.ServicerContext, prompt: Any, params: Any, spec: Any, request_id: str, text_deltas: bool
) -> Job:
    """Queue a request bound to its RPC: the client's deadline stops it, and so does cancellation."""
    remaining = context.time_remaining()
    job = worker.submit(prompt, params, spec, request_id, timeout_s=remaining, text_deltas=text_deltas)
    context.add_callback(job.cancel.set)  # runs when the RPC ends, also when the client goes away
    return job


class SpruceServicer(pb_grpc.SpruceServiceServicer):
    def __init__(self, worker: EngineWorker, served_model_name: str) -> None:
        self.worker = worker
        self.served_model_name = served_model_name

    def _job(self, request: pb.GenerateRequest, context: grpc.ServicerContext, streaming: bool) -> Job:
        engine = self.worker.engine
        prompt = convert.prompt_of(request, engine)
        params = convert.sampling_params(request.sampling)
        spec = convert.speculation(request.speculation, engine)
        return submit(self.worker, context, prompt, params, spec, request.request_id, streaming)

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> pb.GenerateResponse:
        job = self._job(request, context, streaming=False)
        for event in self.worker.events(job):
            if event.output is not None:
                return convert.response(job.request_id, event.output)
        raise AssertionError("the event stream ended without an output")

    def GenerateStream(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateStreamResponse]:
        job = self._job(request, context, streaming=True)
        for event in self.worker.events(job):
            yield convert.stream_response(job.request_id, event.token_ids, event.text, event.output)

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        if not request.request_id:
            raise InvalidRequestError("request_id: empty")
        return pb.AbortResponse(found=self.worker.abort(request.request_id))

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        return convert.model_info(self.worker.engine, self.served_model_name, self.worker.max_tokens_limit)

    def GetStats(self, request: pb.GetStatsRequest, context: grpc.ServicerContext) -> pb.ServerStats:
        return convert.server_stats(self.worker)
