"""Pieces shared by the analysis subcommands (`steer`, `attribute`, `stability`).

- `add_target_args(parser, batch_size, batch_help)`: the options of `load_target` and `load_records`
  that every model-running subcommand takes (tokens, batch size, max length, seed, device, dtype).
- `load_records(specs, split, seed)`: the prompts of one split of a prompt set.
- `load_target(model, tokens, device, dtype)`: a refusal-token model, its tokenizer and token spec.
- `load_one_sae(path, layer, d_model, device)`: one exported SAE folder (`RUN/seed_<s>/`), checked.
- `refusal_feature_ids(features_json, layer, d_sae, sae_seed)`: union of the refusal categories' selected latents.
- `write_result(path, obj)`: atomic JSON, with non-finite numbers written as null.
- `rate_text(entry)`: `0.25 [0.08, 0.55]` for a `{rate, ci, n}` dict.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from activations.records import BENIGN, CONTRAST, SPLITS, PromptRecord


def add_target_args(parser: argparse.ArgumentParser, batch_size: int, batch_help: str) -> None:
    """Add --tokens, --batch-size, --max-length, --seed, --device and --dtype to `parser`."""
    parser.add_argument("--tokens", default=None,
                        help="refusal-token preset (default, llama3) or JSON file; default MODEL/refusal_tokens.json")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    parser.add_argument("--max-length", type=int, default=512, help="prompt tokens kept (left truncation)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt set's split assignment")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")


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


def load_one_sae(path: str | Path, layer: int, d_model: int, device: str = "cpu") -> tuple[Any, int | None]:
    """`(sae, seed)` of the SAE exported in `path` (one seed folder), checked against `layer` and `d_model`.

    The seed is the one recorded at export, else the `seed_<s>` folder name, else None.
    """
    from sae.export import CFG_NAME, load_sae

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"SAE folder not found: {folder}")
    if not (folder / CFG_NAME).is_file() and any(folder.glob("seed_*")):
        raise ValueError(f"{folder} is an SAE training run; pass one seed's folder, e.g. {folder / 'seed_0'}")
    sae, cfg = load_sae(folder, device=device)
    ours = cfg.get("refusal_sae") or {}
    trained = cfg.get("hook_layer", ours.get("layer"))
    if trained is not None and int(trained) != layer:
        raise ValueError(f"SAE {folder} was trained on layer {trained}, not layer {layer}")
    if sae.d_in != d_model:
        raise ValueError(f"SAE {folder} has d_in {sae.d_in} but the model's d_model is {d_model}")
    seed = ours.get("seed")
    if seed is None and folder.name.startswith("seed_") and folder.name[5:].lstrip("-").isdigit():
        seed = int(folder.name[5:])
    return sae, None if seed is None else int(seed)


def refusal_feature_ids(features_json: str | Path, layer: int, d_sae: int, sae_seed: int | None = None) -> list[int]:
    """Sorted union of the latents selected for the refusal categories in a `features.json`
    (a folder means its `features.json`), checked against the layer, the SAE width and seed."""
    from probes.storage import read_json

    path = Path(features_json)
    if path.is_dir():
        path = path / "features.json"
    data = read_json(path, "features.json")
    if not isinstance(data, dict) or not isinstance(data.get("per_class"), dict):
        raise ValueError(f"{path} has no 'per_class' table; is it a features.json of `refusal-sae select`?")
    meta = data.get("meta") or {}
    if meta.get("space", "sae") != "sae":
        raise ValueError(f"{path} selects {meta['space']} units, not SAE latents")
    if meta.get("layer") is not None and int(meta["layer"]) != layer:
        raise ValueError(f"{path} was selected at layer {meta['layer']}, not layer {layer}")
    if sae_seed is not None and meta.get("sae_seed") is not None and int(meta["sae_seed"]) != sae_seed:
        raise ValueError(f"{path} was selected on SAE seed {meta['sae_seed']}, not on seed {sae_seed} "
                         "(latent ids differ between seeds)")
    ids = sorted({int(i) for name, entry in data["per_class"].items() if name not in (BENIGN, CONTRAST)
                  for i in entry.get("feature_ids", [])})
    if not ids:
        raise ValueError(f"{path} selects no features for any refusal category")
    if ids[0] < 0 or ids[-1] >= d_sae:
        bad = ids[-1] if ids[-1] >= d_sae else ids[0]
        raise ValueError(f"{path} selects feature {bad}, outside the SAE's 0..{d_sae - 1}")
    return ids


def show_progress() -> bool:
    """Progress bars only when a person watches (stderr is a terminal)."""
    return sys.stderr.isatty()


def finite_or_none(obj: Any) -> Any:
    """`obj` with every NaN / infinite float (recursively) replaced by None, for strict JSON."""
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return None
    return obj


def write_result(path: str | Path, obj: Any) -> Path:
    """Atomically write `obj` as JSON (numpy values converted, non-finite numbers as null)."""
    from probes.storage import write_json

    return write_json(path, finite_or_none(obj))


def rate_text(entry: dict[str, Any] | None, digits: int = 2) -> str:
    """`rate [lo, hi]` of a `{rate, ci, n}` dict, or `—` when it is missing or empty."""
    if not entry or entry.get("rate") is None:
        return "—"
    lo, hi = entry["ci"]
    return f"{entry['rate']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
