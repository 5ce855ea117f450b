"""GPU profile: pass costs of random-weight models at realistic shapes, and the speedup they predict.

Real weights cannot travel to the device machine, and pass costs do not depend on the weights' values,
so this times models built from shapes: the target's verify pass against tokens per request and batch
size (at a given context), the draft's level pass against batch size, and the engine's own per-step
overhead (the fraction of a step's wall time the GPU is busy). Combined with an acceptance profile
measured with the real pair (a ``spruce bench`` or ``bench_spec`` report, or the engine's prior), the
cost model's plan gives a predicted speedup per batch size. It is a PREDICTION: acceptance on the GPU
equals acceptance on the CPU (same models), but the shapes stand in for the real pair.

    python -m spruce.evals.gpu_profile --out "$OUT/gpu_profile.json"      # on the device machine
    python -m spruce.evals.gpu_profile --shapes tiny --device cpu          # the code path, anywhere
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spruce.config import SamplingParams, SpeculationConfig
from spruce.costmodel import AcceptanceProfile, CostCurve, plan_tree
from spruce.stats import SpecStats

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# (target, draft) model shapes; the draft shares the target's vocabulary
SHAPES: dict[str, tuple[dict, dict]] = {
    # an 8B Llama-3-shaped target and a 0.5B Qwen2.5-shaped draft
    "8b": (
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=128256),
    ),
    # the embedded pair's shapes (Qwen2.5-Coder 1.5B / 0.5B)
    "1.5b": (
        dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    ),
    "tiny": (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=512),
    ),
}


def build(shape: dict, device: str, dtype: torch.dtype, context: int) -> PreTrainedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=max(context * 2, 4096), tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: an 8B model never exists in float32
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def _timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn`` (after one warm-up call), synchronized on CUDA."""
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def pass_costs(
    model, batches: list[int], tokens: list[int], context: int, device: str, repeats: int, kernel: str | None = None,
    graphs: bool = False,
) -> dict:
    """Seconds of one packed pass: ``batch`` requests, each ``n`` tree tokens after ``context`` cached
    ones (a chain-shaped tree; the mask's shape does not change the cost), as the engine's greedy
    verify runs it (logits stay on the device: before 2026-11-26's later stop every row's float32
    logits were copied to the host). ``kernel``: the verify pass through that tree-attention backend
    (None: SDPA per request on views of the pool); ``graphs``: replayed as CUDA graphs
    (``spruce.graphs``; each bucket captured at its first pass, before the timing)."""
    pool, slots = _random_pool(model, max(batches), context, 0.02)
    runner = _graph_runner(model, pool, kernel, max(batches) * max(tokens)) if graphs else None
    out: dict[str, dict[str, float]] = {}
    for b in batches:
        for n in tokens:
            once = _pass(model, pool, slots[:b], n, context, kernel, greedy=True, graphs=runner)
            out.setdefault(str(b), {})[str(n)] = _timed(once, device, repeats)
    if runner is not None:
        out["graph_stats"] = runner.stats()  # type: ignore[assignment]
    return out


def _graph_runner(model, pool, kernel: str | None, rows: int):
    from spruce.graphs import GraphedPasses

    if kernel is None:
        raise ValueError("CUDA graphs replay tree-kernel passes: give a kernel")
    return GraphedPasses(model, pool, kernel, max_rows=rows)


def _random_pool(model, slots: int, context: int, std: float):
    """The model switched to packed passes, and a KV pool of ``slots`` slots whose every position holds
    random keys and values (``std``): ``context`` cached tokens per request stand in for real ones. One
    more slots stay free (the graph passes' scratch slots: ``graph_agreement`` runs two runners)."""
    from spruce.attention import use_backend
    from spruce.kvcache import TREE_RESERVE, SlotKVCache

    use_backend(model, "sdpa")
    pool = SlotKVCache(model, slots + 2, context + TREE_RESERVE)
    for layer in (*pool.keys, *pool.values):
        layer.normal_(0, std)
    return pool, [pool.allocate() for _ in range(slots)]


def _pass(model, pool, slots: list[int], n: int, context: int, kernel: str | None, greedy: bool = False, graphs=None, seed: int | None = None):
    """A callable running one verify pass of ``n`` chain tokens per slot after ``context`` positions;
    returns the logits (float32, host), or with ``greedy`` what the engine's greedy verify takes: each
    row's argmax, computed where the logits are (only token ids reach the host). ``graphs``: a
    ``GraphedPasses`` over ``pool`` runs it."""
    from spruce.kvcache import Segment, run_packed

    gen = torch.Generator().manual_seed(n if seed is None else seed)
    chain = torch.ones(n, n, dtype=torch.bool).tril()
    segments = [
        Segment(s, torch.randint(0, 256, (n,), generator=gen), torch.arange(context, context + n), tail=chain if n > 1 else None)
        for s in slots
    ]

    def once() -> list[torch.Tensor]:
        for s in slots:
            pool.lengths[s] = context
        rows = graphs.run(segments) if graphs is not None else None
        if rows is None:
            if graphs is not None:
                raise RuntimeError(f"the graph path refused this pass: {graphs.stats()}")
            rows = run_packed(model, pool, segments, kernel, device_logits=True)
        if greedy:
            return [r.argmax(-1).cpu() for r in rows]
        return [r.float().cpu() for r in rows]

    return once


def graph_agreement(model, batch: int, n: int, context: int, kernel: str) -> dict:
    """Replays of a captured pass against the same pass on the same static buffers without capture
    (``capture=False``: must agree bit for bit), and against the eager packed pass through the kernel
    (bf16 rounding apart: other row counts and key splits), for passes with other tokens and other
    context lengths than the captured one (the replay must read its new metadata)."""
    from spruce.graphs import GraphedPasses

    pool, slots = _random_pool(model, batch, context, 0.5)
    graphs = GraphedPasses(model, pool, kernel)
    twin = GraphedPasses(model, pool, kernel, capture=False)
    out = []
    # the last two share a bucket: the third pass replays the graph the second captured, on new metadata
    for seed, ctx in ((1, context), (2, context - context // 16), (3, context - context // 4)):
        eager = _pass(model, pool, slots, n, ctx, kernel, seed=seed)()
        replay = _pass(model, pool, slots, n, ctx, kernel, graphs=graphs, seed=seed)()
        static = _pass(model, pool, slots, n, ctx, kernel, graphs=twin, seed=seed)()
        out.append({
            "context": ctx,
            "replay_vs_static_max_abs": max(float((g - w).abs().max()) for g, w in zip(replay, static)),
            "replay_vs_eager_max_abs": max(float((g - w).abs().max()) for g, w in zip(replay, eager)),
            "same_argmax_vs_eager": sum(int((g.argmax(-1) == w.argmax(-1)).sum()) for g, w in zip(replay, eager)),
            "rows": batch * n,
            "max_abs_logit": max(float(w.abs().max()) for w in eager),
        })
    return {"batch": batch, "tokens": n, "passes": out, "graph_stats": graphs.stats()}


def engine_graphs(target, draft, batch: int, max_tokens: int, context: int) -> dict:
    """The engine end to end with its verify and decode passes as CUDA graphs, beside the same engine
    without: greedy outputs (random-weight bf16 models: near-tie logits can flip where the two paths
    round differently) and wall time of the same requests, plain and with a fixed tree."""
    from spruce.evals.tiny import byte_tokenizer

    from spruce.config import EngineConfig
    from spruce.engine import Engine

    spec = SpeculationConfig(depth=3, top_k=2, budget=6)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    prompts = [[10 + i, 11, 12, 13] for i in range(batch)]
    out: dict[str, Any] = {"batch": batch, "max_tokens": max_tokens}
    tokens = {}
    for mode in ("off", "on"):
        engine = Engine(target, byte_tokenizer(), draft, EngineConfig(max_batch_size=batch, max_seq_len=context, attention_backend="triton", cuda_graphs=mode))
        for name, sp in (("plain", None), ("tree", spec)):
            # warm-up: the same requests once (with graphs, their buckets are captured here, not timed)
            engine.generate(prompts, params, sp)
            t0 = time.perf_counter()
            outs = engine.generate(prompts, params, sp)
            out[f"{name}_graphs_{mode}_s"] = time.perf_counter() - t0
            tokens[(name, mode)] = [o.token_ids for o in outs]
        out[f"graphs_{mode}_stats"] = engine.graphs.stats() if engine.graphs is not None else None
        out[f"draft_graphs_{mode}_stats"] = engine.speculation_telemetry()["draft_cuda_graphs"]
        out[f"graphs_{mode}_backend"] = engine.attention_backend
        del engine
    for name in ("plain", "tree"):
        a, b = tokens[(name, "off")], tokens[(name, "on")]
        out[f"{name}_same_tokens"] = _same_tokens(a, b)
    out["tokens_per_run"] = sum(len(t) for t in tokens[("plain", "off")])
    out["tree_vs_plain_same_tokens_graphs_on"] = _same_tokens(tokens[("tree", "on")], tokens[("plain", "on")])
    return out


def _same_tokens(a: list[list[int]], b: list[list[int]]) -> int:
    """Positions at which two runs' outputs (request by request) hold the same token."""
    return sum(x == y for p, q in zip(a, b) for x, y in zip(p, q))


def engine_lossless(shapes: str, device: str, batches: list[int], max_tokens: int, context: int) -> dict:
    """The engine on the GPU in float32 against its plain SDPA twin: greedy tokens of plain decoding
    with graphs, of a fixed tree and of the default (adaptive) plan, with a random draft (acceptance near
    0: every step is a rejection) and with a copy of the target as its draft (acceptance near 1: every
    step commits whole paths through the graphs), with and without graphs. float32 with full-precision
    dots on both sides, so any token that differs is a bug, not rounding (unless two logits tie to
    1e-5, which random-weight models make rare)."""
    import copy

    from spruce.evals.tiny import byte_tokenizer

    from spruce.config import EngineConfig
    from spruce.engine import DEFAULT, Engine

    target_shape, draft_shape = SHAPES[shapes]
    target = build(target_shape, device, torch.float32, context)
    drafts = {"random_draft": build(draft_shape, device, torch.float32, context), "target_copy": copy.deepcopy(target)}
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    tree = SpeculationConfig(depth=4, top_k=2, budget=8)
    out: dict[str, Any] = {"shapes": shapes, "dtype": "float32", "max_tokens": max_tokens, "runs": []}
    for batch in batches:
        prompts = [[10 + i, 11, 12, 13, 10 + i] for i in range(batch)]
        ref_engine = Engine(target, byte_tokenizer(), None, EngineConfig(max_batch_size=batch, max_seq_len=context, attention_backend="sdpa", cuda_graphs="off"))
        want = [o.token_ids for o in ref_engine.generate(prompts, params, None)]
        del ref_engine
        for draft_name, draft in drafts.items():
            for graphs in ("on", "off"):
                engine = Engine(target, byte_tokenizer(), draft, EngineConfig(max_batch_size=batch, max_seq_len=context, attention_backend="triton", cuda_graphs=graphs))
                for name, spec in (("plain", None), ("tree", tree), ("default", DEFAULT)):
                    if draft_name == "target_copy" and name == "plain":
                        continue  # plain decoding does not read the draft
                    outs = engine.generate(prompts, params, spec)
                    got = [o.token_ids for o in outs]
                    out["runs"].append({
                        "batch": batch, "draft": draft_name, "cuda_graphs": graphs, "speculation": name,
                        "same_tokens": _same_tokens(got, want),
                        "tokens": sum(len(t) for t in want),
                        "identical_requests": sum(p == q for p, q in zip(got, want)),
                        "drafted": sum(o.stats.drafted for o in outs), "accepted": sum(o.stats.accepted for o in outs),
                        "steps": max(o.stats.steps for o in outs),
                    })
                tel = engine.speculation_telemetry()
                out["runs"][-1]["graph_failures"] = [(tel["cuda_graphs"] or {}).get("failures"), (tel["draft_cuda_graphs"] or {}).get("failures")]
                del engine
    out["all_identical"] = all(r["same_tokens"] == r["tokens"] for r in out["runs"])
    return out


def engine_speed(target, draft, batches: list[int], max_tokens: int, context: int, rounds: int) -> dict:
    """The engine with CUDA graphs (both models' passes): plain decoding, a fixed tree and the default
    (adaptive) plan on the same requests, alternating within each round; wall time, steps, and the
    draft's and the target's share of it. With random weights the draft agrees with the target about
    never: the tree rows measure what a step costs, the default row whether the adaptive plan finds that
    speculation does not pay (it must not be slower than plain). The n-gram row drafts from the text
    itself, with the acceptance the random target's output gives it. ``tree_host_rows``: the fixed tree
    with the drafter's reference path (every frontier's whole logits rows to the host), against its
    top-k children chosen on the device. ``*_draft_pass_s``: the draft's passes alone (synchronized
    after each), the rest of ``*_draft_s`` being host work between them."""
    from spruce.evals.tiny import byte_tokenizer

    from spruce.config import EngineConfig
    from spruce.engine import DEFAULT, Engine

    tree = SpeculationConfig(depth=4, top_k=2, budget=8)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    rows = []
    for batch in batches:
        engine = Engine(target, byte_tokenizer(), draft, EngineConfig(max_batch_size=batch, max_seq_len=context, attention_backend="triton", cuda_graphs="auto"))
        drafter = engine.drafter
        assert drafter is not None
        pass_s = [0.0]
        forward = drafter.forward

        def timed_forward(segments, forward=forward, pass_s=pass_s):
            t0 = time.perf_counter()
            out = forward(segments)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            pass_s[0] += time.perf_counter() - t0
            return out

        drafter.forward = timed_forward  # type: ignore[method-assign]
        prompts = [[10 + i, 11, 12, 13] for i in range(batch)]
        # n-gram drafting needs no draft model: its acceptance is that of the random target's own
        # (repetitive) greedy text, a real one, unlike the random draft's
        configs = (
            ("plain", None, False),
            ("tree", tree, False),
            ("tree_host_rows", tree, True),
            ("default", DEFAULT, False),
            ("ngram", SpeculationConfig(drafter="ngram", ngram_budget=8), False),
        )

        for _, spec, host_rows in configs:  # warm-up: captures, calibration
            drafter.host_rows = host_rows
            engine.generate(prompts, params, spec)
        row: dict[str, Any] = {"batch": batch, "max_tokens": max_tokens, "cuda_graphs": engine.graphs is not None}
        for r in range(rounds):
            for name, spec, host_rows in configs:
                drafter.host_rows = host_rows
                pass_s[0] = 0.0
                t0 = time.perf_counter()
                outs = engine.generate(prompts, params, spec)
                wall = time.perf_counter() - t0
                row.setdefault(f"{name}_s", []).append(wall)
                total = SpecStats()
                for o in outs:
                    total.merge(o.stats)
                row[f"{name}_steps"] = max(o.stats.steps for o in outs)
                row[f"{name}_accepted_per_step"] = total.accepted / max(1, total.steps)
                row[f"{name}_draft_s"] = sum(o.stats.draft_time_s for o in outs) / batch
                row[f"{name}_draft_pass_s"] = pass_s[0]
                row[f"{name}_verify_s"] = sum(o.stats.verify_time_s for o in outs) / batch
                row[f"{name}_planned_budgets"] = total.steps_by_planned_budget
        drafter.host_rows = False
        for name in ("tree", "tree_host_rows", "default", "ngram"):
            row[f"{name}_vs_plain"] = [p / x for p, x in zip(row["plain_s"], row[f"{name}_s"])]
            row[f"{name}_step_vs_plain_step"] = (min(row[f"{name}_s"]) / row[f"{name}_steps"]) / (min(row["plain_s"]) / row["plain_steps"])
        row["tree_vs_tree_host_rows"] = [h / x for h, x in zip(row["tree_host_rows_s"], row["tree_s"])]
        tel = engine.speculation_telemetry()
        row["graphs"] = tel["cuda_graphs"]
        row["draft_graphs"] = tel["draft_cuda_graphs"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del engine
    return {"rows": rows}


def step_profile(target, draft, batches: list[int], max_tokens: int, context: int, rows: int = 25) -> dict:
    """torch.profiler over one warm fixed-tree run per batch size (CUDA graphs on): the operators with the
    most host time and the most device time, as tables. Says where a step's time goes when the device
    waits for the host (a graphed draft level on a GPU)."""
    from spruce.evals.tiny import byte_tokenizer
    from torch.profiler import ProfilerActivity, profile

    from spruce.config import EngineConfig
    from spruce.engine import Engine

    tree = SpeculationConfig(depth=4, top_k=2, budget=8)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    out: dict[str, Any] = {}
    for batch in batches:
        engine = Engine(target, byte_tokenizer(), draft, EngineConfig(max_batch_size=batch, max_seq_len=context, attention_backend="triton", cuda_graphs="auto"))
        prompts = [[10 + i, 11, 12, 13] for i in range(batch)]
        engine.generate(prompts, params, tree)  # warm-up: captures
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            outs = engine.generate(prompts, params, tree)
            wall = time.perf_counter() - t0
        averages = prof.key_averages()
        steps = max(o.stats.steps for o in outs)
        # the same run under cProfile: host time by Python function (the operator tables above do not
        # see the Python between operators)
        py = cProfile.Profile()
        py.enable()
        engine.generate(prompts, params, tree)
        py.disable()
        text = io.StringIO()
        pstats.Stats(py, stream=text).strip_dirs().sort_stats("tottime").print_stats(rows)
        out[str(batch)] = {
            "wall_s": wall,
            "steps": steps,
            "by_host_time": averages.table(sort_by="self_cpu_time_total", row_limit=rows),
            "by_device_time": averages.table(sort_by="self_cuda_time_total", row_limit=rows) if torch.cuda.is_available() else "",
            "python_by_tottime": text.getvalue(),
        }
        print(f"== B={batch}: {wall / steps * 1e3:.1f} ms per step (profiled)\n{out[str(batch)]['by_host_time']}", flush=True)
        del engine
    return out


def kernel_agreement(model, batch: int, n: int, context: int, kernel: str) -> dict:
    """Max abs difference of the verify logits through ``kernel`` and through SDPA on the same pool and
    tokens (bf16 models: rounding-level differences are expected, not 0)."""
    pool, slots = _random_pool(model, batch, context, 0.5)
    slots = slots[::-1]
    want = _pass(model, pool, slots, n, context, None)()
    got = _pass(model, pool, slots, n, context, kernel)()
    diff = max(float((g - w).abs().max()) for g, w in zip(got, want))
    same_argmax = sum(int((g.argmax(-1) == w.argmax(-1)).sum()) for g, w in zip(got, want))
    scale = max(float(w.abs().max()) for w in want)
    return {"batch": batch, "tokens": n, "kernel": kernel, "max_abs_logit_diff": diff, "max_abs_logit": scale,
            "same_argmax": same_argmax, "rows": batch * n}


def step_overhead(target, draft, batch: int, max_tokens: int, context: int) -> dict:
    """Run the engine (fixed tree) over ``batch`` requests: wall time per step against the time of its
    passes, i.e. the share of a step the device is busy with the models."""
    from spruce.evals.tiny import byte_tokenizer

    from spruce.config import EngineConfig
    from spruce.engine import Engine

    engine = Engine(target, byte_tokenizer(), draft, EngineConfig(max_batch_size=batch, max_seq_len=context, cuda_graphs="off"))
    spec = SpeculationConfig(depth=3, top_k=2, budget=6)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True), spec)  # warm-up
    hooks = []
    for model in (target, draft):
        hooks.append(model.register_forward_pre_hook(lambda m, a: _mark("start", m)))
        hooks.append(model.register_forward_hook(lambda m, a, o: _mark("end", m)))
    _MARKS.clear()
    t0 = time.perf_counter()
    outs = engine.generate([[10 + i, 11, 12, 13] for i in range(batch)], params, spec)
    wall = time.perf_counter() - t0
    for hook in hooks:
        hook.remove()
    busy = sum(end - start for start, end in _pairs())
    steps = max(o.stats.steps for o in outs)
    return {"batch": batch, "attention_backend": engine.attention_backend, "steps": steps, "wall_s_per_step": wall / steps, "model_s_per_step": busy / steps, "busy_fraction": busy / wall}


_MARKS: list[tuple[str, float]] = []


def _mark(kind: str, module) -> None:
    if next(module.parameters()).is_cuda:
        torch.cuda.synchronize()
    _MARKS.append((kind, time.perf_counter()))


def _pairs():
    start = None
    for kind, t in _MARKS:
        if kind == "start":
            start = t
        elif start is not None:
            yield start, t
            start = None


def predict(rates: torch.Tensor, verify: dict, draft: dict, batches: list[int], budget: int, depth: int) -> dict:
    """Per batch size: the cost model's plan on these curves, and its expected speedup over plain decoding."""
    out = {}
    for b in batches:
        v, d = CostCurve(), CostCurve()
        for n, s in verify[str(b)].items():
            v.observe(int(n), s)
        d1 = draft[str(b)]["1"]
        for levels in range(1, depth + 1):
            d.observe(levels, levels * d1)
        plan = plan_tree(rates, v, d, budget, depth)
        out[str(b)] = {
            "plan_budget": plan.budget,
            "plan_depth": plan.depth,
            "expected_tokens_per_step": plan.expected_tokens,
            "expected_step_s": plan.expected_step_s,
            "predicted_speedup": plan.tokens_per_s * v(1),
        }
    return out


def rates_from(path: str | None) -> tuple[torch.Tensor, str]:
    """The acceptance rates by depth x rank in a report's telemetry, or the engine's prior."""
    profile = AcceptanceProfile()
    if path is None:
        return profile.rates(), "the engine's prior (no report given)"
    report = json.loads(Path(path).read_text())
    tel = report.get("telemetry") or report.get("engine_telemetry") or {}
    data = tel.get("acceptance_profile", {})
    tried, accepted = data.get("tried_by_depth_rank"), data.get("accepted_by_depth_rank")
    if tried is None or accepted is None:
        raise SystemExit(f"{path}: no acceptance profile in its telemetry")
    for mine, theirs in ((profile.tried, tried), (profile.accepted, accepted)):
        t = torch.tensor(theirs, dtype=torch.float64).reshape(len(theirs), -1)
        rows, cols = min(t.shape[0], mine.shape[0]), min(t.shape[1], mine.shape[1])
        mine[:rows, :cols] += t[:rows, :cols]
    return profile.rates(), path


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The report, section by section; each finished section is printed (and written to ``--out``) at
    once, and a section that raises is recorded with its error, so a cut-off or failing run on a lent GPU
    still returns what it measured."""
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    target_shape, draft_shape = SHAPES[args.shapes]
    torch.manual_seed(0)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "shapes": args.shapes,
        "dtype": args.dtype,
        "context": args.context,
        "note": "PREDICTION: random-weight models at these shapes; acceptance from acceptance_source",
    }

    def section(name: str, fn) -> Any:
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as exc:  # noqa: BLE001 - recorded; the other sections still run
            traceback.print_exc()
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({name: report[name], "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        return report[name]

    target = build(target_shape, args.device, dtype, args.context)
    draft = build(draft_shape, args.device, dtype, args.context)
    if args.graphs_only:
        return _graphs_only(args, target, draft, section, report)
    if args.engine_checks:
        if args.lossless:
            section("engine_lossless_float32", lambda: engine_lossless(args.lossless_shapes, args.device, args.lossless_batches, min(32, args.overhead_tokens), 512))
        section("engine_speed", lambda: engine_speed(target, draft, args.overhead_batches, args.overhead_tokens, args.context, args.engine_rounds))
        if args.step_profile:
            section("step_profile", lambda: step_profile(target, draft, sorted({args.overhead_batches[0], args.overhead_batches[-1]}), args.overhead_tokens, args.context))
        return report
    if args.engine_only:
        section("engine_graphs", lambda: [engine_graphs(target, draft, b, args.overhead_tokens, args.context) for b in args.overhead_batches])
        return report
    verify = section("verify_s_by_batch_and_tokens", lambda: pass_costs(target, args.batches, args.tokens, args.context, args.device, args.repeats))
    draft_costs = section("draft_level_s_by_batch_and_tokens", lambda: pass_costs(draft, args.batches, [1, 4], args.context, args.device, args.repeats))
    kernels = [k for k in args.kernels if k != "sdpa"]
    by_kernel = {"sdpa": verify}
    # the engine runs both models through the chosen backend: each kernel's prediction pairs its verify
    # curve with its own draft level (until 2026-11-26's last GPU call, every prediction used SDPA's)
    draft_by_kernel = {"sdpa": draft_costs}
    for kernel in kernels:
        by_kernel[kernel] = section(
            f"verify_{kernel}_s_by_batch_and_tokens",
            lambda kernel=kernel: pass_costs(target, args.batches, args.tokens, args.context, args.device, args.repeats, kernel),
        )
        draft_by_kernel[kernel] = section(
            f"draft_level_{kernel}_s_by_batch_and_tokens",
            lambda kernel=kernel: pass_costs(draft, args.batches, [1, 4], args.context, args.device, args.repeats, kernel),
        )
        section(f"{kernel}_vs_sdpa_logits", lambda kernel=kernel: kernel_agreement(target, min(4, max(args.batches)), 8, args.context, kernel))
    if args.graphs and "triton" in kernels:
        section("graph_vs_eager_logits", lambda: graph_agreement(target, min(4, max(args.batches)), 8, args.context, "triton"))
        by_kernel["triton_graph"] = section(
            "verify_triton_graph_s_by_batch_and_tokens",
            lambda: pass_costs(target, args.batches, args.tokens, args.context, args.device, args.repeats, "triton", graphs=True),
        )
        # what a graphed draft level would cost (the drafter's own level passes are not graphed yet:
        # its levels are no tree-kernel passes); the engine as it stands pairs graphed verify passes
        # with the eager draft level ("triton_graph_verify_only")
        draft_by_kernel["triton_graph"] = section(
            "draft_level_triton_graph_s_by_batch_and_tokens",
            lambda: pass_costs(draft, args.batches, [1, 4], args.context, args.device, args.repeats, "triton", graphs=True),
        )
        if "error" not in by_kernel["triton_graph"]:
            by_kernel["triton_graph_verify_only"] = by_kernel["triton_graph"]
            draft_by_kernel["triton_graph_verify_only"] = draft_by_kernel.get("triton", {"error": "no eager triton draft curve"})
        section("engine_graphs", lambda: [engine_graphs(target, draft, b, args.overhead_tokens, args.context) for b in args.overhead_batches])
    rates, source = rates_from(args.acceptance_from)
    report["acceptance_source"] = source
    section("step_overhead", lambda: [step_overhead(target, draft, b, args.overhead_tokens, args.context) for b in args.overhead_batches])
    section("prediction", lambda: {
        kernel: predict(rates, curve, draft_by_kernel[kernel], args.batches, args.budget, args.depth)
        for kernel, curve in by_kernel.items() if "error" not in curve and "error" not in draft_by_kernel[kernel]
    })
    return report


def _graphs_only(args: argparse.Namespace, target, draft, section, report: dict) -> dict:
    """The Triton kernel's passes eager and as CUDA graphs, side by side, and the predictions on them."""
    verify = {
        "triton": section("verify_triton_s_by_batch_and_tokens", lambda: pass_costs(target, args.batches, args.tokens, args.context, args.device, args.repeats, "triton")),
        "triton_graph": section("verify_triton_graph_s_by_batch_and_tokens", lambda: pass_costs(
            target, args.batches, args.tokens, args.context, args.device, args.repeats, "triton", graphs=True)),
    }
    draft_levels = {
        "triton": section("draft_level_triton_s_by_batch_and_tokens", lambda: pass_costs(draft, args.batches, [1, 4], args.context, args.device, args.repeats, "triton")),
        "triton_graph": section("draft_level_triton_graph_s_by_batch_and_tokens", lambda: pass_costs(
            draft, args.batches, [1, 4], args.context, args.device, args.repeats, "triton", graphs=True)),
    }
    verify["triton_graph_verify_only"], draft_levels["triton_graph_verify_only"] = verify["triton_graph"], draft_levels["triton"]
    rates, source = rates_from(args.acceptance_from)
    report["acceptance_source"] = source
    section("prediction", lambda: {
        name: predict(rates, curve, draft_levels[name], args.batches, args.budget, args.depth)
        for name, curve in verify.items() if "error" not in curve and "error" not in draft_levels[name]
    })
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kernels", nargs="+", default=["sdpa", "triton"], help="verify-pass attention paths to time (sdpa always)")
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True, help="also time the passes as CUDA graphs (spruce.graphs)")
    p.add_argument("--graphs-only", action="store_true", help="only the Triton passes, eager and as CUDA graphs, and their predictions")
    p.add_argument("--engine-only", action="store_true", help="only the engine with and without CUDA graphs")
    p.add_argument("--engine-checks", action="store_true",
                   help="only the engine: float32 greedy outputs against plain SDPA decoding (graphs, trees, both drafts), then plain/tree/default timed with graphs")
    p.add_argument("--lossless-shapes", default="1.5b", choices=sorted(SHAPES))
    p.add_argument("--lossless-batches", type=int, nargs="+", default=[1, 8], help="with --engine-checks: batch sizes of the float32 output checks")
    p.add_argument("--engine-rounds", type=int, default=2, help="with --engine-checks: timed rounds of each configuration")
    p.add_argument("--lossless", action=argparse.BooleanOptionalAction, default=True, help="with --engine-checks: the float32 output checks")
    p.add_argument("--step-profile", action="store_true", help="with --engine-checks: torch.profiler tables of a fixed-tree run")
    p.add_argument("--overhead-batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--overhead-tokens", type=int, default=32)
    p.add_argument("--budget", type=int, default=64)
    p.add_argument("--depth", type=int, default=10)
    p.add_argument("--acceptance-from", help="a report JSON with the real pair's acceptance profile")
    p.add_argument("--out", help="write the JSON report here")
    args = p.parse_args(argv)
    report = run(args)
    print(json.dumps(report.get("prediction"), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
