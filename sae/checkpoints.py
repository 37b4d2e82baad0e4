"""Checkpoints of a training run: what identifies one, where it is written, and when a run resumes it.

A run folder's checkpoints belong to one *run identity*: everything that decides the weights a step
produces (the data: store manifest sha256 and layer; seeds; the SAE, optimiser and data configs;
the trainer's accelerator, devices, strategy and precision; the step count only where the learning
rate schedule depends on it). `RUN/ckpt/run.json` records it when a run starts, and every
checkpoint carries its sha256, so

- rerunning the same command resumes automatically from the newest checkpoint (exactly: batches
  are a function of the step, and everything the next step reads is in the checkpoint);
- a checkpoint of another identity is never loaded: the command stops naming the keys that differ
  (`--ckpt_path fresh` discards it), the pipeline starts the stage afresh.

Layout: `ckpt/step-<s>.ckpt` every `ckpt_every` steps (at most `ckpt_keep`, the newest), and
`ckpt/last.ckpt` written once when training ends, after which the periodic ones are removed. Every
write goes to a temporary name and is renamed into place, so a kill never leaves half a checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from activations.io import read_json, write_json
from sae.config import TrainConfig

CKPT_DIR = "ckpt"
LAST = "last.ckpt"
RUN_RECORD = "run.json"
CKPT_KEY = "refusal_sae_run"
"""Key of the run identity's sha256 inside every checkpoint."""
TRAINER_KEYS = ("accelerator", "devices", "num_nodes", "precision", "strategy")
"""Trainer arguments that change the arithmetic of a step (part of the identity)."""
_STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")


class CheckpointMismatch(ValueError):
    """The run folder holds checkpoints of another run identity."""


def run_identity(cfg: TrainConfig, layer: int, shards_manifest_sha256: str, d_model: int,
                 trainer: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plain-data identity of a training run (see the module docstring). Whether the rows are held
    in memory or streamed is not part of it: both modes give the same batches (`sae/order.py`)."""
    data = {k: v for k, v in asdict(cfg.data).items() if k not in ("num_workers", "memory_budget_gb", "metrics_split",
                                                                      "metrics_rows", "in_memory")}
    identity = {
        "layer": int(layer), "shards_manifest_sha256": shards_manifest_sha256, "seeds": [int(s) for s in cfg.seeds],
        "sae": cfg.sae.for_input(d_model).to_dict(), "optim": asdict(cfg.optim), "data": data,
        "steps": cfg.steps if cfg.optim.lr_decay_frac > 0 else None,
        "trainer": {k: str((trainer or {})[k]) for k in TRAINER_KEYS if k in (trainer or {})},
    }
    return json.loads(json.dumps(identity, default=str))  # compare like the JSON it is saved as


def identity_sha256(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: obj}


def describe_difference(saved: dict[str, Any], current: dict[str, Any], limit: int = 3) -> str:
    """`sae.k 8 -> 4, optim.lr 0.001 -> 0.01` for the keys that differ (at most `limit` named)."""
    a, b = _flat(saved), _flat(current)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    text = ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:limit])
    return text + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def checkpoint_files(out_dir: Path) -> list[Path]:
    """The run's checkpoints, newest first: `last.ckpt`, then `step-<s>.ckpt` by decreasing s."""
    folder = Path(out_dir) / CKPT_DIR
    periodic = sorted((p for p in folder.glob("step-*.ckpt") if _STEP_FILE.match(p.name)),
                      key=lambda p: -int(_STEP_FILE.match(p.name).group(1)))  # type: ignore[union-attr]
    last = folder / LAST
    return ([last] if last.is_file() else []) + periodic


def clear_run(out_dir: Path) -> None:
    """Remove what a training run wrote in `out_dir` (checkpoints, logs, exports, metrics.json)."""
    out = Path(out_dir)
    for name in (CKPT_DIR, "logs"):
        shutil.rmtree(out / name, ignore_errors=True)
    for seed_dir in out.glob("seed_*"):
        if seed_dir.is_dir():
            shutil.rmtree(seed_dir, ignore_errors=True)
    (out / "metrics.json").unlink(missing_ok=True)


def _checkpoint_step(path: Path, record: dict[str, Any]) -> int | None:
    """The step of a checkpoint of this folder: from `step-<s>.ckpt`, or `last_step` of the run record."""
    match = _STEP_FILE.match(path.name)
    if match:
        return int(match.group(1))
    return record.get("last_step") if path.name == LAST else None


def _incompatible(out: Path, record: dict[str, Any] | None, identity: dict[str, Any], steps: int | None) -> str | None:
    """Why the folder's run cannot be continued by this one (None = it can)."""
    saved = None if record is None else record.get("identity")
    if saved is None:
        return "it has no run record (an earlier version wrote it)"
    if saved != identity:
        return f"its config differs: {describe_difference(saved, identity)}"
    found = checkpoint_files(out)
    step = _checkpoint_step(found[0], record) if found and record is not None else None
    if steps is not None and step is not None and step > steps:
        return f"its checkpoint is at step {step}, past this run's {steps} steps"
    return None


def resume_point(out_dir: Path, identity: dict[str, Any], ckpt_path: str | None = "auto",
                 on_mismatch: str = "error", steps: int | None = None, write: bool = True) -> str | None:
    """The checkpoint this run resumes from (None = step 0), after recording `identity` in `ckpt/run.json`.

    Args:
        ckpt_path: "auto" / "last" / None (the newest checkpoint of `out_dir` when its identity
            matches), "fresh" (discard the folder's run and start at step 0), or a checkpoint file
            (checked against `identity` when it is loaded).
        on_mismatch: what a folder holding another run does: "error" (`CheckpointMismatch` naming
            the keys that differ) or "fresh" (discard it, with a note on stderr).
        steps: this run's step count (a checkpoint past it is not continued).
        write: False in a DDP rank other than 0 (it reads the folder rank 0 prepared).
    """
    out = Path(out_dir)
    record_path = out / CKPT_DIR / RUN_RECORD
    mode = "auto" if ckpt_path in (None, "last") else str(ckpt_path)
    if mode not in ("auto", "fresh") and not Path(mode).is_file():
        raise FileNotFoundError(f"checkpoint not found: {mode}")
    kept: dict[str, Any] = {}
    if mode == "fresh":
        if write:
            clear_run(out)
    elif record_path.is_file() or checkpoint_files(out):
        record = read_json(record_path, "training run record") if record_path.is_file() else None
        why = _incompatible(out, record, identity, steps)
        if why is not None:
            if on_mismatch != "fresh":
                raise CheckpointMismatch(f"{out} holds a training run that this one cannot continue ({why}); "
                                         "pass --ckpt_path fresh to discard it, or use another --out")
            print(f"note: {out} held a training run this one cannot continue ({why}); starting from step 0",
                  file=sys.stderr, flush=True)
            if write:
                clear_run(out)
        elif record is not None and "last_step" in record:
            kept["last_step"] = record["last_step"]
    if write:
        write_json(record_path, {"identity": identity, "identity_sha256": identity_sha256(identity), **kept})
    if mode not in ("auto", "fresh"):
        return mode
    found = checkpoint_files(out) if mode == "auto" else []
    return str(found[0]) if found else None


class RunCheckpoints(pl.Callback):
    """Periodic `ckpt/step-<s>.ckpt` (at most `keep`) and one `ckpt/last.ckpt` at the end, written atomically.

    Saves run after the optimiser step and the decoder renormalisation of that step (in
    `on_train_batch_end`), so a checkpoint of step s holds exactly what step s + 1 starts from.
    A loaded checkpoint whose run identity differs from this run's is refused.
    """

    def __init__(self, out_dir: Path, every: int, keep: int, identity: dict[str, Any]) -> None:
        if every < 1:
            raise ValueError(f"ckpt_every must be >= 1, got {every}")
        if keep < 0:
            raise ValueError(f"ckpt_keep must be >= 0, got {keep}")
        self.folder = Path(out_dir) / CKPT_DIR
        self.every, self.keep = int(every), int(keep)
        self.identity_sha256 = identity_sha256(identity)

    def _save(self, trainer: pl.Trainer, name: str) -> None:
        """Every rank takes part (seed-parallel gathers states); rank 0 renames the file into place."""
        tmp = self.folder / f".tmp-{name}"
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, self.folder / name)
        trainer.strategy.barrier("sae-checkpoint")

    def _prune(self, keep: int) -> None:
        for stale in [p for p in checkpoint_files(self.folder.parent) if p.name != LAST][keep:]:
            stale.unlink(missing_ok=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.keep == 0 or step % self.every or step >= (trainer.max_steps or 0) > 0:
            return  # the last step's checkpoint is last.ckpt, written once at the end
        self._save(trainer, f"step-{step}.ckpt")
        if trainer.is_global_zero:
            (self.folder / LAST).unlink(missing_ok=True)  # a continued run: the periodic one is newer
            self._prune(self.keep)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, LAST)
        if trainer.is_global_zero:
            record_path = self.folder / RUN_RECORD
            record = read_json(record_path, "training run record") if record_path.is_file() else {}
            write_json(record_path, {**record, "last_step": int(trainer.global_step)})
            self._prune(0)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CKPT_KEY] = {"identity_sha256": self.identity_sha256}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = (checkpoint.get(CKPT_KEY) or {}).get("identity_sha256")
        if saved != self.identity_sha256:
            raise CheckpointMismatch(
                "the checkpoint was written by a training run of another config (or an earlier version); "
                "resume it with that config, or start afresh with --ckpt_path fresh")
