"""Feature cards: the top-activating examples of a planted feature are the prompts it was planted in."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from activations.positions import CONTENT, PREFIX, RESPONSE_START, SUFFIX
from activations.store import ActivationStore, ShardWriter
from probes.feature_cards import build_feature_cards, latent_values, logit_lens
from sae.config import SAEConfig
from sae.model import SparseAutoencoder

LAYER, D = 1, 8
KINDS = np.array([PREFIX, PREFIX, CONTENT, CONTENT, CONTENT, CONTENT, SUFFIX, RESPONSE_START])
PLANTED = {"q03", "q08", "q11", "q17", "q22"}
PLANTED_EVAL = {"q40", "q41"}  # planted harder, but in eval: must never show up


class Tokens:
    """A stand-in tokenizer: token id i reads as "t<i>"."""

    def decode(self, ids: list[int]) -> str:
        return "".join(f"t{i}" for i in ids)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """42 prompts of 8 tokens; direction u is added at position 4 of the planted prompts."""
    rng = np.random.default_rng(0)
    u = rng.normal(size=D)
    u /= np.linalg.norm(u)
    out = tmp_path_factory.mktemp("cards") / "store"
    writer = ShardWriter(out, [LAYER], D, "float32", "all", model_info={"id": "synthetic"}, rows_per_shard=100)
    with writer:
        for i in range(42):
            pid = f"q{i:02d}"
            x = 0.3 * rng.normal(size=(8, D))
            x -= np.outer(x @ u, u)  # nothing along u unless planted
            if pid in PLANTED:
                x[4] += (4.0 + i / 10) * u
            if pid in PLANTED_EVAL:
                x[4] += 50.0 * u
            split = "eval" if i >= 40 else ("calibrate" if i % 3 == 0 else "extract")
            category = "safety" if pid in PLANTED or i % 4 == 0 else "benign"
            writer.add_prompt(pid, category, split, np.arange(8), np.arange(8) + 100 * (i + 1), {LAYER: x.astype(np.float32)},
                              position_kinds=KINDS)
    writer.finish()
    return out, u


def planted_sae(u: np.ndarray) -> SparseAutoencoder:
    sae = SparseAutoencoder(SAEConfig(d_in=D, d_sae=16, k=2), seed=0).eval()
    with torch.no_grad():
        sae.W_enc_rows[0] = torch.from_numpy(u).float()
        sae.W_dec[0] = torch.from_numpy(u).float()
        sae.b_enc[0] = -2.0  # fires only where x · u > 2
        sae.b_dec.zero_()
    return sae


def test_top_examples_are_the_planted_prompts(planted) -> None:
    store_dir, u = planted
    store = ActivationStore(store_dir)
    sae = planted_sae(u)
    W_U = np.random.default_rng(1).normal(size=(50, D)) * 0.1
    W_U[7] = u  # the logit lens of u points at token 7
    features = {"safety": [{"feature": 0, "weight": 0.5, "selection_frequency": 1.0}]}
    (card,) = build_feature_cards(sae, store, LAYER, features, Tokens(), W_U=W_U,
                                  mean_differences={"safety": u}, n_top=8, n_other=3)
    shown = [ex["prompt_id"] for ex in card["top_examples"]]
    assert set(shown) == PLANTED  # all of them, nothing else: eval rows are never read
    values = [ex["value"] for ex in card["top_examples"]]
    assert values == sorted(values, reverse=True)
    for ex in card["top_examples"]:
        i = int(ex["prompt_id"][1:])
        assert ex["tokens"][ex["argmax"]] == f"t{100 * (i + 1) + 4}"  # the planted token is the peak
        assert ex["split"] in ("extract", "calibrate") and len(ex["tokens"]) == 6  # prefix rows left out
    assert card["other_examples"] == []  # every planted prompt is a safety prompt
    assert card["logit_lens"]["top"][0][0] == "t7"
    assert card["cosine_mean_difference"] == pytest.approx(1.0)
    assert card["weight"] == 0.5 and card["category"] == "safety"
    assert set(card["per_category"]) == {"benign", "safety"}


def test_eval_rows_are_refused(planted) -> None:
    store_dir, u = planted
    with pytest.raises(ValueError, match="extract / calibrate rows only"):
        latent_values(planted_sae(u), ActivationStore(store_dir), LAYER, [0], splits=("extract", "eval"))


def test_logit_lens_orders_tokens() -> None:
    W_U = np.eye(4)
    lens = logit_lens(np.array([0.0, 3.0, -1.0, 1.0]), W_U, lambda i: f"t{i}", k=2)
    assert [t for t, _ in lens["top"]] == ["t1", "t3"] and [t for t, _ in lens["bottom"]] == ["t2", "t0"]
