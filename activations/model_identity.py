"""Which model an artifact belongs to: a weights fingerprint recorded where artifacts are made, and
checked wherever two of them meet (store ↔ SAE ↔ features.json ↔ steering vectors ↔ a loaded model).

`model_identity(model, name)` is the record: id (for people; never compared), family, revision,
num_layers, d_model, compute dtype and two fingerprints of the weights — `weights_fingerprint`
(the values in their own dtype) and `weights_fingerprint_bf16` (the same values rounded to
bfloat16, so one model run in float32 on a CPU and in bfloat16 on a GPU is recognised). Moving or
renaming a model folder keeps its identity.

`model_mismatch(a, b)` says why two records name different models (None when they agree or one
of them carries no fingerprint); `check_same_model` turns that into one ValueError.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

STRUCTURE_KEYS = ("family", "num_layers", "d_model")
"""Identity keys compared besides the fingerprints (`id` and `revision` are for people)."""


def _samples(model: torch.nn.Module, sample: int) -> tuple[list[str], torch.Tensor]:
    """Per parameter `name|shape|dtype`, and its first and last `sample` values concatenated (float32, CPU)."""
    labels, values = [], []
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        values.append(torch.cat([flat[:sample], flat[-sample:]]).float())
        labels.append(f"{name}|{tuple(param.shape)}|{param.dtype}|")
    return labels, torch.cat(values).cpu()  # one device→host copy


def weights_fingerprint(model: torch.nn.Module, sample: int = 256, as_bfloat16: bool = False) -> str:
    """Cheap identity of the weights: sha256 over each parameter's name, shape, dtype and first and
    last `sample` values (two random models of one config, or one model in two dtypes, differ).

    `as_bfloat16`: the values rounded to bfloat16 and the dtype left out, so the fingerprint of a
    float32 model equals that of the same weights loaded in bfloat16.
    """
    return _fingerprint(*_samples(model, sample), as_bfloat16)


def _fingerprint(labels: list[str], values: torch.Tensor, as_bfloat16: bool) -> str:
    digest = hashlib.sha256()
    for label in labels:
        digest.update((label.rsplit("|", 2)[0] + "|" if as_bfloat16 else label).encode())
    if as_bfloat16:
        values = values.to(torch.bfloat16).view(torch.int16)
    digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:32]


def model_identity(model: torch.nn.Module, name: str) -> dict[str, Any]:
    """The identity record of a loaded model (`name` as the user gave it, kept for display)."""
    config = model.config
    samples = _samples(model, 256)  # one pass over the parameters for both fingerprints
    return {
        "id": name,
        "family": getattr(config, "model_type", "unknown"),
        "revision": getattr(config, "_commit_hash", None),
        "num_layers": int(config.num_hidden_layers),
        "d_model": int(config.hidden_size),
        "compute_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "weights_fingerprint": _fingerprint(*samples, as_bfloat16=False),
        "weights_fingerprint_bf16": _fingerprint(*samples, as_bfloat16=True),
    }


def comparable(info: Mapping[str, Any] | None) -> dict[str, Any]:
    """The part of an identity record that decides whether two records name one model: everything
    but the id (a path or hub id) when a fingerprint is recorded, else the whole record."""
    info = dict(info or {})
    if info.get("weights_fingerprint"):
        info.pop("id", None)
    return info


def model_mismatch(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> str | None:
    """Why records `a` and `b` name different models, or None (same model, or not decidable)."""
    if not a or not b or not a.get("weights_fingerprint") or not b.get("weights_fingerprint"):
        return None
    for key in STRUCTURE_KEYS:
        if key in a and key in b and a[key] != b[key]:
            return f"{key} {a[key]!r} vs {b[key]!r}"
    dtype_a, dtype_b = a.get("compute_dtype"), b.get("compute_dtype")
    if dtype_a == dtype_b:
        same = a["weights_fingerprint"] == b["weights_fingerprint"]
    elif "float16" in (dtype_a, dtype_b) or not (a.get("weights_fingerprint_bf16") and b.get("weights_fingerprint_bf16")):
        return None  # float16 rounds differently from bfloat16: the fingerprints cannot be compared
    else:
        same = a["weights_fingerprint_bf16"] == b["weights_fingerprint_bf16"]
    if same:
        return None
    return f"weights fingerprint {a['weights_fingerprint'][:12]}… vs {b['weights_fingerprint'][:12]}…"


def check_same_model(a: Mapping[str, Any] | None, a_what: str, b: Mapping[str, Any] | None, b_what: str) -> None:
    """ValueError when two artifacts (described as `a_what`, `b_what`) come from different models."""
    why = model_mismatch(a, b)
    if why is not None:
        raise ValueError(f"{a_what} belongs to model {(a or {}).get('id')!r} and {b_what} to model "
                         f"{(b or {}).get('id')!r}, and they are different models ({why}); use artifacts of one model")
