"""The fused training path (deferred row gradients + FusedAdam) against the standard path.

On CPU the fused path runs its torch reference; the Triton kernels are compared with that reference
where they can run (a CUDA device, or Triton's interpreter with TRITON_INTERPRET=1 on CPU tensors).
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sae.kernels import triton as triton_kernels
from sae.config import DataConfig, OptimConfig, SAEConfig, TrainConfig
from sae.export import load_sae_run
from sae.kernels.fused import DeferredGrads, DenseRowsTerm, LatentSort, merge_terms, reference_row_grad_adam, term_gradient
from sae.kernels.adam import FusedAdam
from sae.module import SAELightningModule
from sae.step import BareTrainer
from sae.train import train_saes
from tests.helpers.sae_fixtures import one_torch_thread, sparse_dictionary_data, write_store  # noqa: F401

LAYER = 1


def _params(trainer: BareTrainer) -> list[torch.Tensor]:
    return [p.detach().clone() for sae in trainer.saes for p in sae.parameters()]


@pytest.mark.parametrize(
    "cfg",
    [
        SAEConfig(d_in=24, d_sae=192, k=6, auxk_coeff=1 / 32, auxk_k=12, dead_tokens_threshold=48, normalize_input=True),
        SAEConfig(d_in=24, d_sae=192, k=4, architecture="batchtopk", l1_coeff=1e-3, contrastive_coeff=0.1,
                  normalize_input=True),
    ],
    ids=["topk-auxk", "batchtopk-l1-contrastive"],
)
def test_fused_path_takes_the_same_steps_as_the_standard_path(cfg: SAEConfig) -> None:
    standard = BareTrainer(cfg, [0, 1], lr=1e-3)
    fused = BareTrainer(cfg, [0, 1], lr=1e-3, fused=True)
    g = torch.Generator().manual_seed(0)
    for a, b in zip(standard.saes, fused.saes):
        with torch.no_grad():  # a non-zero b_dec and input scale (normalize_input) exercise their gradients
            a.b_dec.normal_(generator=g)
            b.b_dec.copy_(a.b_dec)
            a.input_scale.fill_(0.7)
            b.input_scale.fill_(0.7)
    dead_seen = False
    for _ in range(25):
        x = torch.randn(48, cfg.d_in, generator=g) * 2 + 0.5
        labels = torch.randint(0, 3, (48,), generator=g)
        terms_a, terms_b = standard.step(x, labels), fused.step(x, labels)
        for ta, tb in zip(terms_a, terms_b):
            torch.testing.assert_close(tb.total, ta.total, rtol=1e-4, atol=1e-6)
        dead_seen |= bool(fused.trackers[0].dead_mask().any())
    for a, b in zip(_params(standard), _params(fused)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-6)
    for sae in fused.saes:  # the decoder constraint is applied inside FusedAdam
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(cfg.num_latents))
    if cfg.auxk_coeff > 0:
        assert dead_seen  # AuxK really contributed terms


def test_fused_adam_state_survives_a_checkpoint_round_trip_with_bf16_moments() -> None:
    cfg = SAEConfig(d_in=16, d_sae=96, k=4)
    xs = [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(10)]
    straight = BareTrainer(cfg, [3], lr=1e-3, fused=True, exp_avg_dtype=torch.bfloat16)
    for x in xs:
        straight.step(x)
    first = BareTrainer(cfg, [3], lr=1e-3, fused=True, exp_avg_dtype=torch.bfloat16)
    for x in xs[:5]:
        first.step(x)
    model_state, optim_state = first.saes[0].state_dict(), first.optimizer.state_dict()
    assert optim_state["state"][0]["exp_avg"].dtype == torch.bfloat16
    resumed = BareTrainer(cfg, [3], lr=1e-3, fused=True, exp_avg_dtype=torch.bfloat16)
    resumed.saes[0].load_state_dict(model_state)
    resumed.optimizer.load_state_dict(optim_state)  # torch casts moments to the parameter dtype here...
    for x in xs[5:]:
        resumed.step(x)
    assert resumed.optimizer.state[resumed.saes[0].W_dec]["exp_avg"].dtype == torch.bfloat16  # ...and back
    for a, b in zip(_params(straight), _params(resumed)):
        assert torch.equal(a, b)


def test_forward_copy_is_cached_and_remade_when_the_parameter_changes() -> None:
    store = DeferredGrads()
    param = torch.nn.Parameter(torch.randn(8, 4))
    copy = store.compute_weight("W", param, torch.bfloat16)
    assert store.compute_weight("W", param, torch.bfloat16) is copy
    assert store.shadow_for_update("W", param) is copy
    with torch.no_grad():
        param.mul_(2)  # an in-place edit outside the fused optimizer (e.g. a checkpoint load)
    assert store.shadow_for_update("W", param) is None
    fresh = store.compute_weight("W", param, torch.bfloat16)
    torch.testing.assert_close(fresh.float(), param.detach(), rtol=1e-2, atol=0)
    assert store.compute_weight("W", param, torch.float32).data_ptr() == param.data_ptr()  # no copy needed


def test_dead_ids_follow_the_dead_mask_and_auxk_is_skipped_when_none_is_dead() -> None:
    from sae.tracking import LatentTracker

    tracker = LatentTracker(32, dead_tokens_threshold=10)
    assert tracker.dead_ids().numel() == 0  # nothing dead yet: the AuxK pass is skipped
    g = torch.Generator().manual_seed(0)
    seen = set()
    for step in range(12):
        live = int(torch.randint(1, 33, (1,), generator=g))  # only latents < live can fire this batch
        tracker.update(torch.ones(4, 2), torch.randint(0, live, (4, 2), generator=g))
        assert torch.equal(tracker.dead_ids(), tracker.dead_mask().nonzero().squeeze(1))
        seen.add(tracker.dead_ids().numel())
    assert len(seen) > 2  # the dead set grew and shrank
    fresh = LatentTracker(32, dead_tokens_threshold=10)
    fresh.load_state_dict(tracker.state_dict())  # after a load the count is read back once
    assert torch.equal(fresh.dead_ids(), tracker.dead_ids())
    cfg = SAEConfig(d_in=8, d_sae=32, k=2, auxk_coeff=1 / 32, dead_tokens_threshold=10**9)
    trainer = BareTrainer(cfg, [0], lr=1e-3, fused=True)
    terms = trainer.step(torch.randn(16, 8))
    assert float(terms[0].auxk) == 0.0


def test_merged_terms_sum_their_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    rows, d = 20, 5
    terms = []
    for batch, n in ((6, 3), (4, 7)):
        indices = torch.stack([torch.randperm(rows, generator=g)[:n] for _ in range(batch)])
        terms.append(LatentSort.of(indices, rows).term(torch.randn(batch, n, generator=g), torch.randn(batch, d, generator=g)))
    expected = term_gradient(terms[0], rows) + term_gradient(terms[1], rows)
    torch.testing.assert_close(term_gradient(merge_terms(terms, rows), rows), expected)


def test_fused_lightning_run_resumes_exactly_and_matches_the_standard_run(tmp_path: Path) -> None:
    x, _ = sparse_dictionary_data(400, 16, 32, 2, seed=1)
    store = write_store(tmp_path / "store", x, LAYER, ["benign"] * 400, ["extract"] * 300 + ["calibrate"] * 100)
    cfg = SAEConfig(d_in=16, d_sae=64, k=2, auxk_coeff=1 / 32, dead_tokens_threshold=256)
    kw = dict(enable_progress_bar=False, print_table=False,
              trainer={"accelerator": "cpu"})  # bitwise resume is a CPU property (GPU atomics reorder float sums)

    def job(steps: int, fused: bool) -> TrainConfig:
        return TrainConfig(seeds=[0, 1], steps=steps, sae=cfg, optim=OptimConfig(fused=fused),
                           data=DataConfig(batch_size=64), log_every_n_steps=5, ckpt_every=4)

    straight = train_saes(store, LAYER, tmp_path / "a", job(12, True), **kw)
    killed = train_saes(store, LAYER, tmp_path / "b", job(6, True), **kw)
    resumed = train_saes(store, LAYER, killed, job(12, True), ckpt_path="last", **kw)
    standard = train_saes(store, LAYER, tmp_path / "c", job(12, False), **kw)
    a, b, c = load_sae_run(straight), load_sae_run(resumed), load_sae_run(standard)
    for seed in (0, 1):
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            assert torch.equal(getattr(a[seed], name), getattr(b[seed], name)), (seed, name)
            torch.testing.assert_close(getattr(a[seed], name), getattr(c[seed], name), rtol=1e-4, atol=1e-5)


def test_fused_with_several_ranks_gathers_and_bad_options_are_refused() -> None:
    # data parallelism keeps the fused path: FusedAdam gathers every rank's deferred terms, and DDP
    # is told to leave the two matrices alone (equality with one device: tests/sae/test_sae_ddp.py)
    module = SAELightningModule(SAEConfig(d_in=8, d_sae=32, k=2), optim=OptimConfig(fused=True))
    module._trainer = SimpleNamespace(world_size=2, max_steps=10, strategy=object(), global_rank=0)  # type: ignore[assignment]
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, FusedAdam) and optimizer.world_size == 2
    assert module._ddp_params_and_buffers_to_ignore == ["saes.0.W_enc_rows", "saes.0.W_dec"]
    with pytest.raises(ValueError, match="exp_avg_dtype must be float32 or bfloat16"):
        SAELightningModule(SAEConfig(d_in=8, d_sae=32, k=2), optim={"exp_avg_dtype": "float16"})
    with pytest.raises(RuntimeError, match="switched to the fused path"):
        sae = BareTrainer(SAEConfig(d_in=8, d_sae=32, k=2), [0]).saes[0]
        FusedAdam([sae], lr=1e-3).step()


def _kernel_device() -> torch.device | None:
    if triton_kernels.triton is None:
        return None
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu") if os.environ.get("TRITON_INTERPRET") == "1" else None


@pytest.mark.skipif(_kernel_device() is None, reason="needs Triton on a CUDA device (or TRITON_INTERPRET=1)")
def test_triton_kernels_match_the_torch_reference() -> None:
    device = _kernel_device()
    g = torch.Generator(device).manual_seed(0)
    rows, d, batch, n = 96, 40, 24, 5  # d not a power of two: masked lanes
    W = torch.randn(rows, d, device=device, generator=g)
    W /= W.norm(dim=1, keepdim=True)
    source = torch.randn(batch, d, device=device, generator=g)
    indices = torch.stack([torch.randperm(rows, device=device, generator=g)[:n] for _ in range(batch)])
    values = torch.randn(batch, n, device=device, generator=g)
    sort = LatentSort.of(indices, rows)
    values[:, 0] = 0.0  # zero codes: skipped by the gathers, their dots left 0
    term = sort.term(values, source)
    ref_decode = torch.nn.functional.embedding_bag(indices, W, per_sample_weights=values, mode="sum")
    torch.testing.assert_close(triton_kernels.gather_decode(values, indices, W), ref_decode)
    bias = torch.randn(d, device=device, generator=g)
    torch.testing.assert_close(triton_kernels.gather_decode(values, indices, W, bias), ref_decode + bias)
    dots = triton_kernels.row_dots(W, sort.crow, sort.src, term.coef, source)
    expected = (source[sort.src] * W[indices.reshape(-1)[sort.order]]).sum(-1) * (term.coef != 0)
    torch.testing.assert_close(dots, expected)
    options = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, step=4, remove_parallel=True, renorm=True)
    for m_dtype in (torch.float32, torch.bfloat16):
        w_k, w_r = W.clone(), W.clone()
        m_k = (torch.randn(rows, d, device=device, generator=g) * 1e-3).to(m_dtype)
        v_k = torch.rand(rows, d, device=device, generator=g) * 1e-5
        m_r, v_r = m_k.clone(), v_k.clone()
        shadow = torch.empty(rows, d, device=device, dtype=torch.bfloat16)
        dense = DenseRowsTerm(torch.tensor([3, 50, 7], device=device), torch.randn(3, d, device=device, generator=g))
        dense_pos = torch.full((rows,), -1, device=device, dtype=torch.int64)
        dense_pos[dense.rows] = torch.arange(3, device=device)
        triton_kernels.row_grad_adam(w_k, shadow, m_k, v_k, term.crow, term.src, term.coef, source,
                                     dense_pos=dense_pos, dense=dense.values, **options)
        reference_row_grad_adam(w_r, m_r, v_r, term, dense=dense, **options)
        torch.testing.assert_close(w_k, w_r, rtol=1e-4, atol=1e-6)  # fp32, different summation order
        torch.testing.assert_close(m_k.float(), m_r.float(), rtol=1e-2 if m_dtype == torch.bfloat16 else 1e-4, atol=1e-7)
        torch.testing.assert_close(v_k, v_r, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(shadow.float(), w_k, rtol=1e-2, atol=1e-3)


@pytest.mark.skipif(_kernel_device() is None, reason="needs Triton on a CUDA device (or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("dtype,width", [(torch.bfloat16, 20000), (torch.float16, 20000), (torch.bfloat16, 4100)])
def test_filtered_topk_is_exact_with_ties_clusters_and_overflow(dtype: torch.dtype, width: int, monkeypatch) -> None:
    """20000 columns: chunks of 128 with a partial last chunk; 4100: chunks of 32 (a narrow row, as a
    latent-parallel shard's)."""
    from sae.kernels import topk_filter

    device = _kernel_device()
    if device.type == "cpu":  # the interpreter runs the kernels on CPU tensors
        monkeypatch.setattr(topk_filter, "available", lambda _device: True)
    g = torch.Generator(device).manual_seed(1)
    k = 16
    x = torch.randn(6, width, device=device, generator=g).to(dtype)
    x[0, :3000] = 5.0  # 3000 ties above everything else: the buffer overflows, the repair kernel runs
    x[1, 100:140] = 9.0  # the row's top k all in one chunk: a loose threshold
    x[2] = 0.0  # all equal
    assert topk_filter.supported(x, k)
    values, indices = topk_filter.filtered_topk(x, k)
    expected = x.float().topk(k, dim=1).values
    assert torch.equal(values.float().sort(dim=1).values, expected.sort(dim=1).values)
    assert torch.equal(x.gather(1, indices), values)
    assert all(len(set(row.tolist())) == k for row in indices.cpu())
    assert not topk_filter.supported(x.float(), k)  # float32 rows go to torch.topk
    assert topk_filter.chunk_for(width, k) == (128 if width == 20000 else 32)


def test_filter_chunks_shrink_for_narrow_rows() -> None:
    from sae.kernels.topk_filter import chunk_for

    assert chunk_for(65536, 64) == 128 and chunk_for(32768, 64) == 64 and chunk_for(16384, 64) == 32
    assert chunk_for(8192, 64) is None  # fewer than 8k maxima even with chunks of 32: torch.topk
