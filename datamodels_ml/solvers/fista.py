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

__all__ = ["fista", "top_eig_cols", "gram_product"]


def gram_product(G: Tensor, y: Tensor) -> Tensor:
    """``G y`` column by column: ``G`` is one ``[q, q]`` matrix shared by the columns of ``y``
    ``[q, Ta]`` (a matrix product), or ``[Ta, q, q]``, one per column (a batched product)."""
    if G.ndim == 2:
        return G @ y
    return torch.bmm(G, y.T.unsqueeze(2)).squeeze(2).T


def fista(
    G: Tensor,
    c: Tensor,
    lam: Tensor,
    W0: Tensor,
    *,
    L: float | Tensor,
    nulldev: Tensor,
    var: Tensor,
    tol: float,
    max_iter: int,
    allowed: Tensor | None = None,
    check_every: int = 1,
    on_iter: Callable[[int, int], None] | None = None,
) -> tuple[Tensor, Tensor, int]:
    """FISTA with per-column adaptive restart (O'Donoghue & Candès 2015).

    Shapes: G [q,q] or [Ta,q,q] (one per column, see :func:`gram_product`), c [q,Ta], lam [Ta],
    W0 [q,Ta], nulldev [Ta], var [q] or [q,Ta], allowed [q,Ta] bool (coordinates a column may use;
    None: all), L a float or [Ta] (a Lipschitz bound per column: the step of each column, hence its
    iterates, do not depend on the other columns). A column is converged when
    ``max_j var_j (Δw_j)² / nulldev < tol`` over one iteration (``Δ`` the change of the iterate).
    Returns ``(W [q,Ta], wGw [Ta], iters)`` where ``wGw ≈ w'Gw`` (from the last gradient, exact
    at convergence; used for the training MSE without another product).
    """
    W = W0.clone()
    Ta = c.shape[1]
    wGw = torch.zeros(Ta, dtype=c.dtype, device=c.device)
    live = torch.arange(Ta, device=c.device)
    step = (1.0 / torch.as_tensor(L, dtype=c.dtype, device=c.device)).expand(Ta).clone()
    thr = (lam * step).expand(c.shape[0], Ta).clone()
    if allowed is not None:
        thr.masked_fill_(~allowed, float("inf"))  # soft-threshold at +inf: the coordinate stays 0
        W.masked_fill_(~allowed, 0)
    x, y = W.clone(), W.clone()
    t = torch.ones(Ta, dtype=c.dtype, device=c.device)
    cs, nd = step * c, nulldev
    var = var if var.ndim == 2 else var[:, None]
    it = 0
    Gy = None
    while live.numel() > 0 and it < max_iter:
        it += 1
        Gy = gram_product(G, y)
        u = (y + cs).sub_(Gy * step)  # y - step * (G y - c)
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
            crit = (d * d * var).amax(0) / nd
            done = crit < tol
            if bool(done.any()):
                W[:, live[done]] = x[:, done]
                wGw[live[done]] = (x[:, done] * Gy[:, done]).sum(0)
                keep = ~done
                live, x, y, t, Gy = live[keep], x[:, keep], y[:, keep], t[keep], Gy[:, keep]
                cs, nd, thr, step = cs[:, keep], nd[keep], thr[:, keep], step[keep]
                if G.ndim == 3:
                    G = G[keep]
                if var.shape[1] > 1:
                    var = var[:, keep]
    if live.numel() > 0:
        W[:, live] = x
        wGw[live] = (x * gram_product(G, x)).sum(0)
    return W, wGw, it


def top_eig_cols(
    G: Tensor,
    V0: Tensor,
    allowed: Tensor | None = None,
    *,
    cold: Tensor | None = None,
    iters: int = 60,
    rtol: float = 1e-4,
) -> tuple[Tensor, Tensor]:
    """Per column ``t``: an upper estimate of the top eigenvalue of ``G`` (or ``G[t]``) restricted to the
    coordinates ``allowed[:, t]`` (power iteration on one vector per column, one matrix product
    for all columns, +2% margin).

    ``V0`` [q, Ta] are the start vectors (the previous path point's, or a fixed random vector:
    then ``cold`` is True for that column and it runs at least 15 iterations, else 2). A column
    stops once its estimate changes by less than ``rtol`` (1e-3 when warm) in one iteration; a
    warm column's estimate gets a 5% margin instead of 2% (a Rayleigh quotient from a vector near
    the top eigenvector is accurate to second order, but the working set changed). The result of
    a column depends only on its own sub-matrix, not on the other columns.
    Returns ``(L [Ta], V [q, Ta])``.
    """
    q, Ta = V0.shape
    V = V0.to(G.dtype).clone()
    if allowed is not None:
        V.masked_fill_(~allowed, 0)
    V /= V.norm(dim=0).clamp_min(1e-30)
    ev = torch.zeros(Ta, dtype=G.dtype, device=G.device)
    cold = torch.ones(Ta, dtype=torch.bool, device=G.device) if cold is None else cold
    min_it = torch.where(cold, 15, 2)
    tol = torch.where(cold, rtol, 1e-3).to(G.dtype)
    margin = torch.where(cold, 1.02, 1.05).to(G.dtype)
    live = torch.arange(Ta, device=G.device)
    for it in range(iters):
        U = gram_product(G if G.ndim == 2 or live.numel() == Ta else G[live], V[:, live])
        if allowed is not None:
            U.masked_fill_(~allowed[:, live], 0)
        e = (V[:, live] * U).sum(0)
        V[:, live] = U / U.norm(dim=0).clamp_min(1e-30)
        done = ((e - ev[live]).abs() <= tol[live] * e.abs()) & (min_it[live] <= it)
        ev[live] = e
        live = live[~done]
        if live.numel() == 0:
            break
    d = torch.diagonal(G)[:, None].expand(q, Ta) if G.ndim == 2 else torch.diagonal(G, dim1=1, dim2=2).T
    if allowed is not None:
        d = d.masked_fill(~allowed, 0)
    dmax = d.amax(0) if q else torch.zeros_like(ev)
    return torch.maximum(ev, dmax) * margin + 1e-12, V
