"""Plain Python entry point of SAE training (`train_saes`) and the trainer wiring shared with the CLI."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from sae.callbacks import RunExport, TrainProgress
from sae.config import LOGGERS, TrainConfig
from sae.data import ShardDataModule
from sae.module import SAELightningModule

class FinalCheckpoint(pl.Callback):
    """Writes `RUN/ckpt/last.ckpt` when training ends (periodic saves may not fall on the last step)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)


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


def run_callbacks(out_dir: Path, layer: int, ckpt_every: int, print_table: bool = True,
                  progress: bool = True) -> list[pl.Callback]:
    """Periodic + final `RUN/ckpt/last.ckpt`, the end-of-run export, and the step bar (with `progress`)."""
    if ckpt_every < 1:
        raise ValueError(f"ckpt_every must be >= 1, got {ckpt_every}")
    ckpt_dir = out_dir / "ckpt"
    periodic = ModelCheckpoint(
        dirpath=str(ckpt_dir), filename="step-{step}", save_top_k=0, save_last=True, every_n_train_steps=ckpt_every
    )
    # export before the final checkpoint: a run killed between the two re-trains its last steps and exports
    callbacks = [periodic, RunExport(out_dir, layer, print_table=print_table), FinalCheckpoint(ckpt_dir / "last.ckpt")]
    return callbacks + ([TrainProgress()] if progress else [])


def resolve_ckpt_path(out_dir: Path, ckpt_path: str | None) -> str | None:
    """`last` → RUN/ckpt/last.ckpt if it exists (else a fresh start); a path must exist."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = out_dir / "ckpt" / "last.ckpt"
        if last.is_file():
            return str(last)
        print(f"no checkpoint at {last}; starting from step 0", flush=True)
        return None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {ckpt_path}")
    return ckpt_path


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


def fit(trainer: pl.Trainer, module: SAELightningModule, datamodule: ShardDataModule, out_dir: Path, ckpt_path: str | None) -> Path:
    """Run `trainer.fit`, resuming from `ckpt_path` (loaded with weights_only=True)."""
    resolved = resolve_ckpt_path(out_dir, ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolved, weights_only=True if resolved else None)
    return out_dir


TRAINER_OWNED = ("max_steps", "logger", "callbacks", "default_root_dir", "log_every_n_steps",
                 "enable_model_summary", "num_sanity_val_steps", "limit_val_batches")
"""Trainer arguments the train stage sets itself (from `TrainConfig` and the run folder)."""


def train_saes(
    shards_dir: str | Path,
    layer: int,
    out_dir: str | Path,
    cfg: TrainConfig,
    trainer: dict[str, Any] | None = None,
    ckpt_path: str | None = None,
    print_table: bool = True,
    enable_progress_bar: bool | None = None,
) -> Path:
    """Train one SAE per seed of `cfg` on `layer` of the activation store and export them to `out_dir`.

    `enable_progress_bar`: False hides the step bar (`sae.callbacks.TrainProgress`, on stderr, with
    loss and FVU; Lightning's own bar is never used). `trainer`: further `lightning.Trainer`
    arguments (accelerator, devices, strategy, precision, ...);
    the ones in `TRAINER_OWNED` come from `cfg` and may not be given. Returns `out_dir`, which then
    holds `seed_<s>/` SAELens exports, `metrics.json`, CSV logs and `ckpt/last.ckpt` (pass
    `ckpt_path="last"` to resume a killed run exactly).
    """
    trainer_kwargs = dict(trainer or {})
    owned = sorted(set(trainer_kwargs) & set(TRAINER_OWNED))
    if owned:
        raise ValueError(f"trainer argument {owned[0]!r} is set by the train config, not passed to the Trainer")
    quiet_known_warnings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    datamodule = ShardDataModule(str(shards_dir), layer, cfg.data)
    module = SAELightningModule(cfg.sae.for_input(datamodule.d_model), seeds=list(cfg.seeds), optim=cfg.optim)
    pl_trainer = pl.Trainer(
        max_steps=cfg.steps,
        logger=make_loggers(out, cfg.logger, cfg.wandb_project),
        callbacks=run_callbacks(out, layer, cfg.ckpt_every, print_table=print_table,
                                progress=enable_progress_bar is not False),
        log_every_n_steps=cfg.log_every_n_steps,
        default_root_dir=str(out),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **trainer_kwargs,
    )
    return fit(pl_trainer, module, datamodule, out, ckpt_path)
