"""Reading SAELens folders exactly: every cfg.json layout, the hook → layer map, and weight conventions.

Layouts of `cfg.json`:
- ours (`refusal_sae` key, written by `sae.export.save_sae`; the SAELens keys beside it are pre-6);
- SAELens before 6: flat keys (`hook_name` or the older `hook_point`, `hook_layer`,
  `activation_fn_str`, ...);
- SAELens 6: the architecture's keys flat (`k`, `rescale_acts_by_decoder_norm`, ...) and the
  hook under `metadata` (`metadata.hook_name`, `metadata.hook_head_index`, ...).

`config_from_saelens(cfg)` turns a SAELens cfg into an `SAEConfig` (topk, standard ReLU, jumprelu;
SAELens saves BatchTopK SAEs as jumprelu); options that change what SAELens computes and that
`SparseAutoencoder` does not implement are refused with one line, never ignored.
`fold_saelens_tensors(cfg, tensors)` rewrites SAELens weight conventions into plain weights with the
same outputs:

- `rescale_acts_by_decoder_norm: true` (TopK): SAELens multiplies the pre-activations by the decoder
  row norms `n` before the top-k and divides the codes by `n` before decoding. That is the same as
  W_enc columns and b_enc times `n` and unit-norm decoder rows (what SAELens' `fold_W_dec_norm`
  does), computed here in float64;
- `log_threshold` → `threshold`; a `scaling_factor` of ones is dropped (any other is refused).

`trained_layer(cfg)` is the residual layer in this framework's numbering (the output of block `l`):
`blocks.<l>.hook_resid_post` → l, `blocks.<l>.hook_resid_pre` → l − 1, transformers / sparsify module
names (`model.layers.<l>`, `layers.<l>`, `transformer.h.<l>`) → l; any other hook (attention,
MLP, `hook_resid_mid`) reads something other than the residual stream and is refused.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from sae.config import SAEConfig

_NO_NORMALIZATION = (None, False, "none")
_RESIDUAL_POINTS = {"hook_resid_post": 0, "hook_resid_pre": -1}


def _meta(cfg: dict[str, Any]) -> dict[str, Any]:
    return cfg.get("metadata") or {}


def hook_name(cfg: dict[str, Any]) -> str | None:
    """The hook an SAE reads, from any layout (`hook_name`, `hook_point`, `metadata.hook_name`)."""
    hook = cfg.get("hook_name") or cfg.get("hook_point") or _meta(cfg).get("hook_name")
    return str(hook) if hook else None


def layer_from_hook(hook: str) -> int:
    """The residual layer (output of block l; -1 = embeddings) a hook name reads; ValueError otherwise."""
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    if match:
        block, point = int(match.group(1)), match.group(2)
        if point in _RESIDUAL_POINTS:
            return block + _RESIDUAL_POINTS[point]
        raise ValueError(f"the SAE reads {hook!r}, which is not the residual stream between blocks "
                         "(only hook_resid_post / hook_resid_pre SAEs can be used at a residual layer)")
    match = re.fullmatch(r"(?:[\w.]*\.)?(?:layers|h)\.(\d+)", hook)
    if match:  # a module name: the output of decoder layer l
        return int(match.group(1))
    raise ValueError(f"cannot tell which residual layer the SAE hook {hook!r} reads "
                     "(expected blocks.<l>.hook_resid_post, blocks.<l>.hook_resid_pre or model.layers.<l>)")


def trained_layer(cfg: dict[str, Any]) -> int | None:
    """The residual layer an SAE's cfg.json records, in any layout; None when it records none."""
    ours = cfg.get("refusal_sae") or {}
    if ours.get("layer") is not None:
        return int(ours["layer"])
    hook = hook_name(cfg)
    if hook is not None:
        return layer_from_hook(hook)
    layer = cfg.get("hook_layer", _meta(cfg).get("hook_layer"))
    return None if layer is None else int(layer)


def _refuse_unsupported(cfg: dict[str, Any]) -> None:
    """One ValueError for each SAELens option that changes the computation and is not implemented."""
    norm = cfg.get("normalize_activations")
    if norm not in _NO_NORMALIZATION:
        raise ValueError(f"SAELens SAE uses normalize_activations={norm!r}; only SAEs taking raw activations "
                         "('none') are supported")
    reshape = cfg.get("reshape_activations")
    if reshape not in (None, "none"):
        raise ValueError(f"SAELens SAE uses reshape_activations={reshape!r} (per-head inputs); only residual-stream "
                         "SAEs are supported")
    head = cfg.get("hook_head_index", _meta(cfg).get("hook_head_index"))
    if head is not None:
        raise ValueError(f"SAELens SAE reads one attention head (hook_head_index={head}); only residual-stream "
                         "SAEs are supported")
    if cfg.get("finetuning_scaling_factor"):
        raise ValueError("SAELens SAE uses finetuning_scaling_factor; fold it into the decoder first")


def config_from_saelens(cfg: dict[str, Any]) -> SAEConfig:
    """SAEConfig for a SAELens cfg.json (topk, standard ReLU, jumprelu), any layout."""
    if "d_in" not in cfg or "d_sae" not in cfg:
        raise ValueError("SAELens cfg.json lacks d_in or d_sae")
    _refuse_unsupported(cfg)
    arch = cfg.get("architecture", "standard")
    act = str(cfg.get("activation_fn_str", cfg.get("activation_fn", "relu")))
    common = {"d_in": int(cfg["d_in"]), "d_sae": int(cfg["d_sae"]),
              "apply_b_dec_to_input": bool(cfg.get("apply_b_dec_to_input", True))}
    is_topk = arch == "topk" or (arch == "standard" and act == "topk")
    if cfg.get("rescale_acts_by_decoder_norm") and not is_topk:
        raise ValueError(f"SAELens SAE of architecture {arch!r} sets rescale_acts_by_decoder_norm, which SAELens "
                         "defines only for topk SAEs")
    if is_topk:
        k = (cfg.get("activation_fn_kwargs") or {}).get("k", cfg.get("k"))
        if k is None:
            raise ValueError("SAELens topk SAE without k (activation_fn_kwargs.k or k)")
        if float(k) != int(k):
            raise ValueError(f"SAELens topk SAE has a fractional k={k}; a per-row top-k needs an integer")
        return SAEConfig(**common, k=int(k), architecture="topk")
    if arch == "standard":
        if act != "relu":
            raise ValueError(f"SAELens standard SAE with activation {act!r} is not supported (only relu)")
        return SAEConfig(**common, architecture="relu")
    if arch == "jumprelu":
        return SAEConfig(**common, architecture="jumprelu")
    raise ValueError(f"unsupported SAELens architecture {arch!r}; supported: topk, standard, jumprelu")


def fold_saelens_tensors(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """SAELens weights → plain weights with the same encode / decode (see the module docstring)."""
    tensors = dict(tensors)
    if "scaling_factor" in tensors:
        if not torch.allclose(tensors["scaling_factor"], torch.ones_like(tensors["scaling_factor"])):
            raise ValueError(f"{where} holds a non-trivial scaling_factor; fold it into the weights first")
        del tensors["scaling_factor"]
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if cfg.get("rescale_acts_by_decoder_norm"):
        missing = {"W_enc", "b_enc", "W_dec"} - set(tensors)
        if missing:
            raise ValueError(f"{where}: missing tensors {sorted(missing)}")
        norms = tensors["W_dec"].double().norm(dim=-1)  # (d_sae,)
        if bool((norms == 0).any()):
            raise ValueError(f"{where}: rescale_acts_by_decoder_norm with a zero decoder row "
                             f"(latent {int((norms == 0).nonzero()[0])}) is undefined")
        tensors["W_enc"] = (tensors["W_enc"].double() * norms).float()
        tensors["b_enc"] = (tensors["b_enc"].double() * norms).float()
        tensors["W_dec"] = (tensors["W_dec"].double() / norms[:, None]).float()
    return tensors
