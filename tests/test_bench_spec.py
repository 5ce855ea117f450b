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


def test_ignore_eos_runs_every_answer_to_max_tokens(tiny_engine, monkeypatch):
    """--ignore-eos: spruce's rows and the HF baseline both decode max_tokens even when the model's first
    token is its end of sequence (made so here), so rows compare equal lengths."""
    from spruce.evals.bench_spec import HFBaseline, hf_generate

    from spruce.config import SamplingParams

    text = "abc"
    first = tiny_engine.generate(text, SamplingParams(max_tokens=1))[0].token_ids[0]
    monkeypatch.setattr(tiny_engine.target.generation_config, "eos_token_id", first)
    monkeypatch.setattr(tiny_engine.target.generation_config, "pad_token_id", first)
    stops, _ = hf_generate(tiny_engine, text, SamplingParams(max_tokens=9), HFBaseline("assist"))
    assert stops == [first]  # the made-up end of sequence ends HF's answer at once
    full, stats = hf_generate(tiny_engine, text, SamplingParams(max_tokens=9, ignore_eos=True), HFBaseline("assist"))
    assert len(full) == 9 and stats["output_tokens"] == 9
    monkeypatch.setattr(tiny_engine, "eos_ids", {first})
    stops = tiny_engine.generate(text, SamplingParams(max_tokens=9))[0]
    assert stops.token_ids == [first]
    out = tiny_engine.generate(text, SamplingParams(max_tokens=9, ignore_eos=True))[0]
    assert len(out.token_ids) == 9


def test_plans_expected_against_emitted():
    """The table's note on the cost model's plans: tokens per planned pass expected and emitted."""
    plain = _record("plain", "qa", 8, 4.0, 1.0, 8)
    default = _record("default", "qa", 8, 2.0, 1.0, 4)
    default["stats"].update(planned_steps=3, planned_expected_tokens=7.5, planned_emitted_tokens=6)
    summary = summarize([plain, default], ["plain", "default"])
    assert summary["default"]["overall"]["planned_expected_per_step"] == 2.5
    assert summary["default"]["overall"]["planned_emitted_per_step"] == 2.0
    assert summary["plain"]["overall"]["planned_expected_per_step"] is None
    table = markdown({"summary": summary, "dtype": "float32", "draft_dtype": "bfloat16", "max_tokens": 8, "temperature": 0.0})
    assert "- default: 3 steps, expected 2.50, emitted 2.00 (0.80 of expected)" in table
    assert "- plain:" not in table


def test_header_names_ignore_eos():
    records = [_record("plain", "qa", 8, 4.0, 1.0, 8), _record("default", "qa", 8, 2.0, 1.0, 4)]
    report = {"summary": summarize(records, ["plain", "default"]), "dtype": "float32", "draft_dtype": "bfloat16",
              "max_tokens": 8, "temperature": 0.7, "ignore_eos": True}
    assert "every answer max_tokens long (--ignore-eos)" in markdown(report)


def test_markdown_path_keeps_dots_inside_the_name(tmp_path):
    from spruce.evals.bench_spec import markdown_path

    assert markdown_path(tmp_path / "specbench_t0.7_v1.json") == tmp_path / "specbench_t0.7_v1.md"
    assert markdown_path(tmp_path / "specbench_t0.7_v1") == tmp_path / "specbench_t0.7_v1.md"
    assert markdown_path(tmp_path / "load.json") == tmp_path / "load.md"
