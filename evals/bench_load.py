"""Throughput and per-token latency under load: closed-loop clients against the batched engine.

For each concurrency c, c clients each keep one request in flight (a client whose request ends sends its
next one before the engine's next step) until ``max(min_requests, c * requests_per_client)`` requests
have finished. Every configuration runs the same prompt sequence at each concurrency, one after the
other in an order that rotates from one run to the next (``--rounds`` runs of each, alternating), on
one engine (so the adaptive cost model keeps what it measured, as a server would).

Reported per configuration and concurrency:
- output tokens/s: output tokens of the finished requests / wall time of the run (prefill included);
- per-token latency p50 / p99: each engine step that gives a request k tokens after a gap of g seconds
  (since its previous tokens) counts k tokens of g / k each; the first tokens (TTFT) are left out and
  reported apart (p50);
- ratio to plain decoding's tokens/s at the same concurrency (over all rounds, and per round: the spread
  says how far one run's ratio can be trusted on a shared machine), and, with greedy decoding, whether
  every output equals plain decoding's.

    python -m spruce.evals.bench_load --prompts question.jsonl --concurrency 1 2 4 8 16 \\
        --configs plain tree:3:2:4 auto --max-tokens 32 --out evals/results/load_cpu_float32.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path


from spruce.config import DRAFT_DTYPES, DTYPES, SamplingParams, SpeculationConfig
from spruce.evals.bench_spec import BASELINE, HFBaseline, markdown_path, parse_config, report_header
from spruce.evals.prompts import load_prompts
from spruce.evals.report import quantile


def closed_loop(engine, prompt_ids: list[list[int]], concurrency: int, n_requests: int, params: SamplingParams, spec) -> dict:
    """Run ``n_requests`` requests (prompts in order, cycling) with ``concurrency`` in flight."""
    queue = iter(range(n_requests))
    meta: dict[int, dict] = {}

    def send() -> None:
        i = next(queue, None)
        if i is None:
            return
        req = engine.add_request(prompt_ids[i % len(prompt_ids)], params, spec, text_deltas=False)
        meta[id(req)] = {"index": i, "sent": time.perf_counter(), "last": None, "tokens": []}

    start = time.perf_counter()
    for _ in range(concurrency):
        send()
    gaps: list[float] = []
    ttfts: list[float] = []
    outputs: dict[int, list[int]] = {}
    planned: dict[str, int] = defaultdict(int)
    drafted = accepted = steps = 0
    while engine.has_work():
        events = engine.step()
        now = time.perf_counter()
        for req, event in events:
            m = meta[id(req)]
            if event.error is not None:
                raise event.error
            if event.token_ids:
                if m["last"] is None:
                    ttfts.append(now - m["sent"])
                    # the first event's tokens after the first one arrive with it: no extra wait
                    gaps.extend([0.0] * (len(event.token_ids) - 1))
                else:
                    k = len(event.token_ids)
                    gaps.extend([(now - m["last"]) / k] * k)
                m["last"] = now
                m["tokens"].extend(event.token_ids)
            if event.output is not None:
                outputs[m["index"]] = m["tokens"]
                s = event.output.stats
                drafted, accepted, steps = drafted + s.drafted, accepted + s.accepted, steps + s.steps
                for budget, count in s.steps_by_planned_budget.items():
                    planned[str(budget)] += count
                send()
    raw = {
        "wall_s": time.perf_counter() - start,
        "steps": steps,
        "drafted": drafted,
        "accepted": accepted,
        "gaps": gaps,
        "ttfts": ttfts,
        "steps_by_planned_budget": dict(planned),
        "outputs": [outputs[i] for i in sorted(outputs)],
    }
    return {**summarize([raw]), "outputs": raw["outputs"]}


def summarize(runs: list[dict]) -> dict:
    """One configuration's figures over several runs of the same phase (rounds): tokens over wall time
    summed, latency quantiles over every run's per-token gaps."""
    wall = sum(r["wall_s"] for r in runs)
    tokens = sum(len(t) for r in runs for t in r["outputs"])
    steps, drafted, accepted = (sum(r[k] for r in runs) for k in ("steps", "drafted", "accepted"))
    gaps = [g for r in runs for g in r["gaps"]]
    ttfts = [t for r in runs for t in r["ttfts"]]
    planned: dict[str, int] = defaultdict(int)
    for r in runs:
        for budget, count in r["steps_by_planned_budget"].items():
            planned[budget] += count
    return {
        "requests": sum(len(r["outputs"]) for r in runs),
        "output_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "latency_p50_s": quantile(gaps, 0.5) or 0.0,
        "latency_p99_s": quantile(gaps, 0.99) or 0.0,
        "ttft_p50_s": quantile(ttfts, 0.5) or 0.0,
        "mean_accepted_length": tokens / steps if steps else 0.0,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "steps_by_planned_budget": dict(planned),
        "steps": steps,
        "drafted": drafted,
        "accepted": accepted,
        "gaps": gaps,
        "ttfts": ttfts,
    }


def _spec(name: str, default: SpeculationConfig | None) -> SpeculationConfig | None:
    """A configuration by name (``bench_spec.parse_config``; HF baselines do not run in the engine)."""
    spec = parse_config(name, default)
    if isinstance(spec, HFBaseline):
        raise SystemExit(f"{name}: HF baselines run one request at a time (bench_spec), not under load")
    return spec


def run(args: argparse.Namespace) -> dict:
    from spruce.engine import Engine

    engine = Engine.from_pretrained(
        args.target, args.draft, dtype=args.dtype, draft_dtype=args.draft_dtype, max_batch_size=max(args.concurrency),
        draft_vocab=args.draft_vocab,
    )
    configs: dict[str, SpeculationConfig | None] = {BASELINE: None}
    for name in args.configs:
        if name != BASELINE:
            configs[name] = _spec(name, engine.default_speculation)
    prompts = load_prompts(args.prompts, per_category=args.per_category)
    encoded, skipped = [], 0
    for p in _interleave(prompts):
        ids = engine.encode(engine.apply_chat_template(p.turns[0]))
        if len(ids) > args.max_prompt_tokens:
            skipped += 1
            continue
        encoded.append(ids)
    if not encoded:
        raise SystemExit(f"no prompt has at most {args.max_prompt_tokens} tokens")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=args.ignore_eos)
    names = list(configs)
    for name in names:  # warm-up (and the adaptive configuration's start-up cost measurement)
        closed_loop(engine, encoded[:1], 1, 1, SamplingParams(max_tokens=4), configs[name])
    rows = []
    for j, c in enumerate(args.concurrency):
        n = max(args.min_requests, c * args.requests_per_client)
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for round_ in range(args.rounds):  # configurations alternate; the order rotates every run
            shift = (j + round_) % len(names)
            for name in names[shift:] + names[:shift]:
                r = closed_loop(engine, encoded, c, n, params, configs[name])
                runs[name].append(r)
                print(
                    f"c={c:<3} round {round_} {name:<14} {r['tokens_per_s']:6.2f} tok/s  "
                    f"p50 {r['latency_p50_s'] * 1000:7.1f} ms  p99 {r['latency_p99_s'] * 1000:7.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
        base = summarize(runs[BASELINE])
        for name in names:
            r = summarize(runs[name])
            del r["gaps"], r["ttfts"]
            pairs = list(zip(runs[name], runs[BASELINE]))
            same = all(x["outputs"] == b["outputs"] for x, b in pairs) if args.temperature == 0 else None
            rows.append({
                "concurrency": c,
                "config": name,
                **r,
                "ratio_vs_plain": r["tokens_per_s"] / base["tokens_per_s"],
                "ratio_by_round": [x["tokens_per_s"] / b["tokens_per_s"] for x, b in pairs],
                "same_as_plain": same,
            })
    return {
        **report_header(args, engine),
        "prompts": {"source": args.prompts or "spruce_prompts.jsonl", "used": len(encoded), "skipped_too_long": skipped},
        "configs": {k: (v.__dict__ if v else None) for k, v in configs.items()},
        "rows": rows,
        "engine_telemetry": engine.speculation_telemetry(),
    }


def _interleave(prompts):
    """Round-robin over categories, so that any prefix of the sequence mixes them."""
    by_cat: dict[str, list] = defaultdict(list)
    for p in prompts:
        by_cat[p.category].append(p)
    out = []
    while any(by_cat.values()):
        for cat in list(by_cat):
            if by_cat[cat]:
                out.append(by_cat[cat].pop(0))
    return out


def markdown(report: dict) -> str:
    lines = [
        f"# Load: closed loop, {report['dtype']} target, max_tokens {report['max_tokens']}, T={report['temperature']}",
        "",
        f"{report['date']}, {report['machine']['platform']}, {report['machine']['cpus']} threads, torch {report['machine']['torch']}",
        f"prompts: {report['prompts']['used']} from {report['prompts']['source']} ({report['prompts']['skipped_too_long']} longer ones skipped)",
        "",
        f"`{report['command']}`",
        "",
        "| concurrency | config | tok/s | vs plain | per round | p50 ms/token | p99 ms/token | TTFT p50 s | accepted length | same as plain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        same = "" if r["same_as_plain"] is None else ("yes" if r["same_as_plain"] else "NO")
        rounds = " ".join(f"{x:.2f}" for x in r.get("ratio_by_round", []))
        lines.append(
            f"| {r['concurrency']} | {r['config']} | {r['tokens_per_s']:.2f} | {r['ratio_vs_plain']:.2f}x | {rounds} | "
            f"{r['latency_p50_s'] * 1000:.0f} | {r['latency_p99_s'] * 1000:.0f} | {r['ttft_p50_s']:.2f} | "
            f"{r['mean_accepted_length']:.2f} | {same} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", help="Spec-Bench-format jsonl (default: the shipped set)")
    p.add_argument("--per-category", type=int, help="first N prompts of each category")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--configs", nargs="+", default=[BASELINE, "tree:3:2:4", "default"],
                   help="plain, default (the engine's: adaptive), default+prefill (drafting before the prefill pass too), or bench_spec's forms (chain:N, tree:D:K:B, auto, ...)")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every configuration this many times per concurrency, alternating (ratios per round are reported)")
    p.add_argument("--min-requests", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="skip longer prompts (bounds the run time)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="every request generates max_tokens")
    p.add_argument("--target")
    p.add_argument("--draft")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--draft-dtype", choices=DRAFT_DTYPES)
    p.add_argument("--draft-vocab", type=int, default=0, help="token ids the draft's output layer scores (0: all)")
    p.add_argument("--out", help="write the JSON report here (and a .md table next to it)")
    args = p.parse_args(argv)
    args.command_line = "python -m spruce.evals.bench_load " + " ".join(argv if argv is not None else sys.argv[1:])
    report = run(args)
    table = markdown(report)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        markdown_path(out).write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
