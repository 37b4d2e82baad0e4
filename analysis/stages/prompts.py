"""The `prompts` stage: load and split the prompt sources, write the split manifest with content hashes.

Reads the pipeline's top-level `prompts` (source specs) and `seed` (split assignment); writes
`RUN/prompts/prompts.json` (`PromptSet.manifest()`: counts and sha256 per split and source).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from analysis.stages.context import PipelineStage, RunContext

NAME = "prompts"


def run(_cfg: None, ctx: RunContext) -> dict[str, Any]:
    ctx.prompts.write_manifest(manifest_path(ctx))
    manifest = ctx.prompts.manifest()
    return {"n": manifest["n"], "splits": manifest["splits"], "n_duplicates_removed": manifest["n_duplicates_removed"]}


def manifest_path(ctx: RunContext) -> Path:
    """This run's split manifest."""
    return ctx.stage_dir(NAME) / "prompts.json"


STAGE = PipelineStage(NAME, run, section=None, uses=("prompts", "seed"))
