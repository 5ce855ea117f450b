"""Microbenchmark: F.linear vs the small-rows path on CPU, by row count and dtype (median of repeats);
with ``--int8``, bfloat16 F.linear vs int8 weights (``spruce.kernels.cpu_int8``) with cache-cold weights;
with ``--onednn``, float32 F.linear vs the small-rows path vs oneDNN with prepacked weights, cache-cold;
with ``--w8a8``, float32 rows through int8 weights (the weight-only kernel) vs int8 weights and
activations (fbgemm), cache-cold; with ``--w8a8-levels``, whole draft levels of the embedded draft loaded
both ways (``--draft-dtype int8`` and ``w8a8``), alternating;
with ``--model target|draft``, one forward of T tokens after a 300-token prefix through the embedded
model in float32, by linear path (its layers switched in place between timings).

    python -m spruce.kernels.bench_cpu_linear [--out-features 4864] [--in-features 896] [--int8 | --onednn]
    python -m spruce.kernels.bench_cpu_linear --model target
    python -m spruce.kernels.bench_cpu_linear --w8a8 --out-features 151936
    python -m spruce.kernels.bench_cpu_linear --w8a8-levels

Prints one Markdown table; the figures measured on the development machine are in kernels/NOTES.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from spruce.kernels.cpu_linear import median_seconds, small_rows_linear

ROWS = (1, 2, 3, 4, 8, 16, 32)


def median_ms(fn, repeats: int = 30) -> float:
    return median_seconds(fn, repeats) * 1e3


def int8_table(out_features: int, in_features: int, weights_mb: int = 400) -> None:
    """bfloat16 ``F.linear`` against ``int8_linear`` by rows, each call on the next of enough distinct
    weights to fill ``weights_mb`` (as in a model's forward: weights come from memory, not cache)."""
    from spruce.kernels.cpu_int8 import INT8_ROWS_MAX, int8_linear, quantize_int8

    count = max(2, weights_mb * 2**20 // (2 * out_features * in_features))
    ws = [torch.randn(out_features, in_features, dtype=torch.bfloat16) for _ in range(count)]
    qs = [quantize_int8(w) for w in ws]
    print(f"| rows | bf16 F.linear ms | int8 ms | int8 kernel used | bf16 GB/s |  ({count} weights cycled)")
    print("|---|---|---|---|---|")
    for rows in (1, 2, 4, 8, 16):
        x = torch.randn(rows, in_features, dtype=torch.bfloat16)
        ref = median_ms(lambda x=x: [F.linear(x, w) for w in ws], repeats=7) / count
        fast = median_ms(lambda x=x: [int8_linear(x, q, s, None) for q, s in qs], repeats=7) / count
        gbs = 2 * out_features * in_features / (ref * 1e-3) / 1e9
        print(f"| {rows} | {ref:.3f} | {fast:.3f} | {rows <= INT8_ROWS_MAX} | {gbs:.1f} |")


def w8a8_table(out_features: int, in_features: int, weights_mb: int = 256) -> None:
    """float32 rows through ``int8_linear`` (weight-only: the kernel in bfloat16 up to its row limit) and
    through ``w8a8_linear`` (unit smoothing), by rows, cycling distinct weights as ``int8_table`` does;
    with each path's relative error from the float product on the last weight."""
    from spruce.kernels.cpu_int8 import int8_linear, quantize_int8, w8a8_available, w8a8_linear, w8a8_pack

    if not w8a8_available():
        raise SystemExit("no fbgemm dynamic linear here: nothing to compare")
    count = max(2, weights_mb * 2**20 // (out_features * in_features))
    ws = [torch.randn(out_features, in_features) * 0.02 for _ in range(count)]
    qs = [quantize_int8(w, torch.bfloat16) for w in ws]
    w8 = [w8a8_pack(w, None, torch.ones(in_features)) for w in ws]
    print(f"| rows | int8 weights ms | w8a8 ms | error int8 / w8a8 |  ({count} weights cycled)")
    print("|---|---|---|---|")
    for rows in (1, 2, 4, 8, 16, 32):
        x = torch.randn(rows, in_features)
        weight_only = median_ms(lambda x=x: [int8_linear(x, q, s, None) for q, s in qs], repeats=7) / count
        both = median_ms(lambda x=x: [w8a8_linear(x, w) for w in w8], repeats=7) / count
        exact = x @ ws[-1].t()

        def rel(out: torch.Tensor, exact: torch.Tensor = exact) -> float:
            return float((out - exact).norm() / exact.norm())

        errors = f"{rel(int8_linear(x, *qs[-1], None)):.4f} / {rel(w8a8_linear(x, w8[-1])):.4f}"
        print(f"| {rows} | {weight_only:.3f} | {both:.3f} | {errors} |", flush=True)


def w8a8_levels(prefix: int = 300, sizes: tuple[int, ...] = (1, 2, 4, 8), repeats: int = 9) -> None:
    """Whole passes of T tokens after a ``prefix``-token prompt through the embedded draft loaded as an
    int8 draft, as a w8a8 one with a product per layer and as a w8a8 one whose layers reading the same
    norm output share one product (the default; float32 activations), alternating, median of
    ``repeats``; each w8a8 draft's argmax agreement with the int8 one on the last pass."""
    from transformers import DynamicCache

    from spruce.models import load_causal_lm, resolve_model_dir

    cpu = torch.device("cpu")
    draft_dir = resolve_model_dir(None, "draft")
    models = {
        "int8": load_causal_lm(draft_dir, torch.float32, cpu, int8_weights=True),
        "w8a8 per layer": load_causal_lm(draft_dir, torch.float32, cpu, int8_weights=True, int8_activations=True, shared_inputs=False),
        "w8a8 shared": load_causal_lm(draft_dir, torch.float32, cpu, int8_weights=True, int8_activations=True),
    }
    gen = torch.Generator().manual_seed(0)
    vocab = next(iter(models.values())).config.vocab_size
    prompt = torch.randint(0, min(vocab, 32768), (1, prefix), generator=gen)
    caches = {}
    with torch.inference_mode():
        for name, model in models.items():
            caches[name] = DynamicCache()
            model(prompt, past_key_values=caches[name], use_cache=True)
        print("| T | " + " | ".join(f"{name} ms" for name in models) + " | shared / per layer | agreement with int8, per layer / shared |")
        print("|---|" + "---|" * (len(models) + 2))
        for t in sizes:
            times: dict[str, list[float]] = {name: [] for name in models}
            logits = {}
            for _ in range(repeats):
                ids = torch.randint(0, min(vocab, 32768), (1, t), generator=gen)
                for name, model in models.items():
                    start = time.perf_counter()
                    logits[name] = model(ids, past_key_values=caches[name], use_cache=True).logits
                    times[name].append((time.perf_counter() - start) * 1e3)
                    caches[name].crop(-t)
            ms = {name: statistics.median(v) for name, v in times.items()}
            agree = [float((logits[name].argmax(-1) == logits["int8"].argmax(-1)).float().mean()) for name in ("w8a8 per layer", "w8a8 shared")]
            cells = " | ".join(f"{v:.1f}" for v in ms.values())
            ratio = ms["w8a8 shared"] / ms["w8a8 per layer"]
            print(f"| {t} | {cells} | {ratio:.2f} | {agree[0]:.2f} / {agree[1]:.2f} |", flush=True)


def onednn_table(out_features: int, in_features: int, weights_mb: int = 400) -> None:
    """float32 ``F.linear``, ``small_rows_linear`` and ``onednn_linear`` (prepacked) by rows, each call on
    the next of enough distinct weights to fill ``weights_mb``."""
    from spruce.kernels.cpu_linear import onednn_linear, onednn_pack

    count = max(2, weights_mb * 2**20 // (4 * out_features * in_features))
    ws = [torch.randn(out_features, in_features) for _ in range(count)]
    packed = [onednn_pack(w) for w in ws]
    print(f"| rows | F.linear ms | small-rows ms | oneDNN packed ms | oneDNN GB/s |  ({count} weights cycled)")
    print("|---|---|---|---|---|")
    for rows in (1, 2, 3, 4, 5, 6, 8, 12, 16, 32):
        x = torch.randn(rows, in_features)
        ref = median_ms(lambda x=x: [F.linear(x, w) for w in ws], repeats=7) / count
        small = median_ms(lambda x=x: [small_rows_linear(x, w, None) for w in ws], repeats=7) / count
        fast = median_ms(lambda x=x: [onednn_linear(x, p, None) for p in packed], repeats=7) / count
        gbs = 4 * out_features * in_features / (fast * 1e-3) / 1e9
        print(f"| {rows} | {ref:.3f} | {small:.3f} | {fast:.3f} | {gbs:.1f} |")


def model_table(
    role: str, dtype: torch.dtype, prefix: int = 300, sizes: tuple[int, ...] = (1, 2, 3, 4, 8, 16, 32)
) -> None:
    """One forward of T new tokens after a ``prefix``-token prompt through the embedded ``role`` model in
    ``dtype``, by linear path (switched in place, alternating, median of 3), with the largest logit
    difference from ``F.linear``'s. Holds every path's weights at once (2-3.5x the model)."""
    import copy

    from spruce.kernels.cpu_linear import onednn_linear, onednn_linear_available, onednn_pack
    from transformers import AutoModelForCausalLM

    from spruce.models import resolve_model_dir

    if not onednn_linear_available(dtype):
        raise SystemExit("torch has no working oneDNN matmul here: nothing to compare")
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_dir(None, role), dtype=dtype, attn_implementation="sdpa", local_files_only=True
    ).eval()
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear]
    packed = {id(m): onednn_pack(m.weight) for m in layers}
    paths = {
        "F.linear": lambda m: (lambda x: F.linear(x, m.weight, m.bias)),
        "small-rows": lambda m: (lambda x: small_rows_linear(x, m.weight, m.bias)),
        "oneDNN packed": lambda m: (lambda x: onednn_linear(x, packed[id(m)], m.bias)),
    }
    from spruce.kernels.cpu_int8 import int8_linear, quantize_int8

    # int8 weights, as an int8 draft holds them (scales in bfloat16, the kernel's dtype; float32 rows are
    # rounded to bfloat16 for it), the prepacked float weight above 4 rows
    quantized = {id(m): quantize_int8(m.weight, torch.bfloat16) for m in layers}
    paths["int8 (oneDNN above 4 rows)"] = lambda m: (
        lambda x: int8_linear(x, *quantized[id(m)], m.bias, packed[id(m)])
    )
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    print(f"| T | {' | '.join(f'{name} ms' for name in paths)} | max logit diff oneDNN vs F.linear |")
    print("|---|" + "---|" * (len(paths) + 1))
    with torch.inference_mode():
        cache = model(torch.randint(0, vocab, (1, prefix), generator=gen), use_cache=True).past_key_values
        for make in paths.values():  # first calls build kernels: one untimed pass per path and size
            for m in layers:
                m.forward = make(m)  # type: ignore[method-assign]
            for t in sizes:
                model(torch.randint(0, vocab, (1, t), generator=gen), past_key_values=copy.deepcopy(cache))
        for t in sizes:
            ids = torch.randint(0, vocab, (1, t), generator=gen)
            times: dict[str, list[float]] = {name: [] for name in paths}
            logits = {}
            for _ in range(3):
                for name, make in paths.items():
                    for m in layers:
                        m.forward = make(m)  # type: ignore[method-assign]
                    c = copy.deepcopy(cache)
                    start = time.perf_counter()
                    logits[name] = model(ids, past_key_values=c).logits
                    times[name].append((time.perf_counter() - start) * 1e3)
            diff = (logits["oneDNN packed"] - logits["F.linear"]).abs().max().item()
            cells = " | ".join(f"{statistics.median(v):.0f}" for v in times.values())
            print(f"| {t} | {cells} | {diff:.1e} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-features", type=int, default=4864)
    p.add_argument("--in-features", type=int, default=896)
    p.add_argument("--int8", action="store_true", help="bfloat16 against int8 weights, cache-cold")
    p.add_argument("--onednn", action="store_true", help="float32: F.linear, small rows, oneDNN, cache-cold")
    p.add_argument("--w8a8", action="store_true", help="float32 rows: int8 weights vs int8 weights and activations")
    p.add_argument("--w8a8-levels", action="store_true", help="whole draft levels: int8 draft vs w8a8 drafts (a product per layer, shared products)")
    p.add_argument("--model", choices=("target", "draft"), help="whole passes of the embedded model, by path")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="with --model")
    args = p.parse_args()
    if args.model:
        print(f"threads {torch.get_num_threads()}, embedded {args.model}, {args.dtype}\n")
        model_table(args.model, getattr(torch, args.dtype))
        return
    if args.w8a8_levels:
        print(f"threads {torch.get_num_threads()}, embedded draft, float32 activations\n")
        w8a8_levels()
        return
    print(f"threads {torch.get_num_threads()}, weight [{args.out_features} x {args.in_features}]\n")
    if args.w8a8:
        w8a8_table(args.out_features, args.in_features)
        return
    if args.int8:
        int8_table(args.out_features, args.in_features)
        return
    if args.onednn:
        onednn_table(args.out_features, args.in_features)
        return
    print("| dtype | rows | F.linear ms | small-rows ms |")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(args.out_features, args.in_features, dtype=dtype)
        for rows in ROWS:
            x = torch.randn(rows, args.in_features, dtype=dtype)
            ref = median_ms(lambda: F.linear(x, w))
            fast = median_ms(lambda: small_rows_linear(x, w, None))
            print(f"| {str(dtype).removeprefix('torch.')} | {rows} | {ref:.2f} | {fast:.2f} |")


if __name__ == "__main__":
    main()
