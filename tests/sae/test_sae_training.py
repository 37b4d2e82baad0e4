"""SAE training behaviour on synthetic data with a known sparse dictionary (bare loop, CPU, seconds)."""
from __future__ import annotations

import numpy as np
import torch

from activations.records import CATEGORIES
from sae.config import SAEConfig
from sae.losses import auxk_loss
from sae.step import BareTrainer
from sae.tracking import evaluate_sae
from tests.helpers.sae_fixtures import one_torch_thread, recovered_fraction, sparse_dictionary_data  # noqa: F401

D_IN, N_ATOMS, ACTIVE = 32, 64, 3


def _train(trainer: BareTrainer, x: torch.Tensor, steps: int, labels: torch.Tensor | None = None, batch: int = 256) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        rows = torch.randint(0, len(x), (batch,), generator=generator)
        trainer.step(x[rows], None if labels is None else labels[rows])


def test_recovers_a_known_sparse_dictionary() -> None:
    x, atoms = sparse_dictionary_data(8192, D_IN, N_ATOMS, ACTIVE, seed=0)
    data = torch.from_numpy(x)
    trainer = BareTrainer(SAEConfig(d_in=D_IN, d_sae=128, k=ACTIVE), seeds=[0], lr=3e-3)
    sae = trainer.saes[0]
    sae.init_b_dec_geometric_median(data[:2048])
    _train(trainer, data, steps=300)
    scores = evaluate_sae(sae, [data[:4096]])
    assert scores["fvu"] < 0.2
    assert scores["l0"] == ACTIVE  # TopK: exactly k active latents per row
    assert recovered_fraction(atoms, sae.W_dec, threshold=0.9) >= 0.8


def _revived_fraction(auxk_coeff: float, data: torch.Tensor, forced: torch.Tensor) -> float:
    cfg = SAEConfig(d_in=D_IN, d_sae=128, k=ACTIVE, auxk_coeff=auxk_coeff, auxk_k=16, dead_tokens_threshold=512)
    trainer = BareTrainer(cfg, seeds=[0], lr=3e-3)
    sae = trainer.saes[0]
    with torch.no_grad():  # forced-dead latents: tiny encoder columns never win the top-k
        sae.init_b_dec_geometric_median(data[:2048])
        sae.W_enc[:, forced] *= 0.1
    _train(trainer, data, steps=300)
    sae.eval()
    with torch.no_grad():
        values, indices = sae.encode_topk(data[:4096])
    fired = torch.zeros(128, dtype=torch.bool)
    fired[indices[values > 0]] = True
    return float(fired[forced].float().mean())


def test_auxk_revives_dead_latents() -> None:
    data = torch.from_numpy(sparse_dictionary_data(8192, D_IN, N_ATOMS, ACTIVE, seed=1)[0])
    forced = torch.arange(64, 128)
    without = _revived_fraction(0.0, data, forced)
    with_auxk = _revived_fraction(1 / 32, data, forced)
    print('revived without / with AuxK', without, with_auxk)
    assert without <= 0.05
    assert with_auxk >= 0.2


def test_auxk_gradient_reaches_dead_encoder_columns() -> None:
    cfg = SAEConfig(d_in=8, d_sae=32, k=2, auxk_coeff=1.0, auxk_k=4, dead_tokens_threshold=1)
    trainer = BareTrainer(cfg, seeds=[0])
    sae, tracker = trainer.saes[0], trainer.trackers[0]
    dead = torch.zeros(32, dtype=torch.bool)
    dead[16:] = True
    tracker.tokens_since_fired[16:] = 100  # mark latents 16.. dead
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # dead latents: tiny pre-activations, below the live top-k but often positive
        sae.W_enc[:, 16:] *= 0.01
    out = sae(x, dead_mask=dead)
    assert out.aux_x_hat is not None and not torch.isin(out.latent_indices, torch.arange(16, 32)).any()
    auxk_loss(x, out).backward()
    assert sae.W_enc_rows.grad[16:].abs().sum() > 0  # gradient reaches the dead latents' encoder rows
    assert sae.W_enc_rows.grad[:16].abs().sum() == 0
    assert sae.b_enc.grad[16:].abs().sum() > 0


def _centroid_accuracy(codes: np.ndarray, labels: np.ndarray, n_fit: int) -> float:
    """Nearest-centroid accuracy (cosine) on held-out rows, centroids from the first n_fit rows."""
    codes = codes / np.maximum(np.linalg.norm(codes, axis=1, keepdims=True), 1e-9)
    classes = np.unique(labels)
    centroids = np.stack([codes[:n_fit][labels[:n_fit] == c].mean(0) for c in classes])
    predicted = classes[(codes[n_fit:] @ centroids.T).argmax(1)]
    return float((predicted == labels[n_fit:]).mean())


def test_contrastive_term_separates_categories_in_code_space() -> None:
    n = 6000
    x, _ = sparse_dictionary_data(n, D_IN, N_ATOMS, ACTIVE, seed=2)
    rng = np.random.default_rng(3)
    class_ids = np.array([CATEGORIES.index(c) for c in ("benign", "safety", "humanizing")])
    labels = class_ids[rng.integers(0, 3, n)]
    class_dirs = rng.standard_normal((len(CATEGORIES), D_IN))
    class_dirs /= np.linalg.norm(class_dirs, axis=1, keepdims=True)
    data = torch.from_numpy((x + 0.6 * class_dirs[labels]).astype(np.float32))
    y = torch.from_numpy(labels)
    accuracies = []
    for coeff in (0.0, 0.3):
        trainer = BareTrainer(SAEConfig(d_in=D_IN, d_sae=128, k=ACTIVE, contrastive_coeff=coeff), seeds=[0], lr=3e-3)
        sae = trainer.saes[0]
        sae.init_b_dec_geometric_median(data[:2048])
        _train(trainer, data[:4000], steps=250, labels=y[:4000])
        with torch.no_grad():
            codes = sae.eval().encode(data[4000:]).numpy()
        accuracies.append(_centroid_accuracy(codes, labels[4000:], n_fit=1000))
    print('centroid accuracy without / with contrastive', accuracies)
    assert accuracies[1] >= accuracies[0] + 0.15, accuracies
