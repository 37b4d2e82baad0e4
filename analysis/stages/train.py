"""The `train` stage: top-K SAEs (one per seed) on one layer of an activation store, with Lightning.

    refusal-sae train -c configs/sae/smollm2.yaml --train.seeds 0 1 2 --train.steps 500
    refusal-sae train -c configs/sae/smollm2.yaml --ckpt_path fresh      # discard OUT's run, start again
    refusal-sae train --acts checkpoints/acts --layer 10 --out checkpoints/sae --trainer.devices 2 \
        --trainer.strategy seed_parallel      # one seed per GPU; latent_parallel: each SAE's latents split

Every field of `sae.config.TrainConfig` is a flag under `--train.` (`--train.sae.k 64`,
`--train.optim.lr 1e-4`, `--train.data.batch_size 4096`) and a key of the pipeline's `train:`
section; any other `lightning.Trainer` argument passes through as `--trainer.<name>` (accelerator,
devices, strategy, precision, ...). The run folder gets `seed_<s>/` SAELens exports, `metrics.json`,
CSV logs and `ckpt/last.ckpt`. Rerunning the same command after an interruption resumes it exactly
from its newest checkpoint; a folder holding a run of another config is refused (naming the keys
that differ) unless `--ckpt_path fresh`. In the pipeline the stage trains on `RUN/harvest/all` and
writes `RUN/train/`; a changed `train:` section starts it afresh.

Every run is scored on held-out rows of the store (`sae.quality`: FVU / L0 per position kind, dead and
dense latents). With `--model` and `--prompts` (always in the pipeline) it is also scored by the
spliced evaluation (`analysis.evaluation.splice`: CE loss recovered, KL and first-token decision
fidelity when the layer's output is replaced by the reconstruction) on `train.splice.max_prompts`
prompts of `train.splice.split`; the scores go into metrics.json and each seed's cfg.json.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from activations.records import PromptRecord
from analysis.stages.command import Command
from analysis.stages.context import PipelineStage, RunContext
from sae.config import DataConfig, OptimConfig, TrainConfig
from sae.train import TRAINER_OWNED

NAME = "train"


@dataclass
class SpliceConfig:
    """The spliced evaluation of every trained SAE (`train.splice.*`).

    Args:
        enabled: run it (the pipeline always has the model; the command needs --model and --prompts).
        split: prompts scored (never the training split).
        max_prompts: at most this many prompts of the split (a seeded random sample).
        batch_size: prompts per forward.
    """

    enabled: bool = True
    split: Literal["calibrate", "eval"] = "calibrate"
    max_prompts: int = 64
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.max_prompts < 1 or self.batch_size < 1:
            raise ValueError(f"splice.max_prompts and splice.batch_size must be >= 1, got {self.max_prompts}, {self.batch_size}")


@dataclass
class Config(TrainConfig):
    """The `train` stage: `sae.config.TrainConfig` (seeds, steps, sae, optim, data, ...) plus

    Args:
        splice: the spliced evaluation after training.
    """

    splice: SpliceConfig = field(default_factory=SpliceConfig)


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
        model: the model the store was harvested from: enables the spliced evaluation.
        prompts: prompt source specs of the harvest (their `train.splice.split` prompts are scored).
        seed: seed of the prompt set's split assignment.
        tokens: refusal-token preset or JSON for the decision fidelity (default: MODEL/refusal_tokens.json if any).
        device: device of the spliced evaluation: auto | cpu | cuda | cuda:N.
    """

    acts: Path
    layer: int
    out: Path
    ckpt_path: str = "auto"
    print_table: bool = True
    model: str | None = None
    prompts: list[str] | None = None
    seed: int = 0
    tokens: str | None = None
    device: str = "auto"


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
    if (inputs.model is None) != (inputs.prompts is None):
        raise ValueError("the spliced evaluation needs both --model and --prompts (or neither)")
    quiet_known_warnings()
    out = train_saes(inputs.acts, inputs.layer, inputs.out, cfg, trainer=trainer_kwargs(trainer or {}),
                     ckpt_path=inputs.ckpt_path, print_table=inputs.print_table)
    if inputs.model is not None and cfg.splice.enabled:
        from activations.model_loading import load_model, resolve_device
        from activations.prompts import load_prompt_set

        records = list(load_prompt_set(list(inputs.prompts or []), seed=inputs.seed).split(cfg.splice.split))
        model, tokenizer = load_model(inputs.model, device=resolve_device(inputs.device))
        spec = _token_spec(inputs.model, inputs.tokens)
        splice_run(out, inputs.acts, inputs.layer, model, tokenizer, records, cfg.splice, spec, seed=inputs.seed)
    elif inputs.model is None:
        print("note: no spliced evaluation (pass --model and --prompts to score CE recovered and decision fidelity)")
    return out


def _token_spec(model: str, tokens: str | None) -> Any:
    """The refusal-token spec for the decision fidelity: `tokens`, else MODEL/refusal_tokens.json, else None."""
    from probes.refusal_tokens import SPEC_FILE, load_refusal_token_spec, resolve_token_spec

    if tokens is not None:
        return resolve_token_spec(tokens)
    return load_refusal_token_spec(model) if (Path(model) / SPEC_FILE).is_file() else None


def sample_records(records: list[PromptRecord], n: int, seed: int = 0) -> list[PromptRecord]:
    """At most `n` records, a seeded random sample (the same for the same ids and seed)."""
    import hashlib

    ranked = sorted(records, key=lambda r: hashlib.sha256(f"{seed}:{r.id}".encode()).hexdigest())
    return ranked[:n]


def splice_run(run_dir: Path, store_dir: Path, layer: int, model: Any, tokenizer: Any, records: list[PromptRecord],
               cfg: SpliceConfig, spec: Any = None, seed: int = 0) -> dict[int, dict[str, Any]]:
    """Spliced evaluation of every seed of the SAE run on a sample of `records`; written into the run's
    metrics.json and each seed's cfg.json (key `splice`). Returns `{seed: {site: scores}}`."""
    from activations.store import ActivationStore
    from analysis.evaluation.splice import splice_scores
    from sae.export import add_run_metrics, load_sae_run

    if not records:
        raise ValueError(f"no {cfg.split} prompts for the spliced evaluation")
    store = ActivationStore(store_dir)
    device = next(model.parameters()).device
    saes = load_sae_run(run_dir, layer=layer, d_model=store.d_model, device=device)
    chosen = sample_records(records, cfg.max_prompts, seed)
    scores = splice_scores(model, tokenizer, [r.text for r in chosen], layer, {str(s): sae for s, sae in saes.items()},
                           class_token_ids=None if spec is None else spec.token_ids(tokenizer),
                           chat_template=bool(store.manifest.get("chat_template", True)),
                           max_length=store.manifest.get("max_length"), batch_size=cfg.batch_size, seed=seed,
                           progress=True)
    per_seed = {seed_: {"splice": {**scores[str(seed_)], "split": cfg.split}} for seed_ in saes}
    add_run_metrics(run_dir, per_seed)
    return {s: v["splice"] for s, v in per_seed.items()}


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
                    for f in dataclasses.fields(TrainConfig().sae)})
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
    if cfg.splice.enabled:
        from probes.refusal_tokens import load_refusal_token_spec

        model, tokenizer = ctx.model("target")
        spec = load_refusal_token_spec(ctx.target_model_path) if ctx.cfg.refusal_tokens.enabled else None
        splice_run(out, store_dir(ctx, "all"), ctx.layer, model, tokenizer, ctx.split(cfg.splice.split), cfg.splice,
                   spec, seed=ctx.cfg.seed)
    metrics = read_json(out / "metrics.json", "SAE run metrics")
    seeds = {s: {k: v for k, v in m.items() if k not in ("by_kind", "splice")} for s, m in metrics["seeds"].items()}
    return {"metrics": {**metrics, "seeds": seeds}}


def run_saes(ctx: RunContext) -> dict[int, Any]:
    """This run's trained SAEs, `{seed: SAE}` on the run's device, checked against the primary layer."""
    from sae.export import load_sae_run

    return load_sae_run(ctx.stage_dir(NAME), layer=ctx.layer, device=ctx.device)


STAGE = PipelineStage(NAME, run, section=NAME, after=("harvest",))
