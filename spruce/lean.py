"""A lean forward of a Llama-family decoder for spruce's packed passes on a CPU.

A draft level on a CPU reads the draft's weights for a few rows: its products are bound by memory, and
what surrounds them is not small. transformers' forward wraps each of a 24-layer model's ~340 module calls
in hooks, keyword plumbing and decorators, builds rotary tables per pass and rotates q and k apart.
Measured on a 2-core CPU (kernels/NOTES.md): the loop below takes 4-11% off a level of the embedded
0.5B w8a8 draft (22.9 -> 20.4 ms for one token) and 3-4% off a pass of the float32 1.5B target; what
remains of a level is mostly its products, bound by the bytes of the weights.
``LeanDecoder`` runs the same computation as a loop over the layers' own modules (so int8, w8a8 and
oneDNN linear layers, a narrowed output layer, keep working as converted) and the same elementwise ops in
the same order: in float32 its logits equal transformers' bit for bit (tested), in bfloat16 they agree
to its rounding.

Scope (``lean_unsupported`` says why a model is left to transformers): the architectures whose decoder
layer is pre-norm RMSNorm -> attention with q/k/v/o projections and default RoPE -> RMSNorm -> gated
SiLU MLP (Llama, Mistral, Qwen2), on a CPU, for passes through ``spruce.kvcache.run_packed`` (slot
caches, ``BatchAttention`` metadata). Glossary: N rows in the pass, H query heads, Hkv key/value heads,
D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.nn.modules import module as torch_module

from spruce.attention import packed_attention
from spruce.modeling import cache_kwarg

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from spruce.kvcache import BatchAttention, SlotKVCache

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2")
_LAYER_PARTS = (
    "input_layernorm",
    "post_attention_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def lean_unsupported(model: PreTrainedModel) -> str | None:
    """Why ``LeanDecoder`` cannot run ``model`` (None: it can)."""
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    if kind not in LEAN_MODEL_TYPES:
        return f"model type {kind!r} is not one of {LEAN_MODEL_TYPES}"
    if model.device.type != "cpu":
        return f"the model is on {model.device}, not the CPU"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"activation {getattr(cfg, 'hidden_act', None)!r} is not silu"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"RoPE type {rope.get('rope_type', rope.get('type'))!r} is not the default"
    base: Any = getattr(model, "model", None)
    for part in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(base, part):
            return f"the model has no model.{part}"
    if getattr(model, "lm_head", None) is None:
        return "the model has no lm_head"
    for layer in base.layers:
        for part in _LAYER_PARTS:
            if _get(layer, part) is None:
                return f"a decoder layer has no {part}"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon") or getattr(norm, "weight", None) is None:
                return f"{type(norm).__name__} is not an RMSNorm with a weight and variance_epsilon"
    if not hasattr(base.norm, "variance_epsilon"):
        return "the final norm is not an RMSNorm"
    if getattr(base.rotary_emb, "inv_freq", None) is None:
        return "the rotary embedding has no inv_freq"
    return None


def _get(module: torch.nn.Module, dotted: str) -> Any:
    for name in dotted.split("."):
        module = getattr(module, name, None)  # type: ignore[assignment]
        if module is None:
            return None
    return module


@dataclass
class LeanOutput:
    """What ``spruce.kvcache.run_packed`` reads of a model's output."""

    # [1, rows, V]
    logits: torch.Tensor


class LeanDecoder:
    """``model``'s forward over a packed pass, as a plain loop (see the module docstring). Holds references
    to the model's modules, not copies: converting the model's layers afterwards is not seen (build it
    after conversion)."""

    def __init__(self, model: PreTrainedModel) -> None:
        reason = lean_unsupported(model)
        if reason is not None:
            raise ValueError(f"no lean forward for this model: {reason}")
        self.model = model
        self.config = model.config
        base = model.model
        self.embed = base.embed_tokens
        self.final_norm = base.norm
        self.head = model.lm_head
        self.layers = [[_get(layer, part) for part in _LAYER_PARTS] for layer in base.layers]
        attn = base.layers[0].self_attn
        cfg = model.config
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(attn, "head_dim", None) or cfg.hidden_size // self.heads)
        self.scaling = float(getattr(attn, "scaling", self.head_dim**-0.5))
        self.rotary = base.rotary_emb
        # the modules whose forward the loop does not call (it calls the linear layers and the embedding)
        self._bypassed = [model, base, base.norm, base.rotary_emb]
        for layer in base.layers:
            self._bypassed += [layer, layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm]

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.inference_mode()
    def forward(
        self,
        # [1, N]
        input_ids: torch.Tensor,
        # [1, N] absolute positions
        position_ids: torch.Tensor,
        # unused: the pass's masks come with ``spruce_batch`` (``run_packed`` passes a placeholder)
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        # [rows] indices of the rows whose logits are wanted
        logits_to_keep: torch.Tensor | None = None,
        spruce_batch: BatchAttention | None = None,
        cache: SlotKVCache | None = None,
    ) -> LeanOutput:
        if spruce_batch is None or cache is None:
            raise ValueError("the lean forward runs packed passes only: spruce_batch and cache are required")
        if self.hooked():  # someone's instrumentation (a test's fault, a profiler) expects the real forward
            return self.model(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=attention_mask,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                spruce_batch=spruce_batch,
                **{cache_kwarg(type(self.model)): cache},
            )
        hidden = self.embed(input_ids[0])  # [N, hidden]
        cos, sin = self._rotary(position_ids[0], hidden.dtype)
        n = hidden.shape[0]
        for index, (norm1, norm2, q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) in enumerate(self.layers):
            normed = _rms_norm(hidden, norm1)
            q = _rotate(q_proj(normed).view(n, self.heads, self.head_dim), cos, sin)
            k = _rotate(k_proj(normed).view(n, self.kv_heads, self.head_dim), cos, sin)
            v = v_proj(normed).view(n, self.kv_heads, self.head_dim)
            # the cache hook takes transformers' [1, Hkv, N, D] layout and writes each row to its slot
            keys, values = cache.update(k.transpose(0, 1)[None], v.transpose(0, 1)[None], index)
            attn = packed_attention(q.transpose(0, 1)[None], keys, values, spruce_batch, self.scaling)
            hidden = hidden + o_proj(attn.reshape(n, -1).contiguous())
            normed = _rms_norm(hidden, norm2)
            hidden = hidden + down_proj(F.silu(gate_proj(normed)) * up_proj(normed))
        hidden = _rms_norm(hidden, self.final_norm)
        rows = hidden if logits_to_keep is None else hidden[logits_to_keep]
        return LeanOutput(self.head(rows)[None])

    __call__ = forward

    def hooked(self) -> bool:
        """Whether a forward hook or pre-hook sits on a module whose forward the loop skips (or on every
        module): then a pass runs through the model's own forward, so that the hook sees it."""
        if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self._bypassed)

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, D] cos and sin of each row's position (transformers' default RoPE, computed as it does)."""
        inv_freq = self.rotary.inv_freq
        freqs = positions[:, None].float() * inv_freq.to(device=positions.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = float(getattr(self.rotary, "attention_scaling", 1.0))
        cos, sin = emb.cos() * scaling, emb.sin() * scaling
        # [N, 1, D]: broadcast over heads
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def _rms_norm(x: torch.Tensor, norm: Any) -> torch.Tensor:
    """transformers' Llama/Qwen2 RMSNorm, op for op: in float32, the weight applied in ``x``'s dtype."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * xf.to(x.dtype)


def _rotate(
    # [N, heads, D]
    x: torch.Tensor,
    # [N, 1, D]
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """RoPE with transformers' half rotation: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)
