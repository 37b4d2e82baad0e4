"""Items 4 and 9: artifacts are checked against the model they claim, by weights, not by path.

Two tiny random Llamas of the same shape (seeds 0 and 1) stand for "a different model of the same width".
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from activations.harvest import harvest, prompt_info_from_records
from activations.model_identity import comparable, model_identity, model_mismatch
from activations.model_loading import load_model
from activations.prompts import load_prompt_set
from activations.store import ActivationStore
from activations.tiny_models import build_tiny_model
from analysis.cli import main as cli_main
from analysis.stages.common import load_seed_sae
from analysis.stages.steer import load_vector
from analysis.stages.vectors import Config as VectorsConfig
from analysis.stages.vectors import build_vectors
from probes.selection import read_features
from sae.config import DataConfig, SAEConfig, TrainConfig
from sae.train import train_saes
from tests.reliability.conftest import one_error_line

LAYER = 1


@pytest.fixture(scope="module")
def records():
    return list(load_prompt_set(["builtin:quickstart?per_category=4"], seed=0).records)


@pytest.fixture(scope="module")
def model_b(embedded_tokenizer):
    return build_tiny_model("llama", seed=1, tokenizer=embedded_tokenizer)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_llama, model_b, records):
    """Stores of models A and B (last token, layer 1) and an SAE run trained on B's store."""
    root = tmp_path_factory.mktemp("identity")
    stores = {}
    for name, (model, tokenizer) in {"a": tiny_llama, "b": model_b}.items():
        stores[name] = harvest(model, tokenizer, records, [LAYER], root / f"store_{name}", batch_size=16, progress=False)
    cfg = TrainConfig(seeds=[0], steps=5, sae=SAEConfig(expansion_factor=2, k=4), data=DataConfig(batch_size=32))
    sae_b = train_saes(stores["b"], LAYER, root / "sae_b", cfg, enable_progress_bar=False, print_table=False)
    return {"root": root, **stores, "sae_b": sae_b}


def test_identity_ignores_path_and_dtype_but_not_weights(tiny_llama, model_b):
    model_a = tiny_llama[0]
    a = model_identity(model_a, "/somewhere/model")
    assert comparable(a) == comparable(model_identity(model_a, "/elsewhere/model"))
    bf16 = model_identity(build_tiny_model("llama", seed=0, tokenizer=tiny_llama[1])[0].to(torch.bfloat16), "x")
    assert bf16["weights_fingerprint"] != a["weights_fingerprint"] and model_mismatch(a, bf16) is None
    assert "weights fingerprint" in model_mismatch(a, model_identity(model_b[0], "/somewhere/model"))


def test_select_refuses_an_sae_of_another_model(artifacts, tmp_path, capsys):
    out = tmp_path / "select"
    args = ["select", "--acts", str(artifacts["a"]), "--sae", str(artifacts["sae_b"]), "--layer", str(LAYER),
            "--out", str(out), "--device", "cpu"]
    assert cli_main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "SAE seed 0 belongs to model" in line and "different models" in line
    assert not (out / "features.json").exists()


def test_vectors_refuse_an_sae_of_another_model(artifacts, tmp_path, capsys):
    args = ["vectors", "--acts", str(artifacts["a"]), "--sae", str(artifacts["sae_b"]), "--layer", str(LAYER),
            "--out", str(tmp_path / "vectors"), "--device", "cpu"]
    assert cli_main(args) == 2
    assert "different models" in one_error_line(capsys.readouterr().err)


def test_steer_side_checks_vectors_sae_and_features_against_the_loaded_model(artifacts, tiny_llama, model_b, tmp_path):
    """What `steer` / `attribute` load next to a model: vectors, an SAE, features.json."""
    id_a = model_identity(tiny_llama[0], "a")
    id_b = model_identity(model_b[0], "b")
    build_vectors(ActivationStore(artifacts["a"]), LAYER, None, None, tmp_path / "vectors", VectorsConfig())
    d_model = tiny_llama[0].config.hidden_size
    assert load_vector(tmp_path / "vectors" / "residual", "global", LAYER, d_model, id_a).layer == LAYER
    with pytest.raises(ValueError, match="steering vector 'global' .* different models"):
        load_vector(tmp_path / "vectors" / "residual", "global", LAYER, d_model, id_b)
    sae_dir = artifacts["sae_b"] / "seed_0"
    assert load_seed_sae(sae_dir, LAYER, d_model, model=id_b)[1] == 0
    with pytest.raises(ValueError, match="SAE .* different models"):
        load_seed_sae(sae_dir, LAYER, d_model, model=id_a)
    features = tmp_path / "features.json"
    features.write_text(json.dumps({"per_class": {}, "meta": {"layer": 1, "space": "sae", "model_identity": id_b}}))
    read_features(features, layer=LAYER, model=id_b)
    with pytest.raises(ValueError, match="features.json belongs to model .* different models"):
        read_features(features, layer=LAYER, model=id_a)


def test_a_moved_model_and_store_resume_the_harvest(tiny_llama_dir, records, tmp_path):
    """Item 9: the model's path is not part of the harvest identity, so a run folder (and the model)
    can be moved and the harvest resumed."""
    first = tmp_path / "model_here"
    shutil.copytree(tiny_llama_dir, first)
    model, tokenizer = load_model(str(first))
    info = prompt_info_from_records(records)  # the whole prompt set; only part of it written, as after a kill
    store = harvest(model, tokenizer, records[:6], [LAYER], tmp_path / "run" / "store", batch_size=8, progress=False,
                    prompt_info=info)
    assert ActivationStore(store).manifest["model"]["id"] == str(first)
    moved_model, moved_run = tmp_path / "model_there", tmp_path / "moved_run"
    first.rename(moved_model)
    (tmp_path / "run").rename(moved_run)
    model, tokenizer = load_model(str(moved_model))
    harvest(model, tokenizer, records, [LAYER], moved_run / "store", batch_size=8, progress=False,
            prompt_info=info)  # resumes
    moved = ActivationStore(moved_run / "store")
    assert moved.n_rows == len(records) and moved.complete
