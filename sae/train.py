"""Plain Python entry point of SAE training (`train_saes`) and the trainer wiring shared with the CLI."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from sae.callbacks import RunExport, TrainProgress
from sae.checkpoints import RunCheckpoints, resume_point, run_identity
from sae.config import LOGGERS, TrainConfig
from sae.data import ShardDataModule
from sae.host_sync import throttle_sigterm_check
from sae.module import SAELightningModule


def make_loggers(out_dir: Path, logger: str, wandb_project: str = "refusal-sae") -> list[Any]:
    """CSV logs always (`RUN/logs/version_<n>/metrics.csv`); wandb (offline unless WANDB_MODE=online)
    or TensorBoard (`RUN/tensorboard/`) too when asked, imported only then."""
    if logger not in LOGGERS:
        raise ValueError(f"unknown logger {logger!r}; expected one of {', '.join(LOGGERS)}")
    from lightning.pytorch.loggers import CSVLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(out_dir), name="logs")]
    if logger == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ValueError("--train.logger tensorboard needs the tensorboard package (pip install tensorboard)")
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(out_dir), name="tensorboard"))
    if logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        online = os.environ.get("WANDB_MODE", "offline") == "online"
        loggers.append(WandbLogger(project=wandb_project, save_dir=str(out_dir), offline=not online, name=out_dir.name))
    return loggers


def quiet_known_warnings() -> None:
    """Silence Lightning warnings that do not apply to this trainer (data is served by step index)."""
    for pattern in (
        r".*does not have many workers.*",
        r".*IterableDataset.*__len__.*",
        r".*Experiment logs directory.*",
        r".*Checkpoint directory.*exists and is not empty.*",
        r".*args parameter is intended to run from within Python.*",
        r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",
        r".*torch.distributed.nn.functional.all_gather is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


TRAINER_OWNED = ("max_steps", "logger", "callbacks", "default_root_dir", "log_every_n_steps",
                 "enable_model_summary", "num_sanity_val_steps", "limit_val_batches", "enable_checkpointing")
"""Trainer arguments the train stage sets itself (from `TrainConfig` and the run folder)."""


def _launched_child() -> bool:
    """True in a DDP rank process started by Lightning's launcher (rank 0 owns the run folder)."""
    return int(os.environ.get("LOCAL_RANK", "0")) != 0 or int(os.environ.get("NODE_RANK", "0")) != 0


def train_saes(
    shards_dir: str | Path,
    layer: int,
    out_dir: str | Path,
    cfg: TrainConfig,
    trainer: dict[str, Any] | None = None,
    ckpt_path: str | None = "auto",
    print_table: bool = True,
    enable_progress_bar: bool | None = None,
    on_mismatch: str = "error",
) -> Path:
    """Train one SAE per seed of `cfg` on `layer` of the activation store and export them to `out_dir`.

    `enable_progress_bar`: False hides the step bar (`sae.callbacks.TrainProgress`, on stderr, with
    loss and FVU; Lightning's own bar is never used). `trainer`: further `lightning.Trainer`
    arguments (accelerator, devices, strategy, precision, ...);
    the ones in `TRAINER_OWNED` come from `cfg` and may not be given. Returns `out_dir`, which then
    holds `seed_<s>/` SAELens exports, `metrics.json`, CSV logs and `ckpt/last.ckpt`.

    `ckpt_path`: "auto" (or "last", or None) resumes the newest checkpoint of `out_dir` when it
    belongs to this run's config (`sae.checkpoints`) — exactly, so a run killed at any step and
    rerun ends bitwise equal on the CPU; "fresh" discards the folder's run; a file resumes that
    checkpoint. `on_mismatch`: what a checkpoint of another config does, "error" or "fresh".
    Every input is checked (store, layer, split, SAE shape) before anything is written.
    """
    trainer_kwargs = dict(trainer or {})
    owned = sorted(set(trainer_kwargs) & set(TRAINER_OWNED))
    if owned:
        raise ValueError(f"trainer argument {owned[0]!r} is set by the train config, not passed to the Trainer")
    if on_mismatch not in ("error", "fresh"):
        raise ValueError(f"on_mismatch must be error or fresh, got {on_mismatch!r}")
    quiet_known_warnings()
    out = Path(out_dir)
    datamodule = ShardDataModule(str(shards_dir), layer, cfg.data)
    datamodule.setup()  # layer, split, rows and finiteness checked before the run folder is touched
    module = SAELightningModule(cfg.sae.for_input(datamodule.d_model), seeds=list(cfg.seeds), optim=cfg.optim)
    identity = run_identity(cfg, layer, datamodule.manifest_sha256, datamodule.d_model, trainer_kwargs)
    out.mkdir(parents=True, exist_ok=True)
    if _launched_child():  # rank 0 already prepared the folder: never clear or rewrite it here
        ckpt_path, on_mismatch = ("auto" if ckpt_path == "fresh" else ckpt_path), "error"
    resume = resume_point(out, identity, ckpt_path, on_mismatch, steps=cfg.steps, write=not _launched_child())
    pl_trainer = pl.Trainer(
        max_steps=cfg.steps,
        logger=make_loggers(out, cfg.logger, cfg.wandb_project),
        callbacks=[RunExport(out, layer, print_table=print_table),
                   RunCheckpoints(out, cfg.ckpt_every, cfg.ckpt_keep, identity)]
        + ([TrainProgress()] if enable_progress_bar is not False else []),
        log_every_n_steps=cfg.log_every_n_steps,
        default_root_dir=str(out),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,  # RunCheckpoints writes the checkpoints
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **trainer_kwargs,
    )
    throttle_sigterm_check(pl_trainer, max(1, cfg.log_every_n_steps))  # no host sync per step (sae/host_sync.py)
    pl_trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True if resume else None)
    return out
