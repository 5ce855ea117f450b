"""A byte-level tokenizer built in code (no files, no hub): for random-weight models at any shape (the
GPU profile) and for the test suite's tiny models. 256 byte tokens, two merges, then <|endoftext|>,
<|im_start|>, <|im_end|>, and a ChatML template."""

from __future__ import annotations

# 256 byte tokens + two merges ("ĠĠ", "Ġt"; a GGUF array of one merge reads back as a scalar in 5.17) +
# <|endoftext|> + <|im_start|> + <|im_end|>
BYTE_VOCAB = 261
BYTE_EOS_ID = 258
BYTE_MERGES = [("Ġ", "Ġ"), ("Ġ", "t")]


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_alphabet))}
    for a, b in BYTE_MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=BYTE_MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert len(fast) == BYTE_VOCAB
    return fast
