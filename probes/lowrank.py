"""Low-rank combination of category directions in a whitened, orthonormal basis (after arXiv 2603.13359).

Notation: Σ (d, d) is the activation covariance of the extract rows, Σ = Q Λ Qᵀ, and with a ridge r
(`eps` times the mean eigenvalue) the whitening matrix is W = Q (Λ + r)^{-1/2} Qᵀ (symmetric), with
exact inverse W⁻¹ = Q (Λ + r)^{1/2} Qᵀ ≈ Σ^{1/2}.

Two kinds of vectors map differently between raw and whitened coordinates (x̃ = W (x - μ)):
  * activation-space displacements (steering vectors, mean differences): a shift δ of x is a shift
    W δ of x̃. Conversely, adding α u to x̃ is the same as adding α W⁻¹ u = α Σ^{1/2} u to x.
    => a steering vector found in whitened space is mapped back with `unwhiten_direction` (Σ^{1/2} u).
  * read-out / probe directions (dual vectors): u · x̃ = (W u) · (x - μ), so the raw-space read-out is
    W u = Σ^{-1/2} u (`readout_direction`). It is NOT a steering vector.
Mapping a whitened steering direction back with W (or not at all) gives a vector outside the span of
the category directions; with Σ^{1/2} the round trip W⁻¹ W v = v is exact on their span.

`fit_lowrank_combination`:
  1. U = W V: whiten the category directions V (n_cat, d);
  2. orthonormalise: Uᵀ = B₀ R (QR), then SVD R = A S Cᵀ; B = B₀ A is an orthonormal basis of span(U)
     ordered by singular value; keep the first `rank` columns;
  3. mixing m (rank,), learned on the projected whitened extract rows x̃ B of refusal (y=1) vs benign
     (y=0) rows; û = B m / ||B m|| (sign: toward refusal). Two choices:
       "logistic" (default): L2 logistic regression on x̃ B (C = `mixing_C`) with sample weights;
       "lda": m = Cov(x̃ B)⁻¹ (μ̃_refusal - μ̃_benign) of the projected rows (least squares of y on
              [x̃ B, 1] up to scale). Because the whitening covariance is that of the same rows,
              Cov(x̃ B) = I and m = Bᵀ W (μ_refusal - μ_benign): at full rank the steering vector is
              exactly that mean difference.
     `balance` says what "refusal" weighs: "category" (default) gives every refusal category the same
     total weight (and refusal as a whole the weight of benign), so the refusal mean is the mean of
     the category means; "pooled" weighs rows (refusal mean = pooled over rows, CAA's "global").
     On data whose categories are balanced the two agree; when one category has many more rows,
     the pooled mean is pulled toward it and the category-balanced combination is not, so the
     learned combination then differs from the pooled mean difference.
     Whitening covariance: all extract rows used by the mixing (benign + refusal categories);
  4. magnitude: s = û · W(μ_refusal - μ_benign), the refusal shift along û in whitened units (same
     balance);
  5. steering vector v = Σ^{1/2} (s û) (raw coordinates). Because s û lies in span(W V),
     v = Σ_c β_c v_c lies in span(V); `category_weights` reports β.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from activations.records import BENIGN, REFUSAL_CATEGORIES
from probes.rows import LabelledRows, category_mean, require_split
from probes.vectors import SteeringVector


@dataclass(frozen=True)
class Whitener:
    """Whitening fitted on extract rows: mean (d,), eigvals (d,) of Σ, eigvecs (d, d), ridge r."""

    mean: np.ndarray
    eigvals: np.ndarray
    eigvecs: np.ndarray
    ridge: float

    def _scaled(self, v: np.ndarray, power: float) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        if v.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"whitener expects vectors of size {self.mean.shape[0]}, got shape {v.shape}")
        return ((v @ self.eigvecs) * (self.eigvals + self.ridge) ** power) @ self.eigvecs.T

    def whiten(self, x: np.ndarray) -> np.ndarray:
        """Whitened activations (n, d) = W (x - μ) for activations x (n, d)."""
        return self._scaled(np.asarray(x, dtype=np.float64) - self.mean, -0.5)

    def whiten_direction(self, v: np.ndarray) -> np.ndarray:
        """Displacement(s) (..., d) -> W v (no centring: a difference of activations)."""
        return self._scaled(v, -0.5)

    def unwhiten_direction(self, u: np.ndarray) -> np.ndarray:
        """Whitened displacement(s) (..., d) -> raw steering direction Σ^{1/2} u (exact inverse of W)."""
        return self._scaled(u, 0.5)

    def readout_direction(self, u: np.ndarray) -> np.ndarray:
        """Whitened read-out weights (..., d) -> raw read-out weights Σ^{-1/2} u (u·x̃ = result·(x-μ))."""
        return self._scaled(u, -0.5)


def covariance(features: np.ndarray, chunk_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Float64 mean (d,) and unbiased covariance (d, d) of features (n, d), accumulated in chunks."""
    n, d = features.shape
    if n < 2:
        raise ValueError(f"covariance needs at least 2 rows, got {n}")
    mean = np.mean(features, axis=0, dtype=np.float64)
    scatter = np.zeros((d, d), dtype=np.float64)
    for start in range(0, n, chunk_rows):
        centred = np.asarray(features[start:start + chunk_rows], dtype=np.float64) - mean
        scatter += centred.T @ centred
    return mean, scatter / (n - 1)


def fit_whitener(rows: LabelledRows, eps: float = 1e-6) -> Whitener:
    """Whitener from the covariance of all extract rows; ridge = eps * mean eigenvalue."""
    require_split(rows.splits, "extract", "whitener")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    mean, cov = covariance(rows.features)
    eigvals, eigvecs = np.linalg.eigh(cov)
    eigvals = np.clip(eigvals, 0.0, None)  # round-off can make tiny eigenvalues negative
    ridge = eps * float(eigvals.mean())
    if ridge + eigvals.min() <= 0:
        raise ValueError("activation covariance is singular; use eps > 0")
    return Whitener(mean, eigvals, eigvecs, ridge)


@dataclass(frozen=True)
class LowRankResult:
    """Output of `fit_lowrank_combination` (all float64).

    steering: (d,) raw-space steering vector Σ^{1/2} s û.     readout: (d,) raw read-out Σ^{-1/2} û.
    combined_whitened: (d,) s û.   basis_whitened: (d, rank) orthonormal.   mixing: (rank,) m.
    singular_values: (n_cat,).   category_weights: {category: β_c} with steering = Σ β_c v_c.
    per_category_lowrank: {category: (d,)} raw category directions projected on the rank-r subspace.
    """

    categories: tuple[str, ...]
    rank: int
    steering: np.ndarray
    readout: np.ndarray
    combined_whitened: np.ndarray
    basis_whitened: np.ndarray
    mixing: np.ndarray
    singular_values: np.ndarray
    category_weights: dict[str, float]
    per_category_lowrank: dict[str, np.ndarray]
    meta: dict[str, Any]

    def to_steering_vector(self, layer: int, model: str) -> SteeringVector:
        """The combined steering direction as a SteeringVector (category "lowrank")."""
        meta = {"model": model, "space": "residual", "category": "lowrank", "method": "lowrank_whitened",
                "rank": self.rank, "category_weights": self.category_weights, **self.meta}
        return SteeringVector(torch.from_numpy(self.steering), layer, meta)


def _orthonormal_basis(U: np.ndarray, tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal basis (d, k') of the row span of U (k, d), ordered by singular value, plus the values."""
    Q, R = np.linalg.qr(U.T)  # U.T = Q R, Q (d, k)
    A, S, _ = np.linalg.svd(R)
    keep = S > tol * max(S[0], 1e-300)
    return (Q @ A)[:, keep], S


def fit_lowrank_combination(
    rows: LabelledRows,
    directions: Mapping[str, np.ndarray | torch.Tensor | SteeringVector],
    rank: int | None = None,
    *,
    eps: float = 1e-6,
    refusal_categories: Sequence[str] = REFUSAL_CATEGORIES,
    mixing: str = "logistic",
    mixing_C: float = 1.0,
    whitener: Whitener | None = None,
    balance: str = "category",
) -> LowRankResult:
    """Combine category directions (each (d,)) into one steering vector; extract rows only.

    `rank` (default: all) is how many whitened basis vectors the mixing may use; `mixing` is
    "logistic" or "lda", `balance` "category" or "pooled" (module docstring). The whitener is fitted
    on the benign + refusal extract rows unless one is given.
    """
    require_split(rows.splits, "extract", "low-rank combination")
    if mixing not in ("logistic", "lda"):
        raise ValueError(f"mixing must be 'logistic' or 'lda', got {mixing!r}")
    if balance not in ("category", "pooled"):
        raise ValueError(f"balance must be 'category' or 'pooled', got {balance!r}")
    if not directions:
        raise ValueError("low-rank combination needs at least one category direction")
    names = tuple(directions)
    V = np.stack([_as_array(directions[n]) for n in names])  # (k, d)
    if V.shape[1] != rows.d:
        raise ValueError(f"directions have size {V.shape[1]}, activations have {rows.d} features")
    refusal = rows.category_mask(list(refusal_categories))
    benign = rows.category_mask(BENIGN)
    if not refusal.any() or not benign.any():
        raise ValueError("low-rank mixing needs extract rows of both benign and refusal categories")
    used = refusal | benign
    whitener = whitener or fit_whitener(rows.subset(used), eps)
    U = whitener.whiten_direction(V)
    basis, singular = _orthonormal_basis(U)
    if basis.shape[1] == 0:
        raise ValueError("all category directions are zero")
    r = basis.shape[1] if rank is None else int(rank)
    if not 1 <= r <= basis.shape[1]:
        raise ValueError(f"rank must be in [1, {basis.shape[1]}] (independent directions), got {rank}")
    B = basis[:, :r]

    P = whitener.whiten(rows.features[used]) @ B  # (n, r)
    weights = _row_weights(rows.categories[used], refusal[used], balance)
    m = _mixing_weights(P, refusal[used], weights, mixing, mixing_C)
    direction = B @ m
    if np.linalg.norm(direction) == 0:
        raise ValueError("the refusal/benign mixing fit gave a zero direction")
    u_hat = direction / np.linalg.norm(direction)
    shift = whitener.whiten_direction(_refusal_mean(rows, refusal_categories, balance) - category_mean(rows, BENIGN))
    s = float(u_hat @ shift)
    if s < 0:
        u_hat, s = -u_hat, -s
    combined = s * u_hat

    beta, *_ = np.linalg.lstsq(U.T, combined, rcond=None)  # combined = U.T @ beta (it lies in span(U))
    projector = B @ B.T
    return LowRankResult(
        categories=names, rank=r,
        steering=whitener.unwhiten_direction(combined),
        readout=whitener.readout_direction(u_hat),
        combined_whitened=combined, basis_whitened=B, mixing=m, singular_values=singular,
        category_weights={n: float(b) for n, b in zip(names, beta)},
        per_category_lowrank={n: whitener.unwhiten_direction(projector @ U[i]) for i, n in enumerate(names)},
        meta={"eps": eps, "ridge": whitener.ridge, "mixing": mixing, "balance": balance, "whitened_shift": s,
              "splits": rows.provenance()},
    )


def _row_weights(categories: np.ndarray, y: np.ndarray, balance: str) -> np.ndarray:
    """Sample weights (n,) summing to 1: benign rows share 1/2, refusal rows 1/2, the latter split
    equally over the refusal categories present ("category") or over the rows ("pooled")."""
    weights = np.where(y, 0.0, 0.5 / max(int((~y).sum()), 1))
    if balance == "pooled":
        return np.where(y, 0.5 / int(y.sum()), weights)
    present = sorted(set(categories[y].tolist()))
    for c in present:
        mask = y & (categories == c)
        weights[mask] = 0.5 / (len(present) * int(mask.sum()))
    return weights


def _refusal_mean(rows: LabelledRows, categories: Sequence[str], balance: str) -> np.ndarray:
    """Mean refusal activation (d,): of the rows ("pooled") or of the present categories' means ("category")."""
    if balance == "pooled":
        return category_mean(rows, list(categories))
    present = [c for c in categories if rows.category_mask(c).any()]
    return np.mean([category_mean(rows, c) for c in present], axis=0)


def _mixing_weights(P: np.ndarray, y: np.ndarray, weights: np.ndarray, mixing: str, C: float) -> np.ndarray:
    """Mixing weights (r,) separating y=True from y=False rows of projected coordinates P (n, r),
    each row weighted by `weights` (n,) (the class means of "lda" are weighted means)."""
    if mixing == "lda":
        cov = np.atleast_2d(np.cov(P, rowvar=False))
        w1, w0 = weights * y, weights * ~y
        diff = (w1 @ P) / w1.sum() - (w0 @ P) / w0.sum()
        return np.linalg.lstsq(cov, diff, rcond=None)[0]
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, max_iter=1000)
    model.fit(P, y.astype(np.int64), sample_weight=weights * len(y))  # mean weight 1, as class_weight="balanced"
    return model.coef_[0].astype(np.float64)


def _as_array(v: np.ndarray | torch.Tensor | SteeringVector) -> np.ndarray:
    if isinstance(v, SteeringVector):
        v = v.vector
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().double().numpy()
    v = np.asarray(v, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"a category direction must have shape (d,), got {v.shape}")
    return v
