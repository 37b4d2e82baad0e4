"""Capability scoring: loaders, multiple-choice log-likelihood, exact match, and steering sensitivity."""
from __future__ import annotations

import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from activations.adapter import ModelAdapter
from activations.hooks import residual_hooks
from analysis.evaluation.builtin_capability import builtin_arith_items, builtin_capability_tasks, builtin_mc_items
from analysis.evaluation.capability import evaluate_capability, extract_last_number, score_multiple_choice
from analysis.evaluation.capability_data import GenItem, MCItem, load_gsm8k, load_mmlu, load_truthfulqa_mc
from analysis.interventions import steer


# ---------------------------------------------------------------- loaders (project-written toy files)

def _write_mmlu(root):
    (root / "test").mkdir(parents=True)
    (root / "test" / "alpha_test.csv").write_text('"Q one, with comma",a,b,c,d,B\nQ two,a,b,c,d,D\nQ three,a,b,c,d,A\n')
    (root / "test" / "beta_test.csv").write_text("R one,w,x,y,z,C\n")
    return root


def test_load_mmlu_root_split_folder_subjects_and_limit(tmp_path):
    root = _write_mmlu(tmp_path / "mmlu")
    items = load_mmlu(root)
    assert [i.id for i in items] == ["mmlu/alpha/1", "mmlu/alpha/2", "mmlu/alpha/3", "mmlu/beta/1"]
    assert items[0].question == "Q one, with comma" and items[0].answer == 1 and items[1].answer == 3
    assert len(load_mmlu(root / "test")) == 4
    assert [i.id for i in load_mmlu(root, subjects=["beta"])] == ["mmlu/beta/1"]
    # round-robin: a limit of 2 covers both subjects
    assert [i.id for i in load_mmlu(root, limit=2)] == ["mmlu/alpha/1", "mmlu/beta/1"]


def test_load_mmlu_errors(tmp_path):
    root = _write_mmlu(tmp_path / "mmlu")
    with pytest.raises(ValueError, match="unknown MMLU subject"):
        load_mmlu(root, subjects=["gamma"])
    with pytest.raises(FileNotFoundError, match="_dev.csv"):
        load_mmlu(root, split="dev")
    bad = tmp_path / "bad_test.csv"
    bad.write_text("Q,a,b,c,d,E\n")
    with pytest.raises(ValueError, match="not one of A, B, C, D"):
        load_mmlu(bad)
    bad.write_text("Q,a,b,C\n")
    with pytest.raises(ValueError, match="expected 6 columns"):
        load_mmlu(bad)


def test_load_truthfulqa_mc1_construction(tmp_path):
    path = tmp_path / "tqa.csv"
    path.write_text(
        "\ufeffType,Category,Question,Best Answer,Correct Answers,Incorrect Answers,Source\n"
        'A,Cat,Is the moon made of cheese?,No it is rock,"No; It is rock","Yes; It is cheese; Yes",x\n'
        "A,Cat,Do fish fly?,Mostly no,No,Always,y\n",
        encoding="utf-8",
    )
    items = load_truthfulqa_mc(path)
    assert len(items) == 2
    first = items[0]
    assert sorted(first.options) == sorted(["No it is rock", "Yes", "It is cheese"])  # deduplicated
    assert first.options[first.answer] == "No it is rock"
    assert load_truthfulqa_mc(path) == items  # reproducible shuffle
    assert len(load_truthfulqa_mc(path, limit=1)) == 1
    (tmp_path / "no_cols.csv").write_text("Question,Best Answer\nq,a\n")
    with pytest.raises(ValueError, match="Incorrect Answers"):
        load_truthfulqa_mc(tmp_path / "no_cols.csv")


def test_load_gsm8k(tmp_path):
    path = tmp_path / "g.jsonl"
    rows = [{"question": "q1", "answer": "work\n#### 1,234"}, {"question": "q2", "answer": "#### -7"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    items = load_gsm8k(path)
    assert [(i.question, i.answer) for i in items] == [("q1", "1234"), ("q2", "-7")]
    path.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match="####"):
        load_gsm8k(path)
    with pytest.raises(FileNotFoundError):
        load_gsm8k(tmp_path / "missing.jsonl")


def test_items_validate_and_builtin_set():
    with pytest.raises(ValueError, match="out of range"):
        MCItem("x", "q", ("a", "b"), 2)
    with pytest.raises(ValueError, match="empty question"):
        MCItem("x", " ", ("a", "b"), 0)
    with pytest.raises(ValueError, match="not a number"):
        GenItem("x", "q", "seven")
    mc, arith = builtin_mc_items(), builtin_arith_items()
    assert len(mc) == 20 and len(arith) == 10
    assert len({i.question for i in mc}) == 20
    assert set(builtin_capability_tasks()) == {"builtin_mc", "builtin_arith"}


def test_extract_last_number():
    assert extract_last_number("First 3 apples, then 4, so the answer is $1,250.") == 1250.0
    assert extract_last_number("It is -2.5") == -2.5
    assert extract_last_number("no digits here") is None


# ---------------------------------------------------------------- scoring on the tiny random model

def _manual_option_logprob(model, tokenizer, item, option_index):
    """Reference: summed log-prob of one option from an unpadded, unbatched forward."""
    from activations.tokenize import format_prompt

    prompt_ids = tokenizer(format_prompt(tokenizer, item.question), add_special_tokens=False)["input_ids"]
    cont = tokenizer(item.options[option_index], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(cont) - 1)
    return float(sum(logprobs[p, ids[0, p + 1]] for p in positions))


def test_multiple_choice_scores_match_unbatched_reference(tiny_llama):
    model, tokenizer = tiny_llama
    items = builtin_mc_items()[:3]
    scores = score_multiple_choice(model, tokenizer, items, batch_size=5)  # batches cut across items
    for i, item in enumerate(items):
        assert scores.sum_logprob[i].shape == (4,)
        for j in range(4):
            assert scores.sum_logprob[i][j] == pytest.approx(_manual_option_logprob(model, tokenizer, item, j), abs=1e-3)
    assert scores.predictions().shape == (3,)


def _random_unit(d_model, seed=0):
    direction = torch.randn(d_model, generator=torch.Generator().manual_seed(seed))
    return direction / direction.norm()


def test_large_steering_changes_scores_and_zero_alpha_does_not(tiny_llama):
    model, tokenizer = tiny_llama
    adapter = ModelAdapter(model)
    items = builtin_mc_items()[:4]
    vector = _random_unit(adapter.d_model)
    base = score_multiple_choice(model, tokenizer, items, batch_size=8)
    seen_rows: list[np.ndarray] = []

    def steering(alpha):
        @contextmanager
        def make_context(rows):
            seen_rows.append(rows)
            with steer(adapter, 1, vector, alphas=alpha, positions="all"):
                yield
        return make_context

    zero = score_multiple_choice(model, tokenizer, items, make_context=steering(0.0), batch_size=8)
    for a, b in zip(base.sum_logprob, zero.sum_logprob):
        np.testing.assert_array_equal(a, b)
    # rows: one per (item, option), the item index repeated once per option, in item order
    np.testing.assert_array_equal(np.concatenate(seen_rows), np.repeat(np.arange(4), 4))

    pushed = score_multiple_choice(model, tokenizer, items, make_context=steering(50.0), batch_size=8)
    for a, b in zip(base.sum_logprob, pushed.sum_logprob):
        assert np.all(np.abs(a - b) > 1e-3), "a large push on all positions must move every option's score"


def test_per_row_strengths_from_row_indices(tiny_llama):
    """A gate-like context: strength looked up per item from the row indices; item 0 unsteered."""
    model, tokenizer = tiny_llama
    adapter = ModelAdapter(model)
    items = builtin_mc_items()[:2]
    per_item_alpha = np.array([0.0, 40.0])
    vector = _random_unit(adapter.d_model, seed=3)

    @contextmanager
    def gated(rows):
        with steer(adapter, 2, vector, alphas=torch.as_tensor(per_item_alpha[rows], dtype=torch.float32)):
            yield

    base = score_multiple_choice(model, tokenizer, items, batch_size=3)  # batches split item 0's options
    steered = score_multiple_choice(model, tokenizer, items, make_context=gated, batch_size=3)
    np.testing.assert_allclose(steered.sum_logprob[0], base.sum_logprob[0], rtol=0, atol=1e-5)
    assert np.all(np.abs(steered.sum_logprob[1] - base.sum_logprob[1]) > 1e-3)


def _push_positions(adapter, layer, positions):
    """A context adding a fixed vector at the given sequence positions (a slice) only."""
    direction = torch.ones(adapter.d_model) * 5.0

    @contextmanager
    def make_context(rows):
        def edit(h):
            h = h.clone()
            h[:, positions] += direction
            return h

        with residual_hooks(adapter, {layer: edit}):
            yield

    return make_context


def test_why_steering_must_cover_every_scored_position(tiny_llama):
    """Steering only the final position cannot move any score (its prediction is never scored);
    steering an answer position before it does. Our contexts wrap the whole forward, so a steering
    context that edits all positions reaches every scored one."""
    model, tokenizer = tiny_llama
    items = builtin_mc_items()[:2]
    adapter = ModelAdapter(model)
    base = score_multiple_choice(model, tokenizer, items, batch_size=8)
    last_only = score_multiple_choice(model, tokenizer, items, batch_size=8,
                                      make_context=_push_positions(adapter, 2, slice(-1, None)))
    for a, b in zip(base.sum_logprob, last_only.sum_logprob):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    second_to_last = score_multiple_choice(model, tokenizer, items, batch_size=8,
                                           make_context=_push_positions(adapter, 2, slice(-2, -1)))
    for a, b in zip(base.sum_logprob, second_to_last.sum_logprob):
        assert np.all(np.abs(a - b) > 1e-4)


def test_evaluate_capability_on_builtin_tasks(tiny_llama):
    model, tokenizer = tiny_llama
    tasks = {"mc": builtin_mc_items()[:5], "arith": builtin_arith_items()[:2]}
    results = evaluate_capability(model, tokenizer, tasks, batch_size=8, max_new_tokens=4, per_item=True)
    assert set(results) == {"mc", "arith"}
    for name, n in (("mc", 5), ("arith", 2)):
        res = results[name]
        assert res["n"] == n and len(res["correct"]) == n
        assert res["score"] == pytest.approx(sum(res["correct"]) / n)
        assert 0.0 <= res["ci"][0] <= res["score"] <= res["ci"][1] <= 1.0
    assert results["mc"]["sum"]["n"] == 5
    with pytest.raises(ValueError, match="only MCItem or only GenItem"):
        evaluate_capability(model, tokenizer, {"mixed": [builtin_mc_items()[0], builtin_arith_items()[0]]})
    with pytest.raises(ValueError, match="has no items"):
        evaluate_capability(model, tokenizer, {"empty": []})
