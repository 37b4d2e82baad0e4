"""L1-penalised logistic regression in torch (FISTA), many problems at once, on any device.

Solves, for every problem p of a batch, scikit-learn's objective for `LogisticRegression(C,
l1_ratio=1)`:

    minimise over (W_p, b_p):   C_p · Σ_i loss(y_pi, x_pi W_pᵀ + b_p)  +  ‖W_p‖₁

with the multinomial loss (K classes, K coefficient rows, as scikit-learn's multinomial fit) or the
binary logistic loss (one coefficient row, class 1 positive). The intercept is not penalised.
`probes.heads` uses it as the `solver="torch"` alternative to scikit-learn's saga: the problems of
a C grid, of the one-vs-rest heads and of the stability-selection resamples are solved together,
as a few batched matmuls per iteration on the run's device.

FISTA (Beck & Teboulle 2009) with the step 1/L, L = C_p · c · λ_max(X̃ᵀX̃) (X̃ = [X, 1]; c = 1/2
for the softmax, 1/4 for the sigmoid: bounds of the loss Hessians), λ_max from a power iteration
with a 10% margin, and O'Donoghue & Candès's gradient restart. It stops when every problem's
gradient mapping `L · (x_next - y)`, a scale-free measure of the KKT violation relative to the L1
weight 1, is below `tol` in max norm (checked every `check_every` iterations: one host sync each).
Data and iterates are float32 (matmuls at full float32 precision, no TF32); coefficients come back
in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

POWER_ITERATIONS = 60
LIPSCHITZ_MARGIN = 1.1


@dataclass
class L1Fit:
    """Solutions of a batch of problems: coef `(P, R, d)`, intercept `(P, R)` float64 (R = K rows,
    or 1 for binary), converged `(P,)` bool, iterations run."""

    coef: np.ndarray
    intercept: np.ndarray
    converged: np.ndarray
    iterations: int


def _design(x: Tensor, problems: int) -> Tensor:
    """`(P, n, d)` view of a shared `(n, d)` or per-problem `(P, n, d)` design matrix."""
    return x.unsqueeze(0).expand(problems, *x.shape) if x.dim() == 2 else x


def _lipschitz(x: Tensor, mask: Tensor) -> Tensor:
    """λ_max of X̃ᵀX̃ per problem `(P,)`, X̃ = [X, 1] over the problem's rows (`mask (P, n)`)."""
    problems = mask.shape[0]
    xs = _design(x, problems)
    generator = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(problems, x.shape[-1] + 1, generator=generator).to(x.device, x.dtype)
    estimate = torch.ones(problems, device=x.device, dtype=x.dtype)
    for _ in range(POWER_ITERATIONS):
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
        u = (torch.bmm(xs, v[:, :-1, None]).squeeze(2) + v[:, -1:]) * mask  # X̃ v
        w = torch.cat([torch.bmm(xs.transpose(1, 2), u[:, :, None]).squeeze(2), u.sum(1, keepdim=True)], 1)
        estimate = (w * v).sum(1)
        v = w
    return estimate.clamp_min(1e-12) * LIPSCHITZ_MARGIN


def fit_l1_logistic(
    x: Tensor, targets: Tensor, C: Tensor, n_classes: int, *, binary: bool = False, row_mask: Tensor | None = None,
    max_iter: int = 20000, tol: float = 1e-3, check_every: int = 25,
) -> L1Fit:
    """Fit `P` L1 logistic problems at once.

    Args:
        x: `(n, d)` design matrix shared by all problems, or `(P, n, d)` one per problem (float32).
        targets: `(P, n)` int64 class ids in [0, n_classes) (binary: 0 / 1).
        C: `(P,)` inverse L1 strengths.
        row_mask: `(P, n)` 1.0 for the rows of each problem (0 leaves a row out); default all rows.
        binary: one coefficient row per problem (the positive class), sigmoid loss.
    """
    problems, n = targets.shape
    device, dtype = x.device, torch.float32
    x = x.to(dtype)
    xs = _design(x, problems)
    d = x.shape[-1]
    rows_out = 1 if binary else n_classes
    mask = torch.ones(problems, n, device=device, dtype=dtype) if row_mask is None else row_mask.to(device, dtype)
    C = C.to(device, dtype)
    onehot = torch.nn.functional.one_hot(targets.to(device), n_classes).to(dtype)  # (P, n, K)
    target = onehot[..., 1:] if binary else onehot
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        lip = C * (0.25 if binary else 0.5) * _lipschitz(x, mask)
        step = (1.0 / lip)[:, None, None]
        shrink = step  # prox of the L1 weight 1
        W = torch.zeros(problems, rows_out, d, device=device, dtype=dtype)
        b = torch.zeros(problems, rows_out, device=device, dtype=dtype)
        W_prev, b_prev = W.clone(), b.clone()
        yW, yb = W.clone(), b.clone()
        t = torch.ones(problems, device=device, dtype=dtype)
        converged = torch.zeros(problems, dtype=torch.bool, device=device)
        iterations = 0
        for iterations in range(1, max_iter + 1):
            logits = torch.bmm(xs, yW.transpose(1, 2)) + yb[:, None, :]  # (P, n, R)
            prob = torch.sigmoid(logits) if binary else torch.softmax(logits, dim=2)
            residual = (prob - target) * (mask * C[:, None])[:, :, None]  # dloss/dlogits · C
            grad_W = torch.bmm(residual.transpose(1, 2), xs)  # (P, R, d)
            grad_b = residual.sum(1)
            z = yW - step * grad_W
            W_new = torch.sign(z) * torch.clamp(z.abs() - shrink, min=0)
            b_new = yb - step[:, :, 0] * grad_b
            mapping = torch.maximum(((W_new - yW) / step).abs().amax(dim=(1, 2)),
                                    ((b_new - yb) / step[:, :, 0]).abs().amax(dim=1))
            # gradient restart: momentum that points uphill is dropped
            uphill = ((yW - W_new) * (W_new - W)).sum(dim=(1, 2)) + ((yb - b_new) * (b_new - b)).sum(1) > 0
            t_next = torch.where(uphill, torch.ones_like(t), (1 + torch.sqrt(1 + 4 * t * t)) / 2)
            momentum = torch.where(uphill, torch.zeros_like(t), (t - 1) / t_next)[:, None, None]
            W_prev, b_prev, W, b = W, b, W_new, b_new
            yW = W + momentum * (W - W_prev)
            yb = b + momentum[:, :, 0] * (b - b_prev)
            t = t_next
            if iterations % check_every == 0:
                converged = mapping <= tol
                if bool(converged.all()):
                    break
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return L1Fit(W.double().cpu().numpy(), b.double().cpu().numpy(), converged.cpu().numpy(), iterations)
