"""The `harvest` stage: residual activations of labelled prompts into an activation shard store.

    refusal-sae harvest --model smollm2-135m-instruct --prompts builtin:quickstart \
        --harvest.layers 10 20 --positions last --out checkpoints/acts

Rerunning the same command after an interruption resumes it (prompts already stored are skipped).
Besides the shards, `OUT/prompts.json` records the prompt set's split manifest. In the pipeline the
stage writes `RUN/harvest/last` (last-token rows of every prompt, every layer), `RUN/harvest/all`
(every token of the extract prompts at the primary layer, for the SAEs) and, when refusal tokens
were fitted, `RUN/harvest/base_last` (the base model's last-token extract rows, for model diffing).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from activations.harvest import HarvestConfig as Config
from activations.io import file_sha256, write_json
from activations.model_loading import ModelOptions
from analysis.stages.command import Command
from analysis.stages.context import PipelineStage, RunContext

NAME = "harvest"


@dataclass(kw_only=True)
class Inputs(ModelOptions):
    """Files of `refusal-sae harvest`.

    Args:
        model: hub id, local model folder, or smollm2-135m-instruct.
        prompts: prompt source specs (builtin:quickstart, jsonl:PATH, xstest:PATH, ...).
        out: store folder (an existing store of the same harvest is resumed).
        positions: last prompt token (one row per prompt) or every prompt token.
        seed: seed of the split assignment.
        progress: show a progress bar.
    """

    model: str
    prompts: list[str]
    out: Path
    positions: Literal["last", "all"] = "last"
    seed: int = 0
    progress: bool = True


def harvest_records(model: Any, tokenizer: Any, records: list, layers: list[int], out: Path, cfg: Config,
                    options: ModelOptions, positions: str, model_name: str | None = None, **kwargs: Any) -> Path:
    """One harvest with the stage's options (the single call both the command and the pipeline make)."""
    from activations.harvest import default_model_info, harvest

    info = default_model_info(model, model_name)
    return harvest(model, tokenizer, records, layers, out, positions=positions, batch_size=cfg.batch_size,
                   max_length=options.max_length, dtype=cfg.storage_dtype, chat_template=options.chat_template,
                   rows_per_shard=cfg.rows_per_shard, model_info=info, **kwargs)


def command(cfg: Config, inputs: Inputs) -> Path:
    """Load prompts and model, harvest, write `prompts.json`; returns the store folder."""
    from activations.harvest import prompt_info_from_manifest
    from activations.model_loading import load_model
    from activations.prompts import load_prompt_set

    if not cfg.layers:
        raise ValueError("harvest needs the layers to capture: --harvest.layers L [L ...]")
    prompt_set = load_prompt_set(list(inputs.prompts), seed=inputs.seed)
    if not prompt_set.records:
        raise ValueError(f"the prompt specs {' '.join(inputs.prompts)} gave no prompts")
    model, tokenizer = load_model(inputs.model, device=inputs.resolved_device, dtype=inputs.resolved_dtype)
    out = harvest_records(model, tokenizer, list(prompt_set.records), list(cfg.layers), Path(inputs.out), cfg, inputs,
                          inputs.positions, progress=inputs.progress,
                          prompt_info=prompt_info_from_manifest(prompt_set.manifest()))
    write_json(out / "prompts.json", prompt_set.manifest())
    return out


def show(_inputs: Inputs, out: Path) -> None:
    from activations.store import ActivationStore

    store = ActivationStore(out)
    print(f"harvested {store.n_rows} rows of layers {store.layers} ({store.positions} positions) into {out}")


COMMAND = Command(
    name=NAME, help="residual activations of labelled prompts -> HDF5 shards", inputs=Inputs, run=command,
    show=show, config=Config, section=NAME,
    renamed={"dtype": ["--harvest.storage_dtype"], "no-chat-template": ["--chat_template", "false"],
             "no-progress": ["--progress", "false"], "model-dtype": ["--model_dtype"]},
)


# --- pipeline ------------------------------------------------------------------------------------

def _harvest(ctx: RunContext, which: str, records: list, layers: list[int], positions: str, out: Path) -> dict[str, Any]:
    """One store of the run; a store of another harvest config in its place is replaced."""
    import shutil
    import sys

    from activations.store import ActivationStore
    from activations.store.write import HarvestMismatch

    model, tokenizer = ctx.model(which)
    try:
        harvest_records(model, tokenizer, records, layers, out, ctx.cfg.harvest, ctx.cfg, positions,
                        model_name=ctx.model_label(which), progress=True)
    except HarvestMismatch as exc:  # the config changed since this store was written: harvest it afresh
        print(f"note: {exc}; harvesting {out} afresh", file=sys.stderr, flush=True)
        shutil.rmtree(out)
        harvest_records(model, tokenizer, records, layers, out, ctx.cfg.harvest, ctx.cfg, positions,
                        model_name=ctx.model_label(which), progress=True)
    store = ActivationStore(out)
    return {"rows": store.n_rows, "layers": store.layers, "manifest_sha256": file_sha256(out / "manifest.json")[:16]}


def run(cfg: Config, ctx: RunContext) -> dict[str, Any]:
    """Last-token rows of every prompt at all layers; all-token rows of extract prompts for the SAEs.

    With a fitted refusal-token model, the base model's last-token extract rows are also harvested
    for model diffing (vectors are fitted on extract rows only).
    """
    out, layers = ctx.stage_dir(NAME), ctx.layers()
    result = {
        "last": _harvest(ctx, "target", list(ctx.prompts.records), layers, "last", out / "last"),
        "all": _harvest(ctx, "target", ctx.split("extract"), [ctx.layer], "all", out / "all"),
    }
    if ctx.cfg.refusal_tokens.enabled:
        result["base_last"] = _harvest(ctx, "base", ctx.split("extract"), layers, "last", out / "base_last")
    return result


def store_dir(ctx: RunContext, which: str = "last") -> Path:
    """A store of this run's harvest: "last" (every prompt), "all" (extract tokens) or "base_last"."""
    return ctx.stage_dir(NAME) / which


STAGE = PipelineStage(NAME, run, section=NAME,
                      uses=("model_dtype", "max_length", "chat_template", "refusal_tokens.enabled"),
                      after=("prompts", "refusal_tokens"))
