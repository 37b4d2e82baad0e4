"""Save / load SAEs in the SAELens layout: `DIR/sae.safetensors` + `DIR/cfg.json`.

`cfg.json` carries the keys SAELens reads (pre-6.0 layout, which SAELens 6 still converts) plus
our own metadata under the `refusal_sae` key. `sae_weights.safetensors` (SAELens' file name) is a
relative symlink to `sae.safetensors`, so `sae_lens.SAE.load_from_disk(DIR)` works directly.
Exported weights have the input scale folded in: they take raw activations.
`load_sae` also reads generic SAELens SAEs (topk, standard ReLU, jumprelu; every cfg.json layout),
exactly: `sae.saelens` maps their config, folds their weight conventions and reads their layer.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from activations.io import atomic_write, file_sha256, read_json, write_json
from activations.model_identity import check_same_model
from sae.config import SAEConfig
from sae.model import SparseAutoencoder
from sae.saelens import config_from_saelens, fold_saelens_tensors, trained_layer

WEIGHTS_NAME = "sae.safetensors"
SAELENS_WEIGHTS_NAME = "sae_weights.safetensors"
SPARSITY_NAME = "sparsity.safetensors"
CFG_NAME = "cfg.json"
FORMAT_VERSION = 1


def saelens_cfg(sae: SparseAutoencoder, layer: int | None, model_name: str = "", **context: Any) -> dict[str, Any]:
    """The SAELens-facing part of cfg.json for an SAE trained here (scale folded, float32)."""
    cfg = sae.cfg
    is_topk = cfg.architecture == "topk"
    return {
        "architecture": "topk" if is_topk else ("jumprelu" if cfg.architecture in ("batchtopk", "jumprelu") else "standard"),
        "d_in": cfg.d_in,
        "d_sae": cfg.num_latents,
        "activation_fn_str": "topk" if is_topk else "relu",
        "activation_fn_kwargs": {"k": cfg.k} if is_topk else {},
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "finetuning_scaling_factor": False,
        "normalize_activations": "none",
        "hook_name": f"blocks.{layer}.hook_resid_post" if layer is not None else "",
        "hook_layer": layer,
        "hook_head_index": None,
        "model_name": model_name,
        "dtype": "float32",
        "device": "cpu",
        "context_size": context.get("context_size"),
        "prepend_bos": context.get("prepend_bos", True),
        "dataset_path": context.get("dataset_path", ""),
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": None,
    }


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> str:
    """Write float32 safetensors atomically (`activations.io.atomic_write`); returns the file's sha256."""
    digest: list[str] = []

    def write(tmp: str) -> None:
        save_file({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, tmp)
        digest.append(file_sha256(tmp))

    atomic_write(path, write)
    return digest[0]


def _link_saelens_name(directory: Path) -> None:
    """`sae_weights.safetensors` → `sae.safetensors` (relative symlink, replaced atomically)."""
    link = directory / SAELENS_WEIGHTS_NAME
    tmp = directory / f".tmp-{SAELENS_WEIGHTS_NAME}"
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(WEIGHTS_NAME, tmp)
        os.replace(tmp, link)
    except OSError:  # file systems without symlinks: SAELens users rename the file themselves
        tmp.unlink(missing_ok=True)


def save_sparsity(directory: str | Path, density: Any) -> Path:
    """`DIR/sparsity.safetensors` as SAELens writes it: `sparsity (d_sae,)` = log10(firing density + 1e-10).

    `density`: `(d_sae,)` fraction of rows on which each latent fired (non-zero).
    """
    density = torch.as_tensor(density, dtype=torch.float64).flatten()
    if bool(((density < 0) | (density > 1)).any()):
        raise ValueError("firing densities must lie in [0, 1]")
    path = Path(directory) / SPARSITY_NAME
    atomic_write(path, lambda tmp: save_file({"sparsity": torch.log10(density + 1e-10).float().contiguous()}, tmp))
    return path


def save_sae(sae: SparseAutoencoder, directory: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Export one SAE (input scale folded in) to `directory`.

    Args:
        meta: our metadata; `layer`, `model_name` (a hub id where the model has one, so SAELens
            tools can load it), `context_size`, `prepend_bos`, `dataset_path` fill the SAELens
            keys, everything (also `model_path`, the local folder actually used) is stored under
            `refusal_sae`.
    """
    meta = dict(meta or {})
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    digest = _atomic_save_tensors(sae.folded_state(), out / WEIGHTS_NAME)
    layer = meta.get("layer")
    cfg = saelens_cfg(
        sae, layer, str(meta.get("model_name", "")),
        **{k: meta[k] for k in ("context_size", "prepend_bos", "dataset_path") if k in meta},
    )
    cfg["refusal_sae"] = {
        "format_version": FORMAT_VERSION,
        "architecture": sae.cfg.architecture,
        "sae_config": sae.cfg.to_dict(),
        "input_scale_folded": float(sae.input_scale),
        "weights_sha256": digest,
        **meta,
    }
    write_json(out / CFG_NAME, cfg)
    _link_saelens_name(out)
    return out


def _weights_path(directory: Path) -> Path:
    for name in (WEIGHTS_NAME, SAELENS_WEIGHTS_NAME):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {SAELENS_WEIGHTS_NAME} in {directory}")


def load_sae(directory: str | Path, device: str | torch.device = "cpu") -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Load an SAE saved by `save_sae`, or a generic SAELens SAE folder → (sae in eval mode, cfg dict)."""
    root = Path(directory)
    cfg_path = root / CFG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {CFG_NAME} in {root}")
    cfg = read_json(cfg_path, "SAE config")
    weights_path = _weights_path(root)
    ours = cfg.get("refusal_sae")
    if ours is not None:
        sae_cfg = SAEConfig.from_dict(ours["sae_config"])
        expected = ours.get("weights_sha256")
        if expected and file_sha256(weights_path) != expected:
            raise ValueError(f"{weights_path} does not match the sha256 recorded in {cfg_path} (partial write?)")
    else:
        sae_cfg = config_from_saelens(cfg)
    tensors = fold_saelens_tensors(cfg if ours is None else {}, load_file(str(weights_path), device="cpu"),
                                   str(weights_path))
    required = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if sae_cfg.architecture in ("batchtopk", "jumprelu") else set())
    missing, extra = required - set(tensors), set(tensors) - required
    if missing or extra:
        raise ValueError(f"{weights_path}: missing tensors {sorted(missing)}, unexpected tensors {sorted(extra)}")
    sae = SparseAutoencoder(sae_cfg, init_weights=False)
    with torch.no_grad():
        for name, value in tensors.items():
            target = getattr(sae, name)  # W_enc is a view of W_enc_rows: copying into it fills the parameter
            value = value.expand_as(target) if name == "threshold" and value.numel() == 1 else value
            if value.shape != target.shape:
                raise ValueError(f"{weights_path}: {name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            target.copy_(value)
    if sae_cfg.architecture == "batchtopk":
        sae.threshold_seen.fill_(True)
    return sae.to(device).eval(), cfg


def sae_model_identity(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The identity of the model whose activations an SAE was trained on (`activations.model_identity`),
    as its cfg.json records it; None for SAEs trained elsewhere."""
    return (cfg.get("refusal_sae") or {}).get("model_identity")


def load_checked_sae(folder: str | Path, layer: int | None = None, d_model: int | None = None,
                     device: str | torch.device = "cpu", against: str = "the activation store",
                     name: str | None = None, model: dict[str, Any] | None = None) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """`load_sae` plus the checks every caller needs: the layer it was trained on, its width
    (`d_model` of `against`: "the activation store" or "the model", for the message) and, when
    `model` (an identity record of `against`) is given, that it was trained on that model."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"SAE folder not found: {path}")
    sae, cfg = load_sae(path, device=device)
    name = name or str(path)
    if layer is not None:
        try:
            trained = trained_layer(cfg)
        except ValueError as exc:
            raise ValueError(f"SAE {name}: {exc}") from None
        if trained is None:
            print(f"note: SAE {name} records no hook or layer; cannot check that it reads layer {layer}",
                  file=sys.stderr)
        elif trained != layer:
            raise ValueError(f"SAE {name} was trained on layer {trained}, not layer {layer}")
    if d_model is not None and sae.d_in != d_model:
        raise ValueError(f"SAE {name} has d_in {sae.d_in} but {against} has d_model {d_model}")
    check_same_model(sae_model_identity(cfg), f"SAE {name}", model, against)
    return sae, cfg


def _seed_of(folder: Path, cfg: dict[str, Any]) -> int | None:
    seed = (cfg.get("refusal_sae") or {}).get("seed")
    if seed is None and folder.name.startswith("seed_") and folder.name[5:].lstrip("-").isdigit():
        seed = int(folder.name[5:])
    return None if seed is None else int(seed)


def seed_folders(run_dir: str | Path) -> dict[int, Path]:
    """`{seed: folder}` of a training run (`RUN/seed_<s>/`), or of one exported SAE folder."""
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"SAE run folder not found: {root}")
    if (root / CFG_NAME).is_file():  # one SAE folder, not a run
        seed = _seed_of(root, read_json(root / CFG_NAME, "SAE config"))
        return {0 if seed is None else seed: root}
    found = {int(p.name[5:]): p for p in root.glob("seed_*") if p.name[5:].lstrip("-").isdigit()}
    if not found:
        raise FileNotFoundError(f"no SAE in {root}: neither {CFG_NAME} nor seed_<s>/ exports")
    return dict(sorted(found.items()))


def load_sae_run(run_dir: str | Path, layer: int | None = None, d_model: int | None = None,
                 seeds: Sequence[int] | None = None, device: str | torch.device = "cpu",
                 model: dict[str, Any] | None = None, against: str = "the activation store") -> dict[int, SparseAutoencoder]:
    """`{seed: SAE in eval mode}` of a training run folder (`RUN/seed_<s>/`) or one SAE folder, each
    checked against `layer`, `d_model` and the model identity `model` of `against` when given;
    `seeds` picks some (all must exist)."""
    folders = seed_folders(run_dir)
    if seeds is not None:
        missing = sorted(set(seeds) - set(folders))
        if missing:
            raise ValueError(f"SAE run {run_dir} has seeds {sorted(folders)}, not {missing}")
        folders = {s: folders[s] for s in seeds}
    return {seed: load_checked_sae(path, layer, d_model, device, against, name=f"seed {seed}", model=model)[0]
            for seed, path in folders.items()}
