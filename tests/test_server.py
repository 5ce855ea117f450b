"""The gRPC server in process on 127.0.0.1 with tiny models: spruce.v1 with its own stubs, KServe v2 with
the real tritonclient, health, reflection, metrics, and the safe-failure list."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from conftest import free_port, wait_serving
from grpc_health.v1 import health_pb2, health_pb2_grpc
from spruce.server._gen.spruce.v1 import spruce_pb2 as pb
from spruce.server._gen.spruce.v1 import spruce_pb2_grpc as pb_grpc
from spruce.server.app import start

from spruce.config import EngineConfig, SamplingParams, ServeConfig
from spruce.engine import Engine

MODEL = "tiny"


# plain decoding: a request's pass count (and so its duration on the slow server) is its token count
_OFF = pb.SpeculationOptions(mode=pb.SPECULATION_MODE_OFF)


def _drafting_engine(tiny_target, tiny_draft, tokenizer) -> Engine:
    """Pass costs set as on a GPU (flat verify, cheap draft) so the adaptive plan drafts from the start;
    online timings refine them as requests run."""
    engine = Engine(tiny_target, tokenizer, tiny_draft)
    _gpu_like_costs(engine)
    return engine


def _gpu_like_costs(engine: Engine) -> None:
    for size in range(1, 18):
        engine.verify_costs.points[size] = 0.01
    engine.draft_costs.points.update({1: 0.0005, 2: 0.001})


@pytest.fixture(scope="module")
def server(tiny_target, tiny_draft, tokenizer):
    config = ServeConfig(host="127.0.0.1", port=0, http_port=free_port(), served_model_name=MODEL, max_queue=2, max_tokens_limit=64, grace_s=2)
    srv = start(lambda: _drafting_engine(tiny_target, tiny_draft, tokenizer), config)
    assert srv.load_error is None
    yield srv
    srv.stop(grace_s=1)


@pytest.fixture(scope="module")
def slow_server(tiny_target, tiny_draft, tokenizer):
    """Every target pass takes >= 30 ms: long requests stay in flight long enough to abort, expire or
    fill the queue, whatever the machine's speed."""
    import copy

    target = copy.deepcopy(tiny_target)
    target.register_forward_pre_hook(lambda module, args: time.sleep(0.03))
    config = ServeConfig(host="127.0.0.1", port=0, http_port=0, served_model_name=MODEL, max_queue=2, max_tokens_limit=64, grace_s=2)
    # one KV slot: one request runs, the others wait in the queue
    srv = start(lambda: Engine(target, tokenizer, tiny_draft, EngineConfig(max_batch_size=1)), config)
    yield srv
    srv.stop(grace_s=1)


@pytest.fixture(scope="module")
def slow_stub(slow_server):
    channel = grpc.insecure_channel(f"127.0.0.1:{slow_server.port}")
    yield pb_grpc.SpruceServiceStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield pb_grpc.SpruceServiceStub(channel)
    channel.close()


def _req(text: str = "hello", max_tokens: int = 6, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=text, sampling=pb.SamplingOptions(max_tokens=max_tokens, ignore_eos=True, **kw))


def test_generate_matches_the_engine(server, stub):
    want = server.worker.engine.generate("hello", SamplingParams(max_tokens=6, ignore_eos=True))[0]
    got = stub.Generate(_req())
    assert list(got.token_ids) == want.token_ids and got.text == want.text
    assert got.finish_reason == pb.FINISH_REASON_LENGTH and got.completion_tokens == 6
    assert got.stats.steps >= 1 and got.stats.mean_accepted_length >= 1.0
    assert got.request_id
    # the cost model's choices and its plans' calibration travel with the stats
    assert sum(got.stats.steps_by_planned_budget.values()) == got.stats.steps
    planned = sum(n for budget, n in got.stats.steps_by_planned_budget.items() if budget > 0)
    assert got.stats.planned_steps == planned
    assert got.stats.planned_expected_tokens >= planned and got.stats.planned_emitted_tokens >= planned


def test_stats_message_carries_every_counter():
    from spruce.server.convert import spec_stats
    from spruce.stats import SpecStats

    stats = SpecStats()
    stats.record_plan(5, 2.5)
    stats.record_step(2, 5, 1, 2)
    stats.record_plan(0)
    stats.record_step(0, 0, 0, 1)
    msg = spec_stats(stats)
    assert dict(msg.steps_by_planned_budget) == {5: 1, 0: 1} and dict(msg.steps_by_tree_size) == {5: 1, 0: 1}
    assert (msg.planned_steps, msg.planned_expected_tokens, msg.planned_emitted_tokens) == (1, 2.5, 2)


def test_stream_in_order_adds_up(stub):
    whole = stub.Generate(_req(max_tokens=10))
    parts = list(stub.GenerateStream(_req(max_tokens=10)))
    assert [m.finished for m in parts] == [False] * (len(parts) - 1) + [True]
    assert [t for m in parts for t in m.token_ids] == list(whole.token_ids)
    assert "".join(m.text for m in parts) == whole.text
    assert parts[-1].stats.steps == len(parts)


def test_token_ids_prompt_and_speculation_off(stub):
    on = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling=pb.SamplingOptions(max_tokens=8, ignore_eos=True)))
    off = stub.Generate(pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[5, 6, 7]), sampling=pb.SamplingOptions(max_tokens=8, ignore_eos=True),
        speculation=pb.SpeculationOptions(mode=pb.SPECULATION_MODE_OFF),
    ))
    assert list(on.token_ids) == list(off.token_ids)
    assert off.stats.draft_tokens == 0


@pytest.mark.parametrize(
    "request_, field",
    [
        (pb.GenerateRequest(sampling=pb.SamplingOptions(max_tokens=4)), "prompt"),
        (pb.GenerateRequest(text="", sampling=pb.SamplingOptions(max_tokens=4)), "empty"),
        (_req(max_tokens=-1), "max_tokens"),
        (_req(max_tokens=65), "max_tokens"),
        (_req(temperature=-1.0), "temperature"),
        (_req(top_p=1.5), "top_p"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[999999]), sampling=pb.SamplingOptions(max_tokens=4)), "vocabulary"),
        (pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(200)) * 3), sampling=pb.SamplingOptions(max_tokens=4)), "context"),
    ],
    ids=["no_prompt", "empty", "negative_max_tokens", "max_tokens_over_limit", "temperature", "top_p", "bad_token", "too_long"],
)
def test_bad_input_is_invalid_argument(stub, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


def test_model_info_and_stats(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.served_model_name == MODEL and info.vocab_size > 0
    assert info.draft_vocab == 0  # a tiny vocabulary: the draft scores every id
    stub.Generate(_req())
    stats = stub.GetStats(pb.GetStatsRequest())
    assert stats.requests_finished >= 1 and stats.steps >= 1 and stats.output_tokens >= 6
    assert json.loads(stats.speculation_telemetry_json)["draft_vocab"] == 0


def test_abort_stops_a_running_stream(slow_server, slow_stub):
    server, stub = slow_server, slow_stub
    stream = stub.GenerateStream(pb.GenerateRequest(request_id="abort-me", token_ids=pb.TokenIds(ids=[1, 2]), sampling=pb.SamplingOptions(max_tokens=60, ignore_eos=True), speculation=_OFF))
    first = next(stream)
    assert not first.finished
    assert stub.Abort(pb.AbortRequest(request_id="abort-me")).found
    rest = list(stream)
    assert rest[-1].finished and rest[-1].finish_reason == pb.FINISH_REASON_ABORT
    assert rest[-1].completion_tokens < 60
    assert not stub.Abort(pb.AbortRequest(request_id="abort-me")).found
    assert server.worker.running == 0 and server.worker.engine.kv_usage()["slots_free"] == 1


def test_deadline_stops_generation(slow_server, slow_stub):
    server, stub = slow_server, slow_stub
    with pytest.raises(grpc.RpcError) as err:
        # speculation off: 64 passes of >= 30 ms each, however well the draft guesses
        stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[3, 4]), sampling=pb.SamplingOptions(max_tokens=64, ignore_eos=True), speculation=_OFF), timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    end = time.monotonic() + 10
    while server.worker.running and time.monotonic() < end:
        time.sleep(0.05)
    assert server.worker.running == 0  # the worker stopped instead of finishing 64 tokens


def test_overload_is_resource_exhausted(slow_server, slow_stub):
    server, stub = slow_server, slow_stub
    # start from an idle server: requests of an earlier test on it (cancelled, not yet reaped) would
    # otherwise count as ours below and then finish, leaving room for the request meant to be refused
    _wait_idle(server.worker)
    long = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), sampling=pb.SamplingOptions(max_tokens=64, ignore_eos=True), speculation=_OFF)
    streams = [stub.GenerateStream(long) for _ in range(3)]  # one runs, two wait: the queue (2) is full
    end = time.monotonic() + 10
    while (server.worker.waiting < 2 or not server.worker.running) and time.monotonic() < end:
        time.sleep(0.01)
    codes = []
    try:
        stub.Generate(long)
    except grpc.RpcError as exc:
        codes.append(exc.code())
    for s in streams:
        s.cancel()
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED]
    _wait_idle(server.worker)
    assert server.worker.waiting == 0 and server.worker.running == 0


def _wait_idle(worker, timeout_s: float = 20) -> None:
    end = time.monotonic() + timeout_s
    while (worker.running or worker.waiting) and time.monotonic() < end:
        time.sleep(0.05)


def test_health_and_metrics(server, stub, monkeypatch):
    # the tiny draft costs as much as the tiny target, so once online timings of earlier tests on this
    # server replace the GPU-like costs, the plan stops drafting (it did within 8 prompts on a quiet
    # machine): this test is about the counters, so it puts those costs back and holds them
    from spruce.costmodel import CostCurve

    monkeypatch.setattr(CostCurve, "observe", lambda self, size, seconds: None)
    _gpu_like_costs(server.worker.engine)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
    before = stub.GetStats(pb.GetStatsRequest())
    # adaptive speculation decides from measured timings whether to draft: ask until a draft was accepted
    replies = []
    for prompt in ("hello", "abcabcabc", "the the the", "12121212", "xyz", "hello hello", "aaaaaaaa", "0101010101"):
        replies.append(stub.Generate(_req(text=prompt, max_tokens=12)))
        if sum(r.stats.accepted_tokens for r in replies) > 0 and sum(r.stats.planned_steps for r in replies) > 0:
            break
    after = stub.GetStats(pb.GetStatsRequest())
    assert after.accepted_tokens - before.accepted_tokens == sum(r.stats.accepted_tokens for r in replies) > 0
    # the server-wide plan calibration counters sum the requests' own
    assert after.planned_steps - before.planned_steps == sum(r.stats.planned_steps for r in replies) > 0
    assert after.planned_emitted_tokens - before.planned_emitted_tokens == sum(r.stats.planned_emitted_tokens for r in replies)
    expected = sum(r.stats.planned_expected_tokens for r in replies)
    assert after.planned_expected_tokens - before.planned_expected_tokens == pytest.approx(expected)
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.config.http_port}/metrics").read().decode()
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in body.splitlines() if line.startswith("spruce:")}
    assert samples['spruce:planned_steps_total{model_name="tiny"}'] == after.planned_steps
    assert samples['spruce:planned_emitted_tokens_total{model_name="tiny"}'] == after.planned_emitted_tokens
    assert samples['spruce:planned_expected_tokens_total{model_name="tiny"}'] == pytest.approx(after.planned_expected_tokens)
    for name in (
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:spec_decode_num_drafts_total",
        "vllm:spec_decode_num_draft_tokens_total",
        "vllm:spec_decode_num_accepted_tokens_total",
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="tiny",position="0"}',
    ):
        assert name in body, name
    channel.close()


def test_health_while_loading_and_draining(tiny_target, tokenizer):
    gate = threading.Event()

    def slow_load() -> Engine:
        gate.wait(10)
        return Engine(tiny_target, tokenizer)

    srv = start(slow_load, ServeConfig(host="127.0.0.1", port=0, http_port=0, served_model_name=MODEL), block_until_ready=False)
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.SpruceServiceStub(channel).Generate(_req())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    gate.set()
    srv.ready.wait(10)
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
    srv.set_serving(False)  # what stop() does first
    assert health.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.NOT_SERVING
    channel.close()
    srv.stop(grace_s=0.5)


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"spruce.v1.SpruceService", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    channel.close()


# ---- KServe v2 with the real Triton client -----------------------------------------------------------


@pytest.fixture(scope="module")
def triton(server):
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield client
    client.close()


def _inputs(text: str, max_tokens: int, stream: bool | None = None):
    """tritonclient's gRPC inputs (it always sends raw_input_contents)."""
    import tritonclient.grpc as tc

    t = tc.InferInput("text_input", [1], "BYTES")
    t.set_data_from_numpy(np.array([text.encode()], dtype=object))
    m = tc.InferInput("max_tokens", [1, 1], "INT32")
    m.set_data_from_numpy(np.array([[max_tokens]], dtype=np.int32))
    out = [t, m]
    if stream is not None:
        s = tc.InferInput("stream", [1], "BOOL")
        s.set_data_from_numpy(np.array([stream]))
        out.append(s)
    return out


def test_kserve_metadata_and_readiness(triton):
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(MODEL)
    assert not triton.is_model_ready("other")
    meta = triton.get_model_metadata(MODEL)
    assert {i.name for i in meta.inputs} >= {"text_input", "max_tokens"}
    config = triton.get_model_config(MODEL).config
    assert config.model_transaction_policy.decoupled
    assert triton.get_server_metadata().name == "spruce"


def test_kserve_infer(triton, stub):
    result = triton.infer(MODEL, _inputs("hello", 6))
    text = result.as_numpy("text_output")[0].decode()
    want = stub.Generate(pb.GenerateRequest(text="hello", sampling=pb.SamplingOptions(max_tokens=6)))
    assert text == "hello" + want.text  # exclude_input_in_output defaults to False, as in Triton's vLLM model
    assert result.as_numpy("completion_tokens")[0] == want.completion_tokens
    assert result.as_numpy("finish_reason")[0].decode() in ("stop", "length")


def test_kserve_infer_with_typed_contents(server, triton):
    """Clients that send typed contents (bytes_contents, int_contents) instead of raw bytes."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name=MODEL)
    text = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"hello")
    tokens = request.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
    tokens.contents.int_contents.append(6)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    channel.close()
    raw = triton.infer(MODEL, _inputs("hello", 6))
    assert reply.raw_output_contents[0] == raw.get_response().raw_output_contents[0]
    assert not any(o.HasField("contents") for o in reply.outputs)  # raw only, never mixed


def test_kserve_stream_infer(triton):
    import queue

    results: queue.Queue = queue.Queue()
    triton.start_stream(callback=lambda result, error: results.put((result, error)))
    triton.async_stream_infer(MODEL, _inputs("hello", 8, stream=True), request_id="s1")
    parts, final = [], False
    while not final:
        result, error = results.get(timeout=30)
        assert error is None
        parts.append(result.as_numpy("text_output")[0].decode())
        final = result.get_response().parameters["triton_final_response"].bool_param
    # an unknown model fails in-band without closing the stream
    triton.async_stream_infer("nope", _inputs("hello", 2, stream=True))
    _, error = results.get(timeout=30)
    assert error is not None and "nope" in str(error)
    triton.stop_stream()
    whole = triton.infer(MODEL, [*_inputs("hello", 8), _exclude()]).as_numpy("text_output")[0].decode()
    assert "".join(parts) == whole


def _exclude():
    import tritonclient.grpc as tc

    e = tc.InferInput("exclude_input_in_output", [1], "BOOL")
    e.set_data_from_numpy(np.array([True]))
    return e


def test_kserve_errors(triton):
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="unknown model"):
        triton.infer("nope", _inputs("hello", 2))
    bad = tc.InferInput("max_tokens", [1], "FP32")
    bad.set_data_from_numpy(np.array([2.0], dtype=np.float32))
    text = _inputs("hello", 2)[0]
    with pytest.raises(InferenceServerException):
        triton.infer(MODEL, [text, bad, tc.InferInput("mystery", [1], "INT32").set_data_from_numpy(np.array([1], dtype=np.int32))])
    with pytest.raises(InferenceServerException, match="text_input"):
        triton.infer(MODEL, _inputs("hello", 2)[1:])


def _slow_engine(tiny_target, tiny_draft, tokenizer, seconds: float = 0.03) -> Engine:
    import copy

    target = copy.deepcopy(tiny_target)
    target.register_forward_pre_hook(lambda module, args: time.sleep(seconds))
    return Engine(target, tokenizer, tiny_draft)


@pytest.mark.parametrize("grace_s, finish", [(10.0, pb.FINISH_REASON_LENGTH), (0.2, pb.FINISH_REASON_ABORT)])
def test_drain_finishes_or_aborts_in_flight_work(tiny_target, tiny_draft, tokenizer, grace_s, finish):
    engine = _slow_engine(tiny_target, tiny_draft, tokenizer)
    srv = start(lambda: engine, ServeConfig(host="127.0.0.1", port=0, http_port=0, served_model_name=MODEL))
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    stub = pb_grpc.SpruceServiceStub(channel)
    stream = stub.GenerateStream(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), sampling=pb.SamplingOptions(max_tokens=30, ignore_eos=True), speculation=_OFF))
    next(stream)
    stopper = threading.Thread(target=srv.stop, args=(grace_s,))
    stopper.start()
    end = time.monotonic() + 5
    while srv.worker.accepting and time.monotonic() < end:
        time.sleep(0.01)
    with pytest.raises(grpc.RpcError) as err:  # no new work while draining
        stub.Generate(_req())
    assert err.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
    last = list(stream)[-1]
    assert last.finished and last.finish_reason == finish
    stopper.join(30)
    channel.close()


def test_bearer_token(tiny_target, tokenizer):
    srv = start(lambda: Engine(tiny_target, tokenizer), ServeConfig(host="127.0.0.1", port=0, http_port=0, auth_token="s3cret"))
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    stub = pb_grpc.SpruceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModelInfo(pb.GetModelInfoRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError):
        stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=[("authorization", "Bearer wrong")])
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=[("authorization", "Bearer s3cret")]).served_model_name
    health = health_pb2_grpc.HealthStub(channel)  # probes need no token
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    channel.close()
    srv.stop(grace_s=0.5)


def test_kserve_rejects_invalid_utf8_and_bad_shapes(triton):
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    bad_text = tc.InferInput("text_input", [1], "BYTES")
    bad_text.set_data_from_numpy(np.array([b"\xff\xfe"], dtype=object))
    with pytest.raises(InferenceServerException, match="UTF-8"):
        triton.infer(MODEL, [bad_text, _inputs("x", 2)[1]])
    two = tc.InferInput("max_tokens", [2], "INT32")
    two.set_data_from_numpy(np.array([2, 3], dtype=np.int32))
    with pytest.raises(InferenceServerException, match="shape"):
        triton.infer(MODEL, [_inputs("x", 2)[0], two])


def test_a_request_that_breaks_the_model_fails_alone(tiny_target, tokenizer):
    import copy

    target = copy.deepcopy(tiny_target)

    def explode(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is not None and bool((ids == 13).any()):
            raise RuntimeError("boom")

    target.register_forward_pre_hook(explode, with_kwargs=True)
    srv = start(lambda: Engine(target, tokenizer), ServeConfig(host="127.0.0.1", port=0, http_port=0))
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    stub = pb_grpc.SpruceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[13, 13]), sampling=pb.SamplingOptions(max_tokens=3)))
    assert err.value.code() == grpc.StatusCode.INTERNAL and "boom" in err.value.details()
    ok = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6]), sampling=pb.SamplingOptions(max_tokens=3, ignore_eos=True)))
    assert len(ok.token_ids) == 3 or ok.finish_reason == pb.FINISH_REASON_STOP
    assert stub.GetStats(pb.GetStatsRequest()).requests_failed == 1
    channel.close()
    srv.stop(grace_s=0.5)


def test_undecodable_and_oversized_requests(server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", 64 << 20)])
    raw = channel.unary_unary("/spruce.v1.SpruceService/Generate", request_serializer=None, response_deserializer=None)
    # field 2 (text), wire type 2, 2 bytes that are not UTF-8
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\x12\x02\xff\xfe")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "parse" in err.value.details()
    stub = pb_grpc.SpruceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(_req(text="x" * (17 << 20)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.Generate(_req()).completion_tokens == 6  # and the server carries on
    channel.close()


def test_tls(tmp_path, tiny_target, tokenizer):
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True,
    )
    srv = start(lambda: Engine(tiny_target, tokenizer), ServeConfig(host="127.0.0.1", port=0, http_port=0, tls_cert=str(cert), tls_key=str(key)))
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    channel = grpc.secure_channel(f"127.0.0.1:{srv.port}", creds, options=[("grpc.ssl_target_name_override", "localhost")])
    assert pb_grpc.SpruceServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10).served_model_name == "spruce"
    channel.close()
    srv.stop(grace_s=0.5)


SERVE_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import build_tiny_model, _tokenizer
from spruce.config import SamplingParams, ServeConfig
from spruce.engine import Engine
from spruce.server.app import serve_forever
target = build_tiny_model(0)
target.register_forward_pre_hook(lambda m, a: time.sleep(0.03))
sys.exit(serve_forever(lambda: Engine(target, _tokenizer()), ServeConfig(host="127.0.0.1", port={port}, http_port=0, grace_s=20)))
"""


def test_sigterm_drains_in_flight_requests(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    script = tmp_path / "serve.py"
    script.write_text(SERVE_SCRIPT.format(tests=os.path.dirname(__file__), port=port))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_serving(port, proc)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stream = pb_grpc.SpruceServiceStub(channel).GenerateStream(
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), sampling=pb.SamplingOptions(max_tokens=30, ignore_eos=True))
        )
        next(stream)
        proc.send_signal(signal.SIGTERM)
        last = list(stream)[-1]
        assert last.finished and last.finish_reason == pb.FINISH_REASON_LENGTH  # finished within the grace
        assert proc.wait(timeout=60) == 0
        channel.close()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_concurrent_streams_run_batched_and_match_alone(tiny_target, tiny_draft, tokenizer):
    """Requests in flight together share target passes (the server's engine batches them; 3 slots for
    5 requests: two wait, then join as others finish) and each gets exactly what it gets alone."""
    prompts = [[5, 6, 7], [40, 41, 42, 43, 44, 45], [9], [100, 101], [7, 7, 7, 7]]
    alone = [
        Engine(tiny_target, tokenizer, tiny_draft).generate([p], SamplingParams(max_tokens=4 + 3 * i, ignore_eos=True))[0]
        for i, p in enumerate(prompts)
    ]
    engine = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=3))
    srv = start(lambda: engine, ServeConfig(host="127.0.0.1", port=0, http_port=0, max_queue=8))
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    stub = pb_grpc.SpruceServiceStub(channel)
    reqs = [
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=p), sampling=pb.SamplingOptions(max_tokens=4 + 3 * i, ignore_eos=True))
        for i, p in enumerate(prompts)
    ]
    streams = [stub.GenerateStream(r) for r in reqs]
    results = [list(s) for s in streams]
    for got, want in zip(results, alone):
        assert [t for m in got for t in m.token_ids] == want.token_ids
        assert got[-1].finished
    usage = engine.kv_usage()
    assert usage["slots_free"] == usage["slots_total"] == 3 and usage["positions_used"] == 0
    channel.close()
    srv.stop(grace_s=0.5)
