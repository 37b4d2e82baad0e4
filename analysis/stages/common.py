"""Pieces shared by the model-running analysis commands (`steer`, `attribute`).

- `TargetInputs`: the inputs of a command that runs a refusal-token model on one split of a prompt
  set (`--model`, `--tokens`, `--prompts`, `--split`, `--seed`, plus `ModelOptions`: `--device`,
  `--model_dtype`, `--max_length`, `--chat_template`).
- `load_records(specs, split, seed)`: the prompts of one split of a prompt set.
- `load_target(model, tokens, device, dtype)`: a refusal-token model, its tokenizer and token spec.
- `load_seed_sae(folder, layer, d_model, device)`: one exported SAE folder (`RUN/seed_<s>/`) and its
  seed, checked by `sae.export.load_checked_sae`; a whole training run is refused.
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
                  model: dict[str, Any] | None = None) -> tuple[Any, int]:
    """`(sae, seed)` of one exported SAE folder, checked against `layer`, `d_model` and the identity
    record `model` of the loaded model (`activations.model_identity`) when given.

    The seed is the one recorded at export, else the `seed_<s>` folder name, else 0
    (`sae.export.seed_folders`). A training run folder (`RUN/seed_<s>/` inside) is refused: the
    latent ids of a features.json belong to one seed.
    """
    from sae.export import load_checked_sae, seed_folders

    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"SAE folder not found: {path}")
    folders = seed_folders(path)
    if list(folders.values()) != [path]:
        raise ValueError(f"{path} is an SAE training run; pass one seed's folder, e.g. {next(iter(folders.values()))}")
    seed = next(iter(folders))
    sae, _ = load_checked_sae(path, layer, d_model, device, against="the model", model=model)
    return sae, seed


def rate_text(entry: dict[str, Any] | None, digits: int = 2) -> str:
    """`rate [lo, hi]` of a `{rate, ci, n}` dict, or `—` when it is missing or empty."""
    if not entry or entry.get("rate") is None:
        return "—"
    lo, hi = entry["ci"]
    return f"{entry['rate']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
