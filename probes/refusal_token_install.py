"""Model surgery for refusal tokens: untie the unembedding, add the tokens, write their rows, save.

Given class weights `W (n_classes, d_model)` that score the final-norm state `h (d_model,)` of the last
prompt position as `W_c . h`, `install_refusal_tokens`

1. unties the unembedding from the input embedding when they share one matrix (SmolLM2 does), by
   cloning the weight into its own parameter and setting `tie_word_embeddings = False`, so writing
   output rows never changes input embeddings;
2. adds the missing class tokens to the tokenizer as special tokens and grows both matrices;
3. sets the input-embedding row of each newly added token to the mean embedding of the old rows;
4. sets the unembedding row of class c to `W_c + beta * u`, `u` the unit mean direction of the fit
   states. The shift `beta * (u . h)` is the same for all six rows at a given h, so it never changes
   the restricted decision; `beta` is chosen so the winning class token also beats every ordinary
   vocabulary token by `margin` logits on the fit prompts (unrestricted greedy decoding then starts
   with a class token). A bias of the unembedding, if the head has one, is set to 0 on those rows.

`save_refusal_token_model` writes a plain transformers directory (safetensors + tokenizer) plus
`refusal_tokens.json`, `fit_report.json`, `refusal_sae_source.json` (the base model and its hub id)
and `refusal_head.safetensors` (the fitted class weights
before the offset, the offset direction and beta, float64), atomically (temporary folder + rename).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from activations.adapter import ModelAdapter
from activations.model_loading import write_model_source
from probes.refusal_tokens import SPEC_FILE, RefusalTokenSpec
from activations.io import current_umask, load_numpy_tensors, save_numpy_tensors, to_jsonable, write_json

REPORT_FILE = "fit_report.json"
HEAD_FILE = "refusal_head.safetensors"


def untie_unembedding(model: torch.nn.Module) -> bool:
    """Give the unembedding its own weight if it shares the input embedding's; True if it did."""
    adapter = ModelAdapter(model)
    shared = adapter.unembed.weight.data_ptr() == adapter.embed.weight.data_ptr()
    if shared:
        adapter.unembed.weight = torch.nn.Parameter(adapter.unembed.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return shared


def offset_strength(
    class_scores: np.ndarray, ordinary_max: np.ndarray, along: np.ndarray, margin: float
) -> float:
    """Smallest beta >= 0 with `max_c class_scores[i, c] + beta * along[i] >= ordinary_max[i] + margin` for all i.

    class_scores: (n, n_classes) float64 `W_c . h_i`; ordinary_max: (n,) largest ordinary-token logit;
    along: (n,) `u . h_i`, which must be positive on every row.
    """
    along = np.asarray(along, dtype=np.float64)
    if np.any(along <= 0):
        raise ValueError(
            f"cannot lift the refusal tokens above the vocabulary: {int(np.sum(along <= 0))} fit states point "
            "against their mean direction"
        )
    needed = (np.asarray(ordinary_max, np.float64) + margin - np.max(class_scores, axis=1)) / along
    return float(max(0.0, needed.max()))


def add_class_tokens(model: torch.nn.Module, tokenizer: Any, spec: RefusalTokenSpec) -> list[str]:
    """Add the spec's tokens the tokenizer lacks (as special tokens), grow the embedding matrices,
    and set the new input rows to the mean input embedding. Returns the tokens added."""
    adapter = ModelAdapter(model)
    vocab = tokenizer.get_vocab()
    missing = [t for t in spec.tokens.values() if t not in vocab]
    if not missing:
        return []
    old_rows = adapter.embed.weight.shape[0]
    mean_embedding = adapter.embed.weight.detach().double().mean(dim=0)
    tokenizer.add_tokens(missing, special_tokens=True)
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    adapter = ModelAdapter(model)  # resizing replaces the modules
    vocab = tokenizer.get_vocab()
    with torch.no_grad():
        for token in missing:
            adapter.embed.weight[vocab[token]] = mean_embedding.to(adapter.embed.weight.dtype)
    return missing


def write_class_rows(model: torch.nn.Module, token_ids: list[int], weights: np.ndarray) -> None:
    """Set unembedding rows `token_ids` to `weights (n_classes, d_model)` (and their bias to 0)."""
    adapter = ModelAdapter(model)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(token_ids), adapter.d_model):
        raise ValueError(f"class weights have shape {weights.shape}, expected ({len(token_ids)}, {adapter.d_model})")
    if not np.isfinite(weights).all():
        raise ValueError("class weights contain NaN or infinite values")
    head = adapter.unembed
    with torch.no_grad():
        head.weight[token_ids] = torch.from_numpy(weights).to(device=head.weight.device, dtype=head.weight.dtype)
        if getattr(head, "bias", None) is not None:
            head.bias[token_ids] = 0


def install_refusal_tokens(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: RefusalTokenSpec,
    class_weights: np.ndarray,
    offset_direction: np.ndarray,
    beta: float,
) -> dict[str, Any]:
    """Make `model`/`tokenizer` a refusal-token model, in place (see the module docstring).

    class_weights: (n_classes, d_model) float64 in class order; offset_direction: (d_model,) unit vector u;
    beta: offset strength. Returns `{"untied", "added_tokens", "token_ids"}`.
    """
    untied = untie_unembedding(model)
    added = add_class_tokens(model, tokenizer, spec)
    ids = spec.token_ids(tokenizer)
    rows = np.asarray(class_weights, np.float64) + beta * np.asarray(offset_direction, np.float64)[None, :]
    write_class_rows(model, ids, rows)
    return {"untied": untied, "added_tokens": added, "token_ids": ids}


def _make_readable(directory: Path) -> None:
    """Temporary folders and files are created private (0700 / 0600); give them the modes a plain
    `mkdir` / `open` would (0777 / 0666 minus the umask)."""
    mask = current_umask()
    os.chmod(directory, 0o777 & ~mask)
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~mask)


def save_refusal_token_model(
    model: torch.nn.Module, tokenizer: Any, spec: RefusalTokenSpec, out_dir: str | Path, report: Any
) -> Path:
    """Write model + tokenizer + `refusal_tokens.json` + `fit_report.json` into `out_dir` atomically.

    `report` is a `FitReport` (anything with `to_dict()`) or a plain dict. An existing `out_dir` is
    replaced only if it is empty or an earlier refusal-token model (holds `refusal_tokens.json`).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / SPEC_FILE).is_file():
        raise ValueError(f"refusing to overwrite {out_dir}: it is not empty and holds no {SPEC_FILE}")
    spec.token_ids(tokenizer)  # the tokens must exist before anything is written
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    old = None
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        spec.save(tmp)
        write_model_source(tmp, str(getattr(model.config, "name_or_path", "") or ""))
        write_json(tmp / REPORT_FILE, to_jsonable(report.to_dict() if hasattr(report, "to_dict") else report))
        if getattr(report, "head", None):
            save_numpy_tensors(tmp / HEAD_FILE, {k: np.asarray(v, np.float64) for k, v in report.head.items()})
        _make_readable(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old / "previous")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "previous").exists() and not out_dir.exists():
            os.replace(old / "previous", out_dir)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir


def load_refusal_head(model_dir: str | Path) -> dict[str, np.ndarray]:
    """The arrays of `refusal_head.safetensors`: `class_weights (n_classes, d_model)`,
    `offset_direction (d_model,)`, `offset_beta (1,)`, all float64."""
    return load_numpy_tensors(Path(model_dir) / HEAD_FILE, "refusal-token head")
