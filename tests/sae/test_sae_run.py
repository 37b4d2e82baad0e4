"""Lightning training runs: multi-seed export, exact resume, data order, bad inputs, CLI, DDP (CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.cli import main as cli_main
from analysis.stages import train as train_stage
from analysis.stages.command import translate_argv
from sae.config import DataConfig, OptimConfig, SAEConfig, TrainConfig
from sae.data import ShardDataModule
from sae.export import load_sae_run
from sae.losses import NonFiniteLossError
from sae.train import train_saes
from tests.helpers.sae_fixtures import one_torch_thread, two_category_store  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
LAYER = 3
CFG = SAEConfig(d_in=16, d_sae=64, k=2, auxk_coeff=1 / 32, dead_tokens_threshold=512)
RUN_KW = dict(enable_progress_bar=False, print_table=False)


def job(seeds: list[int], steps: int, sae: SAEConfig = CFG, lr: float | None = None, log_every_n_steps: int = 5,
        ckpt_every: int = 7, **data) -> TrainConfig:
    """The train config of these tests: batches of 128 rows unless `data` says otherwise."""
    return TrainConfig(seeds=seeds, steps=steps, sae=sae, optim=OptimConfig(lr=lr), data=DataConfig(**{"batch_size": 128, **data}),
                       ckpt_every=ckpt_every, log_every_n_steps=log_every_n_steps)


def main(argv: list[str]) -> int:
    return cli_main(["train", *argv])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """700 rows (d_model 16): 600 extract rows of two categories, 100 calibrate rows."""
    return two_category_store(tmp_path_factory.mktemp("sae_store") / "store", LAYER)


@pytest.mark.parametrize("in_memory", [True, False])
def test_multi_seed_run_exports_and_resume_equals_uninterrupted(store: Path, tmp_path: Path, in_memory: bool) -> None:
    data_kwargs = {"in_memory": in_memory, "chunk_rows": 100, "window_chunks": 2}
    straight = train_saes(store, LAYER, tmp_path / "a", job([0, 1], 20, **data_kwargs), **RUN_KW)
    killed = train_saes(store, LAYER, tmp_path / "b", job([0, 1], 10, **data_kwargs), **RUN_KW)
    resumed = train_saes(store, LAYER, killed, job([0, 1], 20, **data_kwargs), ckpt_path="last", **RUN_KW)
    a, b = load_sae_run(straight), load_sae_run(resumed)
    assert sorted(a) == sorted(b) == [0, 1]
    for seed in a:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(a[seed], name), getattr(b[seed], name)), (seed, name)
    assert not torch.equal(a[0].W_dec, a[1].W_dec)  # seeds initialise differently

    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["layer"] == LAYER and set(metrics["seeds"]) == {"0", "1"}
    for record in metrics["seeds"].values():
        assert record["steps"] == 20 and record["metrics_split"] == "calibrate" and record["n_rows"] == 100
        assert 0 <= record["fvu"] < 1 and record["l0"] <= CFG.k and 0 <= record["dead_fraction"] <= 1
    for seed in (0, 1):
        seed_dir = resumed / f"seed_{seed}"
        cfg = json.loads((seed_dir / "cfg.json").read_text())
        assert cfg["refusal_sae"]["shards_manifest_sha256"] == metrics["shards_manifest_sha256"]
        lines = (seed_dir / "metrics.csv").read_text().splitlines()
        assert lines[0].startswith("step,") and "fvu" in lines[0]
        assert [int(line.split(",")[0]) for line in lines[1:]] == [4, 9, 14, 19]  # both runs' logs merged


def test_data_order_is_a_function_of_step_and_ranks_split_the_global_batch(store: Path) -> None:
    single = ShardDataModule(str(store), LAYER, DataConfig(batch_size=256))
    single.setup()
    ranked = ShardDataModule(str(store), LAYER, DataConfig(batch_size=128))
    ranked.setup()
    cpu = torch.device("cpu")
    for step in (0, 3):  # 600 rows: step 3 crosses an epoch boundary
        x_all, y_all = single.batch_for_step(step, cpu)
        parts = [ranked.batch_for_step(step, cpu, rank=r, world_size=2) for r in (0, 1)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x_all)
        assert torch.equal(torch.cat([p[1] for p in parts]), y_all)
    assert set(y_all.tolist()) <= {0, 4}  # benign and safety class ids

    streamed = ShardDataModule(str(store), LAYER, DataConfig(batch_size=256, in_memory=False, chunk_rows=100,
                                                             window_chunks=2))
    batches = [streamed.batch_for_step(step, cpu)[0] for step in range(4)]
    streamed.close_stream()
    late = ShardDataModule(str(store), LAYER, DataConfig(batch_size=128, in_memory=False, chunk_rows=100,
                                                         window_chunks=2))
    assert torch.equal(late.batch_for_step(3, cpu, rank=1, world_size=2)[0], batches[3][128:])
    late.close_stream()
    epoch_rows = torch.cat(batches[:3])  # ceil(600 / 256) = 3 steps per epoch
    assert len(np.unique(epoch_rows.numpy(), axis=0)) == 600  # one epoch sees every row


def test_bad_inputs_give_one_clear_error(store: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"d_in=32 does not match the activation store's d_model=16"):
        train_saes(store, LAYER, tmp_path / "r", job([0], 2, sae=SAEConfig(d_in=32, d_sae=64, k=2)), **RUN_KW)
    with pytest.raises(ValueError, match=r"split 'eval' of layer 3 has no rows"):
        train_saes(store, LAYER, tmp_path / "r", job([0], 2, split="eval"), **RUN_KW)
    with pytest.raises(ValueError, match=r"layer 5 is not in the activation store"):
        train_saes(store, 5, tmp_path / "r", job([0], 2), **RUN_KW)
    with pytest.raises(ValueError, match="unknown split 'train'"):
        train_saes(store, LAYER, tmp_path / "r", job([0], 2, split="train"), **RUN_KW)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss term 'fvu' at step 1 of seed 0"):
        train_saes(store, LAYER, tmp_path / "nan", job([0], 5, lr=1e30, log_every_n_steps=1), **RUN_KW)


def test_cli_trains_from_yaml_and_rejects_unknown_keys(store: Path, tmp_path: Path, capsys) -> None:
    assert translate_argv(train_stage.COMMAND, ["--seeds", "0", "1", "2", "--x", "1"]) == [
        "--train.seeds", '["0", "1", "2"]', "--x", "1"]
    base = [
        "-c", str(REPO / "configs/sae/smollm2.yaml"), "--out", str(tmp_path / "run"),
        "--acts", str(store), "--layer", str(LAYER), "--train.sae.d_in", "16",
        "--train.sae.k", "2", "--train.sae.expansion_factor", "4", "--train.steps", "6",
        "--train.data.batch_size", "64",
    ]
    assert main([*base, "--train.seeds", "3", "4"]) == 0
    assert sorted(load_sae_run(tmp_path / "run")) == [3, 4]
    assert "fvu" in capsys.readouterr().out  # the final table
    assert main([*base, "--train.sae.bogus", "1"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main([*base, "--train.sae.d_in", "32"]) == 2
    assert "error: SAE d_in=32 does not match" in capsys.readouterr().err


def test_cli_keeps_the_lightningcli_spellings_of_earlier_versions(store: Path, tmp_path: Path, capsys) -> None:
    old = [
        "-c", str(REPO / "configs/sae/smollm2.yaml"), "--out_dir", str(tmp_path / "old"),
        "--data.shards_dir", str(store), "--data.layer", str(LAYER), "--model.sae.d_in", "16",
        "--model.sae.k", "2", "--model.sae.expansion_factor", "4", "--trainer.max_steps", "6",
        "--data.batch_size", "64", "--model.lr", "0.001", "--seeds", "3",
    ]
    assert main(old) == 0
    err = capsys.readouterr().err
    assert "note: --out_dir is now --out" in err and "note: --model.lr is now --train.optim.lr" in err
    assert sorted(load_sae_run(tmp_path / "old")) == [3]


def test_ddp_two_gloo_processes_in_process(store: Path, tmp_path: Path) -> None:
    """Two CPU ranks (gloo, forked): ranks must end with identical weights and trackers (the export
    checks it and raises otherwise); rank 0 exports once."""
    out = train_saes(store, LAYER, tmp_path / "ddp", job([0, 1], 8, batch_size=64),
                     trainer=dict(accelerator="cpu", devices=2, strategy="ddp_fork"), **RUN_KW)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {r["steps"] for r in metrics["seeds"].values()} == {8}
    assert sorted(load_sae_run(out)) == [0, 1]


@pytest.mark.skipif(not os.environ.get("REFUSAL_SAE_SLOW_TESTS"), reason="starts 2 fresh interpreters (~40 s on 2 cores)")
def test_ddp_cli_subprocess(store: Path, tmp_path: Path) -> None:
    """`refusal-sae train ... --trainer.strategy ddp --trainer.devices 2` as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "analysis.cli", "train", "-c", str(REPO / "configs/sae/smollm2.yaml"),
        "--out", str(tmp_path / "ddp"), "--acts", str(store), "--layer", str(LAYER),
        "--train.sae.d_in", "16", "--train.sae.k", "2", "--train.sae.expansion_factor", "4", "--train.seeds", "0", "1",
        "--train.steps", "8", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy", "ddp", "--train.data.batch_size", "64",
    ]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed_backend=gloo" in result.stderr + result.stdout
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert {r["steps"] for r in metrics["seeds"].values()} == {8}
    assert sorted(load_sae_run(tmp_path / "ddp")) == [0, 1]


def test_seed_parallel_one_seed_per_rank_equals_one_device_and_resumes_exactly(store: Path, tmp_path: Path) -> None:
    """`seed_parallel`: rank r trains seed r on the whole batch, so each seed ends exactly as in a
    one-process run; a killed run resumes from a checkpoint holding both ranks' seeds and optimizers."""
    ranks = {"trainer": dict(accelerator="cpu", devices=2, strategy="seed_parallel_fork")}
    single = train_saes(store, LAYER, tmp_path / "single", job([0, 1], 10, ckpt_every=5, batch_size=64), **RUN_KW)
    parallel = train_saes(store, LAYER, tmp_path / "parallel", job([0, 1], 10, ckpt_every=5, batch_size=64), **ranks, **RUN_KW)
    killed = train_saes(store, LAYER, tmp_path / "resumed", job([0, 1], 5, ckpt_every=5, batch_size=64), **ranks, **RUN_KW)
    resumed = train_saes(store, LAYER, killed, job([0, 1], 10, ckpt_every=5, batch_size=64), ckpt_path="last", **ranks,
                         **RUN_KW)
    a, b, c = load_sae_run(single), load_sae_run(parallel), load_sae_run(resumed)
    for seed in (0, 1):
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(b[seed], name), getattr(a[seed], name), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(getattr(c[seed], name), getattr(b[seed], name), rtol=1e-5, atol=1e-6)
    metrics = json.loads((parallel / "metrics.json").read_text())
    assert set(metrics["seeds"]) == {"0", "1"} and {r["steps"] for r in metrics["seeds"].values()} == {10}
    header = (parallel / "seed_1" / "metrics.csv").read_text().splitlines()[0]
    assert "fvu" in header  # rank 1's seed is logged too (its metrics are reduced to rank 0)
    ckpt = torch.load(parallel / "ckpt" / "last.ckpt", weights_only=True, map_location="cpu")
    assert [g["name"] for g in ckpt["optimizer_states"][0]["param_groups"]] == ["seed0"]  # rank 0 trained seed 0 only
    saved = ckpt["seed_parallel_optimizer"]  # every seed's Adam state, gathered from its owner
    assert sorted(saved) == [0, 1] and all(saved[i]["W_dec"]["step"] == 10 for i in (0, 1))
