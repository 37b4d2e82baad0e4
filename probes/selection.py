"""Feature selection from L1 heads: per-class top-K, stability selection, and `features.json`
(`write_features_json` writes it, `read_features` is the one reader, with its checks).

A feature "belongs" to a class when its weight for that class is positive (class 0 = benign, so the
benign row of the head yields benign features). Stability selection refits the head on bootstrap
resamples of the extract rows (and optionally on several feature matrices, one per SAE seed) and
keeps the features selected in at least `threshold` of all fits.

Several feature matrices must share the meaning of their columns (the same residual coordinates,
or SAE latents already aligned across seeds); feature j of one matrix is counted as feature j of all.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from activations.progress import progress_bar

from activations.io import read_json, write_json
from activations.model_identity import check_same_model
from activations.records import CATEGORIES, PROBE_CLASSES, REFUSAL_CATEGORIES
from probes.heads import HeadResult, fit_l1_head, fit_resampled_heads
from probes.rows import LabelledRows, require_split


@dataclass(frozen=True)
class ClassSelection:
    """Selected features of one class, best first.

    feature_ids: (m,) int64 column indices; weights: (m,) float64 head weights (mean over fits for
    stability selection); frequency: (m,) float64 selection frequency in [0, 1] or None (single fit).
    """

    feature_ids: np.ndarray
    weights: np.ndarray
    frequency: np.ndarray | None = None


def top_k_features(head: HeadResult, k: int) -> dict[str, ClassSelection]:
    """Per class, the (at most) k features with the largest positive weight, best first."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    out = {}
    for i, name in enumerate(head.classes):
        w = head.coef[i]
        positive = np.flatnonzero(w > 0)
        order = positive[np.argsort(-w[positive], kind="stable")][:k]
        out[name] = ClassSelection(order.astype(np.int64), w[order].copy())
    return out


def activation_frequency(rows: LabelledRows, tau: float = 0.0,
                         categories: Sequence[str] = CATEGORIES) -> dict[str, np.ndarray]:
    """Per category present in `rows`: (d,) float64 fraction of its rows where the feature > tau."""
    out = {}
    for category in categories:
        mask = rows.category_mask(category)
        if mask.any():
            out[category] = np.mean(rows.features[mask] > tau, axis=0, dtype=np.float64)
    return out


@dataclass(eq=False)  # holds arrays: compare fields explicitly
class StabilityResult:
    """Outcome of stability selection.

    frequency: (n_classes, d) float64, fraction of fits in which the feature was selected for the class.
    mean_weight: (n_classes, d) float64, the feature's weight averaged over all fits.
    """

    classes: tuple[str, ...]
    frequency: np.ndarray
    mean_weight: np.ndarray
    n_fits: int
    threshold: float
    C: float
    top_k: int | None
    meta: dict[str, Any]

    def selections(self) -> dict[str, ClassSelection]:
        """Per class, the features with frequency >= threshold, by frequency then weight."""
        out = {}
        for i, name in enumerate(self.classes):
            ids = np.flatnonzero(self.frequency[i] >= self.threshold)
            order = np.lexsort((-self.mean_weight[i, ids], -self.frequency[i, ids]))
            ids = ids[order].astype(np.int64)
            out[name] = ClassSelection(ids, self.mean_weight[i, ids].copy(), self.frequency[i, ids].copy())
        return out


def _stratified_bootstrap(categories: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row indices resampled with replacement within each category (every category keeps its count)."""
    parts = []
    for category in np.unique(categories):
        idx = np.flatnonzero(categories == category)
        parts.append(rng.choice(idx, size=idx.size, replace=True))
    return np.concatenate(parts)


def _selected_mask(head: HeadResult, top_k: int | None) -> np.ndarray:
    """(n_classes, d) bool: positive weight, and among the class's top_k if given."""
    positive = head.coef > 0
    if top_k is None:
        return positive
    mask = np.zeros_like(positive)
    for i, sel in enumerate(top_k_features(head, top_k).values()):
        mask[i, sel.feature_ids] = True
    return mask


def stability_selection(
    rows: LabelledRows | Sequence[LabelledRows],
    C: float,
    *,
    n_bootstrap: int = 20,
    threshold: float = 0.6,
    top_k: int | None = None,
    classes: Sequence[str] = PROBE_CLASSES,
    seed: int = 0,
    **fit_kwargs: Any,
) -> StabilityResult:
    """Refit the L1 head on `n_bootstrap` stratified resamples of each extract feature matrix.

    `rows` is one LabelledRows or a list (one per SAE seed, equal column count). A feature counts as
    selected for class c in a fit when its class-c weight is positive (and in the top_k, if given).
    """
    matrices = [rows] if isinstance(rows, LabelledRows) else list(rows)
    if not matrices:
        raise ValueError("stability selection needs at least one feature matrix")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be >= 1, got {n_bootstrap}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    d = matrices[0].d
    for i, m in enumerate(matrices):
        require_split(m.splits, "extract", "stability selection")
        if m.d != d:
            raise ValueError(f"feature matrix {i} has {m.d} columns, matrix 0 has {d}")
    rng = np.random.default_rng(seed)
    counts = np.zeros((len(classes), d), dtype=np.float64)
    weight_sum = np.zeros((len(classes), d), dtype=np.float64)
    n_fits = len(matrices) * n_bootstrap
    batched = fit_kwargs.get("solver", "sklearn") == "torch"  # every resample of a matrix in one fit
    with progress_bar(total=n_fits, desc="stability selection", unit="fit") as bar:
        for m in matrices:
            draws = []  # (resample, saga seed), drawn in the same order for both solvers
            for _ in range(n_bootstrap):
                resample = m.subset(_stratified_bootstrap(m.categories, rng))
                draws.append((resample, int(rng.integers(2**31))))
                if not batched:
                    head = fit_l1_head(resample, C, classes=classes, seed=draws[-1][1], **fit_kwargs)
                    counts += _selected_mask(head, top_k)
                    weight_sum += head.coef
                    bar.update(1)
            if batched:
                for head in fit_resampled_heads([r for r, _ in draws], C, classes=classes, **fit_kwargs):
                    counts += _selected_mask(head, top_k)
                    weight_sum += head.coef
                bar.update(len(draws))
    meta = {"n_matrices": len(matrices), "n_bootstrap": n_bootstrap, "seed": seed,
            "splits": [m.provenance() for m in matrices]}
    return StabilityResult(tuple(classes), counts / n_fits, weight_sum / n_fits, n_fits,
                           float(threshold), float(C), top_k, meta)


def dense_everywhere(activation_freq: Mapping[str, np.ndarray], threshold: float) -> np.ndarray:
    """(d,) bool: features firing on more than `threshold` of the rows of EVERY category present
    (a dense latent, not a category feature)."""
    if not activation_freq:
        raise ValueError("no activation frequencies to flag dense features with")
    return np.min(np.stack([np.asarray(f, dtype=np.float64) for f in activation_freq.values()]), axis=0) > threshold


def split_dense(selections: Mapping[str, ClassSelection], dense: np.ndarray) -> tuple[dict[str, ClassSelection], dict[str, ClassSelection]]:
    """(selections without the `dense` (d,) features, the dense features each class had selected)."""
    kept, flagged = {}, {}
    for name, sel in selections.items():
        is_dense = dense[np.asarray(sel.feature_ids, dtype=np.int64)]
        pick = lambda m: ClassSelection(sel.feature_ids[m], sel.weights[m], None if sel.frequency is None else sel.frequency[m])  # noqa: E731
        kept[name], flagged[name] = pick(~is_dense), pick(is_dense)
    return kept, flagged


def write_features_json(
    path: str,
    selections: Mapping[str, ClassSelection],
    activation_freq: Mapping[str, np.ndarray],
    probe_eval: Mapping[str, Any] | None,
    meta: Mapping[str, Any],
    dense: Mapping[str, ClassSelection] | None = None,
) -> None:
    """Atomically write features.json.

    selections: per class, the chosen features (from `top_k_features` or `StabilityResult.selections`).
    activation_freq: per category, (d,) firing fraction (from `activation_frequency` on extract rows).
    probe_eval: `heads.evaluate_head(...)` on eval rows (accuracy and macro-F1 with 95% CIs), or None.
    meta: provenance (model, layer, space, tau, C, method, ...); must hold "splits" (e.g.
          `rows.provenance()` or `head.meta["splits"]`): the split hashes the selection was fitted on.
    dense: per class, the features the head chose but that fire everywhere (`split_dense`); they are
          listed under `dense_features` and are not the class's features.
    """
    if "splits" not in meta:
        raise ValueError("features.json metadata must record 'splits' (row counts and split hashes)")
    per_class = {}
    for name, sel in selections.items():
        ids = np.asarray(sel.feature_ids, dtype=np.int64)
        per_class[name] = {
            "feature_ids": ids,
            "weights": np.asarray(sel.weights, dtype=np.float64),
            "selection_frequency": None if sel.frequency is None else np.asarray(sel.frequency, dtype=np.float64),
            "activation_frequency": {cat: np.asarray(freq)[ids] for cat, freq in activation_freq.items()},
        }
        if dense is not None and name in dense:
            dense_ids = np.asarray(dense[name].feature_ids, dtype=np.int64)
            per_class[name]["dense_features"] = {
                "feature_ids": dense_ids, "weights": np.asarray(dense[name].weights, dtype=np.float64),
                "activation_frequency": {cat: np.asarray(freq)[dense_ids] for cat, freq in activation_freq.items()},
            }
    write_json(path, {
        "schema_version": 1,
        "classes": list(selections),
        "meta": dict(meta),
        "per_class": per_class,
        "probe_eval": None if probe_eval is None else dict(probe_eval),
    })


def read_features(path: str | Path, layer: int | None = None, sae_seed: int | None = None,
                  d_sae: int | None = None, space: str | None = "sae", what: str = "features.json",
                  model: Mapping[str, Any] | None = None, against: str = "the model") -> dict[str, Any]:
    """A `features.json` (a folder means its `features.json`), checked against what the caller holds.

    Checks, when given: the feature space ("sae" latents or "residual" units), the layer, the SAE
    seed it was selected on (latent ids of one seed mean nothing for another), the width, and the
    model (`model`: an identity record of `against`, `activations.model_identity`). Returns the
    parsed file with `"path"` added. `what` names the file in the error when it is missing.
    """
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / "features.json"
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise ValueError(f"{path} has no 'per_class' table; is it a features.json of `refusal-sae select`?")
    data = {**data, "path": str(path)}
    check_features(data, layer, sae_seed, d_sae, space, model, against)
    return data


def check_features(data: Mapping[str, Any], layer: int | None = None, sae_seed: int | None = None,
                   d_sae: int | None = None, space: str | None = "sae", model: Mapping[str, Any] | None = None,
                   against: str = "the model") -> None:
    """The checks of `read_features` on an already parsed features.json (see there)."""
    path = data.get("path", "features.json")
    if not isinstance(data.get("per_class"), dict):
        raise ValueError(f"{path} has no 'per_class' table; is it a features.json of `refusal-sae select`?")
    meta = data.get("meta") or {}
    if space is not None and meta.get("space", "sae") != space:
        raise ValueError(f"{path} selects {meta.get('space')} units, not {space} features")
    if layer is not None and meta.get("layer") is not None and int(meta["layer"]) != layer:
        raise ValueError(f"{path} was selected at layer {meta['layer']}, not layer {layer}")
    if sae_seed is not None and meta.get("sae_seed") is not None and int(meta["sae_seed"]) != sae_seed:
        raise ValueError(f"{path} was selected on SAE seed {meta['sae_seed']}, not on seed {sae_seed} "
                         "(latent ids differ between seeds)")
    width = meta.get("n_features", meta.get("d_sae"))
    if d_sae is not None and width is not None and int(width) != d_sae:
        raise ValueError(f"{path} has {width} features, but the SAE has d_sae {d_sae}")
    check_same_model(meta.get("model_identity"), str(path), model, against)


def class_feature_ids(features: Mapping[str, Any], classes: Sequence[str]) -> dict[str, list[int]]:
    """`{class: selected feature ids}` of a parsed features.json; every class must be present."""
    per_class = features["per_class"]
    missing = [c for c in classes if c not in per_class]
    if missing:
        raise ValueError(f"{features.get('path', 'features.json')} has no class {missing[0]!r}")
    return {c: [int(i) for i in per_class[c]["feature_ids"]] for c in classes}


def refusal_feature_ids(features: Mapping[str, Any]) -> list[int]:
    """Sorted union of the features selected for the refusal categories (not benign / contrast)."""
    ids = sorted({int(i) for name, entry in features["per_class"].items() if name in REFUSAL_CATEGORIES
                  for i in entry.get("feature_ids", [])})
    if not ids:
        raise ValueError(f"{features.get('path', 'features.json')} selects no features for any refusal category")
    return ids
