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
``INT8_ROWS_MAX`` rows (``INT8_ROWS_MAX_FLOAT32`` for float32 activations, whose float weight reads
twice the bytes), where it reads the int8 weights once (measured, cache-cold weights, one row:
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

int8 activations too (``w8a8_linear``, the draft dtype "w8a8"): on an AVX2 CPU without bfloat16 dot
products the weight-only kernel above emulates bfloat16, while fbgemm's dynamically quantized product
(``quantized::linear_dynamic``: the rows quantized to 7-bit unsigned integers with one scale per call,
integer dot products, int32 sums) measured 1.3-3x faster for 1-8 rows and flat in the row count
(kernels/NOTES.md). A pass over more rows (a draft level of several requests) goes through in chunks of
``W8A8_ROWS_MAX`` rows, each with its own scale, up to ``W8A8_CHUNKED_ROWS_MAX`` rows (float32 activations;
bfloat16 ones take the bfloat16 weight above one chunk: ``w8a8_rows_max``). Quantizing
activations per call loses more than quantizing weights: channels with outliers set the scale for all.
Three measured answers: only the layers that read a normalization's output take it (a model's q/k/v and
gate/up projections and its output layer; the attention output and MLP down projections keep weight-only
int8, where w8a8 cost 2-3% of the draft's top-1 agreement with its float self); those are smoothed
(SmoothQuant: column j of the weight times s_j, the input divided by it, s_j = sqrt(max|x_j| / max|W_j|)
with max|x_j| from a calibration pass); and the output layer's w8a8 logits only pick candidates: its top
``RESCORE_TOP`` ids per row are scored again with the int8 weights and float activations (``rescore_top``;
on the embedded draft the weight-only top-1 was among the w8a8 top 8 in 749 of 749 rows of Spec-Bench
text). ``w8a8_linear_reference`` is the product's twin (the same quantization written out, then
``F.linear``). Layers that read the very same norm output (found in the calibration pass: a decoder's
q/k/v, its gate/up) share one product over their weights side by side (``SharedInput``): one activation
quantization and one fbgemm call instead of three or two (a draft level of the embedded draft 4-7% faster
at 1-4 tokens; kernels/NOTES.md).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from spruce.kernels.cpu_linear import (
    alternating_ratio,
    median_seconds,
    onednn_linear,
    onednn_linear_available,
    onednn_pack,
    parameter_uses,
)

# Row counts at or below this take the int8 kernel; above it, the kept float weight (or dequantization).
INT8_ROWS_MAX = 4
# the same for float32 activations: the kernel (in bfloat16) against a float32 weight's 4 bytes per value
# rather than bfloat16's 2, so it stays ahead for more rows (measured on an AVX2 CPU, 24 [896 x 4864]
# weights: 31 ms for 5-8 rows against oneDNN float32's 43-48 ms; 48 ms at 12 rows)
INT8_ROWS_MAX_FLOAT32 = 8
# the kernel is used only for inner dimensions that are a multiple of this (see the module docstring)
INT8_K_MULTIPLE = 32
# the activations' dtypes the kernel path takes, and what it computes in for each (float32 rows are
# rounded to bfloat16 for it)
_KERNEL_COMPUTE = {torch.bfloat16: torch.bfloat16, torch.float32: torch.bfloat16}
_KERNEL_DTYPES = tuple(_KERNEL_COMPUTE)
# Rows per fbgemm call of a w8a8 product (its cost is flat in the row count up to 8, measured) and so per
# activation scale: float32 rows beyond it go through in chunks of this many, each quantized on its own, up
# to ``W8A8_CHUNKED_ROWS_MAX`` rows (a draft level of several requests); more than that (a prefill, a long
# catch-up, compute-bound) take the float weight. bfloat16 rows (a CPU with native bfloat16) take the
# bfloat16 weight above ``W8A8_ROWS_MAX``: there its oneDNN product beat the chunks at every level of
# 10-48 rows measured (``w8a8_rows_max``).
W8A8_ROWS_MAX = 8
W8A8_CHUNKED_ROWS_MAX = 64
# fbgemm quantizes the activations to [0, 127] (``reduce_range``): AVX2 without VNNI multiplies pairs of
# 8-bit values into saturating 16-bit sums, and full-range inputs gave wrong products here
_W8A8_QMAX = 127
# SmoothQuant's migration strength: s_j = max|x_j| ** alpha / max|W_j| ** (1 - alpha) (0.5 measured best
# of 0, 0.5, 0.7 on the embedded draft's top-1 agreement with its float self)
SMOOTH_ALPHA = 0.5
# the quantized engines whose dynamic linear is fbgemm's (the semantics ``w8a8_linear_reference`` writes out)
_W8A8_ENGINES = ("x86", "fbgemm")
# ids per row of an output layer's w8a8 logits scored again exactly (``rescore_top``)
RESCORE_TOP = 32
# tokens of the calibration pass that measures each w8a8 layer's input range, drawn from the first this
# many ids of the vocabulary
CALIBRATION_TOKENS = 128
CALIBRATION_IDS = 32768


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


def int8_rows_max(dtype: torch.dtype) -> int:
    """Rows up to which ``int8_linear`` takes the int8 kernel for activations of ``dtype``."""
    return INT8_ROWS_MAX_FLOAT32 if dtype == torch.float32 else INT8_ROWS_MAX


def w8a8_rows_max(dtype: torch.dtype) -> int:
    """Rows up to which a w8a8 layer takes ``w8a8_linear`` for activations of ``dtype``; more take the
    float weight. float32: ``W8A8_CHUNKED_ROWS_MAX`` (against a 4-byte weight, the 8-row chunks stay ahead;
    measured on an AVX2 CPU). bfloat16: one chunk, ``W8A8_ROWS_MAX`` (a whole draft level of the embedded
    draft with bfloat16 activations on a CPU with native bfloat16, 10 / 16 / 32 rows: 47.7 / 58.1 / 106.0 ms
    chunked against 44.2 / 50.0 / 75.9 ms with the bfloat16 weights above 8 rows; kernels/NOTES.md)."""
    return W8A8_CHUNKED_ROWS_MAX if dtype == torch.float32 else W8A8_ROWS_MAX


def uses_int8_kernel(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    """Whether ``int8_linear`` computes ``x``'s product with torch's int8 kernel (few rows, a CPU tensor of
    a supported dtype and width)."""
    return (
        x.numel() // max(x.shape[-1], 1) <= int8_rows_max(x.dtype)
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
    ``int8_rows_max(x.dtype)`` rows (computed in bfloat16 for float32 ``x``); for more, the float
    ``weight`` when given (a prefill is compute-bound: its weights are read once for many rows), else the
    dequantized int8 weight."""
    rows = x.reshape(-1, x.shape[-1])
    n = qweight.shape[0]
    if rows.shape[0] > int8_rows_max(x.dtype) and weight is not None:
        out = onednn_linear(rows, weight, bias) if weight.is_mkldnn else F.linear(rows, weight, bias)
        return out.reshape(*x.shape[:-1], n)
    if uses_int8_kernel(x, qweight):
        compute = _KERNEL_COMPUTE[x.dtype]
        out = torch.ops.aten._weight_int8pack_mm(rows.to(compute).contiguous(), qweight, scales.to(compute)).to(x.dtype)
        if bias is not None:
            out = out + bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], n)
    return int8_linear_reference(rows, qweight, scales, bias).reshape(*x.shape[:-1], n)


@dataclasses.dataclass
class W8A8Weight:
    """A layer's weight for ``w8a8_linear``: the input is multiplied by ``inv_smooth`` [K] (1 / s), then
    goes through ``packed``, fbgemm's prepacked form of the smoothed weight W * s in int8 with one float32
    scale per output row; ``bias`` [N] float32 or None. The int8 values live only in ``packed``
    (``qweight`` / ``scales`` unpack them, for the twin and tests)."""

    inv_smooth: torch.Tensor
    bias: torch.Tensor | None
    packed: object

    @property
    def qweight(self) -> torch.Tensor:
        """[N, K] int8."""
        return torch.ops.quantized.linear_unpack(self.packed)[0].int_repr()

    @property
    def scales(self) -> torch.Tensor:
        """[N] float32."""
        return torch.ops.quantized.linear_unpack(self.packed)[0].q_per_channel_scales().float()


def smooth_factors(input_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = SMOOTH_ALPHA) -> torch.Tensor:
    """[K] SmoothQuant's per-input-channel factors s from the measured max |x_j| and the weight's columns."""
    w = weight.detach().float().abs().amax(dim=0).clamp(min=1e-5)
    x = input_absmax.detach().float().clamp(min=1e-5)
    return (x.pow(alpha) / w.pow(1.0 - alpha)).clamp(min=1e-5)


def w8a8_pack(weight: torch.Tensor, bias: torch.Tensor | None, smooth: torch.Tensor) -> W8A8Weight:
    """The ``W8A8Weight`` of a float [N, K] ``weight`` smoothed by ``smooth`` [K]."""
    q, scales = quantize_int8(weight.detach().float() * smooth.float()[None, :], torch.float32)
    with warnings.catch_warnings():
        # torch 2.13 marks quantized tensors deprecated; fbgemm's prepack still takes one (if a later torch
        # drops them, ``w8a8_available`` says no and the draft keeps weight-only int8)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        qt = torch._make_per_channel_quantized_tensor(q, scales.double(), torch.zeros(q.shape[0], dtype=torch.long), 0)
    # a copy: a float32 bias would otherwise be the caller's tensor, which may be backed by the memory-mapped
    # checkpoint (a loaded model's), keeping the whole mapping resident
    b = None if bias is None else bias.detach().to(torch.float32, copy=True).contiguous()
    return W8A8Weight((1.0 / smooth.float()).contiguous(), b, torch.ops.quantized.linear_prepack(qt, b))


def w8a8_linear(x: torch.Tensor, w: W8A8Weight) -> torch.Tensor:
    """[..., N]: ``x`` [..., K] times 1 / s, quantized per chunk of ``W8A8_ROWS_MAX`` rows (7-bit
    unsigned, one scale and zero point per chunk), through fbgemm's integer product with the smoothed
    int8 weight; in ``x``'s dtype."""
    rows = (x.reshape(-1, x.shape[-1]).float() * w.inv_smooth).contiguous()
    if rows.shape[0] <= W8A8_ROWS_MAX:
        out = torch.ops.quantized.linear_dynamic(rows, w.packed, True)
    else:
        out = torch.cat([torch.ops.quantized.linear_dynamic(part, w.packed, True) for part in rows.split(W8A8_ROWS_MAX)])
    return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])


def quantize_activations(rows: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """(codes in [0, 127] as float32, scale, zero point): fbgemm's per-call choice for dynamic
    quantization (the range widened to hold 0, the zero point rounded into the code range)."""
    lo, hi = min(rows.min().item(), 0.0), max(rows.max().item(), 0.0)
    scale = float(torch.tensor((hi - lo) / _W8A8_QMAX, dtype=torch.float32))
    if scale == 0.0:
        scale = 0.1
    from_min, from_max = -lo / scale, _W8A8_QMAX - hi / scale
    zero = from_min if abs(lo / scale) < _W8A8_QMAX + abs(hi / scale) else from_max
    zero_point = int(min(max(round(zero), 0), _W8A8_QMAX))
    inverse = torch.tensor(1.0, dtype=torch.float32) / scale
    codes = (torch.round(rows.float() * inverse) + zero_point).clamp_(0, _W8A8_QMAX)
    return codes, scale, zero_point


def w8a8_linear_reference(x: torch.Tensor, w: W8A8Weight) -> torch.Tensor:
    """The twin of ``w8a8_linear``: the same smoothing and quantization written out, the dequantized
    rows through ``F.linear`` with the dequantized weight."""
    rows = x.reshape(-1, x.shape[-1]).float() * w.inv_smooth
    weight = dequantize_int8(w.qweight, w.scales, torch.float32)
    parts = []
    for chunk in rows.split(W8A8_ROWS_MAX):
        codes, scale, zero_point = quantize_activations(chunk)
        parts.append(F.linear((codes - zero_point) * scale, weight, w.bias))
    return torch.cat(parts).to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def rescore_top(
    # [..., K] the layer's input
    x: torch.Tensor,
    # [..., N] its w8a8 output
    approx: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    top: int = RESCORE_TOP,
) -> torch.Tensor:
    """[..., N] in ``x``'s dtype: per row, the ``top`` largest entries of ``approx`` replaced by the int8
    weight's product with the float row (``int8_linear_reference`` in float32), every other entry capped
    at the smallest of those, so that the candidates rank first, among themselves exactly."""
    rows = x.reshape(-1, x.shape[-1]).float()
    flat = approx.reshape(-1, approx.shape[-1]).float()
    idx = flat.topk(min(top, flat.shape[-1]), dim=-1).indices  # [M, R]
    weights = qweight[idx].float() * scales.float()[idx].unsqueeze(-1)  # [M, R, K]
    exact = torch.bmm(weights, rows.unsqueeze(-1)).squeeze(-1)
    if bias is not None:
        exact = exact + bias.float()[idx]
    out = torch.minimum(flat, exact.amin(dim=-1, keepdim=True)).scatter_(1, idx, exact)
    return out.to(x.dtype).reshape(approx.shape)


_W8A8_OK: list[bool] = []


def w8a8_available() -> bool:
    """Whether ``w8a8_linear`` runs here and agrees with its reference (fbgemm's dynamic linear under the
    x86 or fbgemm quantized engine; checked once per process on fresh random data)."""
    if not _W8A8_OK:
        _W8A8_OK.append(torch.backends.quantized.engine in _W8A8_ENGINES and _w8a8_self_test())
    return _W8A8_OK[0]


def _w8a8_self_test() -> bool:
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 64, generator=gen), torch.randn(48, generator=gen)
    try:
        w = w8a8_pack(weight, bias, torch.rand(64, generator=gen) + 0.5)
        for rows in (1, 3):
            x = torch.randn(rows, 64, generator=gen)
            got, want = w8a8_linear(x, w), w8a8_linear_reference(x, w)
            # one code off (a rounding tie) moves an output by scale * |w|: far below this
            if got.shape != want.shape or not torch.allclose(got, want, atol=0.05, rtol=0.01):
                return False
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def normalized_input_absmax(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
    """({name: [K] max |x_j|}, groups), measured over one forward of ``tokens`` [1, T]: the input ranges of
    every ``nn.Linear`` of ``model`` whose input is the output of a normalization layer (RMSNorm /
    LayerNorm: a decoder's q/k/v and gate/up projections) and of its output layer (which reads the final
    norm's output through a slice); ``groups``: the names of the layers (not the output layer's) that read
    the very same norm output, two or more, in call order (q/k/v, gate/up: ``SharedInput``)."""
    names = {id(m): name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    heads = _output_layers(model)
    # the norms' outputs stay referenced during the pass so that no other tensor takes their ids
    outputs: list[torch.Tensor] = []
    readers: list[list[str]] = []
    absmax: dict[str, torch.Tensor] = {}

    def after_norm(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        outputs.append(output)
        readers.append([])

    def before_linear(module: torch.nn.Module, args: tuple) -> None:
        x = args[0]
        source = next((i for i, o in enumerate(outputs) if x is o), None)
        if id(module) in heads or source is not None:
            a = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            name = names[id(module)]
            absmax[name] = torch.maximum(absmax[name], a) if name in absmax else a
            if source is not None and id(module) not in heads:
                readers[source].append(name)

    handles = [m.register_forward_hook(after_norm) for m in model.modules() if _is_norm(m)]
    handles += [m.register_forward_pre_hook(before_linear) for m in model.modules() if id(m) in names]
    try:
        with torch.no_grad():
            model(input_ids=tokens, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    # an output layer's parts not run by the pass (a ``NarrowHead``'s other half) read the same input
    measured = [absmax[names[key]] for key in heads if key in names and names[key] in absmax]
    for key in heads:
        if key in names and measured:
            absmax.setdefault(names[key], measured[0])
    # a layer run twice in the pass (shared weights) reads two inputs: it stays out of groups
    counts = Counter(name for group in readers for name in group)
    groups = [g for g in readers if len(g) > 1 and all(counts[n] == 1 for n in g)]
    return absmax, groups


def _output_layers(model: torch.nn.Module) -> set[int]:
    """ids of the modules making up ``model``'s output layer (a ``NarrowHead``'s two linears included)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {id(m) for m in head.modules()} if isinstance(head, torch.nn.Module) else set()


def calibration_tokens(vocab_size: int, count: int = CALIBRATION_TOKENS) -> torch.Tensor:
    """[1, count] token ids drawn (seeded) from the first ``CALIBRATION_IDS`` ids: a BPE vocabulary is in merge order,
    so those are its frequent pieces. (Calibrating on these measured the same top-1 agreement as on
    Spec-Bench text, 0.977 vs 0.986 with 0.979 for weight-only int8: within the measure's spread.)"""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, min(vocab_size, CALIBRATION_IDS), (1, count), generator=gen)


class SharedInput:
    """One w8a8 product for several layers that read the same tensor (a decoder's q/k/v projections, its
    gate/up pair): their weights side by side in one ``W8A8Weight``, smoothed together (the input is
    the same, so one s_j per input channel, from the concatenated columns), so that a pass quantizes
    that input once and makes one fbgemm call instead of one per layer (measured on the embedded draft:
    the per-call cost is ~70 us on the 2-core AVX2 machine, kernels/NOTES.md). The first member called
    with an input computes every member's output; the others take theirs while the input is the very
    same tensor object (the layers of a decoder get their norm's output one after another); any other
    input is computed afresh, so a member called alone still gets its own product."""

    def __init__(self, linears: list[torch.nn.Linear], input_absmax: torch.Tensor) -> None:
        weight = torch.cat([m.weight.detach().float() for m in linears])
        biases = [m.bias for m in linears]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach().float() if b is not None else torch.zeros(m.out_features) for m, b in zip(linears, biases)])
        self.weight = w8a8_pack(weight, bias, smooth_factors(input_absmax, weight))
        self.sizes = [m.out_features for m in linears]
        self._input: torch.Tensor | None = None
        self._outputs: list[torch.Tensor] = []
        self._left = 0

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Member ``index``'s part of the product with ``x`` (whose rows ``w8a8_linear`` takes)."""
        if self._input is not x:
            self._outputs = [part.contiguous() for part in w8a8_linear(x, self.weight).split(self.sizes, dim=-1)]
            self._input, self._left = x, len(self.sizes)
        out = self._outputs[index]
        self._left -= 1
        if self._left <= 0:  # every member had its part: nothing held past the layers' use
            self._input, self._outputs = None, []
        return out


class Int8Linear(torch.nn.Module):
    """A linear layer with int8 weights and per-row scales (inference only). ``keep_float``: keep the
    float weight too, for passes over more rows than the int8 paths take (``int8_rows_max``, and
    ``w8a8_rows_max`` for a w8a8 layer; memory: 1.5x the float layer);
    prepacked for oneDNN where torch runs it in that dtype, unless ``shared`` (another module holds the
    same weight, a tied output embedding: kept dense, not copied)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None
    weight: torch.Tensor | None

    def __init__(
        self,
        linear: torch.nn.Linear,
        keep_float: bool = True,
        shared: bool = False,
        input_absmax: torch.Tensor | None = None,
        rescore: int = 0,
    ) -> None:
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
        # ``input_absmax`` (the measured max |x_j| of the layer's input): also int8 activations for up to
        # ``w8a8_rows_max`` rows (``w8a8_linear``), smoothed by it; ``rescore`` > 0 (an output
        # layer): the top that many of those outputs per row are scored again (``rescore_top``)
        self.w8a8 = None if input_absmax is None else w8a8_pack(w, linear.bias, smooth_factors(input_absmax, w))
        self.rescore = rescore
        # (group, index): this layer's w8a8 product comes from a ``SharedInput`` (set by ``use_int8_weights``;
        # not to be confused with ``shared``, a weight another module also holds)
        self.shared_input: tuple[SharedInput, int] | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        w8a8 = self.w8a8 is not None or self.shared_input is not None
        rows = input.numel() // max(input.shape[-1], 1)
        if w8a8 and rows <= w8a8_rows_max(input.dtype) and input.device.type == "cpu":
            if self.shared_input is not None:
                return self.shared_input[0].output(input, self.shared_input[1])
            assert self.w8a8 is not None
            out = w8a8_linear(input, self.w8a8)
            if self.rescore:
                out = rescore_top(input, out, self.qweight, self.scales, self.bias, self.rescore)
            return out
        weight = self.packed if self.packed is not None else self.weight
        return int8_linear(input, self.qweight, self.scales, self.bias, weight)

    def extra_repr(self) -> str:
        many = "oneDNN packed" if self.packed is not None else "dense" if self.weight is not None else "dequantized"
        joint = self.shared_input
        limits = f"{w8a8_rows_max(torch.float32)} float32 / {w8a8_rows_max(torch.bfloat16)} bfloat16"
        w8a8 = f", w8a8 up to {limits} rows" if self.w8a8 is not None or joint is not None else ""
        w8a8 += f" (shared input, part {joint[1]} of {len(joint[0].sizes)})" if joint is not None else ""
        w8a8 += f" (top {self.rescore} rescored)" if self.w8a8 is not None and self.rescore else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8{w8a8}, many rows: {many}"


def use_int8_weights(model: torch.nn.Module, keep_float: bool = True, activations: bool = False, shared_inputs: bool = True) -> int:
    """Replace every ``nn.Linear`` of ``model`` (its output layer included, tied or not) by an
    ``Int8Linear`` quantized from it; returns how many. Without ``keep_float`` the float weights of
    replaced layers are freed unless something else holds them (a tied input embedding keeps its own).
    ``activations``: the layers that read a normalization's output also get int8 activations
    (``w8a8_linear``), smoothed by their input ranges measured first on the float model
    (``normalized_input_absmax`` over ``calibration_tokens``), the output layer's rescored
    (``rescore_top``); needs ``w8a8_available()``. With ``shared_inputs`` the layers found reading the
    same norm output share one product (``SharedInput``); without, each has its own."""
    absmax: dict[str, torch.Tensor] = {}
    groups: list[list[str]] = []
    if activations:
        if not w8a8_available():
            raise RuntimeError("int8 activations need fbgemm's dynamic linear (torch's x86 quantized engine), not found here")
        get = getattr(model, "get_input_embeddings", None)
        embeddings = get() if callable(get) else None
        vocab = embeddings.num_embeddings if isinstance(embeddings, torch.nn.Embedding) else CALIBRATION_IDS
        absmax, groups = normalized_input_absmax(model, calibration_tokens(vocab))
    joints: dict[str, tuple[SharedInput, int]] = {}
    for group in groups if shared_inputs else []:
        # (every name in a group is a linear layer's; the filter only tells the type checker so)
        members = [m for m in map(model.get_submodule, group) if isinstance(m, torch.nn.Linear)]
        joint = SharedInput(members, absmax[group[0]])
        joints.update((name, (joint, i)) for i, name in enumerate(group))
    heads = _output_layers(model)
    uses = parameter_uses(model)
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        shared = uses.get(id(module.weight), 1) > 1
        rescore = RESCORE_TOP if id(module) in heads else 0
        own = None if name in joints else absmax.get(name)
        layer = Int8Linear(module, keep_float, shared=shared, input_absmax=own, rescore=rescore)
        layer.shared_input = joints.get(name)
        setattr(parent, child, layer)
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


def w8a8_mlp_speedup(hidden: int, inner: int, dtype: torch.dtype = torch.bfloat16, weights_mb: int = 256) -> float:
    """Measured time of one row through MLP-shaped layers in ``dtype`` (oneDNN-prepacked where torch runs
    it, else ``F.linear``) / the same layers as a "w8a8" draft holds them: the gate and up projections
    side by side in one ``w8a8_linear``, the down projection weight-only int8 (``int8_linear``). Median
    over several distinct layers (``weights_mb`` of them in ``dtype``, at most 16), so that they come from
    memory as a model's do.

    Decides, on a CPU with native bfloat16, whether a draft runs as w8a8 rather than in bfloat16
    (``spruce.pairing.pick_draft_dtype``): both read their weights once per level of a few rows, so what
    counts is the bytes and each kernel's cost per call, which differ by CPU.
    """
    gen = torch.Generator().manual_seed(0)
    layer_bytes = 3 * hidden * inner * torch.finfo(dtype).bits // 8
    count = min(16, max(2, weights_mb * 2**20 // layer_bytes))
    packed = onednn_linear_available(dtype)
    floats, quantized = [], []
    for _ in range(count):
        gate_up = torch.randn(2 * inner, hidden, generator=gen) / hidden**0.5
        down = torch.randn(hidden, inner, generator=gen) / inner**0.5
        pair = [w.to(dtype) for w in (gate_up, down)]
        floats.append([onednn_pack(w) for w in pair] if packed else pair)
        quantized.append((w8a8_pack(gate_up, None, torch.ones(hidden)), quantize_int8(down, _KERNEL_COMPUTE.get(dtype, dtype))))
    x = torch.randn(1, hidden, generator=gen).to(dtype)
    h = torch.randn(1, inner, generator=gen).to(dtype)

    def float_pass() -> None:
        for gate_up, down in floats:
            if packed:
                onednn_linear(x, gate_up, None), onednn_linear(h, down, None)
            else:
                F.linear(x, gate_up), F.linear(h, down)

    def w8a8_pass() -> None:
        for gate_up, (q, s) in quantized:
            w8a8_linear(x, gate_up), int8_linear(h, q, s, None)

    return alternating_ratio(float_pass, w8a8_pass)
