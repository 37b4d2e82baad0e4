"""Refusal tokens fitted onto the embedded SmolLM2 with a subset of the bundled quickstart prompts.

One fit (extract rows fit, calibrate rows choose C) is shared by every test of this file; eval rows
are scored once with hooks that also record the final-norm state and the unrestricted argmax.
"""
from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch

from activations.adapter import ModelAdapter
from activations.records import PROBE_CLASSES
from probes.metrics import macro_f1
from probes.rows import probe_targets
from probes.refusal_token_fit import fit_refusal_tokens
from probes.refusal_token_install import load_refusal_head, save_refusal_token_model
from probes.refusal_tokens import RefusalTokenSpec, first_token_decisions, first_token_logits, load_refusal_token_spec

pytestmark = pytest.mark.slow

PROMPTS = "builtin:quickstart?per_category=30"
"""30 prompts per category (7 categories) → 105 extract, 56 calibrate, 49 eval rows."""

MIN_EVAL_MACRO_F1 = 0.45
"""Chance is about 1/6; this subset reaches 0.59 (0.75 with the full quickstart set)."""


@pytest.fixture(scope="module")
def fitted(embedded, tmp_path_factory):
    from activations.prompts import load_prompt_set

    model, tokenizer = copy.deepcopy(embedded[0]), copy.deepcopy(embedded[1])
    prompts = load_prompt_set([PROMPTS], seed=0)
    spec = RefusalTokenSpec.preset("default")
    report = fit_refusal_tokens(model, tokenizer, prompts.split("extract") + prompts.split("calibrate"), spec)
    out = tmp_path_factory.mktemp("smollm2") / "refusal-tokens"
    save_refusal_token_model(model, tokenizer, spec, out, report)

    evals = prompts.split("eval")
    adapter = ModelAdapter(model)
    states, top_tokens = [], []

    @contextlib.contextmanager
    def record(_rows):
        hooks = [
            adapter.final_norm.register_forward_hook(lambda m, i, o: states.append(o[:, -1].double())),
            adapter.unembed.register_forward_hook(lambda m, i, o: top_tokens.append(o[:, -1].argmax(-1))),
        ]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    logits = first_token_logits(model, tokenizer, [r.text for r in evals], spec, make_context=record)
    return {"model": model, "tokenizer": tokenizer, "spec": spec, "report": report, "out": out, "evals": evals,
            "logits": logits, "states": torch.cat(states).numpy(), "top_tokens": torch.cat(top_tokens)}


def test_eval_macro_f1_well_above_chance(fitted):
    y, _ = probe_targets(np.array([r.category for r in fitted["evals"]]))
    pred = np.array([PROBE_CLASSES.index(d) for d in first_token_decisions(fitted["logits"])])
    score = macro_f1(y, pred, len(PROBE_CLASSES))
    print(f"\nembedded eval macro-F1 {score:.3f} (n={y.size}), calibrate "
          f"{fitted['report'].calibrate['macro_f1']['value']:.3f}, C={fitted['report'].C}")
    assert score > MIN_EVAL_MACRO_F1
    report = fitted["report"]
    assert report.untied and report.self_check_max_abs_diff < 1e-3
    assert abs(report.intercept_check["no_intercept_macro_f1"] - report.intercept_check["with_intercept_macro_f1"]) < 0.15


def test_restricted_decision_equals_the_regression(fitted):
    head = load_refusal_head(fitted["out"])
    h = fitted["states"]
    scores = h @ head["class_weights"].T
    logits = fitted["logits"].double().numpy()
    lifted = scores + float(head["offset_beta"][0]) * (h @ head["offset_direction"])[:, None]
    np.testing.assert_allclose(logits, lifted, atol=1e-3, rtol=1e-4)
    assert first_token_decisions(logits) == first_token_decisions(scores)


def test_unrestricted_first_token_is_a_class_token(fitted):
    ids = set(fitted["spec"].token_ids(fitted["tokenizer"]))
    assert set(fitted["top_tokens"].tolist()) <= ids  # every eval prompt
    from activations.tokenize import encode_prompts

    model, tokenizer = fitted["model"], fitted["tokenizer"]
    batch = encode_prompts(tokenizer, [r.text for r in fitted["evals"][:8]])
    out = model.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    first = out[:, -1].tolist()
    assert set(first) <= ids
    expected = [fitted["spec"].tokens[c] for c in first_token_decisions(fitted["logits"][:8])]
    assert tokenizer.convert_ids_to_tokens(first) == expected


def test_saved_directory_reloads_with_identical_decisions(fitted):
    from activations.model_loading import load_model

    model, tokenizer = load_model(str(fitted["out"]))
    spec = load_refusal_token_spec(fitted["out"])
    assert spec == fitted["spec"] and model.config.tie_word_embeddings is False
    texts = [r.text for r in fitted["evals"][:16]]
    logits = first_token_logits(model, tokenizer, texts, spec)
    torch.testing.assert_close(logits, fitted["logits"][:16], atol=1e-4, rtol=1e-5)
    assert first_token_decisions(logits) == first_token_decisions(fitted["logits"][:16])
