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

Faster still where torch has oneDNN (``torch.backends.mkldnn``): float32 ``F.linear`` on CPU goes to MKL's
GEMM, which on the development machine's AMD CPU reads a [8960 x 1536] weight at ~12 GB/s for one row and
costs 2-3x that for 2-16 rows, while oneDNN's matmul over the same weight, prepacked once into its blocked
layout, costs about the same for 1 to 16 rows (bfloat16 too). ``use_onednn_linear`` swaps a float32 or
bfloat16 model's linear layers for ``OneDnnLinear`` (weights prepacked, the dense copy freed); a whole 1.5B
float32 target pass over 8 tokens then costs ~0.3 s instead of ~0.83 s (``kernels/NOTES.md``). ``onednn_linear`` has ``F.linear`` as its
reference twin; ``onednn_linear_available`` checks the private operators against it once per process and
the loader falls back to the small-rows path where they are missing or wrong.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

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


# Rows the prepacked oneDNN layout is chosen for (a tree verification pass); any row count works with it.
ONEDNN_PACK_ROWS = 16
# Measured on the development CPU (kernels/NOTES.md), for every weight shape of the 1.5B target: with
# prepacked weights 5-6 rows cost the least (1 row 1.4x, 2 rows 1.8x as much), and each row's result is
# the same whatever the other rows (bitwise, for 2 rows or more). Fewer rows are padded up to this.
ONEDNN_MIN_ROWS = 5


def onednn_pack(weight: torch.Tensor, rows_hint: int = ONEDNN_PACK_ROWS) -> torch.Tensor:
    """``weight`` [N, K] (float32 or bfloat16) in oneDNN's blocked layout (an opaque ``torch._mkldnn``
    tensor, a copy)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows_hint)


def onednn_linear(
    # [..., K] on CPU, the weight's dtype
    x: torch.Tensor,
    # [N, K]: dense, or packed by onednn_pack
    weight: torch.Tensor,
    # [N] or None
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through oneDNN's matmul; [..., N]. Fewer than ``ONEDNN_MIN_ROWS`` rows
    are padded with zero rows up to it (those rows' outputs are dropped)."""
    rows = x.reshape(-1, x.shape[-1])
    n = rows.shape[0]
    if n < ONEDNN_MIN_ROWS:
        rows = torch.cat([rows, rows.new_zeros(ONEDNN_MIN_ROWS - n, rows.shape[1])])
    out = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), weight, bias, "none", [], "")
    return out[:n].reshape(*x.shape[:-1], out.shape[-1])


ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
_ONEDNN_OK: dict[torch.dtype, bool] = {}


def onednn_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether ``onednn_linear`` runs in ``dtype`` and agrees with ``F.linear`` here (dense and packed
    weights, a few row counts; checked once per process and dtype, on fresh random data)."""
    if dtype not in _ONEDNN_OK:
        _ONEDNN_OK[dtype] = dtype in ONEDNN_DTYPES and _onednn_self_test(dtype)
    return _ONEDNN_OK[dtype]


def _onednn_self_test(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(80, 64, generator=gen).to(dtype)
    b = torch.randn(80, generator=gen).to(dtype)
    # bfloat16 rounds inputs and output to 8 bits of mantissa: |error| <~ 2^-8 of a sum of magnitude ~8
    atol, rtol = (1e-3, 1e-4) if dtype == torch.float32 else (0.1, 0.02)
    try:
        packed = onednn_pack(w)
        for rows in (1, 3, ONEDNN_PACK_ROWS + 1):
            x = torch.randn(rows, 64, generator=gen).to(dtype)
            want = F.linear(x.double(), w.double(), b.double())
            for weight in (w, packed):
                got = onednn_linear(x, weight, b)
                if got.shape != want.shape or got.dtype != dtype:
                    return False
                if not torch.allclose(got.double(), want, atol=atol, rtol=rtol):
                    return False
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


class OneDnnLinear(torch.nn.Module):
    """A float32 or bfloat16 linear layer computed by oneDNN (inference only). Its weight is prepacked and the dense
    copy dropped, unless another module shares it (a tied output embedding): then the shared dense weight
    is used as is, which is slower than packed but still faster than MKL here."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, linear: torch.nn.Linear, shared: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        self.weight = linear.weight if shared else None
        # a plain attribute, not a buffer: opaque tensors do not go into a state dict or through .to()
        self.packed = None if shared else onednn_pack(linear.weight)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.packed if self.packed is not None else self.weight
        assert weight is not None
        return onednn_linear(input, weight, self.bias)

    def extra_repr(self) -> str:
        kind = "packed" if self.packed is not None else "shared dense weight"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, oneDNN {kind}"


def parameter_uses(model: torch.nn.Module) -> dict[int, int]:
    """How many modules hold each parameter of ``model``, by ``id`` (2 or more: shared, e.g. a tied
    output embedding)."""
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    return uses


def use_onednn_linear(model: torch.nn.Module) -> int:
    """Replace every float32 or bfloat16 ``nn.Linear`` of ``model`` by a ``OneDnnLinear`` built from it;
    returns how many. Call only where ``onednn_linear_available(dtype)`` holds for the model's dtypes; the
    model must stay on the CPU afterwards."""
    uses = parameter_uses(model)
    names = [
        name
        for name, module in model.named_modules()
        if type(module) in (torch.nn.Linear, SmallRowsLinear) and module.weight.dtype in ONEDNN_DTYPES
    ]
    for name in names:  # one layer at a time, so that each dense weight is freed before the next is packed
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        setattr(parent, child, OneDnnLinear(module, shared=uses[id(module.weight)] > 1))
        del module
    return len(names)


def bf16_speedup(in_features: int, out_features: int, repeats: int = 5) -> float:
    """Measured time of a 1-row float32 linear / the same in bfloat16, on this CPU (median of repeats).

    Decides whether a draft model should run in bfloat16 here: on CPUs with native bfloat16 dot products
    it is ~3x faster (half the bytes, faster math); where bfloat16 is emulated it is slower.
    """

    def median_s(dtype: torch.dtype) -> float:
        w = torch.randn(out_features, in_features).to(dtype)
        x = torch.randn(1, in_features).to(dtype)
        return median_seconds(lambda: F.linear(x, w), repeats)

    return median_s(torch.float32) / median_s(torch.bfloat16)


def median_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, after one untimed call (first calls build
    kernels)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def alternating_ratio(slow: Callable[[], object], fast: Callable[[], object], rounds: int = 9) -> float:
    """Median time of ``slow()`` / median time of ``fast()``, the two timed in turn ``rounds`` times after
    one untimed call of each (alternating, so that a drift in the machine's speed reaches both)."""
    slow(), fast()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for fn, out in zip((slow, fast), times):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return statistics.median(times[0]) / statistics.median(times[1])
