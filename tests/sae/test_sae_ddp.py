"""Data-parallel training equals one device stepping the global batch (two gloo processes on the CPU)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae.config import DataConfig, OptimConfig, SAEConfig, TrainConfig
from sae.export import load_sae_run
from sae.train import train_saes
from tests.helpers.sae_fixtures import one_torch_thread, sparse_dictionary_data, write_store  # noqa: F401

LAYER = 3
RUN_KW = dict(enable_progress_bar=False, print_table=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    x, _ = sparse_dictionary_data(700, 16, 32, 2, seed=4)
    splits = ["extract"] * 600 + ["calibrate"] * 100
    return write_store(tmp_path_factory.mktemp("ddp_store") / "store", x, LAYER, splits=splits, rows_per_shard=150)


def job(batch_size: int, fused: bool, in_memory: bool = True, steps: int = 10) -> TrainConfig:
    # AuxK on with a short dead threshold: latents die within the run, so AuxK's dense row terms
    # are exercised too; normalize_input checks the input scale under DDP
    sae = SAEConfig(d_in=16, d_sae=64, k=2, auxk_coeff=1 / 32, auxk_k=8, dead_tokens_threshold=256, normalize_input=True)
    return TrainConfig(seeds=[0, 1], steps=steps, sae=sae, optim=OptimConfig(lr=3e-3, fused=fused, lr_warmup_steps=2),
                       data=DataConfig(batch_size=batch_size, in_memory=in_memory, chunk_rows=50, window_chunks=4),
                       ckpt_every=100, log_every_n_steps=5)


@pytest.mark.parametrize("fused", [True, False])
def test_ddp_on_two_ranks_equals_one_process_with_the_global_batch(store: Path, tmp_path: Path, fused: bool) -> None:
    """Fused path: the deferred gradient entries are gathered from both ranks (sae/kernels/ddp.py);
    both paths: the FVU-type terms use the global batch's variance. Same weights as one process."""
    one = train_saes(store, LAYER, tmp_path / "one", job(128, fused), **RUN_KW)
    two = train_saes(store, LAYER, tmp_path / "two", job(64, fused, in_memory=False),
                     trainer=dict(accelerator="cpu", devices=2, strategy="ddp_fork"), **RUN_KW)
    a, b = load_sae_run(one), load_sae_run(two)
    for seed in (0, 1):
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(b[seed], name), getattr(a[seed], name), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"seed {seed} {name}: {m}")
    dead = json.loads((two / "metrics.json").read_text())["seeds"]["0"]["dead_fraction"]
    assert dead > 0  # AuxK had dead latents to work on


def test_lightnings_per_step_sigterm_broadcast_runs_only_every_n_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-batch SIGTERM broadcast of multi-process runs (a host sync) is kept, every n steps only
    (the same steps on every rank, so the collectives pair up); the DDP test above runs with it."""
    import lightning.pytorch as pl

    from sae.host_sync import throttle_sigterm_check

    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False)
    calls: list[int] = []
    step = [0]
    monkeypatch.setattr(pl.Trainer, "global_step", property(lambda self: step[0]))
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: calls.append(step[0])
    assert throttle_sigterm_check(trainer, 5) is True  # this Lightning has the check
    for step[0] in range(12):
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor()
    assert calls == [0, 5, 10]
    assert throttle_sigterm_check(trainer, 1) is False
