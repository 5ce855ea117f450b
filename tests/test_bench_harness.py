"""``spruce bench`` end to end on tiny models: against an in-process gRPC server (spruce.v1 and KServe
v2) and in process through the CLI; the report's tables, lossless check and plots. Short and bounded:
no timings are asserted."""

from __future__ import annotations

import json

import pytest
from conftest import free_port
from spruce.evals.harness import BenchPlan, GrpcKServe, GrpcSpruce, InProcess, run_bench
from spruce.evals.prompts import load_prompts
from spruce.evals.report import markdown, plots, summarize
from spruce.server.app import start

from spruce import Engine
from spruce.config import EngineConfig, ServeConfig

CATEGORIES = ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "q.jsonl"
    rows = [
        {"question_id": i, "category": cat, "turns": [f"{cat} question {i}: say {'ab' * (i + 1)}"]}
        for i, cat in enumerate(CATEGORIES * 2)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def grpc_server(tiny_target, tiny_draft, tokenizer):
    engine = Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=4))
    srv = start(lambda: engine, ServeConfig(host="127.0.0.1", port=0, http_port=0, max_queue=64))
    assert srv.load_error is None
    yield srv
    srv.stop(grace_s=0.5)


def test_grpc_bench_closed_and_open_loop(grpc_server, prompt_file, tmp_path):
    target = GrpcSpruce(f"127.0.0.1:{grpc_server.port}")
    plan = BenchPlan(configs=["plain", "default", "on:4"], concurrency=[1, 3], rates=[50.0], num_prompts=6, max_tokens=6, rounds=2)
    raw = run_bench(target, load_prompts(prompt_file), plan, progress=False)
    target.close()
    records = raw["records"]
    assert {r["phase"] for r in records} == {"c=1", "c=3", "rate=50"}
    assert all(r["error"] is None and r["output_tokens"] > 0 and r["ttft_s"] is not None for r in records)
    assert all(r["stats"]["steps"] > 0 for r in records)  # the server's telemetry reached the client
    # every configuration saw the same 6 prompts in every phase and round
    per = {(r["phase"], r["config"], r["round"]) for r in records}
    assert len(per) == 3 * 3 * 2 and len(records) == 3 * 3 * 2 * 6
    summary = summarize(raw)
    assert summary["lossless"]["checked"]
    assert all(e["differing"] == 0 and e["compared"] > 0 for e in summary["lossless"]["configs"].values())
    assert summary["load"]["c=3"]["plain"]["speedup"] == 1.0
    assert summary["load"]["c=1"]["plain"]["mean_accepted_length"] == 1.0
    seen = {r["category"] for r in records}
    assert seen <= set(CATEGORIES) and set(summary["categories"]["table"]["default"]) == {*seen, "overall"}
    text = markdown(raw, summary)
    assert "| c=3 | on:4 |" in text and "all 36 outputs equal" in text
    written = plots(raw, summary, tmp_path)
    assert {p.name for p in written} == {"latency_cdf.png", "throughput.png", "acceptance_by_depth.png"}
    assert all(p.stat().st_size > 1000 for p in written)


def test_kserve_bench_and_unsupported_configs(grpc_server, prompt_file):
    target = GrpcKServe(f"127.0.0.1:{grpc_server.port}", "spruce")
    with pytest.raises(ValueError, match="KServe"):
        run_bench(target, load_prompts(prompt_file), BenchPlan(configs=["plain"]), progress=False)
    raw = run_bench(target, load_prompts(prompt_file), BenchPlan(configs=["default"], concurrency=[2], num_prompts=3, max_tokens=5), progress=False)
    assert len(raw["records"]) == 3 and all(r["error"] is None and r["output_tokens"] > 0 for r in raw["records"])
    assert not summarize(raw)["lossless"]["checked"]


def test_in_process_bench_with_the_hf_baseline(tiny_target, tiny_draft, tokenizer, prompt_file):
    target = InProcess(Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=2)))
    plan = BenchPlan(configs=["plain", "tree:2:2:3", "hf:assist"], concurrency=[1, 2], num_prompts=3, max_tokens=5)
    raw = run_bench(target, load_prompts(prompt_file), plan, progress=False)
    target.close()
    hf = [r for r in raw["records"] if r["config"] == "hf:assist"]
    assert {r["phase"] for r in hf} == {"c=1"}  # one request at a time only
    assert len(hf) == 3 and all(r["error"] is None for r in hf)
    lossless = summarize(raw)["lossless"]["configs"]
    assert lossless["tree:2:2:3"]["differing"] == 0 and lossless["tree:2:2:3"]["compared"] == 6


def test_spruce_bench_cli_in_process(tiny_dirs, prompt_file, tmp_path, capsys):
    from spruce.cli import main

    target_dir, draft_dir = tiny_dirs
    out = tmp_path / "report"
    code = main([
        "bench", "--target", str(target_dir), "--draft", str(draft_dir), "--prompts", str(prompt_file),
        "--num-prompts", "2", "--max-tokens", "4", "--concurrency", "1,2", "--configs", "plain,chain:2",
        "--max-batch-size", "2", "--out", str(out),
    ])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["load"]["c=2"]["chain:2"]["requests"] == 2
    assert (out / "report.md").read_text().startswith("# spruce bench")
    assert (out / "throughput.png").exists()
    assert main(["bench", "--url", "ftp://x", "--out", str(out)]) == 2
    assert "grpc://" in capsys.readouterr().err


def test_gpu_profile_code_path_on_cpu(tmp_path):
    """The device-machine profile, at tiny shapes on the CPU: every table is filled and a prediction made."""
    from spruce.evals.gpu_profile import main

    out = tmp_path / "gpu.json"
    assert main(["--shapes", "tiny", "--device", "cpu", "--dtype", "float32", "--context", "32", "--batches", "1", "2",
                 "--tokens", "1", "4", "--repeats", "1", "--overhead-batches", "2", "--overhead-tokens", "6", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["verify_s_by_batch_and_tokens"]) == {"1", "2"}
    assert all(v > 0 for per in report["verify_s_by_batch_and_tokens"].values() for v in per.values())
    assert 0 < report["step_overhead"][0]["busy_fraction"] <= 1.0
    # the verify pass through the Triton kernel (interpreted here) agrees with the SDPA pass
    assert set(report["verify_triton_s_by_batch_and_tokens"]) == {"1", "2"}
    # the draft level through the same kernel, which the kernel's prediction uses
    assert set(report["draft_level_triton_s_by_batch_and_tokens"]) == {"1", "2"}
    agreement = report["triton_vs_sdpa_logits"]
    assert agreement["max_abs_logit_diff"] < 1e-3 * max(1.0, agreement["max_abs_logit"])
    assert agreement["same_argmax"] == agreement["rows"]
    assert set(report["prediction"]) == {"sdpa", "triton", "triton_graph", "triton_graph_verify_only"}
    assert "PREDICTION" in report["note"] and set(report["prediction"]["triton"]) == {"1", "2"}
    # the graph sections (no capture on a CPU: the same padded static-buffer path, run eagerly)
    assert set(report["verify_triton_graph_s_by_batch_and_tokens"]) == {"1", "2", "graph_stats"}
    for p in report["graph_vs_eager_logits"]["passes"]:
        assert p["replay_vs_eager_max_abs"] < 1e-4 and p["same_argmax_vs_eager"] == p["rows"]
    engine = report["engine_graphs"][0]
    assert engine["plain_same_tokens"] == engine["tree_same_tokens"] == engine["tokens_per_run"]


def test_openai_http_bench_against_spruce(tiny_target, tiny_draft, tokenizer, prompt_file):
    """The harness against an OpenAI-compatible server (spruce's own HTTP port here): plain vs default,
    exact token counts from the final usage, the server's stats passed through."""
    from spruce.evals.harness import OpenAIHTTP

    port = free_port()
    srv = start(lambda: Engine(tiny_target, tokenizer, tiny_draft, EngineConfig(max_batch_size=2)),
                ServeConfig(host="127.0.0.1", port=0, http_port=port, max_tokens_limit=64))
    target = OpenAIHTTP(f"http://127.0.0.1:{port}", "spruce")
    with pytest.raises(ValueError, match="OpenAI"):
        target.configs(["tree:2:2:3"])
    raw = run_bench(target, load_prompts(prompt_file), BenchPlan(configs=["plain", "default"], concurrency=[2], num_prompts=3, max_tokens=5), progress=False)
    srv.stop(grace_s=0.5)
    records = raw["records"]
    assert len(records) == 6 and all(r["error"] is None and 1 <= r["output_tokens"] <= 5 for r in records)
    assert all(r["stats"]["steps"] >= 1 for r in records)
    summary = summarize(raw)
    assert summary["load"]["c=2"]["plain"]["mean_accepted_length"] == 1.0
    assert not summary["lossless"]["checked"]  # text protocol: no token ids to compare
