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

float32 activations (a draft on a CPU without native bfloat16, where a bfloat16 model's other layers
are slow): the kernel still runs in bfloat16 (the few rows rounded to it, the result back in float32);
torch's float32 variant of the kernel measured 4.5x slower per draft pass than its bfloat16 one on an
AVX2 CPU (516 vs 114 ms, the 0.5B draft, one token; kernels/NOTES.md). More rows take the kept float
weight through oneDNN, prepacked (``spruce.kernels.cpu_linear``), where torch has it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from spruce.kernels.cpu_linear import (
    median_seconds,
    onednn_linear,
    onednn_linear_available,
    onednn_pack,
    parameter_uses,
)

# Row counts at or below this take the int8 kernel; above it, the kept float weight (or dequantization).
INT8_ROWS_MAX = 4
# the kernel is used only for inner dimensions that are a multiple of this (see the module docstring)
INT8_K_MULTIPLE = 32
# the activations' dtypes the kernel path takes, and what it computes in for each (float32 rows are
# rounded to bfloat16 for it)
_KERNEL_COMPUTE = {torch.bfloat16: torch.bfloat16, torch.float32: torch.bfloat16}
_KERNEL_DTYPES = tuple(_KERNEL_COMPUTE)


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
    # [N, K] the float weight the int8 one was quantized from, dense or packed by ``onednn_pack``, for
    # passes over many rows; None: dequantize
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """[..., N] = x @ W^T + bias: W the int8 weight (``qweight * scales[:, None]``) for up to
    ``INT8_ROWS_MAX`` rows (computed in bfloat16 for float32 ``x``); for more, the float ``weight`` when
    given (a prefill is compute-bound: its weights are read once for many rows), else the dequantized
    int8 weight."""
    rows = x.reshape(-1, x.shape[-1])
    n = qweight.shape[0]
    if rows.shape[0] > INT8_ROWS_MAX and weight is not None:
        out = onednn_linear(rows, weight, bias) if weight.is_mkldnn else F.linear(rows, weight, bias)
        return out.reshape(*x.shape[:-1], n)
    if uses_int8_kernel(x, qweight):
        compute = _KERNEL_COMPUTE[x.dtype]
        out = torch.ops.aten._weight_int8pack_mm(rows.to(compute).contiguous(), qweight, scales.to(compute)).to(x.dtype)
        if bias is not None:
            out = out + bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], n)
    return int8_linear_reference(rows, qweight, scales, bias).reshape(*x.shape[:-1], n)


class Int8Linear(torch.nn.Module):
    """A linear layer with int8 weights and per-row scales (inference only). ``keep_float``: keep the
    float weight too, for passes over more than ``INT8_ROWS_MAX`` rows (memory: 1.5x the float layer);
    prepacked for oneDNN where torch runs it in that dtype, unless ``shared`` (another module holds the
    same weight, a tied output embedding: kept dense, not copied)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None
    weight: torch.Tensor | None

    def __init__(self, linear: torch.nn.Linear, keep_float: bool = True, shared: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        # the scales in the dtype the kernel computes in (bfloat16 for a float32 layer)
        q, scales = quantize_int8(w, _KERNEL_COMPUTE.get(w.dtype, w.dtype))
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        pack = keep_float and not shared and w.device.type == "cpu" and onednn_linear_available(w.dtype)
        self.register_buffer("weight", w if keep_float and not pack else None)
        # a plain attribute, not a buffer: opaque tensors do not go into a state dict or through .to()
        self.packed = onednn_pack(w) if pack else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = self.packed if self.packed is not None else self.weight
        return int8_linear(input, self.qweight, self.scales, self.bias, weight)

    def extra_repr(self) -> str:
        many = "oneDNN packed" if self.packed is not None else "dense" if self.weight is not None else "dequantized"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8, many rows: {many}"


def use_int8_weights(model: torch.nn.Module, keep_float: bool = True) -> int:
    """Replace every ``nn.Linear`` of ``model`` (its output layer included, tied or not) by an
    ``Int8Linear`` quantized from it; returns how many. Without ``keep_float`` the float weights of
    replaced layers are freed unless something else holds them (a tied input embedding keeps its own)."""
    uses = parameter_uses(model)
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(module, keep_float, shared=uses.get(id(module.weight), 1) > 1))
    return len(targets)


def int8_speedup(in_features: int, out_features: int, dtype: torch.dtype = torch.float32, weights_mb: int = 256) -> float:
    """Measured time of a 1-row linear in ``dtype`` (oneDNN-prepacked where torch runs it, else
    ``F.linear``) / the same through ``int8_linear``, on this CPU: median over several distinct weights
    of ``[out_features, in_features]`` (``weights_mb`` of them in ``dtype``, at most 32, so that they come
    from memory as a model's do, not from cache).

    Decides whether a draft should keep int8 weights here (``spruce.pairing.pick_draft_dtype``): a
    draft's step reads its weights for a few rows, so what counts is the bytes read per row.
    """
    gen = torch.Generator().manual_seed(0)
    count = min(32, max(2, weights_mb * 2**20 // (in_features * out_features * torch.finfo(dtype).bits // 8)))
    weights = [torch.randn(out_features, in_features, generator=gen).to(dtype) for _ in range(count)]
    packed = onednn_linear_available(dtype)
    floats = [onednn_pack(w) if packed else w for w in weights]
    quantized = [quantize_int8(w, _KERNEL_COMPUTE.get(dtype, dtype)) for w in weights]
    del weights
    x = torch.randn(1, in_features, generator=gen).to(dtype)

    def float_pass() -> None:
        for w in floats:
            onednn_linear(x, w, None) if packed else F.linear(x, w)

    def int8_pass() -> None:
        for q, s in quantized:
            int8_linear(x, q, s, None)

    return median_seconds(float_pass) / median_seconds(int8_pass)
