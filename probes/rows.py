"""Labelled rows, the probes package's data protocol: which rows a fit may see, how they are labelled,
and how they are read from an activation store (one last-token row per prompt).

Fitting uses `extract` rows, tuning uses `calibrate` rows, reporting uses `eval` rows. Every fit or
tune function receives a `LabelledRows` and calls `require_split` on it first, so a caller that
passes rows of the wrong split gets one clear error instead of a leaky result. Every artifact records
`split_hash` of the row ids it was fitted on.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from activations.records import BENIGN, CATEGORIES, CONTRAST, PROBE_CLASSES, SPLITS
from activations.store import ActivationStore, RowMeta

CONTRAST_MODES = ("benign", "drop")
"""How contrast rows enter a head: counted as benign, or left out."""


def require_split(split_labels: np.ndarray, expected: str, what: str) -> None:
    """Raise ValueError unless every row of `split_labels` (n,) is from split `expected`.

    `what` names the object being fitted, e.g. "L1 head"; the message reads
    "<what> must be fitted on the 'extract' split, got rows from 'eval'".
    """
    if expected not in SPLITS:
        raise ValueError(f"unknown split {expected!r}; expected one of {', '.join(SPLITS)}")
    labels = np.asarray(split_labels).astype(str)
    if labels.size == 0:
        raise ValueError(f"{what} got no rows (expected rows from the {expected!r} split)")
    wrong = sorted(set(np.unique(labels).tolist()) - {expected})
    if wrong:
        got = ", ".join(repr(w) for w in wrong)
        raise ValueError(f"{what} must be fitted on the {expected!r} split, got rows from {got}")


def split_hash(ids: Iterable[str]) -> str:
    """sha256 hex digest of the sorted row ids joined by newlines (order-independent)."""
    ordered = sorted(str(i) for i in ids)
    return hashlib.sha256("\n".join(ordered).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class LabelledRows:
    """Feature rows with their category, split and id.

    features:   (n, d) floating array (residual activations or SAE latents); kept as given,
                statistics are computed in float64.
    categories: (n,) str, each one of CATEGORIES.
    splits:     (n,) str, each one of SPLITS.
    ids:        (n,) str prompt ids (used for `split_hash`).
    """

    features: np.ndarray
    categories: np.ndarray
    splits: np.ndarray
    ids: np.ndarray

    def __post_init__(self) -> None:
        features = np.asarray(self.features)
        if features.ndim != 2:
            raise ValueError(f"features must be a 2-D array (n, d), got shape {features.shape}")
        if not np.issubdtype(features.dtype, np.floating):
            features = features.astype(np.float64)
        n = features.shape[0]
        if n == 0 or features.shape[1] == 0:
            raise ValueError(f"features must be non-empty, got shape {features.shape}")
        columns = {}
        for name in ("categories", "splits", "ids"):
            column = np.asarray(getattr(self, name)).astype(str)
            if column.shape != (n,):
                raise ValueError(f"{name} must have shape ({n},) to match features, got {column.shape}")
            columns[name] = column
        unknown = sorted(set(np.unique(columns["categories"]).tolist()) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"unknown categories {unknown}; expected one of {', '.join(CATEGORIES)}")
        unknown = sorted(set(np.unique(columns["splits"]).tolist()) - set(SPLITS))
        if unknown:
            raise ValueError(f"unknown splits {unknown}; expected one of {', '.join(SPLITS)}")
        if not np.isfinite(features).all():
            raise ValueError("features contain NaN or infinite values")
        object.__setattr__(self, "features", features)
        for name, column in columns.items():
            object.__setattr__(self, name, column)

    @classmethod
    def from_meta(cls, features: np.ndarray, meta: Any) -> "LabelledRows":
        """Build from a store's `(features, RowMeta)`; `meta` needs `.category`, `.split`, `.prompt_id`."""
        return cls(features, meta.category, meta.split, meta.prompt_id)

    @property
    def n(self) -> int:
        """Number of rows."""
        return int(self.features.shape[0])

    @property
    def d(self) -> int:
        """Number of feature columns."""
        return int(self.features.shape[1])

    def subset(self, mask_or_index: np.ndarray) -> "LabelledRows":
        """Rows selected by a boolean mask (n,) or an integer index array."""
        return LabelledRows(
            self.features[mask_or_index],
            self.categories[mask_or_index],
            self.splits[mask_or_index],
            self.ids[mask_or_index],
        )

    def only(self, split: str) -> "LabelledRows":
        """The rows of one split (ValueError when there are none)."""
        mask = self.splits == split
        if not mask.any():
            raise ValueError(f"no rows from the {split!r} split")
        return self.subset(mask)

    def with_features(self, features: np.ndarray) -> "LabelledRows":
        """Same rows and labels with another feature matrix (e.g. SAE latents instead of residuals)."""
        return LabelledRows(features, self.categories, self.splits, self.ids)

    def with_categories(self, categories: np.ndarray) -> "LabelledRows":
        """Same rows with other category labels (e.g. relabelled for a one-vs-rest head)."""
        return LabelledRows(self.features, categories, self.splits, self.ids)

    def category_mask(self, category: str | Sequence[str]) -> np.ndarray:
        """Boolean (n,) mask of rows whose category is `category` (or any of a sequence)."""
        wanted = [category] if isinstance(category, str) else list(category)
        unknown = sorted(set(wanted) - set(CATEGORIES))
        if unknown:
            raise ValueError(f"unknown categories {unknown}; expected one of {', '.join(CATEGORIES)}")
        return np.isin(self.categories, wanted)

    def provenance(self) -> dict[str, Any]:
        """{split: {"n_rows", "split_hash"}} for every split present: recorded in artifact metadata."""
        out: dict[str, Any] = {}
        for split in SPLITS:
            mask = self.splits == split
            if mask.any():
                out[split] = {"n_rows": int(mask.sum()), "split_hash": split_hash(self.ids[mask])}
        return out


def category_mean(rows: LabelledRows, category: str | Sequence[str]) -> np.ndarray:
    """Float64 mean feature vector (d,) of the rows of `category`; ValueError if the category is empty."""
    mask = rows.category_mask(category)
    if not mask.any():
        raise ValueError(f"category {category!r} has no rows to average")
    return np.mean(rows.features[mask], axis=0, dtype=np.float64)


def probe_targets(
    categories: np.ndarray,
    classes: Sequence[str] = PROBE_CLASSES,
    contrast_as: str = "benign",
) -> tuple[np.ndarray, np.ndarray]:
    """Map row categories to class indices of `classes`.

    Returns `(y, keep)`: `keep` (n,) bool marks rows that take part, `y` (keep.sum(),) int64 their
    class index. Contrast rows count as benign (`contrast_as="benign"`) or are dropped ("drop").
    A category not in `classes` (other than contrast) raises ValueError.
    """
    if contrast_as not in CONTRAST_MODES:
        raise ValueError(f"contrast_as must be one of {CONTRAST_MODES}, got {contrast_as!r}")
    cats = np.asarray(categories).astype(str)
    if contrast_as == "benign":
        cats = np.where(cats == CONTRAST, BENIGN, cats)
        keep = np.ones(cats.shape[0], dtype=bool)
    else:
        keep = cats != CONTRAST
    lookup = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(np.unique(cats[keep]).tolist()) - set(lookup))
    if unknown:
        raise ValueError(f"rows of categories {unknown} have no class among {list(classes)}")
    y = np.array([lookup[c] for c in cats[keep]], dtype=np.int64)
    return y, keep


# --- reading labelled rows from an activation store ---------------------------------------------

def open_store(store: ActivationStore | str | Path) -> ActivationStore:
    """An `ActivationStore`, opened from a path when needed (FileNotFoundError names a missing folder)."""
    return store if isinstance(store, ActivationStore) else ActivationStore(store)


def model_name(store: ActivationStore) -> str:
    """The model id recorded in the store manifest ("unknown" when absent)."""
    model = store.manifest.get("model") or {}
    return str(model.get("id", "unknown")) if isinstance(model, dict) else str(model)


def last_token_index(meta: RowMeta) -> np.ndarray:
    """Sorted row indices (m,) of the largest-position row of each prompt in `meta`."""
    ids = np.asarray(meta.prompt_id).astype(str)
    order = np.lexsort((np.asarray(meta.position), ids))  # by prompt id, then position
    sorted_ids = ids[order]
    last = np.r_[sorted_ids[1:] != sorted_ids[:-1], True]
    return np.sort(order[last])


def _load_all_positions(store: ActivationStore, layer: int, splits: Sequence[str],
                        chunk_rows: int) -> tuple[np.ndarray, RowMeta]:
    """Last-token rows of an `all`-positions store, read chunk by chunk (memory ~ one chunk + result)."""
    meta = store.meta(split=list(splits))
    wanted = last_token_index(meta)
    picked, offset = [], 0
    for block, _ in store.iter_chunks(layer, split=list(splits), chunk_rows=chunk_rows):
        inside = wanted[(wanted >= offset) & (wanted < offset + len(block))] - offset
        picked.append(block[inside])
        offset += len(block)
    x = np.concatenate(picked) if picked else np.empty((0, store.d_model), np.float32)
    return x, meta.select(wanted)


def load_last_token_rows(
    store: ActivationStore,
    layer: int,
    splits: Sequence[str] = SPLITS,
    chunk_rows: int = 65536,
) -> LabelledRows:
    """One row per prompt of `splits`: its last-token activation `(n, d_model)` float32 at `layer`."""
    if layer not in store.layers:
        raise ValueError(f"layer {layer} is not in the store {store.directory}; available layers: {store.layers}")
    unsplit = store.meta(split=None).split
    n_unsplit = int(np.sum(np.asarray(unsplit).astype(str) == ""))
    if n_unsplit:
        raise ValueError(f"{n_unsplit} rows of the store {store.directory} have no split; "
                         "harvest a prompt set whose prompts carry extract/calibrate/eval splits")
    if store.positions == "all":
        x, meta = _load_all_positions(store, layer, splits, chunk_rows)
    else:
        x, meta = store.load(layer, split=list(splits))
    if len(meta) == 0:
        raise ValueError(f"the store {store.directory} has no rows in the splits {list(splits)}")
    return LabelledRows.from_meta(x, meta)


def keep_classes(rows: LabelledRows, classes: Sequence[str], keep_contrast: bool = True) -> tuple[LabelledRows, int]:
    """Rows whose category is in `classes` (plus contrast rows if `keep_contrast`); returns (rows, n dropped)."""
    allowed = list(classes) + ([CONTRAST] if keep_contrast else [])
    mask = np.isin(rows.categories, allowed)
    if not mask.any():
        raise ValueError(f"no rows of the categories {allowed}")
    return rows.subset(mask), int((~mask).sum())


def require_rows(rows: LabelledRows, categories: Iterable[str], splits: Sequence[str], where: str) -> None:
    """ValueError naming the first category without rows in one of `splits`."""
    for split in splits:
        in_split = rows.splits == split
        for category in categories:
            if not np.any(in_split & (rows.categories == category)):
                raise ValueError(f"{where}: category {category!r} has no rows in the {split!r} split")


def row_counts(rows: LabelledRows) -> dict[str, dict[str, int]]:
    """{split: {category: n_rows}} for the splits and categories present."""
    out: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        mask = rows.splits == split
        if mask.any():
            cats, counts = np.unique(rows.categories[mask], return_counts=True)
            out[split] = {str(c): int(n) for c, n in zip(cats, counts)}
    return out
