"""The refit of a lasso path: each target re-solved at its selected λ on train+val rows.

fista: the train+val Gram is never formed: its products come from the training Gram and the
validation masks kept in memory (:class:`RefitGram`, train mean/std; or
:class:`TrainValGram` with train+val's own mean/std), and the linear term from the sums already
taken, so the refit makes no pass over the training rows. saga: SAGA over both sources.
The functions take the path driver's state (``self``: a ``path._Run``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from datamodels_ml.solvers.restandardize import train_val_problem
from datamodels_ml.solvers.saga import Saga, saga_lr
from datamodels_ml.solvers.screening import RefitGram, gradient, solve_screened
from datamodels_ml.solvers.sources import ChainedSource
from datamodels_ml.solvers.stats import target_stats

__all__ = ["refit_fista", "refit_saga"]

# the refit's working sets are screening's own floor, the features whose gradient at the selected
# weights (on train+val) is within 5% of λ: with ``λ_prev = 2 λ`` the strong rule's ``2 λ - λ_prev``
# is 0 and never binds. With ``λ_prev = λ`` it would keep only the features at λ itself, and the new
# rows push features just below λ over it: at p = 20k with 500 targets, 522 re-solves of targets
# after their KKT check, 202 with the 5%


def refit_fista(self, W0: Tensor, lam: Tensor, phi: Tensor | None = None,
                support: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Re-solve at ``lam`` on train+val: Gram and linear term from the train statistics and
    the validation rows kept in memory (no pass over the training rows); blended by ``phi``
    (the relaxed lasso) with least squares on train+val on ``support`` when given."""
    nt, nv = self.stats.n_train, self.stats.n_val
    N = nt + nv
    ts, vs = self.ts, self.vs
    m, inv = self.mean64, self.inv
    if self.restandardize:  # train+val's own mean/std: z̄ = 0; the weights to that scale
        op, c64, nd, ybar, self.out_mean, self.out_std = train_val_problem(
            self.stats, ts, vs, fit_intercept=self.fit_intercept, dtype=self.dtype)
        zbar = torch.zeros_like(m)
        W0 = W0 * (self.out_std / self.stats.std).to(W0.dtype)[:, None]
        W0 = W0 * (op.r != 0)[:, None]  # features constant on train start at 0 (their r is 0)
    else:
        zty = (nt * ts.zty(m, inv) + nv * vs.zty(m, inv)) / N
        zbar = (nt * ts.zbar(m, inv) + nv * vs.zbar(m, inv)) / N
        ybar = (nt * ts.ybar + nv * vs.ybar) / N
        yy = (nt * ts.yy + nv * vs.yy) / N
        if self.fit_intercept:
            c64, nd = zty - zbar[:, None] * ybar[None, :], (yy - ybar**2).clamp_min(0)
        else:
            c64, nd = zty, yy
        op = RefitGram(self.stats, self.dtype, zbar if self.fit_intercept else None)
    c = c64.to(self.dtype)
    grad = gradient(op, c, W0)
    W, _, _, e = solve_screened(op, c, lam, 2 * lam, W0, grad, nulldev=nd.clamp_min(1e-30).to(self.dtype),
                                var=self.var, tol=self.tol, max_iter=self.max_epochs, screen=self.screen,
                                on_iter=self.on_epoch, curv=self.curv)  # ids: all targets
    self.epochs += e
    if phi is not None:
        W = self._relax(op, c, W, N, phi=phi, support=support)
    if self.fit_intercept:
        bias = (ybar - (zbar[:, None] * W.to(torch.float64)).sum(0)).to(self.dtype)
    else:
        bias = torch.zeros(self.T, dtype=self.dtype, device=self.device)
    return W, bias


def refit_saga(self, W0: Tensor, b0: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """Re-solve at ``lam`` on train+val rows by SAGA (a pass per epoch over both sources)."""
    both = ChainedSource(self.train, self.val)
    saga = Saga(both, self.mean64.to(self.dtype), self.std_int, W0, b0, fit_intercept=self.fit_intercept,
                lr=1.0, dtype=self.dtype, device=self.device)
    Lmax, Lest = saga.fill()
    saga.lr = self.lr if self.lr is not None else saga_lr(both, Lmax, Lest, self.fit_intercept, self.bs)
    vs = target_stats(self.val, device=self.device)
    nt, nv = self.ts.n, vs.n
    ybar = (nt * self.ts.ybar + nv * vs.ybar) / (nt + nv)
    yy = (nt * self.ts.yy + nv * vs.yy) / (nt + nv)
    nd = ((yy - ybar**2) if self.fit_intercept else yy).clamp_min(1e-30).to(self.dtype)
    self.epochs += saga.run(torch.arange(self.T, device=self.device), lam, nulldev=nd, ybar=ybar.to(self.dtype),
                            var=self.var, tol=self.tol, absolute=self.absolute,
                            max_epochs=self.max_epochs, check_every=self.check_every, on_epoch=self.on_epoch)
    return saga.W, saga.b
