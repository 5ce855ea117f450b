"""CPU fast paths against their reference twins, on fresh random inputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VOCAB, assert_close
from spruce.kernels.cpu_linear import (
    ONEDNN_MIN_ROWS,
    SMALL_ROWS_MAX,
    OneDnnLinear,
    SmallRowsLinear,
    onednn_linear,
    onednn_linear_available,
    onednn_pack,
    small_rows_linear,
    use_onednn_linear,
    use_small_rows_linear,
)
from spruce.kernels.reference import masked_attention

from spruce.modeling import forward_tokens, new_cache

# float32 products of length <= 1024: only the summation order differs
F32_LINEAR_ATOL = 1e-4


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, SMALL_ROWS_MAX, SMALL_ROWS_MAX + 1, 33])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (1,), (2,)])
def test_small_rows_linear_matches_f_linear(rows, bias, lead):
    gen = torch.Generator().manual_seed(rows * 10 + len(lead))
    x = torch.randn(*lead, rows, 96, generator=gen)
    w = torch.randn(200, 96, generator=gen)
    b = torch.randn(200, generator=gen) if bias else None
    got = small_rows_linear(x, w, b)
    assert got.shape == (*lead, rows, 200)
    assert_close(got, F.linear(x, w, b), atol=F32_LINEAR_ATOL, what="small_rows_linear")


def test_small_rows_linear_leaves_other_dtypes_to_f_linear():
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    assert torch.equal(small_rows_linear(x, w, None), F.linear(x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_rows_linear_on_strided_slice(dtype):
    """The [1, 1, K] slice that logits_to_keep=1 takes from a [1, T, K] hidden state."""
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(1, 3, 32, generator=gen).to(dtype)
    w = torch.randn(50, 32, generator=gen).to(dtype)
    x = hidden[:, -1:, :]
    assert x.stride(0) != x.numel()
    got = small_rows_linear(x, w, None)
    assert got.shape == (1, 1, 50)
    assert_close(got.float(), F.linear(x, w).float(), atol=F32_LINEAR_ATOL if dtype == torch.float32 else 0.1, what="slice")


def assert_same_logits(fast, model, seed: int, sizes: tuple[int, ...]) -> None:
    """``fast`` (a copy of ``model`` on another linear path) gives ``model``'s logits for passes of each
    size in ``sizes`` after a cached prefix, on fresh random tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY_VOCAB, (12,), generator=gen)
    for t in sizes:
        a_cache, b_cache = new_cache(fast), new_cache(model)
        forward_tokens(fast, a_cache, ids[:-t], torch.arange(12 - t), None)
        forward_tokens(model, b_cache, ids[:-t], torch.arange(12 - t), None)
        got = forward_tokens(fast, a_cache, ids[-t:], torch.arange(12 - t, 12), None)
        want = forward_tokens(model, b_cache, ids[-t:], torch.arange(12 - t, 12), None)
        assert_close(got, want, atol=F32_LINEAR_ATOL * 10, what=f"logits T={t}")


def test_model_with_small_rows_linear_matches_original(tiny_target):
    fast = copy.deepcopy(tiny_target)
    assert use_small_rows_linear(fast) == sum(isinstance(m, torch.nn.Linear) for m in tiny_target.modules())
    assert all(type(m) is SmallRowsLinear for m in fast.modules() if isinstance(m, torch.nn.Linear))
    assert_same_logits(fast, tiny_target, seed=2, sizes=(1, 3, 5))


needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="torch has no working oneDNN matmul here")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 2, ONEDNN_MIN_ROWS - 1, ONEDNN_MIN_ROWS, 7, 16, 17, 40])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("lead", [(), (2,)])
def test_onednn_linear_matches_f_linear(rows, bias, packed, lead):
    gen = torch.Generator().manual_seed(1000 + rows * 8 + 4 * bias + 2 * packed + len(lead))
    x = torch.randn(*lead, rows, 96, generator=gen)
    w = torch.randn(200, 96, generator=gen)
    b = torch.randn(200, generator=gen) if bias else None
    got = onednn_linear(x, onednn_pack(w) if packed else w, b)
    assert got.shape == (*lead, rows, 200)
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert_close(got.double(), want, atol=F32_LINEAR_ATOL, what="onednn_linear")


@needs_onednn
def test_onednn_linear_on_strided_slice():
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(1, 3, 32, generator=gen)
    w = torch.randn(50, 32, generator=gen)
    got = onednn_linear(hidden[:, -1:, :], onednn_pack(w), None)
    assert got.shape == (1, 1, 50)
    assert_close(got, F.linear(hidden[:, -1:, :], w), atol=F32_LINEAR_ATOL, what="slice")


@needs_onednn
def test_model_with_onednn_linear_matches_original(tiny_target):
    fast = copy.deepcopy(tiny_target)
    linears = sum(isinstance(m, torch.nn.Linear) for m in tiny_target.modules())
    assert use_onednn_linear(fast) == linears
    assert not any(isinstance(m, torch.nn.Linear) for m in fast.modules())
    assert all(m.packed is not None and m.weight is None for m in fast.modules() if isinstance(m, OneDnnLinear))
    assert_same_logits(fast, tiny_target, seed=3, sizes=(1, 3, 6))


@needs_onednn
def test_onednn_linear_keeps_a_tied_output_layer_dense():
    from conftest import build_tiny_model

    model = build_tiny_model(seed=4, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, TINY_VOCAB, (1, 7), generator=torch.Generator().manual_seed(6))
    want = model(ids).logits
    use_onednn_linear(model)
    head = model.lm_head
    assert isinstance(head, OneDnnLinear) and head.packed is None
    assert head.weight is model.model.embed_tokens.weight
    assert_close(model(ids).logits, want, atol=F32_LINEAR_ATOL * 10, what="tied logits")


def test_loader_picks_the_linear_path_by_dtype(tiny_dirs):
    from spruce.models import load_causal_lm

    f32 = load_causal_lm(tiny_dirs[0], torch.float32, torch.device("cpu"))
    bf16 = load_causal_lm(tiny_dirs[0], torch.bfloat16, torch.device("cpu"))
    want = OneDnnLinear if onednn_linear_available() else SmallRowsLinear
    assert all(isinstance(m, want) for m in f32.model.layers.modules() if hasattr(m, "in_features"))
    assert all(type(m) is SmallRowsLinear for m in bf16.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2), (6, 1)])
def test_reference_attention_matches_sdpa(h, hkv):
    gen = torch.Generator().manual_seed(h + hkv)
    t, s, d = 5, 9, 16
    q = torch.randn(h, t, d, generator=gen, dtype=torch.float64)
    k = torch.randn(hkv, s, d, generator=gen, dtype=torch.float64)
    v = torch.randn(hkv, s, d, generator=gen, dtype=torch.float64)
    visible = torch.rand(t, s, generator=gen) < 0.6
    visible[:, 0] = True
    out, lse = masked_attention(q, k, v, visible)
    rep = h // hkv
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0), attn_mask=visible
    )
    assert_close(out, want, atol=1e-12, what="attention output")
    scores = (q @ k.repeat_interleave(rep, 0).transpose(-1, -2)) / math.sqrt(d)
    want_lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)
    assert_close(lse, want_lse, atol=1e-12, what="lse")
