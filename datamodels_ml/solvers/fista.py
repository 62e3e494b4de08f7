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
    ``[q, Ta]`` (a matrix product), ``[Ta, q, q]``, one per column (a batched product), or a
    function computing the shared product (a Gram never formed)."""
    if callable(G) and not isinstance(G, Tensor):
        return G(y)
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
                if isinstance(G, Tensor) and G.ndim == 3:
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
    steps: int = 4,
) -> tuple[Tensor, Tensor]:
    """Per column ``t``: an upper estimate of the top eigenvalue of ``G`` (or ``G[t]``) restricted
    to the coordinates ``allowed[:, t]``, by ``steps`` Lanczos steps from ``V0[:, t]`` (one matrix
    product per step for all columns).

    The estimate is the top Ritz value plus its residual bound ``|β_k s_k|``, +1%: Lanczos finds
    the top of a clustered spectrum (a Gram of random masks) in a few steps where power iteration
    needs dozens. ``V0`` [q, Ta] is the start (the previous path point's Ritz vector, or a fixed
    positive vector: ``cold``, then four times the steps); the result of a column depends only on its
    own sub-matrix and start. Returns ``(L [Ta], V [q, Ta])`` with ``V`` the top Ritz vectors.
    """
    q, Ta = V0.shape
    dt, dev = V0.dtype, V0.device
    if q == 0 or Ta == 0:
        return torch.ones(Ta, dtype=dt, device=dev), V0.to(dt)
    k = steps if cold is None or not bool(cold.any()) else 4 * steps
    k = max(1, min(k, q))
    v = V0.to(dt).clone()
    if allowed is not None:
        v.masked_fill_(~allowed, 0)
    v /= v.norm(dim=0).clamp_min(1e-30)
    Q, alphas, betas = [], [], []
    v_prev = torch.zeros_like(v)
    beta = torch.zeros(Ta, dtype=dt, device=dev)
    for _ in range(k):
        Q.append(v)
        w = gram_product(G, v)
        if allowed is not None:
            w.masked_fill_(~allowed, 0)
        a = (w * v).sum(0)
        w = w - a * v - beta * v_prev
        for u in Q:  # full reorthogonalization (k is small): no spurious copies
            w -= (w * u).sum(0) * u
        beta = w.norm(dim=0)
        alphas.append(a)
        betas.append(beta)
        ok = beta > 1e-7 * a.abs().clamp_min(1e-30)  # else an invariant subspace: stop that column
        v_prev, v = v, torch.where(ok, w / beta.clamp_min(1e-30), torch.zeros_like(w))
        beta = torch.where(ok, beta, torch.zeros_like(beta))
    n = len(alphas)
    Tm = torch.diag_embed(torch.stack(alphas, 1).to(torch.float64))
    if n > 1:
        off = torch.stack(betas[:-1], 1).to(torch.float64)
        Tm = Tm + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    evals, evecs = torch.linalg.eigh(Tm)  # [Ta, n], [Ta, n, n]
    theta, s = evals[:, -1], evecs[:, :, -1]  # top Ritz value and its coefficients
    resid = (betas[-1].to(torch.float64) * s[:, -1]).abs()
    V = torch.einsum("jqt,tj->qt", torch.stack(Q), s.to(dt))
    L = (theta + resid) * 1.01 + 1e-12
    return L.to(dt), V
