"""The sparse autoencoder: parameters, encode / decode, decoder constraints.

Shapes follow SAELens: `W_enc (d_in, d_sae)`, `b_enc (d_sae,)`, `W_dec (d_sae, d_in)`, `b_dec (d_in,)`.
The encoder is stored by latent rows, `W_enc_rows (d_sae, d_in)`, and `W_enc` is its transposed view:
row-major latent directions make every sparse gather and weight gradient contiguous (no transposes).

    pre   = (s * x - b_dec) @ W_enc + b_enc               (s = input scale, 1 unless normalize_input)
    z     = TopK / BatchTopK / ReLU / JumpReLU of pre
    x_hat = (z @ W_dec + b_dec) / s

Training encodes and decodes through `self.kernels`: the sparse path (`sae/kernels/csr.py`), or after
`use_fused_training()` the fused one (`sae/kernels/fused.py`: matrix gradients deferred to `FusedAdam`);
`encode`/`decode` give the dense `(batch, d_sae)` form for analysis. With normalize_input, latent values are in the
scaled units until `fold_input_scale()` (done at export) turns them into raw-activation units.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae.auxk import dead_latent_reconstruction
from sae.config import SAEConfig
from sae.initialization import geometric_median, input_scale_for
from sae.kernels.csr import SPARSE_KERNELS, SparseKernels, compute_dtype_for
from sae.kernels.fused import DeferredGrads, FusedKernels
from sae.kernels.latent_shard import LatentShard, ShardedKernels


class ForwardOutput(NamedTuple):
    """Result of `SparseAutoencoder.forward` (all in raw-activation units except latent values)."""

    x_hat: Tensor
    """`(batch, d_in)` reconstruction."""
    latent_values: Tensor
    """`(batch, n_sel)` activations of the selected latents (zeros allowed)."""
    latent_indices: Tensor
    """`(batch, n_sel)` int64 ids of those latents."""
    fvu: Tensor
    """Fraction of variance unexplained over the batch, float32 scalar."""
    aux_x_hat: Tensor | None
    """`(batch, d_in)` reconstruction of the residual from the top-k_aux dead latents (no bias), or None."""
    aux_scale: Tensor | None
    """min(num_dead / k_aux, 1): AuxK weight when few latents are dead, or None."""
    d_sae: int

    @property
    def z(self) -> Tensor:
        """Dense codes `(batch, d_sae)` (built on demand)."""
        dense = self.latent_values.new_zeros(self.latent_values.shape[0], self.d_sae)
        return dense.scatter_add(1, self.latent_indices, self.latent_values)


def total_variance(x: Tensor) -> Tensor:
    """`sum_b ||x_b - mean(x)||²` of a `(batch, d)` float32 batch, in one reduction (no gradient)."""
    with torch.no_grad():
        return x.var(dim=0, unbiased=False).sum() * x.shape[0]


class SparseAutoencoder(nn.Module):
    """TopK / BatchTopK SAE (trainable) that can also hold loaded ReLU / JumpReLU SAEs.

    Args:
        cfg: the SAE configuration.
        seed: seed of the weight initialisation (a CPU generator, so identical on every device).
        device, dtype: where and in which dtype the parameters live.
        init_weights: False leaves the weights zero (faster when they are loaded right after).
    """

    def __init__(
        self,
        cfg: SAEConfig,
        seed: int = 0,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        init_weights: bool = True,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.num_latents
        if init_weights:  # decoder rows: random unit vectors; encoder = decoder transpose
            generator = torch.Generator().manual_seed(int(seed))
            W_dec = torch.randn(d_sae, d_in, generator=generator, dtype=torch.float32)
            W_dec /= W_dec.norm(dim=1, keepdim=True)
        else:
            W_dec = torch.zeros(d_sae, d_in, dtype=torch.float32)
        self.W_enc_rows = nn.Parameter(W_dec.clone().to(device=device, dtype=dtype))  # W_enc = W_decᵀ at init
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device, dtype=dtype))
        self.W_dec = nn.Parameter(W_dec.to(device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))
        self.register_buffer("input_scale", torch.ones((), device=device, dtype=torch.float32))
        self.register_buffer("threshold", torch.zeros(d_sae, device=device, dtype=dtype))
        self.register_buffer("threshold_seen", torch.zeros((), device=device, dtype=torch.bool))
        self.deferred: DeferredGrads | None = None  # set by use_fused_training()
        self.shard: LatentShard | None = None  # set by shard_latents()

    def use_fused_training(self, enabled: bool = True) -> None:
        """Train on the fused path (`sae/kernels/fused.py`): matrix gradients are deferred to `FusedAdam`."""
        self.deferred = DeferredGrads() if enabled else None

    @torch.no_grad()
    def shard_latents(self, shard: LatentShard) -> None:
        """Keep only latents `[shard.lo, shard.hi)` of W_enc_rows, b_enc and W_dec (latent-parallel
        training, `sae/kernels/latent_shard.py`); b_dec and the input scale stay whole (replicated)."""
        if self.cfg.architecture != "topk":
            raise ValueError(f"latent_parallel trains topk SAEs only, not {self.cfg.architecture!r}")
        if shard.total != self.d_sae:
            raise ValueError(f"latent shard of {shard.total} latents for an SAE of {self.d_sae}")
        for name in ("W_enc_rows", "b_enc", "W_dec"):
            setattr(self, name, nn.Parameter(getattr(self, name).detach()[shard.lo:shard.hi].clone()))
        self.shard = shard

    @property
    def kernels(self) -> SparseKernels | FusedKernels | ShardedKernels:
        """The training primitives in use (top-k encode, sparse decode, weight rows): the fused ones
        while training after `use_fused_training()` (latent-sharded after `shard_latents()`), the
        standard sparse ones otherwise."""
        fused = self.deferred is not None and self.training and torch.is_grad_enabled()
        if self.shard is not None:
            if not fused:
                raise RuntimeError("a latent-sharded SAE only trains (fused path); gather its shards to use it "
                                   "(sae.latent_parallel.gather_sae)")
            return ShardedKernels(self.deferred, self.shard)  # type: ignore[arg-type]
        if fused:
            return FusedKernels(self.deferred)  # type: ignore[arg-type]
        return SPARSE_KERNELS

    def weight_rows(self, name: str, ids: Tensor) -> Tensor:
        """`(n, d_in)` rows `ids` of "W_enc_rows" or "W_dec", differentiable on either path (AuxK)."""
        return self.kernels.rows(self, name, ids)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.num_latents

    @property
    def W_enc(self) -> Tensor:
        """`(d_in, d_sae)` encoder matrix (a view of `W_enc_rows`; in-place edits reach the parameter)."""
        return self.W_enc_rows.t()

    @property
    def device(self) -> torch.device:
        return self.W_enc_rows.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc_rows.dtype

    # ---- encoding -----------------------------------------------------------------------------
    def check_input(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"SAE input must have shape (batch, {self.d_in}), got {tuple(x.shape)}")

    def scale_input(self, x: Tensor) -> Tensor:
        """`x` in the parameters' dtype times the input scale (the scale is only ever set, and
        applied, with cfg.normalize_input: otherwise no elementwise pass)."""
        x = x.to(self.dtype)
        return x * self.input_scale.to(self.dtype) if self.cfg.normalize_input else x

    def unscale_output(self, y: Tensor) -> Tensor:
        """A reconstruction in scaled units → raw units (the inverse of `scale_input`)."""
        return y / self.input_scale.to(y.dtype) if self.cfg.normalize_input else y

    def encoder_input(self, x: Tensor) -> Tensor:
        """`(batch, d_in)` → scaled and (optionally) b_dec-centred encoder input."""
        self.check_input(x)
        x = self.scale_input(x)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_acts(self, x: Tensor) -> Tensor:
        """Dense encoder pre-activations `(batch, d_sae)`."""
        x_in = self.encoder_input(x)
        dtype = compute_dtype_for(x_in, self.dtype)
        return torch.addmm(self.b_enc.to(dtype), x_in.to(dtype), self.W_enc.to(dtype))

    @property
    def _dense_path(self) -> bool:
        """True when codes come from a threshold (ReLU, JumpReLU, BatchTopK at inference), not a top-k."""
        arch = self.cfg.architecture
        return arch in ("relu", "jumprelu") or (arch == "batchtopk" and not self.training)

    def _sparse_from_dense(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        """Dense codes → (values, indices) holding every non-zero code.

        BatchTopK at inference: width = the most latents active in any row of the batch (rows with
        fewer are padded with zero values), so no row loses a latent above the threshold (the rule
        SAELens applies to a BatchTopK SAE, saved as JumpReLU; one host sync). Otherwise all latents.
        """
        if self.cfg.architecture == "batchtopk":
            width = max(1, int((codes != 0).sum(dim=-1).max())) if codes.numel() else 1
            return codes.topk(min(self.d_sae, width), dim=-1, sorted=False)
        return codes, torch.arange(self.d_sae, device=codes.device).expand_as(codes)

    def _dense_codes(self, x: Tensor) -> Tensor:
        """ReLU / JumpReLU codes `(batch, d_sae)` (also BatchTopK at inference)."""
        pre = self.pre_acts(x)
        codes = F.relu(pre)
        if self.cfg.architecture in ("jumprelu", "batchtopk"):
            codes = codes * (pre > self.threshold.to(pre.dtype))
        return codes

    def _select(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Sparse codes `(values, indices)` (post-ReLU values) of the trainable architectures."""
        arch = self.cfg.architecture
        if self._dense_path:
            return self._sparse_from_dense(self._dense_codes(x))
        per_row = self.cfg.k if arch == "topk" else min(self.d_sae, self.cfg.k * self.cfg.batchtopk_row_cap)
        pre_values, indices = self.kernels.topk(self, x, per_row)
        values = F.relu(pre_values)
        if arch == "batchtopk":
            values = self._batch_topk_mask(values)
        return values, indices

    def _batch_topk_mask(self, values: Tensor) -> Tensor:
        """Keep the `k * batch` largest activations of the whole batch; update the inference threshold."""
        flat = values.reshape(-1)
        top = flat.detach().topk(min(self.cfg.k * values.shape[0], flat.numel()), sorted=False)
        keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, top.indices, True).view_as(values)
        with torch.no_grad():  # running estimate of the smallest selected activation, no host sync
            smallest = torch.where(top.values > 0, top.values, torch.inf).min().to(self.threshold.dtype)
            found = torch.isfinite(smallest)
            current = self.threshold[0]
            momentum = self.cfg.threshold_momentum
            blended = torch.where(self.threshold_seen, (1 - momentum) * current + momentum * smallest, smallest)
            self.threshold.copy_(torch.where(found, blended, current).expand_as(self.threshold))
            self.threshold_seen |= found
        return values * keep

    def encode_topk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Sparse codes: `values (batch, n)`, `indices (batch, n)`; dense-scattered they equal `encode(x)`.

        n = k for TopK; for BatchTopK, k · batchtopk_row_cap while training (the batch-wide top-k)
        and, at inference, the most latents any row has above the threshold; d_sae for ReLU / JumpReLU.
        """
        values, indices = self._select(x)
        return values, indices

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes `(batch, d_sae)`: k non-zeros per row for TopK (at most, if some are <= 0)."""
        if self._dense_path:
            return self._dense_codes(x)
        values, indices = self.encode_topk(x)
        return values.new_zeros(values.shape[0], self.d_sae).scatter_add(1, indices, values)

    # ---- decoding -----------------------------------------------------------------------------
    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """`(batch, n)` values / indices → `(batch, d_in)` reconstruction in raw units (float32)."""
        return self.unscale_output(self.kernels.decode(self, values, indices))

    def decode(self, z: Tensor) -> Tensor:
        """Dense codes `(batch, d_sae)` → `(batch, d_in)` reconstruction in raw units."""
        dtype = compute_dtype_for(z, self.dtype)
        return self.unscale_output(torch.addmm(self.b_dec.to(dtype), z.to(dtype), self.W_dec.to(dtype)))

    def forward(self, x: Tensor, dead_mask: Tensor | None = None, dead_ids: Tensor | None = None,
                variance: Tensor | None = None, n_dead: int | None = None) -> ForwardOutput:
        """Encode, decode and score a batch `x (batch, d_in)`.

        Args:
            dead_mask: `(d_sae,)` bool of dead latents, or dead_ids: their `(n_dead,)` int64 ids
                (`LatentTracker.dead_ids()`, found without a host sync; from a mask the ids are read
                with one). With auxk_coeff > 0 the AuxK reconstruction of the residual uses them.
            variance: the FVU denominator (default: the batch's total variance; data-parallel ranks
                pass the global batch's, `sae.step.ddp_variance`).
            n_dead: latent-sharded SAE only: the number of dead latents over all shards (`dead_ids`
                then holds this shard's, as local row ids: `LatentTracker.shard_dead_ids`).
        """
        use_aux = self.cfg.auxk_coeff > 0 and not self._dense_path
        if use_aux and dead_ids is None and dead_mask is not None:
            dead_ids = dead_mask.nonzero().squeeze(1)
        if self._dense_path:
            codes = self._dense_codes(x)
            x_hat = self.decode(codes)
            values, indices = self._sparse_from_dense(codes)
        else:
            values, indices = self._select(x)
            x_hat = self.decode_sparse(values, indices)
        target = x.to(torch.float32)
        denominator = total_variance(target) if variance is None else variance
        fvu = F.mse_loss(x_hat.to(torch.float32), target, reduction="sum") / denominator
        aux = None
        if use_aux and dead_ids is not None:
            aux = dead_latent_reconstruction(self, x, dead_ids, n_dead if self.shard is not None else None, self.shard)
        aux_x_hat, aux_scale = aux if aux is not None else (None, None)
        return ForwardOutput(x_hat, values, indices, fvu, aux_x_hat, aux_scale, self.d_sae)

    # ---- decoder constraint -------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit L2 norm."""
        norms = self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)
        self.W_dec.div_(norms)

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the part of W_dec's gradient parallel to each (unit-norm) decoder row."""
        grad = self.W_dec.grad
        if grad is None:
            return
        parallel = torch.einsum("sd,sd->s", grad, self.W_dec.detach())  # (d_sae,), no (d_sae, d_in) temporary
        grad.addcmul_(parallel.unsqueeze(1), self.W_dec.detach(), value=-1.0)

    # ---- data-dependent initialisation and export ---------------------------------------------
    @torch.no_grad()
    def init_input_scale(self, sample: Tensor) -> float:
        """Set the input scale from a sample `(n, d_in)` (only when cfg.normalize_input)."""
        scale = input_scale_for(sample) if self.cfg.normalize_input else 1.0
        self.input_scale.fill_(scale)
        return scale

    @torch.no_grad()
    def init_b_dec_geometric_median(self, sample: Tensor) -> None:
        """Set b_dec to the geometric median (Weiszfeld, float64) of the scaled sample `(n, d_in)`."""
        scaled = sample.to(torch.float64) * float(self.input_scale)
        self.b_dec.copy_(geometric_median(scaled).to(self.b_dec))

    @torch.no_grad()
    def folded_state(self) -> dict[str, Tensor]:
        """Weights with the input scale folded in (scale 1, decoder rows untouched).

        pre' = pre / s, so b_enc, b_dec and the threshold are divided by s; x_hat is unchanged
        and latent values become raw-activation units.
        """
        s = float(self.input_scale)
        state = {
            "W_enc": self.W_enc.detach().contiguous(),
            "b_enc": self.b_enc.detach() / s,
            "W_dec": self.W_dec.detach().clone(),
            "b_dec": self.b_dec.detach() / s,
        }
        if self.cfg.architecture in ("batchtopk", "jumprelu"):
            state["threshold"] = self.threshold.detach() / s
        return state

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """Fold the input scale into the weights in place (see `folded_state`)."""
        state = self.folded_state()
        for name, value in state.items():
            getattr(self, name).copy_(value)
        self.input_scale.fill_(1.0)
