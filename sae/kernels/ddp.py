"""Data-parallel training on the fused path: the deferred gradients travel as their entries.

On the fused path the matrix gradients of `W_enc_rows` and `W_dec` are never materialised: each is
a sparse sum `grad[r] = Σ_e coef[e] · source[src[e]]` over the (batch row, latent) entries that
selected latent r (`sae/kernels/fused.py`). With R ranks, rank i holds the entries and source rows
of its own B rows; the global batch's gradient is the same sum over every rank's entries. So each
rank all-gathers, per matrix, its entries (latent id, source row, coefficient: B·k of each) and its
source rows `(B, d)` in the compute dtype, re-sorts the R·B·k entries by latent, and runs the same
`FusedAdam` pass on them. Every rank applies the identical update (same entries, same order) and
the result equals one device stepping the global batch (the coefficients are divided by R: each
rank's loss is scaled so that DDP's gradient averaging of b_enc / b_dec gives the global gradient,
see `sae.module`). AuxK's dense row blocks (the dead latents, the same ids on every rank: the
tracker is all-reduced) are all-reduced.

Per step and matrix a rank sends B·d compute-dtype values plus 20 bytes per entry: for B = 4096,
d = 4096, k = 64, bf16 that is 32 MiB + 5 MiB, against 1 GiB (float32, 65,536 × 4096) for an
all-reduce of the materialised gradient. The price is that every rank runs the whole Adam pass
(docs/sae.md has the arithmetic and the alternatives).

The gathers start together (`start_gather`, asynchronous) and are waited for matrix by matrix, so
the encoder's entries travel while the decoder's Adam pass runs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from sae.kernels.csr import row_offsets, rows_of_entries
from sae.kernels.fused import DenseRowsTerm, RowGradTerm


def _gather_into(t: Tensor, world: int) -> tuple[Tensor, Callable[[], None]]:
    """Start an all-gather of `t` along dim 0; returns (output, wait)."""
    t = t.contiguous()
    out = t.new_empty((world * t.shape[0], *t.shape[1:]))
    if dist.get_backend() == "nccl":
        work = dist.all_gather_into_tensor(out, t, async_op=True)
        return out, work.wait
    parts = list(out.chunk(world))
    work = dist.all_gather(parts, t, async_op=True)
    return out, work.wait


@dataclass
class PendingTerms:
    """The all-gathers of one matrix's deferred terms, in flight."""

    rows: int
    world: int
    batch: int
    gathered: dict[str, Tensor]
    waits: list[Callable[[], None]]
    dense: DenseRowsTerm | None

    def wait(self) -> tuple[RowGradTerm | None, DenseRowsTerm | None]:
        """The global batch's terms (coefficients and dense rows divided by the world size)."""
        for wait in self.waits:
            wait()
        dense = None
        if self.dense is not None:
            dense = DenseRowsTerm(self.dense.rows, self.dense.values / self.world)
        if not self.gathered:
            return None, dense
        g = self.gathered
        nnz = g["row"].shape[0] // self.world
        offsets = (torch.arange(self.world, device=g["src"].device) * self.batch).repeat_interleave(nnz)
        sorted_rows, order = torch.sort(g["row"], stable=True)  # rank-major ties: global batch order
        term = RowGradTerm(row_offsets(sorted_rows, self.rows), (g["src"] + offsets)[order],
                           g["coef"][order] / self.world, g["source"])
        return term, dense


def start_gather(term: RowGradTerm | None, dense: DenseRowsTerm | None, rows: int, world: int) -> PendingTerms:
    """Start all-gathering a matrix's merged sparse term and all-reducing its dense rows term."""
    gathered: dict[str, Tensor] = {}
    waits: list[Callable[[], None]] = []
    batch = 0
    if term is not None:
        batch = term.source.shape[0]
        fields = {"row": rows_of_entries(term.crow, term.coef.shape[0]), "src": term.src, "coef": term.coef,
                  "source": term.source}
        for name, value in fields.items():
            gathered[name], wait = _gather_into(value, world)
            waits.append(wait)
    if dense is not None:
        values = dense.values.contiguous()
        work = dist.all_reduce(values, async_op=True)
        waits.append(work.wait)
        dense = DenseRowsTerm(dense.rows, values)
    return PendingTerms(rows, world, batch, gathered, waits, dense)
