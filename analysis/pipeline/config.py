"""The pipeline's configuration: the top-level run settings plus one section per stage.

Each section is the stage's own `Config` dataclass (the only place its defaults live), so
`refusal-sae pipeline -c quickstart.yaml --train.sae.k 8` and `refusal-sae train --train.sae.k 8`
parse the same field. Unknown keys and wrong types are rejected before the first stage runs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from activations.model_loading import ModelOptions
from analysis.stages import ablate, analyze, evaluate, features, gates, harvest, refusal_tokens, select, train, vectors


@dataclass(kw_only=True)
class PipelineConfig(ModelOptions):
    """The whole run.

    Args:
        model: hub id, local model folder, or smollm2-135m-instruct (the base model).
        prompts: prompt source specs (builtin:quickstart, coconot:PATH, xstest:PATH, jsonl:PATH, ...).
        seed: split assignment and every fit's seed.
        refusal_tokens, harvest, train, select, vectors, gates, evaluate, ablate, analyze, features: the stages'
        sections.
    """

    model: str = "smollm2-135m-instruct"
    prompts: list[str] = field(default_factory=lambda: ["builtin:quickstart"])
    seed: int = 0
    refusal_tokens: refusal_tokens.Config = field(default_factory=refusal_tokens.Config)
    harvest: harvest.Config = field(default_factory=harvest.Config)
    train: train.Config = field(default_factory=train.Config)
    select: select.Config = field(default_factory=select.Config)
    vectors: vectors.Config = field(default_factory=vectors.Config)
    gates: gates.Config = field(default_factory=gates.Config)
    evaluate: evaluate.Config = field(default_factory=evaluate.Config)
    ablate: ablate.Config = field(default_factory=ablate.Config)
    analyze: analyze.Config = field(default_factory=analyze.Config)
    features: features.Config = field(default_factory=features.Config)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def value(self, dotted: str) -> Any:
        """The config value at a dotted path, e.g. "evaluate.alpha" (plain data for dataclasses)."""
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return asdict(node) if hasattr(node, "__dataclass_fields__") else node


OLD_SECTIONS = {
    "sae": "is now 'train' (shape under train.sae: k, expansion_factor, architecture, auxk_coeff, ...; "
           "steps and seeds under train; lr under train.optim; batch_size under train.data)",
    "evaluation": "is now 'evaluate' (alphas, alpha, positions, batch_size, capability, capability_limit)",
}
"""Sections of earlier config files, with where their keys went."""

OLD_KEYS = {
    "sae.seeds": "train.seeds", "sae.steps": "train.steps", "sae.lr": "train.optim.lr",
    "sae.batch_size": "train.data.batch_size", "harvest.dtype": "model_dtype",
    "harvest.max_length": "max_length", "harvest.chat_template": "chat_template", "device": "device",
    **{f"sae.{k}": f"train.sae.{k}" for k in ("expansion_factor", "k", "architecture", "auxk_coeff", "contrastive_coeff")},
    **{f"evaluation.{k}": f"evaluate.{k}" for k in ("alphas", "alpha", "positions", "batch_size", "capability",
                                                     "capability_limit")},
}
"""`--set` keys / flags of earlier versions → today's dotted keys."""
