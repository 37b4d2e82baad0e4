"""Pieces shared by the model-running analysis commands (`steer`, `attribute`).

- `TargetInputs`: the inputs of a command that runs a refusal-token model on one split of a prompt
  set (`--model`, `--tokens`, `--prompts`, `--split`, `--seed`, plus `ModelOptions`: `--device`,
  `--model_dtype`, `--max_length`, `--chat_template`).
- `load_records(specs, split, seed)`: the prompts of one split of a prompt set.
- `load_target(model, tokens, device, dtype)`: a refusal-token model, its tokenizer and token spec.
- `load_seed_sae(folder, layer, d_model, device, seed)`: one SAE from a seed's folder or a training run
  folder (then `seed`, default its first), checked by `sae.export.load_checked_sae`;
  `features_seed(features)`: the seed a features.json was selected on (steer picks that seed).
- `rate_text(entry)`: `0.25 [0.08, 0.55]` for a `{rate, ci, n}` dict.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from activations.model_loading import ModelOptions
from activations.records import SPLITS, PromptRecord


@dataclass(kw_only=True)
class TargetInputs(ModelOptions):
    """The refusal-token model and the prompts a command runs it on.

    Args:
        model: refusal-token model folder (or a hub id with --tokens).
        tokens: refusal-token preset (default, llama3) or JSON file; default MODEL/refusal_tokens.json.
        prompts: prompt source specs.
        split: split of the prompt set used.
        seed: seed of the prompt set's split assignment.
    """

    model: str
    tokens: str | None = None
    prompts: list[str]
    split: Literal["extract", "calibrate", "eval"] = "eval"
    seed: int = 0


def load_records(specs: Sequence[str], split: str, seed: int = 0) -> list[PromptRecord]:
    """The records of `split` of the prompt set made of `specs` (ValueError when there are none)."""
    from activations.prompts import load_prompt_set

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    records = list(load_prompt_set(list(specs), seed=seed).split(split))
    if not records:
        raise ValueError(f"the prompt set {' '.join(specs)} has no prompts in the {split!r} split")
    return records


def load_target(model: str, tokens: str | None, device: str = "auto", dtype: str = "float32") -> tuple[Any, Any, Any]:
    """`(model, tokenizer, RefusalTokenSpec)` of a refusal-token model, tokens checked against the tokenizer.

    The spec comes from `--tokens` (preset or JSON file) when given, else `MODEL/refusal_tokens.json`;
    without `--tokens`, `model` must be a local folder.
    """
    from activations.model_loading import load_model, resolve_device
    from probes.refusal_tokens import SPEC_FILE, load_refusal_token_spec, resolve_token_spec

    folder = Path(model)
    if tokens is None:
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder not found: {model} (for a hub id, also pass --tokens)")
        if not (folder / SPEC_FILE).is_file():
            raise ValueError(f"model folder {model} has no {SPEC_FILE}; fit refusal tokens first "
                             "(`refusal-sae refusal-tokens`) or pass --tokens PRESET_OR_JSON")
        spec = load_refusal_token_spec(folder)
    else:
        spec = resolve_token_spec(tokens)
    loaded, tokenizer = load_model(model, device=resolve_device(device), dtype=dtype)
    spec.token_ids(tokenizer)  # fails early, naming a missing token
    return loaded, tokenizer, spec


def load_seed_sae(folder: str | Path, layer: int, d_model: int, device: str = "cpu",
                  model: dict[str, Any] | None = None, seed: int | None = None) -> tuple[Any, int]:
    """`(sae, seed)` of one SAE, checked against `layer`, `d_model` and the identity record `model` of
    the loaded model (`activations.model_identity`) when given: a seed's folder, or a training run
    folder (`RUN/seed_<s>/` inside) and the `seed` to take from it.

    With a run folder and no `seed` the run's first seed is used (a note names it). A seed's own
    folder must hold `seed` when one is given (the seed recorded at export, else its `seed_<s>`
    name, else 0: `sae.export.seed_folders`).
    """
    import sys

    from sae.export import CFG_NAME, load_checked_sae, seed_folders

    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"SAE folder not found: {path}")
    folders = seed_folders(path)
    is_run = not (path / CFG_NAME).is_file()
    if seed is None:
        seed = next(iter(folders))
        if is_run and len(folders) > 1:
            print(f"note: SAE run {path} has seeds {sorted(folders)}; using seed {seed} (pick one with its "
                  "features.json or --sae_seed)", file=sys.stderr)
    elif seed not in folders:
        what = "SAE run" if is_run else "SAE folder"
        raise ValueError(f"{what} {path} has seed(s) {sorted(folders)}, not seed {seed}")
    sae, _ = load_checked_sae(folders[seed], layer, d_model, device, against="the model", model=model)
    return sae, seed


def features_seed(features: str | Path) -> int | None:
    """The SAE seed a features.json (or a selection folder's) was selected on, or None when unrecorded."""
    from probes.selection import read_features

    seed = (read_features(features, space=None).get("meta") or {}).get("sae_seed")
    return None if seed is None else int(seed)


def rate_text(entry: dict[str, Any] | None, digits: int = 2) -> str:
    """`rate [lo, hi]` of a `{rate, ci, n}` dict, or `—` when it is missing or empty."""
    if not entry or entry.get("rate") is None:
        return "—"
    lo, hi = entry["ci"]
    return f"{entry['rate']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
