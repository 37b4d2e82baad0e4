"""SAE training rows (kinds, sink, exact duplicates) and held-out quality (per kind, dead and dense latents)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from activations.positions import CONTENT, PREFIX, RESPONSE_START, SUFFIX
from activations.store import ActivationStore, ShardWriter
from sae.config import DataConfig, OptimConfig, SAEConfig, TrainConfig
from sae.data import ShardDataModule
from sae.model import SparseAutoencoder
from sae.quality import evaluate_quality
from sae.rows import duplicate_mask, training_rows
from sae.train import train_saes
from tests.helpers.sae_fixtures import one_torch_thread  # noqa: F401

LAYER, D = 2, 8
KINDS = [PREFIX, PREFIX, CONTENT, CONTENT, CONTENT, SUFFIX, RESPONSE_START]  # 7 tokens per prompt


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """40 extract + 20 calibrate prompts of 7 tokens: the 2 prefix rows are the same in every prompt,
    and prompts 1, 2, 3 repeat prompt 0's first content row (an exact duplicate)."""
    rng = np.random.default_rng(0)
    out = tmp_path_factory.mktemp("rows") / "store"
    prefix = rng.normal(size=(2, D)).astype(np.float32)
    prefix[0] *= 100.0  # an attention-sink-like first row
    writer = ShardWriter(out, [LAYER], D, "float32", "all", model_info={"id": "synthetic"}, rows_per_shard=64)
    first_content = None
    with writer:
        for i in range(60):
            x = np.concatenate([prefix, rng.normal(size=(5, D)).astype(np.float32)])
            if i == 0:
                first_content = x[2].copy()
            elif i in (1, 2, 3):
                x[2] = first_content
            writer.add_prompt(f"q{i:02d}", "benign" if i % 2 else "safety", "extract" if i < 40 else "calibrate",
                              np.arange(7), np.arange(7) + 10, {LAYER: x}, position_kinds=np.array(KINDS))
    writer.finish()
    return out


def test_rules_remove_prefix_sink_and_duplicates_and_are_counted(store: Path) -> None:
    s = ActivationStore(store)
    selection = training_rows(s, LAYER, DataConfig())
    assert selection.n_candidates == 40 * 7
    assert selection.removed == {"position_kind": 80, "sink": 0, "duplicate": 3}  # position 0 is prefix here
    assert selection.n_rows == 40 * 5 - 3
    meta = s.meta("extract")
    kept = selection.mask()
    assert not kept[meta.position_kind == PREFIX].any()
    for i in (1, 2, 3):  # the copies go, the first occurrence stays
        assert not kept[(meta.prompt_id == f"q{i:02d}") & (meta.position == 2)].any()
    assert kept[(meta.prompt_id == "q00") & (meta.position == 2)].all()
    with_prefix = training_rows(s, LAYER, DataConfig(position_kinds=["prefix", "content"], drop_duplicates=True))
    assert with_prefix.removed["sink"] == 40  # position 0 dropped as the sink
    assert with_prefix.removed["duplicate"] == 39 + 3  # the shared second prefix row is kept once
    x = np.random.default_rng(1).normal(size=(10, 4)).astype(np.float32)
    x[7] = x[2]
    np.testing.assert_array_equal(np.flatnonzero(~duplicate_mask([x[:5], x[5:]], 4)), [7])


@pytest.mark.parametrize("in_memory", [True, False])
def test_the_data_module_serves_only_the_selected_rows(store: Path, in_memory: bool) -> None:
    data = DataConfig(batch_size=197, lanes=1, in_memory=in_memory, chunk_rows=50, window_chunks=2)
    dm = ShardDataModule(str(store), LAYER, data)
    dm.setup()
    assert dm.n_rows == 197
    x_all, meta = ActivationStore(store).load(LAYER, "extract")
    expected = {row.tobytes() for row in x_all[dm.selection.index]}
    batch, _ = dm.batch_for_step(0, torch.device("cpu"))  # one epoch = one batch of 197 rows (both modes)
    dm.close_stream()
    served = {row.tobytes() for row in batch.numpy()}
    assert served == expected


def test_training_run_keeps_the_row_counts_and_scores_held_out_rows(store: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(seeds=[0], steps=4, sae=SAEConfig(d_in=D, d_sae=16, k=2), optim=OptimConfig(lr=1e-3),
                      data=DataConfig(batch_size=32), ckpt_every=10, log_every_n_steps=2)
    run = train_saes(store, LAYER, tmp_path / "run", cfg, enable_progress_bar=False, print_table=False)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["training_rows"] == {"candidates": 280, "removed": {"position_kind": 80, "sink": 0, "duplicate": 3},
                                        "kept": 197}
    record = metrics["seeds"]["0"]
    assert record["metrics_split"] == "calibrate" and record["held_out"] is True
    assert record["n_rows"] == 20 * 5 and record["by_kind"]["content"]["n_rows"] == 60
    assert record["by_kind"]["response_start"]["n_rows"] == 20
    cfg_json = json.loads((run / "seed_0" / "cfg.json").read_text())["refusal_sae"]
    assert cfg_json["training_rows"] == metrics["training_rows"] and cfg_json["final_metrics"]["dead_fraction"] == record["dead_fraction"]
    assert (run / "seed_0" / "latent_stats.safetensors").is_file()


def test_dead_and_dense_latents_have_one_definition_that_can_be_nonzero(store: Path) -> None:
    sae = SparseAutoencoder(SAEConfig(d_in=D, d_sae=16, k=2), seed=0).eval()
    with torch.no_grad():
        sae.b_enc[0] = 1e4  # fires on every row: dense
        sae.b_enc[12:] = -1e4  # never fires: dead
    (quality,) = evaluate_quality([sae], ActivationStore(store), LAYER, DataConfig())
    freq = quality["firing_frequency"]
    assert freq[0] == 1.0 and (freq[12:] == 0).all()
    assert quality["dead_fraction"] == pytest.approx(np.mean(freq == 0)) and quality["dead_fraction"] >= 4 / 16
    assert quality["dense_fraction"] == pytest.approx(np.mean(freq > 0.1)) and quality["dense_fraction"] >= 1 / 16
    lo, hi = quality["dead_fraction_ci"]
    assert lo <= quality["dead_fraction"] <= hi and quality["n_latents"] == 16
    assert quality["held_out"] and quality["n_rows"] == 100
    assert quality["by_kind"]["content"]["fvu"] > 0 and quality["by_kind"]["response_start"]["l0"] == 2.0
