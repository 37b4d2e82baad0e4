"""SAE codes of activation rows: `encode_latents(sae, x)` (dense `(n, d_sae)` float32, in batches)
and `sae_summary(sae, z)` (width, architecture, mean L0, never-firing fraction)."""
from __future__ import annotations

import numpy as np
import torch
from activations.progress import progress_bar

from sae.model import SparseAutoencoder


@torch.no_grad()
def encode_latents(sae: SparseAutoencoder, x: np.ndarray, batch_size: int = 4096, desc: str = "encode") -> np.ndarray:
    """Dense SAE codes (n, d_sae) float32 of activations x (n, d_in), computed in batches on the SAE's device."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = sae.training
    sae.eval()
    out = np.empty((x.shape[0], sae.d_sae), dtype=np.float32)
    try:
        for start in progress_bar(range(0, x.shape[0], batch_size), desc=desc, unit="batch"):
            batch = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size], dtype=np.float32))
            z = sae.encode(batch.to(sae.device))
            out[start:start + batch.shape[0]] = z.float().cpu().numpy()
    finally:
        sae.train(was_training)
    if not np.isfinite(out).all():
        raise ValueError("SAE codes contain NaN or infinite values")
    return out


def sae_summary(sae: SparseAutoencoder, z: np.ndarray) -> dict[str, float | int | str]:
    """Width, architecture and mean L0 / never-firing fraction of codes z (n, d_sae)."""
    fires = z > 0
    return {"d_sae": sae.d_sae, "architecture": sae.cfg.architecture, "k": int(sae.cfg.k),
            "mean_l0": float(np.mean(fires.sum(axis=1), dtype=np.float64)),
            "never_fired_fraction": float(np.mean(~fires.any(axis=0), dtype=np.float64)), "n_rows": int(z.shape[0])}

