"""Gates: per-row decisions whether (and toward which category) to steer, from features alone.

A gate is fitted on extract rows, tuned on calibrate rows (see `probes.gate_tuning`), saved as JSON
and applied to eval rows unchanged. `decide(features)` receives only a feature matrix
(batch, d): a gate never sees the dataset label. Each row gets an auditable `GateDecision`:

    category   the refusal category concerned, or "none"
    direction  "toward" (steer toward refusal of `category`), "away" (steer away from it), or "none"
    strength   steering coefficient magnitude >= 0 (the caller adds +strength * v_c for "toward",
               -strength * v_c for "away")
    scores     the gate's per-category scores for the row; thresholds: the thresholds applied.

Gates:
  DistanceGate: s_c = d_B / (d_B + d_c) with Euclidean distances of the row to the benign mean and to
    the mean of category c (extract means). c* = argmax_c s_c, s = s_{c*}. s >= t_high: toward c*,
    alpha_toward; s <= t_low: away from c*, alpha_away; in between: `partial` = "interpolate" (signed
    coefficient linear from -alpha_away at t_low to +alpha_toward at t_high) or a signed constant.
  ProbeGate: L1-head probabilities p_c with per-category thresholds; the passing category with the
    largest margin p_c - thr_c is steered toward (alpha_toward); otherwise "none" (or, with
    alpha_away > 0, away from the most probable category).

New gate kinds subclass `Gate` and register with `@register_gate` so `load_gate` can rebuild them.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from probes.heads import HeadResult
from activations.io import read_json, to_jsonable, write_json

NONE = "none"
DIRECTIONS = ("toward", "away", NONE)


@dataclass(frozen=True)
class GateDecision:
    """The gate's decision for one row of a batch (see the module docstring)."""

    row: int
    category: str
    direction: str
    strength: float
    scores: dict[str, float]
    thresholds: dict[str, float]

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"gate direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if not (self.strength >= 0 and math.isfinite(self.strength)):
            raise ValueError(f"gate strength must be finite and >= 0, got {self.strength}")

    @property
    def signed_strength(self) -> float:
        """+strength toward, -strength away, 0 for none."""
        return {"toward": self.strength, "away": -self.strength}.get(self.direction, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({"row": self.row, "category": self.category, "direction": self.direction,
                            "strength": self.strength, "scores": self.scores, "thresholds": self.thresholds})


_REGISTRY: dict[str, type["Gate"]] = {}


def register_gate(cls: type["Gate"]) -> type["Gate"]:
    """Class decorator: make a Gate subclass loadable by its `kind`."""
    _REGISTRY[cls.kind] = cls
    return cls


class Gate(ABC):
    """Base class: `decide` on features only, and a JSON round trip of all parameters."""

    kind: ClassVar[str] = ""

    @abstractmethod
    def decide(self, features: np.ndarray) -> list[GateDecision]:
        """One GateDecision per row of `features` (batch, d)."""

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """All parameters, JSON-ready."""

    @classmethod
    @abstractmethod
    def from_params(cls, params: dict[str, Any]) -> "Gate":
        """Rebuild from `params()`."""

    def to_json(self) -> dict[str, Any]:
        return to_jsonable({"schema_version": 1, "kind": self.kind, **self.params()})

    @staticmethod
    def from_json(data: dict[str, Any]) -> "Gate":
        kind = data.get("kind")
        if kind not in _REGISTRY:
            raise ValueError(f"unknown gate kind {kind!r}; known kinds: {sorted(_REGISTRY)}")
        params = {k: v for k, v in data.items() if k not in ("schema_version", "kind")}
        return _REGISTRY[kind].from_params(params)

    def save(self, path: str | Path) -> None:
        """Atomically write the gate as JSON."""
        write_json(path, self.to_json())


def load_gate(path: str | Path) -> Gate:
    """Read a gate written by `Gate.save`."""
    return Gate.from_json(read_json(path, "gate"))


def _batch(features: np.ndarray, d: int, what: str) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"{what} expects features of shape (batch, {d}), got {x.shape}")
    return x


@register_gate
@dataclass(eq=False)  # holds arrays: compare fields explicitly
class DistanceGate(Gate):
    """Distance-ratio gate; means (d,) float64 fitted on extract rows (see module docstring)."""

    kind: ClassVar[str] = "distance"
    benign_mean: np.ndarray
    category_means: dict[str, np.ndarray]
    t_low: float = 0.45
    t_high: float = 0.55
    alpha_toward: float = 1.0
    alpha_away: float = 1.0
    partial: str | float = "interpolate"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.benign_mean = np.asarray(self.benign_mean, dtype=np.float64)
        self.category_means = {str(c): np.asarray(m, dtype=np.float64) for c, m in self.category_means.items()}
        if not self.category_means:
            raise ValueError("distance gate needs at least one category mean")
        for c, m in self.category_means.items():
            if m.shape != self.benign_mean.shape or m.ndim != 1:
                raise ValueError(f"distance gate mean of {c!r} has shape {m.shape}, benign mean {self.benign_mean.shape}")
        if not 0.0 <= self.t_low <= self.t_high <= 1.0:
            raise ValueError(f"need 0 <= t_low <= t_high <= 1, got t_low={self.t_low}, t_high={self.t_high}")
        if self.alpha_toward < 0 or self.alpha_away < 0:
            raise ValueError("distance gate strengths alpha_toward / alpha_away must be >= 0")
        if self.partial != "interpolate" and not (isinstance(self.partial, (int, float)) and math.isfinite(self.partial)):
            raise ValueError(f"partial must be 'interpolate' or a finite number, got {self.partial!r}")

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(self.category_means)

    def scores(self, features: np.ndarray) -> np.ndarray:
        """s_c = d_B / (d_B + d_c), shape (batch, n_categories); 0.5 where both distances are 0."""
        x = _batch(features, self.benign_mean.shape[0], "distance gate")
        d_b = np.linalg.norm(x - self.benign_mean, axis=1)[:, None]
        d_c = np.stack([np.linalg.norm(x - m, axis=1) for m in self.category_means.values()], axis=1)
        total = d_b + d_c
        return np.where(total > 0, d_b / np.where(total > 0, total, 1.0), 0.5)

    def coefficient(self, s: float) -> float:
        """Signed steering coefficient for a top score s (positive = toward refusal)."""
        if s >= self.t_high:
            return self.alpha_toward
        if s <= self.t_low:
            return -self.alpha_away
        if self.partial == "interpolate":
            frac = (s - self.t_low) / (self.t_high - self.t_low)
            return -self.alpha_away + frac * (self.alpha_toward + self.alpha_away)
        return float(self.partial)

    def decisions_from_scores(self, scores: np.ndarray) -> list[GateDecision]:
        """Decisions for precomputed `scores(...)` (lets a tuner reuse one score matrix)."""
        names = self.categories
        thresholds = {"t_low": float(self.t_low), "t_high": float(self.t_high)}
        out = []
        for row, s_row in enumerate(np.asarray(scores, dtype=np.float64)):
            best = int(np.argmax(s_row))
            coef = self.coefficient(float(s_row[best]))
            direction = "toward" if coef > 0 else "away" if coef < 0 else NONE
            out.append(GateDecision(row, names[best] if direction != NONE else NONE, direction, abs(coef),
                                    {c: float(v) for c, v in zip(names, s_row)}, thresholds))
        return out

    def decide(self, features: np.ndarray) -> list[GateDecision]:
        return self.decisions_from_scores(self.scores(features))

    def params(self) -> dict[str, Any]:
        return {"benign_mean": self.benign_mean, "category_means": self.category_means, "t_low": self.t_low,
                "t_high": self.t_high, "alpha_toward": self.alpha_toward, "alpha_away": self.alpha_away,
                "partial": self.partial, "meta": self.meta}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "DistanceGate":
        try:
            return cls(**params)
        except TypeError as err:
            raise ValueError(f"bad distance gate parameters: {err}") from None


@register_gate
@dataclass(eq=False)  # holds arrays: compare fields explicitly
class ProbeGate(Gate):
    """Threshold gate on the probabilities of a multinomial L1 head (see module docstring)."""

    kind: ClassVar[str] = "probe"
    head: HeadResult
    thresholds: dict[str, float]
    alpha_toward: float = 1.0
    alpha_away: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.head, dict):
            self.head = HeadResult.from_dict(self.head)
        self.thresholds = {str(c): float(t) for c, t in self.thresholds.items()}
        missing = sorted(set(self.thresholds) - set(self.head.classes))
        if missing or not self.thresholds:
            raise ValueError(f"probe gate thresholds name categories {missing} the head lacks (head: {self.head.classes})")
        if self.alpha_toward < 0 or self.alpha_away < 0:
            raise ValueError("probe gate strengths alpha_toward / alpha_away must be >= 0")

    def decide(self, features: np.ndarray) -> list[GateDecision]:
        x = _batch(features, self.head.n_features, "probe gate")
        names = tuple(self.thresholds)
        columns = [self.head.classes.index(c) for c in names]
        probs = self.head.predict_proba(x)[:, columns]  # (batch, n_categories)
        margins = probs - np.array([self.thresholds[c] for c in names])
        out = []
        for row in range(x.shape[0]):
            scores = {c: float(p) for c, p in zip(names, probs[row])}
            passing = np.flatnonzero(margins[row] >= 0)
            if passing.size:
                best = int(passing[np.argmax(margins[row, passing])])
                out.append(GateDecision(row, names[best], "toward", self.alpha_toward, scores, dict(self.thresholds)))
            elif self.alpha_away > 0:
                best = int(np.argmax(probs[row]))
                out.append(GateDecision(row, names[best], "away", self.alpha_away, scores, dict(self.thresholds)))
            else:
                out.append(GateDecision(row, NONE, NONE, 0.0, scores, dict(self.thresholds)))
        return out

    def params(self) -> dict[str, Any]:
        return {"head": self.head.to_dict(), "thresholds": self.thresholds, "alpha_toward": self.alpha_toward,
                "alpha_away": self.alpha_away, "meta": self.meta}

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "ProbeGate":
        try:
            return cls(**params)
        except TypeError as err:
            raise ValueError(f"bad probe gate parameters: {err}") from None
