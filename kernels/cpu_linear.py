"""A CPU fast path for linear layers over a handful of tokens (tree verification on CPU).

Measured on the 2-core development machine (torch 2.13 CPU, float32, [4864 x 896] weight, see
``kernels/NOTES.md``): ``F.linear`` costs 0.64 ms for 1 row but 1.35 ms for 2 rows and 2.1 ms for 3, because
GEMMs with 2-3 rows take a slow path; computing ``(W @ x^T)^T`` instead costs 0.5-0.7 ms for 2-4 rows.
A whole 1.5B target pass over 3 tokens drops from ~1100 ms to ~580 ms, which decides whether a small
draft tree pays off at all in float32.

``small_rows_linear`` is the fast path; ``torch.nn.functional.linear`` is its reference twin (outputs agree
to float rounding: only the summation order differs). It also flattens inputs to 2D first: a [1, 1, K]
bfloat16 input with the strides of a slice (as ``logits_to_keep=1`` produces) took 520 ms through
``F.linear`` against a [151936 x 896] weight, the same data as [1, K] 21 ms. ``use_small_rows_linear`` switches a model's
``nn.Linear`` modules to it in place (weights shared, nothing copied).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Row counts at or below this use the transposed product; above it F.linear's blocked GEMM is faster.
SMALL_ROWS_MAX = 8
# The slow path seen is specific to float32 on CPU; bfloat16 GEMMs are flat in the row count.
_FAST_DTYPES = (torch.float32,)


def small_rows_linear(
    # [..., K] with few rows in total
    x: torch.Tensor,
    # [N, K]
    weight: torch.Tensor,
    # [N] or None
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``F.linear`` on the flattened [rows, K] view; [..., N].

    Two measured CPU pathologies are avoided (torch 2.13, see ``kernels/NOTES.md``):
    - float32 with 2..``SMALL_ROWS_MAX`` rows: computed as ``(W @ x^T)^T`` (2-3x faster);
    - a [1, 1, K] input whose size-1 dims carry odd strides (what ``logits_to_keep=1`` slices out of a
      [1, T, K] hidden state) sends bfloat16 GEMMs to a path ~25x slower than the same data as [1, K].
    """
    rows = x.reshape(-1, x.shape[-1])
    if 1 < rows.shape[0] <= SMALL_ROWS_MAX and x.device.type == "cpu" and x.dtype in _FAST_DTYPES:
        out = (weight @ rows.t()).t()
        if bias is not None:
            out = out + bias
    else:
        out = F.linear(rows, weight, bias)
    return out.reshape(*x.shape[:-1], weight.shape[0])


class SmallRowsLinear(torch.nn.Linear):
    """``nn.Linear`` whose forward takes the small-rows path when it applies (same parameters)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (matches nn.Linear)
        return small_rows_linear(input, self.weight, self.bias)


def use_small_rows_linear(model: torch.nn.Module) -> int:
    """Switch every exact ``nn.Linear`` in ``model`` to ``SmallRowsLinear``; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = SmallRowsLinear
            count += 1
    return count


def bf16_speedup(in_features: int, out_features: int, repeats: int = 5) -> float:
    """Measured time of a 1-row float32 linear / the same in bfloat16, on this CPU (median of repeats).

    Decides whether a draft model should run in bfloat16 here: on CPUs with native bfloat16 dot products
    it is ~3x faster (half the bytes, faster math); where bfloat16 is emulated it is slower.
    """
    import statistics
    import time

    def median_s(dtype: torch.dtype) -> float:
        w = torch.randn(out_features, in_features).to(dtype)
        x = torch.randn(1, in_features).to(dtype)
        F.linear(x, w)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            F.linear(x, w)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    return median_s(torch.float32) / median_s(torch.bfloat16)
