"""Model-pair checks and choices made when an engine is built: can these models be verified by id with
spruce's cache surgery, what ends a generation, and which precision the draft runs in."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from spruce.config import INT8_DRAFT_DTYPES
from spruce.errors import IncompatibleModelsError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


# A bfloat16 draft must be at least this much faster per row than float32 to be chosen automatically.
_BF16_DRAFT_MIN_SPEEDUP = 1.3
# ... and an int8 one, where bfloat16 is not native, this much faster than the target's dtype (a wide
# margin: a machine near it would pick differently from run to run, and the draft shapes seeded trees)
_INT8_DRAFT_MIN_SPEEDUP = 1.5
# ... and, where bfloat16 is native, a w8a8 one (int8 activations where they do little harm) this much
# faster than bfloat16 through MLP-shaped layers (measured 1.39-1.51 on the CPU that chose this margin,
# which keeps the answer from flipping between runs there)
_W8A8_DRAFT_MIN_SPEEDUP = 1.15
# ... and only for a draft whose layers do not fit in a CPU cache (a float32 MLP weight of at least this
# many bytes; the embedded draft's is 17 MB): a smaller one is not bound by reading its weights, and its
# choice would rest on timings too close to call
_INT8_MIN_LAYER_BYTES = 4 * 2**20


def pick_draft_dtype(device: torch.device, dtype: str, draft_dir: Path) -> str:
    """The draft's dtype when not given. On a CPU where bfloat16 is fast (native dot products, or
    measured clearly faster): "w8a8" where fbgemm's dynamic product runs and MLP-shaped layers through it
    measure at least ``_W8A8_DRAFT_MIN_SPEEDUP`` times faster than in bfloat16 (for a draft whose layers
    do not fit in a cache), else bfloat16 where torch's oneDNN matmul runs it with prepacked weights
    (``spruce.kernels.cpu_linear``), else int8 weights with bfloat16 activations where torch has its
    weight-only int8 kernel (``spruce.kernels.cpu_int8``), else bfloat16. On a CPU where bfloat16 is
    emulated: int8 weights (float32 activations, the int8 products in bfloat16) where one row through
    them is measured at least ``_INT8_DRAFT_MIN_SPEEDUP`` times faster than in the target's dtype, with
    int8 activations in the layers that read a norm's output ("w8a8") where fbgemm's dynamic product
    runs, else the target's dtype. Off the CPU, the target's ``dtype``.

    The target's verification keeps the output exact whatever the draft computes in, so the draft may
    trade precision for speed. Measured on the embedded pair (evals/results/): a bfloat16 draft kept
    the same acceptance and made float32 speculation 1.33x instead of 1.12x faster than plain decoding;
    int8 weights then cut a draft level from 0.14 to 0.085 s. With prepacked oneDNN weights a bfloat16
    level costs about what the int8 one does for 1 token and less for 2 or more (60 / 62 / 69 ms for 1 /
    4 / 8 tokens against 55 / 84 / 121 ms, kernels/NOTES.md), in exact bfloat16 and 1x the memory.
    On an AVX2 CPU without bfloat16 dot products, a float32 draft pass costs 295 / 302 / 340 ms for
    1 / 4 / 8 tokens, with int8 weights 114 / 151 ms for 1 / 4 (kernels/NOTES.md).
    """
    if device.type != "cpu":
        return dtype
    from spruce.kernels import cpu_int8
    from spruce.kernels.cpu_linear import onednn_linear_available

    hidden, inner = _mlp_shape(draft_dir)
    big = 4 * hidden * inner >= _INT8_MIN_LAYER_BYTES  # float32 bytes of one MLP weight
    fast_bf16 = cpu_has_native_bf16()
    if fast_bf16 is None:
        from spruce.kernels.cpu_linear import bf16_speedup

        fast_bf16 = bf16_speedup(hidden, inner) >= _BF16_DRAFT_MIN_SPEEDUP
    if not fast_bf16:
        # bfloat16 is emulated here, but torch's int8 kernel still reads a quarter of float32's bytes
        int8 = big and cpu_int8.int8_kernel_available()
        if int8 and cpu_int8.int8_speedup(hidden, inner, torch_dtype(dtype)) >= _INT8_DRAFT_MIN_SPEEDUP:
            # int8 activations too where fbgemm's product runs (measured there, side by side on the
            # embedded pair: 1.67x against 1.53x plain decoding at 1 request, 1.21x against 1.03x at 4)
            return "w8a8" if cpu_int8.w8a8_available() else "int8"
        return dtype
    # measured on a 2-core AVX-512 CPU with bfloat16 and VNNI dot products (embedded pair, float32 target):
    # a draft level 25 against 36 ms, the default 1.41x against 1.32x plain decoding at 1 request (means
    # of 2 and 3 runs; kernels/NOTES.md)
    w8a8 = big and cpu_int8.int8_kernel_available() and cpu_int8.w8a8_available()
    if w8a8 and cpu_int8.w8a8_mlp_speedup(hidden, inner, torch.bfloat16) >= _W8A8_DRAFT_MIN_SPEEDUP:
        return "w8a8"
    if onednn_linear_available(torch.bfloat16) or not cpu_int8.int8_kernel_available():
        return "bfloat16"
    return "int8"


def _mlp_shape(draft_dir: Path) -> tuple[int, int]:
    """(hidden size, MLP inner size) of the draft, from its config."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(draft_dir, local_files_only=True)
    hidden = int(getattr(cfg, "hidden_size", 1024))
    return hidden, int(getattr(cfg, "intermediate_size", 4 * hidden))


def cpu_has_native_bf16() -> bool | None:
    """Whether the CPU advertises bfloat16 dot products (avx512_bf16 / amx_bf16); None if unknown.

    A fixed answer per machine keeps seeded sampling reproducible (the draft's dtype shapes the trees,
    and so the random stream); timing is the fallback where the flags cannot be read.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a model loads in. An int8 draft (int8 linear weights) computes in bfloat16 on a
    CPU with native bfloat16, else in float32 (its int8 products still run in bfloat16:
    ``spruce.kernels.cpu_int8``; the rest of a bfloat16 model is slow where bfloat16 is emulated)."""
    if name in INT8_DRAFT_DTYPES:
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def eos_ids(model: PreTrainedModel, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def check_pair(target: PreTrainedModel, draft: PreTrainedModel) -> None:
    if draft.device != target.device:
        raise IncompatibleModelsError(f"draft on {draft.device} but target on {target.device}")


def check_cache_layout(model: PreTrainedModel) -> None:
    """Tree verification moves KV slots by absolute position: every layer must keep full attention."""
    cfg = model.config
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"} or getattr(cfg, "use_sliding_window", False):
        raise IncompatibleModelsError(
            f"{getattr(cfg, 'model_type', 'model')} uses {sorted(kinds)} layers: spruce's tree verification "
            "needs full-attention layers throughout (sliding-window caches are not supported yet)"
        )


def check_tokenizers(target_tok, draft_tok) -> None:
    """Draft tokens are verified by id, so both models must share one vocabulary."""
    if target_tok.get_vocab() != draft_tok.get_vocab():
        raise IncompatibleModelsError(
            "target and draft tokenizers differ: speculation verifies token ids, so the pair must share "
            "one vocabulary"
        )
