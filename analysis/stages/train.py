"""The `train` stage: top-K SAEs (one per seed) on one layer of an activation store, with Lightning.

    refusal-sae train -c configs/sae/smollm2.yaml --train.seeds 0 1 2 --train.steps 500
    refusal-sae train -c configs/sae/smollm2.yaml --ckpt_path fresh      # discard OUT's run, start again
    refusal-sae train --acts checkpoints/acts --layer 10 --out checkpoints/sae --trainer.devices 2 \
        --trainer.strategy seed_parallel

Every field of `sae.config.TrainConfig` is a flag under `--train.` (`--train.sae.k 64`,
`--train.optim.lr 1e-4`, `--train.data.batch_size 4096`) and a key of the pipeline's `train:`
section; any other `lightning.Trainer` argument passes through as `--trainer.<name>` (accelerator,
devices, strategy, precision, ...). The run folder gets `seed_<s>/` SAELens exports, `metrics.json`,
CSV logs and `ckpt/last.ckpt`. Rerunning the same command after an interruption resumes it exactly
from its newest checkpoint; a folder holding a run of another config is refused (naming the keys
that differ) unless `--ckpt_path fresh`. In the pipeline the stage trains on `RUN/harvest/all` and
writes `RUN/train/`; a changed `train:` section starts it afresh.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.stages.command import Command
from analysis.stages.context import PipelineStage, RunContext
from sae.config import DataConfig, OptimConfig
from sae.config import TrainConfig as Config
from sae.train import TRAINER_OWNED

NAME = "train"


@dataclass(kw_only=True)
class Inputs:
    """Files of `refusal-sae train`.

    Args:
        acts: activation store folder (harvest output).
        layer: block index to train on (must be in the store).
        out: run folder (exports, logs, ckpt/).
        ckpt_path: auto (resume OUT's newest checkpoint when it is of this config; `last` is the
            same), fresh (discard OUT's run and start at step 0) or a checkpoint file.
        print_table: print the final metrics table.
    """

    acts: Path
    layer: int
    out: Path
    ckpt_path: str = "auto"
    print_table: bool = True


def add_trainer_args(parser: Any) -> None:
    """`--trainer.<arg>`: every `lightning.Trainer` argument the train config does not own."""
    import lightning.pytorch as pl

    parser.add_class_arguments(pl.Trainer, "trainer", skip=set(TRAINER_OWNED) | {"enable_progress_bar"},
                               sub_configs=False, instantiate=False)


def trainer_kwargs(trainer: dict[str, Any] | Any) -> dict[str, Any]:
    """The `--trainer.*` values that differ from `lightning.Trainer`'s defaults."""
    import lightning.pytorch as pl

    values = dict(trainer if isinstance(trainer, dict) else vars(trainer))
    defaults = {name: p.default for name, p in inspect.signature(pl.Trainer.__init__).parameters.items()}
    return {k: v for k, v in values.items() if k in defaults and v != defaults[k]}


def command(cfg: Config, inputs: Inputs, trainer: Any = None) -> Path:
    """Train the SAEs of `cfg` on the store; returns the run folder."""
    from sae.train import quiet_known_warnings, train_saes

    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    quiet_known_warnings()
    return train_saes(inputs.acts, inputs.layer, inputs.out, cfg, trainer=trainer_kwargs(trainer or {}),
                      ckpt_path=inputs.ckpt_path, print_table=inputs.print_table)


def show(_inputs: Inputs, out: Path) -> None:
    print(f"wrote the SAE run to {out}")


def _renamed() -> dict[str, list[str]]:
    """The LightningCLI spellings of earlier versions → today's flags."""
    renamed: dict[str, list[str]] = {
        "out_dir": ["--out"], "data.shards_dir": ["--acts"], "data.layer": ["--layer"],
        "trainer.max_steps": ["--train.steps"], "trainer.log_every_n_steps": ["--train.log_every_n_steps"],
        "model.seeds": ["--train.seeds"], "seeds": ["--train.seeds"], "logger": ["--train.logger"],
        "trainer.logger": ["--train.logger"],  # the train config owns the loggers (csv | wandb | tensorboard)
        "ckpt_every": ["--train.ckpt_every"], "wandb_project": ["--train.wandb_project"],
    }
    renamed.update({f"model.{f.name}": [f"--train.optim.{f.name}"] for f in dataclasses.fields(OptimConfig)})
    renamed.update({f"data.{f.name}": [f"--train.data.{f.name}"] for f in dataclasses.fields(DataConfig)})
    renamed.update({f"model.sae.{f.name}": [f"--train.sae.{f.name}"]
                    for f in dataclasses.fields(Config().sae)})
    return renamed


COMMAND = Command(
    name=NAME, help="train top-K SAEs (several seeds) on shards with Lightning", inputs=Inputs, run=command,
    show=show, config=Config, section=NAME, renamed=_renamed(), extend=add_trainer_args,
    old_sections={"model": "is now 'train' (seeds, sae, optim) — see configs/sae/smollm2.yaml",
                  "data": "is now 'train.data', with shards_dir → acts and layer → layer at the top level",
                  "out_dir": "is now 'out'",
                  "trainer.logger": "is set by 'train.logger' (csv | wandb | tensorboard): the train config owns the loggers"},
)


# --- pipeline ------------------------------------------------------------------------------------

def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    """Train one SAE per seed on the all-token extract rows of the primary layer."""
    from activations.io import read_json
    from analysis.stages.harvest import store_dir
    from sae.train import train_saes

    out = ctx.stage_dir(NAME)
    accelerator = "gpu" if ctx.device.startswith("cuda") else "cpu"
    train_saes(store_dir(ctx, "all"), ctx.layer, out, cfg, trainer={"accelerator": accelerator, "devices": 1},
               ckpt_path="auto", on_mismatch="fresh", print_table=False)
    return {"metrics": read_json(out / "metrics.json", "SAE run metrics")}


def run_saes(ctx: RunContext) -> dict[int, Any]:
    """This run's trained SAEs, `{seed: SAE}` on the run's device, checked against the primary layer."""
    from sae.export import load_sae_run

    return load_sae_run(ctx.stage_dir(NAME), layer=ctx.layer, device=ctx.device)


STAGE = PipelineStage(NAME, run, section=NAME, after=("harvest",))
