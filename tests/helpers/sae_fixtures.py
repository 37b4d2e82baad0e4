"""Synthetic data and tiny activation stores for the SAE tests (no network, no model)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from activations.store import ShardWriter


def sparse_dictionary_data(
    n: int, d_in: int, n_atoms: int, active: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Rows that are sums of `active` random unit atoms with coefficients in [0.5, 1.5].

    Returns `x (n, d_in)` float32 and the true atoms `(n_atoms, d_in)`.
    """
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((n_atoms, d_in))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    chosen = np.argsort(rng.random((n, n_atoms)), axis=1)[:, :active]
    coeffs = rng.uniform(0.5, 1.5, size=(n, active))
    x = np.einsum("na,nad->nd", coeffs, atoms[chosen])
    return x.astype(np.float32), atoms.astype(np.float32)


def recovered_fraction(atoms: np.ndarray, W_dec: torch.Tensor, threshold: float = 0.9) -> float:
    """Share of true atoms whose best-matching decoder row has cosine > threshold."""
    dec = W_dec.detach().double().numpy()
    dec = dec / np.linalg.norm(dec, axis=1, keepdims=True)
    cos = atoms.astype(np.float64) @ dec.T  # (n_atoms, d_sae)
    return float((cos.max(axis=1) > threshold).mean())


def write_store(
    directory: Path,
    x: np.ndarray,
    layer: int = 3,
    categories: list[str] | np.ndarray | None = None,
    splits: list[str] | np.ndarray | None = None,
    rows_per_shard: int = 256,
    dtype: str = "float32",
) -> Path:
    """An activation store with one prompt (one `last` row) per row of `x (n, d_model)`."""
    n, d_model = x.shape
    categories = ["benign"] * n if categories is None else list(categories)
    splits = ["extract"] * n if splits is None else list(splits)
    writer = ShardWriter(
        directory, layers=[layer], d_model=d_model, dtype=dtype, positions="last",
        model_info={"id": "synthetic"}, rows_per_shard=rows_per_shard,
    )
    with writer:
        for i in range(n):
            writer.add_prompt(
                f"p{i}", categories[i], splits[i], positions=np.array([0]), token_ids=np.array([1]),
                activations={layer: x[i : i + 1]},
            )
    writer.finish()
    return Path(directory)


def two_category_store(directory: Path, layer: int = 3) -> Path:
    """700 rows (d_model 16) of a sparse dictionary: 600 extract rows (benign / safety alternating),
    100 calibrate rows, 200 rows per shard."""
    x, _ = sparse_dictionary_data(700, 16, 32, 2, seed=0)
    categories = ["benign" if i % 2 else "safety" for i in range(700)]
    splits = ["extract"] * 600 + ["calibrate"] * 100
    return write_store(directory, x, layer, categories, splits, rows_per_shard=200)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny tensors run fastest (and steadiest on a shared 2-core box) on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
