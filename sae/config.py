"""Configuration of one sparse autoencoder (architecture + loss coefficients).

`SAEConfig` is a small dataclass that every other module reads; it validates itself on creation so
that a bad value stops with one clear `ValueError` before any tensor is allocated.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

ARCHITECTURES: tuple[str, ...] = ("topk", "batchtopk", "relu", "jumprelu")
"""`topk`/`batchtopk` are trained here; `relu` (SAELens "standard") and `jumprelu` are only loaded."""

TRAINABLE_ARCHITECTURES: tuple[str, ...] = ("topk", "batchtopk")

Architecture = Literal["topk", "batchtopk", "relu", "jumprelu"]


@dataclass
class SAEConfig:
    """Shape, sparsity mechanism and loss terms of one SAE.

    Args:
        d_in: width of the activations (the model's d_model).
        d_sae: number of latents; give this or `expansion_factor` (d_sae = d_in * expansion_factor).
        expansion_factor: see `d_sae`.
        k: active latents per row (TopK) or mean active latents per row (BatchTopK).
        architecture: "topk" | "batchtopk" (trainable) | "relu" | "jumprelu" (loaded SAELens SAEs).
        l1_coeff: weight of the L1 penalty on latent activations (0 = off; TopK needs none).
        auxk_coeff: weight of the AuxK loss (Gao et al. 2024) that revives dead latents (0 = off).
        auxk_k: dead latents used by AuxK per row; default min(d_in // 2, d_sae).
        dead_tokens_threshold: a latent that has not fired for this many rows is "dead".
        contrastive_coeff: weight of the supervised contrastive term on codes (0 = off).
        contrastive_temperature: temperature of that term (cosine similarities are divided by it).
        normalize_input: scale inputs to mean squared norm d_in during training (the scale is
            folded into the weights at export, so exported SAEs take raw activations).
        batchtopk_row_cap: BatchTopK keeps at most `batchtopk_row_cap * k` latents in one row.
        threshold_momentum: EMA momentum of the BatchTopK inference threshold estimate.
        apply_b_dec_to_input: subtract b_dec before encoding (always true for SAEs trained here).
    """

    d_in: int
    d_sae: int | None = None
    expansion_factor: int | None = None
    k: int = 32
    architecture: Architecture = "topk"
    l1_coeff: float = 0.0
    auxk_coeff: float = 0.0
    auxk_k: int | None = None
    dead_tokens_threshold: int = 10_000_000
    contrastive_coeff: float = 0.0
    contrastive_temperature: float = 0.1
    normalize_input: bool = False
    batchtopk_row_cap: int = 4
    threshold_momentum: float = 0.01
    apply_b_dec_to_input: bool = True

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown SAE architecture {self.architecture!r}; expected one of {', '.join(ARCHITECTURES)}"
            )
        if not isinstance(self.d_in, int) or self.d_in < 1:
            raise ValueError(f"d_in must be a positive integer, got {self.d_in!r}")
        if self.d_sae is None and self.expansion_factor is None:
            raise ValueError("give either d_sae or expansion_factor for the SAE width")
        if self.d_sae is None:
            if self.expansion_factor < 1:  # type: ignore[operator]
                raise ValueError(f"expansion_factor must be >= 1, got {self.expansion_factor}")
            self.d_sae = self.d_in * int(self.expansion_factor)  # type: ignore[arg-type]
        elif self.expansion_factor is not None and self.d_sae != self.d_in * self.expansion_factor:
            raise ValueError(
                f"d_sae={self.d_sae} contradicts expansion_factor={self.expansion_factor} for d_in={self.d_in}; give one"
            )
        if self.d_sae < 1:
            raise ValueError(f"d_sae must be >= 1, got {self.d_sae}")
        if self.architecture in TRAINABLE_ARCHITECTURES:
            if self.k < 1:
                raise ValueError(f"k must be >= 1, got {self.k}")
            if self.k >= self.d_sae:
                raise ValueError(f"k={self.k} must be smaller than the number of latents d_sae={self.d_sae}")
        if self.auxk_k is None:
            self.auxk_k = min(self.d_in // 2, self.d_sae)
        if not 1 <= self.auxk_k <= self.d_sae:
            raise ValueError(f"auxk_k must be in [1, d_sae={self.d_sae}], got {self.auxk_k}")
        for name in ("l1_coeff", "auxk_coeff", "contrastive_coeff"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if not math.isfinite(self.contrastive_temperature) or self.contrastive_temperature <= 0:
            raise ValueError(f"contrastive_temperature must be > 0, got {self.contrastive_temperature}")
        if self.dead_tokens_threshold < 1:
            raise ValueError(f"dead_tokens_threshold must be >= 1, got {self.dead_tokens_threshold}")
        if self.batchtopk_row_cap < 1:
            raise ValueError(f"batchtopk_row_cap must be >= 1, got {self.batchtopk_row_cap}")
        if not 0 < self.threshold_momentum <= 1:
            raise ValueError(f"threshold_momentum must be in (0, 1], got {self.threshold_momentum}")

    @property
    def num_latents(self) -> int:
        """d_sae as a plain int (always set after validation)."""
        return int(self.d_sae)  # type: ignore[arg-type]

    @property
    def trainable(self) -> bool:
        return self.architecture in TRAINABLE_ARCHITECTURES

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (expansion_factor dropped: d_sae is always explicit)."""
        out = asdict(self)
        out["expansion_factor"] = None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SAEConfig":
        """Build from a dict; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SAE config key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        return cls(**data)


def default_lr(d_sae: int) -> float:
    """Adam learning rate scaled with width as in Gao et al. (2024): 2e-4 / sqrt(d_sae / 2**14)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)
