"""L1-penalised logistic heads on features (residual activations or SAE latents).

- `fit_l1_head`: multinomial head over PROBE_CLASSES (benign + 5 refusal categories), fitted on
  extract rows with a pure L1 penalty: scikit-learn's saga (`solver="sklearn"`, the reference) or
  batched FISTA in torch on any device (`solver="torch"`, `probes/l1_solver.py`: the same objective).
  `fit_l1_heads` fits several C values at once.
- `select_l1_head`: the same, with C chosen from a grid by macro-F1 on calibrate rows.
- `fit_ovr_heads`: one binary L1 head per refusal category (category vs everything else).
- `HeadResult`: coefficients in float64, `predict_proba`, save/load as safetensors + JSON.

Coefficients live in the (optionally) standardised feature space: `logits = ((x - mean) / scale) @
coef.T + intercept`; `raw_coef()` gives the equivalent weights on unstandardised features.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from activations.records import BENIGN, CONTRAST, PROBE_CLASSES, REFUSAL_CATEGORIES
from probes.metrics import classification_summary, macro_f1
from probes.rows import LabelledRows, probe_targets, require_split
from activations.io import load_numpy_tensors, read_json, save_numpy_tensors, write_json

DEFAULT_C_GRID: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
"""Inverse L1 strengths tried by `select_l1_head` (small C = sparser head)."""

REST = "rest"
"""Name of the negative class of a one-vs-rest head."""


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


def _require_l1_sklearn() -> None:
    import sklearn

    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    if (major, minor) < (1, 8):
        raise ImportError(f"probes need scikit-learn >= 1.8 (pure L1 via l1_ratio=1), found {sklearn.__version__}")


SPARSE_DENSITY = 0.1
"""Feature matrices with fewer non-zeros than this (SAE latents) are fitted in sparse form."""


def _scaler(x: np.ndarray, standardize: bool, center: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Float64 column mean and std of x (n, d); std 0 becomes 1. Identity stats if not standardising.

    With `center=False` the mean is reported as 0 (scale-only standardisation keeps zeros zero).
    """
    d = x.shape[1]
    if not standardize:
        return np.zeros(d), np.ones(d)
    mean = np.mean(x, axis=0, dtype=np.float64)
    std = np.std(x, axis=0, dtype=np.float64)
    return (mean if center else np.zeros(d)), np.where(std > 0, std, 1.0)


def _design_matrix(x: np.ndarray, mean: np.ndarray, scale: np.ndarray, sparse: bool) -> Any:
    """Standardised features; a CSR matrix when `sparse` (saga's cost then scales with the non-zeros)."""
    if not sparse:
        return (x - mean) / scale
    from scipy.sparse import csr_matrix

    return csr_matrix(x / scale)


def _fit_logistic(x: np.ndarray, y: np.ndarray, C: float, max_iter: int, tol: float, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Pure-L1 saga logistic regression; returns (coef (k or 1, d), intercept, converged)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if not (C > 0 and np.isfinite(C)):
        raise ValueError(f"C must be a positive finite number, got {C}")
    model = LogisticRegression(C=C, l1_ratio=1.0, solver="saga", max_iter=max_iter, tol=tol, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return model.coef_.astype(np.float64), model.intercept_.astype(np.float64), converged


SOLVERS = ("sklearn", "torch")


def _prepare(rows: LabelledRows, classes: Sequence[str], contrast_as: str, standardize: bool) -> tuple[Any, ...]:
    """(x float64 (n, d), targets (n,), class counts, sparse, mean, scale) of extract rows for a head."""
    require_split(rows.splits, "extract", "L1 head")
    y, keep = probe_targets(rows.categories, classes, contrast_as)
    counts = np.bincount(y, minlength=len(classes))
    empty = [classes[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise ValueError(f"L1 head: classes {empty} have no extract rows")
    x = np.asarray(rows.features[keep], dtype=np.float64)
    # Mostly-zero features (SAE latents) are scaled but not centred, and fitted as a sparse matrix:
    # the same L1 problem up to the intercept, at a cost proportional to the non-zeros.
    sparse = bool(np.count_nonzero(x) < SPARSE_DENSITY * x.size)
    mean, scale = _scaler(x, standardize, center=not sparse)
    return x, y, counts, sparse, mean, scale


def _torch_fits(designs: list[np.ndarray], targets: list[np.ndarray], Cs: Sequence[float], n_classes: int,
                max_iter: int, tol: float, device: str | None) -> Any:
    """One batched torch fit: problem i has design `designs[i]` (or all share `designs[0]`)."""
    import torch

    from probes.l1_solver import fit_l1_logistic

    for C in Cs:
        if not (C > 0 and np.isfinite(C)):
            raise ValueError(f"C must be a positive finite number, got {C}")
    dev = torch.device(device or "cpu")
    x = torch.from_numpy(np.stack(designs) if len(designs) > 1 else designs[0]).to(dev, torch.float32)
    y = torch.from_numpy(np.stack(targets)).to(dev)
    return fit_l1_logistic(x, y, torch.tensor([float(c) for c in Cs]), n_classes, binary=n_classes == 2,
                           max_iter=max_iter, tol=tol)


def _as_head(coef: np.ndarray, intercept: np.ndarray, C: float, mean: np.ndarray, scale: np.ndarray,
             info: dict[str, Any], classes: Sequence[str]) -> HeadResult:
    if coef.shape[0] == 1:  # two classes: one row for the positive class
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.array([0.0, intercept[0]])
    return HeadResult(coef, intercept, tuple(classes), float(C), mean, scale, info)


def fit_l1_heads(
    rows: LabelledRows,
    Cs: Sequence[float],
    *,
    classes: Sequence[str] = PROBE_CLASSES,
    contrast_as: str = "benign",
    standardize: bool = True,
    max_iter: int = 2000,
    tol: float = 1e-4,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
    solver: str = "sklearn",
    device: str | None = None,
) -> list[HeadResult]:
    """One L1 head per C in `Cs` on the same extract rows (see `fit_l1_head`); the torch solver fits
    them together. `max_iter`, `tol`: saga epochs and its coefficient-change tolerance, or FISTA
    iterations and its gradient-mapping tolerance (`probes/l1_solver.py`)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    if solver == "sklearn":
        _require_l1_sklearn()
    x, y, counts, sparse, mean, scale = _prepare(rows, classes, contrast_as, standardize)
    design = _design_matrix(x, mean, scale, sparse)
    info = {
        "kind": "multinomial" if len(classes) > 2 else "binary", "contrast_as": contrast_as,
        "standardize": standardize, "centered": not sparse, "sparse_fit": sparse, "class_counts": counts.tolist(),
        "solver": solver, "splits": rows.provenance(), **(meta or {}),
    }
    if solver == "torch":
        dense = design.toarray() if sparse else design
        fit = _torch_fits([dense], [y] * len(Cs), Cs, len(classes), max_iter, tol, device)
        return [_as_head(fit.coef[i], fit.intercept[i], C, mean, scale, {**info, "converged": bool(fit.converged[i])},
                         classes) for i, C in enumerate(Cs)]
    heads = []
    for C in Cs:
        coef, intercept, converged = _fit_logistic(design, y, C, max_iter, tol, seed)
        heads.append(_as_head(coef, intercept, C, mean, scale, {**info, "converged": converged}, classes))
    return heads


def fit_l1_head(rows: LabelledRows, C: float = 1.0, **kwargs: Any) -> HeadResult:
    """Fit a multinomial L1 head on extract rows (features (n, d)) over `classes` (class 0 benign).

    Keywords as `fit_l1_heads` (classes, contrast_as, standardize, max_iter, tol, seed, meta,
    solver, device). Contrast rows count as benign unless `contrast_as="drop"`. Every class needs at
    least one row.
    """
    return fit_l1_heads(rows, [C], **kwargs)[0]


def fit_resampled_heads(resamples: list[LabelledRows], C: float, *, classes: Sequence[str] = PROBE_CLASSES,
                        contrast_as: str = "benign", standardize: bool = True, max_iter: int = 2000,
                        tol: float = 1e-4, device: str | None = None, **_: Any) -> list[HeadResult]:
    """Torch solver: one head per resample of extract rows (each standardised on its own rows), all
    solved together (stability selection). The resamples must have the same number of rows."""
    prepared = [_prepare(r, classes, contrast_as, standardize) for r in resamples]
    designs = []
    for x, _, _, sparse, mean, scale in prepared:
        design = _design_matrix(x, mean, scale, sparse)
        designs.append(design.toarray() if sparse else design)
    fit = _torch_fits(designs, [p[1] for p in prepared], [C] * len(resamples), len(classes), max_iter, tol, device)
    return [_as_head(fit.coef[i], fit.intercept[i], C, p[4], p[5], {"converged": bool(fit.converged[i])}, classes)
            for i, p in enumerate(prepared)]


def _score_on(head: HeadResult, rows: LabelledRows, contrast_as: str) -> float:
    y, keep = probe_targets(rows.categories, head.classes, contrast_as)
    return macro_f1(y, head.predict(rows.features[keep]), len(head.classes))


def select_l1_head(
    extract: LabelledRows,
    calibrate: LabelledRows,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    **fit_kwargs: Any,
) -> HeadResult:
    """Fit one head per C on extract, keep the C with the best calibrate macro-F1 (ties: smaller C).

    `meta["c_scores"]` records every C with its calibrate macro-F1.
    """
    require_split(calibrate.splits, "calibrate", "L1 head C selection")
    if not c_grid:
        raise ValueError("c_grid is empty")
    if extract.d != calibrate.d:
        raise ValueError(f"extract rows have {extract.d} features, calibrate rows {calibrate.d}")
    contrast_as = fit_kwargs.get("contrast_as", "benign")
    best: HeadResult | None = None
    scores: list[dict[str, float]] = []
    for head in fit_l1_heads(extract, sorted(float(c) for c in c_grid), **fit_kwargs):
        score = _score_on(head, calibrate, contrast_as)
        scores.append({"C": head.C, "calibrate_macro_f1": score})
        if best is None or score > best.meta["calibrate_macro_f1"]:
            best = head
            best.meta["calibrate_macro_f1"] = score
    assert best is not None
    best.meta["c_scores"] = scores
    best.meta["splits"] = {**extract.provenance(), **calibrate.provenance()}
    return best


def _one_vs_rest_rows(rows: LabelledRows, category: str) -> LabelledRows:
    """Relabel rows for a binary head: `category` stays, contrast stays, everything else -> benign."""
    keep = np.isin(rows.categories, [category, CONTRAST])
    return rows.with_categories(np.where(keep, rows.categories, BENIGN))


def fit_ovr_heads(
    extract: LabelledRows,
    calibrate: LabelledRows | None = None,
    c_grid: Sequence[float] = DEFAULT_C_GRID,
    C: float = 1.0,
    categories: Sequence[str] = REFUSAL_CATEGORIES,
    **fit_kwargs: Any,
) -> dict[str, HeadResult]:
    """One binary L1 head per category: rows of the category vs all other rows (contrast included).

    The negative class is stored as "rest". With `calibrate` rows, C is chosen per category from
    `c_grid` by calibrate macro-F1 of the two classes; else `C` is used.
    """
    heads: dict[str, HeadResult] = {}
    for category in categories:
        classes = (BENIGN, category)
        ext = _one_vs_rest_rows(extract, category)
        if calibrate is None:
            head = fit_l1_head(ext, C, classes=classes, **fit_kwargs)
        else:
            head = select_l1_head(ext, _one_vs_rest_rows(calibrate, category), c_grid, classes=classes, **fit_kwargs)
        head.classes = (REST, category)
        head.meta.update({"kind": "one_vs_rest", "positive": category, "splits": {
            **extract.provenance(), **(calibrate.provenance() if calibrate is not None else {})}})
        heads[category] = head
    return heads


def evaluate_head(head: HeadResult, eval_rows: LabelledRows, contrast_as: str = "benign",
                  n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Accuracy (Wilson 95%) and macro-F1 (bootstrap 95%) of a multinomial head on eval rows."""
    require_split(eval_rows.splits, "eval", "head evaluation")
    if REST in head.classes:
        raise ValueError("evaluate_head expects a multinomial head, got a one-vs-rest head")
    y, keep = probe_targets(eval_rows.categories, head.classes, contrast_as)
    summary = classification_summary(y, head.predict(eval_rows.features[keep]), head.classes, n_boot, seed)
    summary["eval"] = eval_rows.provenance().get("eval", {})
    return summary
