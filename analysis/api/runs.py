"""A finished (or partly finished) pipeline run, opened by path: its model, SAEs, features, vectors, gates.

    run = load_run("checkpoints/quickstart")
    model, tokenizer = run.load_model()
    sae = run.sae()                        # the reference seed's SAE at the primary layer
    features = run.features(sae.seed)     # features.json selected on that seed
    vector = run.vector("global")         # residual refusal direction (also "safety", ... per category)
    gate = run.gate("distance")

Paths come from the stage modules (`analysis.stages.*`), which own the run-folder layout; each
accessor reads only its stage's folder, so a run whose later stages have not run yet opens too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.api.handles import SAE, Vector, load_sae, load_vectors


@dataclass(frozen=True)
class Run:
    """A pipeline run folder (see the module docstring)."""

    path: Path

    def _ctx(self) -> Any:
        from analysis.stages.context import RunContext

        return RunContext(cfg=None, root=self.path)  # stage_dir only: no config, nothing loaded

    def _stage(self, name: str) -> Path:
        folder = self._ctx().stage_dir(name)
        if not folder.is_dir():
            raise FileNotFoundError(f"run {self.path} has no {name}/ stage output (has it run yet?)")
        return folder

    @property
    def model_path(self) -> str:
        """The model under study: the run's refusal-token model, else the configured base model."""
        from analysis.stages.context import REFUSAL_MODEL_DIR

        fitted = self.path.joinpath(*REFUSAL_MODEL_DIR)
        if fitted.is_dir():
            return str(fitted)
        model = self.config.get("model")
        if not model:
            raise FileNotFoundError(f"run {self.path} has neither {'/'.join(REFUSAL_MODEL_DIR)} nor a config naming its model")
        return str(model)

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config the run was started with (`RUN/config.yaml`), or {} when it has none."""
        import yaml

        path = self.path / "config.yaml"
        return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}

    @property
    def layer(self) -> int:
        """The primary layer (SAEs, features, vectors and steering live there)."""
        from analysis.stages import train

        metrics = self._stage(train.NAME) / "metrics.json"
        if not metrics.is_file():
            raise FileNotFoundError(f"run {self.path} has no {metrics.relative_to(self.path)} (train not finished)")
        return int(json.loads(metrics.read_text(encoding="utf-8"))["layer"])

    @property
    def seeds(self) -> list[int]:
        """The SAE seeds trained (the first is the reference seed of selection and gates)."""
        from analysis.stages import train
        from sae.export import seed_folders

        return list(seed_folders(self._stage(train.NAME)))

    @property
    def summary(self) -> dict[str, Any]:
        """`RUN/summary.json` (every number of the run; written when the whole pipeline finished)."""
        from activations.io import read_json

        return read_json(self.path / "summary.json", "run summary")

    def load_model(self, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
        """`(model, tokenizer)` of the model under study (`analysis.api.load_model`)."""
        from analysis.api.decisions import load_model

        return load_model(self.model_path, device=device, dtype=dtype)

    def sae(self, seed: int | None = None, device: str = "cpu") -> SAE:
        """The SAE of `seed` (default: the reference seed), checked against the primary layer."""
        from analysis.stages import train

        return load_sae(self._stage(train.NAME), seed=seed, layer=self.layer, device=device)

    def features(self, seed: int | None = None) -> dict[str, Any]:
        """The parsed features.json selected on SAE `seed` (default: the reference seed)."""
        from analysis.stages import select
        from probes.selection import read_features

        self._stage(select.NAME)
        seed = self.seeds[0] if seed is None else seed
        return read_features(select.selection_dir(self._ctx(), "sae") / f"seed_{seed}", layer=self.layer, sae_seed=seed)

    def vectors(self, which: str = "residual") -> dict[str, Vector]:
        """A vector set: "residual" (per category + "global"), "lowrank", or "sae_seed<s>"."""
        from analysis.stages import vectors

        return load_vectors(self._stage(vectors.NAME) / which)

    def vector(self, name: str = "global", which: str = "residual") -> Vector:
        """One steering vector of a set (default: the global refusal direction)."""
        found = self.vectors(which)
        if name not in found:
            raise ValueError(f"no vector {name!r} in {which}; available: {', '.join(found)}")
        return found[name]

    def gate(self, name: str = "distance", seed: int | None = None) -> Any:
        """A tuned gate: "distance" (decides on residual states at the primary layer) or "probe"
        (on the reference seed's SAE latents; with `seed`, SAE seed `seed`'s own probe gate)."""
        from analysis.api.decisions import load_gate
        from analysis.stages import gates

        self._stage(gates.NAME)
        path = gates.gate_path(self._ctx(), name, seed)
        if not path.is_file():
            raise FileNotFoundError(f"run {self.path} has no {name} gate ({path.name})")
        return load_gate(path)


def load_run(path: str | Path) -> Run:
    """Open a pipeline run folder (`refusal-sae pipeline --out PATH`)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"run folder not found: {folder}")
    return Run(folder)
