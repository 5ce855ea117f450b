"""The OpenAI-compatible HTTP API, driven by the real ``openai`` client against an in-process server on
tiny models: completions and chat, streamed and not, usage with speculation telemetry, OpenAI-shaped
errors, health and metrics on the same port, and a client that leaves mid-stream frees its KV."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest
from conftest import free_port
from spruce.server.app import start

from spruce import Engine, SamplingParams
from spruce.config import EngineConfig, ServeConfig

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def http(tiny_target, tiny_draft, tokenizer):
    engine = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=2))
    port = free_port()
    srv = start(lambda: engine, ServeConfig(host="127.0.0.1", port=0, http_port=port, max_tokens_limit=32))
    assert srv.load_error is None
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
    yield srv, client, engine, port
    srv.stop(grace_s=0.5)


def test_completion_matches_the_engine_and_reports_speculation(http):
    srv, client, engine, _ = http
    got = client.completions.create(model="spruce", prompt="hello there", max_tokens=8, temperature=0)
    want = engine.generate("hello there", SamplingParams(max_tokens=8))[0]
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    details = got.usage.completion_tokens_details
    assert details.accepted_prediction_tokens >= 0 and details.rejected_prediction_tokens >= 0
    assert got.model_extra["spruce"]["steps"] >= 1


def test_streamed_completion_and_chat(http):
    srv, client, engine, _ = http
    whole = client.completions.create(model="spruce", prompt="abcabc", max_tokens=10, temperature=0, extra_body={"speculation": "off"})
    parts = list(client.completions.create(model="spruce", prompt="abcabc", max_tokens=10, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
    assert parts[-1].usage.completion_tokens == whole.usage.completion_tokens
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="spruce", messages=messages, max_tokens=6, temperature=0)
    want = engine.generate(engine.chat_prompt(messages), SamplingParams(max_tokens=6))[0]
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content == want.text
    chunks = list(client.chat.completions.create(model="spruce", messages=messages, max_tokens=6, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_errors_have_openai_shape_and_status(http):
    srv, client, engine, port = http
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model="spruce", prompt="x", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="spruce", prompt="x", max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="spruce", prompt="x", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="spruce", messages=[], max_tokens=2)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 400 and json.loads(err.value.read())["error"]["type"] == "invalid_request_error"
    assert client.completions.create(model="spruce", prompt="still fine", max_tokens=2).choices[0].text is not None


def test_models_health_metrics(http):
    srv, client, engine, port = http
    assert [m.id for m in client.models.list().data] == ["spruce"]
    assert json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health").read())["status"] == "ok"
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    assert "vllm:num_requests_running" in body and "vllm:spec_decode_num_draft_tokens" in body


def test_client_leaving_a_stream_frees_its_kv(tiny_target, tiny_draft, tokenizer):
    import copy

    target = copy.deepcopy(tiny_target)
    target.register_forward_pre_hook(lambda module, args: time.sleep(0.03))
    engine = Engine(target, tokenizer, tiny_draft, EngineConfig(max_batch_size=1))
    port = free_port()
    srv = start(lambda: engine, ServeConfig(host="127.0.0.1", port=0, http_port=port, max_tokens_limit=64))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    stream = client.completions.create(model="spruce", prompt="go", max_tokens=60, temperature=0, stream=True, extra_body={"speculation": "off", "ignore_eos": True})
    next(iter(stream))
    stream.response.close()  # the client goes away mid-stream
    end = time.monotonic() + 10
    while (engine.num_running or engine.kv_usage()["slots_free"] != 1) and time.monotonic() < end:
        time.sleep(0.05)
    assert engine.num_running == 0 and engine.kv_usage()["slots_free"] == 1
    srv.stop(grace_s=0.5)


def test_bearer_token_guards_the_api_not_health(tiny_target, tokenizer):
    port = free_port()
    srv = start(lambda: Engine(tiny_target, tokenizer), ServeConfig(host="127.0.0.1", port=0, http_port=port, auth_token="s3cret"))
    wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="spruce", prompt="x", max_tokens=2)
    right = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="s3cret", max_retries=0)
    assert right.completions.create(model="spruce", prompt="x", max_tokens=2).usage.completion_tokens >= 1
    assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health").status == 200
    srv.stop(grace_s=0.5)
