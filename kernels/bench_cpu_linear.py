"""Microbenchmark: F.linear vs the small-rows path on CPU, by row count and dtype (median of repeats);
with ``--int8``, bfloat16 F.linear vs int8 weights (``spruce.kernels.cpu_int8``) with cache-cold weights.

    python -m spruce.kernels.bench_cpu_linear [--out-features 4864] [--in-features 896] [--int8]

Prints one Markdown table; the figures measured on the development machine are in kernels/NOTES.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from spruce.kernels.cpu_linear import small_rows_linear

ROWS = (1, 2, 3, 4, 8, 16, 32)


def median_ms(fn, repeats: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-features", type=int, default=4864)
    p.add_argument("--in-features", type=int, default=896)
    p.add_argument("--int8", action="store_true", help="bfloat16 against int8 weights, cache-cold")
    args = p.parse_args()
    print(f"threads {torch.get_num_threads()}, weight [{args.out_features} x {args.in_features}]\n")
    if args.int8:
        int8_table(args.out_features, args.in_features)
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
