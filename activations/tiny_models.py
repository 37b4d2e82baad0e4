"""Tiny randomly initialised models of each supported family, built from a config (no download).

Tests use them to exercise the adapter, hooks and harvesting on every architecture in seconds.
"""
from __future__ import annotations

from typing import Any

import torch

TINY_FAMILIES: tuple[str, ...] = ("llama", "mistral", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3", "gpt2", "gpt_neox")


def tiny_config(family: str, vocab_size: int, **overrides: Any) -> Any:
    """A transformers config of `family` with 4 layers, d_model 64 (override any field)."""
    from transformers import AutoConfig

    common: dict[str, Any] = dict(vocab_size=vocab_size, bos_token_id=None, eos_token_id=None)
    if family == "gpt2":
        fields = dict(n_embd=64, n_layer=4, n_head=4, n_positions=512)
    elif family == "gpt_neox":
        fields = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                      max_position_embeddings=512)
    else:
        fields = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, max_position_embeddings=512, head_dim=16)
    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny config for family {family!r}; expected one of {', '.join(TINY_FAMILIES)}")
    config = AutoConfig.for_model(family, **{**common, **fields, **overrides})
    return config


def build_tiny_model(family: str = "llama", seed: int = 0, tokenizer: Any = None, **overrides: Any) -> tuple[torch.nn.Module, Any]:
    """Return `(model, tokenizer)`: a random `family` model in eval mode sized for the tokenizer.

    Without a tokenizer given, the embedded SmolLM2 tokenizer (with its chat template) is used.
    """
    from transformers import AutoModelForCausalLM

    from activations.model_loading import load_embedded_tokenizer, prepare_tokenizer

    if tokenizer is None:
        tokenizer = load_embedded_tokenizer()
    config = tiny_config(family, vocab_size=len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.requires_grad_(False)
    model.config.name_or_path = f"tiny-random-{family}"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, prepare_tokenizer(tokenizer)
