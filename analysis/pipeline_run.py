"""Shared state of one pipeline run: config, folders, and models / prompts loaded once per process."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from activations.model_loading import load_model, resolve_device
from activations.prompts import PromptSet, load_prompt_set
from activations.records import PromptRecord
from analysis.pipeline_config import PipelineConfig


@dataclass
class PipelineRun:
    """Folders of a run (`root/<stage>/…`) and lazily loaded, cached heavy objects."""

    cfg: PipelineConfig
    root: Path
    _models: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    _prompts: PromptSet | None = None

    @property
    def device(self) -> str:
        return resolve_device(self.cfg.device)

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
        """The model under study: the refusal-token model written by the pipeline, or `cfg.model`."""
        if self.cfg.refusal_tokens.enabled:
            return str(self.stage_dir("refusal_model") / "model")
        return self.cfg.model

    def model(self, which: str = "target") -> tuple[Any, Any]:
        """`(model, tokenizer)` of the base model (`cfg.model`) or the target model, cached."""
        if which not in self._models:
            name = self.cfg.model if which == "base" else self.target_model_path
            self._models[which] = load_model(name, device=self.device, dtype=self.cfg.harvest.dtype)
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


def split_counts(records: list[PromptRecord]) -> dict[str, int]:
    """Category → number of records."""
    cats, counts = np.unique([r.category for r in records], return_counts=True)
    return {str(c): int(n) for c, n in zip(cats, counts)}
