"""SAE model, sparse kernels, losses and export (CPU, tiny sizes)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sae.config import SAEConfig
from sae.export import load_sae, save_sae
from sae.initialization import geometric_median
from sae.kernels.csr import dense_topk_reference, sparse_decode, topk_pre_acts
from sae.losses import LossTerms, NonFiniteLossError, NonFiniteMonitor, check_finite, supervised_contrastive
from sae.model import SparseAutoencoder
from tests.helpers.sae_fixtures import one_torch_thread  # noqa: F401  (autouse fixture)


def test_sparse_backward_matches_dense_autograd() -> None:
    torch.manual_seed(0)
    batch, d_in, d_sae, k = 7, 6, 24, 3
    x = torch.randn(batch, d_in, requires_grad=True)
    W = torch.randn(d_sae, d_in, requires_grad=True)  # encoder rows
    b = torch.randn(d_sae, requires_grad=True)
    w_main = torch.randn(batch, k)

    values, idx = topk_pre_acts(x, W, b, k)
    (values * w_main).sum().backward()
    ours = [t.grad.clone() for t in (x, W, b)]
    for t in (x, W, b):
        t.grad = None

    ref_values, ref_idx = dense_topk_reference(x, W, b, k)
    (ref_values * w_main).sum().backward()
    assert torch.equal(idx, ref_idx)
    assert torch.allclose(values, ref_values)
    for mine, ref in zip(ours, (x.grad, W.grad, b.grad)):
        assert torch.allclose(mine, ref, atol=1e-5)
    assert (ours[1].abs().sum(1) > 0).sum() <= k * batch  # only selected latents get gradient


@pytest.mark.parametrize("n_dead, as_ids", [(5, False), (40, False), (40, True)])
def test_auxk_over_dead_latents_matches_the_masked_dense_formula(n_dead: int, as_ids: bool) -> None:
    """Fewer dead latents than k_aux = 12 (all kept) and more; given as a mask or as shuffled ids."""
    cfg = SAEConfig(d_in=6, d_sae=64, k=3, auxk_coeff=1 / 32, auxk_k=12, normalize_input=True)
    sae = SparseAutoencoder(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_enc.normal_(generator=g)
        sae.b_dec.normal_(generator=g)
        sae.input_scale.fill_(0.8)
    x = torch.randn(9, 6, generator=g)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64, generator=g)[:n_dead]] = True
    upstream = torch.randn(9, 6, generator=g)

    ids = dead.nonzero().squeeze(1)[torch.randperm(n_dead, generator=g)]
    out = sae(x, dead_ids=ids) if as_ids else sae(x, dead_mask=dead)
    (out.aux_x_hat * upstream).sum().backward()
    ours = [p.grad.clone() for p in (sae.W_enc_rows, sae.b_enc, sae.W_dec, sae.b_dec)]
    sae.zero_grad()

    pre = (x * 0.8 - sae.b_dec) @ sae.W_enc_rows.t() + sae.b_enc  # every latent, then only dead ones compete
    aux, aux_idx = pre.masked_fill(~dead, float("-inf")).topk(cfg.auxk_k, dim=-1)
    codes = torch.zeros_like(pre).scatter(1, aux_idx, torch.relu(aux))  # -inf slots (too few dead) give 0
    reference = codes @ sae.W_dec / 0.8
    (reference * upstream).sum().backward()
    torch.testing.assert_close(out.aux_x_hat, reference)
    assert float(out.aux_scale) == pytest.approx(min(n_dead / cfg.auxk_k, 1.0))
    for mine, ref in zip(ours, (sae.W_enc_rows.grad, sae.b_enc.grad, sae.W_dec.grad, sae.b_dec.grad)):
        torch.testing.assert_close(mine, ref)
    assert sae(x, dead_mask=torch.zeros(64, dtype=torch.bool)).aux_x_hat is None  # none dead: no AuxK


def test_sparse_decode_matches_dense_product_and_gradients() -> None:
    torch.manual_seed(1)
    W_dec = torch.randn(20, 5, requires_grad=True)
    values, indices = torch.rand(4, 3, requires_grad=True), torch.randint(0, 20, (4, 3))
    upstream = torch.randn(4, 5)
    out = sparse_decode(values, indices, W_dec)
    (out * upstream).sum().backward()
    ours = (values.grad.clone(), W_dec.grad.clone())
    values.grad = W_dec.grad = None
    dense = torch.zeros(4, 20).scatter_add(1, indices, values)
    reference = dense @ W_dec
    (reference * upstream).sum().backward()
    assert torch.allclose(out, reference, atol=1e-6)
    assert torch.allclose(ours[0], values.grad, atol=1e-6) and torch.allclose(ours[1], W_dec.grad, atol=1e-6)


def test_topk_l0_equals_k_and_decoder_constraints() -> None:
    torch.manual_seed(2)
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=64, k=5), seed=3)
    z = sae.encode(torch.randn(32, 16))
    assert torch.equal((z != 0).sum(dim=1), torch.full((32,), 5))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)
    assert torch.allclose(sae.W_enc, sae.W_dec.t())  # encoder initialised as decoder transpose
    out = sae(torch.randn(32, 16))
    out.fvu.backward()
    sae.remove_parallel_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs().max() < 1e-6


def test_batchtopk_mean_l0_is_k_in_training_and_threshold_at_inference() -> None:
    torch.manual_seed(3)
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=64, k=4, architecture="batchtopk"), seed=0)
    x = torch.randn(50, 16)
    values, _ = sae.encode_topk(x)
    per_row = (values != 0).sum(dim=1).float()
    assert per_row.mean().item() == 4.0 and per_row.max() > per_row.min()  # varies per row, mean exactly k
    assert bool(sae.threshold_seen) and float(sae.threshold[0]) > 0
    sae.eval()
    z = sae.encode(x)
    assert torch.all(z[z != 0] > float(sae.threshold[0]))


def test_geometric_median_is_robust_and_float64() -> None:
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [100.0, 0.0], [1.0, 1e-3], [1.0, -1e-3]])
    median = geometric_median(points)
    assert median.dtype == torch.float64
    assert abs(float(median[0]) - 1.0) < 1e-3 and abs(float(median[1])) < 1e-6


def test_supcon_prefers_codes_that_group_by_label() -> None:
    labels = torch.tensor([4, 4, 1, 1, 0, 0])  # two refusal categories + benign
    indices = torch.tensor([[0, 1], [0, 1], [2, 3], [2, 3], [4, 5], [6, 7]])
    grouped = supervised_contrastive(torch.ones(6, 2), indices, labels, 8, 0.1)
    mixed = supervised_contrastive(torch.ones(6, 2), indices[[0, 2, 1, 3, 4, 5]], labels, 8, 0.1)
    assert grouped < mixed
    no_anchor = supervised_contrastive(torch.ones(2, 2), indices[:2], torch.tensor([0, 0]), 8, 0.1)
    assert float(no_anchor) == 0.0  # benign rows are never pulled together


def test_non_finite_terms_name_the_term_and_step() -> None:
    one, bad = torch.tensor(1.0), torch.tensor(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"'auxk'.*step 17"):
        check_finite(LossTerms(one, bad, one, one, bad), step=17)
    monitor = NonFiniteMonitor([5, 6])
    monitor.record(0, LossTerms(one, one, one, one, one), step=3)
    monitor.record(1, LossTerms(one, one, one, torch.tensor(math.inf), one), step=4)
    monitor.record(1, LossTerms(bad, one, one, one, one), step=5)
    with pytest.raises(NonFiniteLossError, match=r"'contrastive' at step 4 of seed 6"):
        monitor.raise_if_bad()


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_export_round_trip_folds_the_input_scale(tmp_path, architecture: str) -> None:
    torch.manual_seed(4)
    cfg = SAEConfig(d_in=12, d_sae=48, k=3, architecture=architecture, normalize_input=True)
    sae = SparseAutoencoder(cfg, seed=1)
    sample = 7.0 * torch.randn(256, 12) + 2.0
    sae.init_input_scale(sample)
    sae.init_b_dec_geometric_median(sample)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.threshold.fill_(0.2)
    sae.eval()
    x = 7.0 * torch.randn(64, 12) + 2.0
    before = sae(x)
    save_sae(sae, tmp_path / "seed_0", meta={"layer": 9, "seed": 0, "model_name": "m"})
    loaded, cfg_json = load_sae(tmp_path / "seed_0")
    after = loaded(x)
    scale = float(sae.input_scale)
    assert abs(scale - 1.0) > 0.5 and float(loaded.input_scale) == 1.0
    assert torch.allclose(before.x_hat, after.x_hat, rtol=1e-5, atol=1e-5)
    assert torch.allclose(before.z / scale, after.z, rtol=1e-5, atol=1e-6)  # latents now in raw units
    assert torch.equal(before.z != 0, after.z != 0)
    assert cfg_json["hook_name"] == "blocks.9.hook_resid_post" and cfg_json["refusal_sae"]["seed"] == 0
    assert cfg_json["architecture"] == ("topk" if architecture == "topk" else "jumprelu")
    if architecture == "topk":
        assert cfg_json["activation_fn_kwargs"] == {"k": 3}
    assert (tmp_path / "seed_0" / "sae_weights.safetensors").resolve() == (tmp_path / "seed_0" / "sae.safetensors").resolve()


def test_export_round_trip_is_exact_without_scale(tmp_path) -> None:
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=32, k=2), seed=5)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    save_sae(sae, tmp_path / "s", meta={"layer": 1})
    loaded, _ = load_sae(tmp_path / "s")
    x = torch.randn(10, 8)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae, name), getattr(loaded, name))
    assert torch.equal(sae.eval()(x).x_hat, loaded(x).x_hat)


def _write_saelens(directory, cfg: dict, tensors: dict) -> None:
    directory.mkdir()
    (directory / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(directory / "sae_weights.safetensors"))


def test_load_generic_saelens_relu_jumprelu_topk(tmp_path) -> None:
    torch.manual_seed(6)
    d_in, d_sae = 6, 10
    weights = {"W_enc": torch.randn(d_in, d_sae), "b_enc": torch.randn(d_sae), "W_dec": torch.randn(d_sae, d_in), "b_dec": torch.randn(d_in)}
    base = {"d_in": d_in, "d_sae": d_sae, "hook_name": "blocks.4.hook_resid_post", "normalize_activations": "none"}
    x = torch.randn(5, d_in)
    pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]

    _write_saelens(tmp_path / "relu", {**base, "architecture": "standard", "activation_fn_str": "relu"}, weights)
    relu, _ = load_sae(tmp_path / "relu")
    assert relu.cfg.architecture == "relu"
    assert torch.allclose(relu.encode(x), torch.relu(pre), atol=1e-6)

    threshold = torch.full((d_sae,), 0.3)
    _write_saelens(tmp_path / "jump", {**base, "architecture": "jumprelu"}, {**weights, "threshold": threshold})
    jump, _ = load_sae(tmp_path / "jump")
    assert torch.allclose(jump.encode(x), torch.relu(pre) * (pre > 0.3), atol=1e-6)

    _write_saelens(tmp_path / "topk", {**base, "architecture": "topk", "activation_fn_kwargs": {"k": 2}}, weights)
    topk, _ = load_sae(tmp_path / "topk")
    expected = torch.zeros_like(pre).scatter(1, pre.topk(2).indices, torch.relu(pre.topk(2).values))
    assert topk.cfg.k == 2 and torch.allclose(topk.encode(x), expected, atol=1e-6)
    assert torch.allclose(topk(x).x_hat, expected @ weights["W_dec"] + weights["b_dec"], atol=1e-5)

    _write_saelens(tmp_path / "norm", {**base, "architecture": "standard", "normalize_activations": "layer_norm"}, weights)
    with pytest.raises(ValueError, match="normalize_activations"):
        load_sae(tmp_path / "norm")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_in": 8, "d_sae": 8, "k": 8}, "k=8 must be smaller"),
        ({"d_in": 8, "d_sae": 16, "architecture": "gated"}, "unknown SAE architecture 'gated'"),
        ({"d_in": 8}, "d_sae or expansion_factor"),
        ({"d_in": 8, "d_sae": 16, "k": 4, "l1_coeff": float("nan")}, "l1_coeff"),
    ],
)
def test_bad_config_gives_one_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SAEConfig(**kwargs)


def test_unknown_config_key_and_missing_export(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown SAE config key"):
        SAEConfig.from_dict({"d_in": 4, "d_sae": 8, "k": 2, "kk": 1})
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path)
    assert np.isclose(SAEConfig(d_in=4, expansion_factor=4, k=2).num_latents, 16)
