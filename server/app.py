"""The gRPC server: spruce.v1, KServe v2 and the SMG worker protocol (``vllm.grpc.engine.VllmEngine``)
on one engine and one port, health, reflection, Prometheus.

``start(...)`` binds the port at once with health NOT_SERVING, loads the engine (a callable, so that a
client sees "loading" rather than a refused connection), then switches health to SERVING. ``stop``
drains: health NOT_SERVING, no new requests, in-flight ones get ``grace_s`` to finish, the rest are
aborted. ``spruce serve`` runs it until SIGTERM / SIGINT.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from spruce.config import ServeConfig
from spruce.engine import Engine
from spruce.errors import UnavailableError
from spruce.server._gen.spruce.v1 import spruce_pb2, spruce_pb2_grpc
from spruce.server.metrics import Metrics
from spruce.server.service import ErrorInterceptor, SpruceServicer
from spruce.server import smg
from spruce.server.worker import EngineWorker

log = logging.getLogger(__name__)

SPRUCE_SERVICE = spruce_pb2.DESCRIPTOR.services_by_name["SpruceService"].full_name
# a request message larger than this is refused by gRPC itself (RESOURCE_EXHAUSTED)
MAX_MESSAGE_BYTES = 16 << 20


class BearerAuth(grpc.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every RPC except health checks."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}"

        def deny(request: Any, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token (metadata 'authorization')")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation: Callable, details: Any) -> Any:
        if details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(details)
        if dict(details.invocation_metadata).get("authorization") == self._expected:
            return continuation(details)
        return self._deny


@dataclass
class Server:
    """A running server: its bound port and what ``stop`` needs."""

    grpc_server: grpc.Server
    port: int
    health: health.HealthServicer
    config: ServeConfig
    metrics: Metrics
    worker: EngineWorker | None = None
    http_server: Any = None
    # the SMG worker service (its load streams end on stop)
    smg: Any = None
    ready: threading.Event = field(default_factory=threading.Event)
    load_error: BaseException | None = None

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SPRUCE_SERVICE, "inference.GRPCInferenceService", smg.SERVICE):
            self.health.set(name, status)

    def stop(self, grace_s: float | None = None) -> None:
        grace = self.config.grace_s if grace_s is None else grace_s
        self.set_serving(False)
        if self.smg is not None:
            self.smg.close()
        if self.worker is not None:
            self.worker.drain(grace)
        self.grpc_server.stop(grace=1.0).wait()
        if self.http_server is not None:
            self.http_server.shutdown()
            self.http_server.server_close()


class _LazyWorker:
    """Stands in for the worker until the engine is loaded: every call says the server is not ready."""

    def __getattr__(self, name: str) -> Any:
        raise UnavailableError("the model is still loading")


def start(load_engine: Callable[[], Engine], config: ServeConfig = ServeConfig(), block_until_ready: bool = True) -> Server:
    """Bind, then load the engine in the background; returns once serving (or immediately)."""
    interceptors: list[grpc.ServerInterceptor] = [ErrorInterceptor()]
    if config.auth_token:
        interceptors.insert(0, BearerAuth(config.auth_token))
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.threads), interceptors=interceptors, options=options)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    metrics = Metrics(config.served_model_name)
    spruce_servicer = SpruceServicer(_LazyWorker(), config.served_model_name)  # type: ignore[arg-type]
    spruce_pb2_grpc.add_SpruceServiceServicer_to_server(spruce_servicer, grpc_server)
    from spruce.server.kserve import KServeServicer, add_to_server

    kserve = KServeServicer(_LazyWorker(), config.served_model_name)  # type: ignore[arg-type]
    add_to_server(kserve, grpc_server)
    from spruce.server import smg

    smg_servicer = smg.VllmEngineServicer(_LazyWorker(), config.served_model_name)
    smg.add_to_server(smg_servicer, grpc_server)
    reflection.enable_server_reflection(
        (SPRUCE_SERVICE, "inference.GRPCInferenceService", smg.SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), grpc_server
    )
    address = f"{config.host}:{config.port}"
    if config.tls_cert and config.tls_key:
        with open(config.tls_key, "rb") as k, open(config.tls_cert, "rb") as c:
            port = grpc_server.add_secure_port(address, grpc.ssl_server_credentials([(k.read(), c.read())]))
    else:
        port = grpc_server.add_insecure_port(address)
    server = Server(grpc_server, port, health_servicer, config, metrics, smg=smg_servicer)
    server.set_serving(False)
    grpc_server.start()
    if config.http_port:
        from spruce.server.openai_http import serve_http

        # OpenAI-compatible API, health and Prometheus metrics on one HTTP port
        server.http_server = serve_http(
            config.host, config.http_port, config.served_model_name, metrics.registry, lambda: server.worker, config.auth_token
        )

    def load() -> None:
        try:
            engine = load_engine()
            worker = EngineWorker(engine, metrics, config.max_queue, config.max_tokens_limit)
            server.worker = worker
            spruce_servicer.worker = worker
            kserve.worker = worker
            smg_servicer.worker = worker
            server.set_serving(True)
            log.info("serving %s on port %d", config.served_model_name, port)
        except BaseException as exc:  # loading failed: stay up, NOT_SERVING, and say why in the log
            server.load_error = exc
            log.exception("loading the models failed")
        finally:
            server.ready.set()

    threading.Thread(target=load, name="spruce-load", daemon=True).start()
    if block_until_ready:
        server.ready.wait()
    return server


def serve_forever(load_engine: Callable[[], Engine], config: ServeConfig) -> int:
    """Run until SIGTERM or SIGINT, then drain within ``config.grace_s``."""
    server = start(load_engine, config, block_until_ready=False)
    stopping = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal %d: draining (grace %.0f s)", signum, config.grace_s)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"spruce: gRPC on {config.host}:{server.port}, OpenAI HTTP and /metrics on :{config.http_port} (loading models...)", flush=True)
    stopping.wait()
    server.stop()
    if server.worker is not None and server.worker.engine.tp is not None:
        server.worker.engine.tp.close()  # the other ranks were released by the drained worker
    return 1 if server.load_error is not None else 0
