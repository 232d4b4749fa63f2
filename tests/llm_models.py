"""Tiny causal LMs and a character-level ChatML tokenizer for the causal-LM tests.

Built from configs in memory (no hub, no files): the tokenizer maps each character to one id,
so token counts are string lengths, and carries a ChatML chat template like SmolLM2's (minus
the default system prompt). The models are 2-layer Llama or Qwen2 decoders sized to its
vocabulary, with `lm_head` tied to `embed_tokens` (as in SmolLM2) unless asked otherwise.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]


def char_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """One id per printable ASCII character (and newline); ChatML specials; pad `<pad>`."""
    chars = sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    vocab = {token: i for i, token in enumerate(SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.add_special_tokens(SPECIALS)
    # WordLevel joins decoded tokens with spaces; Fuse joins the characters back as they were.
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_causal_lm(
    kind: str = "llama",
    seed: int = 0,
    tied: bool = True,
    vocab_size: int | None = None,
    kv_heads: int = 2,
) -> LlamaForCausalLM | Qwen2ForCausalLM:
    """A 2-layer, width-32 decoder in train mode, sized to :func:`char_tokenizer`'s vocabulary.

    ``kv_heads``: key/value heads (of 4 heads of width 8); 4 makes every projection hold a
    multiple of 1024 weights, as nf4 storage needs.
    """
    vocab = vocab_size or len(char_tokenizer())
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(f"tiny_causal_lm: kind must be 'llama' or 'qwen', not {kind!r}")
    return model.train()
