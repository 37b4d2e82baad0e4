"""Tests for analysis.evaluation.geometry (cluster metrics, embeddings) and analysis.reporting.plots."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score
from threadpoolctl import threadpool_limits

from activations.records import CATEGORIES
from analysis.evaluation.geometry import (
    calinski_harabasz,
    cluster_metrics,
    davies_bouldin,
    embed_2d,
    plot_embeddings,
    silhouette,
    stratified_subsample,
)
from analysis.reporting.plots import (
    CATEGORY_COLORS,
    plot_rate_bars,
    plot_tradeoff,
    plot_training_curves,
    png_to_data_uri,
    save_fig,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    """t-SNE's OpenMP threads spin badly on a busy 2-core machine; tiny inputs need only one."""
    with threadpool_limits(1):
        yield


def _blobs(n_per: int = 40, d: int = 10, seed: int = 0, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    cats = ["benign", "safety", "incomplete"]
    centers = rng.normal(scale=4.0, size=(len(cats), d))
    X = np.vstack([c + rng.normal(size=(n_per, d)) for c in centers]) * scale
    labels = np.repeat(cats, n_per)
    return X, labels


def test_metrics_agree_with_sklearn():
    X, labels = _blobs()
    assert silhouette(X, labels) == pytest.approx(silhouette_score(X, labels), rel=1e-10)
    assert davies_bouldin(X, labels) == pytest.approx(davies_bouldin_score(X, labels), rel=1e-10)
    assert calinski_harabasz(X, labels) == pytest.approx(calinski_harabasz_score(X, labels), rel=1e-10)
    # a singleton category scores 0 in silhouette, as in sklearn
    labels2 = labels.copy()
    labels2[0] = "contrast"
    assert silhouette(X, labels2) == pytest.approx(silhouette_score(X, labels2), rel=1e-10)


def test_float16_large_values_do_not_overflow():
    X, labels = _blobs(n_per=2000, d=8, seed=1)
    X16 = (X * 250.0).astype(np.float16)  # values up to a few 1e3
    assert np.abs(X16).max() > 1000
    X64 = X16.astype(np.float64)
    ch16 = calinski_harabasz(X16, labels)
    assert np.isfinite(ch16)
    assert ch16 == pytest.approx(calinski_harabasz_score(X64, labels), rel=1e-9)
    assert ch16 == pytest.approx(calinski_harabasz(X64, labels), rel=1e-12)
    metrics = cluster_metrics(X16, labels, max_silhouette_rows=600)
    assert all(np.isfinite(metrics[k]) for k in ("silhouette", "davies_bouldin", "calinski_harabasz"))
    assert metrics["davies_bouldin"] == pytest.approx(davies_bouldin_score(X64, labels), rel=1e-9)
    assert metrics["n"] == 6000 and metrics["n_categories"] == 3


def test_silhouette_subsample_is_deterministic_and_stratified():
    X, labels = _blobs(n_per=300, seed=2)
    rows = stratified_subsample(labels, 150, seed=0)
    np.testing.assert_array_equal(rows, stratified_subsample(labels, 150, seed=0))
    assert rows.size == 150 and set(np.unique(labels[rows])) == {"benign", "safety", "incomplete"}
    a = cluster_metrics(X, labels, max_silhouette_rows=150)
    b = cluster_metrics(X, labels, max_silhouette_rows=150)
    assert a == b and a["silhouette_rows"] == 150
    full = silhouette_score(X, labels)
    assert a["silhouette"] == pytest.approx(full, abs=0.05)


def test_cluster_metrics_bad_input():
    X, labels = _blobs(n_per=5)
    with pytest.raises(ValueError, match="number of categories"):
        cluster_metrics(X, ["benign"] * len(labels))
    with pytest.raises(ValueError, match="labels must have shape"):
        cluster_metrics(X, labels[:-1])
    X_nan = X.copy()
    X_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="nan or inf"):
        cluster_metrics(X_nan, labels)


def test_embed_2d_shapes_and_determinism():
    X, _ = _blobs(n_per=10, d=6)
    for method in ("pca", "tsne"):
        Y = embed_2d(X, method, seed=0)
        assert Y.shape == (30, 2) and Y.dtype == np.float64 and np.all(np.isfinite(Y))
        np.testing.assert_allclose(Y, embed_2d(X, method, seed=0))
    # PCA keeps the variance of the two leading directions
    Y = embed_2d(X, "pca")
    top2 = np.sort(np.linalg.svd(X - X.mean(0), compute_uv=False) ** 2)[::-1][:2]
    np.testing.assert_allclose(np.sort((Y**2).sum(0))[::-1], top2, rtol=1e-10)
    with pytest.raises(ValueError, match="unknown embedding method"):
        embed_2d(X, "mds")
    with pytest.raises(ValueError, match="n >= 4"):
        embed_2d(X[:3], "pca")


def test_plot_embeddings_writes_png(tmp_path):
    X, labels = _blobs(n_per=12, d=6)
    labels[:3] = "not-a-category"  # unknown labels still get a colour
    out = plot_embeddings(X.astype(np.float16), labels, tmp_path / "emb.png", methods=("pca", "tsne"), title="toy")
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5000
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left
    with pytest.raises(ValueError, match="one entry per row"):
        plot_embeddings(X, labels[:-1], tmp_path / "bad.png", methods=("pca",))


@pytest.mark.slow  # UMAP's numba code compiles on first use (about 15 s on 2 cores)
def test_umap_embedding_and_panel(tmp_path):
    X, labels = _blobs(n_per=12, d=6)
    Y = embed_2d(X, "umap", seed=0)
    assert Y.shape == (36, 2) and np.all(np.isfinite(Y))
    out = plot_embeddings(X, labels, tmp_path / "umap.png", methods=("umap",))
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_palette_covers_categories():
    assert set(CATEGORY_COLORS) == set(CATEGORIES)
    assert len(set(CATEGORY_COLORS.values())) == len(CATEGORIES)


def _r(value, n=50):
    return {"rate": value, "ci": [max(0.0, value - 0.1), min(1.0, value + 0.1)], "n": n}


def test_report_plots_write_pngs(tmp_path):
    points = [
        {"condition": cond, "strength": s, "over_refusal": _r(0.1 * s), "harmful": _r(0.5 + 0.1 * s)}
        for cond in ("add-safety", "ablate") for s in (0.0, 1.0, 2.0)
    ]
    p1 = plot_tradeoff(points, tmp_path / "tradeoff.png")
    curves = {0: {"step": [0, 10, 20], "fvu": [1.0, 0.5, 0.3], "l0": [32, 32, 32]},
              1: {"step": [0, 10, 20], "fvu": [1.0, 0.6, 0.35], "l0": [32, 32, 32]}}
    p2 = plot_training_curves(curves, tmp_path / "sub" / "curves.png")
    table = {"baseline": {"safety": _r(0.8), "benign": _r(0.05), "incomplete": {"rate": None, "ci": [None, None], "n": 0}},
             "steered": {"safety": _r(0.9), "benign": _r(0.1)}}
    p3 = plot_rate_bars(table, tmp_path / "bars.png")
    for p in (p1, p2, p3):
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    uri = png_to_data_uri(p1)
    assert uri.startswith("data:image/png;base64,") and len(uri) > 5000


def test_plot_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="lacks the key 'harmful'"):
        plot_tradeoff([{"condition": "a", "strength": 1, "over_refusal": _r(0.1)}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="harmful has no rate"):
        plot_tradeoff([{"condition": "a", "strength": 1, "over_refusal": _r(0.1),
                        "harmful": {"rate": None, "ci": [None, None], "n": 0}}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="'fvu' has 2 values but 'step' has 3"):
        plot_training_curves({0: {"step": [0, 1, 2], "fvu": [1.0, 0.5]}}, tmp_path / "c.png")
    with pytest.raises(FileNotFoundError, match="PNG file not found"):
        png_to_data_uri(tmp_path / "missing.png")
    from matplotlib.figure import Figure

    with pytest.raises(ValueError, match="no suffix"):
        save_fig(Figure(), tmp_path / "noext")
    assert not (tmp_path / "x.png").exists()
