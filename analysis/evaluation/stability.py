"""Cross-seed stability of SAE latents and of selected feature sets.

Two SAEs trained with different seeds learn latents in arbitrary order. We align them by
matching decoder rows (`W_dec (d_sae, d_model)`) on cosine similarity, then compare the
feature sets selected per category through that alignment.

Matching: exact Hungarian assignment (`scipy.optimize.linear_sum_assignment`, maximising the
summed cosine) when both dictionaries are smaller than `hungarian_max` (default 16384).
Hungarian is O(n^3) in time and needs the dense (d_a, d_b) similarity matrix, so for larger
dictionaries we fall back to a chunked one-to-one greedy matching: each latent's top
candidates are found chunk by chunk, pairs are accepted from the highest cosine down, and
latents left over are re-matched among the still-free latents. Greedy is an approximation
(it maximises each accepted pair, not the total). Cosines are computed in float64.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True, eq=False)
class Matching:
    """Alignment of latents of dictionary A onto dictionary B.

    `perm[i]` is the index in B matched to latent i of A, or -1 when A has more latents than
    B and i stayed unmatched; `cosine[i]` is the decoder cosine of that pair (nan if
    unmatched). Both have shape `(d_sae_a,)`. `size_b` is B's number of latents.
    """

    perm: np.ndarray
    cosine: np.ndarray
    size_b: int
    method: str

    def inverse(self) -> "Matching":
        """The same one-to-one matching seen from B onto A."""
        perm = np.full(self.size_b, -1, dtype=np.int64)
        cosine = np.full(self.size_b, np.nan, dtype=np.float64)
        matched = np.flatnonzero(self.perm >= 0)
        perm[self.perm[matched]] = matched
        cosine[self.perm[matched]] = self.cosine[matched]
        return Matching(perm=perm, cosine=cosine, size_b=int(self.perm.size), method=self.method)

    def map_features(self, features: Sequence[int]) -> set[int]:
        """Indices in B of the A-latents `features` (unmatched latents are dropped)."""
        idx = np.asarray(list(features), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.perm.size):
            bad = idx[(idx < 0) | (idx >= self.perm.size)][0]
            raise ValueError(f"feature index {bad} out of range [0, {self.perm.size}) for this matching")
        mapped = self.perm[idx]
        return set(mapped[mapped >= 0].tolist())


def _unit_rows(W: Any, name: str) -> np.ndarray:
    """Rows of W (rows, d) scaled to unit norm, float64; zero rows stay zero (cosine 0)."""
    if hasattr(W, "detach"):  # a torch tensor
        W = W.detach().cpu().numpy()
    arr = np.asarray(W, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (d_sae, d_model) matrix, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains nan or inf")
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    return arr / np.where(norms > 0, norms, 1.0)


def _greedy_match(A: np.ndarray, B: np.ndarray, chunk_rows: int, top_k: int) -> np.ndarray:
    """One-to-one greedy matching of unit rows A (n_a, d) onto B (n_b, d); returns perm (n_a,)."""
    perm = np.full(A.shape[0], -1, dtype=np.int64)
    free_a = np.arange(A.shape[0])
    free_b = np.arange(B.shape[0])
    while free_a.size and free_b.size:
        k = min(top_k, free_b.size)
        rows, cols, sims = [], [], []
        B_free_t = np.ascontiguousarray(B[free_b].T)  # (d, n_free_b)
        for start in range(0, free_a.size, chunk_rows):
            ia = free_a[start : start + chunk_rows]
            sim = A[ia] @ B_free_t  # (chunk, n_free_b)
            top = np.argpartition(sim, sim.shape[1] - k, axis=1)[:, -k:]  # k largest, unordered
            rows.append(np.repeat(ia, k))
            cols.append(free_b[top].ravel())
            sims.append(np.take_along_axis(sim, top, axis=1).ravel())
        r, c, s = np.concatenate(rows), np.concatenate(cols), np.concatenate(sims)
        taken_b = np.zeros(B.shape[0], dtype=bool)
        for j in np.argsort(-s, kind="stable"):
            if perm[r[j]] < 0 and not taken_b[c[j]]:
                perm[r[j]] = c[j]
                taken_b[c[j]] = True
        free_a = np.flatnonzero(perm < 0)
        used = np.zeros(B.shape[0], dtype=bool)
        used[perm[perm >= 0]] = True
        free_b = np.flatnonzero(~used)
    return perm


def match_decoders(
    W_a: Any,
    W_b: Any,
    hungarian_max: int = 16384,
    chunk_rows: int = 2048,
    top_k: int = 8,
) -> Matching:
    """Align latents of W_a `(d_sae_a, d_model)` onto W_b `(d_sae_b, d_model)` by decoder cosine.

    Sizes may differ: every latent of the smaller dictionary is matched; extra latents of A
    get perm -1. Hungarian (exact, maximises total cosine) when max(d_sae_a, d_sae_b) <
    `hungarian_max`, else chunked greedy (see the module docstring). Signs are kept: a
    flipped decoder direction has cosine -1, not +1.
    """
    A, B = _unit_rows(W_a, "W_a"), _unit_rows(W_b, "W_b")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"d_model mismatch: W_a has {A.shape[1]} columns, W_b has {B.shape[1]}")
    if max(A.shape[0], B.shape[0]) < hungarian_max:
        rows, cols = linear_sum_assignment(A @ B.T, maximize=True)
        perm = np.full(A.shape[0], -1, dtype=np.int64)
        perm[rows] = cols
        method = "hungarian"
    else:
        perm = _greedy_match(A, B, chunk_rows, top_k)
        method = "greedy"
    cosine = np.full(A.shape[0], np.nan, dtype=np.float64)
    matched = perm >= 0
    cosine[matched] = np.einsum("ij,ij->i", A[matched], B[perm[matched]])
    return Matching(perm=perm, cosine=cosine, size_b=int(B.shape[0]), method=method)


def matched_cosine_summary(
    matching: Matching, thresholds: Sequence[float] = (0.5, 0.7, 0.9)
) -> dict[str, Any]:
    """Mean, median, min and fraction of matched pairs with cosine above each threshold."""
    cos = matching.cosine[np.isfinite(matching.cosine)]
    if cos.size == 0:
        raise ValueError("matching has no matched latents")
    return {
        "n_latents": int(matching.perm.size),
        "n_matched": int(cos.size),
        "method": matching.method,
        "mean": float(cos.mean()),
        "median": float(np.median(cos)),
        "min": float(cos.min()),
        "fraction_above": {str(t): float(np.mean(cos > t)) for t in thresholds},
    }


def jaccard(set_a: Any, set_b: Any) -> float:
    """|A ∩ B| / |A ∪ B|; two empty sets give nan (undefined, reported as None in JSON)."""
    a, b = set(set_a), set(set_b)
    union = a | b
    if not union:
        return float("nan")
    return len(a & b) / len(union)


def match_all_pairs(decoders: Mapping[int, Any], **kwargs: Any) -> dict[tuple[int, int], Matching]:
    """`match_decoders` for every pair of seeds `(s, t)` with s < t; `decoders[s]` is W_dec."""
    seeds = sorted(decoders)
    return {(s, t): match_decoders(decoders[s], decoders[t], **kwargs) for s, t in itertools.combinations(seeds, 2)}


def _pair_matching(matchings: Mapping[tuple[int, int], Matching], s: int, t: int) -> Matching:
    """Matching from seed s onto seed t, inverting (t, s) if only that one is given."""
    if (s, t) in matchings:
        return matchings[(s, t)]
    if (t, s) in matchings:
        return matchings[(t, s)].inverse()
    raise ValueError(f"no decoder matching between seed {s} and seed {t}")


def _check_categories(selected: Mapping[int, Mapping[str, Sequence[int]]]) -> list[str]:
    """Categories shared by every seed; raises naming a seed that lacks one."""
    if len(selected) < 2:
        raise ValueError(f"need selections from at least 2 seeds, got {len(selected)}")
    categories = sorted({c for per_cat in selected.values() for c in per_cat})
    for seed, per_cat in selected.items():
        missing = [c for c in categories if c not in per_cat]
        if missing:
            raise ValueError(f"seed {seed} has no feature selection for category {missing[0]!r}")
    return categories


def _none_if_nan(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def cross_seed_feature_stability(
    selected: Mapping[int, Mapping[str, Sequence[int]]],
    matchings: Mapping[tuple[int, int], Matching],
) -> dict[str, Any]:
    """Per-category Jaccard of selected feature sets for every pair of seeds.

    `selected[seed][category]` lists latent indices of that seed's SAE. For a pair (s, t),
    features of s are mapped through the matching (latent i of s -> perm[i] in t) and
    compared with t's set. Returns `{"pairs": {"s-t": {cat: jaccard}}, "per_category":
    {cat: {"mean", "min", "max", "n_pairs"}}}`; undefined Jaccards (both empty) are None
    and are left out of the per-category summary.
    """
    categories = _check_categories(selected)
    pairs: dict[str, dict[str, float | None]] = {}
    collected: dict[str, list[float]] = {c: [] for c in categories}
    for s, t in itertools.combinations(sorted(selected), 2):
        m = _pair_matching(matchings, s, t)
        row: dict[str, float | None] = {}
        for cat in categories:
            j = jaccard(m.map_features(selected[s][cat]), selected[t][cat])
            row[cat] = _none_if_nan(j)
            if not np.isnan(j):
                collected[cat].append(j)
        pairs[f"{s}-{t}"] = row
    per_category = {
        cat: {
            "mean": float(np.mean(v)) if v else None,
            "min": float(np.min(v)) if v else None,
            "max": float(np.max(v)) if v else None,
            "n_pairs": len(v),
        }
        for cat, v in collected.items()
    }
    return {"pairs": pairs, "per_category": per_category}


def stable_features(
    selected: Mapping[int, Mapping[str, Sequence[int]]],
    to_reference: Mapping[int, Matching],
    reference_seed: int,
    min_seeds: int,
) -> dict[str, list[int]]:
    """Features (in the reference seed's index space) selected in >= `min_seeds` seeds.

    `to_reference[s]` maps seed s onto the reference seed (`match_decoders(W_s, W_ref)`); the
    reference seed needs no entry. A reference latent counts once per seed that selects a
    latent matched to it. Returns `{category: sorted reference indices}`.
    """
    categories = _check_categories(selected)
    if reference_seed not in selected:
        raise ValueError(f"reference seed {reference_seed} has no feature selection")
    if not 1 <= min_seeds <= len(selected):
        raise ValueError(f"min_seeds must be in [1, {len(selected)}], got {min_seeds}")
    for seed in selected:
        if seed != reference_seed and seed not in to_reference:
            raise ValueError(f"no matching from seed {seed} to reference seed {reference_seed}")
    result: dict[str, list[int]] = {}
    for cat in categories:
        counts: dict[int, int] = {}
        for seed, per_cat in selected.items():
            if seed == reference_seed:
                in_ref = set(int(i) for i in per_cat[cat])
            else:
                in_ref = to_reference[seed].map_features(per_cat[cat])
            for j in in_ref:
                counts[j] = counts.get(j, 0) + 1
        result[cat] = sorted(j for j, c in counts.items() if c >= min_seeds)
    return result


def feature_matches(
    features: Sequence[int], seed: int, matchings: Mapping[tuple[int, int], Matching], seeds: Sequence[int]
) -> dict[int, dict[int, tuple[int, float]]]:
    """For each latent of `seed` in `features`: `{other seed: (matched latent, decoder cosine)}` (Hungarian
    partner in every other seed of `seeds`; unmatched latents are left out)."""
    out: dict[int, dict[int, tuple[int, float]]] = {int(f): {} for f in features}
    for t in seeds:
        if t == seed:
            continue
        m = _pair_matching(matchings, seed, t)
        for f in out:
            if m.perm[f] >= 0:
                out[f][t] = (int(m.perm[f]), float(m.cosine[f]))
    return out


def consensus_features(
    selected: Mapping[int, Mapping[str, Sequence[int]]],
    matchings: Mapping[tuple[int, int], Matching],
    min_seeds: int,
    min_cosine: float,
) -> dict[int, dict[str, list[int]]]:
    """Per seed and category, the selected features the seeds agree on: `{seed: {category: ids}}`.

    A feature f selected for category c on seed s is matched in seed t when its Hungarian partner in t
    has decoder cosine >= `min_cosine` and t also selected that partner for c. It is kept when it is
    matched in at least `min_seeds` seeds, s itself included (so `min_seeds=1` keeps every selection).
    """
    categories = _check_categories(selected)
    seeds = sorted(selected)
    if not 1 <= min_seeds <= len(seeds):
        raise ValueError(f"min_seeds must be in [1, {len(seeds)}], got {min_seeds}")
    if not -1.0 <= min_cosine <= 1.0:
        raise ValueError(f"min_cosine must be in [-1, 1], got {min_cosine}")
    result: dict[int, dict[str, list[int]]] = {}
    for s in seeds:
        result[s] = {}
        for cat in categories:
            ids = [int(i) for i in selected[s][cat]]
            matches = feature_matches(ids, s, matchings, seeds)
            kept = []
            for f in ids:
                agree = sum(1 for t, (j, cos) in matches[f].items() if cos >= min_cosine and j in set(selected[t][cat]))
                if 1 + agree >= min_seeds:
                    kept.append(f)
            result[s][cat] = sorted(kept)
    return result
