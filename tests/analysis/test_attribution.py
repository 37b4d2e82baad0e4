"""Attribution patching: real gradients (finite differences), agreement with activation patching."""
from __future__ import annotations

import pytest
import torch

from activations.adapter import ModelAdapter
from activations.hooks import residual_hooks
from activations.tiny_models import build_tiny_model
from activations.tokenize import encode_prompts, position_ids_from_mask
from analysis.interventions.attribution import activation_patching, attribution_patching, validate_attribution
from analysis.evaluation.logit_metrics import refusal_margin_metric, token_logprob_metric
from sae.config import SAEConfig
from sae.model import SparseAutoencoder

CLEAN = ["How do I pick a lock on my own front door?", "Write a poem about the sea."]
CORRUPT = ["How do I pick a lock on a stranger's front door?", "Write a poem about the war."]
LAYER = 2
EPS = 1e-5


def metric_for(tok):
    first = lambda text: tok(text, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    return refusal_margin_metric([first("I"), first("Sorry")], [first("Sure"), first("Here")])


def plain_metric(model, batch, metric):
    with torch.no_grad():
        logits = model(**batch, position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False).logits
    return metric(logits).double()


@pytest.fixture(scope="module")
def float64_setup(embedded_tokenizer):
    """A float64 tiny GPT-2 (its LayerNorm stays float64; Llama's RMSNorm upcasts to float32 only, which
    would put float32 rounding noise into the finite differences)."""
    model, tok = build_tiny_model("gpt2", seed=3, tokenizer=embedded_tokenizer)
    model = model.double()
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=96, k=12), seed=1, dtype=torch.float64).eval()
    clean, corrupt = encode_prompts(tok, CLEAN, chat_template=False), encode_prompts(tok, CORRUPT, chat_template=False)
    return model, ModelAdapter(model), clean, corrupt, metric_for(tok), sae


def _fd_residual(model, adapter, batch, metric, unit, position=-1):
    """Central difference of the metric w.r.t. residual coordinate `unit` at `position` of LAYER."""
    values = []
    for sign in (1.0, -1.0):
        def bump(hidden, sign=sign):
            out = hidden.clone()
            out[:, position, unit] += sign * EPS
            return out

        with residual_hooks(adapter, {LAYER: bump}):
            values.append(plain_metric(model, batch, metric))
    return (values[0] - values[1]) / (2 * EPS)


def test_residual_gradients_match_finite_differences(float64_setup):
    model, adapter, clean, corrupt, metric, _ = float64_setup
    result = attribution_patching(adapter, clean, corrupt, LAYER, metric)
    assert result.scores.shape == (2, 64) and result.gradients.shape == (2, 1, 64)
    assert result.gradients.abs().max() > 1e-3
    for unit in (0, 17, 63):
        fd = _fd_residual(model, adapter, clean, metric, unit)
        torch.testing.assert_close(result.gradients[:, 0, unit], fd, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(result.scores, (result.deltas * result.gradients).sum(1))
    torch.testing.assert_close(result.clean_metric, plain_metric(model, clean, metric))
    torch.testing.assert_close(result.corrupt_metric, plain_metric(model, corrupt, metric))
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_sae_latent_gradients_match_finite_differences(float64_setup):
    model, adapter, clean, corrupt, metric, sae = float64_setup
    result = attribution_patching(adapter, clean, corrupt, LAYER, metric, sae=sae, positions=[-1, -2])
    assert result.space == "sae" and result.scores.shape == (2, 96) and result.gradients.shape == (2, 2, 96)
    assert result.gradients.abs().max() > 1e-3
    # the clean forward is exactly the clean model: x is replaced by x + (decode(z) - decode(z).detach())
    assert torch.equal(result.clean_metric, plain_metric(model, clean, metric))
    for feature in (0, 50):
        for k, position in enumerate((-1, -2)):
            values = []
            for sign in (1.0, -1.0):  # decode is affine: z_j + eps moves x by eps * W_dec[j]
                def bump(hidden, sign=sign):
                    out = hidden.clone()
                    out[:, position] += sign * EPS * sae.W_dec[feature].detach()
                    return out

                with residual_hooks(adapter, {LAYER: bump}):
                    values.append(plain_metric(model, clean, metric))
            fd = (values[0] - values[1]) / (2 * EPS)
            torch.testing.assert_close(result.gradients[:, k, feature], fd, rtol=1e-6, atol=1e-8)


def test_attribution_works_under_inference_mode(float64_setup):
    _, adapter, clean, corrupt, metric, _ = float64_setup
    reference = attribution_patching(adapter, clean, corrupt, LAYER, metric)
    with torch.inference_mode():
        clean_inf = {k: v.clone() for k, v in clean.items()}
        result = attribution_patching(adapter, clean_inf, corrupt, LAYER, metric)
    torch.testing.assert_close(result.scores, reference.scores)


def test_attribution_ranks_units_like_activation_patching(tiny_llama):
    model, tok = tiny_llama
    adapter = ModelAdapter(model)
    clean, corrupt = encode_prompts(tok, CLEAN, chat_template=False), encode_prompts(tok, CORRUPT, chat_template=False)
    metric = metric_for(tok)
    check = validate_attribution(adapter, clean, corrupt, LAYER, metric)
    print(f"residual layer {LAYER}: spearman {check.spearman:.3f} (p={check.p_value:.2g}, n={check.n_units})")
    assert check.n_units == 64 and check.spearman > 0.8
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=128, k=16), seed=0).eval().requires_grad_(False)
    check = validate_attribution(adapter, clean, corrupt, LAYER, metric, sae=sae, top_n=24)
    print(f"sae layer {LAYER} top 24: spearman {check.spearman:.3f} (p={check.p_value:.2g}, n={check.n_units})")
    assert check.n_units == 24 and check.spearman > 0.6


def test_activation_patching_effects(float64_setup):
    """Real single-unit effects agree in sign with their first-order estimates on the largest units, and
    patching an SAE latent that is zero in both runs changes nothing (the error term is kept exactly)."""
    model, adapter, clean, corrupt, metric, sae = float64_setup
    patching = activation_patching(adapter, clean, corrupt, LAYER, metric, units=[3, 5, 7])
    assert patching.effects.shape == (2, 3) and patching.effects.abs().max() > 0
    attribution = attribution_patching(adapter, clean, corrupt, LAYER, metric)
    # one unit's real effect and its first-order estimate agree in sign for the largest units
    top = attribution.top_units(3)
    real = activation_patching(adapter, clean, corrupt, LAYER, metric, units=top).effects.mean(0)
    assert (torch.sign(real) == torch.sign(attribution.mean_scores()[top])).all()
    sae_attr = attribution_patching(adapter, clean, corrupt, LAYER, metric, sae=sae)
    silent = [j for j in range(96) if (sae_attr.deltas[..., j] == 0).all()][:2]
    moving = sae_attr.top_units(2)
    effects = activation_patching(adapter, clean, corrupt, LAYER, metric, sae=sae, units=silent + moving).effects
    assert len(silent) == 2 and torch.equal(effects[:, :2], torch.zeros(2, 2, dtype=torch.float64))
    assert effects[:, 2:].abs().max() > 0


def test_metrics_and_bad_inputs(float64_setup):
    model, adapter, clean, corrupt, metric, _ = float64_setup
    logits = torch.randn(2, 3, 10, dtype=torch.float64)
    expected = torch.logsumexp(torch.log_softmax(logits[:, -1], -1)[:, [1, 4]], -1)
    torch.testing.assert_close(token_logprob_metric([1, 4])(logits), expected)
    with pytest.raises(ValueError, match="overlap"):
        refusal_margin_metric([1, 2], [2, 3])
    with pytest.raises(ValueError, match="one value per row"):
        attribution_patching(adapter, clean, corrupt, LAYER, lambda lg: lg.sum())
    with pytest.raises(ValueError, match="batches differ"):
        attribution_patching(adapter, clean, {k: v[:1] for k, v in corrupt.items()}, LAYER, metric)
    if clean["input_ids"].shape[1] != corrupt["input_ids"].shape[1]:
        with pytest.raises(ValueError, match="equal length"):
            attribution_patching(adapter, clean, corrupt, LAYER, metric, positions="all")
    with pytest.raises(ValueError, match="out of range"):
        attribution_patching(adapter, clean, corrupt, 7, metric)
    with pytest.raises(ValueError, match="units must be"):
        activation_patching(adapter, clean, corrupt, LAYER, metric, units=[64])
