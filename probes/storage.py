"""Atomic file writes and safe reads for probe artifacts (JSON and safetensors, never pickle).

Every writer writes to a temporary file in the destination folder and then `os.replace`s it,
so a reader never sees a half-written artifact.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from activations.atomic import atomic_write as _atomic_write
from activations.jsonio import read_json

__all__ = ["read_json", "to_jsonable", "write_json", "save_numpy_tensors", "load_numpy_tensors", "save_torch_tensors", "load_torch_tensors"]


def to_jsonable(obj: Any) -> Any:
    """Convert numpy / torch scalars and arrays (recursively) into plain JSON types.

    Raises ValueError on NaN or infinity, which JSON cannot hold faithfully.
    """
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        if not math.isfinite(value):
            raise ValueError(f"cannot write a non-finite number ({value}) to JSON")
        return value
    if hasattr(obj, "tolist") and hasattr(obj, "detach"):  # torch tensor
        return to_jsonable(obj.detach().cpu().tolist())
    if obj is None or isinstance(obj, str):
        return obj
    raise ValueError(f"cannot write an object of type {type(obj).__name__} to JSON")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write `obj` as indented JSON (numpy values converted, NaN refused)."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"

    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    return _atomic_write(path, _write)


def save_numpy_tensors(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """Atomically write numpy arrays to a safetensors file."""
    from safetensors.numpy import save_file

    contiguous = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    return _atomic_write(path, lambda tmp: save_file(contiguous, tmp))


def load_numpy_tensors(path: str | os.PathLike, what: str) -> dict[str, np.ndarray]:
    """Read every array of a safetensors file as numpy (no pickle involved)."""
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return load_file(str(path))


def save_torch_tensors(path: str | os.PathLike, tensors: dict[str, Any]) -> Path:
    """Atomically write torch tensors to a safetensors file."""
    from safetensors.torch import save_file

    contiguous = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    return _atomic_write(path, lambda tmp: save_file(contiguous, tmp))


def load_torch_tensors(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """Read every tensor of a safetensors file on CPU."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return load_file(str(path), device="cpu")
