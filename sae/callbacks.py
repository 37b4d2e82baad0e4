"""End-of-training export: per-seed SAELens folders, per-seed metrics.csv, RUN/metrics.json, a table.

Run layout written here (see docs/sae.md):

    RUN/seed_<s>/{sae.safetensors, sae_weights.safetensors -> sae.safetensors, cfg.json, sparsity.safetensors,
                  metrics.csv}    (sparsity: SAELens' log10 firing density on the evaluation rows)
    RUN/seed_<s>/latent_stats.safetensors   firing_frequency (d_sae,) float64 on the evaluation rows
    RUN/metrics.json        per-seed held-out quality (`sae.quality`): fvu, l0 (all / per kind),
                            dead and dense fractions (+ Wilson 95% CI), steps; the training-row counts
    RUN/logs/version_<n>/metrics.csv   Lightning CSV logs (one version per (re)start)
    RUN/ckpt/               checkpoints and the run identity (sae/checkpoints.py)
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from activations.io import save_numpy_tensors, write_json, write_text_atomic
from activations.progress import progress_bar
from activations.model_loading import hub_id
from activations.stats import wilson_ci
from activations.store import ActivationStore
from sae.export import save_sae, save_sparsity
from sae.quality import evaluate_quality


def merged_log_rows(logs_dir: Path) -> list[dict[str, str]]:
    """Rows of every `logs/version_*/metrics.csv`, one per step (a later run's row wins)."""
    by_step: dict[int, dict[str, str]] = {}
    versions = sorted(logs_dir.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    for path in versions:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("step", "") == "":
                    continue
                step = int(float(row["step"]))
                merged = by_step.setdefault(step, {})
                merged.update({k: v for k, v in row.items() if v != ""})
    return [by_step[s] for s in sorted(by_step)]


def write_seed_csv(rows: list[dict[str, str]], seed: int, path: Path) -> None:
    """`step,<metric>...` columns of one seed (prefix `seed<s>/` stripped), written atomically."""
    prefix = f"seed{seed}/"
    names = sorted({k[len(prefix):] for row in rows for k in row if k.startswith(prefix)})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["step", *names])
    for row in rows:
        if any(prefix + n in row for n in names):
            writer.writerow([row["step"], *(row.get(prefix + n, "") for n in names)])
    write_text_atomic(path, buffer.getvalue())


def format_table(per_seed: dict[str, dict[str, Any]]) -> str:
    """Plain-text table of the final metrics."""
    lines = [f"{'seed':>6} {'fvu':>9} {'fvu content':>12} {'fvu resp.':>10} {'l0':>8} {'dead':>7} {'dense':>7} "
             f"{'steps':>8}  ({next(iter(per_seed.values()))['metrics_split']} rows)"]

    def num(value: Any, digits: int) -> str:
        return "—" if value is None else f"{value:.{digits}f}"

    for seed, m in per_seed.items():
        kinds = m["by_kind"]
        lines.append(f"{seed:>6} {num(m['fvu'], 4):>9} {num(kinds['content']['fvu'], 4):>12} "
                     f"{num(kinds['response_start']['fvu'], 4):>10} {num(m['l0'], 2):>8} {m['dead_fraction']:>7.4f} "
                     f"{m['dense_fraction']:>7.4f} {m['steps']:>8d}")
    return "\n".join(lines)


class TrainProgress(pl.Callback):
    """One bar over the optimiser steps on stderr (`activations.progress`; a resumed run starts at its
    step), showing the seeds' mean loss and FVU of the last logged step (read once per log interval)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.bar = progress_bar(total=trainer.max_steps, initial=trainer.global_step, desc="train", unit="step")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.bar is None:
            return
        step = int(trainer.global_step)
        if step % max(1, trainer.log_every_n_steps) == 0:
            postfix = mean_seed_metrics(trainer.callback_metrics, ("total", "fvu"))
            if postfix:
                self.bar.set_postfix({"loss" if k == "total" else k: f"{v:.4g}" for k, v in postfix.items()},
                                     refresh=False)
        self.bar.update(step - self.bar.n)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)


def mean_seed_metrics(metrics: dict[str, Any], names: tuple[str, ...]) -> dict[str, float]:
    """`{name: mean over seeds}` of logged `seed<s>/<name>` metrics (names without any are left out)."""
    out = {}
    for name in names:
        values = [float(v) for k, v in metrics.items() if k.startswith("seed") and k.endswith(f"/{name}")]
        if values:
            out[name] = sum(values) / len(values)
    return out


class RunExport(pl.Callback):
    """At the end of `fit`: check ranks agree, score every seed, export, write metrics, print a table.

    Args:
        out_dir: the run folder.
        layer: the residual layer trained on (for cfg.json's hook name).
        print_table: print the final metrics table (rank 0).
    """

    def __init__(self, out_dir: str | Path, layer: int, print_table: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.layer = int(layer)
        self.print_table = print_table
        self.metrics: dict[str, dict[str, Any]] = {}

    def _check_ranks_agree(self, trainer: pl.Trainer, module: pl.LightningModule, saes: list[Any]) -> None:
        """Every rank must hold the same weights and latent statistics (a DDP / seed- / latent-parallel
        sanity check; latent-parallel SAEs are gathered, so this compares their replicated b_dec)."""
        if trainer.world_size == 1:
            return
        local = torch.stack([
            sae.W_dec.detach().double().sum() + sae.W_enc.detach().double().sum() + sae.b_dec.detach().double().sum()
            + tracker.tokens_since_fired.double().sum()
            for sae, tracker in zip(saes, module.trackers)
        ])
        gathered = trainer.strategy.all_gather(local)
        if not torch.allclose(gathered, gathered[0:1].expand_as(gathered), rtol=1e-9, atol=0):
            raise RuntimeError(f"data-parallel ranks hold different SAE weights: checksums {gathered.tolist()}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.monitor.raise_if_bad()
        pl_module.divergence.raise_if_bad(final=True)  # a diverged SAE is never exported
        saes = pl_module.saes_for_export()  # whole SAEs on every rank (collective)
        self._check_ranks_agree(trainer, pl_module, saes)
        if trainer.is_global_zero:
            self.export(trainer, pl_module, saes)
        trainer.strategy.barrier("sae-export")

    def export(self, trainer: pl.Trainer, module: pl.LightningModule, saes: list[Any]) -> None:
        datamodule = trainer.datamodule
        manifest = datamodule.manifest
        model_info = manifest.get("model") or {}
        for logger in trainer.loggers:
            logger.save()
        log_rows = merged_log_rows(self.out_dir / "logs")
        steps = int(trainer.global_step)
        model_path = str(model_info.get("id", ""))
        model_name = hub_id(model_path) or model_path  # SAELens tools load the model by this name
        qualities = evaluate_quality(saes, ActivationStore(datamodule.shards_dir), self.layer, datamodule.data_cfg)
        rows = datamodule.selection.to_dict() if datamodule.selection is not None else None
        for seed, sae, tracker, quality in zip(module.seeds, saes, module.trackers, qualities):
            n_auxk_dead = int(tracker.dead_mask().sum())
            frequency = quality.pop("firing_frequency")
            record = {**quality, "never_fired_fraction": quality["dead_fraction"],
                      "auxk_dead_fraction": n_auxk_dead / sae.d_sae,
                      "auxk_dead_fraction_ci": list(wilson_ci(n_auxk_dead, sae.d_sae)), "steps": steps,
                      "k": sae.cfg.k, "architecture": sae.cfg.architecture}
            self.metrics[str(seed)] = record
            seed_dir = self.out_dir / f"seed_{seed}"
            save_sae(
                sae, seed_dir,
                meta={
                    "layer": self.layer, "seed": seed, "model_name": model_name, "model_path": model_path,
                    "model_identity": model_info,
                    "context_size": manifest.get("max_length"), "prepend_bos": True,
                    "dataset_path": str(datamodule.shards_dir), "shards_manifest_sha256": datamodule.manifest_sha256,
                    "split": datamodule.split, "training_rows": rows,
                    "row_rules": {k: getattr(datamodule.data_cfg, k) for k in ("position_kinds", "exclude_sink",
                                                                                 "drop_duplicates")},
                    "final_metrics": record,
                },
            )
            save_numpy_tensors(seed_dir / "latent_stats.safetensors", {"firing_frequency": frequency})
            save_sparsity(seed_dir, frequency)
            write_seed_csv(log_rows, seed, seed_dir / "metrics.csv")
        write_json(
            self.out_dir / "metrics.json",
            {"layer": self.layer, "shards_dir": str(datamodule.shards_dir),
             "shards_manifest_sha256": datamodule.manifest_sha256, "training_rows": rows, "seeds": self.metrics},
        )
        if self.print_table:
            print(format_table(self.metrics), flush=True)
