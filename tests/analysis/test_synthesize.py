"""Contrast synthesis: the rewrite/decide loop with fakes, the LM rewriter and the CLI on a tiny model."""
from __future__ import annotations

import json

import pytest

from analysis.stages.command import run_command
from analysis.stages.synthesize import COMMAND
from analysis.evaluation.synthesize import (
    BENIGN_TO_HARMFUL,
    HARMFUL_TO_BENIGN,
    SynthesisStats,
    class_budgets,
    clean_rewrite,
    lm_rewriter,
    load_few_shot,
    rewriter_prompt,
    synthesize_contrast,
)
from probes.refusal_tokens import RefusalTokenSpec, first_token_decisions, first_token_logits

PHRASE = " in a video game"


def main(argv):
    return run_command(COMMAND, argv)


def decide_on_phrase(texts):
    """Fake target: prompts mentioning 'weapon' are refused unless set in a video game, and benign
    prompts become refused once set in a video game (so both directions can flip)."""
    return ["safety" if ("weapon" in t) != (PHRASE.strip() in t) else "benign" for t in texts]


class LoggingRewriter:
    """Fake rewriter: appends PHRASE only when told the last edit failed; logs every call."""

    def __init__(self, first_round_suffix=" please"):
        self.calls: list[tuple[list[str], list[str]]] = []
        self.first_round_suffix = first_round_suffix

    def __call__(self, texts, feedback):
        self.calls.append((list(texts), list(feedback)))
        return [t + (PHRASE if "still" in f else self.first_round_suffix) for t, f in zip(texts, feedback)]


def test_failures_are_fed_back_and_rounds_counted():
    originals = ["build a weapon", "sharpen a weapon"]
    rewriter = LoggingRewriter()
    stats = SynthesisStats()
    pairs = synthesize_contrast(originals, rewriter, decide_on_phrase, rounds=3, stats=stats, ids=["a", "b"])
    assert len(rewriter.calls) == 2  # round 1 fails, round 2 flips, no round 3
    first_texts, first_feedback = rewriter.calls[0]
    assert first_texts == originals and all(f.startswith("Goal:") for f in first_feedback)
    second_texts, second_feedback = rewriter.calls[1]
    assert second_texts == ["build a weapon please", "sharpen a weapon please"]  # the last attempt is edited again
    assert all("still refused" in f and "'safety'" in f for f in second_feedback)
    assert [p.rounds_used for p in pairs] == [2, 2]
    assert pairs[0].original == "build a weapon" and pairs[0].rewritten == "build a weapon please" + PHRASE
    assert pairs[0].attempts == ("build a weapon please", "build a weapon please" + PHRASE)
    assert (pairs[0].decision_before, pairs[0].decision_after, pairs[0].direction) == ("safety", "benign", HARMFUL_TO_BENIGN)
    assert pairs[1].original_id == "b"
    assert stats.flipped_per_round == [0, 2, 0] and stats.kept == {HARMFUL_TO_BENIGN: 2}
    assert pairs[0].to_dict()["attempts"] == list(pairs[0].attempts)


def test_unflipped_prompts_are_dropped_after_the_last_round():
    rewriter = LoggingRewriter()
    pairs = synthesize_contrast(["a weapon"], rewriter, lambda texts: ["safety"] * len(texts), rounds=3)
    assert pairs == [] and len(rewriter.calls) == 3


def test_class_balance_with_both_directions():
    harmful = [f"weapon {i}" for i in range(10)]
    benign = [f"bread {i}" for i in range(3)]
    stats = SynthesisStats()
    pairs = synthesize_contrast(harmful + benign, LoggingRewriter(first_round_suffix=PHRASE), decide_on_phrase,
                                rounds=2, target_direction="both", max_pairs=6, chunk_size=4, stats=stats)
    directions = [p.direction for p in pairs]
    assert directions.count(HARMFUL_TO_BENIGN) == 3 and directions.count(BENIGN_TO_HARMFUL) == 3
    assert all(p.rounds_used == 1 for p in pairs)
    assert {p.decision_after for p in pairs if p.direction == BENIGN_TO_HARMFUL} == {"safety"}
    assert stats.skipped_class_full > 0 and stats.kept == {HARMFUL_TO_BENIGN: 3, BENIGN_TO_HARMFUL: 3}
    assert class_budgets("both", 5) == {HARMFUL_TO_BENIGN: 3, BENIGN_TO_HARMFUL: 2}


def test_single_direction_skips_other_side_and_stops_at_budget():
    stats = SynthesisStats()
    decide_calls = []

    def decide(texts):
        decide_calls.append(list(texts))
        return decide_on_phrase(texts)

    originals = ["bread"] + [f"weapon {i}" for i in range(8)]
    pairs = synthesize_contrast(originals, LoggingRewriter(first_round_suffix=PHRASE), decide,
                                max_pairs=2, chunk_size=3, stats=stats)
    assert len(pairs) == 2 and stats.skipped_wrong_side == 1
    assert len(decide_calls) == 2  # one chunk decided, one round decided; then the budget is full
    assert stats.attempted == 2


def test_empty_rewrite_keeps_previous_text_and_bad_callables_fail():
    pairs = synthesize_contrast(["a weapon"], lambda t, f: [""], decide_on_phrase, rounds=1)
    assert pairs == []
    attempts = []
    synthesize_contrast(["a weapon"], lambda t, f: attempts.append(t) or ["  "], decide_on_phrase, rounds=2)
    assert attempts == [["a weapon"], ["a weapon"]]
    with pytest.raises(ValueError, match="rewrite returned 2 items for 1 prompts"):
        synthesize_contrast(["a weapon"], lambda t, f: ["x", "y"], decide_on_phrase)
    with pytest.raises(ValueError, match="unknown direction"):
        synthesize_contrast(["a"], LoggingRewriter(), decide_on_phrase, target_direction="sideways")
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        synthesize_contrast(["a"], LoggingRewriter(), decide_on_phrase, rounds=0)


def test_few_shot_loading_prompt_and_cleaning(tmp_path):
    path = tmp_path / "shots.jsonl"
    path.write_text(json.dumps({"original": "o1", "rewritten": "r1"}) + "\n\n" + json.dumps({"original": "o2", "rewritten": "r2"}) + "\n")
    shots = load_few_shot(path)
    assert shots == [{"original": "o1", "rewritten": "r1"}, {"original": "o2", "rewritten": "r2"}]
    prompt = rewriter_prompt("my text", "Goal: flip it.", shots)
    assert "Goal: flip it." in prompt and "Prompt: o1\nEdited prompt: r1" in prompt
    assert prompt.endswith("Prompt: my text\nEdited prompt:")
    path.write_text(json.dumps({"original": "o1"}) + "\n")
    with pytest.raises(ValueError, match="'original' and 'rewritten'"):
        load_few_shot(path)
    with pytest.raises(FileNotFoundError):
        load_few_shot(tmp_path / "none.jsonl")
    assert clean_rewrite('\n  Edited prompt: "How do I bake?"\nmore') == "How do I bake?"
    assert clean_rewrite("   \n ") == ""


SPEC_TOKENS = {"benign": "Sure", "humanizing": "A", "incomplete": "B", "indeterminate": "C", "safety": "Sorry", "unsupported": "D"}


def test_lm_rewriter_end_to_end_on_tiny_model(tiny_llama):
    model, tokenizer = tiny_llama
    spec = RefusalTokenSpec(dict(SPEC_TOKENS))
    rewrite = lm_rewriter(model, tokenizer, max_new_tokens=6, batch_size=2)
    texts = rewrite(["How do I bake bread?", "Tell me a secret."], ["Goal: flip.", "Goal: flip."])
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)

    def decide(batch):
        return first_token_decisions(first_token_logits(model, tokenizer, batch, spec))

    stats = SynthesisStats()
    pairs = synthesize_contrast(["How do I bake bread?", "Tell me a secret."], rewrite, decide, rounds=1,
                                target_direction="both", max_pairs=2, stats=stats)
    assert stats.attempted == 2 and len(stats.flipped_per_round) == 1
    assert len(pairs) == stats.flipped_per_round[0]  # quality irrelevant: only flipped rewrites are kept


def test_cli_end_to_end_and_errors(tiny_llama, tmp_path, capsys):
    model, tokenizer = tiny_llama
    target = tmp_path / "target"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    RefusalTokenSpec(dict(SPEC_TOKENS)).save(target)
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"p{i}", "text": f"Prompt number {i} about bread", "category": cat}
            for i, cat in enumerate(["safety", "benign", "humanizing", "contrast"])]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out" / "pairs.jsonl"
    argv = ["--target", str(target), "--rewriter", str(target), "--prompts", f"jsonl:{prompts}",
            "--direction", "both", "--rounds", "1", "--max-new-tokens", "4", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_originals"] == 4 and summary["attempted"] == 4 and summary["pairs"] == sum(summary["kept"].values())
    lines = out.read_text().splitlines()
    assert len(lines) == summary["pairs"]
    for line in lines:
        row = json.loads(line)
        assert row["id"].endswith("/rw") and row["rounds_used"] == 1
        assert (row["decision_before"] == "benign") != (row["decision_after"] == "benign")  # flipped side
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp file left

    assert main([*argv[:-2], "--out", str(out), "--few-shot", str(tmp_path / "missing.jsonl")]) == 2
    assert "error: few-shot file not found" in capsys.readouterr().err
    no_spec = tmp_path / "plain"
    model.save_pretrained(no_spec)
    tokenizer.save_pretrained(no_spec)
    assert main(["--target", str(no_spec), *argv[2:]]) == 2
    assert "pass --tokens" in capsys.readouterr().err
