"""L1-penalised logistic regression in torch (working-set FISTA), many problems at once, on any device.

Solves, for every problem p of a batch, scikit-learn's objective for `LogisticRegression(C,
l1_ratio=1)`:

    minimise over (W_p, b_p):   C_p · Σ_i loss(y_pi, x_pi W_pᵀ + b_p)  +  ‖W_p‖₁

with the multinomial loss (K classes, K coefficient rows, as scikit-learn's multinomial fit) or the
binary logistic loss (one coefficient row, class 1 positive). The intercept is not penalised.
`probes.heads` uses it as the `solver="torch"` alternative to scikit-learn's saga: the problems of
a C grid, of the one-vs-rest heads and of the stability-selection resamples are solved together,
as a few batched matmuls per iteration on the run's device.

The solutions are sparse (tens to hundreds of 65,536 latents), so the solver works on a working set
of features (as glmnet / celer do): it starts from the features whose gradient at the start point
violates the optimality condition most, solves the restricted problem by FISTA (Beck & Teboulle
2009; step 1/L with L = C_p · c · λ_max(X̃_wᵀX̃_w) of the working columns and the intercept, c = 1/2
for the softmax and 1/4 for the sigmoid, λ_max by power iteration with a 10% margin; O'Donoghue &
Candès's gradient restart), then checks the optimality (KKT) conditions on every feature and
adds the worst violators, until none violates by more than `tol`. `tol` is relative to the L1
weight 1: a zero weight is optimal when |gradient| <= 1, a non-zero one when gradient = -sign(w).
Restricted to few columns, λ_max is small and FISTA takes few iterations. Data and iterates are
float32 (matmuls at full float32 precision, no TF32); coefficients come back in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

POWER_ITERATIONS = 40
LIPSCHITZ_MARGIN = 1.1
MAX_ROUNDS = 30
FIRST_WORKING_SET = 64


@dataclass
class L1Fit:
    """Solutions of a batch of problems: coef `(P, R, d)`, intercept `(P, R)` float64 (R = K rows,
    or 1 for binary), converged `(P,)` bool, FISTA iterations run (all rounds)."""

    coef: np.ndarray
    intercept: np.ndarray
    converged: np.ndarray
    iterations: int


@dataclass
class _Problem:
    xs: Tensor        # (P, n, d) design (an expanded view when shared)
    target: Tensor    # (P, n, R) one-hot targets (binary: the positive column)
    weight: Tensor    # (P, n) row mask × C_p
    binary: bool


def _gradient(pb: _Problem, xs: Tensor, W: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient of the smooth part C Σ loss w.r.t. W `(P, R, d_x)` and b `(P, R)` on design `xs`."""
    logits = torch.bmm(xs, W.transpose(1, 2)) + b[:, None, :]
    prob = torch.sigmoid(logits) if pb.binary else torch.softmax(logits, dim=2)
    residual = (prob - pb.target) * pb.weight[:, :, None]
    return torch.bmm(residual.transpose(1, 2), xs), residual.sum(1)


def _lipschitz(xs: Tensor, pb: _Problem) -> Tensor:
    """Per problem `(P,)`: c · C · λ_max of X̃ᵀ diag(row mask) X̃, X̃ = [X, 1] (power iteration)."""
    problems, _, d = xs.shape
    mask = (pb.weight > 0).to(xs.dtype)
    generator = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(problems, d + 1, generator=generator).to(xs.device, xs.dtype)
    estimate = torch.ones(problems, device=xs.device, dtype=xs.dtype)
    for _ in range(POWER_ITERATIONS):
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
        u = (torch.bmm(xs, v[:, :-1, None]).squeeze(2) + v[:, -1:]) * mask
        w = torch.cat([torch.bmm(xs.transpose(1, 2), u[:, :, None]).squeeze(2), u.sum(1, keepdim=True)], 1)
        estimate = (w * v).sum(1)
        v = w
    C = pb.weight.amax(dim=1)  # C_p (the row weights are 0 or C_p)
    return C * (0.25 if pb.binary else 0.5) * estimate.clamp_min(1e-12) * LIPSCHITZ_MARGIN


def _fista(pb: _Problem, xs: Tensor, W: Tensor, b: Tensor, tol: float, max_iter: int, check_every: int
           ) -> tuple[Tensor, Tensor, int, bool]:
    """FISTA on design `xs` from (W, b) until every problem's gradient mapping is <= tol;
    returns (W, b, iterations, converged)."""
    step = (1.0 / _lipschitz(xs, pb))[:, None, None]
    W_prev, b_prev = W, b
    yW, yb = W, b
    t = torch.ones(W.shape[0], device=W.device, dtype=W.dtype)
    iterations = 0
    for iterations in range(1, max_iter + 1):
        grad_W, grad_b = _gradient(pb, xs, yW, yb)
        z = yW - step * grad_W
        W_new = torch.sign(z) * torch.clamp(z.abs() - step, min=0)  # prox of the L1 weight 1
        b_new = yb - step[:, :, 0] * grad_b
        # gradient restart: momentum that points uphill is dropped
        uphill = ((yW - W_new) * (W_new - W)).sum(dim=(1, 2)) + ((yb - b_new) * (b_new - b)).sum(1) > 0
        t_next = torch.where(uphill, torch.ones_like(t), (1 + torch.sqrt(1 + 4 * t * t)) / 2)
        momentum = torch.where(uphill, torch.zeros_like(t), (t - 1) / t_next)[:, None, None]
        if iterations % check_every == 0:
            mapping = torch.maximum(((W_new - yW) / step).abs().amax(dim=(1, 2)),
                                    ((b_new - yb) / step[:, :, 0]).abs().amax(dim=1))
            if bool((mapping <= tol).all()):
                return W_new, b_new, iterations, True
        W_prev, b_prev, W, b = W, b, W_new, b_new
        yW = W + momentum * (W - W_prev)
        yb = b + momentum[:, :, 0] * (b - b_prev)
        t = t_next
    return W, b, iterations, False


def _violations(grad_W: Tensor, W: Tensor) -> Tensor:
    """Per feature `(d,)`: the largest KKT violation over problems and rows."""
    nonzero = W != 0
    viol = torch.where(nonzero, (grad_W + torch.sign(W)).abs(), (grad_W.abs() - 1).clamp_min(0))
    return viol.amax(dim=(0, 1))


def fit_l1_logistic(
    x: Tensor, targets: Tensor, C: Tensor, n_classes: int, *, binary: bool = False, row_mask: Tensor | None = None,
    max_iter: int = 20000, tol: float = 1e-3, check_every: int = 10, init: tuple[Tensor, Tensor] | None = None,
) -> L1Fit:
    """Fit `P` L1 logistic problems at once.

    Args:
        x: `(n, d)` design matrix shared by all problems, or `(P, n, d)` one per problem (float32).
        targets: `(P, n)` int64 class ids in [0, n_classes) (binary: 0 / 1).
        C: `(P,)` inverse L1 strengths.
        row_mask: `(P, n)` 1.0 for the rows of each problem (0 leaves a row out); default all rows.
        binary: one coefficient row per problem (the positive class), sigmoid loss.
        max_iter: FISTA iterations per working-set round. init: a start point (W `(P, R, d)`, b `(P, R)`).
    """
    problems, n = targets.shape
    device, dtype = x.device, torch.float32
    x = x.to(dtype)
    xs = x.unsqueeze(0).expand(problems, *x.shape) if x.dim() == 2 else x
    d = x.shape[-1]
    rows_out = 1 if binary else n_classes
    mask = torch.ones(problems, n, device=device, dtype=dtype) if row_mask is None else row_mask.to(device, dtype)
    onehot = torch.nn.functional.one_hot(targets.to(device), n_classes).to(dtype)
    pb = _Problem(xs, onehot[..., 1:] if binary else onehot, mask * C.to(device, dtype)[:, None], binary)
    W = torch.zeros(problems, rows_out, d, device=device, dtype=dtype)
    b = torch.zeros(problems, rows_out, device=device, dtype=dtype)
    if init is not None:
        W, b = init[0].to(device, dtype).clone(), init[1].to(device, dtype).clone()
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    total, converged, solved = 0, False, False
    try:
        active = (W != 0).any(dim=(0, 1))
        for _ in range(MAX_ROUNDS):
            grad_W, _ = _gradient(pb, xs, W, b)
            score = _violations(grad_W, W)
            violators = score > tol
            if solved and not bool((violators & ~active).any()):  # optimal inside the set, no violator outside
                converged = True
                break
            grow = max(FIRST_WORKING_SET, int(active.sum()))
            candidates = torch.where(violators & ~active, score, torch.zeros_like(score))
            picked = torch.topk(candidates, min(grow, d)).indices
            active[picked[candidates[picked] > 0]] = True
            if total == 0 and not bool(active.any()):  # nothing violates at the start point: W = 0 is optimal
                active[picked[:1]] = True  # still fit the intercepts
            idx = active.nonzero().squeeze(1)
            W_sub, b, iterations, solved = _fista(pb, xs[:, :, idx], W[:, :, idx], b, tol, max_iter, check_every)
            total += iterations
            W = torch.zeros_like(W)
            W[:, :, idx] = W_sub
            active = (W != 0).any(dim=(0, 1)) | active
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    done = np.full(problems, converged)
    return L1Fit(W.double().cpu().numpy(), b.double().cpu().numpy(), done, total)
