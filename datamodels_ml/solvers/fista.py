"""FISTA with adaptive restart for many independent lasso problems sharing one Gram matrix.

Solves ``min_w 1/2 w'Gw - c'w + lam_t |w|_1`` for every column ``t`` of ``c`` at once (one matrix
product per iteration for all columns), optionally restricted per column to a set of allowed
coordinates (the screened working set; the others stay at 0). Columns leave the work set as soon
as they converge.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["fista", "top_eig"]


def fista(
    G: Tensor,
    c: Tensor,
    lam: Tensor,
    W0: Tensor,
    *,
    L: float,
    nulldev: Tensor,
    var: Tensor,
    tol: float,
    max_iter: int,
    allowed: Tensor | None = None,
    check_every: int = 1,
    on_iter: Callable[[int, int], None] | None = None,
) -> tuple[Tensor, Tensor, int]:
    """FISTA with per-column adaptive restart (O'Donoghue & Candès 2015).

    Shapes: G [q,q], c [q,Ta], lam [Ta], W0 [q,Ta], nulldev [Ta], var [q], allowed [q,Ta] bool
    (coordinates a column may use; None: all). A column is converged when
    ``max_j var_j (Δw_j)² / nulldev < tol`` over one iteration (``Δ`` the change of the iterate).
    Returns ``(W [q,Ta], wGw [Ta], iters)`` where ``wGw ≈ w'Gw`` (from the last gradient, exact
    at convergence; used for the training MSE without another product).
    """
    W = W0.clone()
    Ta = c.shape[1]
    wGw = torch.zeros(Ta, dtype=c.dtype, device=c.device)
    live = torch.arange(Ta, device=c.device)
    step = 1.0 / L
    thr = (lam * step).expand(c.shape[0], Ta).clone()
    if allowed is not None:
        thr.masked_fill_(~allowed, float("inf"))  # soft-threshold at +inf: the coordinate stays 0
        W.masked_fill_(~allowed, 0)
    x, y = W.clone(), W.clone()
    t = torch.ones(Ta, dtype=c.dtype, device=c.device)
    cs, nd = step * c, nulldev
    it = 0
    Gy = None
    while live.numel() > 0 and it < max_iter:
        it += 1
        Gy = G @ y
        u = (y + cs).sub_(Gy, alpha=step)  # y - step * (G y - c)
        x_new = u - torch.maximum(torch.minimum(u, thr), -thr)  # soft-threshold
        d = x_new - x
        restart = (y.sub_(x_new).mul_(d)).sum(0) > 0  # (y - x_new)·(x_new - x) > 0: y is reused
        t_new = 0.5 * (1 + torch.sqrt(1 + 4 * t * t))
        beta = torch.where(restart, torch.zeros_like(t), (t - 1) / t_new)
        t = torch.where(restart, torch.ones_like(t), t_new)
        y = torch.addcmul(x_new, beta, d)
        x = x_new
        if on_iter is not None:
            on_iter(it, live.numel())
        if it % check_every == 0:
            crit = (d * d * var[:, None]).amax(0) / nd
            done = crit < tol
            if bool(done.any()):
                W[:, live[done]] = x[:, done]
                wGw[live[done]] = (x[:, done] * Gy[:, done]).sum(0)
                keep = ~done
                live, x, y, t, Gy = live[keep], x[:, keep], y[:, keep], t[keep], Gy[:, keep]
                cs, nd, thr = cs[:, keep], nd[keep], thr[:, keep]
    if live.numel() > 0:
        W[:, live] = x
        wGw[live] = (x * (G @ x)).sum(0)
    return W, wGw, it


def top_eig(G: Tensor, V0: Tensor | None = None, iters: int = 60, rtol: float = 1e-4) -> tuple[float, Tensor]:
    """Upper estimate of the largest eigenvalue of the PSD matrix ``G`` [q,q] by power iteration
    on a block of 4 vectors (+2% margin; much cheaper than an eigendecomposition).

    ``V0`` [q, 4] warm-starts it (the vectors of the previous, overlapping working set): then it
    stops once the estimate changes by less than ``rtol`` over two iterations. Returns
    ``(estimate, V)`` with ``V`` the final vectors (for the next warm start).
    """
    q = G.shape[0]
    if q == 0:
        return 1.0, torch.zeros(0, 4, dtype=G.dtype, device=G.device)
    if G.numel() <= 2**24:  # small: float64 (no precision worry); large: no q x q copy
        G = G.to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    V = torch.randn(q, 4, generator=gen, dtype=torch.float64).to(G.device, G.dtype)
    if V0 is not None:
        V[:, :3] = V0[:, :3].to(V)  # keep one random vector against an unlucky start
    V = V / V.norm(dim=0).clamp_min(1e-300)
    ev, prev = 0.0, []
    for it in range(iters):
        U = G @ V
        ev = float((V * U).sum(0).max())
        V = U / U.norm(dim=0).clamp_min(1e-300)
        prev.append(ev)
        if V0 is not None and it >= 3 and abs(prev[-1] - prev[-3]) <= rtol * abs(ev):
            break
    return max(ev, float(torch.diagonal(G).max())) * 1.02 + 1e-12, V
