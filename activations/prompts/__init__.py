"""Prompt sources, deduplication and deterministic splits.

    from activations.prompts import load_prompt_set
    prompts = load_prompt_set(["builtin:quickstart", "xstest:../shared/data/xstest/xstest_prompts.csv"], seed=0)
    extract = prompts.split("extract")
    prompts.write_manifest("runs/prompts.json")

Spec grammar, categories, split rule and manifest fields: docs/prompts.md.
"""
from activations.prompts.heldout import HeldOutSet, load_heldout_sets
from activations.prompts.prompt_set import PromptSet, SourceSummary
from activations.prompts.sources import LoadedSource, load_source
from activations.prompts.spec import KINDS, SourceSpec, parse_spec
from activations.prompts.splits import DEFAULT_FRACTIONS, load_prompt_set, normalise_text, split_for_id

__all__ = [
    "DEFAULT_FRACTIONS",
    "HeldOutSet",
    "KINDS",
    "LoadedSource",
    "PromptSet",
    "SourceSpec",
    "SourceSummary",
    "load_heldout_sets",
    "load_prompt_set",
    "load_source",
    "normalise_text",
    "parse_spec",
    "split_for_id",
]
