"""Tensor parallelism on CPU: ``spruce generate --tensor-parallel 2`` under torchrun (2 processes, gloo,
transformers' tensor-parallel plan) gives the tokens of the single-process engine on the same tiny
models, greedy and seeded sampling, with and without the cost model; bad set-ups are clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import build_tiny_model, free_port, save_model_dir, wait_serving

from spruce import Engine, SamplingParams, SpeculationConfig
from spruce.config import EngineConfig
from spruce.errors import InvalidRequestError

PROMPT = "hello there, trees"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-models")
    for name, layers in (("target", 2), ("draft", 1)):
        save_model_dir(build_tiny_model(seed=3, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2), root / name)
    return root


def _torchrun_generate(root, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
        "-m", "spruce", "generate", "--tensor-parallel", str(nproc), "--target", str(root / "target"),
        "--draft", str(root / "draft"), "--prompt", PROMPT, "--raw", "--json", *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _single(root, params: SamplingParams, spec) -> list[int]:
    engine = Engine.from_pretrained(target=root / "target", draft=root / "draft", draft_dtype="float32")
    return engine.generate(PROMPT, params, speculation=spec if spec is not None else engine.default_speculation)[0].token_ids


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "args", "params", "spec"),
    [
        ("greedy fixed tree", ["--tree-depth", "3", "--tree-top-k", "2", "--tree-budget", "5"],
         SamplingParams(max_tokens=16), SpeculationConfig(depth=3, top_k=2, budget=5, adaptive=False)),
        ("greedy adaptive", [], SamplingParams(max_tokens=16), None),
        ("seeded sampling", ["--temperature", "0.8", "--seed", "11"], SamplingParams(max_tokens=16, temperature=0.8, seed=11), None),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_tensor_parallel_generate_equals_single_process(model_dirs, name, args, params, spec):
    run = _torchrun_generate(model_dirs, "--max-tokens", "16", "--draft-dtype", "float32", *args)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, run.stdout  # rank 0 alone reports
    got = json.loads(lines[0])
    assert got["token_ids"] == _single(model_dirs, params, spec), name


@pytest.mark.slow
def test_tensor_parallel_unseeded_sampling_agrees_across_ranks(model_dirs):
    """Without a seed each rank would draw its own: rank 0's is broadcast, so both ranks sample the same
    tokens (if they did not, the sharded passes would diverge or hang, and the run would fail). An
    unseeded draw may end the text early: ``--ignore-eos`` keeps the run at its 12 tokens."""
    run = _torchrun_generate(model_dirs, "--max-tokens", "12", "--temperature", "1.0", "--ignore-eos")
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(json.loads(run.stdout.splitlines()[-1])["token_ids"]) == 12


def test_tensor_parallel_needs_a_launcher_and_shardable_heads(model_dirs):
    with pytest.raises(InvalidRequestError, match="torchrun --nproc-per-node 2"):
        Engine.from_pretrained(target=model_dirs / "target", drafter="ngram", tensor_parallel=2)
    with pytest.raises(InvalidRequestError, match="tensor_parallel"):
        EngineConfig(tensor_parallel=0)
    odd = build_tiny_model(seed=0, num_attention_heads=2, num_key_value_heads=1)
    from spruce.parallel import check_shardable

    with pytest.raises(InvalidRequestError, match="must both divide by 2"):
        check_shardable(odd.config, 2)


@pytest.mark.slow
def test_tensor_parallel_server_answers_like_one_process(model_dirs):
    """``spruce serve --tensor-parallel 2`` under torchrun: rank 0 serves gRPC, rank 1 follows. Concurrent
    requests (greedy and seeded sampling) equal the single-process engine's, a cancelled stream ends
    alone, an idle gap (the idle steps) changes nothing, and SIGTERM drains and stops both ranks."""
    import signal
    import threading
    import time

    import grpc
    from spruce.server._gen.spruce.v1 import spruce_pb2 as pb
    from spruce.server._gen.spruce.v1 import spruce_pb2_grpc as pb_grpc

    port = free_port()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "spruce", "serve", "--tensor-parallel", "2", "--target", str(model_dirs / "target"),
        "--draft", str(model_dirs / "draft"), "--draft-dtype", "float32", "--host", "127.0.0.1",
        "--port", str(port), "--http-port", "0", "--max-batch-size", "4", "--grace-s", "5",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    engine = Engine.from_pretrained(target=model_dirs / "target", draft=model_dirs / "draft", draft_dtype="float32")
    cases = [
        ("trees grow", SamplingParams(max_tokens=14)),
        ("abc abc abc", SamplingParams(max_tokens=10, temperature=0.7, seed=5)),
        ("slow roots", SamplingParams(max_tokens=12)),
    ]
    try:
        wait_serving(port, proc)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.SpruceServiceStub(channel)

        def ask(text: str, params: SamplingParams) -> list[int]:
            sampling = pb.SamplingOptions(max_tokens=params.max_tokens, temperature=params.temperature, top_p=1.0)
            if params.seed is not None:
                sampling.seed = params.seed
            return list(stub.Generate(pb.GenerateRequest(text=text, sampling=sampling), timeout=300).token_ids)

        got: dict[int, list[int]] = {}
        threads = [threading.Thread(target=lambda i=i, c=c: got.__setitem__(i, ask(*c))) for i, c in enumerate(cases)]
        stream = stub.GenerateStream(pb.GenerateRequest(text="cancel me", sampling=pb.SamplingOptions(max_tokens=200, ignore_eos=True)))
        for t in threads:
            t.start()
        next(stream)
        stream.cancel()
        for t in threads:
            t.join(timeout=300)
        want = [engine.generate(text, params)[0].token_ids for text, params in cases]
        assert [got[i] for i in range(len(cases))] == want
        time.sleep(2.5)  # idle: rank 0 steps once a second to keep rank 1's collectives alive
        assert ask(*cases[0]) == want[0]
        channel.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise AssertionError(f"the tensor-parallel server did not stop on SIGTERM:\n{out[-3000:]}") from None
    # torchrun itself exits 1 on SIGTERM ("got signal: 15"); the ranks must have ended without an error
    assert "[rank0]" not in out and "[rank1]" not in out, out[-3000:]
    assert "got signal: 15" in out
