"""`FusedAdam`: the optimizer of the fused training path (see `sae/kernels/fused.py`).

For each SAE: `W_enc_rows` and `W_dec` take their gradient from the SAE's deferred sparse terms and
are updated row by row in one pass (gradient built in registers → for W_dec, the component parallel
to the row removed → Adam → for W_dec, renormalised to unit norm → master, moments and the
low-precision forward copy written). b_enc and b_dec are ordinary dense parameters with an Adam
update of the same formula. The update equals `torch.optim.Adam` followed by the decoder constraint
of the standard path (tests/test_sae_fused.py compares the two).

The state is a normal `torch.optim.Optimizer` state (`step`, `exp_avg`, `exp_avg_sq` per parameter),
so Lightning checkpoints and resumes it. `exp_avg_dtype=torch.bfloat16` halves the first moment's
memory traffic (the second moment stays float32: bf16 cannot hold its 1 - beta2 = 1e-3 increments).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from sae.kernels import triton as triton_kernels
from sae.kernels.ddp import PendingTerms, start_gather
from sae.kernels.fused import (DeferredGrads, DenseRowsTerm, RowGradTerm, adam_update_, merge_dense_terms, merge_terms,
                       reference_row_grad_adam)
from sae.model import SparseAutoencoder

MATRICES: tuple[str, ...] = ("W_enc_rows", "W_dec")
"""Parameters whose gradients are deferred; W_dec also gets the unit-norm row constraint."""


class FusedAdam(torch.optim.Optimizer):
    """Adam over SAEs trained with `sae.use_fused_training()`, one parameter group per SAE.

    Args:
        saes: the SAEs (each must have its `deferred` store set).
        lr, betas, eps: Adam settings. names: optional group names (e.g. "seed0").
        exp_avg_dtype: dtype of the first moments of the two matrices (float32 or bfloat16).
    """

    def __init__(
        self,
        saes: Sequence[SparseAutoencoder],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        names: Sequence[str] | None = None,
        exp_avg_dtype: torch.dtype = torch.float32,
        world_size: int = 1,
    ) -> None:
        if exp_avg_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"exp_avg_dtype must be float32 or bfloat16, got {exp_avg_dtype}")
        names = list(names) if names is not None else [f"sae{i}" for i in range(len(saes))]
        groups = [{"params": [p for _, p in sae.named_parameters()], "name": name} for sae, name in zip(saes, names)]
        super().__init__(groups, {"lr": lr, "betas": tuple(betas), "eps": eps})
        self._saes = list(saes)
        self.exp_avg_dtype = exp_avg_dtype
        self.world_size = int(world_size)
        """> 1: data-parallel; the matrices' deferred terms are gathered from every rank (`sae/kernels/ddp.py`)."""

    def _state_for(self, p: Tensor, matrix: bool) -> dict[str, Any]:
        state = self.state[p]
        m_dtype = self.exp_avg_dtype if matrix else torch.float32
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=m_dtype, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        elif state["exp_avg"].dtype != m_dtype:  # load_state_dict casts moments to the parameter's dtype
            state["exp_avg"] = state["exp_avg"].to(m_dtype)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run `closure` (forward + backward) if given, then update every SAE."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        collected = []
        for group, sae in zip(self.param_groups, self._saes):
            store = sae.deferred
            if store is None:
                raise RuntimeError("FusedAdam needs SAEs switched to the fused path (sae.use_fused_training())")
            params = dict(sae.named_parameters())
            # every matrix's terms first, so that the data-parallel gathers all travel at once
            matrices = {name: self._collect(store, name, params[name]) for name in MATRICES if name in params}
            collected.append((group, sae, store, params, matrices))
        for group, sae, store, params, matrices in collected:
            for name, p in params.items():
                if name in MATRICES:
                    self._update_matrix(group, name, p, store, matrices[name])
                elif p.grad is not None:
                    self._update_dense(group, p)
            store.clear()
        return loss

    def _collect(self, store: DeferredGrads, name: str, p: Tensor) -> Any:
        """This step's terms of one matrix (merged), or the pending gathers of every rank's terms."""
        terms = store.pop(name)
        row_terms = [t for t in terms if isinstance(t, RowGradTerm)]
        dense_terms = [t for t in terms if isinstance(t, DenseRowsTerm)]
        term = merge_terms(row_terms, p.shape[0]) if row_terms else None
        dense = merge_dense_terms(dense_terms) if dense_terms else None
        if self.world_size > 1 and (term is not None or dense is not None):
            return start_gather(term, dense, p.shape[0], self.world_size)
        return term, dense

    def _update_matrix(self, group: dict[str, Any], name: str, p: Tensor, store: DeferredGrads, collected: Any) -> None:
        term, dense = collected.wait() if isinstance(collected, PendingTerms) else collected
        if term is None and dense is None:  # no backward reached this matrix: like a parameter with grad None
            return
        state = self._state_for(p, matrix=True)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        options = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], step=int(state["step"]),
                       remove_parallel=name == "W_dec", renorm=name == "W_dec")
        if term is None or not triton_kernels.available(p.device):  # (no sparse term: only a custom loss does that)
            reference_row_grad_adam(p, state["exp_avg"], state["exp_avg_sq"], term, dense=dense, **options)  # type: ignore[arg-type]
            return
        dense_pos = None
        if dense is not None:
            dense_pos = torch.full((p.shape[0],), -1, device=p.device, dtype=torch.int64)
            dense_pos[dense.rows] = torch.arange(dense.rows.shape[0], device=p.device)
        shadow = store.shadow_for_update(name, p)  # refreshed in the same pass (no version bump)
        triton_kernels.row_grad_adam(p, shadow, state["exp_avg"], state["exp_avg_sq"], term.crow, term.src, term.coef,
                                     term.source.contiguous(), dense_pos=dense_pos,
                                     dense=dense.values.contiguous() if dense is not None else None,
                                     **options)  # type: ignore[arg-type]

    def _update_dense(self, group: dict[str, Any], p: Tensor) -> None:
        state = self._state_for(p, matrix=False)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        adam_update_(p, p.grad.to(torch.float32), state["exp_avg"], state["exp_avg_sq"], lr=group["lr"],  # type: ignore[union-attr]
                     beta1=beta1, beta2=beta2, eps=group["eps"], step=int(state["step"]))
