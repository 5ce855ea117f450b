"""The embedded default pair (real weights, float32): speculation is token-identical to plain decoding.

Needs the ``models`` extra; the first run joins, verifies and converts the GGUF files (a few minutes),
later runs load the cached safetensors. One engine for the module: both models in float32 take ~9 GB.
"""

from __future__ import annotations

import pytest

from spruce.models import models_extra_installed

pytestmark = [
    pytest.mark.slow,
    pytest.mark.real_models,
    pytest.mark.skipif(not models_extra_installed(), reason="needs the models extra: pip install '.[models]'"),
]

PROMPTS = {
    "code": "Write a Python function that returns the sum of the squares of a list of integers.",
    "chat": "Hi! Can you suggest a name for a small grey cat?",
    "prose": "Describe a quiet morning at a lake in three sentences.",
}
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def engine():
    from spruce import Engine

    return Engine.from_pretrained()


def test_embedded_pair_shares_vocabulary(engine):
    assert engine.target.config.vocab_size == engine.drafter.model.config.vocab_size == 151936
    assert engine.tokenizer.chat_template


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_greedy_speculation_token_identical(engine, kind):
    from spruce import SamplingParams

    prompt = engine.apply_chat_template(PROMPTS[kind])
    params = SamplingParams(max_tokens=MAX_TOKENS)
    plain = engine.generate(prompt, params, speculation=None)[0]
    spec = engine.generate(prompt, params)[0]
    assert spec.token_ids == plain.token_ids, f"{kind}: {spec.text!r} != {plain.text!r}"
    assert spec.stats.steps < plain.stats.steps or spec.stats.accepted == 0
    assert plain.text.strip()
