"""The relaxed lasso: each target's lasso weights blended with least squares on their own support.

Meinshausen (2007); Hastie, Tibshirani & Tibshirani (2017)::

    w(φ) = (1 - φ) w_lasso + φ w_LS,      w_LS = argmin ||y - Z_A w_A||²  on A = support(w_lasso)

``φ = 0`` is the lasso, ``φ = 1`` the unpenalized fit on the lasso's support: the lasso picks the
features, ``φ`` takes back part of its shrinkage of their weights. ``φ`` comes from a small grid
(:data:`PHIS`) and is chosen with ``λ`` on the validation rows by the path driver. With the Gram in
memory, ``w_LS`` is one small batched solve per target, ``G_AA w_A = c_A`` (Cholesky in float64,
supports padded to the largest of a group of targets). The intercept needs nothing more: ``c`` and
``G`` are centred, so the intercept of any weights is ``ȳ - z̄'w`` as for the lasso.

A target whose least-squares problem is not well posed (a support of more than :data:`CAP`
features, or of at least as many features as rows, or a numerically singular ``G_AA``) keeps its
lasso weights (``w_LS = w_lasso``: every ``φ`` is the lasso).
"""

from __future__ import annotations

import torch
from torch import Tensor

from datamodels_ml.solvers.supports import padded_support, size_groups

__all__ = ["PHIS", "CAP", "support_ls", "blend", "choose_phi"]

PHIS = (0.0, 0.25, 0.5, 0.75, 1.0)  # φ = 0 first: a tie keeps the lasso
CAP = 256  # largest support solved (a Cholesky of CAP³/3 flops per target and λ)
_GROUP_ENTRIES = 2**24  # entries of the padded sub-Grams gathered at a time (128 MiB in float64)
_RCOND = 1e-10  # smallest accepted pivot² of the Cholesky factor, relative to the largest diagonal


def support_ls(op, c: Tensor, W: Tensor, *, n_rows: int, fit_intercept: bool, support: Tensor | None = None,
               cap: int = CAP) -> tuple[Tensor, Tensor]:
    """Least squares on the support of each column of ``W`` [p, T]: ``(W_LS [p, T], solved [T] bool)``.

    ``op`` is the Gram operator of the rows to fit (``batch_block``, see
    :mod:`~datamodels_ml.solvers.screening`), ``c`` [p, T] its linear term, ``n_rows`` the rows;
    ``support`` [p, T] bool: the features of each column (default ``W != 0``). Columns that are not
    solved (empty support, more than ``cap`` features or at least ``n_rows - fit_intercept`` of
    them, a singular system) get their column of ``W`` back."""
    support = W != 0 if support is None else support
    a = support.sum(0)
    most = n_rows - int(bool(fit_intercept)) - 1  # at least one residual degree of freedom
    sel = (a > 0) & (a <= min(cap, most))
    out = W.clone()
    solved = torch.zeros(W.shape[1], dtype=torch.bool, device=W.device)
    cols = sel.nonzero().squeeze(1)
    if cols.numel() == 0:
        return out, solved
    # targets in order of support size, so that a group's padding stays small
    for grp in size_groups(a[cols], _GROUP_ENTRIES):
        grp = cols[grp]
        idx, valid = padded_support(support[:, grp])  # [m, g]: the support first
        m = idx.shape[0]
        Gaa = op.batch_block(idx.T, valid.T).to(torch.float64)  # [g, m, m], zero outside the support
        pad = (~valid.T).to(torch.float64)
        Gaa = Gaa + torch.diag_embed(pad)  # identity on the padding: its solution is 0
        tcol = torch.arange(grp.numel(), device=W.device)[None, :]
        rhs = torch.where(valid, c[idx, grp[None, :]].to(torch.float64), 0.0).T.unsqueeze(-1)  # [g, m, 1]
        L, info = torch.linalg.cholesky_ex(Gaa)
        piv = torch.diagonal(L, dim1=1, dim2=2) ** 2  # [g, m]
        scale = torch.diagonal(Gaa, dim1=1, dim2=2).amax(1).clamp_min(1e-300)
        good = (info == 0) & (piv.amin(1) >= _RCOND * scale)
        L = torch.where(good[:, None, None], L, torch.eye(m, dtype=L.dtype, device=L.device))
        wa = torch.cholesky_solve(rhs, L).squeeze(-1).T  # [m, g]
        good &= torch.isfinite(wa).all(0)
        ok = valid & good[None, :]
        block = torch.where(good[None, :], torch.zeros_like(out[:, grp]), out[:, grp])
        block[idx[ok], tcol.expand(m, -1)[ok]] = wa[ok].to(W.dtype)
        out[:, grp] = block
        solved[grp] = good
    return out, solved


def blend(W: Tensor, W_ls: Tensor, phi: Tensor) -> Tensor:
    """``(1 - φ) W + φ W_LS`` per column (``phi`` [T])."""
    phi = phi.to(W.dtype)
    return W + phi[None, :] * (W_ls - W)


def choose_phi(pred: Tensor, pred_ls: Tensor, Y: Tensor, phis=PHIS) -> tuple[Tensor, Tensor]:
    """The ``φ`` of ``phis`` with the smallest validation MSE per column, from the predictions of
    the lasso ``pred`` and of the least-squares fit ``pred_ls`` [n, T] (a blend's predictions are
    the same blend of theirs) and the targets ``Y``. Returns ``(mse [T] float64, φ [T])``; ties
    go to the earlier ``φ``."""
    d = (pred_ls - pred).to(torch.float64)
    r0 = (pred - Y).to(torch.float64)
    n = max(Y.shape[0], 1)
    mse = torch.stack([((r0 + f * d) ** 2).sum(0) / n for f in phis])  # [len(phis), T]
    best = mse.argmin(0)
    grid = torch.tensor(phis, dtype=torch.float64, device=Y.device)
    return mse.gather(0, best[None]).squeeze(0), grid[best]
