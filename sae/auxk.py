"""AuxK (Gao et al. 2024) computed over the dead latents only.

The auxiliary reconstruction uses the top-k_aux pre-activations among the *dead* latents. Rather
than masking the full `(batch, d_sae)` pre-activation matrix and running a top-k_aux (k_aux is
d_in / 2 by default: 2048 for d_in 4096) over all latents, followed by a gather decode of k_aux rows
per batch row, this module gathers the dead latents' encoder and decoder rows and works densely on
them:

    pre_dead = (s x - b_dec) @ W_enc_rows[dead]ᵀ + b_enc[dead]      (batch, n_dead)
    codes    = ReLU(top-k_aux of pre_dead per row)                  (zeros elsewhere; no top-k when
                                                                    every dead latent is kept)
    aux_x_hat = codes @ W_dec[dead] / s                             (batch, d_in)

which selects the same latents and costs a few small matmuls while few latents are dead. The dead
ids come from `LatentTracker.dead_ids()` without a host sync.
Gradients reach the encoder (W_enc rows, b_enc, and b_dec through the input) and the decoder rows
of the dead latents, read through `sae.weight_rows` (on the fused path their gradients go to the
SAE's `DeferredGrads` as dense row blocks). `sae` is a `sae.model.SparseAutoencoder`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.kernels.csr import compute_dtype_for
from sae.kernels.latent_shard import LatentShard, copy_to_shards, gather_columns, reduce_from_shards


ALIGN = 64
"""The dead set is padded to a multiple of this many latents (inert zero rows): aligned matmuls."""


def dead_latent_reconstruction(
    sae: Any, x: Tensor, dead: Tensor, n_dead: int | None = None, shard: LatentShard | None = None,
) -> tuple[Tensor, Tensor] | None:
    """`(aux_x_hat (batch, d_in), aux_scale)` from the top-k_aux dead latents, or None when none is dead.

    Args:
        x: `(batch, d_in)` raw input; dead: `(n,)` int64 distinct ids of the dead latents.
        shard: latent-parallel (`sae/kernels/latent_shard.py`): `dead` are this shard's dead latents
            as local row ids (n may be 0) and `n_dead` the number dead over all shards; the result is
            the same as one device's over all of them. When more than k_aux are dead, each row's
            k_aux-th largest dead pre-activation over all shards comes from every shard's top k_aux
            values (one all-gather of `(batch, k_aux)` values) and each shard keeps its entries at or
            above it; the shards' decodes are summed.

    Returns:
        aux_x_hat in raw-activation units (no bias) and aux_scale = min(n_dead / k_aux, 1) (a float32
        CPU scalar: no host-to-device copy), which down-weights the loss while few latents are dead.
    """
    n_local = dead.shape[0]
    n_dead = n_local if n_dead is None else n_dead
    if n_dead == 0:
        return None
    blocks = -(-n_local // ALIGN)
    padded = max(blocks, 1 if shard is not None else 0) * ALIGN  # a shard with none dead still joins the collectives
    pad_rows = (0, 0, 0, padded - n_local)  # inert zero rows up to the aligned size
    dtype = compute_dtype_for(x, sae.dtype)
    x_scaled = sae.scale_input(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        w_enc = F.pad(sae.weight_rows("W_enc_rows", dead), pad_rows).to(dtype)  # (padded, d_in)
        bias = F.pad(sae.b_enc[dead], (0, padded - n_local), value=float("-inf"))  # padding: never selected, code 0
        if sae.cfg.apply_b_dec_to_input:  # (x - b_dec) @ wᵀ = x @ wᵀ - w @ b_dec: b_dec's gradient is a GEMV
            b_dec = sae.b_dec if shard is None else copy_to_shards(sae.b_dec)  # the shards' parts are summed
            bias = bias - (w_enc @ b_dec.to(dtype)).to(bias.dtype)
        pre = torch.addmm(bias.to(dtype), x_scaled.to(dtype), w_enc.t())  # (batch, padded)
        k_aux = min(sae.cfg.auxk_k, n_dead)
        if k_aux == n_dead:  # every dead latent is among the top-k_aux
            codes = F.relu(pre)
        elif shard is None:
            values, positions = pre.topk(k_aux, dim=-1, sorted=False)
            codes = torch.zeros_like(pre).scatter(1, positions, F.relu(values))
        else:
            k_local = min(k_aux, padded)
            top = F.pad(pre.detach().topk(k_local, dim=-1, sorted=False).values, (0, k_aux - k_local),
                        value=float("-inf"))
            threshold = gather_columns(top, shard.world).topk(k_aux, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
            codes = torch.where(pre >= threshold, F.relu(pre), torch.zeros_like(pre))
        w_dec = F.pad(sae.weight_rows("W_dec", dead), pad_rows).to(dtype)
        decoded = (codes @ w_dec).to(torch.float32)
        if shard is not None:
            decoded = reduce_from_shards(decoded)
    aux_scale = torch.tensor(min(n_dead / sae.cfg.auxk_k, 1.0), dtype=torch.float32)
    return sae.unscale_output(decoded), aux_scale
