"""What a pipeline stage gets: the run context (config, folders, cached models) and the stage record.

A run folder holds one subfolder per stage, named after it (`RUN/harvest/`, `RUN/train/`, ...); each
stage module knows the layout inside its own subfolder and reads the ones it depends on.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from activations.model_loading import load_model
from activations.prompts import PromptSet, load_prompt_set
from activations.records import PromptRecord

REFUSAL_MODEL_DIR = ("refusal_tokens", "model")
"""Where the refusal-tokens stage writes the fitted model, relative to the run folder."""


@dataclass(frozen=True)
class PipelineStage:
    """One stage of the pipeline.

    `run(cfg, ctx) -> result` writes under `ctx.stage_dir(name)` and returns a small JSON-able result
    that the runner stamps; `cfg` is the stage's section of the pipeline config (None when it has
    none). The stamp hashes the section, the other config keys in `uses` (dotted paths) and the
    results of the stages in `after`, so a changed input re-runs the stage and everything after it.
    """

    name: str
    run: Callable[[Any, "RunContext"], dict[str, Any]]
    section: str | None = None
    uses: tuple[str, ...] = ()
    after: tuple[str, ...] = ()


@dataclass
class RunContext:
    """A pipeline run: its config (`analysis.pipeline.config.PipelineConfig`), folder, and heavy
    objects (prompt set, models) loaded once per process."""

    cfg: Any
    root: Path
    _models: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    _prompts: PromptSet | None = None

    @property
    def device(self) -> str:
        return self.cfg.resolved_device

    def stage_dir(self, name: str) -> Path:
        return self.root / name

    @property
    def prompts(self) -> PromptSet:
        if self._prompts is None:
            self._prompts = load_prompt_set(self.cfg.prompts, seed=self.cfg.seed)
        return self._prompts

    def split(self, name: str) -> list[PromptRecord]:
        return list(self.prompts.split(name))

    @property
    def target_model_path(self) -> str:
        """The model under study: the refusal-token model this run fitted, or `cfg.model`."""
        if self.cfg.refusal_tokens.enabled:
            return str(self.root.joinpath(*REFUSAL_MODEL_DIR))
        return self.cfg.model

    def model_label(self, which: str = "target") -> str:
        """The model's name in records: `cfg.model`, or `RUN/refusal_tokens/model` for the model this
        run fitted (no absolute path, so a run folder can be moved)."""
        if which != "base" and self.cfg.refusal_tokens.enabled:
            return "/".join(("RUN", *REFUSAL_MODEL_DIR))
        return self.cfg.model

    def model(self, which: str = "target") -> tuple[Any, Any]:
        """`(model, tokenizer)` of the base model (`cfg.model`) or the target model, cached."""
        if which not in self._models:
            name = self.cfg.model if which == "base" else self.target_model_path
            self._models[which] = load_model(name, device=self.device, dtype=self.cfg.resolved_dtype)
        return self._models[which]

    def forget_model(self, which: str) -> None:
        """Drop a cached model (e.g. after it was modified in place)."""
        self._models.pop(which, None)

    def layers(self) -> list[int]:
        """Harvested layers: the config's, else one about a third of the way up plus one at two thirds."""
        if self.cfg.harvest.layers:
            return [int(x) for x in self.cfg.harvest.layers]
        from activations.adapter import ModelAdapter

        return ModelAdapter(self.model("target")[0]).default_layers()

    @property
    def layer(self) -> int:
        """The primary layer: SAEs, features, vectors and steering live here."""
        return self.layers()[0]
