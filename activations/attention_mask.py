"""The attention mask of a padded batch, built on its device so the forward never reads it back.

Given a 2D padding mask, transformers builds the 4D mask itself and on the way asks whether the
batch has any padding at all (`padding_mask.all()` / `fast_all` in `transformers.masking_utils`;
without a mask it asks whether `position_ids` pack several sequences). Each question is a value read
back from the GPU: the host stops until the previous batch's kernels are done, then the GPU idles
while the host launches the next ones. At the 8B shape that is about one idle stretch per forward
(`bench/harvest.py --diagnose`). A prepared 4D mask is used as given (`_preprocess_mask_arguments`
returns it as-is), so a forward with one launches without waiting for the GPU. It goes into the
truncated forwards of `activations.hooks.capture_residuals`, whose loop (the harvest) runs ahead of
the GPU; the evaluation forwards copy their logits to the host after every batch, so the GPU is idle
there when the next batch's mask is built and a read-back costs nothing more.

The prepared mask is transformers' own causal-and-padding mask: query i sees key j when j <= i and
key j is a real token (a left-padding query sees nothing: sdpa returns zeros there, eager attention
a uniform average; neither is ever read). The forward's outputs are the ones transformers' mask gives.
"""
from __future__ import annotations

import sys

import torch

from activations.adapter import ModelAdapter

PREPARED_IMPLEMENTATIONS = ("sdpa", "eager")
"""Attention implementations whose mask is a 4D tensor (flash-attention wants 2D, flex a BlockMask)."""


def _text_config(model: torch.nn.Module) -> object:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def can_prepare_mask(model: torch.nn.Module, seq_len: int) -> bool:
    """True when a plain causal-and-padding 4D mask is what every layer of `model` applies to a
    sequence of `seq_len` tokens and what its forward takes as given: the model's code builds its
    mask with `transformers.masking_utils` (older transformers versions reshaped a 4D mask in some
    families), an sdpa or eager attention, and no sliding window or attention chunk shorter than the
    sequence (there the layers' masks differ, so one 4D mask would be wrong)."""
    modeling = sys.modules.get(type(model).__module__)
    if modeling is None or not hasattr(modeling, "create_causal_mask"):
        return False
    if getattr(model.config, "_attn_implementation", None) not in PREPARED_IMPLEMENTATIONS:
        return False
    if getattr(model.config, "model_type", None) == "gemma3":  # multimodal: image tokens see each other both ways
        return False
    text = _text_config(model)
    for name in ("sliding_window", "attention_chunk_size"):
        window = getattr(text, name, None)
        if window is not None and window < seq_len:
            return False
    return True


def causal_padding_mask(attention_mask: torch.Tensor, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The 4D mask `(batch, 1, seq, seq)` of a left- or right-padded 2D mask `(batch, seq)` (1 = real token).

    Boolean (True = may attend, what sdpa takes) or, with `additive_dtype`, 0 where a query may attend
    and the dtype's most negative value elsewhere (what eager attention adds to its scores). Built
    with device ops only: nothing is read back to the host.
    """
    if attention_mask.ndim != 2:
        raise ValueError(f"expected a 2D padding mask (batch, seq), got shape {tuple(attention_mask.shape)}")
    seq_len = attention_mask.shape[1]
    positions = torch.arange(seq_len, device=attention_mask.device)
    causal = positions[None, :] <= positions[:, None]  # (query, key)
    allowed = (causal[None] & attention_mask.bool()[:, None, :])[:, None]
    if additive_dtype is None:
        return allowed
    additive = torch.zeros(allowed.shape, dtype=additive_dtype, device=attention_mask.device)
    return additive.masked_fill_(~allowed, torch.finfo(additive_dtype).min)


def forward_attention_mask(adapter: ModelAdapter, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mask to pass to the adapted model's forward for a 2D padding mask `(batch, seq)`: the
    prepared 4D mask where `can_prepare_mask` holds (boolean for sdpa, additive in the model's dtype
    for eager), else the 2D mask unchanged (transformers then builds the mask itself, reading it back)."""
    model = adapter.model
    if attention_mask.ndim != 2 or not can_prepare_mask(model, attention_mask.shape[1]):
        return attention_mask
    if model.config._attn_implementation == "sdpa":
        return causal_padding_mask(attention_mask)
    return causal_padding_mask(attention_mask, additive_dtype=adapter.dtype)
