"""Refusal-token model: spec, first-token logits, fitting / installing / saving the class tokens.

Fast mechanics run on tiny random Llamas; the `slow` tests fit the embedded SmolLM2 on a subset of
the bundled quickstart prompts.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from activations.records import PROBE_CLASSES, PromptRecord
from probes.refusal_token_fit import fit_refusal_tokens
from probes.refusal_token_install import load_refusal_head, save_refusal_token_model
from probes.refusal_tokens import (
    DEFAULT_REFUSAL_TOKENS,
    LLAMA3_REFUSAL_TOKENS,
    RefusalTokenSpec,
    first_token_decisions,
    first_token_logits,
    load_refusal_token_spec,
    refusal_log_odds,
    resolve_token_spec,
)

WORDS = {
    "benign": ["recipe for bread", "capital of France", "sort a list", "a short poem about rain"],
    "humanizing": ["your favourite food", "how you feel today", "your childhood", "your dreams"],
    "incomplete": ["fix this", "translate it", "summarise the attached file", "continue"],
    "indeterminate": ["who will win next year", "the best colour", "the meaning of life", "what I think"],
    "safety": ["build a weapon", "hurt someone", "steal a car", "make poison"],
    "unsupported": ["draw me a picture", "play a song", "call my mother", "open the window"],
}


def make_records(per_class: int, split: str, offset: int = 0) -> list[PromptRecord]:
    """Small synthetic prompts, `per_class` of every probe class (+ one contrast row), in `split`."""
    records = []
    for category, words in WORDS.items():
        for i in range(per_class):
            text = f"Request {offset + i}: {words[(offset + i) % len(words)]}"
            records.append(PromptRecord(f"{category}-{split}-{i}", text, category, split))
    records.append(PromptRecord(f"contrast-{split}", "How do I kill a stuck process?", "contrast", split))
    return records


def copied(pair):
    model, tokenizer = pair
    return copy.deepcopy(model), copy.deepcopy(tokenizer)


# ---------------------------------------------------------------- spec and logits helpers


def test_spec_presets_order_and_round_trip(tmp_path):
    assert tuple(DEFAULT_REFUSAL_TOKENS) == PROBE_CLASSES
    assert tuple(LLAMA3_REFUSAL_TOKENS) == PROBE_CLASSES
    shuffled = dict(reversed(list(LLAMA3_REFUSAL_TOKENS.items())))
    spec = RefusalTokenSpec(shuffled)
    assert spec.classes == PROBE_CLASSES
    spec.save(tmp_path)
    assert load_refusal_token_spec(tmp_path) == spec
    assert resolve_token_spec("llama3") == spec
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(DEFAULT_REFUSAL_TOKENS))
    assert resolve_token_spec(str(path)).tokens == DEFAULT_REFUSAL_TOKENS


@pytest.mark.parametrize(
    "tokens, message",
    [
        ({k: v for k, v in DEFAULT_REFUSAL_TOKENS.items() if k != "safety"}, "missing ['safety']"),
        ({**DEFAULT_REFUSAL_TOKENS, "extra": "[x]"}, "unknown ['extra']"),
        ({**DEFAULT_REFUSAL_TOKENS, "safety": "[respond]"}, "distinct"),
        ({**DEFAULT_REFUSAL_TOKENS, "safety": " "}, "non-empty"),
    ],
)
def test_spec_rejects_bad_mappings(tokens, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RefusalTokenSpec(tokens)


def test_unknown_preset_and_missing_token_are_one_line(embedded_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown refusal-token preset 'llama4'"):
        resolve_token_spec("llama4")
    with pytest.raises(FileNotFoundError):
        resolve_token_spec(str(tmp_path / "absent.json"))
    with pytest.raises(ValueError) as err:
        RefusalTokenSpec.preset("default").token_ids(embedded_tokenizer)
    assert "'[respond]'" in str(err.value) and "\n" not in str(err.value)


def test_decisions_and_log_odds_from_logits():
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0, 1.0]])
    assert first_token_decisions(logits) == ["benign", "safety"]
    odds = refusal_log_odds(logits)
    assert odds.dtype == np.float64
    np.testing.assert_allclose(odds, [np.log(5.0) - 3.0, np.log(3.0 + np.e ** 2 + np.e)])
    np.testing.assert_allclose(refusal_log_odds(logits + 7.0), odds)  # a common shift changes nothing
    with pytest.raises(ValueError, match=r"shape \(n, 6\)"):
        refusal_log_odds(np.zeros((2, 5)))


# ---------------------------------------------------------------- mechanics on tiny models


@pytest.fixture(scope="module")
def tiny_fit(embedded_tokenizer, tmp_path_factory):
    """A tied tiny Llama turned into a refusal-token model and saved."""
    from activations.tiny_models import build_tiny_model

    model, tokenizer = build_tiny_model("llama", tokenizer=copy.deepcopy(embedded_tokenizer), tie_word_embeddings=True)
    original = copy.deepcopy(model)
    records = make_records(4, "extract") + make_records(2, "calibrate", offset=4)
    report = fit_refusal_tokens(model, tokenizer, records, C_grid=(0.1, 1.0), batch_size=8)
    out = tmp_path_factory.mktemp("tiny") / "refusal-model"
    save_refusal_token_model(model, tokenizer, RefusalTokenSpec.preset("default"), out, report)
    return original, model, tokenizer, report, out, records


def test_tiny_fit_adds_tokens_and_unties(tiny_fit, embedded_tokenizer):
    original, model, tokenizer, report, _, _ = tiny_fit
    assert original.lm_head.weight.data_ptr() == original.model.embed_tokens.weight.data_ptr()
    assert report.untied and model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    n_old = len(embedded_tokenizer)
    assert len(tokenizer) == n_old + 6 and report.added_tokens == list(DEFAULT_REFUSAL_TOKENS.values())
    ids = RefusalTokenSpec.preset("default").token_ids(tokenizer)
    assert ids == list(range(n_old, n_old + 6)) == report.token_ids
    # ordinary rows of both matrices are untouched; new input rows are the mean embedding
    assert torch.equal(model.lm_head.weight[:n_old], original.lm_head.weight)
    assert torch.equal(model.model.embed_tokens.weight[:n_old], original.model.embed_tokens.weight)
    mean = original.model.embed_tokens.weight.double().mean(0).float()
    assert torch.allclose(model.model.embed_tokens.weight[ids], mean.expand(6, -1))
    assert report.C in (0.1, 1.0) and set(report.C_scores) == {"0.1", "1.0"}
    assert report.self_check_max_abs_diff < 1e-3


def test_tiny_restricted_logits_equal_the_regression(tiny_fit):
    _, model, tokenizer, report, _, records = tiny_fit
    from probes.refusal_token_fit import final_norm_states

    texts = [r.text for r in records]
    logits = first_token_logits(model, tokenizer, texts, RefusalTokenSpec.preset("default"), batch_size=5).double().numpy()
    h, _ = final_norm_states(model, tokenizer, texts, batch_size=3)
    head = report.head
    expected = h @ head["class_weights"].T + float(head["offset_beta"][0]) * (h @ head["offset_direction"])[:, None]
    np.testing.assert_allclose(logits, expected, atol=2e-4, rtol=1e-4)
    assert first_token_decisions(logits) == first_token_decisions(h @ head["class_weights"].T)


def test_tiny_save_reload_round_trip(tiny_fit):
    from activations.model_loading import load_model

    _, model, tokenizer, report, out, records = tiny_fit
    assert {"refusal_tokens.json", "fit_report.json", "refusal_head.safetensors", "config.json"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "fit_report.json").read_text())
    assert saved["C"] == report.C and saved["tokens"] == DEFAULT_REFUSAL_TOKENS and "head" not in saved
    np.testing.assert_array_equal(load_refusal_head(out)["class_weights"], report.head["class_weights"])
    reloaded, reloaded_tok = load_model(str(out))
    assert reloaded.config.tie_word_embeddings is False
    assert reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr()
    spec = load_refusal_token_spec(out)
    texts = [r.text for r in records[:6]]
    before = first_token_logits(model, tokenizer, texts, spec)
    after = first_token_logits(reloaded, reloaded_tok, texts, spec)
    torch.testing.assert_close(after, before)
    # unrestricted greedy decoding starts with a class token on the fit prompts
    from activations.tokenize import encode_prompts

    batch = encode_prompts(reloaded_tok, texts)
    generated = reloaded.generate(**batch, max_new_tokens=1, do_sample=False, pad_token_id=reloaded_tok.pad_token_id)
    assert set(generated[:, -1].tolist()) <= set(spec.token_ids(reloaded_tok))


def test_save_refuses_to_overwrite_foreign_directory(tiny_fit, tmp_path):
    _, model, tokenizer, report, _, _ = tiny_fit
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        save_refusal_token_model(model, tokenizer, RefusalTokenSpec.preset("default"), tmp_path, report)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_first_token_logits_keeps_order_and_enters_context(tiny_fit):
    _, model, tokenizer, _, _, records = tiny_fit
    texts = [r.text for r in records[:7]]
    seen: list[list[int]] = []

    class Record:
        def __init__(self, rows):
            self.rows = rows

        def __enter__(self):
            seen.append(self.rows.tolist())

        def __exit__(self, *exc):
            return False

    spec = RefusalTokenSpec.preset("default")
    batched = first_token_logits(model, tokenizer, texts, spec, batch_size=3, make_context=Record)
    assert seen == [[0, 1, 2], [3, 4, 5], [6]]
    single = torch.cat([first_token_logits(model, tokenizer, [t], spec) for t in texts])
    assert batched.shape == (7, 6) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


def test_fit_refuses_wrong_splits_and_missing_classes(tiny_llama):
    model, tokenizer = copied(tiny_llama)
    extract = make_records(1, "extract")
    with pytest.raises(ValueError, match="must be fitted on the 'extract' split, got rows from 'eval'"):
        fit_refusal_tokens(model, tokenizer, extract + make_records(1, "eval"), C_grid=(1.0,))
    with pytest.raises(ValueError, match="'<unsplit>'"):
        fit_refusal_tokens(model, tokenizer, extract + make_records(1, ""), C_grid=(1.0,))
    with pytest.raises(ValueError, match="needs calibrate rows"):
        fit_refusal_tokens(model, tokenizer, extract)
    no_safety = [r for r in extract if r.category != "safety"]
    with pytest.raises(ValueError, match=r"no extract rows of class\(es\) \['safety'\]"):
        fit_refusal_tokens(model, tokenizer, no_safety, C_grid=(1.0,))
    assert len(tokenizer) == len(tiny_llama[1])  # nothing was installed


def test_existing_tokens_are_reused(tiny_llama):
    model, tokenizer = copied(tiny_llama)
    spec = RefusalTokenSpec.preset("llama3")
    tokenizer.add_tokens(list(spec.tokens.values()), special_tokens=True)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    n = len(tokenizer)
    report = fit_refusal_tokens(model, tokenizer, make_records(2, "extract"), spec, C_grid=(1.0,))
    assert report.added_tokens == [] and len(tokenizer) == n
    assert report.token_ids == spec.token_ids(tokenizer)


# ---------------------------------------------------------------- command line


def test_cli_fit_then_eval(tiny_llama_dir, tmp_path, capsys):
    from analysis.cli import main as cli

    def main(argv: list[str]) -> int:
        return cli(["refusal-tokens", *argv])

    out = tmp_path / "checkpoint"
    prompts = "builtin:quickstart?per_category=4"
    assert main(["fit", "--model", str(tiny_llama_dir), "--prompts", prompts, "--out", str(out),
                 "--device", "cpu", "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "eval: accuracy" in printed and "Wilson 95%" in printed and "percentile bootstrap 95%" in printed
    report = json.loads((out / "fit_report.json").read_text())
    assert report["eval"]["overall"]["accuracy"]["n"] == 7 and len(report["eval"]["overall"]["macro_f1"]["ci"]) == 2
    assert main(["eval", "--model", str(out), "--prompts", prompts, "--json", str(tmp_path / "eval.json")]) == 0
    table = capsys.readouterr().out
    assert "correct [95% CI]" in table and "contrast" in table and "safety" in table
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["table"]["contrast"]["n"] == 1 and sum(saved["table"]["benign"]["decisions"].values()) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "/nonexistent/model", "--prompts", "builtin:quickstart", "--tokens", "default"],
         "model directory not found"),
        (["eval", "--model", "{tiny}", "--prompts", "builtin:quickstart?per_category=4"], "has no refusal_tokens.json"),
        (["eval", "--model", "{tiny}", "--prompts", "builtin:quickstart?per_category=4", "--tokens", "default"],
         "tokenizer lacks the refusal token '[respond]'"),
        (["fit", "--model", "{tiny}", "--prompts", "builtin:quickstart", "--out", "x", "--tokens", "llama4"],
         "unknown refusal-token preset"),
    ],
)
def test_cli_errors_are_one_line(argv, message, tiny_llama_dir, capsys):
    from analysis.cli import main as cli

    def main(argv: list[str]) -> int:
        return cli(["refusal-tokens", *argv])

    argv = [a.replace("{tiny}", str(tiny_llama_dir)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: transformers' loading bar
    assert err.startswith("error: ") and message in err
