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

from datamodels_ml.solvers.blas import mm_iter
from datamodels_ml.solvers.supports import column_counts, padded_support

__all__ = ["fista", "gram_product", "duality_gap", "support_newton", "TOL", "STALL"]

TOL = 1e-6  # default: relative duality gap
STALL = 5e-11  # float32 iterates moving less than this (squared, relative) have hit the rounding floor


def gram_product(G: Tensor, y: Tensor) -> Tensor:
    """``G y`` column by column: ``G`` is one ``[q, q]`` matrix shared by the columns of ``y``
    ``[q, Ta]`` (a matrix product), ``[Ta, q, q]``, one per column (a batched product), or a
    function computing the shared product (a Gram never formed)."""
    if callable(G) and not isinstance(G, Tensor):
        return G(y)
    if G.ndim == 2:
        return mm_iter(G, y)
    return torch.bmm(G, y.T.unsqueeze(2)).squeeze(2).T


def _batched_product(G: Tensor, rows: Tensor | None, y: Tensor) -> Tensor:
    """``gram_product`` of the sub-Grams ``G[rows]`` (all when None) without copying them: the
    products of the finished columns are computed on zeros and dropped."""
    if rows is None:
        return gram_product(G, y)
    full = torch.zeros(y.shape[0], G.shape[0], dtype=y.dtype, device=y.device)
    full[:, rows] = y
    return gram_product(G, full)[:, rows]


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
    stall: float | None = None,
    newton_after: int = 16,
    newton_cap: int = 64,
    on_iter: Callable[[int, int], None] | None = None,
) -> tuple[Tensor, Tensor, int, Tensor, Tensor]:
    """FISTA with per-column adaptive restart (O'Donoghue & Candès 2015) and per-column step sizes.

    Shapes: G [q,q] or [Ta,q,q] (one per column, see :func:`gram_product`), c [q,Ta], lam [Ta],
    W0 [q,Ta], nulldev [Ta], var [q] or [q,Ta], allowed [q,Ta] bool (coordinates a column may use;
    None: all), L a float or [Ta]: each column's starting estimate of the curvature of ``G`` on its
    coordinates (the step is ``1/L``).

    Steps are checked, not bounded in advance: one product per iteration, ``G x`` at the new
    iterate, and ``G y`` at the extrapolated point as the same combination of the last two. A step
    from ``y`` to ``x⁺`` is accepted when ``e'Ge <= L e'e`` (``e = x⁺ - y``; the sufficient
    decrease of FISTA with backtracking, Beck & Teboulle 2009); else that column goes back to its
    last iterate, restarts its momentum and grows its ``L`` (to 1.1 L, or 1.02 times the curvature
    it met if more, at most 2 L). No eigenvalue is computed: a column's ``L`` comes from its own
    history (the caller passes the previous path point's), so its iterates do not depend on the
    other columns.

    A column is converged when the duality gap of its (restricted) problem at the iterate, relative
    to its null deviance ``D`` (``nulldev``: ``||y||²/n`` of the centred target), is below ``tol``,
    or when its iterates stall: ``max_j var_j (Δw_j)² / D < stall`` over one iteration (the float
    rounding floor; ``Δ`` the change of the iterate). The gap uses the dual point the scaled
    residual (``s = min(1, λ / max_j |g_j|)``, ``g = c - G x``)::

        gap = ½ (1 - s)² (D - c'x) + Σ_j (λ |x_j| - ½ (1 + s²) x_j g_j)

    (written so that no two large terms cancel in float32).

    At iterations ``newton_after``, twice that, four times that..., the columns whose support has
    at most ``newton_cap`` features also try the exact solution on their current support and signs
    (:func:`support_newton`); a column whose candidate passes the same gap test is finished. On
    rank-deficient or ill-conditioned problems (fewer models than features) FISTA finds the support
    long before it converges, so this ends most of its iterations; well-conditioned problems
    converge before the first try and never pay for it. Returns
    ``(W [q,Ta], wGw [Ta], iters, L [Ta], GW [q,Ta])`` with ``wGw = w'Gw`` (for the training MSE
    without another product), each column's final ``L`` (the next path point's start) and ``G W``
    (the gradient at the result without another product).
    """
    if stall is None:  # the rounding floor of the working dtype (STALL is float32's)
        stall = STALL * (torch.finfo(c.dtype).eps / torch.finfo(torch.float32).eps) ** 2
    eps = torch.finfo(c.dtype).eps
    W = W0.clone()
    q, Ta = c.shape
    wGw = torch.zeros(Ta, dtype=c.dtype, device=c.device)
    GW = torch.zeros_like(c)
    live = torch.arange(Ta, device=c.device)
    L_all = torch.as_tensor(L, dtype=c.dtype, device=c.device).expand(Ta).clone()
    Lc = L_all.clone()
    if allowed is not None:
        W.masked_fill_(~allowed, 0)
    x = W.clone()
    rows = None  # with one sub-Gram per column: those of the live columns (None: all of G, in order)
    Gx = gram_product(G, x)
    y, Gy = x, Gx
    t = torch.ones(Ta, dtype=c.dtype, device=c.device)
    nd, cl, laml = nulldev, c, lam.expand(Ta)
    out = None if allowed is None else ~allowed  # coordinates outside the restricted problem
    var = var if var.ndim == 2 else var[:, None]
    rounding = 16 * eps  # the float error of e'(G x_new - G y), relative to |e| |G x|
    it = 0
    while live.numel() > 0 and it < max_iter:
        it += 1
        step = 1.0 / Lc
        thr = laml * step
        u = y + step * (cl - Gy)  # a gradient step from y
        x_new = u - torch.maximum(torch.minimum(u, thr), -thr)  # soft-threshold
        if out is not None:
            x_new.masked_fill_(out, 0)
        Gx_new = _batched_product(G, rows, x_new)
        # the step's sufficient-decrease test, e'Ge <= L e'e with e = x_new - y, from the two
        # products at hand (G y is a combination of earlier ones): a column that fails it had too
        # small an L; it goes back to x and grows L (never by more than the curvature it met)
        e = x_new - y
        ee = torch.linalg.vecdot(e, e, dim=0)
        curv = torch.linalg.vecdot(e, Gx_new - Gy, dim=0)
        bad = curv > Lc * ee * (1 + 1e-6)
        if bool(bad.any()):  # allow for the products' rounding before calling a step failed
            slack = rounding * ee.sqrt() * (torch.linalg.vector_norm(Gx_new, dim=0)
                                            + torch.linalg.vector_norm(Gy, dim=0))
            bad = curv > Lc * ee * (1 + 1e-6) + slack
        if bool(bad.any()):
            grown = torch.maximum(1.1 * Lc, 1.02 * curv / ee.clamp_min(1e-300)).clamp_max(2 * Lc)
            Lc = torch.where(bad, grown, Lc)
            x_new = torch.where(bad, x, x_new)
            Gx_new = torch.where(bad, Gx, Gx_new)
        check = it % check_every == 0
        if check:
            gap = duality_gap(x_new, Gx_new, cl, laml, nd, out)
        d = x_new - x
        restart = (torch.linalg.vecdot(y - x_new, d, dim=0) > 0) | bad  # (y - x_new)·(x_new - x) > 0: momentum off
        t_new = 0.5 * (1 + torch.sqrt(1 + 4 * t * t))
        beta = torch.where(restart, torch.zeros_like(t), (t - 1) / t_new)
        t = torch.where(restart, torch.ones_like(t), t_new)
        y = torch.addcmul(x_new, beta, d)
        Gy = torch.addcmul(Gx_new, beta, Gx_new - Gx)
        x, Gx = x_new, Gx_new
        if on_iter is not None:
            on_iter(it, live.numel())
        if check:
            done = ((gap < tol * nd) | ((d * d * var).amax(0) / nd < stall)) & ~bad
            xf, Gf = x, Gx  # the iterate returned for a finished column, and its product
            if newton_after and it >= newton_after and it & (it - 1) == 0 and not bool(done.all()):
                acc, xc, Gc = support_newton(G, x, cl, laml, nd, out, tol=tol, cap=newton_cap, skip=done,
                                             rows=rows)
                if acc is not None:
                    xf, Gf = torch.where(acc, xc, x), torch.where(acc, Gc, Gx)
                    done = done | acc
            if bool(done.any()):
                W[:, live[done]] = xf[:, done]
                GW[:, live[done]] = Gf[:, done]
                wGw[live[done]] = (xf[:, done] * Gf[:, done]).sum(0)
                L_all[live] = Lc
                keep = ~done
                live, x, y, t, Gx, Gy = live[keep], x[:, keep], y[:, keep], t[keep], Gx[:, keep], Gy[:, keep]
                nd, Lc = nd[keep], Lc[keep]
                cl, laml = cl[:, keep], laml[keep]
                if out is not None:
                    out = out[:, keep]
                if isinstance(G, Tensor) and G.ndim == 3:  # one sub-Gram per column: copy the live ones
                    rows = keep.nonzero().squeeze(1) if rows is None else rows[keep]
                    if 2 * rows.numel() <= G.shape[0]:  # only once half are done: copies stay below G's size
                        G, rows = G[rows], None
                if var.shape[1] > 1:
                    var = var[:, keep]
    if live.numel() > 0:
        W[:, live] = x
        GW[:, live] = Gx
        wGw[live] = (x * Gx).sum(0)
        L_all[live] = Lc
    return W, wGw, it, L_all, GW


def support_newton(G, x: Tensor, c: Tensor, lam: Tensor, nulldev: Tensor, out: Tensor | None, *, tol: float,
                   cap: int, skip: Tensor, rounds: int = 3, grow: int = 16,
                   rows: Tensor | None = None) -> tuple[Tensor | None, Tensor, Tensor]:
    """Finish columns exactly by an active-set method started from the support and signs of ``x``.

    For each column ``t``, on a support ``A`` with signs ``s``: ``w_A = G_AA^{-1} (c_A - λ s)``
    (batched over the columns, float64, supports padded to the largest); features whose sign
    flips are dropped and the system solved again; then the up to ``grow`` largest KKT violators
    outside ``A`` (``|c_j - G_j w| > λ``) join it, for ``rounds`` rounds. A candidate is accepted
    where its duality gap is below ``tol * nulldev`` (the same test as FISTA's, so the result is
    as exact). Columns with more than ``cap`` non-zeros, and those in ``skip``, are not tried.
    Returns ``(accepted [Ta] bool, candidates [q, Ta], G candidates [q, Ta])``, or ``(None, x, x)``
    when no column was tried (also for a Gram given as a product function). ``rows``: with
    ``[B, q, q]`` sub-Grams, the one of each column (default: column ``t``'s is ``G[t]``)."""
    if callable(G) and not isinstance(G, Tensor):
        return None, x, x
    a = column_counts(x != 0)
    sel = (a > 0) & (a <= cap) & ~skip
    if not bool(sel.any()):
        return None, x, x
    cols = sel.nonzero().squeeze(1)
    n, dev = cols.numel(), x.device
    S = x[:, cols] != 0  # [q, n] the support
    sgn = torch.sign(x[:, cols])
    cs, lams, nds = c[:, cols], lam[cols], nulldev[cols]
    outs = None if out is None else out[:, cols]
    gcols = cols if rows is None else rows[cols]  # the columns' sub-Grams
    Gsub = G if G.ndim == 2 else G[gcols]
    tcol = torch.arange(n, device=dev)[None, :]
    ok = torch.zeros(n, dtype=torch.bool, device=dev)
    best = torch.zeros_like(cs)
    Gbest = torch.zeros_like(cs)
    todo = torch.ones(n, dtype=torch.bool, device=dev)
    for r in range(rounds):
        cand = _solve_on_support(G, gcols, S, sgn, cs, lams, tcol, cap)
        Gc = gram_product(Gsub, cand)
        gap = duality_gap(cand, Gc, cs, lams, nds, outs)
        new = todo & (gap < tol * nds)
        best[:, new], Gbest[:, new] = cand[:, new], Gc[:, new]
        ok |= new
        todo &= ~new
        if r == rounds - 1 or not bool(todo.any()):
            break
        g = cs - Gc
        if outs is not None:
            g = g.masked_fill(outs, 0)
        viol = (g.abs() > lams * (1 + 1e-6)) & (cand == 0) & todo[None, :]
        if not bool(viol.any()):
            break
        score = torch.where(viol, g.abs(), torch.zeros_like(g))
        top = score.topk(min(grow, score.shape[0]), dim=0)
        add = torch.zeros_like(S)
        add.scatter_(0, top.indices, top.values > 0)
        S = (cand != 0) | add
        sgn = torch.where(add, torch.sign(g), torch.sign(cand))
    accepted = torch.zeros_like(skip)
    accepted[cols] = ok
    full, Gfull = x.clone(), x.clone()
    full[:, cols], Gfull[:, cols] = best, Gbest
    return accepted, full, Gfull


def _solve_on_support(G, cols: Tensor, S: Tensor, sgn: Tensor, c: Tensor, lam: Tensor, tcol: Tensor,
                      cap: int, drops: int = 3) -> Tensor:
    """``w_A = G_AA^{-1} (c_A - λ s_A)`` per column on the support ``S`` [q, n] with signs ``sgn``,
    dropping the features whose sign flips (``drops`` times at most); zero for columns with an
    empty, too large or singular system, or signs that still disagree."""
    a = S.sum(0)
    q, n = S.shape
    idx, valid = padded_support(S, cap)  # [m, n]: the support first
    m = idx.shape[0]
    if m == 0:
        return torch.zeros(q, n, dtype=c.dtype, device=c.device)
    if G.ndim == 2:
        Gaa = G[idx.T[:, :, None], idx.T[:, None, :]]
    else:
        Gaa = G[cols[:, None, None], idx.T[:, :, None], idx.T[:, None, :]]
    Gaa = Gaa.to(torch.float64)
    sg = sgn[idx, tcol].to(torch.float64)
    b = c[idx, tcol].to(torch.float64) - lam.to(torch.float64) * sg
    for _ in range(drops):
        off = ~valid.T
        A = torch.where(off[:, :, None] | off[:, None, :], 0.0, Gaa) + torch.diag_embed(off.to(Gaa.dtype))
        wa, info = torch.linalg.solve_ex(A, torch.where(valid, b, 0.0).T.unsqueeze(-1))
        wa = wa.squeeze(-1).T  # [m, n]
        flip = valid & ~(wa * sg > 0)
        if not bool(flip.any()):
            break
        valid = valid & ~flip
    good = (info == 0) & torch.isfinite(wa).all(0) & ((wa * sg > 0) | ~valid).all(0) & (a <= cap)
    valid &= good[None, :]
    out = torch.zeros(q, n, dtype=c.dtype, device=c.device)
    out[idx[valid], tcol.expand(m, n)[valid]] = wa[valid].to(c.dtype)
    return out


def duality_gap(w: Tensor, Gw: Tensor, c: Tensor, lam: Tensor, nulldev: Tensor,
                out: Tensor | None = None) -> Tensor:
    """Duality gap ``[Ta]`` of ``min_w 1/2 w'Gw - c'w + lam |w|_1 + D/2`` at ``w`` [q, Ta] (zero
    where ``out`` [q, Ta] is True: those coordinates are not part of the problem), from ``G w``.

    The dual point is the residual scaled into the feasible set, ``s = min(1, λ / max_j |g_j|)``
    with ``g = c - G w``; the gap is ``½ (1-s)² (D - c'w) + Σ_j (λ|w_j| - ½ (1+s²) w_j g_j)``,
    an upper bound of the objective's distance to its minimum.
    """
    g = c - Gw
    if out is not None:
        g.masked_fill_(out, 0)
    gmax = g.abs().amax(0) if g.shape[0] else torch.zeros_like(lam)
    s = torch.where(gmax > lam, lam / gmax.clamp_min(1e-30), torch.ones_like(gmax))
    cw = torch.linalg.vecdot(c, w, dim=0)
    terms = torch.addcmul(w.abs().mul_(lam), w * g, -0.5 * (1 + s * s))
    return 0.5 * (1 - s) ** 2 * (nulldev - cw) + terms.sum(0)
