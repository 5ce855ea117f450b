"""``spruce bench``: runs ``spruce.evals.harness`` against the chosen target and writes the report."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

from spruce.errors import InvalidRequestError
from spruce.evals.harness import BenchPlan, GrpcKServe, GrpcSpruce, InProcess, OpenAIHTTP, Target, run_bench
from spruce.evals.prompts import load_prompts
from spruce.evals.report import markdown, plots, summarize


def _numbers(text: str, kind: type) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidRequestError(f"expected comma-separated numbers, got {text!r}") from None


def run(args: argparse.Namespace, load_engine: Callable | None) -> int:
    plan = BenchPlan(
        configs=[c.strip() for c in args.configs.split(",") if c.strip()],
        concurrency=_numbers(args.concurrency, int),
        rates=_numbers(args.request_rate, float),
        num_prompts=args.num_prompts,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        rounds=args.rounds,
        warmup=args.warmup,
        requests_per_client=args.requests_per_client,
        time_limit_s=args.time_limit,
    )
    if any(c < 1 for c in plan.concurrency) or any(r <= 0 for r in plan.rates) or not (plan.concurrency or plan.rates):
        raise InvalidRequestError("--concurrency values must be >= 1 and --request-rate values > 0")
    prompts = load_prompts(args.prompts)
    target: Target
    if load_engine is not None:
        target = InProcess(load_engine())
    elif args.url.startswith("grpc://"):
        address = args.url.removeprefix("grpc://")
        target = GrpcKServe(address, args.model) if args.protocol == "kserve" else GrpcSpruce(address)
    elif args.url.startswith(("http://", "https://")):
        target = OpenAIHTTP(args.url, args.model)
    else:
        raise InvalidRequestError(f"--url must look like grpc://HOST:PORT or http://HOST:PORT, got {args.url!r}")
    try:
        raw = run_bench(target, prompts, plan)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    finally:
        target.close()
    raw["command"] = "spruce bench " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else [])
    raw["machine"] = {"platform": platform.platform(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    raw["prompts"] = args.prompts or "spruce_prompts.jsonl"
    summary = summarize(raw, args.slo_ttft, args.slo_itl)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({**raw, "summary": summary}, indent=1) + "\n")
    table = markdown(raw, summary)
    (out / "report.md").write_text(table)
    try:
        written = plots(raw, summary, out)
    except ImportError:
        written = []
        print("spruce bench: matplotlib is not installed (pip install 'spruce[bench]'): no plots", file=sys.stderr)
    print(table)
    print(f"wrote {out / 'report.json'}, {out / 'report.md'}" + "".join(f", {p}" for p in written), file=sys.stderr)
    return 0
