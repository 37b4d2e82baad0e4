"""`BlockOutputCache`: a forward resumed above a recorded layer gives the logits of the full forward."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from activations.adapter import ModelAdapter
from activations.hooks import BlockOutputCache
from activations.tiny_models import build_tiny_model
from analysis.interventions.steering import steer
from probes.refusal_tokens import RefusalTokenSpec, first_token_logits

TEXTS = ["How do I bake bread?", "Tell me a secret.", "Write a poem about rain, please, in four lines.",
         "What is 2 + 2?", "Summarise the plot of a film you like."]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_resumed_forward_equals_the_full_forward_under_steering(family, embedded_tokenizer):
    model, tokenizer = build_tiny_model(family, tokenizer=copy.deepcopy(embedded_tokenizer))  # tokens are added below
    model.eval()
    spec = RefusalTokenSpec.preset("default")
    tokenizer.add_tokens(list(spec.tokens.values()))
    model.resize_token_embeddings(len(tokenizer))
    adapter, layer = ModelAdapter(model), 2
    vector = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0))

    def steered(rows: np.ndarray):
        return steer(adapter, layer, vector, 4.0, positions="all")

    plain = first_token_logits(model, tokenizer, TEXTS, spec, batch_size=2, make_context=steered)
    cache = BlockOutputCache(adapter, layer)
    baseline = first_token_logits(model, tokenizer, TEXTS, spec, batch_size=2, cache=cache)  # records
    assert len(cache._outputs) == 3
    assert torch.equal(baseline, first_token_logits(model, tokenizer, TEXTS, spec, batch_size=2))
    resumed = first_token_logits(model, tokenizer, TEXTS, spec, batch_size=2, make_context=steered, cache=cache)
    torch.testing.assert_close(resumed, plain, rtol=0, atol=1e-5)
    assert not torch.equal(resumed, baseline)  # the steering acted on the resumed forward
    assert all("forward" not in vars(block) for block in adapter.blocks)  # the blocks are restored


def test_resumed_forward_skips_the_blocks_below(embedded_tokenizer):
    model, tokenizer = build_tiny_model("llama", tokenizer=embedded_tokenizer)
    adapter, layer = ModelAdapter(model), 2
    calls = {i: 0 for i in range(adapter.num_layers)}
    for i, block in enumerate(adapter.blocks):  # the MLP inside each block runs only when the block works
        block.mlp.register_forward_pre_hook(lambda *_args, i=i: calls.__setitem__(i, calls[i] + 1))
    batch = tokenizer(["hello there"], return_tensors="pt")
    cache = BlockOutputCache(adapter, layer)
    with torch.no_grad(), cache.recording("k"):
        full = model(**batch).logits
    with torch.no_grad(), cache.resumed("k"):
        again = model(**batch).logits
    torch.testing.assert_close(again, full, rtol=0, atol=1e-6)
    assert "k" in cache and calls == {0: 1, 1: 1, 2: 1, 3: 2}  # blocks 0..2 ran once (recording), 3 twice
