"""How well categories separate in activation (or feature) space: cluster metrics and 2-D maps.

All metrics are computed in float64: activations are stored as float16, whose largest value
is 65504, so sums of squares over many rows (e.g. 1e3**2 * 1e4 rows) overflow to inf if the
arithmetic stays in float16. `X` is therefore always cast to float64 first.

- silhouette (in [-1, 1], higher = better separated), mean over rows of (b - a) / max(a, b)
  with a = mean distance to the own category, b = smallest mean distance to another one;
  rows of a singleton category score 0. For large n a deterministic stratified subsample
  of `max_silhouette_rows` rows is scored (pairwise distances are O(n^2)).
- Davies–Bouldin (>= 0, lower = better): mean over categories of the worst ratio
  (s_i + s_j) / ||c_i - c_j|| with s_i the mean distance of a category's rows to its centroid.
- Calinski–Harabasz (higher = better): [tr(B) / (k - 1)] / [tr(W) / (n - k)].
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from scipy.spatial.distance import cdist

from analysis.reporting.plots import color_for, ordered_labels, save_fig


def _prepare(X: Any, labels: Sequence[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate and return (X float64 (n, d), label codes (n,), unique labels (k,))."""
    if hasattr(X, "detach"):  # a torch tensor
        X = X.detach().cpu().float().numpy()
    arr = np.asarray(X, dtype=np.float64)
    lab = np.asarray(labels)
    if arr.ndim != 2:
        raise ValueError(f"X must be a (n, d) matrix, got shape {arr.shape}")
    if lab.shape != (arr.shape[0],):
        raise ValueError(f"labels must have shape ({arr.shape[0]},), got {lab.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("X contains nan or inf")
    uniques, codes = np.unique(lab.astype(str), return_inverse=True)
    if not 2 <= uniques.size <= arr.shape[0] - 1:
        raise ValueError(f"cluster metrics need 2 <= number of categories <= n - 1, got {uniques.size} for n={arr.shape[0]}")
    return arr, codes, uniques


def _centroids(X: np.ndarray, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Category centroids (k, d) and sizes (k,)."""
    sizes = np.bincount(codes, minlength=k).astype(np.float64)
    sums = np.zeros((k, X.shape[1]), dtype=np.float64)
    np.add.at(sums, codes, X)
    return sums / sizes[:, None], sizes


def calinski_harabasz(X: Any, labels: Sequence[Any]) -> float:
    """Calinski–Harabasz index in float64 (between- over within-category dispersion)."""
    arr, codes, uniques = _prepare(X, labels)
    n, k = arr.shape[0], uniques.size
    cent, sizes = _centroids(arr, codes, k)
    between = float(np.sum(sizes * np.sum((cent - arr.mean(axis=0)) ** 2, axis=1)))
    within = float(np.sum((arr - cent[codes]) ** 2))
    if within == 0.0:
        return 1.0  # every row sits on its centroid (scikit-learn's convention)
    return between * (n - k) / (within * (k - 1))


def davies_bouldin(X: Any, labels: Sequence[Any]) -> float:
    """Davies–Bouldin index in float64; inf when two categories share a centroid."""
    arr, codes, uniques = _prepare(X, labels)
    k = uniques.size
    cent, sizes = _centroids(arr, codes, k)
    spread = np.bincount(codes, weights=np.linalg.norm(arr - cent[codes], axis=1), minlength=k) / sizes
    dist = cdist(cent, cent)
    np.fill_diagonal(dist, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (spread[:, None] + spread[None, :]) / dist
    ratio[np.isnan(ratio)] = np.inf  # 0 / 0: coincident centroids of two point-like categories
    np.fill_diagonal(ratio, -np.inf)
    return float(np.mean(ratio.max(axis=1)))


def silhouette(X: Any, labels: Sequence[Any], chunk_rows: int = 1024) -> float:
    """Mean silhouette over all rows (no subsampling), float64, distances computed in chunks."""
    arr, codes, uniques = _prepare(X, labels)
    k = uniques.size
    sizes = np.bincount(codes, minlength=k).astype(np.float64)
    onehot = np.zeros((arr.shape[0], k), dtype=np.float64)
    onehot[np.arange(arr.shape[0]), codes] = 1.0
    scores = np.empty(arr.shape[0], dtype=np.float64)
    for start in range(0, arr.shape[0], chunk_rows):
        stop = min(start + chunk_rows, arr.shape[0])
        dist_sums = cdist(arr[start:stop], arr) @ onehot  # (chunk, k) summed distances per category
        own = codes[start:stop]
        rows = np.arange(stop - start)
        own_size = sizes[own]
        with np.errstate(divide="ignore", invalid="ignore"):
            a = dist_sums[rows, own] / (own_size - 1)
            mean_other = dist_sums / sizes[None, :]
        mean_other[rows, own] = np.inf
        b = mean_other.min(axis=1)
        denom = np.maximum(a, b)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.where(denom > 0, (b - a) / denom, 0.0)
        scores[start:stop] = np.where(own_size > 1, s, 0.0)
    return float(scores.mean())


def stratified_subsample(labels: Sequence[Any], max_rows: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices: about `max_rows` rows, each category in proportion (at least 2 rows
    or all it has), drawn with a fixed seed. Returns all rows when n <= max_rows."""
    lab = np.asarray(labels).astype(str)
    n = lab.size
    if n <= max_rows:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    picked = []
    for cat in np.unique(lab):
        rows = np.flatnonzero(lab == cat)
        take = min(rows.size, max(2, int(round(max_rows * rows.size / n))))
        picked.append(rng.choice(rows, size=take, replace=False))
    return np.sort(np.concatenate(picked))


def cluster_metrics(X: Any, labels: Sequence[Any], max_silhouette_rows: int = 5000, seed: int = 0) -> dict[str, Any]:
    """Silhouette, Davies–Bouldin and Calinski–Harabasz of `labels` on X `(n, d)` (any float dtype).

    Returns `{"silhouette", "davies_bouldin", "calinski_harabasz", "n", "n_categories",
    "silhouette_rows"}`; silhouette uses a deterministic stratified subsample when
    n > `max_silhouette_rows`.
    """
    arr, codes, uniques = _prepare(X, labels)
    lab = uniques[codes]
    rows = stratified_subsample(lab, max_silhouette_rows, seed)
    return {
        "silhouette": silhouette(arr[rows], lab[rows]),
        "davies_bouldin": davies_bouldin(arr, lab),
        "calinski_harabasz": calinski_harabasz(arr, lab),
        "n": int(arr.shape[0]),
        "n_categories": int(uniques.size),
        "silhouette_rows": int(rows.size),
    }


EMBED_METHODS = ("pca", "tsne", "umap")


def embed_2d(X: Any, method: str = "pca", seed: int = 0) -> np.ndarray:
    """2-D embedding `(n, 2)` float64 of X `(n, d)` by PCA, t-SNE or UMAP (fixed seed).

    t-SNE perplexity is min(30, (n - 1) / 3) so small sets work; UMAP uses
    n_neighbors = min(15, n - 1), random init for n <= 50 (spectral init fails on tiny
    graphs), and is imported only when asked for (its first call compiles numba code).
    """
    if method not in EMBED_METHODS:
        raise ValueError(f"unknown embedding method {method!r}; expected one of {', '.join(EMBED_METHODS)}")
    if hasattr(X, "detach"):
        X = X.detach().cpu().float().numpy()
    arr = np.asarray(X, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 4 or arr.shape[1] < 2:
        raise ValueError(f"embed_2d needs X of shape (n >= 4, d >= 2), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("X contains nan or inf")
    n = arr.shape[0]
    if method == "pca":
        centred = arr - arr.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        return centred @ vt[:2].T
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(1.0, (n - 1) / 3.0)))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        return np.asarray(tsne.fit_transform(arr), dtype=np.float64)
    import warnings

    import umap  # lazy: slow import (numba)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), random_state=seed,
                            init="spectral" if n > 50 else "random")
        return np.asarray(reducer.fit_transform(arr), dtype=np.float64)


def plot_embeddings(X: Any, labels: Sequence[Any], out_png: str | os.PathLike[str],
                    methods: Sequence[str] = EMBED_METHODS, title: str = "", seed: int = 0) -> Path:
    """One PNG with a panel per embedding method, rows coloured by category (fixed palette)."""
    lab = np.asarray(labels).astype(str)
    if lab.shape != (np.shape(X)[0],):
        raise ValueError(f"labels must have one entry per row of X, got {lab.shape} for {np.shape(X)[0]} rows")
    if not methods:
        raise ValueError("plot_embeddings needs at least one method")
    order = ordered_labels(lab.tolist())
    fig = Figure(figsize=(4.5 * len(methods) + 1.5, 4.5))
    for k, method in enumerate(methods):
        xy = embed_2d(X, method, seed)
        ax = fig.add_subplot(1, len(methods), k + 1)
        for cat in order:
            rows = lab == cat
            ax.scatter(xy[rows, 0], xy[rows, 1], s=8, alpha=0.75, color=color_for(cat, order),
                       label=f"{cat} ({int(rows.sum())})")
        ax.set_title(method.upper() if method == "pca" else ("t-SNE" if method == "tsne" else "UMAP"))
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = fig.axes[-1].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", fontsize=8, title="category", markerscale=2)
    fig.subplots_adjust(right=1.0 - 1.5 / (4.5 * len(methods) + 1.5))
    if title:
        fig.suptitle(title)
    return save_fig(fig, out_png)
