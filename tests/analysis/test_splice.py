"""Spliced evaluation: x̂ = x recovers everything, a random decoder recovers nothing, the cached forwards are exact."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from activations.positions import CONTENT, position_kinds
from activations.prompts import load_prompt_set
from activations.tokenize import encode_prompts, position_ids_from_mask
from analysis.evaluation.splice import splice_scores
from sae.config import SAEConfig
from sae.model import SparseAutoencoder

LAYER = 20


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [r.text for r in load_prompt_set(["builtin:quickstart"], seed=0).split("calibrate")][:8]


@pytest.fixture(scope="module")
def scores(embedded, texts):
    """Identity, half-strength and random-decoder splices of the embedded model at layer 20."""
    model, tokenizer = embedded
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=576, d_sae=2304, k=16)
    random_decoder = SparseAutoencoder(cfg, seed=1).eval()
    with torch.no_grad():  # a decoder unrelated to the encoder: the reconstruction carries nothing of x
        random_decoder.W_dec.copy_(SparseAutoencoder(cfg, seed=2).W_dec)
    class_ids = list(range(100, 106))  # any six tokens: the decision is the argmax among them
    return splice_scores(model, tokenizer, texts, LAYER, {"identity": lambda x: x, "random": random_decoder},
                         class_token_ids=class_ids, max_length=256, batch_size=8, n_boot=200)


def test_zero_strength_splice_recovers_everything(scores) -> None:
    for site in ("content", "response_start"):
        s = scores["identity"][site]
        assert s["ce_recovered"] == pytest.approx(1.0, abs=1e-4) and s["kl"] == pytest.approx(0.0, abs=1e-5)
        assert s["decision_fidelity"]["rate"] == 1.0 and s["decision_fidelity"]["n"] == 8
        assert s["ce_zero"] > s["ce_clean"] + 1.0  # zeroing the layer hurts: the denominator is meaningful


def test_random_decoder_recovers_about_nothing(scores) -> None:
    for site in ("content", "response_start"):
        s = scores["random"][site]
        assert abs(s["ce_recovered"]) < 0.35, (site, s["ce_recovered"])
        assert s["kl"] > 1.0
        lo, hi = s["ce_recovered_ci"]
        assert lo <= s["ce_recovered"] <= hi


def test_cached_forwards_equal_a_plain_forward(embedded, texts, scores) -> None:
    model, tokenizer = embedded
    batch = encode_prompts(tokenizer, texts[:1], True, 256)
    with torch.no_grad():
        logits = model(**batch, position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False).logits
    logp = torch.log_softmax(logits.float(), -1)[0]
    one = splice_scores(model, tokenizer, texts[:1], LAYER, {"identity": lambda x: x}, max_length=256, n_boot=0)
    target = logp[-1].argmax()
    assert one["identity"]["response_start"]["ce_clean"] == pytest.approx(float(-logp[-1, target]), abs=1e-4)
    (kinds,) = position_kinds(tokenizer, texts[:1], True, 256)
    first = int(np.flatnonzero(kinds == CONTENT)[0])
    ids = batch["input_ids"][0]
    expected = -logp[first:-1].gather(1, ids[first + 1:].unsqueeze(1)).mean()
    assert one["identity"]["content"]["n_positions"] == len(ids) - 1 - first
    assert one["identity"]["content"]["ce_clean"] == pytest.approx(float(expected), abs=1e-4)
    assert one["identity"]["content"]["decision_fidelity"] is None  # no class tokens given
    assert np.isfinite(one["identity"]["content"]["ce_clean"])


def test_train_command_scores_every_seed_with_the_splice(tiny_llama_dir, tmp_path):
    import json

    from analysis.cli import main as cli_main

    prompts = "builtin:quickstart?per_category=3"
    acts, out = tmp_path / "acts", tmp_path / "sae"
    assert cli_main(["harvest", "--model", tiny_llama_dir, "--prompts", prompts, "--harvest.layers", "1",
                     "--positions", "all", "--out", str(acts), "--progress", "false", "--device", "cpu"]) == 0
    assert cli_main(["train", "--acts", str(acts), "--layer", "1", "--out", str(out), "--train.seeds", "0", "1",
                     "--train.steps", "3", "--train.sae.expansion_factor", "2", "--train.sae.k", "4",
                     "--train.data.batch_size", "32", "--trainer.accelerator", "cpu", "--print_table", "false",
                     "--model", tiny_llama_dir, "--prompts", prompts, "--train.splice.max_prompts", "4",
                     "--device", "cpu"]) == 0
    n_calibrate = len(load_prompt_set([prompts], seed=0).split("calibrate"))
    metrics = json.loads((out / "metrics.json").read_text())
    for seed in ("0", "1"):
        splice = metrics["seeds"][seed]["splice"]
        assert splice["split"] == "calibrate" and splice["content"]["n_prompts"] == min(4, n_calibrate)
        assert splice["response_start"]["decision_fidelity"] is None  # this model has no refusal tokens
        cfg = json.loads((out / f"seed_{seed}" / "cfg.json").read_text())
        assert cfg["refusal_sae"]["final_metrics"]["splice"] == splice
