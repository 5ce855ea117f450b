"""Speculation vs plain decoding, side by side, on the engine as a library.

For each prompt, every configuration (plain decoding first) runs in turn, and the order rotates from one
prompt to the next, so machine drift hits all of them alike. Speedup per category = plain decoding's
total time / the configuration's total time over the same prompts (greedy outputs are the same length,
so this is also the tokens/s ratio). With greedy decoding it also checks that every output equals the
plain output and names the first prompt that differs.

    python -m spruce.evals.bench_spec --per-category 2 --max-tokens 64 --out evals/results/cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from spruce.config import DRAFT_DTYPES, DTYPES, EngineConfig, SamplingParams, SpeculationConfig, parse_tree_paths
from spruce.draft.vocab import full_vocab
from spruce.evals.prompts import load_prompts

BASELINE = "plain"


# ``+name`` parts of a configuration that set a flag of the speculation config
_FLAG_PARTS = {"prefill": "draft_on_prefill", "fullvocab": "full_draft_vocab"}


def parse_spec(text: str, default: SpeculationConfig | None = None) -> SpeculationConfig:
    """``chain:N``, ``tree:DEPTH:TOPK:BUDGET`` (dynamic), ``static:0/1/00/10`` (sibling-rank paths),
    ``auto`` or ``auto:DEPTH:BUDGET`` (the cost model within those bounds; bare ``auto`` takes the
    default's), ``ngram:BUDGET``, and a model shape plus n-gram branches (``tree:3:2:4+ngram:2``). A
    ``:topk`` suffix on a model shape makes sampling use the draft's top-k instead of drawn children;
    a ``+prefill`` part drafts before the prefill pass too (``SpeculationConfig.draft_on_prefill``), a
    ``+fullvocab`` part scores the draft's whole vocabulary (``SpeculationConfig.full_draft_vocab``)."""
    fields: dict = {}
    for part in text.split("+"):
        kind, *nums = part.split(":")
        if kind in _FLAG_PARTS and not nums:
            fields[_FLAG_PARTS[kind]] = True
            continue
        if nums and nums[-1] == "topk":
            fields["sampled_children"] = False
            nums = nums[:-1]
        if kind == "chain" and len(nums) == 1:
            fields.update(depth=int(nums[0]), top_k=1, budget=int(nums[0]))
        elif kind == "tree" and len(nums) == 3:
            fields.update(depth=int(nums[0]), top_k=int(nums[1]), budget=int(nums[2]))
        elif kind == "static" and len(nums) == 1:
            fields.update(tree_paths=parse_tree_paths(nums[0]))
        elif kind == "auto" and len(nums) in (0, 2):
            base = default or SpeculationConfig()
            depth, budget = (int(nums[0]), int(nums[1])) if nums else (base.depth, base.budget)
            fields.update(depth=depth, top_k=max(base.top_k, 2), budget=budget, adaptive=True)
        elif kind == "ngram" and len(nums) == 1:
            fields.update(ngram_budget=int(nums[0]))
        else:
            raise argparse.ArgumentTypeError(f"bad configuration {text!r}: see --help")
    has_model = "depth" in fields or "tree_paths" in fields
    has_ngram = "ngram_budget" in fields
    drafter = "both" if has_model and has_ngram else ("ngram" if has_ngram else "model")
    return SpeculationConfig(drafter=drafter, **fields)


@dataclass(frozen=True)
class HFBaseline:
    """A peer baseline on the same models: HF transformers' ``generate`` with assisted generation
    (``assistant_model``, its default schedule) or prompt lookup (``prompt_lookup_num_tokens``)."""

    kind: str  # "assist" or "lookup"
    lookup_tokens: int = 10


def parse_config(text: str, default: SpeculationConfig | None) -> SpeculationConfig | HFBaseline | None:
    """``default`` (the engine's), with ``+prefill`` / ``+fullvocab`` parts (the engine's, drafting before
    the prefill pass too / scoring the draft's whole vocabulary), the HF baselines (``hf:assist``,
    ``hf:lookup[:N]``), or one of ``parse_spec``'s forms."""
    head, *parts = text.split("+")
    if head == "default":
        if any(part not in _FLAG_PARTS for part in parts):
            raise argparse.ArgumentTypeError(f"bad configuration {text!r}: default takes +{' / +'.join(_FLAG_PARTS)}")
        flags: dict[str, Any] = {_FLAG_PARTS[part]: True for part in parts}
        return None if default is None else replace(default, **flags)
    if text == "hf:assist":
        return HFBaseline("assist")
    if text.startswith("hf:lookup"):
        _, _, n = text.partition("hf:lookup:")
        return HFBaseline("lookup", int(n) if n else 10)
    return parse_spec(text, default)


def hf_generate(engine, text: str, params: SamplingParams, baseline: HFBaseline) -> tuple[list[int], dict]:
    """One HF ``generate`` call; returns the new token ids and stats in the engine's JSON shape (steps are
    not reported by HF: 0)."""
    ids = torch.tensor([engine.encode(text)])
    kwargs: dict = {"max_new_tokens": params.max_tokens, "do_sample": not params.greedy}
    if params.ignore_eos:  # as the engine's ignore_eos: every answer max_tokens long
        kwargs["min_new_tokens"] = params.max_tokens
    if not params.greedy:
        kwargs.update(temperature=params.temperature, top_k=params.top_k or None, top_p=params.top_p)
        torch.manual_seed(params.seed or 0)
    if baseline.kind == "assist":
        if engine.drafter is None:
            raise SystemExit("hf:assist needs a draft model")
        kwargs["assistant_model"] = engine.drafter.model
    else:
        kwargs["prompt_lookup_num_tokens"] = baseline.lookup_tokens
    t0 = time.perf_counter()
    # HF's assistant must score every token id (a narrowed draft's output layer, whole again)
    with torch.inference_mode(), full_vocab(engine.drafter.model if engine.drafter is not None else None):
        out = engine.target.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    wall = time.perf_counter() - t0
    tokens = out[0, ids.shape[1] :].tolist()
    return tokens, {"wall_time_s": wall, "steps": 0, "output_tokens": len(tokens)}


def run(args: argparse.Namespace) -> dict:
    from spruce.engine import Engine

    engine = Engine.from_pretrained(
        args.target, args.draft, dtype=args.dtype, draft_dtype=args.draft_dtype, draft_vocab=args.draft_vocab
    )
    configs: dict[str, SpeculationConfig | HFBaseline | None] = {BASELINE: None}
    for name in args.configs:
        if name != BASELINE:
            configs[name] = parse_config(name, engine.default_speculation)
    prompts = load_prompts(args.prompts, per_category=args.per_category)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, ignore_eos=args.ignore_eos)
    names = list(configs)

    def generate(name: str, text: str, p: SamplingParams) -> tuple[list[int], dict]:
        config = configs[name]
        if isinstance(config, HFBaseline):
            return hf_generate(engine, text, p, config)
        out = engine.generate(text, p, config)[0]
        return out.token_ids, out.stats.to_dict()

    # warm-up: one short run of each configuration (first calls allocate and fill caches)
    for name in names:
        generate(name, engine.apply_chat_template("Say hi."), SamplingParams(max_tokens=4))

    records = []
    for i, prompt in enumerate(tqdm(prompts, desc="prompts")):
        text = engine.apply_chat_template(prompt.turns[0])
        order = names[i % len(names) :] + names[: i % len(names)]
        outs = {name: generate(name, text, params) for name in order}
        for name in names:
            tokens, stats = outs[name]
            records.append(
                {
                    "question_id": prompt.question_id,
                    "category": prompt.category,
                    "config": name,
                    "output_tokens": len(tokens),
                    "same_as_plain": tokens == outs[BASELINE][0],
                    "stats": stats,
                }
            )
    return {
        **report_header(args, engine),
        "configs": {k: (asdict(v) if v else None) for k, v in configs.items()},
        "records": records,
        "summary": summarize(records, names),
        "engine_telemetry": engine.speculation_telemetry(),
    }


def markdown_path(out: Path) -> Path:
    """The summary table's path beside the JSON report ``out``: its name with ``.json`` replaced by (or,
    without it, followed by) ``.md``; a dot inside the name (``..._t0.7_...``) is not a suffix."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".json") + ".md")


def report_header(args: argparse.Namespace, engine) -> dict:
    """What every benchmark report starts with: the command, machine, date and the run's settings."""
    return {
        "command": args.command_line,
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "dtype": args.dtype,
        "draft_dtype": engine.config.draft_dtype,
        "draft_vocab": engine.config.draft_vocab,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "ignore_eos": getattr(args, "ignore_eos", False),
    }


def summarize(records: list[dict], names: list[str]) -> dict:
    """Per configuration and category: time, tokens, speedup vs plain, mean accepted length, lossless.

    ``decode_speedup``: the same ratio without prefill (wall time minus the first pass, per output token;
    None for baselines that do not time their prefill). With sampling, rows' answers differ in length
    and a long prompt's prefill divided by a few tokens can outweigh everything else."""
    acc: dict[tuple[str, str], dict] = defaultdict(lambda: defaultdict(float))
    for r in records:
        for cat in (r["category"], "overall"):
            a = acc[(r["config"], cat)]
            a["time_s"] += r["stats"]["wall_time_s"]
            prefill = r["stats"].get("prefill_time_s")
            a["decode_s"] += r["stats"]["wall_time_s"] - (prefill or 0.0)
            a["untimed_prefill"] += prefill is None
            a["tokens"] += r["output_tokens"]
            a["steps"] += r["stats"]["steps"]
            a["differs"] += 0 if r["same_as_plain"] else 1
            a["planned_steps"] += r["stats"].get("planned_steps", 0)
            a["planned_expected"] += r["stats"].get("planned_expected_tokens", 0.0)
            a["planned_emitted"] += r["stats"].get("planned_emitted_tokens", 0)
    first_diff = {}
    for r in records:
        if not r["same_as_plain"] and r["config"] not in first_diff:
            first_diff[r["config"]] = r["question_id"]
    out: dict = {}
    for (name, cat), a in acc.items():
        base = acc[(BASELINE, cat)]
        out.setdefault(name, {})[cat] = {
            "tokens_per_s": a["tokens"] / a["time_s"],
            "speedup": (base["time_s"] / base["tokens"]) / (a["time_s"] / a["tokens"]),
            "decode_speedup": None if a["untimed_prefill"] else (base["decode_s"] / base["tokens"]) / (a["decode_s"] / a["tokens"]),
            "mean_accepted_length": a["tokens"] / a["steps"] if a["steps"] else None,
            "outputs_differing_from_plain": int(a["differs"]),
            # adaptive rows: tokens per pass the cost model's plans expected, and what those passes emitted
            "planned_steps": int(a["planned_steps"]),
            "planned_expected_per_step": a["planned_expected"] / a["planned_steps"] if a["planned_steps"] else None,
            "planned_emitted_per_step": a["planned_emitted"] / a["planned_steps"] if a["planned_steps"] else None,
        }
    for name in names:
        out[name]["first_differing_question_id"] = first_diff.get(name)
    return out


def markdown(report: dict) -> str:
    summary = report["summary"]
    cats = sorted({c for v in summary.values() for c in v if c not in ("overall", "first_differing_question_id")})
    cols = [*cats, "overall"]
    lines = [
        f"dtype {report['dtype']}, draft dtype {report['draft_dtype']}, draft vocab {report.get('draft_vocab') or 'all'}, max_tokens {report['max_tokens']}, "
        f"temperature {report['temperature']}"
        + (", every answer max_tokens long (--ignore-eos)" if report.get("ignore_eos") else "")
        + "; speedup = plain time / config time over the same prompts "
        "(x), mean accepted length counts the bonus token (tokens per target pass).",
        "",
        "| config | " + " | ".join(cols) + " | tok/s overall | overall, decode only | lossless |",
        "|---|" + "---|" * (len(cols) + 3),
    ]
    for name, per in summary.items():
        cells = [_cell(per[c]) if c in per else "-" for c in cols]
        if report["temperature"] > 0:
            lossless = "n/a (sampling: exact in distribution, not per token)"
        elif per["overall"]["outputs_differing_from_plain"] == 0:
            lossless = "yes"
        else:
            lossless = f"no (first: question {per['first_differing_question_id']})"
        decode = per["overall"].get("decode_speedup")
        decode_cell = "n/a" if decode is None else f"{decode:.2f}x"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {per['overall']['tokens_per_s']:.2f} | {decode_cell} | {lossless} |")
    planned = [(name, per["overall"]) for name, per in summary.items() if per["overall"].get("planned_steps")]
    if planned:
        lines += ["", "Plans of the cost model (steps it planned a tree for; tokens per pass, bonus included):", ""]
        for name, o in planned:
            expected, emitted = o["planned_expected_per_step"], o["planned_emitted_per_step"]
            lines.append(
                f"- {name}: {o['planned_steps']} steps, expected {expected:.2f}, emitted {emitted:.2f} "
                f"({emitted / expected:.2f} of expected)"
            )
    return "\n".join(lines)


def _cell(entry: dict) -> str:
    mal = entry["mean_accepted_length"]
    return f"{entry['speedup']:.2f}x / " + ("n/a" if mal is None else f"{mal:.2f}")


def main(argv: list[str] | None = None) -> int:
    import sys

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target")
    p.add_argument("--draft")
    p.add_argument("--dtype", default=EngineConfig().dtype, choices=DTYPES)
    p.add_argument("--draft-dtype", choices=DRAFT_DTYPES)
    p.add_argument("--draft-vocab", type=int, default=0, help="token ids the draft's output layer scores (0: all)")
    p.add_argument("--prompts", help="Spec-Bench format JSONL (default: spruce's own prompt set)")
    p.add_argument("--per-category", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--ignore-eos", action="store_true",
        help="every answer runs to --max-tokens (all rows decode the same number of tokens: with sampling, "
        "answers otherwise differ in length between rows and prefill weighs differently)",
    )
    p.add_argument(
        "--seed", type=int, default=None,
        help="per-request sampling seed (default none: sampling requests get adaptive trees, as unseeded "
        "requests do; seeded ones use the fixed tree)",
    )
    p.add_argument(
        "--configs", nargs="+", default=["default"],
        help="default, chain:N, tree:D:K:B, static:0/1/00, auto[:D:B], ngram:B, a model shape plus "
        "ngram (tree:3:2:4+ngram:2), ':topk' after a model shape, hf:assist, hf:lookup[:N]",
    )
    p.add_argument("--out", type=Path, help="write the JSON report here (and a .md beside it)")
    args = p.parse_args(argv)
    args.command_line = "python -m spruce.evals.bench_spec " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(args)
    table = markdown(report)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        markdown_path(args.out).write_text(f"`{report['command']}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
