"""What steering costs on benign text (`analysis.evaluation.benign_text`) and which capability measures
can be read (`analysis.evaluation.capability_conditions`). Tiny random Llama, project-written text."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from activations.adapter import ModelAdapter
from analysis.evaluation.benign_text import (
    BenignText,
    benign_text_shift,
    complete_responses,
    load_benign_texts,
)
from analysis.evaluation.capability_conditions import chance_level, readability
from analysis.evaluation.capability_data import GenItem, MCItem
from analysis.evaluation.capability_tasks import (
    load_capability_tasks,
    parse_capability_spec,
)
from analysis.interventions import steer


@pytest.fixture(scope="module")
def texts():
    return load_benign_texts("builtin")


def _kl_and_loss(model, tok, texts, vector, alpha):
    adapter = ModelAdapter(model)

    def make_context(rows):
        return steer(adapter, 1, vector, alpha, positions="all")

    shift = benign_text_shift(model, tok, texts, make_context=make_context, batch_size=4, max_response_tokens=24)
    summary = shift.summary(n_resamples=200)
    return summary["kl"]["value"], summary["loss"]["value"], shift


def test_benign_kl_is_zero_at_alpha_zero_and_grows_with_alpha(tiny_llama, texts):
    model, tok = tiny_llama
    vector = torch.nn.functional.normalize(torch.randn(ModelAdapter(model).d_model, generator=torch.Generator().manual_seed(0)), dim=0)
    unsteered = benign_text_shift(model, tok, texts, batch_size=4, max_response_tokens=24)
    assert np.all(unsteered.kl == 0.0)
    kls, losses = [], []
    for alpha in (0.0, 1.0, 2.0, 4.0, 8.0):
        kl, loss, shift = _kl_and_loss(model, tok, texts, vector, alpha)
        kls.append(kl), losses.append(loss)
        if alpha == 0.0:
            assert np.all(shift.kl == 0.0)  # the same forward twice: exactly 0, not merely small
            np.testing.assert_array_equal(shift.nll, unsteered.nll)
    assert kls[0] == 0.0 and all(b > a for a, b in zip(kls, kls[1:])), kls
    assert losses[-1] != losses[0]
    assert unsteered.n_tokens.sum() > 150 and unsteered.n_tokens.size == 12
    summary = unsteered.summary(n_resamples=200)
    lo, hi = summary["loss"]["ci"]
    assert lo <= summary["loss"]["value"] <= hi and summary["loss"]["n"] == 12 and summary["kl"]["ci"] == [0.0, 0.0]


def test_benign_sources_and_generated_responses(tmp_path, tiny_llama):
    seed = tmp_path / "seed_tasks.jsonl"
    seed.write_text(json.dumps({"instruction": "Name a colour.", "instances": [{"input": "", "output": "Blue."}]}) + "\n"
                    + json.dumps({"instruction": "Add the numbers.", "instances": [{"input": "2 and 3", "output": "5"}]}) + "\n")
    items = load_benign_texts(f"alpaca:{seed}")
    assert [(i.prompt, i.response) for i in items] == [("Name a colour.", "Blue."), ("Add the numbers.\n\n2 and 3", "5")]
    chat = tmp_path / "ultra.json"
    chat.write_text(json.dumps([{"class": " Vicuna ", "data": "Write a haiku about tea."}, {"class": "x", "data": "Hi?"}]))
    prompts_only = load_benign_texts(f"ultrachat:{chat}", limit=1)
    assert prompts_only == [BenignText("ultra/1", "Write a haiku about tea.", None)]
    model, tok = tiny_llama
    filled = complete_responses(model, tok, prompts_only, max_new_tokens=6)
    assert len(filled) <= 1 and all(i.response for i in filled)
    with pytest.raises(ValueError, match="carry a response"):
        benign_text_shift(model, tok, prompts_only)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_benign_texts("alpaca:/nope.json")
    with pytest.raises(ValueError, match="unknown benign-text source"):
        load_benign_texts("wiki:x")


def test_chance_and_readability():
    mc = [MCItem("a", "q?", ("x", "y"), 0), MCItem("b", "q?", ("x", "y", "z", "w"), 1)]
    assert chance_level(mc) == pytest.approx((0.5 + 0.25) / 2)
    assert chance_level([GenItem("g", "1+1?", "2")]) == 0.0
    baseline = {"mc": {"score": 0.4, "ci": [0.3, 0.5], "n": 100}, "hard": {"score": 0.5, "ci": [0.46, 0.54], "n": 500},
                "gen": {"score": 0.0, "ci": [0.0, 0.04], "n": 100}}
    tasks = {"mc": mc, "hard": mc, "gen": [GenItem("g", "1+1?", "2")]}
    found = readability(baseline, tasks)
    assert not found["mc"]["readable"] and found["hard"]["readable"] and not found["gen"]["readable"]
    assert "cannot show harm" in found["gen"]["reason"]


def test_capability_specs_take_a_limit(tmp_path):
    assert parse_capability_spec("gsm8k:/x/test.jsonl?limit=50") == ("gsm8k", "/x/test.jsonl", 50)
    tasks = load_capability_tasks(["builtin_mc?limit=3", "builtin_arith"], default_limit=2)
    assert len(tasks["builtin_mc"]) == 3 and len(tasks["builtin_arith"]) == 2
    for bad, message in (("mmlu", "needs a path"), ("builtin:x", "no path"), ("gsm8k:x?n=3", "limit=N"), ("wiki:x", "unknown")):
        with pytest.raises(ValueError, match=message):
            parse_capability_spec(bad)
