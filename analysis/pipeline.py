"""`refusal-sae pipeline -c CONFIG --out DIR`: every stage, resumably, then summary.json + report.html.

Stages (each skipped when its stamp matches its inputs' hashes, so a rerun after a crash resumes):
prompts → refusal_model → harvest → sae → select → vectors → gates → evaluate → analysis.
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Any

from activations.cli_util import run_cli
from analysis.pipeline_config import PipelineConfig, load_config
from analysis.pipeline_run import PipelineRun
from analysis.stage_runner import Stage, StageRunner


def build_stages(run: PipelineRun) -> list[Stage]:
    """The stage list of a run, each with the config it depends on and the stages it reads."""
    from analysis.pipeline_analysis import stage_analysis
    from analysis.pipeline_eval import stage_gates
    from analysis.pipeline_evaluate import stage_evaluate
    from analysis.pipeline_stages import (
        stage_harvest, stage_prompts, stage_refusal_model, stage_sae, stage_select, stage_vectors,
    )

    cfg = run.cfg
    top = {"model": cfg.model, "prompts": cfg.prompts, "seed": cfg.seed}
    stages = [Stage("prompts", lambda out: stage_prompts(run, out), top)]
    model_stage = []
    if cfg.refusal_tokens.enabled:
        stages.append(Stage("refusal_model", lambda out: stage_refusal_model(run, out),
                            {**top, **cfg.section_dict("refusal_tokens"), "dtype": cfg.harvest.dtype}, ["prompts"]))
        model_stage = ["refusal_model"]
    stages += [
        Stage("harvest", lambda out: stage_harvest(run, out), cfg.section_dict("harvest"), ["prompts", *model_stage]),
        Stage("sae", lambda out: stage_sae(run, out), cfg.section_dict("sae"), ["harvest"]),
        Stage("select", lambda out: stage_select(run, out), cfg.section_dict("select"), ["harvest", "sae"]),
        Stage("vectors", lambda out: stage_vectors(run, out), cfg.section_dict("vectors"), ["select"]),
        Stage("gates", lambda out: stage_gates(run, out), cfg.section_dict("evaluation"), ["vectors"]),
        Stage("evaluate", lambda out: stage_evaluate(run, out), cfg.section_dict("evaluation"), ["gates"]),
        Stage("analysis", lambda out: stage_analysis(run, out), {"seed": cfg.seed}, ["evaluate"]),
    ]
    return stages


def training_curves(run: PipelineRun) -> dict[int, dict[str, list[float]]]:
    """Per-seed logged metrics from `sae/seed_<s>/metrics.csv` (columns step, fvu, l0, dead_fraction)."""
    curves: dict[int, dict[str, list[float]]] = {}
    for seed in run.cfg.sae.seeds:
        path = run.stage_dir("sae") / f"seed_{seed}" / "metrics.csv"
        if not path.is_file():
            continue
        rows = list(csv.DictReader(path.read_text().splitlines()))
        keys = [k for k in ("step", "fvu", "l0", "dead_fraction") if rows and k in rows[0]]
        if len(keys) > 1:
            curves[seed] = {k: [float(r[k]) for r in rows if r.get(k) not in (None, "")] for k in keys}
    return curves


def run_pipeline(cfg: PipelineConfig, out: Path) -> dict[str, Any]:
    """Run (or resume) every stage under `out`, then write summary.json and report.html."""
    from analysis.pipeline_summary import write_outputs

    out.mkdir(parents=True, exist_ok=True)
    run = PipelineRun(cfg, out)
    began = time.perf_counter()
    runner = StageRunner(out, build_stages(run))
    runner.run()
    return write_outputs(run, runner.timings, time.perf_counter() - began, training_curves(run))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="refusal-sae pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="YAML config (see configs/quickstart.yaml)")
    parser.add_argument("--out", required=True, help="run folder (created; an existing one is resumed)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config field, e.g. --set sae.steps=100 (repeatable)")

    def show(args: argparse.Namespace, summary: dict[str, Any]) -> None:
        print(f"wrote {Path(args.out) / 'summary.json'} and {Path(args.out) / 'report.html'}")
        print(refusal_table_text(summary))

    return run_cli(parser, lambda args: run_pipeline(load_config(args.config, args.overrides), Path(args.out)), show, argv)


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
