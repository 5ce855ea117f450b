"""Weight-only int8 linear layers for a draft model on CPU.

A draft's proposals only have to be good, not exact: the target's verification keeps the output exact
whatever the draft computes. On a CPU a draft's step over a few tokens is bound by reading its weights
from memory (the embedded 0.5B draft in bfloat16 reads ~1 GB per level at 10-13 GB/s on the 2-core
development machine: ~100 ms, 80% of it in ``aten::mm``), so weights stored in int8 with one bfloat16
scale per output row halve what a step reads.

Layout: ``qweight`` [N, K] int8 and ``scales`` [N] in the activations' dtype, W ~= qweight * scales[:, None]
(symmetric, per output channel, rounded to nearest, |q| <= 127).

``int8_linear`` is the fast path: torch's CPU kernel for weight-only int8 products
(``aten::_weight_int8pack_mm``, the one gpt-fast and torchao's CPU path call) for up to
``INT8_ROWS_MAX`` rows, where it reads the int8 weights once (measured, cache-cold weights, one row:
1.7x faster than bfloat16 at [4864 x 896], 1.7x at the [151936 x 896] output layer; at 8 rows it is
slower than bfloat16, its cost grows with the rows). More rows (a prefill, a catch-up) take the float
weight an ``Int8Linear`` keeps beside the int8 one (``F.linear`` on the flattened rows); without it
they dequantize per call (measured 10x slower than bfloat16 at the output layer: a fallback, not a
path for models). The kernel returned wrong values for K = 24 and crashed for K = 7 (torch 2.13,
bfloat16): it is used only where ``K % INT8_K_MULTIPLE == 0``, the reference path elsewhere. ``int8_linear_reference`` is its twin
(dequantize, then ``F.linear``): outputs agree to the rounding of the activations' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Row counts at or below this take the int8 kernel; above it, the kept float weight (or dequantization).
INT8_ROWS_MAX = 4
# the kernel is used only for inner dimensions that are a multiple of this (see the module docstring)
INT8_K_MULTIPLE = 32
_KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def int8_kernel_available() -> bool:
    """Whether this torch has the CPU weight-only int8 kernel ``int8_linear`` uses."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantize_int8(
    # [N, K] float weight
    weight: torch.Tensor,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, K] int8, [N] scales in ``dtype`` (default: the weight's)): symmetric per-row quantization."""
    dtype = dtype or weight.dtype
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp_(min=1e-12).to(dtype)
    q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, K] ``qweight * scales[:, None]`` in ``dtype``."""
    return qweight.to(dtype) * scales.to(dtype)[:, None]


def int8_linear_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The twin of ``int8_linear``: the dequantized weight through ``F.linear``."""
    return F.linear(x, dequantize_int8(qweight, scales, x.dtype), None if bias is None else bias.to(x.dtype))


def uses_int8_kernel(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    """Whether ``int8_linear`` computes ``x``'s product with torch's int8 kernel (few rows, a CPU tensor of
    a supported dtype and width)."""
    return (
        x.numel() // max(x.shape[-1], 1) <= INT8_ROWS_MAX
        and x.device.type == "cpu"
        and qweight.device.type == "cpu"
        and x.dtype in _KERNEL_DTYPES
        and x.shape[-1] % INT8_K_MULTIPLE == 0
    )


def int8_linear(
    # [..., K]
    x: torch.Tensor,
    # [N, K] int8
    qweight: torch.Tensor,
    # [N]
    scales: torch.Tensor,
    # [N] or None
    bias: torch.Tensor | None,
    # [N, K] the float weight the int8 one was quantized from, for passes over many rows; None: dequantize
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """[..., N] = x @ W^T + bias: W the int8 weight (``qweight * scales[:, None]``) for up to
    ``INT8_ROWS_MAX`` rows; for more, the float ``weight`` when given (a prefill is compute-bound: its
    weights are read once for many rows), else the dequantized int8 weight."""
    rows = x.reshape(-1, x.shape[-1])
    n = qweight.shape[0]
    if rows.shape[0] > INT8_ROWS_MAX and weight is not None:
        return F.linear(rows, weight, bias).reshape(*x.shape[:-1], n)
    if uses_int8_kernel(x, qweight):
        out = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), qweight, scales.to(x.dtype))
        if bias is not None:
            out = out + bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], n)
    return int8_linear_reference(rows, qweight, scales, bias).reshape(*x.shape[:-1], n)


class Int8Linear(torch.nn.Module):
    """A linear layer with int8 weights and per-row scales (inference only). ``keep_float``: keep the
    float weight too, for passes over more than ``INT8_ROWS_MAX`` rows (memory: 1.5x the float layer)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None
    weight: torch.Tensor | None

    def __init__(self, linear: torch.nn.Linear, keep_float: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scales = quantize_int8(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self.register_buffer("weight", linear.weight.detach() if keep_float else None)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return int8_linear(input, self.qweight, self.scales, self.bias, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def use_int8_weights(model: torch.nn.Module, keep_float: bool = True) -> int:
    """Replace every ``nn.Linear`` of ``model`` (its output layer included, tied or not) by an
    ``Int8Linear`` quantized from it; returns how many. Without ``keep_float`` the float weights of
    replaced layers are freed unless something else holds them (a tied input embedding keeps its own)."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(module, keep_float))
    return len(targets)
