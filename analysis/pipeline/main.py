"""`refusal-sae pipeline -c CONFIG --out DIR`: every stage, resumably, then summary.json + report.html.

Stages (each skipped when its stamp matches its inputs' hashes, so a rerun after a crash resumes):
prompts → refusal_tokens → harvest → train → select → vectors → gates → evaluate → ablate → analyze →
features.
The config is validated whole (unknown keys, wrong types) before the first stage runs.
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.pipeline.config import OLD_KEYS, OLD_SECTIONS, PipelineConfig
from analysis.pipeline.runner import Stage, StageRunner
from analysis.stages import ablate, analyze, evaluate, features, gates, harvest, prompts, refusal_tokens, select, train, vectors
from analysis.stages.command import Command
from analysis.stages.context import PipelineStage, RunContext

PIPELINE: tuple[PipelineStage, ...] = (
    prompts.STAGE, refusal_tokens.STAGE, harvest.STAGE, train.STAGE, select.STAGE, vectors.STAGE, gates.STAGE,
    evaluate.STAGE, ablate.STAGE, analyze.STAGE, features.STAGE,
)
"""The stages in the order they run."""


def build_stages(ctx: RunContext) -> list[Stage]:
    """The runner's stages: each with the config it depends on and the stages it reads."""
    cfg: PipelineConfig = ctx.cfg
    present = [s for s in PIPELINE if s.name != refusal_tokens.NAME or cfg.refusal_tokens.enabled]
    names = {s.name for s in present}
    stages = []
    for stage in present:
        section = None if stage.section is None else getattr(cfg, stage.section)
        inputs = {key: cfg.value(key) for key in ((stage.section,) if stage.section else ()) + stage.uses}
        stages.append(Stage(stage.name, lambda _out, stage=stage, section=section: stage.run(section, ctx), inputs,
                            [a for a in stage.after if a in names]))
    return stages


def training_curves(ctx: RunContext) -> dict[int, dict[str, list[float]]]:
    """Per-seed logged metrics from `train/seed_<s>/metrics.csv` (columns step, fvu, l0, auxk_dead_fraction)."""
    curves: dict[int, dict[str, list[float]]] = {}
    for seed in ctx.cfg.train.seeds:
        path = ctx.stage_dir(train.NAME) / f"seed_{seed}" / "metrics.csv"
        if not path.is_file():
            continue
        rows = list(csv.DictReader(path.read_text().splitlines()))
        keys = [k for k in ("step", "fvu", "l0", "auxk_dead_fraction") if rows and k in rows[0]]
        if len(keys) > 1:
            curves[seed] = {k: [float(r[k]) for r in rows if r.get(k) not in (None, "")] for k in keys}
    return curves


def preflight(cfg: PipelineConfig) -> None:
    """The checks that need the model's shape, before the first stage: harvest layers in range and the
    SAE's width against k (`SAEConfig.for_input`). Skipped when the model's config cannot be read
    without loading the model (e.g. a hub id that is not cached); a missing model folder is an error."""
    from transformers import AutoConfig

    from activations.model_loading import resolve_model_path

    path = resolve_model_path(cfg.model)  # FileNotFoundError for a missing local folder
    try:
        config = AutoConfig.from_pretrained(path)
        n_layers, d_model = int(config.num_hidden_layers), int(config.hidden_size)
    except (OSError, ValueError, AttributeError, TypeError):
        return
    bad = [layer for layer in (cfg.harvest.layers or []) if not 0 <= int(layer) < n_layers]
    if bad:
        raise ValueError(f"harvest.layers: layer {bad[0]} is out of range; {cfg.model} has blocks 0..{n_layers - 1}")
    try:
        cfg.train.sae.for_input(d_model)
    except ValueError as exc:
        raise ValueError(f"train.sae: {exc} (d_in = {cfg.model}'s d_model {d_model})") from None


def run_pipeline(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    """Run (or resume) every stage under `out`, then write summary.json and report.html."""
    from analysis.pipeline.outputs import write_outputs

    preflight(cfg)
    out.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(cfg, out)
    began = time.perf_counter()
    runner = StageRunner(out, build_stages(ctx))
    runner.run()
    return write_outputs(ctx, runner.timings, time.perf_counter() - began, training_curves(ctx))


@dataclass(kw_only=True)
class Inputs:
    """Files of `refusal-sae pipeline`.

    Args:
        out: run folder (created; an existing one is resumed).
    """

    out: Path


def command(cfg: PipelineConfig, inputs: Inputs) -> dict[str, Any]:
    return run_pipeline(cfg, Path(inputs.out))


def show(inputs: Inputs, summary: dict[str, Any]) -> None:
    print(f"wrote {Path(inputs.out) / 'summary.json'} and {Path(inputs.out) / 'report.html'}")
    print(refusal_table_text(summary))


def refusal_table_text(summary: dict[str, Any]) -> str:
    """A plain-text refusal table (condition × set) for the terminal."""
    sets = ["harmful_refusal", "over_refusal", *[s for s in next(iter(summary["refusal"].values()))
                                                 if s not in ("harmful_refusal", "over_refusal")]]
    width = max(len(c) for c in summary["refusal"])
    lines = [" " * width + " | " + " | ".join(f"{s[:13]:>13}" for s in sets)]
    for condition, table in summary["refusal"].items():
        cells = [f"{table[s]['rate']:>13.2f}" if s in table and table[s]["rate"] is not None else f"{'-':>13}" for s in sets]
        lines.append(f"{condition:<{width}} | " + " | ".join(cells))
    n = next(iter(summary["refusal"].values()))
    lines.append("n per set: " + ", ".join(f"{s}={n[s]['n']}" for s in sets if s in n))
    return "\n".join(lines)


COMMAND = Command(
    name="pipeline", help="run every stage from a YAML config, resumably, and write a report", inputs=Inputs,
    run=command, show=show, config=PipelineConfig, section=None,
    renamed={old: [f"--{new}"] for old, new in OLD_KEYS.items() if old != new}, old_sections=OLD_SECTIONS,
)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """The pipeline config of a YAML file plus `--section.key value` overrides, parsed and validated
    exactly as the command line does (for notebooks and tests)."""
    from analysis.stages.command import parse

    argv = (["-c", str(path)] if path is not None else []) + list(overrides or []) + ["--out", "."]
    return parse(COMMAND, argv)[0]
