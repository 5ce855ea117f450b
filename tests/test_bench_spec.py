"""The Spec-Bench table's arithmetic on made-up records: speedup is plain's time per output token over
the configuration's, prefill included; the decode-only ratio leaves each run's prefill out."""

from __future__ import annotations

import pytest

from spruce.evals.bench_spec import markdown, summarize


def _record(config: str, category: str, tokens: int, wall: float, prefill: float | None, steps: int) -> dict:
    stats = {"wall_time_s": wall, "steps": steps}
    if prefill is not None:
        stats["prefill_time_s"] = prefill
    return {"config": config, "category": category, "question_id": 1, "output_tokens": tokens, "stats": stats, "same_as_plain": True}


def test_speedups_with_and_without_prefill():
    # plain: 10 s prefill + 20 tokens at 0.5 s; the sampled answer of "default" is 4 tokens at 0.25 s
    records = [
        _record("plain", "rag", 20, 20.0, 10.0, 20),
        _record("default", "rag", 4, 11.0, 10.0, 2),
        _record("hf:assist", "rag", 20, 15.0, None, 0),
    ]
    summary = summarize(records, ["plain", "default", "hf:assist"])
    default = summary["default"]["rag"]
    assert default["speedup"] == pytest.approx((20.0 / 20) / (11.0 / 4))  # prefill over 4 tokens: 0.36x
    assert default["decode_speedup"] == pytest.approx((10.0 / 20) / (1.0 / 4))  # 2x per decoded token
    assert default["mean_accepted_length"] == 2.0
    assert summary["hf:assist"]["overall"]["decode_speedup"] is None
    table = markdown({"summary": summary, "dtype": "float32", "draft_dtype": "bfloat16", "max_tokens": 40, "temperature": 0.7})
    assert "| default | 0.36x / 2.00 | 0.36x / 2.00 | 0.36 | 2.00x |" in table
    assert "| hf:assist |" in table and "| 1.33 | n/a |" in table
