"""Model adapter, the hook context manager and prompt encoding."""
from __future__ import annotations

import pytest
import torch

from activations.adapter import ModelAdapter
from activations.hooks import StopForward, capture_residuals, residual_hooks
from activations.tiny_models import TINY_FAMILIES, build_tiny_model
from activations.tokenize import encode_prompts, position_ids_from_mask, token_lengths

PROMPTS = ["Hi there", "What is the capital of France? Please answer briefly."]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_adapter_captures_hidden_states_of_every_family(family, embedded_tokenizer):
    model, tok = build_tiny_model(family, tokenizer=embedded_tokenizer)
    adapter = ModelAdapter(model)
    assert adapter.num_layers == 4 and adapter.d_model == 64
    batch = encode_prompts(tok, PROMPTS)
    captured = capture_residuals(adapter, [0, 2], **batch)
    reference = model(**batch, position_ids=position_ids_from_mask(batch["attention_mask"]), output_hidden_states=True).hidden_states
    for layer in (0, 2):
        torch.testing.assert_close(captured[layer], reference[layer + 1], rtol=0, atol=1e-6)


def test_unsupported_family_is_one_clear_error():
    class Fake(torch.nn.Module):
        class config:  # noqa: N801 - mimics a transformers config
            model_type = "t5"

    with pytest.raises(ValueError, match="unsupported model family 't5'"):
        ModelAdapter(Fake())


def test_layer_out_of_range_names_the_valid_range(tiny_llama):
    adapter = ModelAdapter(tiny_llama[0])
    with pytest.raises(ValueError, match=r"layer 7 out of range.*0\.\.3"):
        adapter.check_layer(7)
    with pytest.raises(ValueError, match="out of range"):
        with residual_hooks(adapter, {4: lambda h: None}):
            pass


def test_truncated_forward_skips_later_blocks(tiny_llama):
    model, tok = tiny_llama
    adapter = ModelAdapter(model)
    calls: list[int] = []
    handles = [block.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, block in enumerate(adapter.blocks)]
    final_norm_calls: list[int] = []
    handles.append(adapter.final_norm.register_forward_hook(lambda *a: final_norm_calls.append(1)))
    try:
        capture_residuals(adapter, [1], **encode_prompts(tok, PROMPTS))
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1] and final_norm_calls == []


def test_hooks_edit_and_are_removed_even_on_error(tiny_llama):
    model, tok = tiny_llama
    adapter = ModelAdapter(model)
    batch = encode_prompts(tok, PROMPTS)
    clean = model(**batch).logits
    with residual_hooks(adapter, {1: lambda h: h + 1.0}):
        edited = model(**batch).logits
    assert not torch.allclose(clean, edited)
    with pytest.raises(StopForward):
        with residual_hooks(adapter, {}, stop_after=0):
            model(**batch)
    ours = [h for b in adapter.blocks for h in b._forward_hooks.values() if h.__module__ == "activations.hooks"]
    assert ours == []
    torch.testing.assert_close(model(**batch).logits, clean)


def test_embedding_layer_minus_one_is_hidden_state_zero(tiny_llama):
    model, tok = tiny_llama
    adapter = ModelAdapter(model)
    batch = encode_prompts(tok, PROMPTS)
    captured = capture_residuals(adapter, [-1], **batch)
    reference = model(**batch, position_ids=position_ids_from_mask(batch["attention_mask"]), output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(captured[-1], reference)


def test_encoding_is_left_padded_and_ends_with_generation_prompt(embedded_tokenizer):
    tok = embedded_tokenizer
    batch = encode_prompts(tok, PROMPTS)
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask[0, 0]
    assistant_tail = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for row in batch["input_ids"]:
        assert row[-len(assistant_tail):].tolist() == assistant_tail
    assert token_lengths(tok, PROMPTS) == mask.sum(1).tolist()
    plain = encode_prompts(tok, PROMPTS, chat_template=False)
    assert plain["input_ids"].shape[1] < batch["input_ids"].shape[1]
    with pytest.raises(ValueError, match="no prompts"):
        encode_prompts(tok, [])


def test_left_truncation_keeps_the_generation_prompt(embedded_tokenizer):
    batch = encode_prompts(embedded_tokenizer, ["word " * 200], max_length=32)
    assert batch["input_ids"].shape[1] == 32
    tail = embedded_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert batch["input_ids"][0, -len(tail):].tolist() == tail


@pytest.mark.slow
def test_embedded_model_loads_and_matches_hidden_states(embedded):
    model, tok = embedded
    adapter = ModelAdapter(model)
    assert (adapter.family, adapter.num_layers, adapter.d_model) == ("llama", 30, 576)
    batch = encode_prompts(tok, PROMPTS)
    captured = capture_residuals(adapter, [9, 20], **batch)
    reference = model(**batch, position_ids=position_ids_from_mask(batch["attention_mask"]), output_hidden_states=True).hidden_states
    for layer in (9, 20):
        torch.testing.assert_close(captured[layer], reference[layer + 1], rtol=0, atol=1e-5)


def test_left_padded_row_equals_the_row_alone(tiny_llama):
    model, tok = tiny_llama
    adapter = ModelAdapter(model)
    batched = capture_residuals(adapter, [2], **encode_prompts(tok, PROMPTS))[2]
    alone = capture_residuals(adapter, [2], **encode_prompts(tok, PROMPTS[:1]))[2]
    torch.testing.assert_close(batched[0, -alone.shape[1]:], alone[0], rtol=1e-5, atol=1e-5)
