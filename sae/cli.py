"""`refusal-sae train`: train SAEs from a YAML config with LightningCLI.

    refusal-sae train -c configs/sae/smollm2.yaml --seeds 0 1 2 --trainer.max_steps 500
    refusal-sae train -c configs/sae/smollm2.yaml --ckpt_path last       # resume a killed run

Every field of the config can be overridden on the command line (`--model.sae.k 64`,
`--data.batch_size 512`, ...); unknown keys are rejected. `--seeds 0 1 2` is shorthand for
`--model.seeds [0,1,2]`. Top-level options: `--out_dir` (run folder), `--ckpt_path` (None, "last"
or a file), `--logger csv|wandb`, `--ckpt_every N`. Errors print `error: ...` and exit with 2.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Literal, Optional

from lightning.pytorch.cli import LightningCLI

from sae.data import ShardDataModule
from sae.module import SAELightningModule
from sae.train import fit, make_loggers, quiet_known_warnings, run_callbacks

TRAINER_DEFAULTS: dict[str, Any] = {
    "max_steps": 1000,
    "log_every_n_steps": 50,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
}


class SAETrainCLI(LightningCLI):
    """LightningCLI with the run-folder options and our loggers / checkpoints / export wired in."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--out_dir", type=str, required=True, help="run folder (exports, logs, ckpt/)")
        parser.add_argument("--ckpt_path", type=Optional[str], default=None, help='None, "last" or a .ckpt file')
        parser.add_argument("--logger", type=Literal["csv", "wandb"], default="csv", help="CSV always; wandb too")
        parser.add_argument("--ckpt_every", type=int, default=500, help="steps between checkpoints")
        parser.add_argument("--wandb_project", type=str, default="refusal-sae")
        parser.add_argument("--print_table", type=bool, default=True, help="print the final metrics table")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        out_dir = Path(self._get(self.config_init, "out_dir"))
        out_dir.mkdir(parents=True, exist_ok=True)
        user_callbacks = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        kwargs["callbacks"] = [*user_callbacks, *run_callbacks(
            out_dir, self.datamodule.layer, self._get(self.config_init, "ckpt_every"),
            print_table=self._get(self.config_init, "print_table"),
        )]
        kwargs["logger"] = make_loggers(out_dir, self._get(self.config_init, "logger"), self._get(self.config_init, "wandb_project"))
        kwargs["default_root_dir"] = str(out_dir)
        return super().instantiate_trainer(**kwargs)


def expand_seeds(argv: list[str]) -> list[str]:
    """Rewrite `--seeds 0 1 2` (or `--seeds=0,1,2`) into `--model.seeds=[0,1,2]`."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--seeds":
            values = []
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.extend(v for v in argv[i].replace(",", " ").split() if v)
                i += 1
            out.append(f"--model.seeds=[{','.join(values)}]")
            continue
        if arg.startswith("--seeds="):
            values = [v for v in arg.split("=", 1)[1].replace(",", " ").split() if v]
            out.append(f"--model.seeds=[{','.join(values)}]")
        else:
            out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse, build and fit; returns the exit status (0 ok, 2 bad input)."""
    args = expand_seeds(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")  # noise from Lightning's own CLI code
    quiet_known_warnings()
    try:
        cli = SAETrainCLI(
            SAELightningModule,
            ShardDataModule,
            run=False,
            args=args,
            trainer_defaults=TRAINER_DEFAULTS,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            seed_everything_default=0,
        )
        out_dir = Path(cli._get(cli.config, "out_dir"))
        fit(cli.trainer, cli.model, cli.datamodule, out_dir, cli._get(cli.config, "ckpt_path"))
    except SystemExit as exc:  # argument errors: jsonargparse already printed "error: ..."
        return int(exc.code) if isinstance(exc.code, int) else 2
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
