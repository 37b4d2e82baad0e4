"""SAELens interop without silent differences: decoder-norm rescaling, BatchTopK at inference,
the layer of every cfg.json layout, and what our exports carry for SAELens tools (sparsity, model_name).

The SAELens computations are written out here in float64 from SAELens' source
(`TopKSAE.encode/decode`, `JumpReLUSAE.encode`), so the tests need no SAELens install.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae.config import SAEConfig
from sae.export import load_checked_sae, load_sae, save_sae
from sae.model import SparseAutoencoder
from sae.saelens import layer_from_hook, trained_layer

D_IN, D_SAE, K = 16, 64, 4


def _saelens_folder(path: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    return path


def _random_weights(seed: int, decoder_norms: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(D_SAE, D_IN, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    if decoder_norms:  # rows far from unit norm: the rescaling changes which latents win
        W_dec *= torch.empty(D_SAE, 1).uniform_(0.1, 4.0, generator=g)
    return {"W_enc": torch.randn(D_IN, D_SAE, generator=g) / 4, "b_enc": torch.randn(D_SAE, generator=g) / 10,
            "W_dec": W_dec, "b_dec": torch.randn(D_IN, generator=g) / 10}


def _saelens_topk(t: dict[str, torch.Tensor], x: torch.Tensor, k: int, rescale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens 6 `TopKSAE.encode` / `decode` (apply_b_dec_to_input), float64: (codes, reconstruction)."""
    W_enc, b_enc, W_dec, b_dec = (t[n].double() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    pre = (x.double() - b_dec) @ W_enc + b_enc
    norms = W_dec.norm(dim=-1)
    if rescale:
        pre = pre * norms
    top = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return z, (z / norms if rescale else z) @ W_dec + b_dec


def test_topk_rescale_acts_by_decoder_norm_is_applied_exactly(tmp_path: Path) -> None:
    weights = _random_weights(0, decoder_norms=True)
    cfg = {"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": K, "rescale_acts_by_decoder_norm": True,
           "apply_b_dec_to_input": True, "normalize_activations": "none", "dtype": "float32",
           "metadata": {"hook_name": "blocks.2.hook_resid_post", "model_name": "gpt2"}}
    sae, _ = load_sae(_saelens_folder(tmp_path / "sl6", cfg, weights))
    x = torch.randn(300, D_IN, generator=torch.Generator().manual_seed(1))
    z_ref, x_hat_ref = _saelens_topk(weights, x, K, rescale=True)
    z_plain, _ = _saelens_topk(weights, x, K, rescale=False)
    assert ((z_ref != 0) != (z_plain != 0)).any(dim=1).float().mean() > 0.5  # the flag matters on most rows
    with torch.no_grad():
        z = sae.encode(x)
        out = sae(x)
    assert torch.equal(z != 0, z_ref != 0)  # the same latents on every row
    assert torch.allclose(z.double(), z_ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(out.x_hat.double(), x_hat_ref, rtol=1e-4, atol=1e-4)


def test_rescaling_outside_topk_is_refused_and_other_unimplemented_options_too(tmp_path: Path) -> None:
    weights = _random_weights(0, decoder_norms=False)
    base = {"d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": True, "normalize_activations": "none",
            "hook_name": "blocks.2.hook_resid_post"}
    cases = {
        "rescale_acts_by_decoder_norm, which SAELens defines only for topk": {"architecture": "standard",
                                                                               "rescale_acts_by_decoder_norm": True},
        "reshape_activations='hook_z'": {"architecture": "standard", "reshape_activations": "hook_z"},
        "hook_head_index=3": {"architecture": "standard", "metadata": {"hook_head_index": 3}},
        "normalize_activations='expected_average_only_in'": {"architecture": "standard",
                                                             "normalize_activations": "expected_average_only_in"},
    }
    for i, (message, extra) in enumerate(cases.items()):
        folder = _saelens_folder(tmp_path / f"c{i}", {**base, **extra}, weights)
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_sae(folder)


def test_batchtopk_has_one_inference_rule_matching_saelens_jumprelu(tmp_path: Path) -> None:
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, k=2, architecture="batchtopk", batchtopk_row_cap=2)
    sae = SparseAutoencoder(cfg, seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
        sae.threshold.fill_(0.02)  # a low threshold: many rows have more than k * row_cap = 4 latents above it
    sae.eval()
    x = torch.randn(400, D_IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pre = (x.double() - sae.b_dec.double()) @ sae.W_enc.double() + sae.b_enc.double()
        z_ref = pre.relu() * (pre > 0.02)  # SAELens JumpReLUSAE.encode
        dense = sae.encode(x)
        values, indices = sae.encode_topk(x)
        sparse = torch.zeros(400, D_SAE).scatter_add(1, indices, values)
        out = sae(x)
    assert int((z_ref != 0).sum(dim=1).max()) > 4
    assert torch.equal(dense, sparse)  # encode() and encode_topk() agree on every row
    assert torch.equal(dense != 0, z_ref != 0)
    assert torch.equal((out.latent_values != 0).sum(dim=1), (z_ref != 0).sum(dim=1))  # L0 counts every latent
    save_sae(sae, tmp_path / "bt", meta={"layer": 1})  # exported as jumprelu for SAELens
    loaded, cfg_json = load_sae(tmp_path / "bt")
    assert cfg_json["architecture"] == "jumprelu"
    with torch.no_grad():
        assert torch.equal(loaded.encode(x) != 0, dense != 0)


@pytest.mark.parametrize("cfg, layer", [
    ({"refusal_sae": {"layer": 7}, "hook_name": "blocks.7.hook_resid_post"}, 7),     # ours
    ({"hook_name": "blocks.5.hook_resid_post", "hook_layer": 5}, 5),                    # SAELens < 6
    ({"hook_point": "blocks.4.hook_resid_post"}, 4),                                    # older SAELens
    ({"metadata": {"hook_name": "blocks.6.hook_resid_post"}}, 6),                       # SAELens 6
    ({"metadata": {"hook_name": "blocks.6.hook_resid_pre"}}, 5),                        # resid_pre l = output of l-1
    ({"hook_name": "model.layers.9"}, 9),                                               # transformers module name
    ({"hook_name": "layers.3"}, 3),                                                     # sparsify
    ({"hook_layer": 2}, 2),                                                             # a layer and no hook
    ({}, None),                                                                         # nothing recorded
])
def test_trained_layer_reads_every_layout(cfg: dict, layer: int | None) -> None:
    assert trained_layer(cfg) == layer


def test_non_residual_hooks_are_refused() -> None:
    for hook in ("blocks.5.hook_mlp_out", "blocks.5.attn.hook_z", "blocks.5.hook_resid_mid", "layers.5.mlp"):
        with pytest.raises(ValueError, match="residual"):
            layer_from_hook(hook)


def test_layer_check_runs_for_a_saelens6_folder(tmp_path: Path) -> None:
    weights = _random_weights(0, decoder_norms=False)
    cfg = {"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": K, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "metadata": {"hook_name": "blocks.3.hook_resid_post"}}
    folder = _saelens_folder(tmp_path / "sl6", cfg, weights)
    load_checked_sae(folder, layer=3, d_model=D_IN)
    with pytest.raises(ValueError, match="was trained on layer 3, not layer 2"):
        load_checked_sae(folder, layer=2, d_model=D_IN)
    mlp = _saelens_folder(tmp_path / "mlp", {**cfg, "metadata": {"hook_name": "blocks.3.hook_mlp_out"}}, weights)
    with pytest.raises(ValueError, match="hook_mlp_out.*not the residual stream"):
        load_checked_sae(mlp, layer=3)


def test_exported_files_are_readable_by_others_and_carry_sparsity(tmp_path: Path) -> None:
    from sae.export import save_sparsity

    previous = os.umask(0o022)
    try:
        sae = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=K), seed=0)
        out = save_sae(sae, tmp_path / "seed_0", meta={"layer": 1, "model_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                      "model_path": "/data/run/refusal_tokens/model"})
        density = torch.linspace(0, 1, D_SAE, dtype=torch.float64)
        save_sparsity(out, density)
        os.umask(0o027)  # a stricter umask is respected
        save_sae(sae, tmp_path / "strict", meta={"layer": 1})
    finally:
        os.umask(previous)
    for name in ("cfg.json", "sae.safetensors", "sparsity.safetensors"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    assert (tmp_path / "strict" / "cfg.json").stat().st_mode & 0o777 == 0o640
    sparsity = load_file(str(out / "sparsity.safetensors"))["sparsity"]
    assert sparsity.shape == (D_SAE,) and sparsity.dtype == torch.float32
    assert torch.allclose(sparsity.double(), torch.log10(density + 1e-10), atol=1e-6)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cfg["refusal_sae"]["model_path"] == "/data/run/refusal_tokens/model"
