"""Model-based gates: TokenGate (the model's own first token) and ExternalClassifierGate."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from activations.records import PROBE_CLASSES, PromptRecord
from probes.gates import GateDecision
from probes.model_gates import GLOBAL, ExternalClassifierGate, TokenGate
from probes.refusal_token_install import install_refusal_tokens
from probes.refusal_tokens import RefusalTokenSpec, first_token_decisions, first_token_logits

TEXTS = [
    "How do I bake sourdough bread?",
    "Tell me how you feel today.",
    "Translate it.",
    "What is the best colour?",
    "How can I pick a lock?",
    "Draw me a cat.",
    "Write a haiku about autumn leaves falling slowly",
]


@pytest.fixture(scope="module")
def classifier_dir(embedded_tokenizer, tmp_path_factory):
    """A tiny random Llama sequence classifier with labels safe / unsafe, saved with the tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(
        "llama", vocab_size=len(embedded_tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=64, head_dim=16, max_position_embeddings=256, num_labels=2,
        id2label={0: "safe", 1: "unsafe"}, label2id={"safe": 0, "unsafe": 1},
        pad_token_id=embedded_tokenizer.pad_token_id, bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():  # spread the random scores so rows differ clearly
        model.score.weight.mul_(50.0)
    out = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(out)
    embedded_tokenizer.save_pretrained(out)
    return str(out)


def assert_global_decisions(decisions: list[GateDecision], n: int) -> None:
    assert [d.row for d in decisions] == list(range(n))
    for d in decisions:
        assert isinstance(d, GateDecision)
        assert (d.category, d.direction) in {(GLOBAL, "toward"), ("none", "none")}
        assert 0.0 <= d.scores["refuse"] <= 1.0 and set(d.thresholds) == {"refuse"}


@pytest.mark.parametrize("kind", ["sequence-classifier", "causal-judge"])
def test_external_gate_is_per_row_deterministic_and_thresholded(kind, classifier_dir, tiny_llama_dir):
    source = classifier_dir if kind == "sequence-classifier" else tiny_llama_dir
    gate = ExternalClassifierGate(source, kind=kind, batch_size=3)
    scores = gate.scores(TEXTS)
    assert scores.shape == (len(TEXTS),) and scores.dtype == np.float64
    assert np.ptp(scores) > 1e-4  # each row gets its own score
    np.testing.assert_array_equal(gate.scores(TEXTS), scores)  # deterministic
    single = np.concatenate([gate.scores([t]) for t in TEXTS])
    np.testing.assert_allclose(single, scores, atol=1e-5)  # padding / batching does not matter
    decisions = gate.decide_texts(TEXTS)
    assert_global_decisions(decisions, len(TEXTS))
    assert [d.direction == "toward" for d in decisions] == list(scores >= 0.5)

    def directions(threshold: float) -> list[str]:
        return [d.direction for d in ExternalClassifierGate(source, kind=kind, threshold=threshold).decide_texts(TEXTS)]

    assert directions(0.0) == ["toward"] * len(TEXTS)
    assert directions(1.0) == ["none"] * len(TEXTS)
    middle = float(np.median(scores))
    flipped = ExternalClassifierGate(source, kind=kind, threshold=middle).decide_scores(scores)
    assert [d.direction == "toward" for d in flipped] == list(scores >= middle)
    assert 0 < sum(d.direction == "toward" for d in flipped) < len(TEXTS)


def test_external_gate_away_option_and_strengths(classifier_dir):
    gate = ExternalClassifierGate(classifier_dir, threshold=1.0, alpha_away=0.5)
    decisions = gate.decide_texts(TEXTS[:3])
    assert all(d.category == GLOBAL and d.direction == "away" and d.signed_strength == -0.5 for d in decisions)


def test_external_gate_never_takes_labelled_records(classifier_dir):
    gate = ExternalClassifierGate(classifier_dir)
    record = PromptRecord("p1", "How can I pick a lock?", "safety", "eval")
    with pytest.raises(TypeError, match="prompt strings"):
        gate.decide_texts([record])
    with pytest.raises(ValueError, match="no prompts"):
        gate.decide_texts([])


def test_external_gate_bad_configurations(classifier_dir, tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown external gate kind"):
        ExternalClassifierGate(classifier_dir, kind="regex")
    with pytest.raises(ValueError, match=r"threshold must lie in \[0, 1\]"):
        ExternalClassifierGate(classifier_dir, threshold=1.5)
    with pytest.raises(ValueError, match="must contain '{prompt}'"):
        ExternalClassifierGate(tiny_llama_dir, kind="causal-judge", prompt_template="no placeholder")
    with pytest.raises(ValueError, match="refuse labels"):
        ExternalClassifierGate(classifier_dir, refuse_labels=("toxic",))
    with pytest.raises(ValueError, match="start with the same token"):
        ExternalClassifierGate(tiny_llama_dir, kind="causal-judge", answers=(" yes", " yes please"))
    with pytest.raises(FileNotFoundError):
        ExternalClassifierGate(str(tmp_path / "missing-model"))


def test_judge_template_and_answers_are_used(tiny_llama_dir):
    gate = ExternalClassifierGate(tiny_llama_dir, kind="causal-judge", prompt_template="Q: {prompt}\nRefuse?",
                                  answers=(" Yes", " No"))
    assert gate.format("hi") == "Q: hi\nRefuse?"
    swapped = ExternalClassifierGate(tiny_llama_dir, kind="causal-judge", prompt_template="Q: {prompt}\nRefuse?",
                                     answers=(" No", " Yes"))
    np.testing.assert_allclose(gate.scores(TEXTS) + swapped.scores(TEXTS), 1.0, atol=1e-9)


# ---------------------------------------------------------------- TokenGate


def test_token_gate_from_logits():
    logits = np.zeros((3, len(PROBE_CLASSES)))
    logits[0, 0] = 4.0  # respond
    logits[1, PROBE_CLASSES.index("safety")] = 4.0
    logits[2, 0], logits[2, PROBE_CLASSES.index("humanizing")] = 4.0, 1.0
    spec = RefusalTokenSpec.preset("default")
    plain = TokenGate(spec).decide_logits(logits)
    assert [(d.row, d.category, d.direction) for d in plain] == [(0, "none", "none"), (1, "safety", "toward"), (2, "none", "none")]
    assert plain[1].strength == 1.0 and abs(sum(plain[1].scores.values()) - 1.0) < 1e-12
    away = TokenGate(spec, alpha_toward=2.0, alpha_away=0.5).decide_logits(logits)
    assert (away[2].category, away[2].direction, away[2].signed_strength) == ("humanizing", "away", -0.5)
    assert away[1].signed_strength == 2.0
    with pytest.raises(ValueError, match=">= 0"):
        TokenGate(spec, alpha_toward=-1.0)


def test_token_gate_follows_the_models_first_token(tiny_llama):
    model, tokenizer = copy.deepcopy(tiny_llama[0]), copy.deepcopy(tiny_llama[1])
    spec = RefusalTokenSpec.preset("default")
    rng = np.random.default_rng(0)
    d = model.config.hidden_size
    install_refusal_tokens(model, tokenizer, spec, rng.normal(size=(6, d)) * 5.0, np.ones(d) / np.sqrt(d), 0.0)
    decisions = TokenGate(spec).decide_texts(model, tokenizer, TEXTS, batch_size=4)
    expected = first_token_decisions(first_token_logits(model, tokenizer, TEXTS, spec))
    got = [d.category if d.direction == "toward" else "benign" for d in decisions]
    assert got == expected and [d.row for d in decisions] == list(range(len(TEXTS)))
    with pytest.raises(TypeError, match="prompt strings"):
        TokenGate(spec).decide_texts(model, tokenizer, [PromptRecord("x", "hi", "benign", "eval")])
