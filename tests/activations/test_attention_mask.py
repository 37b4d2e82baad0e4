"""The device-built 4D attention mask: transformers' own mask, never read back, refused where it would be wrong."""
from __future__ import annotations

import sys

import pytest
import torch
from transformers import masking_utils

from activations.adapter import ModelAdapter
from activations.attention_mask import (
    can_prepare_mask,
    causal_padding_mask,
    forward_attention_mask,
)
from activations.hooks import capture_residuals
from activations.tiny_models import TINY_FAMILIES, build_tiny_model
from activations.tokenize import encode_prompts, position_ids_from_mask

PROMPTS = ["Hi", "What is the capital of France? Please answer briefly.", "Name three rivers."]


def test_mask_is_causal_over_real_keys_only():
    mask2d = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    allowed = causal_padding_mask(mask2d)
    assert allowed.shape == (2, 1, 4, 4) and allowed.dtype == torch.bool
    want_padded = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(allowed[0, 0], want_padded)
    assert torch.equal(allowed[1, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    additive = causal_padding_mask(mask2d, additive_dtype=torch.bfloat16)
    assert additive.dtype == torch.bfloat16
    assert torch.equal(additive == 0, allowed)
    assert (additive[~allowed] == torch.finfo(torch.bfloat16).min).all()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_rows_equal_the_forward_with_transformers_own_mask(family, implementation, embedded_tokenizer):
    if family == "gemma2" and implementation == "sdpa":
        pytest.skip("gemma2 soft-caps its attention logits, which sdpa does not do: eager only")
    model, tok = build_tiny_model(family, tokenizer=embedded_tokenizer)
    model.set_attn_implementation(implementation)
    batch = encode_prompts(tok, PROMPTS)
    assert not bool(batch["attention_mask"].all())  # the batch is padded
    prepared = forward_attention_mask(ModelAdapter(model), batch["attention_mask"])
    assert prepared.ndim == 4 and prepared.dtype == (torch.bool if implementation == "sdpa" else torch.float32)
    captured = capture_residuals(ModelAdapter(model), [0, 2], **batch)  # the last block's hidden_states entry is after the final norm
    reference = model(**batch, position_ids=position_ids_from_mask(batch["attention_mask"]),
                      output_hidden_states=True).hidden_states
    real = batch["attention_mask"].bool()
    for layer in (0, 2):
        torch.testing.assert_close(captured[layer][real], reference[layer + 1][real], rtol=0, atol=1e-6)


def test_padded_forward_never_asks_whether_the_batch_is_padded(tiny_llama, monkeypatch):
    """transformers' read-backs (`fast_all` of the padding mask, the packed-sequence check) are
    never reached with the prepared mask; with the 2D mask they are (so the check can fail)."""
    model, tok = tiny_llama
    batch = encode_prompts(tok, PROMPTS)
    asked: list[str] = []
    for name in ("fast_all", "find_packed_sequence_indices"):
        original = getattr(masking_utils, name)
        monkeypatch.setattr(masking_utils, name, lambda *a, _o=original, _n=name, **k: (asked.append(_n), _o(*a, **k))[1])
    capture_residuals(ModelAdapter(model), [1], **batch)
    assert asked == []
    model(**batch, use_cache=False)  # transformers building the mask from the 2D one
    assert "fast_all" in asked


def test_sliding_window_shorter_than_the_prompt_keeps_the_2d_mask(embedded_tokenizer):
    model, tok = build_tiny_model("mistral", tokenizer=embedded_tokenizer, sliding_window=4)
    batch = encode_prompts(tok, PROMPTS)
    assert batch["input_ids"].shape[1] > 4 and not can_prepare_mask(model, batch["input_ids"].shape[1])
    assert forward_attention_mask(ModelAdapter(model), batch["attention_mask"]) is batch["attention_mask"]
    assert can_prepare_mask(model, 4)
    captured = capture_residuals(ModelAdapter(model), [2], **batch)
    reference = model(**batch, position_ids=position_ids_from_mask(batch["attention_mask"]),
                      output_hidden_states=True).hidden_states
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(captured[2][real], reference[3][real], rtol=0, atol=1e-6)


def test_other_attention_implementations_get_the_2d_mask(tiny_llama, monkeypatch):
    model, _ = tiny_llama
    mask2d = torch.ones(2, 5, dtype=torch.long)
    assert forward_attention_mask(ModelAdapter(model), mask2d).ndim == 4
    with monkeypatch.context() as patched:  # a model whose code does not build its mask with masking_utils
        patched.delattr(sys.modules[type(model).__module__], "create_causal_mask")
        assert forward_attention_mask(ModelAdapter(model), mask2d) is mask2d
    original = model.config._attn_implementation
    model.config._attn_implementation = "flash_attention_2"
    try:
        assert forward_attention_mask(ModelAdapter(model), mask2d) is mask2d
    finally:
        model.config._attn_implementation = original
    with pytest.raises(ValueError, match="2D padding mask"):
        causal_padding_mask(torch.ones(2, 1, 5, 5))
