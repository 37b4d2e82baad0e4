"""Tests for analysis.evaluation.stability (decoder matching, Jaccard, stable features) and analysis.evaluation.diffing."""
from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.evaluation.diffing import category_vector, category_vector_cosines
from analysis.evaluation.stability import (
    cross_seed_feature_stability,
    jaccard,
    match_all_pairs,
    match_decoders,
    matched_cosine_summary,
    stable_features,
)


def _permuted_copy(W: np.ndarray, seed: int, noise: float = 0.01):
    """(W_b, perm) with W_b[perm[i]] ≈ W[i] (same sign, small noise)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(W.shape[0])
    W_b = np.empty_like(W)
    W_b[perm] = W + noise * rng.normal(size=W.shape)
    return W_b, perm


@pytest.mark.parametrize("hungarian_max", [16384, 1])  # Hungarian, then forced greedy
def test_matching_recovers_permutation(hungarian_max):
    W_a = np.random.default_rng(0).normal(size=(64, 32))
    W_b, perm = _permuted_copy(W_a, seed=1)
    m = match_decoders(W_a, W_b, hungarian_max=hungarian_max, chunk_rows=16)
    assert m.method == ("hungarian" if hungarian_max > 64 else "greedy")
    np.testing.assert_array_equal(m.perm, perm)
    assert np.all(m.cosine > 0.99)
    summary = matched_cosine_summary(m)
    assert summary["n_matched"] == 64 and summary["fraction_above"]["0.9"] == 1.0
    assert summary["mean"] > 0.99 and summary["median"] > 0.99


def test_matching_keeps_sign_and_handles_sizes():
    W_a = np.random.default_rng(2).normal(size=(20, 16))
    W_b, perm = _permuted_copy(W_a, seed=3)
    flipped = match_decoders(W_a, -W_b)
    assert np.all(flipped.perm != perm)  # a flipped direction (cosine -1) is not a match
    # A larger than B: the 12 latents of B all get matched, 8 latents of A stay unmatched
    small = W_b[:12]
    m = match_decoders(W_a, small)
    assert m.perm.shape == (20,) and np.sum(m.perm >= 0) == 12
    assert np.all(np.isnan(m.cosine[m.perm < 0]))
    expected = {i: int(perm[i]) for i in range(20) if perm[i] < 12}
    assert {i: int(m.perm[i]) for i in range(20) if m.perm[i] >= 0} == expected
    inv = m.inverse()
    assert inv.perm.shape == (12,)
    assert all(m.perm[inv.perm[j]] == j for j in range(12))
    with pytest.raises(ValueError, match="d_model mismatch"):
        match_decoders(W_a, np.ones((5, 3)))


def test_jaccard():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(0.5)
    assert jaccard([1], [1]) == 1.0
    assert jaccard({1}, set()) == 0.0
    assert math.isnan(jaccard(set(), []))


def _three_seed_setup():
    rng = np.random.default_rng(4)
    W0 = rng.normal(size=(30, 12))
    W1, p1 = _permuted_copy(W0, seed=5)  # latent i of seed 0 is latent p1[i] of seed 1
    W2, p2 = _permuted_copy(W0, seed=6)
    return {0: W0, 1: W1, 2: W2}, p1, p2


def test_cross_seed_feature_stability():
    decoders, p1, p2 = _three_seed_setup()
    selected = {
        0: {"safety": [0, 1, 2, 3], "incomplete": []},
        1: {"safety": [int(p1[i]) for i in (0, 1, 2, 3)], "incomplete": []},
        2: {"safety": [int(p2[i]) for i in (0, 1, 9, 10)], "incomplete": []},
    }
    matchings = match_all_pairs(decoders)
    out = cross_seed_feature_stability(selected, matchings)
    assert out["pairs"]["0-1"]["safety"] == pytest.approx(1.0)
    assert out["pairs"]["0-2"]["safety"] == pytest.approx(2 / 6)
    assert out["pairs"]["1-2"]["safety"] == pytest.approx(2 / 6)
    assert out["pairs"]["0-1"]["incomplete"] is None  # both empty: undefined
    assert out["per_category"]["safety"]["mean"] == pytest.approx((1 + 2 / 6 + 2 / 6) / 3)
    assert out["per_category"]["incomplete"]["n_pairs"] == 0
    # only the (1, 0) direction given: it is inverted
    reversed_only = {(1, 0): matchings[(0, 1)].inverse(), (0, 2): matchings[(0, 2)], (1, 2): matchings[(1, 2)]}
    again = cross_seed_feature_stability(selected, reversed_only)
    assert again["pairs"]["0-1"]["safety"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no decoder matching between seed 1 and seed 2"):
        cross_seed_feature_stability(selected, {(0, 1): matchings[(0, 1)], (0, 2): matchings[(0, 2)]})
    with pytest.raises(ValueError, match="seed 2 has no feature selection for category 'incomplete'"):
        cross_seed_feature_stability({**selected, 2: {"safety": [1]}}, matchings)


def test_stable_features_filtering():
    decoders, p1, p2 = _three_seed_setup()
    to_ref = {1: match_decoders(decoders[1], decoders[0]), 2: match_decoders(decoders[2], decoders[0])}
    selected = {
        0: {"safety": [0, 1, 2]},
        1: {"safety": [int(p1[i]) for i in (0, 1, 5)]},
        2: {"safety": [int(p2[i]) for i in (0, 5, 7)]},
    }
    assert stable_features(selected, to_ref, reference_seed=0, min_seeds=3) == {"safety": [0]}
    assert stable_features(selected, to_ref, reference_seed=0, min_seeds=2) == {"safety": [0, 1, 5]}
    assert stable_features(selected, to_ref, reference_seed=0, min_seeds=1) == {"safety": [0, 1, 2, 5, 7]}
    with pytest.raises(ValueError, match="min_seeds"):
        stable_features(selected, to_ref, reference_seed=0, min_seeds=4)
    with pytest.raises(ValueError, match="no matching from seed 2"):
        stable_features(selected, {1: to_ref[1]}, reference_seed=0, min_seeds=2)
    with pytest.raises(ValueError, match="out of range"):
        stable_features({0: {"safety": [0]}, 1: {"safety": [99]}}, to_ref, reference_seed=0, min_seeds=1)


def _model_activations(rng, direction: np.ndarray, n_per: int = 60):
    """Benign rows around 0 and 'safety' rows shifted along `direction` (d,)."""
    d = direction.size
    benign = rng.normal(size=(n_per, d))
    safety = rng.normal(size=(n_per, d)) + direction
    return np.vstack([benign, safety]), np.array(["benign"] * n_per + ["safety"] * n_per)


def test_category_vector_is_float64_mean_difference():
    rng = np.random.default_rng(7)
    direction = np.zeros(24)
    direction[0] = 3.0
    X, lab = _model_activations(rng, direction)
    vec = category_vector(X.astype(np.float16), lab, "safety")
    assert vec.dtype == np.float64 and vec.shape == (24,)
    expected = X[lab == "safety"].astype(np.float16).astype(np.float64).mean(0) - X[lab == "benign"].astype(
        np.float16).astype(np.float64).mean(0)
    np.testing.assert_allclose(vec, expected, rtol=1e-12)


def test_category_cosine_corrects_noise_and_covers_truth():
    rng = np.random.default_rng(8)
    d = 24
    dir_a = np.zeros(d)
    dir_a[0] = 3.0
    dir_b = np.zeros(d)
    dir_b[:2] = [3.0, 1.5]
    true = dir_a @ dir_b / np.linalg.norm(dir_a) / np.linalg.norm(dir_b)  # 0.894
    covered, corrected, plugin = [], [], []
    for i in range(120):
        X_a, lab_a = _model_activations(rng, dir_a)
        X_b, lab_b = _model_activations(rng, dir_b)
        out = category_vector_cosines(X_a, lab_a, X_b, lab_b, n_resamples=200, seed=i)["safety"]
        assert out["ci"][0] <= out["cosine"] <= out["ci"][1]
        covered.append(out["ci"][0] <= true <= out["ci"][1])
        corrected.append(out["cosine"])
        plugin.append(out["cosine_plugin"])
    # the plug-in cosine is pulled towards 0 by noise; the corrected one is not
    assert np.mean(plugin) < true - 0.04
    assert abs(np.mean(corrected) - true) < 0.015
    assert 0.9 <= np.mean(covered) <= 1.0


def test_category_cosine_paired_and_bad_input():
    rng = np.random.default_rng(9)
    direction = np.zeros(24)
    direction[0] = 3.0
    X_a, lab_a = _model_activations(rng, direction)
    X_b, lab_b = _model_activations(rng, direction)
    # identical activations, paired: the noise cancels exactly, cosine 1 in every resample
    same = category_vector_cosines(X_a, lab_a, X_a, lab_a, n_resamples=100, paired=True)["safety"]
    assert same["cosine"] == pytest.approx(1.0) and same["ci"] == pytest.approx([1.0, 1.0])
    assert same["n_a"] == 60 and same["n_resamples"] == 100 and same["undefined_resamples"] == 0
    # an orthogonal category direction gives a cosine near 0, well separated from 1
    ortho = np.zeros(24)
    ortho[1] = 3.0
    X_c, lab_c = _model_activations(rng, ortho)
    diff = category_vector_cosines(X_a, lab_a, X_c, lab_c, n_resamples=200)["safety"]
    assert abs(diff["cosine"]) < 0.2 and diff["ci"][0] < 0.0 < diff["ci"][1] < 0.5
    # safety rows = benign rows reordered: the category vector (0) is below its noise, undefined
    benign = rng.normal(size=(10, 24))
    flat, lab_f = np.vstack([benign, benign[::-1]]), np.array(["benign"] * 10 + ["safety"] * 10)
    undefined = category_vector_cosines(flat, lab_f, X_a, lab_a, n_resamples=50)["safety"]
    assert undefined["cosine"] is None and undefined["ci"] == [None, None]
    with pytest.raises(ValueError, match="d_model mismatch"):
        category_vector_cosines(X_a, lab_a, X_a[:, :5], lab_a)
    with pytest.raises(ValueError, match="0 rows of category 'unsupported'"):
        category_vector_cosines(X_a, lab_a, X_b, lab_b, categories=["unsupported"])
    with pytest.raises(ValueError, match="identical label vectors"):
        category_vector_cosines(X_a, lab_a, X_b[:-1], lab_b[:-1], paired=True)


def test_consensus_keeps_features_matched_and_selected_in_enough_seeds():
    from analysis.evaluation.stability import consensus_features, feature_matches

    rng = np.random.default_rng(3)
    W0 = rng.normal(size=(32, 16))
    W1, perm = _permuted_copy(W0, seed=4)  # seed 1 learned the same dictionary, permuted
    W2 = rng.normal(size=(32, 16))  # seed 2 learned something else
    matchings = match_all_pairs({0: W0, 1: W1, 2: W2})
    selected = {0: {"safety": [0, 1, 2]}, 1: {"safety": [int(perm[0]), int(perm[1]), int(perm[9])]}, 2: {"safety": [3]}}
    kept = consensus_features(selected, matchings, min_seeds=2, min_cosine=0.7)
    assert kept[0]["safety"] == [0, 1]  # 2's partner in seed 1 was not selected
    assert kept[1]["safety"] == sorted([int(perm[0]), int(perm[1])])  # perm[9]'s partner (9) not selected on seed 0
    assert kept[2]["safety"] == []  # nothing in seed 2 matches the others with cosine >= 0.7
    assert consensus_features(selected, matchings, min_seeds=1, min_cosine=0.7) == {
        s: {c: sorted(v) for c, v in per.items()} for s, per in selected.items()}
    assert consensus_features(selected, matchings, min_seeds=3, min_cosine=0.7)[0]["safety"] == []
    matches = feature_matches([0], 0, matchings, [0, 1, 2])
    assert matches[0][1][0] == perm[0] and matches[0][1][1] > 0.99 and set(matches[0]) == {1, 2}
    with pytest.raises(ValueError, match="min_seeds"):
        consensus_features(selected, matchings, min_seeds=4, min_cosine=0.7)
