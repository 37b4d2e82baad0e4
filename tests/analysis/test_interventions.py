"""Steering, ablation and clamping context managers (analysis.interventions) on the tiny random Llama."""
from __future__ import annotations

import copy

import pytest
import torch

from activations.adapter import ModelAdapter
from activations.hooks import residual_hooks
from activations.tokenize import encode_prompts, position_ids_from_mask
from analysis.interventions import ablate_direction, ablate_features, clamp_features, steer, steer_sae
from sae.config import SAEConfig
from sae.model import SparseAutoencoder

PROMPTS = ["Hi", "How do I bake bread at home?", "Tell me a short story about a cat and a dog."]
LAYER = 1
NEW_TOKENS = 4


def logits_of(model, batch):
    """Logits `(batch, seq, vocab)`; position ids from the mask so left-padded rows match unpadded runs."""
    with torch.no_grad():
        return model(**batch, position_ids=position_ids_from_mask(batch["attention_mask"])).logits


def greedy(model, batch):
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True)
    return out[:, -NEW_TOKENS:]


def topk_sae(d_in=64, d_sae=128, k=8, seed=0):
    return SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, k=k), seed=seed).eval().requires_grad_(False)


def orthonormal_relu_sae(d_in=64, d_sae=32, seed=0):
    """ReLU SAE with orthonormal decoder rows and W_enc = W_dec^T: pre(x + (z' − z) W_dec) = pre(x) + z' − z,
    so re-encoding an edited activation is exact and the edited latent vector can be read back."""
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="relu"), seed=seed).eval()
    q, _ = torch.linalg.qr(torch.randn(d_in, d_sae, generator=torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        sae.W_dec.copy_(q.t())
        sae.W_enc.copy_(q)
        sae.b_enc.fill_(0.01)
    return sae.requires_grad_(False)


def keeper(store, key):
    def edit(hidden):
        store[key] = hidden.detach().clone()

    return edit


@pytest.fixture(scope="module")
def setup(tiny_llama):
    model, tok = tiny_llama
    adapter = ModelAdapter(model)
    batch = encode_prompts(tok, PROMPTS, chat_template=False)  # short sequences keep the tests fast
    singles = [encode_prompts(tok, [p], chat_template=False) for p in PROMPTS]
    gen = torch.Generator().manual_seed(1)
    vectors = torch.randn(len(PROMPTS), adapter.d_model, generator=gen)
    return model, adapter, batch, singles, vectors


def all_hooks_removed(adapter):
    """No hook of ours is left (transformers installs its own output-capturing hooks lazily)."""
    def ours(module):
        return [h for h in module._forward_hooks.values() if getattr(h, "__module__", "").startswith("activations.")]

    return not ours(adapter.embed) and all(not ours(block) for block in adapter.blocks)


def test_alpha_zero_is_bit_identical(setup):
    model, adapter, batch, _, vectors = setup
    clean = logits_of(model, batch)
    sae = topk_sae()
    with steer(adapter, LAYER, vectors[0], alphas=0.0):
        assert torch.equal(logits_of(model, batch), clean)
    with steer(adapter, LAYER, vectors, alphas=torch.zeros(3)):
        assert torch.equal(logits_of(model, batch), clean)
    with steer_sae(adapter, LAYER, sae, torch.ones(128), alphas=0.0):
        assert torch.equal(logits_of(model, batch), clean)
    # mixed strengths: the alpha-0 row is bit-identical, the others move
    with steer(adapter, LAYER, vectors, alphas=torch.tensor([0.0, 2.0, 2.0])):
        mixed = logits_of(model, batch)
    assert torch.equal(mixed[0], clean[0]) and not torch.allclose(mixed[1:], clean[1:])
    with steer_sae(adapter, LAYER, sae, torch.ones(3, 128), alphas=torch.tensor([1.0, 0.0, 1.0])):
        mixed = logits_of(model, batch)
    assert torch.equal(mixed[1], clean[1]) and not torch.allclose(mixed[0], clean[0])


@pytest.mark.slow
def test_alpha_zero_is_bit_identical_on_embedded_model(embedded):
    model, tok = embedded
    adapter = ModelAdapter(model)
    batch = encode_prompts(tok, PROMPTS[:2])
    clean = logits_of(model, batch)
    with steer(adapter, 9, torch.randn(adapter.d_model), alphas=torch.zeros(2)):
        assert torch.equal(logits_of(model, batch), clean)


def test_sae_steering_with_tiny_alpha_keeps_reconstruction_error(setup):
    model, adapter, batch, _, _ = setup
    clean = logits_of(model, batch)
    with steer_sae(adapter, LAYER, topk_sae(), torch.ones(128), alphas=1e-12):
        torch.testing.assert_close(logits_of(model, batch), clean, rtol=0, atol=1e-5)


def test_bfloat16_model_with_float32_sae(setup):
    model, _, batch, _, vectors = setup
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    adapter = ModelAdapter(model16)
    clean = logits_of(model16, batch)
    seen: dict[str, torch.Tensor] = {}
    with steer_sae(adapter, LAYER, topk_sae(), torch.ones(3, 128), alphas=torch.tensor([0.0, 1.0, -1.0])):
        with residual_hooks(adapter, {LAYER: keeper(seen, "sae")}):
            steered = logits_of(model16, batch)
    assert seen["sae"].dtype == torch.bfloat16 and torch.isfinite(steered).all()
    assert torch.equal(steered[0], clean[0]) and not torch.equal(steered[1:], clean[1:])
    unit = vectors[0] / vectors[0].norm()
    with ablate_direction(adapter, vectors[0], layers=[LAYER]):
        with residual_hooks(adapter, {LAYER: keeper(seen, "ablated")}):
            logits_of(model16, batch)
    ablated = seen["ablated"].float()
    assert (ablated @ unit).abs().max() < 1e-2 * ablated.norm(dim=-1).max()


def _steered(space, adapter, vectors, alphas, positions, sae):
    if space == "residual":
        return steer(adapter, LAYER, vectors, alphas, positions=positions)
    return steer_sae(adapter, LAYER, sae, vectors, alphas, positions=positions)


@pytest.mark.parametrize("space", ["residual", "sae"])
@pytest.mark.parametrize("positions", ["all", "generated"])
def test_batched_per_row_steering_equals_row_by_row(setup, space, positions):
    model, adapter, batch, singles, vectors = setup
    sae = topk_sae()
    rows = vectors * 2.0 if space == "residual" else torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    alphas = torch.tensor([1.5, -1.0, 3.0])
    with _steered(space, adapter, rows, alphas, positions, sae):
        batched_logits = logits_of(model, batch)
        batched_tokens = greedy(model, batch)
    unsteered_tokens = greedy(model, batch)
    assert not torch.allclose(batched_logits, logits_of(model, batch), atol=1e-4)
    mask = batch["attention_mask"].bool()
    for i, single in enumerate(singles):
        with _steered(space, adapter, rows[i], float(alphas[i]), positions, sae):
            single_logits = logits_of(model, single)[0]
            single_tokens = greedy(model, single)[0]
        torch.testing.assert_close(batched_logits[i][mask[i]], single_logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(batched_tokens[i], single_tokens)
    assert all_hooks_removed(adapter)
    assert not torch.equal(batched_tokens, unsteered_tokens)


def test_generated_positions_leave_earlier_prompt_positions_untouched(setup):
    model, adapter, batch, _, vectors = setup
    seen: dict[str, torch.Tensor] = {}
    with residual_hooks(adapter, {3: keeper(seen, "clean")}):
        logits_of(model, batch)
    with steer(adapter, LAYER, vectors, alphas=3.0, positions="generated"):
        with residual_hooks(adapter, {3: keeper(seen, "steered")}):
            logits_of(model, batch)
    torch.testing.assert_close(seen["steered"][:, :-1], seen["clean"][:, :-1], rtol=0, atol=1e-6)
    assert (seen["steered"][:, -1] - seen["clean"][:, -1]).norm(dim=-1).min() > 1e-2


def _before_after(model, adapter, batch, context):
    """Residual at LAYER as the edit sees it (before) and as later blocks see it (after)."""
    seen: dict[str, torch.Tensor] = {}
    with residual_hooks(adapter, {LAYER: keeper(seen, "before")}):
        with context:
            with residual_hooks(adapter, {LAYER: keeper(seen, "after")}):
                logits_of(model, batch)
    return seen["before"].flatten(0, 1), seen["after"].flatten(0, 1)


def _active_features(sae, x, n):
    return torch.argsort((sae.encode(x) > 0).float().mean(0), descending=True)[:n].tolist()


def test_ablating_features_zeroes_them_and_keeps_the_rest(setup):
    """Checked on the latent vector itself: with an orthonormal ReLU SAE, re-encoding is exact. (A TopK
    SAE would let another latent enter the top-k after the edit, so there we check x' = decode(z') + err.)"""
    model, adapter, batch, _, _ = setup
    sae = orthonormal_relu_sae()
    x0, _ = _before_after(model, adapter, batch, steer(adapter, LAYER, torch.zeros(64), 0.0))
    ids = _active_features(sae, x0, 3)
    before, after = _before_after(model, adapter, batch, ablate_features(adapter, LAYER, sae, ids))
    z_before, z_after = sae.encode(before), sae.encode(after)
    assert (z_before[:, ids] > 0).any()
    torch.testing.assert_close(z_after[:, ids], torch.zeros_like(z_after[:, ids]), rtol=0, atol=1e-5)
    others = [j for j in range(32) if j not in ids]
    torch.testing.assert_close(z_after[:, others], z_before[:, others], rtol=0, atol=1e-5)
    # TopK SAE: the edit is exactly decode(z with ids zeroed) + reconstruction error
    topk = topk_sae()
    ids = _active_features(topk, x0, 2)
    before, after = _before_after(model, adapter, batch, ablate_features(adapter, LAYER, topk, ids))
    z = topk.encode(before)
    z_edit = z.clone()
    z_edit[:, ids] = 0.0
    torch.testing.assert_close(after, topk.decode(z_edit) + (before - topk.decode(z)), rtol=1e-5, atol=1e-5)


def test_clamping_sets_features_to_value_and_multiple_of_typical(setup):
    model, adapter, batch, _, _ = setup
    sae = orthonormal_relu_sae()
    ids = [3, 7]

    def latents_after(before, after):  # orthonormal decoder: z' = z + (x' − x) W_dec^T exactly
        return sae.encode(before), sae.encode(before) + (after - before) @ sae.W_dec.t()

    before, after = _before_after(model, adapter, batch, clamp_features(adapter, LAYER, sae, ids, value=2.5))
    z, z_new = latents_after(before, after)
    torch.testing.assert_close(z_new[:, ids], torch.full_like(z_new[:, ids], 2.5), rtol=0, atol=1e-5)
    others = [j for j in range(32) if j not in ids]
    torch.testing.assert_close(z_new[:, others], z[:, others], rtol=0, atol=1e-5)
    typical = torch.linspace(0.1, 3.2, 32)
    context = clamp_features(adapter, LAYER, sae, ids, multiple=2.0, typical=typical)
    before, after = _before_after(model, adapter, batch, context)
    _, z_new = latents_after(before, after)
    torch.testing.assert_close(z_new[:, ids], (2.0 * typical[ids]).expand(z_new.shape[0], 2), rtol=0, atol=1e-5)


def test_directional_ablation_removes_the_projection(setup):
    model, adapter, batch, _, vectors = setup
    direction = vectors[0]
    unit = direction / direction.norm()
    seen: dict[str, torch.Tensor] = {}
    layers = [-1, 0, 1, 2, 3]
    with ablate_direction(adapter, direction, layers="all"):
        with residual_hooks(adapter, {layer: keeper(seen, layer) for layer in layers}):
            logits_of(model, batch)
    for layer in layers:
        projection = seen[layer] @ unit
        assert projection.abs().max() < 1e-5 * seen[layer].norm(dim=-1).max()
    with ablate_direction(adapter, direction, layers=[2]):
        with residual_hooks(adapter, {2: keeper(seen, "only"), 1: keeper(seen, "earlier")}):
            via_ablate = logits_of(model, batch)
    assert (seen["only"] @ unit).abs().max() < 1e-5 and (seen["earlier"] @ unit).abs().max() > 1e-3
    with steer(adapter, 2, direction, alphas=1.0, operator="ablate"):
        torch.testing.assert_close(logits_of(model, batch), via_ablate, rtol=1e-5, atol=1e-5)


def test_interventions_compose_by_nesting_and_unhook_on_error(setup):
    model, adapter, batch, _, vectors = setup
    v, r = vectors[1], vectors[2] / vectors[2].norm()

    def by_hand(hidden):  # outer block first: add, then ablate
        added = hidden + 2.0 * v
        return added - (added @ r).unsqueeze(-1) * r

    with residual_hooks(adapter, {LAYER: by_hand}):
        expected = logits_of(model, batch)
    with steer(adapter, LAYER, v, alphas=2.0):
        with ablate_direction(adapter, r, layers=[LAYER]):
            nested = logits_of(model, batch)
    torch.testing.assert_close(nested, expected, rtol=1e-5, atol=1e-5)
    clean = logits_of(model, batch)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(adapter, LAYER, v, alphas=2.0), ablate_direction(adapter, r), steer_sae(
            adapter, 2, topk_sae(), torch.ones(128)
        ), clamp_features(adapter, 0, topk_sae(), [1], value=1.0):
            assert not all_hooks_removed(adapter)
            raise RuntimeError("boom")
    assert all_hooks_removed(adapter)
    assert torch.equal(logits_of(model, batch), clean)


def test_bad_arguments_are_one_clear_error(setup):
    model, adapter, batch, _, vectors = setup
    from probes.vectors import SteeringVector

    with pytest.raises(ValueError, match="d_model=64"):
        with steer(adapter, LAYER, torch.ones(65)):
            pass
    with pytest.raises(ValueError, match="belongs to layer 2"):
        with steer(adapter, LAYER, SteeringVector(vectors[0], layer=2)):
            pass
    with pytest.raises(ValueError, match="positions must be"):
        with steer(adapter, LAYER, vectors[0], positions="prompt"):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with steer(adapter, 9, vectors[0]):
            pass
    with pytest.raises(ValueError, match="batch 2 but the forward has batch 3"):
        with steer(adapter, LAYER, vectors[:2]):
            logits_of(model, batch)
    with pytest.raises(ValueError, match="exactly one of value= or multiple="):
        with clamp_features(adapter, LAYER, topk_sae(), [1], value=1.0, multiple=2.0):
            pass
    with pytest.raises(ValueError, match="d_sae=128"):
        with clamp_features(adapter, LAYER, topk_sae(), [500], value=1.0):
            logits_of(model, batch)
    with pytest.raises(ValueError, match="zero vector"):
        with ablate_direction(adapter, torch.zeros(64)):
            pass
    assert all_hooks_removed(adapter)
    clean = logits_of(model, batch)
    with steer(adapter, LAYER, SteeringVector(vectors[0], layer=LAYER), alphas=0.5):
        assert not torch.allclose(logits_of(model, batch), clean)
