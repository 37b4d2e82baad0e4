"""Synthetic labelled rows for the probes tests: class k of PROBE_CLASSES lifts features 5k..5k+4."""
from __future__ import annotations

import numpy as np

from activations.records import CONTRAST, PROBE_CLASSES
from probes.rows import LabelledRows

BLOCK = 5


def informative(k: int) -> set[int]:
    """Feature ids planted for class index k."""
    return set(range(BLOCK * k, BLOCK * k + BLOCK))


def make_rows(split: str, n_per_class: int = 30, n_noise: int = 10, shift: float = 3.0,
              seed: int = 0, n_contrast: int = 0) -> LabelledRows:
    """Gaussian rows; class k gets +shift on its block; contrast rows look benign."""
    rng = np.random.default_rng(seed)
    d = BLOCK * len(PROBE_CLASSES) + n_noise
    cats, feats = [], []
    for k, name in enumerate(PROBE_CLASSES):
        x = rng.normal(size=(n_per_class, d))
        x[:, BLOCK * k:BLOCK * (k + 1)] += shift
        feats.append(x)
        cats += [name] * n_per_class
    if n_contrast:
        x = rng.normal(size=(n_contrast, d))
        x[:, 0:BLOCK] += shift
        feats.append(x)
        cats += [CONTRAST] * n_contrast
    n = len(cats)
    return LabelledRows(np.vstack(feats).astype(np.float32), np.array(cats), np.array([split] * n),
                        np.array([f"{split}-{seed}-{i}" for i in range(n)]))
