"""Int8 draft weights (``spruce.kernels.cpu_int8``): the fast path against its reference twin and the
exact product on fresh random inputs, the model switch, and an int8 draft keeping speculation lossless;
the same for int8 activations (w8a8: fbgemm's product against its written-out twin, the error bound of
both quantizations, smoothing, the output layer's rescoring, which layers take it)."""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VOCAB, assert_close
from spruce.kernels.cpu_int8 import (
    INT8_ROWS_MAX,
    RESCORE_TOP,
    W8A8_CHUNKED_ROWS_MAX,
    W8A8_ROWS_MAX,
    Int8Linear,
    SharedInput,
    dequantize_int8,
    int8_linear,
    int8_linear_reference,
    int8_rows_max,
    quantize_activations,
    quantize_int8,
    rescore_top,
    smooth_factors,
    use_int8_weights,
    uses_int8_kernel,
    w8a8_available,
    w8a8_linear,
    w8a8_linear_reference,
    w8a8_pack,
    w8a8_rows_max,
)
from spruce.kernels.cpu_linear import onednn_linear, onednn_linear_available

from spruce import Engine, SamplingParams, SpeculationConfig
from spruce.config import EngineConfig
from spruce.errors import InvalidRequestError
from spruce.modeling import forward_tokens, new_cache

needs_w8a8 = pytest.mark.skipif(not w8a8_available(), reason="no fbgemm dynamic linear (torch's x86 quantized engine) here")


def _exact(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (q * scales)^T + bias in float64."""
    out = x.double() @ (q.double() * scales.double()[:, None]).t()
    return out if bias is None else out + bias.double()


def test_quantize_round_trip_within_half_a_step():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(37, 70, generator=gen) * torch.rand(37, 1, generator=gen) * 3
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (37,) and int(q.abs().max()) <= 127
    err = (dequantize_int8(q, scales, torch.float32) - w).abs()
    assert bool((err <= scales[:, None] / 2 + 1e-6).all())
    # every row uses the full range: its largest weight maps to +-127
    assert bool((q.abs().amax(dim=1) == 127).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [64, 96, 24, 40])
@pytest.mark.parametrize("rows", [1, 2, 3, INT8_ROWS_MAX, INT8_ROWS_MAX + 1, 9])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_reference_and_exact(dtype, k, rows, bias):
    gen = torch.Generator().manual_seed(rows * 100 + k + bias)
    q, scales = quantize_int8(torch.randn(50, k, generator=gen), dtype)
    x = torch.randn(2, rows, k, generator=gen).to(dtype)
    b = torch.randn(50, generator=gen).to(dtype) if bias else None
    got = int8_linear(x, q, scales, b)
    assert got.shape == (2, rows, 50) and got.dtype == dtype
    exact = _exact(x.reshape(-1, k), q, scales, b).reshape(2, rows, 50)
    kernel = uses_int8_kernel(x, q)
    # bfloat16 outputs and dequantized weights round to 8 bits of mantissa; the kernel computes float32
    # rows in bfloat16 too
    tol = 1e-4 if dtype == torch.float32 and not kernel else 0.02 * float(exact.abs().max())
    assert_close(got.double(), exact, atol=tol, what="int8_linear vs exact")
    assert_close(got.double(), int8_linear_reference(x, q, scales, b).double(), atol=2 * tol, what="int8_linear vs reference")
    # the kernel takes few rows of a supported width (more for float32 activations); the rest goes the
    # reference way
    assert kernel == (rows * 2 <= int8_rows_max(dtype) and k % 32 == 0)
    assert int8_rows_max(torch.bfloat16) == INT8_ROWS_MAX < int8_rows_max(torch.float32)


def test_many_rows_take_the_float_weight_when_kept():
    gen = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(64, 30)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(30, 64, generator=gen))
    layer = Int8Linear(linear, keep_float=True)
    x = torch.randn(int8_rows_max(torch.float32) + 3, 64, generator=gen)
    # more rows than the kernel takes: the float weight (oneDNN-prepacked where torch runs it), which
    # is F.linear to float32 rounding
    want = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    assert_close(layer(x).double(), want, atol=1e-4, what="many rows")
    if onednn_linear_available(torch.float32):
        assert layer.packed is not None and layer.weight is None
        assert torch.equal(layer(x), onednn_linear(x, layer.packed, layer.bias))
    else:
        assert torch.equal(layer(x), F.linear(x, linear.weight, linear.bias))
    # few rows: the int8 weight, computed in bfloat16 (the scales are kept in it)
    few = x[:2]
    assert layer.scales.dtype == torch.bfloat16
    exact = _exact(few, layer.qweight, layer.scales, linear.bias)
    assert_close(layer(few).double(), exact, atol=0.02 * float(exact.abs().max()), what="few rows")
    assert layer(few).dtype == torch.float32
    bare = Int8Linear(linear, keep_float=False)
    assert bare.weight is None and bare.packed is None
    # a shared weight (a tied output embedding) is kept dense, not copied
    shared = Int8Linear(linear, keep_float=True, shared=True)
    assert shared.packed is None and shared.weight is not None
    assert shared.weight.data_ptr() == linear.weight.data_ptr()
    assert_close(shared(x).double(), want, atol=1e-4, what="many rows, shared dense weight")


def test_tied_output_layer_keeps_the_embedding_dense(tiny_target):
    model = copy.deepcopy(tiny_target)
    model.lm_head.weight = model.get_input_embeddings().weight  # tie them
    use_int8_weights(model)
    assert model.lm_head.packed is None
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_model_with_int8_weights_tracks_the_float_model(tiny_target):
    model = copy.deepcopy(tiny_target).to(torch.bfloat16)
    reference = copy.deepcopy(model)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert use_int8_weights(model) == linears
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert_tracks(model, reference, torch.Generator().manual_seed(5))


def assert_tracks(model: torch.nn.Module, reference: torch.nn.Module, gen: torch.Generator) -> None:
    """Decode-sized passes (1 and 3 tokens after a prefix: the int8 / w8a8 kernels) of ``model`` stay
    near its float ``reference``: int8 moves the logits a little (they are a draft's), not the ranking of
    clear winners."""
    ids = torch.randint(0, TINY_VOCAB, (12,), generator=gen)
    for t in (1, 3):
        a_cache, b_cache = new_cache(model), new_cache(reference)
        forward_tokens(model, a_cache, ids[:-t], torch.arange(12 - t), None)
        forward_tokens(reference, b_cache, ids[:-t], torch.arange(12 - t), None)
        got = forward_tokens(model, a_cache, ids[-t:], torch.arange(12 - t, 12), None).float()
        want = forward_tokens(reference, b_cache, ids[-t:], torch.arange(12 - t, 12), None).float()
        assert float((got - want).abs().max()) < 0.1 * float(want.abs().max())
        assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 2 / 3


@pytest.mark.parametrize(
    "native_bf16,draft_dtype",
    [(True, "int8"), (False, "int8"), pytest.param(False, "w8a8", marks=needs_w8a8)],
)
def test_int8_draft_keeps_greedy_lossless(tiny_dirs, monkeypatch, native_bf16, draft_dtype):
    """An int8 draft computes in bfloat16 where the CPU has it natively, else in float32 (its int8
    products in bfloat16 either way); speculation with it stays token-identical to plain decoding, with
    int8 activations too."""
    from spruce import pairing

    monkeypatch.setattr(pairing, "cpu_has_native_bf16", lambda: native_bf16)
    target_dir, draft_dir = tiny_dirs
    engine = Engine.from_pretrained(target=target_dir, draft=draft_dir, draft_dtype=draft_dtype)
    assert engine.config.draft_dtype == draft_dtype
    assert any(getattr(m, "w8a8", None) is not None for m in engine.drafter.model.modules()) == (draft_dtype == "w8a8")
    assert engine.drafter is not None
    assert engine.drafter.model.dtype == (torch.bfloat16 if native_bf16 else torch.float32)
    assert any(isinstance(m, Int8Linear) for m in engine.drafter.model.modules())
    assert not any(isinstance(m, Int8Linear) for m in engine.target.modules())
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    gen = torch.Generator().manual_seed(11)
    for _ in range(3):
        prompt = torch.randint(0, 256, (int(torch.randint(3, 15, (1,), generator=gen)),), generator=gen).tolist()
        plain = engine.generate([prompt], params, speculation=None)[0]
        spec = engine.generate([prompt], params, SpeculationConfig(depth=3, top_k=2, budget=6))[0]
        assert spec.token_ids == plain.token_ids
        assert spec.stats.drafted > 0
    # sampling through the same draft: a seed reproduces its output (the draft's products are
    # deterministic), and the tokens are the vocabulary's
    sampled = SamplingParams(max_tokens=16, ignore_eos=True, temperature=0.8, seed=7)
    tree = SpeculationConfig(depth=3, top_k=2, budget=6)
    first, again = (engine.generate([[5, 6, 7, 8]], sampled, tree)[0] for _ in range(2))
    assert first.token_ids == again.token_ids and len(first.token_ids) == 16
    assert first.stats.drafted > 0 and all(0 <= t < TINY_VOCAB for t in first.token_ids)


def test_int8_draft_dtype_is_checked():
    for dtype in ("int8", "w8a8"):
        with pytest.raises(InvalidRequestError, match=f"{dtype} runs on CPU only"):
            EngineConfig(device="cuda", draft_dtype=dtype)
    with pytest.raises(InvalidRequestError, match="draft_dtype must be one of"):
        EngineConfig(draft_dtype="int4")


def test_draft_dtype_pick(monkeypatch, tiny_dirs):
    """Left out, the draft's dtype on a CPU with fast bfloat16 is bfloat16 where oneDNN runs it, else int8
    (with torch's int8 kernel), else bfloat16; on other CPUs int8 where measured clearly faster (w8a8
    where fbgemm's dynamic product runs), else the target's; off the CPU the target's."""
    from spruce.kernels import cpu_int8, cpu_linear

    from spruce import pairing

    _, draft_dir = tiny_dirs
    cpu = torch.device("cpu")
    monkeypatch.setattr(pairing, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(cpu_linear, "onednn_linear_available", lambda dtype=torch.float32: True)
    for dtype in ("float32", "bfloat16"):
        assert pairing.pick_draft_dtype(cpu, dtype, draft_dir) == "bfloat16"
        assert pairing.pick_draft_dtype(torch.device("cuda"), dtype, draft_dir) == dtype
    monkeypatch.setattr(cpu_linear, "onednn_linear_available", lambda dtype=torch.float32: False)
    for dtype in ("float32", "bfloat16"):
        assert pairing.pick_draft_dtype(cpu, dtype, draft_dir) == "int8"
    monkeypatch.setattr(cpu_int8, "int8_kernel_available", lambda: False)
    assert pairing.pick_draft_dtype(cpu, "float32", draft_dir) == "bfloat16"
    monkeypatch.setattr(pairing, "cpu_has_native_bf16", lambda: False)
    for dtype in ("float32", "bfloat16"):
        assert pairing.pick_draft_dtype(cpu, dtype, draft_dir) == dtype
    # bfloat16 emulated: int8 weights where one row through them is measured clearly faster, for a
    # draft whose layers do not fit in a cache (the tiny one does: never measured)
    monkeypatch.setattr(cpu_int8, "int8_kernel_available", lambda: True)
    monkeypatch.setattr(cpu_int8, "int8_speedup", lambda *a, **k: 2.7)
    assert pairing.pick_draft_dtype(cpu, "float32", draft_dir) == "float32"
    monkeypatch.setattr(pairing, "_INT8_MIN_LAYER_BYTES", 0)
    monkeypatch.setattr(cpu_int8, "w8a8_available", lambda: False)
    assert pairing.pick_draft_dtype(cpu, "float32", draft_dir) == "int8"
    # and int8 activations too where fbgemm's dynamic product runs
    monkeypatch.setattr(cpu_int8, "w8a8_available", lambda: True)
    assert pairing.pick_draft_dtype(cpu, "float32", draft_dir) == "w8a8"
    monkeypatch.setattr(cpu_int8, "int8_speedup", lambda *a, **k: 1.2)
    assert pairing.pick_draft_dtype(cpu, "float32", draft_dir) == "float32"
    # bfloat16 native: w8a8 where MLP-shaped layers through it measure clearly faster than bfloat16 (a
    # draft whose layers do not fit in a cache: the minimum is 0 here), else as before
    monkeypatch.setattr(pairing, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(cpu_linear, "onednn_linear_available", lambda dtype=torch.float32: True)
    monkeypatch.setattr(cpu_int8, "w8a8_mlp_speedup", lambda *a, **k: 1.4)
    for dtype in ("float32", "bfloat16"):
        assert pairing.pick_draft_dtype(cpu, dtype, draft_dir) == "w8a8"
    monkeypatch.setattr(cpu_int8, "w8a8_mlp_speedup", lambda *a, **k: 1.1)
    assert pairing.pick_draft_dtype(cpu, "float32", draft_dir) == "bfloat16"
    monkeypatch.setattr(cpu_int8, "w8a8_mlp_speedup", lambda *a, **k: 1.4)
    monkeypatch.setattr(cpu_int8, "w8a8_available", lambda: False)
    assert pairing.pick_draft_dtype(cpu, "float32", draft_dir) == "bfloat16"
    monkeypatch.setattr(pairing, "_INT8_MIN_LAYER_BYTES", 2**40)
    monkeypatch.setattr(cpu_int8, "w8a8_available", lambda: True)
    assert pairing.pick_draft_dtype(cpu, "float32", draft_dir) == "bfloat16"


def test_int8_speedup_is_measured():
    from spruce.kernels.cpu_int8 import int8_speedup

    ratio = int8_speedup(64, 96, weights_mb=1)
    assert 0 < ratio < float("inf")


@needs_w8a8
def test_w8a8_mlp_speedup_is_measured():
    from spruce.kernels.cpu_int8 import w8a8_mlp_speedup

    for dtype in (torch.bfloat16, torch.float32):
        ratio = w8a8_mlp_speedup(64, 96, dtype, weights_mb=1)
        assert 0 < ratio < float("inf")


def test_alternating_ratio_times_both_in_turn():
    from spruce.kernels.cpu_linear import alternating_ratio

    calls: list[str] = []

    def slow() -> None:
        calls.append("slow")
        time.sleep(0.02)

    def fast() -> None:
        calls.append("fast")
        time.sleep(0.001)

    ratio = alternating_ratio(slow, fast, rounds=3)
    assert calls == ["slow", "fast"] * 4
    assert ratio > 1.5


@needs_w8a8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, W8A8_ROWS_MAX // 2, W8A8_ROWS_MAX, W8A8_ROWS_MAX + 3])
@pytest.mark.parametrize("bias", [False, True])
def test_w8a8_linear_matches_reference_and_exact(dtype, rows, bias):
    """fbgemm's product equals its written-out twin (same codes, same integer sums: float rounding
    apart), and both stay within the error bound of the two quantizations from the exact product
    (2 x ``rows`` rows: one chunk of ``W8A8_ROWS_MAX`` or several, each quantized on its own)."""
    gen = torch.Generator().manual_seed(rows * 10 + bias + (dtype == torch.bfloat16) * 100)
    k, n = 96, 40
    weight = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    x = torch.randn(2, rows, k, generator=gen)
    x[..., 7] *= 30  # an outlier channel: what the smoothing is for
    x = x.to(dtype)
    w = w8a8_pack(weight, b, smooth_factors(x.reshape(-1, k).abs().amax(dim=0), weight))
    if b is not None:  # its own copy: a loaded model's bias may live in the memory-mapped checkpoint
        assert w.bias is not None and w.bias.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    got, want = w8a8_linear(x, w), w8a8_linear_reference(x, w)
    assert got.shape == (2, rows, n) and got.dtype == dtype and want.dtype == dtype
    scale_of_output = float(want.float().abs().max())
    rounding = 1e-4 if dtype == torch.float32 else 2**-7  # the output's own rounding
    assert_close(got.float(), want.float(), atol=rounding * scale_of_output, what="w8a8 vs reference")
    # |error| <= (activation step) * |row of the quantized smoothed weight|_1 + |smoothed row|_1 * (weight step / 2)
    smoothed = x.reshape(-1, k).float() * w.inv_smooth
    _, step, _ = quantize_activations(smoothed)
    wq = dequantize_int8(w.qweight, w.scales, torch.float32).double()
    bound = step * wq.abs().sum(dim=1)[None, :] + smoothed.double().abs().sum(dim=1, keepdim=True) * w.scales.double()[None, :] / 2
    exact = F.linear(x.reshape(-1, k).double(), weight.double(), None if b is None else b.double())
    err = (want.reshape(-1, n).double() - exact).abs()
    assert bool((err <= bound + rounding * exact.abs() + 1e-3).all())


@needs_w8a8
def test_w8a8_rows_are_quantized_by_chunks():
    """More than ``W8A8_ROWS_MAX`` rows go through in chunks of that many, each with its own activation
    scale: the product over all rows is the products over each chunk side by side, bit for bit, and a
    row with large values spoils only its own chunk's precision (one scale for all rows would coarsen
    every row)."""
    gen = torch.Generator().manual_seed(11)
    k, n, m = 64, 24, 2 * W8A8_ROWS_MAX + 3
    weight = torch.randn(n, k, generator=gen)
    w = w8a8_pack(weight, torch.randn(n, generator=gen), torch.ones(k))
    x = torch.randn(m, k, generator=gen)
    x[-1] *= 100  # in the last chunk
    got = w8a8_linear(x, w)
    chunks = torch.cat([w8a8_linear(part, w) for part in x.split(W8A8_ROWS_MAX)])
    assert torch.equal(got, chunks)
    assert_close(got, w8a8_linear_reference(x, w), atol=1e-4 * float(got.abs().max()), what="chunked vs reference")
    exact = F.linear(x.double(), weight.double(), w.bias.double())
    first = slice(0, W8A8_ROWS_MAX)
    # the first chunk's rows are as precise as alone; quantized with the large row they would not be
    alone = (w8a8_linear(x[first], w).double() - exact[first]).abs().max()
    assert float((got[first].double() - exact[first]).abs().max()) == float(alone)
    codes, scale, zero = quantize_activations(x)
    together = F.linear((codes - zero) * scale, dequantize_int8(w.qweight, w.scales, torch.float32), w.bias)
    assert float((together[first].double() - exact[first]).abs().max()) > 5 * float(alone)


@needs_w8a8
def test_smoothing_cuts_the_error_of_an_outlier_channel():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(64, 128, generator=gen)
    x = torch.randn(6, 128, generator=gen)
    x[:, 3] *= 50
    exact = x.double() @ weight.double().t()
    plain = w8a8_pack(weight, None, torch.ones(128))
    smoothed = w8a8_pack(weight, None, smooth_factors(x.abs().amax(dim=0), weight))

    def rel(w):
        return float((w8a8_linear(x, w).double() - exact).norm() / exact.norm())

    assert rel(smoothed) < 0.5 * rel(plain)


def test_rescore_top_ranks_the_candidates_exactly():
    """The top R of the approximate output per row get the int8 weight's float product; every other
    entry is capped below them, so the candidates rank first and exactly among themselves."""
    gen = torch.Generator().manual_seed(8)
    n, k, top = 300, 64, 16
    q, scales = quantize_int8(torch.randn(n, k, generator=gen))
    b = torch.randn(n, generator=gen)
    x = torch.randn(1, 3, k, generator=gen)
    exact = int8_linear_reference(x.float(), q, scales.float(), b).reshape(3, n)
    approx = (exact + 0.3 * torch.randn(3, n, generator=gen)).reshape(1, 3, n)
    out = rescore_top(x, approx, q, scales, b, top).reshape(3, n)
    assert out.shape == (3, n) and out.dtype == x.dtype
    for r in range(3):
        picked = approx[0, r].topk(top).indices
        rest = torch.ones(n, dtype=torch.bool)
        rest[picked] = False
        assert_close(out[r, picked].double(), exact[r, picked].double(), atol=1e-4, what="candidates")
        floor = out[r, picked].min()
        assert torch.equal(out[r, rest], torch.minimum(approx[0, r, rest], floor))
        # the exact winner is among the candidates here (noise << the logits' spread): it wins
        assert int(out[r].argmax()) == int(exact[r].argmax())
        assert out[r].topk(3).indices.tolist() == exact[r].topk(3).indices.tolist()


@needs_w8a8
def test_w8a8_goes_to_the_layers_that_read_a_norm(tiny_target):
    """With activations: q/k/v and gate/up (inputs from an RMSNorm) and the output layer (rescored) get
    w8a8, the attention output and down projections stay weight-only; each decoder's q/k/v share one
    product, its gate/up another (``SharedInput``); passes of more than ``W8A8_ROWS_MAX`` rows take the
    float weight; the model tracks the float one."""
    model = copy.deepcopy(tiny_target)
    reference = copy.deepcopy(model)
    use_int8_weights(model, activations=True)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    normed = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")
    assert {name for name, m in layers.items() if m.w8a8 is not None or m.shared_input is not None} == {
        name for name in layers if name.rsplit(".", 1)[-1] in normed
    }
    assert {name for name, m in layers.items() if m.rescore} == {"lm_head"} and model.lm_head.rescore == RESCORE_TOP
    assert model.lm_head.shared_input is None and model.lm_head.w8a8 is not None
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        assert [attn.q_proj.shared_input[1], attn.k_proj.shared_input[1], attn.v_proj.shared_input[1]] == [0, 1, 2]
        assert attn.q_proj.shared_input[0] is attn.k_proj.shared_input[0] is attn.v_proj.shared_input[0]
        assert mlp.gate_proj.shared_input[0] is mlp.up_proj.shared_input[0] and mlp.up_proj.shared_input[1] == 1
        assert attn.o_proj.shared_input is None and mlp.down_proj.shared_input is None and attn.q_proj.w8a8 is None
    gen = torch.Generator().manual_seed(6)
    up = model.model.layers[0].mlp.up_proj
    many = torch.randn(W8A8_CHUNKED_ROWS_MAX + 1, up.in_features, generator=gen)
    assert torch.equal(up(many), int8_linear(many, up.qweight, up.scales, up.bias, up.packed if up.packed is not None else up.weight))
    joint = up.shared_input[0]
    for rows in (2, W8A8_ROWS_MAX + 1, W8A8_CHUNKED_ROWS_MAX):  # one chunk, two, the most chunks
        few = many[:rows]
        assert torch.equal(up(few), w8a8_linear(few, joint.weight)[:, joint.sizes[0] :])
    assert w8a8_rows_max(torch.float32) == W8A8_CHUNKED_ROWS_MAX and w8a8_rows_max(torch.bfloat16) == W8A8_ROWS_MAX
    assert_tracks(model, reference, gen)
    separate = copy.deepcopy(reference)
    use_int8_weights(separate, activations=True, shared_inputs=False)
    assert all(m.shared_input is None for m in separate.modules() if isinstance(m, Int8Linear))
    assert_tracks(model, separate, gen)


@needs_w8a8
@pytest.mark.parametrize("bias", [False, True])
def test_shared_input_gives_each_layer_its_part(bias):
    """Layers sharing one product get their parts of the twin's product with their weights side by side,
    called in turn with one input or each with its own; within the quantization bound of each exact
    product; nothing is held once every part was taken."""
    gen = torch.Generator().manual_seed(11 + bias)
    k = 64
    linears = [torch.nn.Linear(k, n, bias=bias and i != 1) for i, n in enumerate((48, 16, 16))]
    for m in linears:
        torch.nn.init.normal_(m.weight, generator=gen)
    x = torch.randn(3, k, generator=gen)
    x[:, 5] *= 40
    joint = SharedInput(linears, x.abs().amax(dim=0))
    want = w8a8_linear_reference(x, joint.weight).split(joint.sizes, dim=-1)
    in_turn = [joint.output(x, i) for i in range(3)]
    assert joint._input is None and joint._outputs == []
    # each part asked for with a tensor of its own (the same values): computed afresh, the same
    alone = {i: joint.output(x.clone(), i) for i in (2, 0, 1)}
    for i, (got, w, m) in enumerate(zip(in_turn, want, linears)):
        assert torch.equal(alone[i], got)
        assert got.shape == w.shape and got.is_contiguous()
        assert_close(got, w, atol=1e-4 * float(w.abs().max()), what="shared part vs twin")
        exact = m(x).detach()
        assert float((got - exact).abs().max()) < 0.05 * float(exact.abs().max())


@needs_w8a8
def test_w8a8_layer_takes_the_bfloat16_weight_above_one_chunk():
    """bfloat16 activations: up to ``W8A8_ROWS_MAX`` rows through the w8a8 product, more through the kept
    bfloat16 weight (no chunks: that weight's product is the cheaper one where bfloat16 is native);
    float32 activations keep the chunks up to ``W8A8_CHUNKED_ROWS_MAX``."""
    gen = torch.Generator().manual_seed(21)
    for dtype, limit in ((torch.bfloat16, W8A8_ROWS_MAX), (torch.float32, W8A8_CHUNKED_ROWS_MAX)):
        linear = torch.nn.Linear(64, 48).to(dtype)
        torch.nn.init.normal_(linear.weight, generator=gen)
        layer = Int8Linear(linear, input_absmax=torch.rand(64, generator=gen) + 0.5)
        assert layer.w8a8 is not None
        float_weight = layer.packed if layer.packed is not None else layer.weight
        x = torch.randn(limit + 1, 64, generator=gen).to(dtype)
        assert torch.equal(layer(x[:limit]), w8a8_linear(x[:limit], layer.w8a8))
        assert torch.equal(layer(x), int8_linear(x, layer.qweight, layer.scales, layer.bias, float_weight))
        exact = F.linear(x.float(), linear.weight.float(), linear.bias.float())
        assert_close(layer(x).float(), exact, atol=0.05 * float(exact.abs().max()), rtol=0.0)
