"""Microbenchmark: F.linear vs the small-rows path on CPU, by row count and dtype (median of repeats).

    python -m spruce.kernels.bench_cpu_linear [--out-features 4864] [--in-features 896]

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-features", type=int, default=4864)
    p.add_argument("--in-features", type=int, default=896)
    args = p.parse_args()
    print(f"threads {torch.get_num_threads()}, weight [{args.out_features} x {args.in_features}]\n")
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
