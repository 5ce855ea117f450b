"""Shared fixtures: tiny randomly initialised Qwen2 models with a byte-level tokenizer, built in the test.

Target and draft share the tokenizer; the draft is a perturbed copy of the target (so drafts are often,
not always, right) or an unrelated random model (a deliberately bad draft).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton must run under its interpreter on machines without CUDA, and the variable must be set before
# anything imports triton (transformers does, as a side effect).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from spruce.evals.tiny import BYTE_EOS_ID as EOS_ID  # noqa: E402 - after TRITON_INTERPRET is set
from spruce.evals.tiny import BYTE_MERGES as TINY_MERGES  # noqa: E402
from spruce.evals.tiny import BYTE_VOCAB as TINY_VOCAB  # noqa: E402
from spruce.evals.tiny import byte_tokenizer as _tokenizer  # noqa: E402


def tiny_config(**overrides):
    from transformers import Qwen2Config

    values = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=EOS_ID,
        bos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    return Qwen2Config(**values)


def build_tiny_model(seed: int, **overrides) -> torch.nn.Module:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    config._attn_implementation = "sdpa"
    model = Qwen2ForCausalLM(config)
    # larger logits than the default init, so argmax is well separated and drafts are informative
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval().requires_grad_(False)


def perturbed_copy(model: torch.nn.Module, noise: float, seed: int) -> torch.nn.Module:
    import copy

    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * noise * p.abs().mean())
    return draft


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(port: int, proc=None, timeout_s: float = 120) -> None:
    """Until the gRPC server on ``port`` reports SERVING (health); fails if ``proc`` (its process, if
    given) exits first or the time runs out."""
    import time

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and (proc is None or proc.poll() is None):
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise AssertionError(f"the server on port {port} did not start serving")


def save_model_dir(model: torch.nn.Module, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return _tokenizer()


@pytest.fixture(scope="session")
def tiny_target():
    return build_tiny_model(seed=0)


@pytest.fixture(scope="session")
def tiny_draft(tiny_target):
    return perturbed_copy(tiny_target, noise=0.1, seed=1)


@pytest.fixture(scope="session")
def bad_draft():
    return build_tiny_model(seed=99)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tiny_target, tiny_draft):
    root = tmp_path_factory.mktemp("tiny_models")
    return save_model_dir(tiny_target, root / "target"), save_model_dir(tiny_draft, root / "draft")


@pytest.fixture(scope="session")
def tiny_engine(tiny_target, tiny_draft, tokenizer):
    from spruce.engine import Engine

    return Engine(tiny_target, tokenizer, tiny_draft)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0, what: str = "") -> None:
    """torch.testing.assert_close that also reports max and mean absolute difference."""
    diff = (actual.double() - expected.double()).abs()
    torch.testing.assert_close(
        actual,
        expected,
        atol=atol,
        rtol=rtol,
        msg=lambda m: f"{what}: max |diff| {diff.max().item():.3g}, mean {diff.mean().item():.3g}\n{m}",
    )
