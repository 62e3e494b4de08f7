"""One path point of the screened FISTA path, on the compact state of the targets still on it.

The path driver (``path._Run``) keeps one column per target still on the path: the solution at
the last point, at the one before, the gradient ``c - G W`` and the linear term. A point predicts
each target's warm start from the last two solutions (:func:`predict`), solves with screening
(:func:`~datamodels_ml.solvers.screening.solve_screened`) and hands back the new state. Targets at
``λ >= λ_max`` whose weights are still zero are not solved.
"""

from __future__ import annotations

import torch
from torch import Tensor

from datamodels_ml.solvers.screening import solve_screened

__all__ = ["fista_point", "predict"]


def fista_point(run, i: int, act: Tensor, W: Tensor, W_old: Tensor, grad: Tensor, c_act: Tensor,
                wGw: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Path point ``i`` of the path driver ``run`` (a ``path._Run``: grid, Gram operator, settings,
    curvatures) for the on-path targets ``act`` (compact state: ``W`` the solution at
    ``i - 1``, ``W_old`` at ``i - 2``, ``grad`` [p, Ta] its gradient). Targets at
    ``λ >= λ_max`` whose weights are still zero stay zero without a solve. Returns
    ``(W_old, W, grad, wGw)`` for the next point."""
    lam_path, lam_max, dtype = run.lam_path, run.lam_max, run.dtype
    lam_i = lam_path[i, act]
    trivial = lam_i >= lam_max[act]
    if bool(trivial.any()):
        cand = trivial.nonzero().squeeze(1)
        trivial[cand] = (W[:, cand] == 0).all(0)
    if bool(trivial.all()):
        return W, W, grad, torch.zeros_like(wGw)
    lam_prev = (lam_path[i - 1, act] if i > 0 else lam_max[act]).to(dtype)
    s = None if not bool(trivial.any()) else (~trivial).nonzero().squeeze(1)
    cols = (lambda x: x) if s is None else (lambda x: x[:, s])
    pick = (lambda x: x) if s is None else (lambda x: x[s])
    if i < 2:
        W0 = cols(W)
    else:
        W0 = predict(cols(W), cols(W_old), cols(lam_path[i - 2:i + 1, act].to(dtype)))
    Wi, wg, g, e = solve_screened(
        run.op, cols(c_act), pick(lam_i.to(dtype)), pick(lam_prev), W0, cols(grad),
        nulldev=run.nulldev[pick(act)], var=run.var, tol=run.tol, max_iter=run.max_epochs,
        screen=run.screen, on_iter=run.on_epoch, curv=run.curv, ids=pick(act))
    run.epochs += e
    if s is None:
        return W, Wi, g, wg
    Wn = torch.zeros_like(W)
    Wn[:, s] = Wi
    grad[:, s] = g
    wn = torch.zeros_like(wGw)
    wn[s] = wg
    return W, Wn, grad, wn


def predict(W1: Tensor, W0: Tensor, lams: Tensor) -> Tensor:
    """The warm start at ``λ_2`` from the solutions ``W0`` at ``λ_0`` and ``W1`` at ``λ_1``
    ([p, Ta], ``lams`` [3, Ta]): the linear extrapolation ``W1 + (λ_2-λ_1)/(λ_1-λ_0) (W1 - W0)``,
    exact while the support and signs do not change (the lasso's path is then linear in λ), with
    the coordinates whose sign would change set to zero."""
    d0 = lams[1] - lams[0]
    r = torch.where(d0 != 0, (lams[2] - lams[1]) / torch.where(d0 != 0, d0, torch.ones_like(d0)),
                    torch.zeros_like(d0))
    Wp = torch.addcmul(W1, r.clamp(0, 4)[None, :], W1 - W0)  # λ decreasing: r > 0
    return Wp.masked_fill_(Wp * W1 <= 0, 0)
