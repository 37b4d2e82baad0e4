"""Shared pieces of the training-at-scale benchmarks (`train_scale.py`, `train_run.py`, `multi_gpu.py`).

- `write_store`: a synthetic activation store of many rows, written with the project's own
  `ShardWriter` (all-token prompts of `prompt_rows` rows, float16 storage by default).
- `timed_train`: the real entry point `sae.train.train_saes`, with a callback that times a window of
  steps (device synchronised at both ends), the start-up (call → end of step 0) and, on a GPU,
  `nvidia-smi dmon` utilisation during the timed window. Checkpoint callbacks are left out: a
  checkpoint of an 8B-shaped SAE is 6 GB per seed and is not what these benchmarks time.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from activations.store import ShardWriter


def write_store(out: Path, rows: int, d: int, layer: int = 0, dtype: str = "float16", prompt_rows: int = 4096,
                rows_per_shard: int = 65536, seed: int = 0) -> Path:
    """`rows` activation rows (all extract) of width `d`: a random base block, rolled per prompt."""
    rng = np.random.default_rng(seed)
    base = (rng.standard_normal((prompt_rows * 4, d), dtype=np.float32) * 0.5).astype(np.float16)
    base += rng.standard_normal(d).astype(np.float16)  # a shared offset, as residual streams have
    writer = ShardWriter(out, layers=[layer], d_model=d, dtype=dtype, positions="all", model_info={"id": "synthetic"},
                         rows_per_shard=rows_per_shard, chat_template=False, background=True)
    positions = np.arange(prompt_rows)
    with writer:
        for i in range(-(-rows // prompt_rows)):
            n = min(prompt_rows, rows - i * prompt_rows)
            start = (i * 997) % (len(base) - n + 1)
            block = np.roll(base[start : start + n], shift=i * 31, axis=1)
            writer.add_prompt(f"p{i:07d}", "benign", "extract", positions[:n], positions[:n], {layer: block})
    writer.finish()
    return out


def _init_saver(path: Path) -> Any:
    """A Lightning callback: rank 0 saves the first seed's SAE (`folded_state`, the export layout) at the start of training."""
    import lightning.pytorch as pl
    from safetensors.torch import save_file

    class InitSaver(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, module: Any) -> None:
            if trainer.is_global_zero:
                save_file({k: v.detach().float().cpu().contiguous() for k, v in module.saes[0].folded_state().items()}, str(path))

    return InitSaver()


class Dmon:
    """`nvidia-smi dmon -s u` in the background; `stop()` → mean SM utilisation % per GPU index."""

    def __init__(self, gpus: list[int]) -> None:
        self.proc = None
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1", "-i", ",".join(map(str, gpus))],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except (FileNotFoundError, OSError):
            self.proc = None

    def stop(self) -> dict[int, float]:
        if self.proc is None:
            return {}
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        samples: dict[int, list[float]] = {}
        for line in out.splitlines():
            parts = line.split()
            if parts and not line.startswith("#") and parts[0].isdigit() and len(parts) > 1 and parts[1].isdigit():
                samples.setdefault(int(parts[0]), []).append(float(parts[1]))
        return {gpu: float(np.mean(v)) for gpu, v in samples.items()}


def make_timer(warmup: int, steps: int, dmon_gpus: list[int] | None) -> Any:
    """A Lightning callback recording step times; `.result(t_call)` → a dict."""
    import lightning.pytorch as pl

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.first_end = self.start = self.end = self.first_end_wall = 0.0
            self.dmon: Dmon | None = None
            self.util: dict[int, float] = {}

        def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
            if trainer.global_step == warmup:
                sync()
                self.start = time.perf_counter()
                if dmon_gpus is not None and trainer.is_global_zero:
                    self.dmon = Dmon(dmon_gpus)

        def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
            step = trainer.global_step  # already incremented: steps done
            if step == 1:
                sync()
                self.first_end, self.first_end_wall = time.perf_counter(), time.time()
            if step == warmup + steps:
                sync()
                self.end = time.perf_counter()
                if self.dmon is not None:
                    self.util = self.dmon.stop()

        def result(self, t_call: float, rows_per_step: int, process_start: float | None) -> dict[str, Any]:
            seconds = self.end - self.start
            from_process = None if process_start is None else self.first_end_wall - process_start
            return {"startup_s": self.first_end - t_call, "process_startup_s": from_process, "timed_steps": steps, "timed_s": seconds,
                    "ms_per_step": seconds * 1000 / steps, "act_per_s": rows_per_step * steps / seconds,
                    "gpu_util": {str(k): v for k, v in self.util.items()}}

    return StepTimer()


def make_profiler(first: int, steps: int, out: Path) -> Any:
    """A Lightning callback that runs `torch.profiler` over steps [first, first + steps) and writes, per
    rank, `out/rank<r>.txt`: wall ms per step, the device's busy time per step (union of its kernels'
    intervals) and the costliest kernels/ops; rank 0 also writes a Chrome trace."""
    import lightning.pytorch as pl
    from torch.profiler import ProfilerActivity, profile

    class StepProfiler(pl.Callback):
        def __init__(self) -> None:
            self.prof: Any = None
            self.start = 0.0

        def on_train_batch_start(self, trainer: pl.Trainer, *_: Any) -> None:
            if trainer.global_step == first:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
            if self.prof is None or trainer.global_step != first + steps:
                return
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.start
            self.prof.__exit__(None, None, None)
            kernels = sorted((e.time_range.start, e.time_range.end) for e in self.prof.events()
                             if e.device_type == torch.autograd.DeviceType.CUDA)
            busy, end = 0.0, float("-inf")
            for a, b in kernels:
                if b > end:
                    busy += b - max(a, end)
                    end = b
            rank = trainer.global_rank
            out.mkdir(parents=True, exist_ok=True)
            try:
                table = self.prof.key_averages().table(sort_by="self_device_time_total", row_limit=35, max_name_column_width=70)
            except Exception:  # older torch names the column after CUDA
                table = self.prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=35, max_name_column_width=70)
            (out / f"rank{rank}.txt").write_text(
                f"rank {rank}: {steps} steps, wall {wall * 1000 / steps:.2f} ms/step, device busy "
                f"{busy / 1000 / steps:.2f} ms/step ({busy / 1e6 / wall:.0%})\n{table}\n")
            if rank == 0:
                self.prof.export_chrome_trace(str(out / "trace_rank0.json"))
            self.prof = None

    return StepProfiler()


def timed_train(store: Path, layer: int, out: Path, cfg: Any, trainer: dict[str, Any], warmup: int, steps: int,
                rows_per_step: int, dmon_gpus: list[int] | None = None, process_start: float | None = None,
                profile_dir: Path | None = None, init_out: Path | None = None) -> dict[str, Any]:
    """Run `train_saes` for warmup + steps steps; returns the timings (this rank's).

    `startup_s`: from the call to the end of step 0; `process_startup_s`: from `process_start`
    (`time.time()` when this process started) to the end of step 0. `profile_dir`: profile 5 steps
    after the warm-up (`make_profiler`; the timed window then includes them). `init_out`: rank 0
    saves the first seed's weights before step 0 there (export layout), to compare updates."""
    import sae.train as train_module

    timer = make_timer(warmup, steps, dmon_gpus)
    extra: list[Any] = [make_profiler(warmup, min(5, steps), profile_dir)] if profile_dir is not None else []
    if init_out is not None:
        extra.append(_init_saver(init_out))
    real_trainer = train_module.pl.Trainer

    def trainer_with_timer(*args: Any, callbacks: list[Any] | None = None, **kwargs: Any) -> Any:
        kept = [cb for cb in callbacks or [] if "Checkpoint" not in type(cb).__name__]
        return real_trainer(*args, callbacks=[*kept, timer, *extra], **kwargs)

    train_module.pl.Trainer = trainer_with_timer
    try:
        t_call = time.perf_counter()
        train_module.train_saes(store, layer, out, cfg, trainer=trainer, print_table=False, enable_progress_bar=False)
        t_done = time.perf_counter()
    finally:
        train_module.pl.Trainer = real_trainer
    result = timer.result(t_call, rows_per_step, process_start)
    result["end_s"] = t_done - t_call - result["startup_s"] - result["timed_s"]
    result["rank"] = int(os.environ.get("LOCAL_RANK", 0))
    return result
