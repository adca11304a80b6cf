"""Tiny random source causal LMs of several architectures, for the fast test suite."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Qwen2Config,
    Qwen3Config,
)

HIDDEN = 64
LAYERS = 2
CONTEXT = 256

# architecture -> (config builder, tokenizer family it is paired with in tests)
ARCHITECTURES = {
    "llama": "sentencepiece",
    "qwen2": "bytelevel",
    "qwen3": "bytelevel",
    "olmo2": "bytelevel",
    "gpt2": "bytelevel",
    "gpt_neox": "bytelevel",
    "gemma3": "sentencepiece",
    "mistral": "sentencepiece",
}


def tiny_config(arch: str, vocab_size: int, context: int = CONTEXT, special_ids: dict | None = None):
    special_ids = special_ids or {}
    common = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        **special_ids,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=16)
    if arch == "olmo2":
        return Olmo2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common)
    if arch == "gemma3":
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=16)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=context, **special_ids)
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            max_position_embeddings=context,
            **special_ids,
        )
    raise KeyError(arch)


def tiny_source(arch: str, tokenizer, seed: int = 0, extra_rows: int = 3, context: int = CONTEXT):
    """A random source LM whose vocabulary fits `tokenizer` (with a few padded embedding rows, as real
    models often have)."""
    ids = {
        k: getattr(tokenizer, k)
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if getattr(tokenizer, k, None) is not None
    }
    config = tiny_config(arch, len(tokenizer) + extra_rows, context=context, special_ids=ids)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny_source(folder, arch: str, tokenizer, **kwargs):
    """`tiny_source(arch, tokenizer, **kwargs)` saved as an HF folder (weights and tokenizer), the way
    `bytelift.sources.load_source` reads a source; returns the model."""
    model = tiny_source(arch, tokenizer, **kwargs)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model
