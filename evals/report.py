"""Summaries, the Markdown report and PNG plots of a ``spruce bench`` run (``spruce.evals.harness``).

Definitions (the report states them too):
- tokens/s: output tokens of a phase's finished requests / the phase's wall time (first send to last end);
- requests/s and goodput: finished requests / wall time, and those that also met the SLOs (TTFT at most
  ``slo_ttft_s`` and mean inter-token gap at most ``slo_itl_s``) / wall time;
- inter-token latency: every gap between a request's tokens after the first; a step that brings k tokens
  after a gap g counts k gaps of g / k;
- speedup: a configuration's tokens/s / plain decoding's in the same phase; per category (Spec-Bench
  layout, lowest concurrency): plain's seconds per token / the configuration's, over the same prompts;
- mean accepted length: output tokens / target passes, COUNTING the bonus token (plain decoding: 1.0).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from spruce.evals.bench_spec import BASELINE

SLO_TTFT_S = 5.0
SLO_ITL_S = 1.0


def stats_from_proto(stats: Any) -> dict:
    """spruce.v1 ``SpeculationStats`` -> the engine's stats dict shape (the fields the report reads)."""
    return {
        "steps": stats.steps,
        "drafted": stats.draft_tokens,
        "accepted": stats.accepted_tokens,
        "drafted_by_depth": list(stats.drafted_by_depth),
        "accepted_by_depth": list(stats.accepted_by_depth),
    }


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(raw: dict, slo_ttft_s: float = SLO_TTFT_S, slo_itl_s: float = SLO_ITL_S) -> dict:
    """Per (phase, configuration) load figures, per-category speedups, and the lossless check."""
    records = raw["records"]
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["phase"], r["config"])].append(r)
    load: dict[str, dict[str, dict]] = defaultdict(dict)
    for (phase, config), rs in groups.items():
        ok = [r for r in rs if r["error"] is None]
        # rounds run one after the other: the phase's time is the sum of each round's span
        wall = 0.0
        for rnd in {r["round"] for r in rs}:
            part = [r for r in rs if r["round"] == rnd]
            wall += max(r["sent_s"] + r["e2e_s"] for r in part) - min(r["sent_s"] for r in part)
        gaps = [g for r in ok for g in r["gaps_s"]]
        ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
        e2es = [r["e2e_s"] for r in ok]
        tokens = sum(r["output_tokens"] for r in ok)
        good = [
            r for r in ok
            if r["ttft_s"] is not None and r["ttft_s"] <= slo_ttft_s and (sum(r["gaps_s"]) / max(1, len(r["gaps_s"]))) <= slo_itl_s
        ]
        steps = sum((r["stats"] or {}).get("steps", 0) for r in ok)
        drafted = sum((r["stats"] or {}).get("drafted", 0) for r in ok)
        accepted = sum((r["stats"] or {}).get("accepted", 0) for r in ok)
        load[phase][config] = {
            "requests": len(ok),
            "failed": len(rs) - len(ok),
            "output_tokens": tokens,
            "wall_s": wall,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
            "goodput_requests_per_s": len(good) / wall if wall > 0 else 0.0,
            **{f"ttft_p{q}_s": quantile(ttfts, q / 100) for q in (50, 90, 99)},
            **{f"itl_p{q}_s": quantile(gaps, q / 100) for q in (50, 90, 99)},
            **{f"e2e_p{q}_s": quantile(e2es, q / 100) for q in (50, 90, 99)},
            "mean_accepted_length": tokens / steps if steps else None,
            "acceptance_rate": accepted / drafted if drafted else None,
            "acceptance_by_depth": _by_depth(ok),
        }
    for phase, per in load.items():
        base = per.get(BASELINE)
        for entry in per.values():
            entry["speedup"] = entry["tokens_per_s"] / base["tokens_per_s"] if base and base["tokens_per_s"] else None
    return {
        "definitions": __doc__,
        "slo": {"ttft_s": slo_ttft_s, "itl_s": slo_itl_s},
        "load": dict(load),
        "categories": _categories(records),
        "lossless": _lossless(records, raw["plan"]["temperature"]),
    }


def _by_depth(records: list[dict]) -> list[float]:
    drafted: list[int] = []
    accepted: list[int] = []
    for r in records:
        s = r["stats"] or {}
        for d, (n, a) in enumerate(zip(s.get("drafted_by_depth", []), s.get("accepted_by_depth", []))):
            if d >= len(drafted):
                drafted.append(0)
                accepted.append(0)
            drafted[d] += n
            accepted[d] += a
    return [a / n if n else 0.0 for n, a in zip(drafted, accepted)]


def _lowest_phase(records: list[dict]) -> str | None:
    closed = sorted({r["phase"] for r in records if r["phase"].startswith("c=")}, key=lambda p: int(p[2:]))
    return closed[0] if closed else None


def _categories(records: list[dict]) -> dict:
    """Spec-Bench layout at the lowest concurrency: per configuration and category, speedup (plain's
    seconds per token / the configuration's, same prompts) and mean accepted length."""
    phase = _lowest_phase(records)
    acc: dict[tuple[str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for r in records:
        if r["phase"] != phase or r["error"] is not None:
            continue
        for cat in (r["category"], "overall"):
            a = acc[(r["config"], cat)]
            a["time"] += r["e2e_s"]
            a["tokens"] += r["output_tokens"]
            a["steps"] += (r["stats"] or {}).get("steps", 0)
    out: dict[str, dict] = defaultdict(dict)
    for (config, cat), a in acc.items():
        base = acc.get((BASELINE, cat))
        per_token = a["time"] / a["tokens"] if a["tokens"] else None
        base_per_token = base["time"] / base["tokens"] if base and base["tokens"] else None
        out[config][cat] = {
            "speedup": base_per_token / per_token if per_token and base_per_token else None,
            "mean_accepted_length": a["tokens"] / a["steps"] if a["steps"] else None,
        }
    return {"phase": phase, "table": dict(out)}


def _lossless(records: list[dict], temperature: float) -> dict:
    """Greedy: whether every output equals plain decoding's on the same prompt (per configuration), and
    the first prompt that differs."""
    if temperature > 0:
        return {"checked": False, "why": "sampling: outputs are exact in distribution, not per token"}
    plain = {
        (r["phase"], r["round"], r["question_id"]): r["token_ids"]
        for r in records
        if r["config"] == BASELINE and r["error"] is None and r.get("exact_ids", True)
    }
    if not plain:
        return {"checked": False, "why": "no plain-decoding run to compare with"}
    out: dict[str, Any] = {"checked": True, "configs": {}}
    for r in records:
        if r["config"] == BASELINE or r["error"] is not None:
            continue
        key = (r["phase"], r["round"], r["question_id"])
        entry = out["configs"].setdefault(r["config"], {"compared": 0, "differing": 0, "first_differing": None})
        if key not in plain or not r["stats"] or not r.get("exact_ids", True):
            continue  # HF baselines (no stats) and text protocols (no token ids) are not compared
        entry["compared"] += 1
        if r["token_ids"] != plain[key]:
            entry["differing"] += 1
            if entry["first_differing"] is None:
                entry["first_differing"] = {"question_id": r["question_id"], "phase": r["phase"]}
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown(raw: dict, summary: dict) -> str:
    plan = raw["plan"]
    lines = [
        "# spruce bench",
        "",
        f"target: {raw['target']}; {plan['num_prompts']} prompts (seed {plan['seed']}), max_tokens {plan['max_tokens']}, "
        f"temperature {plan['temperature']}, rounds {plan['rounds']} (configurations alternate within each phase)",
        "",
    ]
    if raw.get("command"):
        lines += [f"`{raw['command']}`", ""]
    if raw.get("machine"):
        lines += [f"machine: {raw['machine']}", ""]
    cats = summary["categories"]
    if cats["table"]:
        columns = sorted({c for per in cats["table"].values() for c in per if c != "overall"}) + ["overall"]
        lines += [
            f"## Speedup / mean accepted length per category ({cats['phase']})",
            "",
            "Speedup: plain decoding's seconds per token / the configuration's over the same prompts. Mean "
            "accepted length: tokens per target pass, counting the bonus token.",
            "",
            "| config | " + " | ".join(columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for config, per in cats["table"].items():
            cells = []
            for c in columns:
                e = per.get(c)
                mal = "-" if not e or e["mean_accepted_length"] is None else f"{e['mean_accepted_length']:.2f}"
                cells.append("-" if not e else f"{_x(e['speedup'])} / {mal}")
            lines.append(f"| {config} | " + " | ".join(cells) + " |")
        lines.append("")
    slo = summary["slo"]
    lines += [
        "## Load",
        "",
        f"Goodput: requests/s with TTFT <= {slo['ttft_s']} s and mean inter-token gap <= {slo['itl_s']} s.",
        "",
        "| phase | config | tok/s | vs plain | req/s | goodput | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms | e2e p50/p99 s | accepted length | acceptance by depth | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase, per in summary["load"].items():
        for config, e in per.items():
            depth = ", ".join(f"{a:.2f}" for a in e["acceptance_by_depth"][:4]) or "-"
            mal = "-" if e["mean_accepted_length"] is None else f"{e['mean_accepted_length']:.2f}"
            lines.append(
                f"| {phase} | {config} | {e['tokens_per_s']:.2f} | {_x(e['speedup'])} | {e['requests_per_s']:.3f} | "
                f"{e['goodput_requests_per_s']:.3f} | {_ms(e['ttft_p50_s'])}/{_ms(e['ttft_p90_s'])}/{_ms(e['ttft_p99_s'])} | "
                f"{_ms(e['itl_p50_s'])}/{_ms(e['itl_p90_s'])}/{_ms(e['itl_p99_s'])} | "
                f"{(e['e2e_p50_s'] or 0):.1f}/{(e['e2e_p99_s'] or 0):.1f} | {mal} | {depth} | {e['failed']} |"
            )
    lossless = summary["lossless"]
    lines += ["", "## Lossless check", ""]
    if not lossless["checked"]:
        lines.append(f"not checked: {lossless['why']}")
    else:
        for config, e in lossless["configs"].items():
            if e["compared"] == 0:
                lines.append(f"- {config}: not compared (no per-token output)")
            elif e["differing"] == 0:
                lines.append(f"- {config}: all {e['compared']} outputs equal plain decoding's")
            else:
                first = e["first_differing"]
                lines.append(
                    f"- {config}: {e['differing']} of {e['compared']} outputs differ from plain decoding's "
                    f"(first: question {first['question_id']}, {first['phase']})"
                )
    return "\n".join(lines) + "\n"


def plots(raw: dict, summary: dict, out_dir: Path) -> list[Path]:
    """Latency CDFs (inter-token gaps, per configuration, lowest and highest load), throughput against
    concurrency, acceptance by depth. Needs matplotlib (``pip install spruce[bench]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    phases = list(summary["load"])
    fig, axes = plt.subplots(1, min(2, len(phases)), figsize=(11, 4), squeeze=False)
    for ax, phase in zip(axes[0], [phases[0], phases[-1]][: axes.shape[1]]):
        for config in summary["load"][phase]:
            gaps = sorted(g for r in raw["records"] if r["phase"] == phase and r["config"] == config for g in r["gaps_s"])
            if gaps:
                ax.plot([g * 1000 for g in gaps], [(i + 1) / len(gaps) for i in range(len(gaps))], label=config)
        ax.set(title=f"inter-token latency CDF, {phase}", xlabel="ms per token", ylabel="fraction of tokens")
        ax.legend()
    written.append(_save(fig, out_dir / "latency_cdf.png"))
    closed = [p for p in phases if p.startswith("c=")]
    if closed:
        fig, ax = plt.subplots(figsize=(6, 4))
        configs = sorted({c for p in closed for c in summary["load"][p]})
        for config in configs:
            xs = [int(p[2:]) for p in closed if config in summary["load"][p]]
            ys = [summary["load"][p][config]["tokens_per_s"] for p in closed if config in summary["load"][p]]
            ax.plot(xs, ys, marker="o", label=config)
        ax.set(title="throughput vs concurrency", xlabel="concurrent requests", ylabel="output tokens/s", xscale="log", xticks=sorted({int(p[2:]) for p in closed}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend()
        written.append(_save(fig, out_dir / "throughput.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    phase = phases[0]
    for config, e in summary["load"][phase].items():
        if e["acceptance_by_depth"]:
            ax.plot(range(1, len(e["acceptance_by_depth"]) + 1), e["acceptance_by_depth"], marker="o", label=config)
    ax.set(title=f"acceptance by depth, {phase}", xlabel="tree depth", ylabel="steps accepting a node at d / reaching d", ylim=(0, 1))
    ax.legend()
    written.append(_save(fig, out_dir / "acceptance_by_depth.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
