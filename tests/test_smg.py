"""The SMG worker protocol (``vllm.grpc.engine.VllmEngine``): first driven directly over gRPC against an
in-process server on tiny models (outputs equal the engine's, streamed chunks add up to the whole,
refused fields name themselves, Abort by request id frees the KV slot, management RPCs), then behind
the real gateway (``smg launch``) with the ``openai`` client in front of it."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import grpc
import pytest
from conftest import free_port, wait_serving
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc
from spruce.server._gen.spruce.v1 import spruce_pb2, spruce_pb2_grpc
from spruce.server.app import start

from spruce import Engine, SamplingParams, SpeculationConfig
from spruce.config import EngineConfig, ServeConfig


class FixedTreeEngine(Engine):
    """The default speculation a fixed tree (the adaptive default plans plain decoding on tiny models),
    so that every request drafts and the speculation counts are not trivially 0."""

    @property
    def default_speculation(self) -> SpeculationConfig:
        return SpeculationConfig(depth=3, top_k=2, budget=5)


@pytest.fixture(scope="module")
def served(tiny_target, tiny_draft, tokenizer):
    engine = FixedTreeEngine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=2))
    srv = start(lambda: engine, ServeConfig(host="127.0.0.1", port=0, max_tokens_limit=64))
    assert srv.load_error is None
    channel = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
    yield srv, vpb_grpc.VllmEngineStub(channel), engine
    channel.close()
    srv.stop(grace_s=0.5)


def _request(request_id: str, prompt: list[int], stream: bool = False, **sampling) -> vpb.GenerateRequest:
    params = vpb.SamplingParams(**{"temperature": 0.0, "max_tokens": 8, **sampling})
    return vpb.GenerateRequest(request_id=request_id, tokenized=vpb.TokenizedInput(input_ids=prompt), sampling_params=params, stream=stream)


def _wait_idle(srv, timeout_s: float = 30.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        usage = srv.worker.engine.kv_usage()
        if srv.worker.running == 0 and usage["positions_used"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the engine kept running requests or KV: {srv.worker.engine.kv_usage()}")


def test_generate_equals_the_engine_and_reports_speculation(served):
    srv, stub, engine = served
    prompt = engine.encode("hello there")
    want = engine.generate(prompt, SamplingParams(max_tokens=8))[0]
    [resp] = list(stub.Generate(_request("g1", prompt)))
    done = resp.complete
    assert list(done.output_ids) == want.token_ids
    assert done.finish_reason == want.finish_reason
    assert done.prompt_tokens == len(prompt) and done.completion_tokens == len(want.token_ids)
    assert done.spec_draft_tokens == want.stats.drafted > 0
    assert done.spec_accepted_tokens == want.stats.accepted


def test_streamed_chunks_add_up_to_the_whole(served):
    srv, stub, engine = served
    prompt = engine.encode("abcabcabc")
    [whole] = list(stub.Generate(_request("s0", prompt, max_tokens=12)))
    parts = list(stub.Generate(_request("s1", prompt, stream=True, max_tokens=12)))
    chunks = [p.chunk for p in parts if p.WhichOneof("response") == "chunk"]
    assert [p.WhichOneof("response") for p in parts][-1] == "complete" and len(chunks) >= 1
    assert [t for c in chunks for t in c.token_ids] == list(whole.complete.output_ids)
    # as vLLM's servicer: the final message repeats the last step's tokens, with the finish reason
    assert list(parts[-1].complete.output_ids) == list(chunks[-1].token_ids)
    assert parts[-1].complete.finish_reason == whole.complete.finish_reason


def test_text_prompt_and_stop_token(served):
    srv, stub, engine = served
    want = engine.generate("xyz", SamplingParams(max_tokens=8))[0]
    stop_at = want.token_ids[2]
    request = vpb.GenerateRequest(
        request_id="t1", text="xyz", sampling_params=vpb.SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[stop_at])
    )
    [resp] = list(stub.Generate(request))
    cut = want.token_ids.index(stop_at) + 1
    assert list(resp.complete.output_ids) == want.token_ids[:cut]
    assert resp.complete.finish_reason == "stop" and resp.complete.matched_token_id == stop_at


@pytest.mark.parametrize(
    ("field", "req"),
    [
        ("presence_penalty", _request("r1", [5, 6], presence_penalty=0.5)),
        ("logprobs", _request("r2", [5, 6], logprobs=2)),
        ("n", _request("r3", [5, 6], n=2)),
        ("json_schema", _request("r4", [5, 6], json_schema="{}")),
        ("multimodal", vpb.GenerateRequest(request_id="r5", tokenized=vpb.TokenizedInput(input_ids=[5]), mm_inputs=vpb.MultimodalInputs(im_token_id=3))),
        ("empty prompt", _request("r6", [])),
        ("max_tokens", _request("r7", [5, 6], max_tokens=10_000)),
    ],
)
def test_refused_requests_name_what_is_wrong(served, field, req):
    srv, stub, _ = served
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(req))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field.split()[0] in err.value.details()
    _wait_idle(srv)


def test_abort_by_request_id_ends_the_stream_and_frees_kv(served):
    srv, stub, engine = served
    aborted = srv.worker.totals.aborted
    stream = stub.Generate(_request("a1", engine.encode("abort me"), stream=True, max_tokens=64, ignore_eos=True))
    first = next(stream)
    assert first.WhichOneof("response") == "chunk"
    stub.Abort(vpb.AbortRequest(request_ids=["a1", "no-such-request"]))
    rest = list(stream)
    assert rest[-1].complete.finish_reason == "abort"
    assert sum(len(r.chunk.token_ids) for r in [first, *rest] if r.WhichOneof("response") == "chunk") < 64
    _wait_idle(srv)
    assert srv.worker.totals.aborted == aborted + 1


def test_management_rpcs(served, tmp_path):
    srv, stub, engine = served
    assert stub.HealthCheck(vpb.HealthCheckRequest()).healthy
    info = stub.GetModelInfo(vpb.GetModelInfoRequest())
    assert info.served_model_name == "spruce" and info.is_generation
    assert info.vocab_size == engine.target.config.vocab_size and info.max_context_length == engine.max_context
    assert set(info.eos_token_ids) == set(engine.eos_ids)
    # the tokenizer directory a gateway on this host reads
    assert (Path(info.tokenizer_path) / "tokenizer.json").is_file()
    server = stub.GetServerInfo(vpb.GetServerInfoRequest())
    assert server.server_type == "vllm-grpc" and server.max_num_seqs == 2 and not server.is_paused
    loads = stub.GetLoads(vpb.GetLoadsRequest())
    assert loads.dp_rank_count == 1 and loads.loads[0].max_running_requests == 2
    assert loads.loads[0].max_total_num_tokens == 2 * engine.kv_usage()["positions_per_slot"]
    # the tokenizer bundle: chunks whose sha256 (on the last) matches, and a tokenizer that loads
    chunks = list(stub.GetTokenizer(common_pb2.GetTokenizerRequest()))
    data = b"".join(c.data for c in chunks)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    zipfile.ZipFile(io.BytesIO(data)).extractall(tmp_path)
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded.encode("hello there", add_special_tokens=False) == engine.encode("hello there")
    assert loaded.chat_template == engine.tokenizer.chat_template
    # the load stream: load-only records with the engine's limits
    events = stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(load_records_before_first_batch=True))
    first = next(events)
    assert first.load.load_only and first.load.max_running_requests == 2 and not first.events
    events.cancel()
    with pytest.raises(grpc.RpcError) as err:
        stub.Embed(vpb.EmbedRequest(request_id="e", tokenized=vpb.TokenizedInput(input_ids=[1])))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "Embed" in err.value.details()


# ---- behind the real gateway ----------------------------------------------------------------------------


def _launch_smg(worker_ports: list[int], log_path) -> tuple[subprocess.Popen, int, str]:
    """``smg launch`` in front of spruce workers; returns once it lists the model. No ``--model-path``:
    the gateway takes the tokenizer from the workers (``GetModelInfo`` / ``GetTokenizer``)."""
    if shutil.which("smg") is None:
        pytest.skip("the smg gateway is not installed (pip install smg; in the dev extra)")
    port = free_port()
    urls = [f"grpc://127.0.0.1:{p}" for p in worker_ports]
    log = open(log_path, "w")
    proc = subprocess.Popen(
        ["smg", "launch", "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls, "--policy", "round_robin",
         "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())],
        stdout=log, stderr=subprocess.STDOUT,
    )
    log.close()
    end = time.monotonic() + 90
    while True:
        try:
            models = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2))
            if models.get("data"):
                return proc, port, models["data"][0]["id"]
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"smg did not come up: {open(log_path).read()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def gateway(served, tmp_path_factory):
    """The gateway in front of the in-process spruce server."""
    openai = pytest.importorskip("openai")
    srv, _, engine = served
    proc, port, model = _launch_smg([srv.port], tmp_path_factory.mktemp("smg") / "smg.log")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        yield client, model, srv, engine
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_gateway_completion_stream_and_chat(gateway):
    client, model, srv, engine = gateway
    want = engine.generate("hello there", SamplingParams(max_tokens=8))[0]
    got = client.completions.create(model=model, prompt="hello there", max_tokens=8, temperature=0)
    assert got.choices[0].text == want.text
    assert got.usage.completion_tokens == len(want.token_ids) and got.usage.prompt_tokens == len(want.prompt_token_ids)
    parts = list(client.completions.create(model=model, prompt="hello there", max_tokens=8, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts if p.choices) == want.text
    messages = [{"role": "user", "content": "hi"}]
    want_chat = engine.generate(engine.chat_prompt(messages), SamplingParams(max_tokens=6))[0]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
    # random tiny models emit arbitrary bytes: the gateway's detokenizer drops an unfinished UTF-8
    # character at the very end where transformers' decode shows U+FFFD
    assert chat.choices[0].message.content.rstrip("\ufffd") == want_chat.text.rstrip("\ufffd")
    assert chat.usage.completion_tokens == len(want_chat.token_ids)


def test_gateway_refusal_is_a_client_error(gateway):
    import openai

    client, model, srv, _ = gateway
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="x", max_tokens=4, presence_penalty=0.5)
    assert "presence_penalty" in str(err.value)
    _wait_idle(srv)


def test_gateway_client_disconnect_aborts_and_frees_kv(gateway):
    client, model, srv, _ = gateway
    aborted = srv.worker.totals.aborted
    stream = client.completions.create(model=model, prompt="go on", max_tokens=60, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()  # the client goes away mid-generation
    _wait_idle(srv)
    assert srv.worker.totals.aborted == aborted + 1


# ---- scale out: replicas behind one gateway, one killed mid-run ---------------------------------------


def _serve_replica(target_dir, draft_dir, port: int, log_path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "spruce", "serve", "--target", str(target_dir), "--draft", str(draft_dir),
           "--host", "127.0.0.1", "--port", str(port), "--http-port", "0", "--max-batch-size", "4"]
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def _finished(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return spruce_pb2_grpc.SpruceServiceStub(channel).GetStats(spruce_pb2.GetStatsRequest(), timeout=10).requests_finished


@pytest.mark.slow
def test_replicas_share_load_and_a_killed_one_loses_no_request(tiny_dirs, tmp_path):
    """Two ``spruce serve`` processes behind one gateway: round-robin spreads the load; one is killed
    (SIGKILL) while requests run on both, and every request still returns all its tokens or an error
    (the gateway retries the killed replica's requests on the other), then the survivor takes all."""
    openai = pytest.importorskip("openai")
    if shutil.which("smg") is None:
        pytest.skip("the smg gateway is not installed")
    ports = [free_port(), free_port()]
    replicas = [_serve_replica(*tiny_dirs, p, tmp_path / f"replica{i}.log") for i, p in enumerate(ports)]
    gateway = None
    try:
        for port, proc in zip(ports, replicas):
            wait_serving(port, proc)
        gateway, http_port, model = _launch_smg(ports, tmp_path / "smg.log")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0, timeout=120)
        for i in range(6):
            client.completions.create(model=model, prompt=f"warm {i}", max_tokens=4, temperature=0)
        assert [_finished(p) for p in ports] == [3, 3]

        results: list[tuple] = [()] * 8

        def run(i: int) -> None:
            try:
                r = client.completions.create(model=model, prompt=f"run {i}", max_tokens=200, temperature=0, extra_body={"ignore_eos": True})
                results[i] = ("ok", r.usage.completion_tokens, r.choices[0].finish_reason)
            except openai.APIError as exc:  # an error is acceptable; a silently short answer is not
                results[i] = ("error", str(exc))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        replicas[1].send_signal(signal.SIGKILL)
        for t in threads:
            t.join(timeout=300)
        ok = [r for r in results if r[0] == "ok"]
        assert all(r[1:] == (200, "length") for r in ok), results
        assert len(ok) + sum(r[0] == "error" for r in results) == 8
        # the survivor served its share of the run at least, and every request after the kill
        before = _finished(ports[0])
        assert before >= 3 + 4
        for i in range(4):
            client.completions.create(model=model, prompt=f"after {i}", max_tokens=4, temperature=0)
        assert _finished(ports[0]) == before + 4
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(timeout=30)
        for proc in replicas:
            proc.kill()
            proc.wait(timeout=30)


def test_gateway_stop_string(gateway):
    """A stop string ends the completion before it (the gateway trims the text; spruce stops generating)."""
    client, model, srv, engine = gateway
    want = engine.generate("stop here", SamplingParams(max_tokens=16))[0].text
    printable = [c for c in want[2:] if c.isprintable() and c != "\ufffd" and not c.isspace()]
    if not printable:
        pytest.skip("the tiny model's text has no usable stop character")
    stop = printable[0]
    got = client.completions.create(model=model, prompt="stop here", max_tokens=16, temperature=0, stop=[stop])
    assert got.choices[0].text == want[: want.index(stop)]
    assert got.choices[0].finish_reason == "stop"
