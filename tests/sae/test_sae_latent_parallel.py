"""Latent-parallel training (each rank owns half the latents) equals one device stepping the same
global batch (two gloo processes on the CPU, the torch reference of the fused kernels)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae.config import DataConfig, OptimConfig, SAEConfig, TrainConfig
from sae.export import load_sae_run
from sae.kernels.latent_shard import LatentShard
from sae.train import train_saes
from tests.helpers.sae_fixtures import one_torch_thread, sparse_dictionary_data, write_store  # noqa: F401

LAYER = 3
RUN_KW = dict(enable_progress_bar=False, print_table=False)
LP = dict(accelerator="cpu", devices=2, strategy="latent_parallel_fork")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    x, _ = sparse_dictionary_data(700, 16, 32, 2, seed=4)
    splits = ["extract"] * 600 + ["calibrate"] * 100
    return write_store(tmp_path_factory.mktemp("lp_store") / "store", x, LAYER, splits=splits, rows_per_shard=150)


def job(steps: int = 10, auxk_k: int = 8, architecture: str = "topk", fused: bool | None = True,
        in_memory: bool = True, d_sae: int = 128, k: int = 2, contrastive: float = 0.0) -> TrainConfig:
    # AuxK on with a short dead threshold: 30-45 of the 128 latents are dead from step 2 on, more than
    # k_aux, so the cross-shard k_aux threshold is exercised; normalize_input checks the input scale
    sae = SAEConfig(d_in=16, d_sae=d_sae, k=k, auxk_coeff=1 / 32, auxk_k=auxk_k, dead_tokens_threshold=128,
                    normalize_input=True, architecture=architecture, contrastive_coeff=contrastive)
    return TrainConfig(seeds=[0, 1], steps=steps, sae=sae,
                       optim=OptimConfig(lr=3e-3, fused=fused, lr_warmup_steps=2),
                       data=DataConfig(batch_size=128, in_memory=in_memory, chunk_rows=50, window_chunks=4),
                       ckpt_every=100, log_every_n_steps=5)


def assert_same_saes(run_a: Path, run_b: Path) -> None:
    a, b = load_sae_run(run_a), load_sae_run(run_b)
    for seed in (0, 1):
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(b[seed], name), getattr(a[seed], name), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"seed {seed} {name}: {m}")


def test_two_latent_shards_equal_one_process(store: Path, tmp_path: Path) -> None:
    one = train_saes(store, LAYER, tmp_path / "one", job(), **RUN_KW)
    two = train_saes(store, LAYER, tmp_path / "two", job(in_memory=False), trainer=LP, **RUN_KW)
    assert_same_saes(one, two)
    metrics = json.loads((two / "metrics.json").read_text())["seeds"]["0"]
    assert metrics["auxk_dead_fraction"] * 128 > 8  # more dead latents than k_aux: the cross-shard threshold ran
    # the export holds whole SAEs, equal to the one-process run's statistics too
    assert metrics["auxk_dead_fraction"] == json.loads((one / "metrics.json").read_text())["seeds"]["0"]["auxk_dead_fraction"]


def test_k_wider_than_a_shard_and_loss_terms_on_the_codes(store: Path, tmp_path: Path) -> None:
    """k 6 of 8 latents (each shard owns 4 < k: every candidate takes part in the merge) with the
    contrastive term on the codes (computed on every rank, its gradient kept by each entry's owner)."""
    x, _ = sparse_dictionary_data(700, 16, 32, 2, seed=5)
    labelled = write_store(tmp_path / "store", x, LAYER, splits=["extract"] * 600 + ["calibrate"] * 100,
                           categories=[("safety", "unsupported", "benign")[i % 3] for i in range(700)],
                           rows_per_shard=150)
    settings = dict(d_sae=8, k=6, auxk_k=2, contrastive=0.1, steps=6)
    one = train_saes(labelled, LAYER, tmp_path / "one", job(**settings), **RUN_KW)
    two = train_saes(labelled, LAYER, tmp_path / "two", job(**settings), trainer=LP, **RUN_KW)
    assert_same_saes(one, two)
    header, first = (one / "seed_0" / "metrics.csv").read_text().splitlines()[:2]
    assert float(dict(zip(header.split(","), first.split(",")))["contrastive"]) > 0  # the term was live


def test_checkpoints_hold_whole_saes_and_resume_exactly(store: Path, tmp_path: Path) -> None:
    """A latent-parallel checkpoint has whole weights and Adam moments (as a one-device run's); a run
    stopped at step 6 and continued to 10 equals one straight run of 10 steps."""
    straight = train_saes(store, LAYER, tmp_path / "straight", job(steps=10), **RUN_KW)
    run = tmp_path / "resumed"
    train_saes(store, LAYER, run, job(steps=6), trainer=LP, **RUN_KW)
    ckpt = torch.load(run / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"]["saes.0.W_dec"].shape == (128, 16)
    moments = [s for s in ckpt["optimizer_states"][0]["state"].values() if s["exp_avg"].ndim == 2]
    assert moments and all(s["exp_avg"].shape[0] == 128 and s["exp_avg_sq"].shape[0] == 128 for s in moments)
    train_saes(store, LAYER, run, job(steps=10), trainer=LP, **RUN_KW)
    assert_same_saes(straight, run)


def test_unsupported_settings_are_refused(store: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="d_sae divisible"):
        LatentShard(0, 3, 64)
    with pytest.raises(Exception, match="topk SAEs only"):
        train_saes(store, LAYER, tmp_path / "btk", job(steps=2, architecture="batchtopk"), trainer=LP, **RUN_KW)
    with pytest.raises(Exception, match="fused path only"):
        train_saes(store, LAYER, tmp_path / "unfused", job(steps=2, fused=False), trainer=LP, **RUN_KW)


def test_latent_shards_split_evenly() -> None:
    shards = [LatentShard(r, 4, 64) for r in range(4)]
    assert [(s.lo, s.hi) for s in shards] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    ids = torch.tensor([[0, 17, 40, 63]])
    assert shards[1].local_ids(ids).tolist() == [[16, 1, 16, 16]]  # 16 = the sentinel: another shard's
