"""Steering vectors and SAEs that intervene on a model inside a `with` block.

    with vector.apply(model, alpha=4.0):          # adds 4 · v to the residual stream after vector.layer
        out = model.generate(**batch)
    with sae.ablate(model, [12, 40]):             # zeroes those latents at sae.layer (error term kept)
        ...

`model` is a transformers causal LM (or an `activations.adapter.ModelAdapter`). Both are built on
`analysis.interventions` (`steer`, `ablate_features`, `clamp_features`, `steer_sae`), i.e. the one
hook context manager `activations.hooks.residual_hooks`: the model is exactly restored on exit, also
when the body raises, and nested blocks compose.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from activations.adapter import ModelAdapter
from probes.vectors import SteeringVector, VectorSet


def as_adapter(model: Any) -> ModelAdapter:
    """A `ModelAdapter` of a transformers causal LM (an adapter is returned as it is)."""
    return model if isinstance(model, ModelAdapter) else ModelAdapter(model)


class Vector(SteeringVector):
    """A `probes.vectors.SteeringVector` (direction `(d_model,)` float32 at block `layer`, `meta`)
    that can steer a model: `with vector.apply(model, alpha=...)`. Arithmetic keeps the type."""

    @classmethod
    def of(cls, vector: SteeringVector) -> "Vector":
        return vector if isinstance(vector, cls) else cls(vector.vector, vector.layer, vector.meta)

    @contextmanager
    def apply(self, model: Any, alpha: float = 1.0, positions: str = "all", operator: str = "add",
              layer: int | None = None) -> Iterator[None]:
        """Steer `model` while the block is open: x ← x + alpha · v after block `layer` (default: the
        vector's own layer).

        Args:
            positions: "all" (prompt and generated tokens) or "generated" (the last prompt token and
                every generated one; needs the KV cache, as `generate` uses by default).
            operator: "add"; "ablate" (x − alpha (x·v̂) v̂); "ablate_then_add" (x − (x·v̂) v̂ + alpha v).
            layer: steer at another layer on purpose.
        """
        from analysis.interventions import steer

        target = self.layer if layer is None else int(layer)
        direction = self if target == self.layer else self.vector
        with steer(as_adapter(model), target, direction, alphas=float(alpha), positions=positions, operator=operator):
            yield


def load_vectors(path: str | Path) -> dict[str, Vector]:
    """`{name: Vector}` of a vector-set folder (`RUN/vectors/residual`, `refusal-sae vectors` output)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"vector-set folder not found: {folder}")
    return {name: Vector.of(v) for name, v in VectorSet.load(folder).items()}


def feature_ids(features: Any, sae: "SAE | None" = None) -> list[int]:
    """Latent ids from a list of ints, or from a features.json (path, selection folder or parsed dict):
    the union of the refusal categories' selections, checked against the SAE's layer, seed and width."""
    from probes.selection import check_features, read_features, refusal_feature_ids

    check = {} if sae is None else {"layer": sae.layer, "sae_seed": sae.seed, "d_sae": sae.d_sae}
    if isinstance(features, (str, Path)):
        return refusal_feature_ids(read_features(features, **check))
    if isinstance(features, Mapping):
        check_features(features, **check)
        return refusal_feature_ids(features)
    ids = [int(i) for i in features]
    if sae is not None and ids and not all(0 <= i < sae.d_sae for i in ids):
        raise ValueError(f"feature ids must lie in 0..{sae.d_sae - 1}, got {ids}")
    return ids


class SAE:
    """One sparse autoencoder (ours or a SAELens one) with the residual layer it reads.

    `encode(x (n, d_in)) -> (n, d_sae)`, `decode(z) -> (n, d_in)` and `sae(x)` are those of
    `sae.model.SparseAutoencoder` (`.module`); `ablate`, `clamp` and `steer` intervene on a model.
    """

    def __init__(self, module: Any, layer: int | None, cfg: dict[str, Any] | None = None, seed: int | None = None,
                 path: Path | None = None) -> None:
        self.module, self.layer, self.cfg, self.seed, self.path = module, layer, dict(cfg or {}), seed, path

    def __repr__(self) -> str:
        return (f"SAE(d_in={self.d_in}, d_sae={self.d_sae}, architecture={self.module.cfg.architecture!r}, "
                f"layer={self.layer}, seed={self.seed}, path={str(self.path) if self.path else None!r})")

    @property
    def d_in(self) -> int:
        return self.module.d_in

    @property
    def d_sae(self) -> int:
        return self.module.d_sae

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module.encode(x.to(self.module.device))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.module.decode(z.to(self.module.device))

    def __call__(self, x: torch.Tensor) -> Any:
        with torch.no_grad():
            return self.module(x.to(self.module.device))

    def _layer(self, layer: int | None) -> int:
        if layer is not None:
            return int(layer)
        if self.layer is None:
            raise ValueError("this SAE records no residual layer; pass layer=")
        return self.layer

    @contextmanager
    def ablate(self, model: Any, features: Any, positions: str = "all", layer: int | None = None) -> Iterator[None]:
        """Zero `features` (ids, or a features.json: its refusal categories' selection) while the block is open."""
        from analysis.interventions import ablate_features

        with ablate_features(as_adapter(model), self._layer(layer), self.module, feature_ids(features, self),
                             positions=positions):
            yield

    @contextmanager
    def clamp(self, model: Any, features: Any, value: float, positions: str = "all",
              layer: int | None = None) -> Iterator[None]:
        """Pin `features` to `value` while the block is open (x' = x + decode(z') − decode(z))."""
        from analysis.interventions import clamp_features

        with clamp_features(as_adapter(model), self._layer(layer), self.module, feature_ids(features, self),
                            value=float(value), positions=positions):
            yield

    @contextmanager
    def steer(self, model: Any, latent_deltas: torch.Tensor, alpha: float = 1.0, positions: str = "all",
              layer: int | None = None) -> Iterator[None]:
        """Add alpha · latent_deltas `(d_sae,)` in SAE space while the block is open (error term kept)."""
        from analysis.interventions import steer_sae

        with steer_sae(as_adapter(model), self._layer(layer), self.module, latent_deltas, alphas=float(alpha),
                       positions=positions):
            yield


def load_sae(path: str | Path, seed: int | None = None, layer: int | None = None,
             device: str | torch.device = "cpu") -> SAE:
    """An SAE from a training run folder (`seed`, default its first), one seed's folder, or any SAELens
    folder (`cfg.json` + `sae_weights.safetensors`; topk, standard, jumprelu, every cfg layout).
    With `layer` the SAE must have been trained there; a SAELens hook that is not the residual
    stream loads with `layer=None` (pass the layer to the interventions yourself)."""
    from sae.export import load_checked_sae, seed_folders
    from sae.saelens import trained_layer

    folders = seed_folders(path)
    if seed is None:
        seed = next(iter(folders))
    elif seed not in folders:
        raise ValueError(f"SAE folder {path} has seed(s) {sorted(folders)}, not seed {seed}")
    module, cfg = load_checked_sae(folders[seed], layer=layer, device=device)
    try:
        found = trained_layer(cfg)
    except ValueError:
        found = None
    return SAE(module, found if layer is None else layer, cfg, seed, folders[seed])


__all__: Sequence[str] = ("SAE", "Vector", "as_adapter", "feature_ids", "load_sae", "load_vectors")
