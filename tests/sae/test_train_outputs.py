"""What a training run shows and writes for others: the step bar on stderr, sparsity.safetensors,
a hub-id model_name (our local path beside it), files readable under the umask."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from activations.model_loading import EMBEDDED_HUB_ID, EMBEDDED_MODEL, hub_id, write_model_source
from activations.store import ShardWriter
from sae.config import DataConfig, SAEConfig, TrainConfig
from sae.train import train_saes
from tests.helpers.sae_fixtures import one_torch_thread, sparse_dictionary_data  # noqa: F401

LAYER = 2


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A model folder written here from the embedded model (as refusal-tokens fit writes one)."""
    folder = tmp_path_factory.mktemp("fitted") / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    write_model_source(folder, EMBEDDED_MODEL)
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory, model_folder: Path) -> Path:
    x, _ = sparse_dictionary_data(300, 16, 32, 2, seed=0)
    out = tmp_path_factory.mktemp("store") / "acts"
    writer = ShardWriter(out, layers=[LAYER], d_model=16, dtype="float32", positions="last",
                         model_info={"id": str(model_folder)}, rows_per_shard=300)
    with writer:
        for i in range(300):
            split = "extract" if i < 240 else "calibrate"
            writer.add_prompt(f"p{i}", "benign", split, positions=np.array([0]), token_ids=np.array([1]),
                              activations={LAYER: x[i:i + 1]})
    writer.finish()
    return out


def test_hub_id_follows_the_source_of_folders_written_here(model_folder: Path, tmp_path: Path) -> None:
    assert hub_id(EMBEDDED_MODEL) == EMBEDDED_HUB_ID
    assert hub_id(str(model_folder)) == EMBEDDED_HUB_ID
    refit = tmp_path / "refit"
    refit.mkdir()
    write_model_source(refit, str(model_folder))  # a model fitted on a fitted model: followed back
    assert hub_id(str(refit)) == EMBEDDED_HUB_ID
    assert hub_id("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    assert hub_id(str(tmp_path)) is None and hub_id("/no/such/folder") is None and hub_id("") is None


def test_run_shows_a_step_bar_on_stderr_and_writes_files_for_others(store: Path, model_folder: Path, tmp_path: Path,
                                                                   capsys) -> None:
    cfg = TrainConfig(seeds=[0], steps=12, sae=SAEConfig(d_in=16, d_sae=64, k=2), log_every_n_steps=4,
                      data=DataConfig(batch_size=64))
    previous = os.umask(0o022)
    try:
        run = train_saes(store, LAYER, tmp_path / "run", cfg, print_table=False)
    finally:
        os.umask(previous)
    captured = capsys.readouterr()
    bar = [line for line in captured.err.splitlines() if line.startswith("train:")]
    assert bar and "12/12" in bar[-1] and "loss=" in bar[-1] and "fvu=" in bar[-1]
    assert "Epoch" not in captured.err + captured.out and "train:" not in captured.out

    seed_dir = run / "seed_0"
    cfg_json = json.loads((seed_dir / "cfg.json").read_text())
    assert cfg_json["model_name"] == EMBEDDED_HUB_ID  # SAELens tools can load the model by this name
    assert cfg_json["refusal_sae"]["model_path"] == str(model_folder)  # and the folder actually used
    sparsity = load_file(str(seed_dir / "sparsity.safetensors"))["sparsity"]
    metrics = json.loads((run / "metrics.json").read_text())["seeds"]["0"]
    assert sparsity.shape == (64,) and sparsity.dtype == np.float32
    never = float(np.mean(sparsity < -9.99))  # log10(0 + 1e-10) = -10: latents that never fired
    assert never == pytest.approx(metrics["never_fired_fraction"])
    density = 10.0 ** sparsity.astype(np.float64) - 1e-10
    assert density.sum() == pytest.approx(metrics["l0"], rel=1e-4)  # mean active latents per row
    for path in (seed_dir / "cfg.json", seed_dir / "sae.safetensors", seed_dir / "sparsity.safetensors",
                 run / "metrics.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path
