"""``spruce bench``: latency and throughput of speculation against plain decoding, in the Spec-Bench layout.

A *target* is what requests go to: the engine in this process (``InProcess``: the server's worker over
the batched engine, no network), a running spruce server over gRPC (``GrpcSpruce``, spruce.v1, which can
ask for speculation per request), or any KServe v2 / Triton server (``GrpcKServe``: ModelStreamInfer with
``text_input`` / ``max_tokens`` / ``stream``; the server decides about speculation).

Load, per phase: a closed loop of ``concurrency`` clients (each sends its next request when the last
ends) or an open loop of Poisson arrivals at ``rate`` requests/s. Every configuration runs the same
prompts (shuffled once with ``seed``) in every phase; within a phase the configurations alternate
(A B, then B A on the next round), so that machine drift hits them alike. Each request records TTFT,
every inter-token gap, end-to-end latency, its tokens and the server's speculation stats; the raw
records are the report (``spruce.evals.report`` summarizes and plots them).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from spruce.config import SamplingParams, SpeculationConfig
from spruce.evals.bench_spec import BASELINE, HFBaseline, hf_generate, parse_config
from spruce.evals.prompts import Prompt


@dataclass
class Chunk:
    """What one streamed response message brings."""

    token_ids: list[int]
    # the request's speculation stats (``SpecStats.to_dict`` shape), on the last message only
    stats: dict | None = None
    # False: the whole output at once (a non-streaming baseline): it has no inter-token gaps
    streamed: bool = True
    # False: ``token_ids`` are placeholders that only count tokens (text protocols)
    exact: bool = True


@dataclass
class RequestRecord:
    question_id: Any
    category: str
    config: str
    # "c=4" (closed loop) or "rate=2.0" (open loop)
    phase: str
    round: int
    # seconds since the phase started
    sent_s: float
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    stats: dict | None = None
    error: str | None = None
    # whether token_ids are the real ids (the lossless check compares only those)
    exact_ids: bool = True

    @property
    def output_tokens(self) -> int:
        return len(self.token_ids)


class Target(Protocol):
    name: str

    def configs(self, names: list[str]) -> dict[str, Any]:
        """Resolve configuration names to what ``stream`` takes (raise for one this target cannot run)."""
        ...

    def stream(self, prompt: Prompt, params: SamplingParams, config: Any) -> Iterator[Chunk]: ...

    def telemetry(self) -> dict: ...

    def close(self) -> None: ...


class InProcess:
    """The batched engine in this process, behind the server's worker (the same queueing and batching as
    ``spruce serve``, without the network)."""

    name = "in-process"

    def __init__(self, engine, max_queue: int = 1024) -> None:
        from spruce.server.metrics import Metrics
        from spruce.server.worker import EngineWorker

        self.engine = engine
        self.worker = EngineWorker(engine, Metrics("bench"), max_queue=max_queue, max_tokens_limit=1 << 20)

    def configs(self, names: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in names:
            config = None if name == BASELINE else parse_config(name, self.engine.default_speculation)
            if isinstance(config, SpeculationConfig):
                self.engine.resolve_speculation(config)
            out[name] = config
        return out

    def stream(self, prompt: Prompt, params: SamplingParams, config: Any) -> Iterator[Chunk]:
        text = self.engine.apply_chat_template(prompt.turns[0])
        if isinstance(config, HFBaseline):
            tokens, _ = hf_generate(self.engine, text, params, config)
            yield Chunk(tokens, {}, streamed=False)
            return
        job = self.worker.submit(text, params, config, text_deltas=False)
        for event in self.worker.events(job):
            yield Chunk(event.token_ids, event.output.stats.to_dict() if event.output is not None else None)

    def telemetry(self) -> dict:
        return self.engine.speculation_telemetry()

    def close(self) -> None:
        self.worker.drain(0.0)


class GrpcSpruce:
    """A spruce server's own API. Configurations: ``plain`` (speculation off), ``default`` (the server's),
    ``on:BUDGET`` (speculate within a tree budget), ``ngram`` and ``both`` (drafter choice)."""

    name = "grpc"

    def __init__(self, address: str) -> None:
        import grpc

        from spruce.server._gen.spruce.v1 import spruce_pb2 as pb
        from spruce.server._gen.spruce.v1 import spruce_pb2_grpc as pb_grpc

        self.pb = pb
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.SpruceServiceStub(self.channel)
        self.address = address

    def configs(self, names: list[str]) -> dict[str, Any]:
        pb = self.pb
        out: dict[str, Any] = {}
        for name in names:
            kind, _, arg = name.partition(":")
            if name == BASELINE:
                out[name] = pb.SpeculationOptions(mode=pb.SPECULATION_MODE_OFF)
            elif name == "default":
                out[name] = pb.SpeculationOptions()
            elif kind == "on":
                out[name] = pb.SpeculationOptions(mode=pb.SPECULATION_MODE_ON, max_tree_budget=int(arg or 0))
            elif name in ("ngram", "both"):
                drafter = pb.DRAFTER_NGRAM if name == "ngram" else pb.DRAFTER_BOTH
                out[name] = pb.SpeculationOptions(mode=pb.SPECULATION_MODE_ON, drafter=drafter)
            else:
                raise ValueError(f"configuration {name!r} cannot be asked for over gRPC: use plain, default, on:B, ngram or both")
        return out

    def stream(self, prompt: Prompt, params: SamplingParams, config: Any) -> Iterator[Chunk]:
        from spruce.evals.report import stats_from_proto

        pb = self.pb
        sampling = pb.SamplingOptions(
            max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            ignore_eos=params.ignore_eos,
        )
        if params.seed is not None:
            sampling.seed = params.seed
        req = pb.GenerateRequest(text=prompt.turns[0], apply_chat_template=True, sampling=sampling, speculation=config)
        for msg in self.stub.GenerateStream(req):
            yield Chunk(list(msg.token_ids), stats_from_proto(msg.stats) if msg.finished else None)

    def telemetry(self) -> dict:
        import json

        stats = self.stub.GetStats(self.pb.GetStatsRequest())
        return json.loads(stats.speculation_telemetry_json or "{}")

    def close(self) -> None:
        self.channel.close()


class GrpcKServe:
    """Any KServe v2 server with a decoupled text model (Triton's vLLM / TensorRT-LLM backends, spruce):
    one configuration, ``default``, whatever the server does. Streamed responses carry text, so tokens
    are counted by response message (one per token on those servers; one per target pass on spruce)."""

    name = "kserve"

    def __init__(self, address: str, model: str) -> None:
        self.address, self.model = address, model

    def configs(self, names: list[str]) -> dict[str, Any]:
        bad = [n for n in names if n != "default"]
        if bad:
            raise ValueError(f"KServe v2 cannot ask for speculation settings ({bad}): use --configs default")
        return {"default": None}

    def stream(self, prompt: Prompt, params: SamplingParams, config: Any) -> Iterator[Chunk]:
        import json
        import queue

        import numpy as np
        from tritonclient.grpc import InferenceServerClient, InferInput

        def tensor(name: str, dtype: str, value: Any) -> InferInput:
            inp = InferInput(name, [1], dtype)
            inp.set_data_from_numpy(np.array([value], dtype=object if dtype == "BYTES" else None))
            return inp

        inputs = [
            tensor("text_input", "BYTES", prompt.turns[0].encode()),
            tensor("max_tokens", "INT32", np.int32(params.max_tokens)),
            tensor("stream", "BOOL", True),
            tensor("sampling_parameters", "BYTES", json.dumps({"temperature": params.temperature}).encode()),
        ]
        results: queue.Queue = queue.Queue()
        client = InferenceServerClient(self.address)
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            client.async_stream_infer(self.model, inputs, enable_empty_final_response=True)
            while True:
                result, error = results.get()
                if error is not None:
                    raise RuntimeError(str(error))
                response = result.get_response()
                final = response.parameters.get("triton_final_response")
                is_final = bool(final is not None and final.bool_param)
                yield Chunk([0] if response.raw_output_contents else [], {} if is_final else None, exact=False)
                if is_final:
                    return
        finally:
            client.stop_stream()
            client.close()

    def telemetry(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class OpenAIHTTP:
    """Any OpenAI-compatible server (spruce's HTTP port, vLLM, SGLang, TGI, llama.cpp's server): streamed
    ``/v1/chat/completions``. Configurations: ``default`` (whatever the server does) and, for spruce,
    ``plain`` (``speculation: "off"``). Tokens are counted by streamed content chunk (one per token on
    most servers; one per target pass on spruce), and the final usage gives the exact count."""

    name = "openai"

    def __init__(self, base_url: str, model: str) -> None:
        self.base_url, self.model = base_url.rstrip("/"), model

    def configs(self, names: list[str]) -> dict[str, Any]:
        bad = [n for n in names if n not in ("default", BASELINE)]
        if bad:
            raise ValueError(f"over OpenAI HTTP only plain and default can be asked for, not {bad}")
        return {n: ({"speculation": "off"} if n == BASELINE else {}) for n in names}

    def stream(self, prompt: Prompt, params: SamplingParams, config: Any) -> Iterator[Chunk]:
        import json
        import urllib.request

        body = {
            "model": self.model, "messages": [{"role": "user", "content": prompt.turns[0]}],
            "max_tokens": params.max_tokens, "temperature": params.temperature, "stream": True,
            "stream_options": {"include_usage": True}, **config,
        }
        req = urllib.request.Request(
            f"{self.base_url}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        counted = 0
        with urllib.request.urlopen(req) as resp:
            for line in resp:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"].get("message", "error"))
                if event.get("usage"):  # the exact count: pad what the chunks did not show
                    total = int(event["usage"]["completion_tokens"])
                    stats = event.get("spruce")
                    yield Chunk([0] * max(0, total - counted), stats if stats is not None else {}, exact=False)
                    return
                delta = (event.get("choices") or [{}])[0].get("delta", {})
                if delta.get("content"):
                    counted += 1
                    yield Chunk([0], exact=False)

    def telemetry(self) -> dict:
        return {}

    def close(self) -> None:
        pass


# ---- load ----------------------------------------------------------------------------------------------


def _one(target: Target, prompt: Prompt, params: SamplingParams, config: Any, record: RequestRecord, t0: float) -> None:
    start = time.perf_counter()
    record.sent_s = start - t0
    last = start
    try:
        for chunk in target.stream(prompt, params, config):
            now = time.perf_counter()
            if chunk.token_ids:
                if not chunk.streamed:  # all tokens at the end: a TTFT of the whole request, no gaps
                    record.ttft_s = now - start
                elif record.ttft_s is None:
                    record.ttft_s = now - start
                    record.gaps_s.extend([0.0] * (len(chunk.token_ids) - 1))
                else:
                    # k tokens after a gap g: k gaps of g / k (a speculative step delivers several)
                    k = len(chunk.token_ids)
                    record.gaps_s.extend([(now - last) / k] * k)
                last = now
                record.token_ids.extend(chunk.token_ids)
            if chunk.stats is not None:
                record.stats = chunk.stats
            record.exact_ids &= chunk.exact
    except Exception as exc:  # noqa: BLE001 - a failed request is a measurement, not the end of the run
        record.error = f"{type(exc).__name__}: {exc}"
    record.e2e_s = time.perf_counter() - start


def closed_loop(
    target: Target, prompts: list[Prompt], params: SamplingParams, config: Any, name: str,
    concurrency: int, n_requests: int, round_: int, time_limit_s: float | None = None,
) -> list[RequestRecord]:
    """``concurrency`` clients, each sending its next request when its last one ends."""
    phase = f"c={concurrency}"
    records = [
        RequestRecord(prompts[i % len(prompts)].question_id, prompts[i % len(prompts)].category, name, phase, round_, 0.0)
        for i in range(n_requests)
    ]
    counter = iter(range(n_requests))
    lock = threading.Lock()
    t0 = time.perf_counter()

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None or (time_limit_s is not None and time.perf_counter() - t0 > time_limit_s):
                return
            _one(target, prompts[i % len(prompts)], params, config, records[i], t0)

    _run_threads([client] * concurrency)
    return [r for r in records if r.e2e_s > 0 or r.error]


def open_loop(
    target: Target, prompts: list[Prompt], params: SamplingParams, config: Any, name: str,
    rate: float, n_requests: int, round_: int, seed: int, time_limit_s: float | None = None,
) -> list[RequestRecord]:
    """Poisson arrivals at ``rate`` requests/s (exponential gaps from ``seed``), each its own client."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(n_requests):
        t += rng.expovariate(rate)
        if time_limit_s is not None and t > time_limit_s:
            break
        arrivals.append(t)
    phase = f"rate={rate:g}"
    records = [
        RequestRecord(prompts[i % len(prompts)].question_id, prompts[i % len(prompts)].category, name, phase, round_, 0.0)
        for i in range(len(arrivals))
    ]
    t0 = time.perf_counter()

    def arrival(i: int) -> Callable[[], None]:
        def run() -> None:
            time.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t0)))
            _one(target, prompts[i % len(prompts)], params, config, records[i], t0)

        return run

    _run_threads([arrival(i) for i in range(len(arrivals))])
    return records


def _run_threads(fns: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=fn, daemon=True) for fn in fns]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


@dataclass
class BenchPlan:
    configs: list[str]
    concurrency: list[int] = field(default_factory=lambda: [1])
    rates: list[float] = field(default_factory=list)
    num_prompts: int = 12
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    rounds: int = 1
    warmup: int = 1
    # requests per phase and configuration: max(num_prompts, this x concurrency)
    requests_per_client: int = 1
    time_limit_s: float | None = None


def run_bench(target: Target, prompts: list[Prompt], plan: BenchPlan, progress: bool = True) -> dict:
    """Every phase, every configuration, alternating; returns the raw report (records + telemetry)."""
    from tqdm.auto import tqdm

    names = list(dict.fromkeys(plan.configs))  # plain (the speedups' reference) first when given
    if BASELINE in names:
        names = [BASELINE, *[n for n in names if n != BASELINE]]
    resolved = target.configs(names)
    order = list(prompts)
    random.Random(plan.seed).shuffle(order)
    order = order[: plan.num_prompts]
    params = SamplingParams(max_tokens=plan.max_tokens, temperature=plan.temperature)
    for name in names:  # warm-up: compiled paths, caches, the adaptive start-up measurement
        for prompt in order[: plan.warmup]:
            _one(target, prompt, SamplingParams(max_tokens=min(8, plan.max_tokens)), resolved[name], RequestRecord(0, "", name, "warmup", 0, 0.0), time.perf_counter())
    phases: list[tuple[str, Any]] = [("closed", c) for c in plan.concurrency] + [("open", r) for r in plan.rates]
    records: list[RequestRecord] = []
    started = time.perf_counter()
    bar = tqdm(total=len(phases) * plan.rounds * len(names), desc="bench", disable=not progress)
    for p_index, (kind, value) in enumerate(phases):
        n = max(plan.num_prompts, plan.requests_per_client * (int(value) if kind == "closed" else 1))
        for round_ in range(plan.rounds):
            shift = (p_index + round_) % len(names)
            for name in names[shift:] + names[:shift]:
                if plan.time_limit_s is not None and time.perf_counter() - started > plan.time_limit_s:
                    break
                config = resolved[name]
                if isinstance(config, HFBaseline) and (kind != "closed" or value != 1):
                    bar.update(1)
                    continue  # HF generate serves one request at a time: concurrency 1 only
                if kind == "closed":
                    records += closed_loop(target, order, params, config, name, int(value), n, round_)
                else:
                    records += open_loop(target, order, params, config, name, float(value), n, round_, plan.seed + round_)
                bar.update(1)
    bar.close()
    return {
        "target": target.name,
        "configs": {name: _describe(resolved[name]) for name in names},
        "plan": asdict(plan),
        "records": [asdict(r) | {"output_tokens": r.output_tokens} for r in records],
        "telemetry": target.telemetry(),
    }


def _describe(config: Any) -> Any:
    if config is None:
        return None
    if isinstance(config, (SpeculationConfig, HFBaseline)):
        return asdict(config)
    return str(config).strip() or "server default"
