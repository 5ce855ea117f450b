"""A local .gguf file as a model: a tiny Qwen2 written to GGUF (float32 tensors) converts to a model
directory whose outputs equal the original's."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MERGES, TINY_VOCAB, assert_close, build_tiny_model

from spruce import Engine, SamplingParams
from spruce.models import resolve_model_dir

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight", "model.norm.weight": "output_norm.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER_NAMES[rest]}"


def write_tiny_gguf(model, tokenizer, path) -> None:
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    special = set(tokenizer.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([f"{a} {b}" for a, b in TINY_MERGES])
    w.add_eos_token_id(tokenizer.eos_token_id)
    w.add_bos_token_id(tokenizer.eos_token_id)
    for name, tensor in model.state_dict().items():
        w.add_tensor(gguf_name(name), tensor.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tokenizer):
    model = build_tiny_model(seed=5)
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf"
    write_tiny_gguf(model, tokenizer, path)
    return model, path


def test_gguf_converts_to_equal_model(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("SPRUCE_CACHE_DIR", str(tmp_path / "cache"))
    model, path = tiny_gguf
    model_dir = resolve_model_dir(path, "target")
    assert (model_dir / "config.json").is_file()
    # a second resolve reuses the conversion (keyed by the file's sha256)
    assert resolve_model_dir(path, "target") == model_dir
    engine = Engine.from_pretrained(target=path, draft=path)
    ids = torch.randint(0, TINY_VOCAB, (10,), generator=torch.Generator().manual_seed(0))
    got = engine.target(ids[None]).logits[0]
    want = model(ids[None]).logits[0]
    assert_close(got, want, atol=1e-4, what="gguf-converted logits")
    out = engine.generate([ids.tolist()], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5
