"""Stop a diverged training run instead of exporting it.

Two signs of divergence are tracked per seed, on the device and without host syncs (like the
non-finite check in `sae.losses.NonFiniteMonitor`):

- `fvu` above `factor` × its value at the run's first step, for `patience` consecutive steps;
- `l0` (mean active latents per row) equal to 0 — no latent fires — for `patience` consecutive steps.

`raise_if_bad()` (a host sync) runs at logging intervals and at the end of training; at the end a
seed that is diverged at its last step also stops the run, however short the streak. The error
names the seed, the term, the step its streak began and the value, like the NaN check.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

SIGNS = ("fvu", "l0")


class DivergedTrainingError(ValueError):
    """Training diverged: the loss blew up or no latent fires any more."""


class DivergenceMonitor:
    """Per-seed divergence streaks; `record` every step, `raise_if_bad` at intervals and the end.

    Args:
        seeds: the seeds trained (for messages).
        factor: fvu counts as diverged above `factor` × its first-step value.
        patience: consecutive diverged steps that stop the run (0 = off).
    """

    def __init__(self, seeds: list[int], factor: float, patience: int) -> None:
        self.seeds, self.factor, self.patience = list(seeds), float(factor), int(patience)
        self.start: Tensor | None = None        # (n_seeds,) fvu at the first step, NaN = not seen yet
        self.streak: Tensor | None = None       # (n_seeds, 2) consecutive diverged steps
        self.began: Tensor | None = None        # (n_seeds, 2) step the current streak began
        self.value: Tensor | None = None        # (n_seeds, 2) latest value of each sign
        self.tripped: Tensor | None = None      # (n_seeds, 2) streak start once it reached `patience`, else -1
        self.trip_value: Tensor | None = None   # (n_seeds, 2) value when it tripped

    def _init(self, device: torch.device) -> None:
        n = len(self.seeds)
        self.start = torch.full((n,), float("nan"), device=device)
        self.streak = torch.zeros(n, 2, dtype=torch.int64, device=device)
        self.began = torch.full((n, 2), -1, dtype=torch.int64, device=device)
        self.value = torch.zeros(n, 2, device=device)
        self.tripped = torch.full((n, 2), -1, dtype=torch.int64, device=device)
        self.trip_value = torch.zeros(n, 2, device=device)

    def record(self, seed_index: int, fvu: Tensor, l0: Tensor, step: int) -> None:
        """Update seed `seed_index` with this step's fvu and l0 (device scalars)."""
        if self.patience <= 0:
            return
        fvu, l0 = fvu.detach().to(torch.float32), l0.detach().to(torch.float32)
        if self.start is None:
            self._init(fvu.device)
        elif self.start.device != fvu.device:  # restored from a checkpoint on another device
            for name in self._STATE:
                setattr(self, name, getattr(self, name).to(fvu.device))
        assert self.start is not None and self.streak is not None and self.began is not None
        assert self.value is not None and self.tripped is not None and self.trip_value is not None
        i = seed_index
        self.start[i] = torch.where(torch.isnan(self.start[i]), fvu, self.start[i])
        values = torch.stack([fvu, l0])
        bad = torch.stack([fvu > self.factor * self.start[i], l0 <= 0])
        self.streak[i] = torch.where(bad, self.streak[i] + 1, torch.zeros_like(self.streak[i]))
        self.began[i] = torch.where(bad & (self.streak[i] == 1), torch.full_like(self.began[i], step), self.began[i])
        self.value[i] = values
        trip = (self.tripped[i] < 0) & (self.streak[i] >= self.patience)
        self.tripped[i] = torch.where(trip, self.began[i], self.tripped[i])
        self.trip_value[i] = torch.where(trip, values, self.trip_value[i])

    def raise_if_bad(self, final: bool = False) -> None:
        """Raise `DivergedTrainingError` for the earliest tripped streak; with `final`, also for a
        seed diverged at its last step."""
        if self.tripped is None:
            return
        tripped, streak, began = self.tripped.cpu(), self.streak.cpu(), self.began.cpu()
        hits = [(int(tripped[i, j]), j, i, float(self.trip_value[i, j]), self.patience)
                for i in range(len(self.seeds)) for j in range(2) if tripped[i, j] >= 0]
        if final and not hits:
            hits = [(int(began[i, j]), j, i, float(self.value[i, j]), int(streak[i, j]))  # type: ignore[index]
                    for i in range(len(self.seeds)) for j in range(2) if streak[i, j] > 0]
        if not hits:
            return
        step, sign, index, value, steps = min(hits)
        seed = self.seeds[index]
        if SIGNS[sign] == "fvu":
            start = float(self.start[index])  # type: ignore[index]
            what = (f"loss term 'fvu' = {value:.4g} stayed above {self.factor:g} x its starting value {start:.4g} "
                    f"for {steps} step(s) from step {step}")
        else:
            what = f"l0 collapsed to 0 (no latent fires) for {steps} step(s) from step {step}"
        raise DivergedTrainingError(f"training diverged: {what}, seed {seed}; lower --train.optim.lr "
                                    "(or tune --train.optim.diverge_factor / diverge_steps)")

    _STATE = ("start", "streak", "began", "value", "tripped", "trip_value")

    def state_dict(self) -> dict[str, Any]:
        """Plain lists of every tensor (a resumed run compares against the same start and streaks)."""
        return {name: None if getattr(self, name) is None else getattr(self, name).cpu().tolist() for name in self._STATE}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        if state.get("start") is None or len(state["start"]) != len(self.seeds):
            return
        self._init(device)
        for name in self._STATE:
            current = getattr(self, name)
            setattr(self, name, torch.tensor(state[name], dtype=current.dtype, device=device))
