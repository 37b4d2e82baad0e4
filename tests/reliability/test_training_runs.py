"""`train` as a new user runs it: kill -9 and rerun, change the config and rerun, diverge, fail early.

Items 3, 5 and 8 of the reliability issue, and the one-checkpoint promise of the scale issue.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from analysis.cli import main as cli_main
from sae.config import DataConfig, OptimConfig, SAEConfig, TrainConfig
from sae.divergence import DivergedTrainingError, DivergenceMonitor
from sae.export import load_sae_run
from sae.train import train_saes
from tests.reliability.conftest import LAYER, one_error_line

REPO = Path(__file__).resolve().parents[2]
RUN_KW = {"enable_progress_bar": False, "print_table": False}


def train_args(store: Path, out: Path, *extra: str) -> list[str]:
    """A 20-step, two-seed `refusal-sae train` command with checkpoints every 7 steps."""
    return ["train", "--acts", str(store), "--layer", str(LAYER), "--out", str(out), "--train.seeds", "0", "1",
            "--train.steps", "20", "--train.ckpt_every", "7", "--train.log_every_n_steps", "5",
            "--train.data.batch_size", "128", "--train.sae.expansion_factor", "4", "--train.sae.k", "2",
            "--train.sae.auxk_coeff", "0.03125", "--train.sae.dead_tokens_threshold", "512",
            "--print_table", "false", *extra]


def assert_same_weights(a: Path, b: Path) -> None:
    saes_a, saes_b = load_sae_run(a), load_sae_run(b)
    assert sorted(saes_a) == sorted(saes_b)
    for seed in saes_a:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(saes_a[seed], name), getattr(saes_b[seed], name)), (seed, name)


def logged_steps(csv_path: Path) -> list[int]:
    with open(csv_path, newline="") as f:
        return sorted({int(float(r["step"])) for r in csv.DictReader(f) if r.get("step")})


KILL_AT_STEP = """
import os, signal, sys
import lightning.pytorch as pl
from analysis.cli import main

class KillNine(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)

init = pl.Trainer.__init__
def with_kill(self, *args, callbacks=None, **kwargs):
    init(self, *args, callbacks=[*(callbacks or []), KillNine()], **kwargs)
pl.Trainer.__init__ = with_kill
sys.exit(main(sys.argv[1:]))
"""


def test_kill9_between_checkpoints_then_the_same_command_resumes_bit_equal(sae_store, tmp_path, capsys):
    """Item 5: kill -9 at step 10 (last checkpoint at step 7), rerun the same command: it resumes from
    step 7 by itself and ends bitwise equal to an uninterrupted run (CPU)."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert cli_main(train_args(sae_store, straight)) == 0
    env = {**os.environ, "KILL_AT": "10", "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-c", KILL_AT_STEP, *train_args(sae_store, killed)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in (killed / "ckpt").iterdir()) == ["run.json", "step-7.ckpt"]
    assert cli_main(train_args(sae_store, killed)) == 0  # the same command, nothing added
    assert_same_weights(straight, killed)
    resumed_log = max((killed / "logs").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    assert min(logged_steps(resumed_log)) > 7  # it went on from the checkpoint, not from step 0
    assert sorted(p.name for p in (killed / "ckpt").iterdir()) == ["last.ckpt", "run.json"]


class _Crash(pl.Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 10:
            raise RuntimeError("crash at step 10")


@pytest.mark.parametrize("in_memory", [True, False])
def test_resume_after_a_crash_between_checkpoints_is_bit_equal(sae_store, tmp_path, monkeypatch, in_memory):
    """Item 5, both data modes, in process: the checkpoint of step 7 holds exactly what step 8 starts
    from (decoder rows renormalised before the checkpoint is written)."""
    cfg = TrainConfig(seeds=[0, 1], steps=20, sae=SAEConfig(d_sae=64, k=2, auxk_coeff=1 / 32, dead_tokens_threshold=512),
                      optim=OptimConfig(), ckpt_every=7, log_every_n_steps=5,
                      data=DataConfig(batch_size=128, in_memory=in_memory, chunk_rows=100, window_chunks=2))
    straight = train_saes(sae_store, LAYER, tmp_path / "a", cfg, **RUN_KW)
    init = pl.Trainer.__init__
    monkeypatch.setattr(pl.Trainer, "__init__", lambda self, *a, callbacks=None, **k: init(
        self, *a, callbacks=[*(callbacks or []), _Crash()], **k))
    with pytest.raises(RuntimeError, match="crash at step 10"):
        train_saes(sae_store, LAYER, tmp_path / "b", cfg, **RUN_KW)
    monkeypatch.setattr(pl.Trainer, "__init__", init)
    assert_same_weights(straight, train_saes(sae_store, LAYER, tmp_path / "b", cfg, **RUN_KW))


def test_a_changed_config_is_refused_naming_the_key_and_fresh_starts_over(sae_store, tmp_path, capsys):
    """Item 1 (command): a folder holding a run of another config is never resumed silently."""
    out = tmp_path / "run"
    assert cli_main(train_args(sae_store, out)) == 0
    capsys.readouterr()
    assert cli_main(train_args(sae_store, out, "--train.sae.k", "4")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "sae.k 2 -> 4" in line and "--ckpt_path fresh" in line
    assert load_sae_run(out)[0].cfg.k == 2  # untouched
    assert cli_main(train_args(sae_store, out, "--train.sae.k", "4", "--ckpt_path", "fresh")) == 0
    assert {s.cfg.k for s in load_sae_run(out).values()} == {4}
    assert logged_steps(out / "seed_0" / "metrics.csv")[0] == 4  # the old run's logs went with it
    capsys.readouterr()
    assert cli_main(train_args(sae_store, out, "--train.sae.k", "4", "--train.steps", "10")) == 2  # fewer steps
    assert "its checkpoint is at step 20, past this run's 10 steps" in one_error_line(capsys.readouterr().err)


def test_exactly_one_last_ckpt_and_at_most_n_periodic(sae_store, tmp_path, monkeypatch):
    """Scale issue item 3: periodic checkpoints never exceed `ckpt_keep`; a run ends with exactly one
    `last.ckpt` (also when it is shorter than `ckpt_every`, and when rerun in the same folder)."""
    seen: list[list[str]] = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(sorted(p.name for p in (tmp_path / "a" / "ckpt").glob("*.ckpt")))

    init = pl.Trainer.__init__
    monkeypatch.setattr(pl.Trainer, "__init__", lambda self, *a, callbacks=None, **k: init(
        self, *a, callbacks=[*(callbacks or []), Watch()], **k))
    cfg = TrainConfig(seeds=[0], steps=20, sae=SAEConfig(expansion_factor=4, k=2), ckpt_every=3, ckpt_keep=2,
                      data=DataConfig(batch_size=64))
    train_saes(sae_store, LAYER, tmp_path / "a", cfg, **RUN_KW)
    assert max(len(names) for names in seen) == 2 and seen[-1] == ["step-15.ckpt", "step-18.ckpt"]
    monkeypatch.setattr(pl.Trainer, "__init__", init)
    ckpts = lambda run: sorted(p.name for p in (run / "ckpt").iterdir())
    assert ckpts(tmp_path / "a") == ["last.ckpt", "run.json"]
    train_saes(sae_store, LAYER, tmp_path / "a", cfg, **RUN_KW)  # rerun: resumes at the end, writes last.ckpt once
    assert ckpts(tmp_path / "a") == ["last.ckpt", "run.json"]
    short = TrainConfig(seeds=[0], steps=4, sae=SAEConfig(expansion_factor=4, k=2), ckpt_every=500,
                        data=DataConfig(batch_size=64))
    train_saes(sae_store, LAYER, tmp_path / "short", short, **RUN_KW)
    assert ckpts(tmp_path / "short") == ["last.ckpt", "run.json"]
    assert torch.load(tmp_path / "short" / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_diverged_training_stops_with_the_step_and_the_term(sae_store, tmp_path, capsys):
    """Item 3: `--train.optim.lr 1e6` used to end with FVU ~1e13 and export the SAE with exit 0."""
    out = tmp_path / "run"
    args = train_args(sae_store, out, "--train.optim.lr", "1e6", "--train.steps", "40", "--train.optim.diverge_steps", "10")
    assert cli_main(args) == 2
    line = one_error_line(_error_lines(capsys))
    assert "training diverged" in line and "from step" in line and ("'fvu'" in line or "l0 collapsed" in line)
    assert not list(out.glob("seed_*/cfg.json")) and not (out / "metrics.json").exists()


def _error_lines(capsys) -> str:
    """stderr of a run that started training: keep the `error:` line (Lightning prints its banner first)."""
    return "\n".join(line for line in capsys.readouterr().err.splitlines() if line.startswith("error"))


def test_divergence_monitor_signs():
    """fvu above factor x start for `patience` steps, l0 stuck at 0, and a diverged last step all stop;
    a healthy run does not."""
    def run(fvus, l0s, patience=3):
        monitor = DivergenceMonitor([7], factor=10.0, patience=patience)
        for step, (f, l) in enumerate(zip(fvus, l0s)):
            monitor.record(0, torch.tensor(f), torch.tensor(l), step)
        return monitor

    run([1.0, 0.5, 0.3, 0.2, 0.2], [8, 8, 8, 8, 8]).raise_if_bad(final=True)  # healthy
    with pytest.raises(DivergedTrainingError, match=r"'fvu' = 70 .* for 3 step\(s\) from step 2, seed 7"):
        run([1.0, 0.9, 50, 60, 70, 0.5], [8] * 6).raise_if_bad()
    with pytest.raises(DivergedTrainingError, match=r"l0 collapsed to 0 .* from step 1"):
        run([1.0, 0.9, 0.8, 0.8], [8, 0, 0, 0]).raise_if_bad()
    run([1.0, 0.9, 50], [8, 8, 8]).raise_if_bad()  # a 1-step streak is not yet divergence...
    with pytest.raises(DivergedTrainingError, match="for 1 step"):
        run([1.0, 0.9, 50], [8, 8, 8]).raise_if_bad(final=True)  # ...but it is never exported
    off = DivergenceMonitor([0], factor=10.0, patience=0)
    off.record(0, torch.tensor(1e9), torch.tensor(0.0), 0)
    off.raise_if_bad(final=True)


@pytest.mark.parametrize("extra, message", [
    (["--layer", "9"], "layer 9 is not in the activation store"),
    (["--train.data.split", "eval"], "split 'eval' of layer 3 has no rows"),
    (["--train.sae.d_in", "32"], "SAE d_in=32 does not match the activation store's d_model=16"),
    (["--train.sae.k", "abc"], 'Parser key "train.sae.k"'),
    (["--train.sae.bogus", "1"], "unknown option --train.sae.bogus (`refusal-sae train --help` lists the options)"),
    (["--train.sae.k", "64"], "k=64 must be smaller than the number of latents d_sae=64"),
])
def test_failed_train_is_one_line_and_writes_nothing(sae_store, tmp_path, capsys, extra, message):
    """Item 8: no usage dump, no traceback, no empty logs/ folder."""
    out = tmp_path / "run"
    assert cli_main(train_args(sae_store, out, *extra)) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not out.exists()
