"""Micro-benchmarks of the sparse primitives behind the SAE step, and a profile of one step (GPU).

    python bench/sae_kernels_micro.py [--batches 4096 16384] [--profile]

Times, for d_in 4096, 65,536 latents, k 64: the alternatives for Sᵀ·D (the weight gradients),
for the gathered dot products (grad of the decoder's latent values), and the encoder forward pieces.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sae_step import kill_latents, time_ms  # noqa: E402
from sae.kernels.csr import scatter_rows_matmul, sparse_decode  # noqa: E402
from sae.kernels.topk_filter import filtered_topk  # noqa: E402


def dense_matmul(indices: torch.Tensor, weights: torch.Tensor, dense: torch.Tensor, n_rows: int) -> torch.Tensor:
    g = torch.zeros(indices.shape[0], n_rows, device=indices.device, dtype=dense.dtype)
    g.scatter_(1, indices, weights.to(dense.dtype))
    return g.t() @ dense


def two_stage_topk(pre: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per chunk of columns, then top-k of the candidates (same result as one top-k)."""
    batch, n = pre.shape
    values, local = pre.view(batch, n // chunk, chunk).topk(k, dim=-1, sorted=False)
    cols = local + torch.arange(0, n, chunk, device=pre.device)[None, :, None]
    best, pick = values.view(batch, -1).topk(k, dim=-1, sorted=False)
    return best, cols.view(batch, -1).gather(1, pick)


def fused_cases(W: torch.Tensor, xb: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, k: int) -> dict:
    """The Triton kernels of the fused path, checked against torch first."""
    from sae.kernels import triton as tk
    from sae.kernels.fused import LatentSort, RowGradTerm, reference_row_grad_adam

    d_sae = W.shape[0]
    W16 = W.bfloat16()
    sort = LatentSort.of(idx, d_sae)
    term = sort.term(w, xb)
    ref_decode = torch.nn.functional.embedding_bag(idx, W16.float(), per_sample_weights=w, mode="sum")
    err = (tk.gather_decode(w, idx, W16) - ref_decode).norm() / ref_decode.norm()
    dots = tk.row_dots(W16, sort.crow, sort.src, term.coef, xb)
    ref_dots = (xb.float()[sort.src] * W16.float()[idx.reshape(-1)[sort.order]]).sum(-1)
    err_dots = (dots - ref_dots).norm() / ref_dots.norm()
    Wa, Wb_ = W[:4096].clone(), W[:4096].clone()
    small = RowGradTerm(sort.crow[:4097], sort.src[: int(sort.crow[4096])], term.coef[: int(sort.crow[4096])], xb)
    ma, va = torch.rand_like(Wa) * 1e-3, torch.rand_like(Wa) * 1e-6
    mb, vb = ma.clone(), va.clone()
    shadow = Wa.bfloat16()
    opts = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=3, remove_parallel=True, renorm=True)
    tk.row_grad_adam(Wa, shadow, ma, va, small.crow, small.src, small.coef, xb, **opts)
    reference_row_grad_adam(Wb_, mb, vb, small, **opts)
    err_adam = max(float((a - b).norm() / b.norm()) for a, b in ((Wa, Wb_), (ma, mb), (va, vb)))
    err_shadow = float((shadow.float() - Wa).norm() / Wa.norm())
    print(f"  kernel checks: decode {err:.1e}, row_dots {err_dots:.1e}, row_grad_adam {err_adam:.1e}, shadow {err_shadow:.1e}")
    m, v, m16 = torch.zeros_like(W), torch.zeros_like(W), torch.zeros_like(W, dtype=torch.bfloat16)
    return {
        "fused decode (triton gather)": lambda: tk.gather_decode(w, idx, W16),
        "fused row_dots (triton)": lambda: tk.row_dots(W16, sort.crow, sort.src, term.coef, xb),
        "fused row_grad_adam fp32 m (triton)": lambda: tk.row_grad_adam(
            W, W16, m, v, sort.crow, sort.src, term.coef, xb, **opts),
        "fused row_grad_adam bf16 m (triton)": lambda: tk.row_grad_adam(
            W, W16, m16, v, sort.crow, sort.src, term.coef, xb, **opts),
        "latent sort (LatentSort.of)": lambda: LatentSort.of(idx, d_sae),
        **{f"fused row_grad_adam fp32 m, {nw} warps": (lambda nw=nw: tk.row_grad_adam(
            W, W16, m, v, sort.crow, sort.src, term.coef, xb, num_warps=nw, **opts)) for nw in (4, 8, 16, 32)},
        **{f"encoder row_grad_adam bf16 m, column block {cb}": (lambda cb=cb: tk.row_grad_adam(
            W, W16, m16, v, sort.crow, sort.src, term.coef, xb, column_block=cb,
            **{**opts, "remove_parallel": False, "renorm": False})) for cb in (512, 1024, 2048, 4096)},
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--fused", action="store_true", help="profile the fused path")
    parser.add_argument("--auxk-dead", action="store_true",
                        help="profile with AuxK on and 3%% of the latents dead (bench.sae_step.kill_latents)")
    parser.add_argument("--skip-micro", action="store_true", help="only the profile")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    dev = torch.device("cuda")
    d_in, d_sae, k = 4096, 65536, 64
    W = torch.randn(d_sae, d_in, device=dev) / 64
    Wb = W.bfloat16()
    for batch in [] if args.skip_micro else args.batches:
        x = torch.randn(batch, d_in, device=dev)
        xb = x.bfloat16()
        idx = torch.randint(0, d_sae, (batch, k), device=dev)
        w = torch.randn(batch, k, device=dev)
        print(f"batch {batch}")
        cases = {
            "StD csr fp32 (ours)": lambda: scatter_rows_matmul(idx, w, x, d_sae),
            "StD dense bf16": lambda: dense_matmul(idx, w, xb, d_sae),
            "decode (ours, fp32 csr)": lambda: sparse_decode(w, idx.sort(dim=1).values, W),
            "dense dot bf16 (x @ Wᵀ, gather)": lambda: (xb @ Wb.t()).gather(1, idx),
            "embedding_bag bf16": lambda: F.embedding_bag(idx, Wb, per_sample_weights=w.bfloat16(), mode="sum"),
            "encoder matmul bf16": lambda: xb @ Wb.t(),
            "topk(64) of (batch, d_sae) bf16": None,
            "W fp32->bf16 transposed copy": lambda: W.t().bfloat16().contiguous(),
        }
        crow = torch.arange(0, batch * k + 1, k, device=dev)
        csr_f = torch.sparse_csr_tensor(crow, idx.reshape(-1), w.reshape(-1), (batch, d_sae))
        csr_b = torch.sparse_csr_tensor(crow, idx.reshape(-1), w.reshape(-1).bfloat16(), (batch, d_sae))
        W_in_rows = W.t().contiguous().t()  # (d_sae, d_in) column-major view: why the encoder is stored by rows
        cases.update({
            "decode csr fp32 @ W": lambda: csr_f @ W,
            "decode csr bf16 @ Wb": lambda: csr_b @ Wb,
            "grad_x csr fp32 @ column-major view": lambda: csr_f @ W_in_rows,
            "sddmm fp32 (sampled_addmm)": lambda: torch.sparse.sampled_addmm(csr_f, x, W.t(), beta=0.0),
        })
        pre = xb @ Wb.t()
        pre32 = pre.float()
        cases["topk(64) of (batch, d_sae) bf16"] = lambda: pre.topk(k, dim=-1, sorted=False)
        cases["topk(64) fp32"] = lambda: pre32.topk(k, dim=-1, sorted=False)
        cases["topk two-stage (64 chunks of 1024)"] = lambda: two_stage_topk(pre, k)
        cases["filtered_topk (triton threshold filter)"] = lambda: filtered_topk(pre, k)
        fv, fi = filtered_topk(pre, k)
        print(f"  filtered_topk equals torch.topk: {torch.equal(fv.sort(dim=1).values, pre.topk(k, dim=-1).values.sort(dim=1).values)}"
              f", indices point at the values: {torch.equal(pre.gather(1, fi), fv)}")
        cases.update(fused_cases(W, xb, idx, w, k))
        for name, fn in cases.items():
            try:
                print(f"  {name:<36} {time_ms(fn, args.steps, 2, dev):8.2f} ms", flush=True)
            except Exception as exc:  # a variant unsupported on this build
                print(f"  {name:<36} failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
        del pre
        torch.cuda.empty_cache()
    if args.profile:
        from sae.config import SAEConfig
        from sae.step import BareTrainer

        aux = {"auxk_coeff": 1 / 32} if args.auxk_dead else {}
        trainer = BareTrainer(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, **aux), [0], lr=1e-4, device=dev,
                              autocast_dtype=torch.bfloat16, fused=args.fused)
        if args.auxk_dead:
            kill_latents(trainer)
        x = torch.randn(args.batches[-1], d_in, device=dev)
        for _ in range(3):
            trainer.step(x)
        torch.cuda.synchronize()
        print(f"dead latents: {int(trainer.trackers[0].dead_mask().sum())} of {d_sae}")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                trainer.step(x)
            torch.cuda.synchronize()
        busy = sum(e.self_device_time_total for e in prof.key_averages()) / 3 / 1000
        wall = time_ms(lambda: trainer.step(x), args.steps, 2, dev)
        print(f"per step: GPU kernels {busy:.2f} ms, wall {wall:.2f} ms (GPU idle {wall - busy:.2f} ms)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=110))
    return 0


if __name__ == "__main__":
    sys.exit(main())
