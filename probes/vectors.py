"""Steering vectors as value objects, and sets of them saved to one directory.

A `SteeringVector` is a residual-stream direction `vector` (d_model,) float32 at block `layer`, with
`meta` (model, layer, space "residual"|"sae", category, norm, source split hashes, method). It is
immutable; arithmetic returns new vectors:

    a + b, a - b   same layer and d_model (and model, when both name one) required
    -a, 2 * a, a * 2, a / 2

Steering adds `alpha * vector` to the output hidden state of block `layer` (arithmetic keeps the
subclass, e.g. `analysis.api.Vector`, whose `apply(model, alpha)` steers inside a `with` block).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from activations.io import load_torch_tensors, read_json, save_torch_tensors, write_json

_NAME = re.compile(r"^[A-Za-z0-9_.+\-]+$")


def _check_name(name: str) -> str:
    if not _NAME.match(name) or name in (".", ".."):
        raise ValueError(f"invalid vector name {name!r}: use letters, digits, '_', '.', '+', '-'")
    return name


def _is_scalar(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SteeringVector:
    """A direction (d_model,) float32 added to the residual stream after block `layer`."""

    vector: torch.Tensor
    layer: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        vec = self.vector
        if isinstance(vec, np.ndarray):
            vec = torch.from_numpy(np.ascontiguousarray(vec))
        if not isinstance(vec, torch.Tensor):
            raise ValueError(f"steering vector must be a torch tensor or numpy array, got {type(vec).__name__}")
        vec = vec.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
        if vec.ndim != 1 or vec.numel() == 0:
            raise ValueError(f"steering vector must have shape (d_model,), got {tuple(vec.shape)}")
        if not torch.isfinite(vec).all():
            raise ValueError("steering vector contains NaN or infinite values")
        if isinstance(self.layer, bool) or int(self.layer) != self.layer or self.layer < 0:
            raise ValueError(f"layer must be a non-negative integer, got {self.layer!r}")
        meta = dict(self.meta)
        if "layer" in meta and meta["layer"] != int(self.layer):
            raise ValueError(f"meta says layer {meta['layer']}, vector says layer {self.layer}")
        meta["layer"] = int(self.layer)
        meta["norm"] = float(torch.linalg.vector_norm(vec.double()))
        object.__setattr__(self, "vector", vec)
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "meta", meta)

    @property
    def d_model(self) -> int:
        return int(self.vector.numel())

    def norm(self) -> float:
        """Euclidean norm (computed in float64)."""
        return float(torch.linalg.vector_norm(self.vector.double()))

    def unit(self) -> "SteeringVector":
        """The same direction with norm 1 (ValueError for a zero vector)."""
        n = self.norm()
        if n == 0.0:
            raise ValueError("cannot normalise a zero steering vector")
        return self / n

    # ---------------------------------------------------------------- arithmetic
    def _check_compatible(self, other: "SteeringVector") -> None:
        if self.layer != other.layer:
            raise ValueError(f"cannot combine vectors of layer {self.layer} and layer {other.layer}")
        if self.d_model != other.d_model:
            raise ValueError(f"cannot combine vectors of d_model {self.d_model} and {other.d_model}")
        a, b = self.meta.get("model"), other.meta.get("model")
        if a is not None and b is not None and a != b:
            raise ValueError(f"cannot combine vectors of model {a!r} and model {b!r}")

    def _combine(self, other: "SteeringVector", op: str) -> "SteeringVector":
        self._check_compatible(other)
        vec = (self.vector.double() + other.vector.double()) if op == "+" else (self.vector.double() - other.vector.double())
        shared = {k: v for k, v in self.meta.items() if k not in ("norm", "operands") and other.meta.get(k) == v}
        cat_a, cat_b = self.meta.get("category", "?"), other.meta.get("category", "?")
        meta = {**shared, "category": shared.get("category", f"({cat_a}){op}({cat_b})"),
                "method": f"combination({op})", "operands": [self.meta, other.meta]}
        return type(self)(vec.float(), self.layer, meta)

    def _scaled(self, factor: float) -> "SteeringVector":
        if not math.isfinite(float(factor)):
            raise ValueError(f"cannot scale a steering vector by {factor}")
        meta = dict(self.meta)
        meta["scale"] = float(meta.get("scale", 1.0)) * float(factor)
        return type(self)((self.vector.double() * float(factor)).float(), self.layer, meta)

    def __add__(self, other: object) -> "SteeringVector":
        return self._combine(other, "+") if isinstance(other, SteeringVector) else NotImplemented

    def __sub__(self, other: object) -> "SteeringVector":
        return self._combine(other, "-") if isinstance(other, SteeringVector) else NotImplemented

    def __neg__(self) -> "SteeringVector":
        return self._scaled(-1.0)

    def __mul__(self, factor: float) -> "SteeringVector":
        return self._scaled(factor) if _is_scalar(factor) else NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> "SteeringVector":
        if not _is_scalar(divisor):
            return NotImplemented
        if float(divisor) == 0.0:
            raise ValueError("cannot divide a steering vector by zero")
        return self._scaled(1.0 / float(divisor))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        return self.layer == other.layer and torch.equal(self.vector, other.vector) and self.meta == other.meta

    __hash__ = None  # mutable-looking contents (tensor, dict): not hashable

    # ---------------------------------------------------------------- files
    def save(self, path_prefix: str | Path) -> None:
        """Write `<prefix>.safetensors` (the vector) and `<prefix>.json` (layer, d_model, meta)."""
        prefix = Path(path_prefix)
        _check_name(prefix.name)
        save_torch_tensors(prefix.with_name(prefix.name + ".safetensors"), {"vector": self.vector})
        write_json(prefix.with_name(prefix.name + ".json"),
                   {"schema_version": 1, "layer": self.layer, "d_model": self.d_model, "meta": self.meta})

    @classmethod
    def load(cls, path_prefix: str | Path, expected_layer: int | None = None,
             expected_d_model: int | None = None) -> "SteeringVector":
        """Read a vector written by `save`, checking layer / d_model when expected values are given."""
        prefix = Path(path_prefix)
        info = read_json(prefix.with_name(prefix.name + ".json"), "steering vector metadata")
        tensors = load_torch_tensors(prefix.with_name(prefix.name + ".safetensors"), "steering vector")
        if "vector" not in tensors:
            raise ValueError(f"steering vector file {prefix}.safetensors has no 'vector' tensor")
        vec = cls(tensors["vector"], int(info["layer"]), info.get("meta", {}))
        if vec.d_model != int(info.get("d_model", vec.d_model)):
            raise ValueError(f"steering vector {prefix}: JSON says d_model {info['d_model']}, tensor has {vec.d_model}")
        if expected_layer is not None and vec.layer != expected_layer:
            raise ValueError(f"steering vector {prefix} is for layer {vec.layer}, expected layer {expected_layer}")
        if expected_d_model is not None and vec.d_model != expected_d_model:
            raise ValueError(f"steering vector {prefix} has d_model {vec.d_model}, expected {expected_d_model}")
        return vec


class VectorSet(Mapping[str, SteeringVector]):
    """Category name -> SteeringVector, all of one layer and d_model; saved to one directory.

    Layout: `DIR/index.json` (names, layer, d_model) + `DIR/<name>.safetensors` / `DIR/<name>.json`.
    """

    def __init__(self, vectors: Mapping[str, SteeringVector]):
        self._vectors = {_check_name(str(k)): v for k, v in vectors.items()}
        if not self._vectors:
            raise ValueError("a VectorSet needs at least one vector")
        first = next(iter(self._vectors.values()))
        for name, v in self._vectors.items():
            if not isinstance(v, SteeringVector):
                raise ValueError(f"VectorSet entry {name!r} is not a SteeringVector")
            if v.layer != first.layer or v.d_model != first.d_model:
                raise ValueError(f"VectorSet entry {name!r} has layer {v.layer}/d_model {v.d_model}, "
                                 f"others layer {first.layer}/d_model {first.d_model}")

    def __getitem__(self, name: str) -> SteeringVector:
        if name not in self._vectors:
            raise KeyError(f"no steering vector for {name!r}; have {sorted(self._vectors)}")
        return self._vectors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._vectors)

    def __len__(self) -> int:
        return len(self._vectors)

    @property
    def layer(self) -> int:
        return next(iter(self._vectors.values())).layer

    @property
    def d_model(self) -> int:
        return next(iter(self._vectors.values())).d_model

    def save(self, directory: str | Path) -> None:
        """Write every vector, then the index (written last, so a complete index means a complete set)."""
        directory = Path(directory)
        for name, vec in self._vectors.items():
            vec.save(directory / name)
        write_json(directory / "index.json", {"schema_version": 1, "names": list(self._vectors),
                                              "layer": self.layer, "d_model": self.d_model})

    @classmethod
    def load(cls, directory: str | Path, expected_layer: int | None = None) -> "VectorSet":
        directory = Path(directory)
        index = read_json(directory / "index.json", "vector set index")
        return cls({name: SteeringVector.load(directory / name, expected_layer, int(index["d_model"]))
                    for name in index["names"]})
