"""`HeadResult`: a fitted logistic head (coefficients in float64, predictions, save / load)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from activations.io import load_numpy_tensors, read_json, save_numpy_tensors, write_json


@dataclass(eq=False)  # holds arrays: compare fields explicitly
class HeadResult:
    """A fitted logistic head.

    coef:         (n_classes, n_features) float64 weights on standardised features.
    intercept:    (n_classes,) float64.
    classes:      class names; row i of `coef` scores class i.
    C:            the inverse L1 strength used.
    scaler_mean:  (n_features,) float64 mean subtracted before the head (zeros if not standardised).
    scaler_scale: (n_features,) float64 divisor (ones if not standardised).
    meta:         provenance (split hashes, space, layer, C scores, contrast handling, ...).

    A one-vs-rest head has classes ("rest", category), with a zero row for "rest", so softmax over
    the two rows equals the sigmoid of the binary logistic model.
    """

    coef: np.ndarray
    intercept: np.ndarray
    classes: tuple[str, ...]
    C: float
    scaler_mean: np.ndarray
    scaler_scale: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.coef = np.ascontiguousarray(self.coef, dtype=np.float64)  # fixed layout: reproducible BLAS sums
        self.intercept = np.asarray(self.intercept, dtype=np.float64)
        self.scaler_mean = np.asarray(self.scaler_mean, dtype=np.float64)
        self.scaler_scale = np.asarray(self.scaler_scale, dtype=np.float64)
        self.classes = tuple(str(c) for c in self.classes)
        k, d = self.coef.shape
        if len(self.classes) != k or self.intercept.shape != (k,):
            raise ValueError(f"head has {k} coefficient rows but {len(self.classes)} classes / intercept {self.intercept.shape}")
        if self.scaler_mean.shape != (d,) or self.scaler_scale.shape != (d,):
            raise ValueError(f"head scaler stats must have shape ({d},)")
        if np.any(self.scaler_scale <= 0):
            raise ValueError("head scaler_scale must be positive")

    @property
    def n_features(self) -> int:
        return int(self.coef.shape[1])

    def _standardise(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"head expects features of shape (batch, {self.n_features}), got {x.shape}")
        return (x - self.scaler_mean) / self.scaler_scale

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        """Logits (batch, n_classes) for features (batch, n_features)."""
        return self._standardise(features) @ self.coef.T + self.intercept

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Softmax class probabilities (batch, n_classes), float64."""
        logits = self.decision_function(features)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predicted class index (batch,) int64."""
        return np.argmax(self.decision_function(features), axis=1).astype(np.int64)

    def raw_coef(self) -> np.ndarray:
        """Weights (n_classes, n_features) on unstandardised features (coef / scale)."""
        return self.coef / self.scaler_scale

    def to_dict(self) -> dict[str, Any]:
        """Everything, as JSON-ready lists (used to embed a head into a gate's JSON)."""
        return {
            "classes": list(self.classes), "C": self.C, "meta": self.meta,
            "coef": self.coef, "intercept": self.intercept,
            "scaler_mean": self.scaler_mean, "scaler_scale": self.scaler_scale,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadResult":
        try:
            return cls(
                coef=np.asarray(data["coef"], dtype=np.float64), intercept=data["intercept"],
                classes=tuple(data["classes"]), C=float(data["C"]), scaler_mean=data["scaler_mean"],
                scaler_scale=data["scaler_scale"], meta=dict(data.get("meta", {})),
            )
        except KeyError as err:
            raise ValueError(f"head description lacks the key {err.args[0]!r}") from None

    def save(self, path_prefix: str) -> None:
        """Write `<prefix>.safetensors` (arrays, float64) and `<prefix>.json` (classes, C, meta)."""
        save_numpy_tensors(f"{path_prefix}.safetensors", {
            "coef": self.coef, "intercept": self.intercept,
            "scaler_mean": self.scaler_mean, "scaler_scale": self.scaler_scale,
        })
        write_json(f"{path_prefix}.json", {
            "schema_version": 1, "kind": "l1_logistic_head", "classes": list(self.classes),
            "C": self.C, "n_features": self.n_features, "meta": self.meta,
        })

    @classmethod
    def load(cls, path_prefix: str) -> "HeadResult":
        """Read a head written by `save`."""
        info = read_json(f"{path_prefix}.json", "head metadata")
        arrays = load_numpy_tensors(f"{path_prefix}.safetensors", "head weights")
        missing = {"coef", "intercept", "scaler_mean", "scaler_scale"} - set(arrays)
        if missing:
            raise ValueError(f"head weights {path_prefix}.safetensors lack arrays {sorted(missing)}")
        head = cls(classes=tuple(info["classes"]), C=float(info["C"]), meta=info.get("meta", {}),
                   **{name: arrays[name] for name in ("coef", "intercept", "scaler_mean", "scaler_scale")})
        if head.n_features != int(info.get("n_features", head.n_features)):
            raise ValueError(f"head {path_prefix}: JSON says {info['n_features']} features, weights have {head.n_features}")
        return head
