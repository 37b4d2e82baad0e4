"""Data-dependent initialisation statistics (computed in float64): input scale and geometric median."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def input_scale_for(sample: Tensor) -> float:
    """Scale `s` such that `s * x` has mean squared norm `d_in` over the sample `(n, d_in)`.

    That is SAELens' "expected_average_only_in" convention: unit mean square per coordinate, so
    pre-activations and biases are O(1) whatever the model's residual norm.
    """
    x = sample.to(torch.float64)
    mean_sq_norm = float(x.pow(2).sum(dim=1).mean())
    if not math.isfinite(mean_sq_norm) or mean_sq_norm <= 0:
        raise ValueError(f"cannot normalise inputs: mean squared norm of the sample is {mean_sq_norm}")
    return math.sqrt(x.shape[1] / mean_sq_norm)


def geometric_median(points: Tensor, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """Weiszfeld's algorithm in float64.

    Args:
        points: `(n, d)` sample.
    Returns:
        `(d,)` float64 point minimising the sum of Euclidean distances to the sample.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty (n, d) sample, got shape {tuple(points.shape)}")
    x = points.to(torch.float64)
    median = x.mean(dim=0)
    for _ in range(max_iter):
        distances = (x - median).norm(dim=1).clamp_min(1e-12)  # (n,)
        weights = 1.0 / distances
        updated = (weights[:, None] * x).sum(dim=0) / weights.sum()
        shift = float((updated - median).norm())
        median = updated
        if shift <= tol * max(1.0, float(median.norm())):
            break
    return median
