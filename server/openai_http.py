"""OpenAI-compatible HTTP on the metrics port: what gateways that speak OpenAI (Envoy AI Gateway, the
Gateway API Inference Extension, LiteLLM, nginx) and the ``openai`` client send and expect.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with SSE streaming and
``stream_options.include_usage``), ``GET /v1/models``, ``GET /health`` (200 when serving, 503 while
loading or draining), ``GET /metrics`` (Prometheus). Request fields: model, prompt / messages,
max_tokens (chat: also max_completion_tokens), temperature, top_p, n (1 only), stop, seed, stream,
stream_options; extensions: ``speculation`` (``"off"`` for plain decoding) and vLLM's ``ignore_eos``. Speculation telemetry
rides where clients look: ``usage.completion_tokens_details`` (accepted / rejected prediction tokens)
and the full stats under ``spruce``. Errors use OpenAI's JSON shape with 400, 401, 404 (unknown model),
429 (queue full), 503 (not ready or draining), 500. A client that disconnects mid-stream aborts its
request (its KV is freed at the next step).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from spruce.config import SamplingParams
from spruce.engine import DEFAULT, GenerationOutput
from spruce.errors import InvalidRequestError, NotFoundError, OverloadedError, UnavailableError

log = logging.getLogger(__name__)

_STATUS = ((InvalidRequestError, 400, "invalid_request_error"), (NotFoundError, 404, "not_found_error"),
           (OverloadedError, 429, "rate_limit_error"), (UnavailableError, 503, "service_unavailable"))
# OpenAI's defaults for fields a request leaves out
_DEFAULT_MAX_TOKENS = 16


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


def _error_of(exc: BaseException) -> OpenAIError:
    if isinstance(exc, OpenAIError):
        return exc
    for kind, status, name in _STATUS:
        if isinstance(exc, kind):
            return OpenAIError(status, str(exc), name)
    log.exception("request failed", exc_info=exc)
    return OpenAIError(500, f"{type(exc).__name__}: {exc}", "server_error")


def parse_request(body: dict, chat: bool, served_model_name: str, max_tokens_limit: int) -> tuple[SamplingParams, Any]:
    """OpenAI request fields -> (SamplingParams, speculation); raises ``OpenAIError`` naming the field."""
    model = body.get("model")
    if model is not None and model != served_model_name:
        raise OpenAIError(404, f"model {model!r} does not exist; this server serves {served_model_name!r}", "not_found_error", "model", "model_not_found")
    if body.get("n", 1) != 1:
        raise OpenAIError(400, "n must be 1 (one choice per request)", "invalid_request_error", "n")
    for unsupported in ("best_of", "logprobs", "echo", "suffix", "tools", "functions", "response_format", "logit_bias"):
        if body.get(unsupported) not in (None, False, 1) or (unsupported == "logprobs" and body.get("logprobs")):
            raise OpenAIError(400, f"{unsupported} is not supported", "invalid_request_error", unsupported)
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = max_tokens_limit if chat else _DEFAULT_MAX_TOKENS
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens > max_tokens_limit:
        raise OpenAIError(400, f"max_tokens must be an integer <= {max_tokens_limit}, got {max_tokens!r}", "invalid_request_error", "max_tokens")
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise OpenAIError(400, "stop must be a string or a list of strings", "invalid_request_error", "stop")
    numbers = {}
    for name, default in (("temperature", 1.0), ("top_p", 1.0)):
        value = body.get(name, default)
        if value is None:
            value = default
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise OpenAIError(400, f"{name} must be a number, got {value!r}", "invalid_request_error", name)
        numbers[name] = float(value)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise OpenAIError(400, f"seed must be an integer, got {seed!r}", "invalid_request_error", "seed")
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=numbers["temperature"], top_p=numbers["top_p"], seed=seed, stop=tuple(stop),
            ignore_eos=bool(body.get("ignore_eos", False)),
        )
    except InvalidRequestError as exc:
        raise OpenAIError(400, str(exc), "invalid_request_error") from None
    speculation = body.get("speculation", "default")
    if speculation not in ("off", "default"):
        raise OpenAIError(400, 'speculation must be "off" or "default"', "invalid_request_error", "speculation")
    return params, (None if speculation == "off" else DEFAULT)


def prompt_of(body: dict, chat: bool, engine: Any) -> str | list[int]:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise OpenAIError(400, "messages must be a non-empty list", "invalid_request_error", "messages")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise OpenAIError(400, "each message needs a string role and string content", "invalid_request_error", "messages")
        return engine.chat_prompt([{"role": m["role"], "content": m["content"]} for m in messages])
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        return prompt
    raise OpenAIError(400, "prompt must be a string, a list of token ids, or a list of one of those", "invalid_request_error", "prompt")


def usage(out: GenerationOutput) -> dict:
    s = out.stats
    return {
        "prompt_tokens": len(out.prompt_token_ids),
        "completion_tokens": len(out.token_ids),
        "total_tokens": len(out.prompt_token_ids) + len(out.token_ids),
        "completion_tokens_details": {"accepted_prediction_tokens": s.accepted, "rejected_prediction_tokens": s.drafted - s.accepted},
    }


class _Handler(BaseHTTPRequestHandler):
    server: OpenAIHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # requests go to the debug log, not stderr
        log.debug("%s " + format, self.address_string(), *args)

    # ---- plumbing -----------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode())

    def _fail(self, exc: BaseException) -> None:
        err = _error_of(exc)
        self._json(err.status, err.body())

    def _authorized(self) -> bool:
        token = self.server.auth_token
        return token is None or self.headers.get("Authorization") == f"Bearer {token}"

    # ---- routes -------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        s = self.server
        if self.path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            self._send(200, generate_latest(s.registry), CONTENT_TYPE_LATEST)
        elif self.path == "/health":
            ok = s.worker() is not None and s.worker().accepting
            self._json(200 if ok else 503, {"status": "ok" if ok else "unavailable"})
        elif self.path == "/v1/models":
            if not self._authorized():
                return self._fail(OpenAIError(401, "missing or wrong bearer token", "authentication_error"))
            self._json(200, {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": s.started, "owned_by": "spruce"}]})
        else:
            self._fail(OpenAIError(404, f"no route {self.path}", "not_found_error"))

    def do_POST(self) -> None:
        chat = self.path == "/v1/chat/completions"
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            return self._fail(OpenAIError(404, f"no route {self.path}", "not_found_error"))
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length > self.server.max_body_bytes:
                raise OpenAIError(413, f"request body over {self.server.max_body_bytes} bytes", "invalid_request_error")
            raw = self.rfile.read(length)
            if not self._authorized():
                raise OpenAIError(401, "missing or wrong bearer token", "authentication_error")
            try:
                body = json.loads(raw or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise OpenAIError(400, f"the body is not JSON: {exc}", "invalid_request_error") from None
            if not isinstance(body, dict):
                raise OpenAIError(400, "the body must be a JSON object", "invalid_request_error")
            worker = self.server.worker()
            if worker is None:
                raise UnavailableError("the models are still loading")
            params, spec = parse_request(body, chat, self.server.model_name, worker.max_tokens_limit)
            prompt = prompt_of(body, chat, worker.engine)
            stream = bool(body.get("stream"))
            job = worker.submit(prompt, params, spec, text_deltas=stream)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error response
            return self._fail(exc)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if stream:
            self._stream(worker, job, chat, include_usage)
        else:
            self._complete(worker, job, chat)

    def _complete(self, worker: Any, job: Any, chat: bool) -> None:
        try:
            out = None
            for event in worker.events(job):
                out = event.output
        except Exception as exc:  # noqa: BLE001 - the request failed alone: answer with its error
            return self._fail(exc)
        assert out is not None
        choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(out.finish_reason)}
        if chat:
            choice["message"] = {"role": "assistant", "content": out.text}
        else:
            choice.update(text=out.text, logprobs=None)
        self._json(200, {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{job.request_id}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.server.model_name,
            "choices": [choice],
            "usage": usage(out),
            "spruce": out.stats.to_dict(),
        })

    def _stream(self, worker: Any, job: Any, chat: bool, include_usage: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{job.request_id}"
        kind = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> dict:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = ({"role": "assistant"} if first else {}) | ({"content": delta} if delta else {})
            else:
                choice.update(text=delta or "", logprobs=None)
            return {"id": ident, "object": kind, "created": created, "model": self.server.model_name, "choices": [choice]}

        try:
            if chat:
                self._event(chunk(None, None, first=True))
            for event in worker.events(job):
                if event.output is None:
                    if event.text:
                        self._event(chunk(event.text, None))
                    continue
                out = event.output
                self._event(chunk(event.text, _finish(out.finish_reason)))
                if include_usage:
                    self._event({"id": ident, "object": kind, "created": created, "model": self.server.model_name,
                                 "choices": [], "usage": usage(out), "spruce": out.stats.to_dict()})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            job.cancel.set()  # the client went away: stop the request and free its KV
        except Exception as exc:  # noqa: BLE001 - the request failed alone: an error event ends the stream
            job.cancel.set()
            try:
                self._event(_error_of(exc).body())
                self.wfile.write(b"data: [DONE]\n\n")
            except OSError:
                pass

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()


def _finish(reason: str) -> str:
    return {"stop": "stop", "length": "length"}.get(reason, "abort")


class OpenAIHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], model_name: str, registry: Any, worker: Callable[[], Any], auth_token: str | None = None) -> None:
        super().__init__(address, _Handler)
        self.model_name, self.registry, self.worker, self.auth_token = model_name, registry, worker, auth_token
        self.started = int(time.time())
        self.max_body_bytes = 16 << 20


def serve_http(host: str, port: int, model_name: str, registry: Any, worker: Callable[[], Any], auth_token: str | None) -> OpenAIHTTPServer:
    """Start the HTTP server in a daemon thread; ``worker()`` is None until the models are loaded."""
    import threading

    httpd = OpenAIHTTPServer((host, port), model_name, registry, worker, auth_token)
    threading.Thread(target=httpd.serve_forever, name="spruce-http", daemon=True).start()
    return httpd

