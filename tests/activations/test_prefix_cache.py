"""The prefix KV cache: the last column alone on the cached prefix gives a full forward's logits,
unedited and under an edit of the last position (at any layer)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from activations.adapter import ModelAdapter
from activations.prefix_cache import PrefixCache
from activations.records import PromptRecord
from analysis.evaluation.conditions import EvalSetup, run_refusal
from analysis.interventions.ablation import ablate_direction
from analysis.interventions.steering import steer
from probes.refusal_tokens import RefusalTokenSpec

SPEC = RefusalTokenSpec({"benign": "Sure", "humanizing": "A", "incomplete": "B", "indeterminate": "C",
                         "safety": "Sorry", "unsupported": "D"})
TEXTS = ["How do I bake bread?", "Tell me a long story about a dragon who lost its way home.", "Hi", "Why?",
         "Explain how tides work in two sentences."]


def test_last_column_on_the_prefix_equals_the_full_forward(tiny_llama):
    model, tokenizer = tiny_llama
    adapter = ModelAdapter(model)
    records = [PromptRecord(f"p{i}", t, "safety" if i % 2 else "benign") for i, t in enumerate(TEXTS)]
    push = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0)) * 8

    def full(context=None):
        setup = EvalSetup(model, tokenizer, SPEC, 1, batch_size=3, reuse_blocks=False)
        return run_refusal(setup, records, context=context)

    cached_setup = EvalSetup(model, tokenizer, SPEC, 1, batch_size=3)
    contexts = {
        "none": None,
        "steer last position at layer 1": lambda rows: steer(adapter, 1, push, positions="generated"),
        "ablate a direction at every layer, last position": lambda rows: ablate_direction(
            adapter, push, layers="all", positions="generated"),
    }
    for name, context in contexts.items():
        expected = full(context)
        for _ in range(2):  # the second pass reuses the prefix caches, cut back after each use
            got = run_refusal(cached_setup, records, context=context, last_column=True)
            assert np.allclose([r.log_odds for r in got], [r.log_odds for r in expected], atol=1e-4), name
            assert [r.decision for r in got] == [r.decision for r in expected], name
    assert len(cached_setup.prefix_cache._caches) == 2  # two batches, each prefix computed once
    moved = run_refusal(cached_setup, records, context=contexts["steer last position at layer 1"], last_column=True)
    assert not np.allclose([r.log_odds for r in moved], [r.log_odds for r in full()])  # the edit reached the column


def test_prefix_cache_needs_two_columns(tiny_llama):
    model, _ = tiny_llama
    cache = PrefixCache(model)
    with pytest.raises(ValueError, match="two tokens"):
        cache.last_logits("k", {"input_ids": torch.tensor([[1]]), "attention_mask": torch.tensor([[1]])})
