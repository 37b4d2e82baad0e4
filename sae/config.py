"""Configuration of SAE training: the SAE itself, its optimiser, its data, and the whole job.

- `SAEConfig`: shape, sparsity mechanism and loss coefficients of one SAE (every module reads it).
- `OptimConfig`: Adam, schedule and training path (`sae.module.SAELightningModule`).
- `DataConfig`: which rows, in which order, held where (`sae.data.ShardDataModule`).
- `TrainConfig`: the `train` stage's config (seeds, steps, the three above, checkpoints, logging);
  the pipeline's `train:` section and `refusal-sae train --train.*` are both this dataclass.

Each validates itself on creation, so a bad value stops with one clear `ValueError` before any
tensor is allocated. These dataclasses are the only place their defaults live.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from activations.positions import kind_codes

ARCHITECTURES: tuple[str, ...] = ("topk", "batchtopk", "relu", "jumprelu")
"""`topk`/`batchtopk` are trained here; `relu` (SAELens "standard") and `jumprelu` are only loaded."""

TRAINABLE_ARCHITECTURES: tuple[str, ...] = ("topk", "batchtopk")

Architecture = Literal["topk", "batchtopk", "relu", "jumprelu"]


@dataclass
class SAEConfig:
    """Shape, sparsity mechanism and loss terms of one SAE.

    Args:
        d_in: width of the activations (the model's d_model); None = taken from the activation
            store when training starts (`for_input`).
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
        batchtopk_row_cap: while training, BatchTopK keeps at most `batchtopk_row_cap * k` latents
            in one row (at inference the threshold alone decides, as in SAELens).
        threshold_momentum: EMA momentum of the BatchTopK inference threshold estimate.
        apply_b_dec_to_input: subtract b_dec before encoding (always true for SAEs trained here).
    """

    d_in: int | None = None
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
        if self.expansion_factor is not None and self.expansion_factor < 1:
            raise ValueError(f"expansion_factor must be >= 1, got {self.expansion_factor}")
        if self.d_in is None:  # the width checks wait for `for_input`
            return
        if not isinstance(self.d_in, int) or self.d_in < 1:
            raise ValueError(f"d_in must be a positive integer, got {self.d_in!r}")
        if self.d_sae is None and self.expansion_factor is None:
            raise ValueError("give either d_sae or expansion_factor for the SAE width")
        if self.d_sae is None:
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

    def for_input(self, d_in: int) -> "SAEConfig":
        """This config for activations of width `d_in` (validated); a different set d_in is an error."""
        if self.d_in is not None and self.d_in != d_in:
            raise ValueError(f"SAE d_in={self.d_in} does not match the activation store's d_model={d_in}")
        return replace(self, d_in=int(d_in))

    @property
    def num_latents(self) -> int:
        """d_sae as a plain int (set once d_in is known)."""
        if self.d_sae is None:
            raise ValueError("the SAE width is unknown until d_in is set (SAEConfig.for_input)")
        return int(self.d_sae)

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


INIT_B_DEC = ("geometric_median", "mean", "zeros")


@dataclass
class OptimConfig:
    """Adam, learning-rate schedule and training path of `sae.module.SAELightningModule`.

    Args:
        lr: Adam learning rate (None = 2e-4 / sqrt(d_sae / 2**14), Gao et al. 2024).
        lr_warmup_steps: linear warm-up length.
        lr_decay_frac: linear decay to 0 over this final fraction of the steps.
        adam_betas, adam_eps: Adam settings.
        init_b_dec: "geometric_median" (Weiszfeld on a data sample), "mean" or "zeros".
        check_finite_every_step: check the loss terms for NaN/inf every step (a host sync);
            otherwise at every logging interval and at the end (the error still names the first bad step).
        fused: train on the fused path (`sae/kernels/fused.py`); None = where supported (a CUDA
            device with Triton, one process). Same updates as the standard path, faster.
        exp_avg_dtype: first-moment dtype of the fused path's matrices ("bfloat16" moves fewer bytes).
        diverge_factor: training stops as diverged when fvu stays above this multiple of its
            first-step value for `diverge_steps` steps (or is above it at the last step).
        diverge_steps: consecutive diverged steps (fvu as above, or no latent firing) that stop
            training; 0 = no divergence check.
    """

    lr: float | None = None
    lr_warmup_steps: int = 100
    lr_decay_frac: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 6.25e-10
    init_b_dec: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    check_finite_every_step: bool = False
    fused: bool | None = None
    exp_avg_dtype: Literal["float32", "bfloat16"] = "float32"
    diverge_factor: float = 10.0
    diverge_steps: int = 50

    def __post_init__(self) -> None:
        if not (math.isfinite(self.diverge_factor) and self.diverge_factor > 1):
            raise ValueError(f"diverge_factor must be a finite number > 1, got {self.diverge_factor}")
        if self.diverge_steps < 0:
            raise ValueError(f"diverge_steps must be >= 0 (0 = no divergence check), got {self.diverge_steps}")
        self.adam_betas = (float(self.adam_betas[0]), float(self.adam_betas[1]))
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if not 0.0 <= self.lr_decay_frac < 1.0:
            raise ValueError(f"lr_decay_frac must be in [0, 1), got {self.lr_decay_frac}")
        if self.exp_avg_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"exp_avg_dtype must be float32 or bfloat16, got {self.exp_avg_dtype!r}")
        if self.init_b_dec not in INIT_B_DEC:
            raise ValueError(f"unknown init_b_dec {self.init_b_dec!r}; expected {', '.join(INIT_B_DEC)}")


DEVICE_DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass
class DataConfig:
    """Which activation rows the SAEs train on, in which order, and where they are held.

    Args:
        split: split name(s) to train on (None = every row).
        batch_size: rows per device per step.
        categories: optional category filter.
        position_kinds: position kinds trained on (prefix, content, suffix, response_start; see
            `activations.positions`); None = every row (needed for schema-1 stores, which lack kinds).
            The default never trains on the template prefix that every prompt shares.
        exclude_sink: leave out position 0 (the BOS / attention-sink token).
        drop_duplicates: train on one copy of rows whose activations are bitwise identical.
        in_memory: True / False, or None to decide from `memory_budget_gb`.
        memory_budget_gb: the largest device-resident copy `in_memory=None` allows.
        device_dtype: dtype of the device-resident copy (bfloat16 halves its memory).
        chunk_rows: rows of a shuffle block: the unit of contiguous reads (`sae/order.py`).
        window_chunks: blocks per shuffle window; a batch's rows come from the whole window.
        lanes: independent shuffle lanes of a window; the global batch takes an equal share of each
            and DDP ranks own whole lanes (so each reads 1/ranks of the data). The global batch must
            be a multiple of it, and it a multiple of the number of ranks.
        data_seed: seed of the row order.
        metrics_split: split for the final metrics (falls back to the training split if empty).
        metrics_rows: at most this many rows are used for the final metrics.
        init_rows: rows sampled for the data-dependent initialisation (b_dec, input scale).
        num_workers: background reader threads (streaming, and the start-up load of either mode).
    """

    split: str | list[str] | None = "extract"
    batch_size: int = 1024
    categories: list[str] | None = None
    position_kinds: list[str] | None = field(default_factory=lambda: ["content", "suffix", "response_start"])
    exclude_sink: bool = True
    drop_duplicates: bool = True
    in_memory: bool | None = None
    memory_budget_gb: float = 4.0
    device_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    chunk_rows: int = 4096
    window_chunks: int = 64
    lanes: int = 8
    data_seed: int = 0
    metrics_split: str | None = "calibrate"
    metrics_rows: int = 65536
    init_rows: int = 32768
    num_workers: int = 4

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.device_dtype not in DEVICE_DTYPE_NAMES:
            raise ValueError(f"unknown device_dtype {self.device_dtype!r}; expected one of {', '.join(DEVICE_DTYPE_NAMES)}")
        for name in ("chunk_rows", "window_chunks", "lanes", "metrics_rows", "init_rows", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.position_kinds is not None:
            if not self.position_kinds:
                raise ValueError("position_kinds is empty; list the kinds to train on, or null for every row")
            kind_codes(self.position_kinds)


LOGGERS = ("csv", "wandb", "tensorboard")


@dataclass
class TrainConfig:
    """The `train` stage: one SAE per seed on one layer of an activation store.

    Args:
        seeds: one SAE per seed (its weight initialisation); all train on the same batches.
        steps: optimiser steps.
        sae: the SAE (d_in = None: the store's d_model).
        optim: Adam and the training path.
        data: rows, order and placement.
        ckpt_every: steps between periodic checkpoints (`RUN/ckpt/step-<s>.ckpt`).
        ckpt_keep: periodic checkpoints kept on disk while training (the newest; 0 = none);
            `RUN/ckpt/last.ckpt`, written once at the end, replaces them.
        log_every_n_steps: steps between logged metrics.
        logger: "csv" (always written), "wandb" (also; offline unless WANDB_MODE=online) or
            "tensorboard" (also, into RUN/tensorboard; needs the tensorboard package).
        wandb_project: the W&B project name.
    """

    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = 1000
    sae: SAEConfig = field(default_factory=lambda: SAEConfig(expansion_factor=8))
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ckpt_every: int = 500
    ckpt_keep: int = 1
    log_every_n_steps: int = 50
    logger: Literal["csv", "wandb", "tensorboard"] = "csv"
    wandb_project: str = "refusal-sae"

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {self.seeds}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.ckpt_every < 1:
            raise ValueError(f"ckpt_every must be >= 1, got {self.ckpt_every}")
        if self.ckpt_keep < 0:
            raise ValueError(f"ckpt_keep must be >= 0, got {self.ckpt_keep}")
        if self.log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {self.log_every_n_steps}")
        if self.logger not in LOGGERS:
            raise ValueError(f"unknown logger {self.logger!r}; expected one of {', '.join(LOGGERS)}")
        if not self.sae.trainable:
            raise ValueError(f"architecture {self.sae.architecture!r} can be loaded but not trained; use topk or batchtopk")


def as_config(value: Any, cls: type) -> Any:
    """`value` as an instance of the dataclass `cls`: an instance, a dict of its fields, or None (defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
        return cls(**value)
    raise ValueError(f"expected a {cls.__name__} or a dict, got {type(value).__name__}")
