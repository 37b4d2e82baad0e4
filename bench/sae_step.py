"""Time one SAE training step: ours vs EleutherAI sparsify (eai-sparsify 1.3.3) on identical data.

    python bench/sae_step.py                 # GPU: d_in 4096, 65,536 latents, k 64, batches 4096 and 16384, bf16
    python bench/sae_step.py --cpu-smoke     # tiny sizes on the CPU (checks the script runs)

A step = forward, backward, removal of the decoder-parallel gradient, the optimizer and decoder
renormalisation, for both libraries. Sparsify runs with `--sparsify-optimizers` (see
SPARSIFY_OPTIMIZERS: the Adam its trainer builds, torch's fused Adam, its default schedule-free
Signum) and, with `--sparsify-auxk-dead`, with AuxK on dead latents. Ours runs in the VARIANTS below:
`standard` (autograd with sparse CSR gradients + torch's fused Adam), `fused` (deferred row gradients
+ FusedAdam's Triton pass, float32 moments), `fused-bf16m` (bfloat16 first moments) and two AuxK
variants. Printed per batch size: ms/step and activations/s of each, our speed-up over sparsify's
`adam` (x sparsify) and `adam-fused` (x +fused), a floor (encoder matmul alone + fp32 Adam's memory
traffic at the measured copy bandwidth) and the full Lightning `fit` loop per step (fused path) vs
the bare fused step (overhead %).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sae.config import DataConfig, OptimConfig, SAEConfig  # noqa: E402
from sae.step import BareTrainer  # noqa: E402

ADAM_BYTES_PER_PARAM = 28  # fp32: read param, grad, m, v (16 B) + write param, m, v (12 B)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Mean wall time of `fn` in ms over `steps` calls after `warmup` calls (synchronised at the ends only)."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) * 1000 / steps


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_kernel(device: torch.device) -> None:
    """Our sparse backward passes vs dense autograd on this device (float32), before any timing."""
    from sae.kernels.csr import sparse_decode, topk_pre_acts

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # an exact float32 reference
    g = torch.Generator(device).manual_seed(1)
    x, W, b, W_dec = (torch.randn(*shape, device=device, generator=g, requires_grad=True)
                      for shape in ((64, 128), (1024, 128), (1024,), (1024, 128)))
    weights = torch.randn(64, 1024, device=device, generator=g)  # a weight per (row, latent): order-free loss
    upstream = torch.randn(64, 128, device=device, generator=g)

    def loss(values: torch.Tensor, idx: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        return (values * weights.gather(1, idx)).sum() + (decoded * upstream).sum()

    values, idx = topk_pre_acts(x, W, b, 16, compute_dtype=torch.float32)
    ours = torch.autograd.grad(loss(values, idx, sparse_decode(values.relu(), idx, W_dec)), (x, W, b, W_dec))
    pre = x @ W.t() + b
    ref_values, ref_idx = pre.topk(16, sorted=False)
    dense_codes = torch.zeros_like(pre).scatter(1, ref_idx, ref_values.relu())
    ref = torch.autograd.grad(loss(ref_values, ref_idx, dense_codes @ W_dec), (x, W, b, W_dec))
    worst = max(float((a - r).abs().max() / r.abs().max().clamp_min(1e-12)) for a, r in zip(ours, ref))
    torch.backends.cuda.matmul.allow_tf32 = tf32
    print(f"kernel check on {device.type}: max relative gradient error vs dense autograd {worst:.2e}", flush=True)
    if worst > 1e-4:
        raise RuntimeError("sparse backward disagrees with dense autograd")


VARIANTS: dict[str, tuple[dict[str, object], dict[str, object]]] = {  # name: (BareTrainer options, SAEConfig changes)
    "standard": ({}, {}),
    "fused": ({"fused": True}, {}),
    "fused-bf16m": ({"fused": True, "exp_avg_dtype": torch.bfloat16}, {}),
    # AuxK (coefficient 1/32, k_aux = d_in / 2 = 2048 as in sparsify) with no dead latent (skipped)
    # and with DEAD_FRACTION of the latents dead (`kill_latents`): not in sparsify's timing
    "fused-auxk-none-dead": ({"fused": True}, {"auxk_coeff": 1 / 32}),
    "fused-auxk-dead": ({"fused": True}, {"auxk_coeff": 1 / 32}),
}
DEAD_FRACTION = 0.03


def kill_latents(trainer: BareTrainer, fraction: float = DEAD_FRACTION) -> int:
    """Make every 1/fraction-th latent dead for good (encoder bias -100: it never fires; its tracker
    count at the threshold), as dead latents are in a real run. Returns how many."""
    step = round(1 / fraction)
    with torch.no_grad():
        for sae, tracker in zip(trainer.saes, trainer.trackers):
            sae.b_enc[::step] = -100.0
            tracker.tokens_since_fired[::step] = tracker.dead_tokens_threshold
    return len(range(0, trainer.cfg.num_latents, step))


DEFAULT_VARIANTS = ["standard", "fused", "fused-bf16m"]


def check_fused(device: torch.device) -> None:
    """Fused path (Triton where available) vs its torch reference vs the standard path, float32, 10 steps."""
    from sae.kernels import triton as triton_kernels

    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = SAEConfig(d_in=256, d_sae=4096, k=32, auxk_coeff=1 / 32, auxk_k=64, dead_tokens_threshold=256)
    g = torch.Generator(device).manual_seed(2)
    batches = [torch.randn(128, cfg.d_in, device=device, generator=g) for _ in range(10)]
    params = {}
    for name, options, kernels_on in (("standard", {}, True), ("fused", {"fused": True}, True), ("reference", {"fused": True}, False)):
        triton_kernels.ENABLED = kernels_on
        trainer = BareTrainer(cfg, seeds=[0], lr=1e-3, device=device, **options)
        for x in batches:
            trainer.step(x)
        params[name] = [p.detach().clone() for p in trainer.saes[0].parameters()]
    triton_kernels.ENABLED = True
    torch.backends.cuda.matmul.allow_tf32 = True
    for other in ("fused", "reference"):
        worst = max(float((a - r).norm() / r.norm()) for a, r in zip(params[other], params["standard"]))
        print(f"fused check: {other} vs standard after 10 steps, max relative parameter error {worst:.2e}", flush=True)
        if not worst < 1e-4:
            raise RuntimeError(f"fused path ({other}) disagrees with the standard path")


def bench_ours(cfg: SAEConfig, x: torch.Tensor, args: argparse.Namespace, dtype: torch.dtype | None,
               variant: tuple[dict[str, object], dict[str, object]]) -> float:
    options, changes = variant
    cfg = dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]
    trainer = BareTrainer(cfg, seeds=[0], lr=1e-4, device=x.device, autocast_dtype=dtype, **options)  # type: ignore[arg-type]
    if variant is VARIANTS["fused-auxk-dead"]:
        kill_latents(trainer)
    ms = time_ms(lambda: trainer.step(x), args.steps, args.warmup, x.device)
    if args.breakdown:
        sae = trainer.saes[0]
        autocast = lambda: torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731

        def forward() -> None:
            with autocast():
                sae(x)

        def forward_backward() -> None:
            with autocast():
                loss = sae(x).fvu
            loss.backward()
            sae.zero_grad(set_to_none=True)
            if sae.deferred is not None:
                sae.deferred.clear()

        fwd = time_ms(forward, args.steps, args.warmup, x.device)
        fwd_bwd = time_ms(forward_backward, args.steps, args.warmup, x.device)
        print(f"  ours {options} {changes} at batch {x.shape[0]}: forward {fwd:.2f} ms, backward {fwd_bwd - fwd:.2f} ms, "
              f"optimizer + decoder constraint {ms - fwd_bwd:.2f} ms", flush=True)
    del trainer
    free_memory(x.device)
    return ms


SPARSIFY_OPTIMIZERS = ("adam", "adam-fused", "signum")
"""`adam`: torch.optim.Adam with torch's defaults (foreach on CUDA), as sparsify's trainer builds it
for `optimizer="adam"`; `adam-fused`: the same with torch's fused kernel (a stronger baseline than
sparsify ships); `signum`: sparsify's default optimizer (schedule-free wrapper around SignSGD)."""


def make_sparsify_optimizer(name: str, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adam-fused":
        return torch.optim.Adam(params, lr=lr, fused=params[0].device.type == "cuda" or None)
    if name == "signum":
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        optimizer = ScheduleFreeWrapper(SignSGD(params, lr=lr), momentum=0.95)
        optimizer.train()
        return optimizer
    raise ValueError(f"unknown sparsify optimizer {name!r}; known: {', '.join(SPARSIFY_OPTIMIZERS)}")


def bench_sparsify(cfg: SAEConfig, x: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """sparsify's ms/step with each of `args.sparsify_optimizers` (empty when sparsify is missing)."""
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError as exc:
        print(f"sparsify is not importable ({exc}); timing ours only", flush=True)
        return {}
    known = {f.name for f in dataclasses.fields(SparseCoderConfig)}
    options = {"num_latents": cfg.num_latents, "k": cfg.k, "expansion_factor": cfg.num_latents // cfg.d_in}
    times = {}
    runs = [(name, False) for name in args.sparsify_optimizers] + ([("adam-fused", True)] if args.sparsify_auxk_dead else [])
    for name, auxk_dead in runs:
        coder = SparseCoder(cfg.d_in, SparseCoderConfig(**{k: v for k, v in options.items() if k in known}), device=x.device)
        try:
            optimizer = make_sparsify_optimizer(name, list(coder.parameters()), lr=1e-4)
        except ImportError as exc:
            print(f"sparsify optimizer {name} unavailable ({exc})", flush=True)
            continue
        dead_mask = None
        if auxk_dead:  # the same dead latents as kill_latents, with sparsify's AuxK (coefficient 1/32)
            dead_mask = torch.zeros(cfg.num_latents, dtype=torch.bool, device=x.device)
            dead_mask[::round(1 / DEAD_FRACTION)] = True
            with torch.no_grad():
                coder.encoder.bias[dead_mask] = -100.0

        def step() -> None:  # as sparsify's trainer: forward (its own bf16 autocast on CUDA), backward,
            out = coder(x, dead_mask=dead_mask)  # parallel-gradient removal, optimizer, decoder renormalisation
            (out.fvu + out.auxk_loss / 32 if dead_mask is not None else out.fvu).backward()
            coder.remove_gradient_parallel_to_decoder_directions()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            coder.set_decoder_norm_to_unit_norm()

        times[name + ("-auxk-dead" if auxk_dead else "")] = time_ms(step, args.steps, args.warmup, x.device)
        del coder, optimizer
        free_memory(x.device)
    return times


def bench_floor(cfg: SAEConfig, x: torch.Tensor, args: argparse.Namespace, dtype: torch.dtype) -> tuple[float, float]:
    """(encoder matmul ms, Adam memory-traffic ms at the measured device-copy bandwidth)."""
    w = torch.randn(cfg.d_in, cfg.num_latents, device=x.device, dtype=dtype)
    xc = x.to(dtype)
    matmul_ms = time_ms(lambda: xc @ w, args.steps, args.warmup, x.device)
    del w
    buf = torch.empty(64 * 2**20, device=x.device, dtype=torch.float32)  # 256 MiB
    dst = torch.empty_like(buf)
    copy_ms = time_ms(lambda: dst.copy_(buf), args.steps, args.warmup, x.device)
    bandwidth = 2 * buf.numel() * 4 / (copy_ms / 1000)  # bytes read + written per second
    del buf, dst
    free_memory(x.device)
    n_params = 2 * cfg.d_in * cfg.num_latents
    return matmul_ms, n_params * ADAM_BYTES_PER_PARAM / bandwidth * 1000


def bench_fit(cfg: SAEConfig, batch: int, args: argparse.Namespace, device: torch.device, precision: str) -> float:
    """ms/step of the full Lightning fit loop (in-memory data module, CSV logger every 50 steps; fused on CUDA)."""
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from activations.store import ShardWriter
    from sae.data import ShardDataModule
    from sae.module import SAELightningModule

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.start = self.end = 0.0

        def on_train_batch_start(self, trainer: pl.Trainer, *_: object) -> None:
            if trainer.global_step == args.warmup:
                sync(device)
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: pl.Trainer, *_: object) -> None:
            if trainer.global_step == args.warmup + args.steps:
                sync(device)
                self.end = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        rows = 4 * batch
        writer = ShardWriter(Path(tmp) / "store", layers=[0], d_model=cfg.d_in, dtype="float16", positions="all",
                             rows_per_shard=rows, chat_template=False)
        rng = np.random.default_rng(0)
        for part in range(4):
            writer.add_prompt(f"p{part}", "benign", "extract", np.arange(batch), np.zeros(batch),
                              {0: rng.standard_normal((batch, cfg.d_in), dtype=np.float32)})
        writer.finish()
        datamodule = ShardDataModule(str(Path(tmp) / "store"), 0, DataConfig(
            batch_size=batch, in_memory=True, device_dtype="bfloat16" if device.type == "cuda" else "float32", init_rows=4096))
        timer = StepTimer()
        trainer = pl.Trainer(
            max_steps=args.warmup + args.steps, accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
            precision=precision, logger=CSVLogger(tmp, name="logs"), log_every_n_steps=50, callbacks=[timer],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0,
        )
        module = SAELightningModule(cfg, seeds=[0], optim=OptimConfig(lr=1e-4, fused=device.type == "cuda"))
        trainer.fit(module, datamodule=datamodule)
        del trainer, datamodule
    free_memory(device)
    return (timer.end - timer.start) * 1000 / args.steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--d-in", type=int, default=4096)
    parser.add_argument("--latents", type=int, default=65536)
    parser.add_argument("-k", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-fit", action="store_true", help="skip the Lightning fit-loop timing")
    parser.add_argument("--breakdown", action="store_true", help="also time our forward and backward alone")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--no-sparsify", action="store_true", help="skip sparsify")
    parser.add_argument("--sparsify-auxk-dead", action="store_true",
                        help="also time sparsify (fused Adam) with AuxK and the same dead latents as fused-auxk-dead")
    parser.add_argument("--sparsify-optimizers", nargs="+", default=list(SPARSIFY_OPTIMIZERS),
                        help=f"of {', '.join(SPARSIFY_OPTIMIZERS)}")
    args = parser.parse_args()
    if args.cpu_smoke:
        args.d_in, args.latents, args.k, args.batches, args.steps, args.warmup = 64, 512, 8, [128, 256], 5, 2
        device, dtype, precision = torch.device("cpu"), None, "32-true"
    else:
        if not torch.cuda.is_available():
            print("error: no CUDA device; use --cpu-smoke", file=sys.stderr)
            return 2
        device, dtype, precision = torch.device("cuda"), torch.bfloat16, "bf16-mixed"
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = SAEConfig(d_in=args.d_in, d_sae=args.latents, k=args.k)
    check_kernel(device)
    check_fused(device)
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"d_in {cfg.d_in}, latents {cfg.num_latents}, k {cfg.k}, compute {dtype or torch.float32}", flush=True)
    names = [v for v in args.variants if v in VARIANTS]
    header = f"{'batch':>6} {'variant':>32} {'ms/step':>8} {'act/s':>9} {'x sparsify':>11} {'x +fused':>9} " \
             f"{'floor ms':>9} {'(matmul+adam)':>14} {'fit ms':>8} {'overhead':>9}"
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, cfg.d_in, device=device, generator=torch.Generator(device).manual_seed(0))
        times = {name: bench_ours(cfg, x, args, dtype, VARIANTS[name]) for name in names}
        theirs = {} if args.no_sparsify else bench_sparsify(cfg, x, args)
        matmul_ms, adam_ms = bench_floor(cfg, x, args, dtype or torch.float32)
        del x
        free_memory(device)
        fit_ms = None if args.no_fit else bench_fit(cfg, batch, args, device, precision)
        floor = f"{matmul_ms + adam_ms:>9.2f} {f'{matmul_ms:.1f}+{adam_ms:.1f}':>14}"
        for name, ms in theirs.items():
            rows.append(f"{batch:>6} {'sparsify ' + name:>32} {ms:>8.2f} {batch / ms * 1000:>9.3g} {'':>11} {'':>9} {floor}")
            print(rows[-1], flush=True)
        for name, ms in times.items():
            fit_cols = f"{'-':>8} {'-':>9}"
            if fit_ms and name == ("fused" if device.type == "cuda" else "standard"):
                fit_cols = f"{fit_ms:>8.2f} {100 * (fit_ms - ms) / ms:>8.1f}%"
            ratios = " ".join(f"{theirs[o] / ms:>{w - 1}.2f}x" if o in theirs else f"{'-':>{w}}"
                              for o, w in (("adam", 11), ("adam-fused", 9)))
            rows.append(f"{batch:>6} {name:>32} {ms:>8.2f} {batch / ms * 1000:>9.3g} {ratios} {floor} {fit_cols}")
            print(rows[-1], flush=True)
    print("\n" + header + "\n" + "\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
