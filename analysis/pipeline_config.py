"""The pipeline's YAML configuration: typed sections, defaults, unknown keys rejected.

Every field can be overridden from the command line with `--set section.key=value` (YAML value syntax).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class HarvestSection:
    layers: list[int] | None = None  # None → one layer about a third of the way up plus one at two thirds
    batch_size: int = 32
    max_length: int = 256
    dtype: str = "float32"
    chat_template: bool = True


@dataclass
class RefusalTokenSection:
    enabled: bool = True  # fit categorical refusal tokens onto the model first
    tokens: str = "default"  # preset name or JSON file of class → token string


@dataclass
class SAESection:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    expansion_factor: int = 4
    k: int = 16
    architecture: str = "topk"
    steps: int = 300
    batch_size: int = 512
    lr: float = 1e-3
    auxk_coeff: float = 1.0 / 32
    contrastive_coeff: float = 0.0


@dataclass
class SelectSection:
    top_k: int = 10
    n_bootstrap: int = 8
    stability_threshold: float = 0.5
    C_grid: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3, 1.0])
    max_iter: int = 2000  # saga epochs per fit
    tol: float = 1e-4  # saga stopping tolerance


@dataclass
class VectorSection:
    tau: float = 0.0
    shared_frequency: float | None = 0.25  # a latent firing on > this fraction of both benign and category rows is "shared"
    top_k: int | None = 32
    lowrank_rank: int = 2


@dataclass
class EvalSection:
    alphas: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])
    alpha: float = 4.0  # the strength used for the side-by-side condition table
    positions: str = "all"
    batch_size: int = 32
    capability: list[str] = field(default_factory=lambda: ["builtin"])  # builtin | mmlu:DIR | truthfulqa:CSV | gsm8k:JSONL
    capability_limit: int = 40


@dataclass
class PipelineConfig:
    """The whole run: model and prompts, then one section per stage."""

    model: str = "smollm2-135m-instruct"
    prompts: list[str] = field(default_factory=lambda: ["builtin:quickstart"])
    seed: int = 0
    device: str = "auto"
    harvest: HarvestSection = field(default_factory=HarvestSection)
    refusal_tokens: RefusalTokenSection = field(default_factory=RefusalTokenSection)
    sae: SAESection = field(default_factory=SAESection)
    select: SelectSection = field(default_factory=SelectSection)
    vectors: VectorSection = field(default_factory=VectorSection)
    evaluation: EvalSection = field(default_factory=EvalSection)

    def section_dict(self, name: str) -> dict[str, Any]:
        """One section (or top-level field) as plain data, for hashing a stage's inputs."""
        value = getattr(self, name)
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else {name: value}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config section '{where or 'top level'}' must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}" if where else name)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (value parsed as YAML) to a raw config mapping."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        path, raw = item.split("=", 1)
        keys = path.split(".")
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML config (None → all defaults), apply overrides, validate keys."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
    data = apply_overrides(data, overrides or [])
    return _build(PipelineConfig, data, "")
