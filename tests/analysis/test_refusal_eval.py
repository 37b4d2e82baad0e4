"""Refusal measurement: phrase matching, per-row results, grouped rates, paired tests, agreement."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from activations.adapter import ModelAdapter
from activations.hooks import residual_hooks
from activations.records import PromptRecord
from analysis.evaluation.refusal import (
    RefusalResult,
    build_results,
    compare_conditions,
    evaluate_refusal,
    method_agreement,
    summarise_refusal,
)
from analysis.evaluation.refusal_text import DEFAULT_REFUSAL_PHRASES, is_refusal_text, matched_phrase
from probes.refusal_tokens import RefusalTokenSpec, first_token_decisions, first_token_logits

# ---------------------------------------------------------------- phrase matching


def test_phrase_matching_case_apostrophes_and_window():
    assert is_refusal_text("I’M SORRY, but I can’t do that.")
    assert matched_phrase("As an AI, I have no body.") == "as an ai"
    assert not is_refusal_text("Sure! Here is a recipe for bread.")
    late = "Here is a long and helpful answer. " * 10 + "I cannot promise it is complete."
    assert not is_refusal_text(late)  # the phrase sits beyond the default 200-character window
    assert is_refusal_text(late, window=len(late))
    assert is_refusal_text("nope", phrases=["NOPE"])
    with pytest.raises(ValueError, match="empty"):
        is_refusal_text("x", phrases=[])
    assert "i'm sorry" in DEFAULT_REFUSAL_PHRASES and "i cannot" in DEFAULT_REFUSAL_PHRASES


# ---------------------------------------------------------------- per-row results from method outputs


def _records():
    rows = [
        ("b1", "benign", "set_a"), ("b2", "benign", "set_a"), ("c1", "contrast", "set_b"),
        ("s1", "safety", "set_a"), ("s2", "safety", "set_b"), ("h1", "humanizing", "set_b"),
    ]
    return [PromptRecord(pid, f"prompt {pid}", cat, source=src) for pid, cat, src in rows]


def test_build_results_votes_primary_and_threshold():
    records = _records()
    decisions = ["benign", "safety", "benign", "safety", "humanizing", "benign"]
    log_odds = np.array([-2.0, 0.5, 0.1, 3.0, 1.0, -0.2])
    texts = ["Sure.", "I'm sorry.", "Ok", "I cannot help with that", "Here you go", "As an AI I do not"]
    judged = [False, True, False, True, False, True]
    results = build_results(records, decisions, log_odds, texts, judged)
    assert [r.method for r in results] == ["token"] * 6  # token is the default primary
    assert [r.refused for r in results] == [False, True, False, True, True, False]
    assert [r.votes["log_odds"] for r in results] == [False, True, True, True, True, False]
    assert [r.votes["substring"] for r in results] == [False, True, False, True, False, True]
    assert [r.votes["judge"] for r in results] == judged
    assert results[3].decision == "safety" and results[3].log_odds == 3.0 and results[3].source == "set_a"
    higher = build_results(records, log_odds=log_odds, log_odds_threshold=0.75)
    assert [r.refused for r in higher] == [False, False, False, True, True, False]
    assert higher[0].method == "log_odds" and higher[0].decision is None
    by_text = build_results(records, texts=texts)
    assert by_text[1].method == "substring" and by_text[1].refused
    with pytest.raises(ValueError, match="primary refusal method 'token' was not computed"):
        build_results(records, texts=texts, primary="token")
    with pytest.raises(ValueError, match="no refusal measure"):
        build_results(records)
    with pytest.raises(ValueError, match="decisions has 2 rows but there are 6"):
        build_results(records, decisions=["benign", "safety"])
    with pytest.raises(ValueError, match="nan"):
        build_results(records, log_odds=np.array([0.0, np.nan, 0, 0, 0, 0]))
    assert results[0].to_dict()["votes"] == {"token": False, "log_odds": False, "substring": False, "judge": False}


# ---------------------------------------------------------------- grouped rates


def _result(pid, category, refused, decision=None, source="s", **votes):
    return RefusalResult(pid, category, source, refused, "token", decision=decision,
                         votes={"token": refused, **votes})


def test_summarise_refusal_groups_and_counts():
    results = _build_results_for_summary()
    summary = summarise_refusal(results)
    assert set(summary) == {"category", "over_refusal", "harmful_refusal", "category_match", "source:set_a", "source:set_b"}
    assert summary["category"]["benign"]["rate"] == 0.5 and summary["category"]["benign"]["n"] == 2
    assert summary["over_refusal"]["all"]["n"] == 3
    assert summary["over_refusal"]["all"]["rate"] == pytest.approx(1 / 3)
    assert summary["over_refusal"]["contrast"]["rate"] == 0.0
    assert summary["harmful_refusal"]["all"]["rate"] == pytest.approx(2 / 3)
    assert summary["harmful_refusal"]["safety"]["n"] == 2
    # right refusal for the right reason: s1 (safety->safety) matches, s2 (safety->humanizing) does not
    assert summary["category_match"]["safety"]["rate"] == 0.5
    assert summary["category_match"]["all"]["rate"] == pytest.approx(1 / 3)
    assert summary["source:set_a"]["all"]["n"] == 3 and summary["source:set_b"]["harmful_refusal"]["n"] == 2
    for cell in summary["category"].values():
        lo, hi = cell["ci"]
        assert 0.0 <= lo <= cell["rate"] <= hi <= 1.0
    assert summary["category"]["benign"]["ci"][0] == pytest.approx(0.0945, abs=1e-4)  # Wilson 1/2


def _build_results_for_summary():
    records = _records()
    decisions = ["benign", "safety", "benign", "safety", "humanizing", "benign"]
    return build_results(records, decisions=decisions, texts=["Sure"] * 6)


def test_summarise_by_other_method_and_without_tokens():
    results = _build_results_for_summary()
    by_text = summarise_refusal(results, groups=["category"], method="substring")
    assert all(cell["rate"] == 0.0 for cell in by_text["category"].values())
    text_only = build_results(_records(), texts=["I'm sorry"] * 6)
    assert "category_match" not in summarise_refusal(text_only)
    with pytest.raises(ValueError, match="needs refusal-token decisions"):
        summarise_refusal(text_only, groups=["category_match"])
    with pytest.raises(ValueError, match="unknown refusal summary group 'nope'"):
        summarise_refusal(results, groups=["nope"])
    with pytest.raises(ValueError, match="'judge' was not computed"):
        summarise_refusal(results, method="judge")


def test_compare_conditions_paired_mcnemar():
    base = [_result(f"p{i}", "safety", True) for i in range(10)] + [_result("b0", "benign", False)]
    # steering removes 8 of 10 safety refusals and adds one over-refusal
    cond = [_result(f"p{i}", "safety", i < 2) for i in range(10)] + [_result("b0", "benign", True)]
    cmp = compare_conditions(base, cond)
    safety = cmp["category"]["safety"]
    assert (safety["before_only"], safety["after_only"], safety["both"]) == (8, 0, 2)
    assert safety["p_value"] == pytest.approx(2 * 0.5**8)
    assert safety["difference"]["estimate"] == pytest.approx(-0.8)
    assert cmp["over_refusal"]["all"]["after_only"] == 1
    with pytest.raises(ValueError, match="differs from condition prompt"):
        compare_conditions(base, list(reversed(cond)))
    with pytest.raises(ValueError, match="baseline has 11 results but the condition has 10"):
        compare_conditions(base, cond[:10])


def test_method_agreement_kappa():
    results = [
        _result("a", "safety", True, substring=True), _result("b", "safety", True, substring=False),
        _result("c", "benign", False, substring=False), _result("d", "benign", False, substring=False),
    ]
    agreement = method_agreement(results)
    assert set(agreement) == {"token~substring"}
    assert agreement["token~substring"]["agreement"] == 0.75
    # p_o = 0.75, p_e = 0.5*0.25 + 0.5*0.75 = 0.5 -> kappa 0.5
    assert agreement["token~substring"]["kappa"] == pytest.approx(0.5)
    assert method_agreement([_result("a", "safety", True)]) == {}


# ---------------------------------------------------------------- on a model (tiny random Llama)

SPEC_TOKENS = {"benign": "Sure", "humanizing": "A", "incomplete": "B", "indeterminate": "C", "safety": "Sorry", "unsupported": "D"}


def test_evaluate_refusal_on_model_with_context_and_judge(tiny_llama):
    model, tokenizer = tiny_llama
    spec = RefusalTokenSpec(dict(SPEC_TOKENS))
    records = _records()
    calls: list[np.ndarray] = []

    @contextmanager
    def record_rows(rows):
        calls.append(rows)
        yield

    judge_inputs = {}

    def judge(prompts, responses):
        judge_inputs["prompts"], judge_inputs["responses"] = prompts, responses
        return [len(r) % 2 == 0 for r in responses]

    results = evaluate_refusal(model, tokenizer, records, spec=spec, generate=True, judge=judge,
                               make_context=record_rows, batch_size=4, max_new_tokens=3)
    direct = first_token_decisions(first_token_logits(model, tokenizer, [r.text for r in records], spec))
    assert [r.decision for r in results] == direct
    assert [r.refused for r in results] == [d != "benign" for d in direct]
    assert all(set(r.votes) == {"token", "log_odds", "substring", "judge"} for r in results)
    assert judge_inputs["prompts"] == [r.text for r in records]
    assert [r.text for r in results] == judge_inputs["responses"]
    # the context wraps every batch of both passes (token scoring, then generation), rows in order
    assert [c.tolist() for c in calls] == [[0, 1, 2, 3], [4, 5], [0, 1, 2, 3], [4, 5]]
    assert set(method_agreement(results)) == {
        "token~log_odds", "token~substring", "token~judge", "log_odds~substring", "log_odds~judge", "substring~judge"}

    # a large push at a middle layer moves the refusal log-odds (the context reaches the forward)
    adapter = ModelAdapter(model)
    push = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(1)) * 30

    @contextmanager
    def steer_all(rows):
        with residual_hooks(adapter, {1: lambda h: h + push}):
            yield

    steered = evaluate_refusal(model, tokenizer, records, spec=spec, make_context=steer_all)
    assert all(abs(a.log_odds - b.log_odds) > 1e-3 for a, b in zip(results, steered))


def test_evaluate_refusal_errors(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match="nothing to measure"):
        evaluate_refusal(model, tokenizer, _records())
    with pytest.raises(ValueError, match="no prompts"):
        evaluate_refusal(model, tokenizer, [], generate=True)
    missing = RefusalTokenSpec({**SPEC_TOKENS, "benign": "[respond]"})
    with pytest.raises(ValueError, match="lacks the refusal token"):
        evaluate_refusal(model, tokenizer, _records(), spec=missing)
