"""The path driver: one lasso per target along a λ path, selection on validation rows, refit.

For each target (the columns of the sources' ``y``: one block of targets) it builds the grid from
the analytic λ_max, walks it with warm starts (screened FISTA on the Gram, or SAGA streaming),
stops a target once its validation MSE turns up, selects λ by validation MSE and optionally refits
at that λ on train+val rows. Sufficient statistics of the masks (:class:`FeatureStats`) can be
computed once by the caller and shared by all target blocks.

Objective for target ``t`` (scikit-learn's convention)::

    (1 / (2 n)) * ||y_t - Z w_t - b_t||^2 + lam_t * ||w_t||_1,      Z = (X - mean) / std

with ``mean``/``std`` the per-feature statistics of the *training* rows (population std; a
constant column gets ``std = 1`` and stays identically zero). ``b_t`` is an unpenalized intercept
when ``fit_intercept`` (then ``b_t = mean(y_t)`` on the training rows), else ``0``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from datamodels_ml.solvers.fista import TOL
from datamodels_ml.solvers.grid import GRIDS, check_k_eps, path_grid
from datamodels_ml.solvers.refit import refit_fista, refit_saga
from datamodels_ml.solvers.result import LassoPath
from datamodels_ml.solvers.relax import blend, choose_phi, support_ls
from datamodels_ml.solvers.saga import Saga, saga_lr, val_mse
from datamodels_ml.solvers.point import fista_point
from datamodels_ml.solvers.screening import TrainGram
from datamodels_ml.solvers.sources import BatchSource, as_source
from datamodels_ml.solvers.supports import column_counts
from datamodels_ml.solvers.validation import ValRows
from datamodels_ml.solvers.stats import FeatureStats, feature_stats, moments, target_stats

__all__ = ["LassoPath", "lasso_path", "METHODS"]

Callback = Callable[[str, dict], None]
METHODS = ("saga", "fista")
TOL_MODES = ("relative", "absolute")


def lasso_path(
    train: BatchSource | tuple[Tensor, Tensor],
    val: BatchSource | tuple[Tensor, Tensor],
    *,
    k: int = 100,
    eps: float = 1e-6,
    method: str = "fista",
    fit_intercept: bool = True,
    batch_size: int | None = None,
    lr: float | None = None,
    max_epochs: int | None = None,
    check_every: int = 3,
    tol: float | None = None,
    min_lambdas: int = 5,
    refit: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    callback: Callback | None = None,
    lambdas: Tensor | None = None,
    stats: FeatureStats | None = None,
    screen: bool = True,
    grid: str = "datamodels_ml",
    tol_mode: str = "relative",
    relax: tuple[float, ...] | list[float] = (),
    phi: Tensor | None = None,
    support: Tensor | None = None,
    refit_standardization: str = "train",
) -> LassoPath:
    """Fit one lasso per target along a regularization path and select λ per target on ``val``.

    Args:
        train, val: BatchSources, or tuples ``(X [n, p], Y [n, T])`` (wrapped in
            :class:`TensorBatches`; train shuffled with ``batch_size``, val not shuffled). Their
            ``y`` are the targets of this call (one target block).
        k: path length. The grid is ``lambda_grid(lambda_max(train), k=k, eps=eps)`` ([k, T]).
        eps: smallest λ as a fraction of λ_max, in (0, 1].
        method: ``"fista"`` (default: FISTA on the ``p x p`` Gram matrix with screening; memory
            ``4 p²`` bytes for a float32 Gram, ``n_val p`` for the validation masks, at most
            ``0.5 p²`` bytes of working sub-Grams, O(batch p + (n_val + p) T)) or ``"saga"``
            (streaming minibatch SAGA, memory O(n_train·T + p·T), for data whose Gram does not
            fit).
        fit_intercept: fit an unpenalized intercept per target.
        batch_size: rows per batch when ``train``/``val`` are tuples (saga default 128; fista uses
            4096 for its statistics passes).
        lr: SAGA step size. Default ``1 / (2 L_b)`` with the minibatch smoothness constant
            ``L_b = (n-b)/(b(n-1)) L_max + n(b-1)/(b(n-1)) L`` (Gazagnadou et al. 2019).
            FISTA's steps are ``1 / L`` with ``L`` each target's curvature, checked at every step
            and grown when a step fails (see :func:`~datamodels_ml.solvers.fista.fista`).
        max_epochs: cap per λ index (and for the refit): saga epochs (default 200), fista
            iterations per working set (default 5000).
        check_every: convergence test period in saga epochs (fista tests every iteration).
        tol: convergence tolerance (default ``1e-6``): each path point is solved until its duality
            gap, relative to the target's null deviance per row ``D_t``, is below ``tol`` (the
            objective is within ``tol * D_t`` of its minimum). fista computes the gap from the
            product it makes anyway (:func:`~datamodels_ml.solvers.fista.fista`); saga from its
            table (:func:`~datamodels_ml.solvers.saga.table_gap`), and also requires the relative
            change of the weights over the last epoch, ``max_j var(z_j) (Δw_jt)² / D_t``, below
            ``tol``. Either method also stops a target whose iterates stall at the float rounding
            floor.
        min_lambdas: early stopping is only considered from λ index ``min_lambdas`` on: a target
            stops (and its later path entries are NaN) as soon as its validation MSE exceeds the
            best one seen so far.
        refit: after selection, re-solve each target at its selected λ on train+val (rows of both,
            standardization unchanged: train mean/std), warm-started from the selected weights.
        device: where the state lives (default: device of the train tensors, else CPU).
        dtype: working float type.
        callback: ``callback(event, info)``: ``"start"`` once the targets' statistics are read
            and the path begins (``{"n_targets", "n_lambdas"}``), ``"epoch"`` after every saga
            epoch / fista iteration (``{"epoch", "lambda_index", "n_active"}``; ``lambda_index``
            is -1 during the refit),
            ``"lambda"`` after each λ index (``{"index", "lam_ratio", "val_mse", "train_mse",
            "nnz", "active"}``; means over the targets computed at that index), and ``"refit"``
            when the refit starts (``{"n_rows", "n_targets"}``).
        lambdas: optional explicit grid ``[k, T]`` (or ``[k]`` for all targets), decreasing;
            overrides ``k``/``eps``.
        stats: :func:`feature_stats` of ``train``/``val`` computed once for all target blocks
            (None: computed here). Must come from the same rows in the same order.
        screen: fista: sequential strong rules with a KKT check (False: every feature, every
            iteration; the same solution, slower).
        grid: ``"datamodels_ml"`` (``lambda_grid``) or ``"fast_l1"`` (the original's,
            :func:`fast_l1_grid`: k + 1 points, the last λ = 0); ignored with ``lambdas``.
        tol_mode: ``"relative"`` (``tol`` as above) or ``"absolute"`` (saga only), fast_l1's
            test: ``max_j std_j² (Δw_jt)² < tol`` over an epoch (``std_j`` of the raw masks; the
            bias too), with no duality gap.
        relax: fista: the relaxed lasso's grid of ``φ`` in [0, 1] (e.g.
            :data:`~datamodels_ml.solvers.relax.PHIS`; empty: the lasso). At each λ each target's
            weights are blended with least squares on their support,
            ``(1 - φ) w + φ w_LS`` (:mod:`~datamodels_ml.solvers.relax`), and ``(λ, φ)`` is selected
            on ``val`` by the blend's MSE; the path itself (and when a target leaves it) is the
            lasso's. The refit solves the lasso at the selected λ on train+val and blends it, with
            the selected ``φ``, with least squares on train+val on the *selected* support (the one
            validated; the refit's own may lose a feature that only just enters at λ).
        phi: fista: ``[T]`` a fixed blend per target, applied to the final weights (for a second
            call that refits on other rows); not with ``relax``.
        support: with ``phi``: ``[p, T]`` bool, the features of the least-squares part (default:
            the support of the final lasso weights).
        refit_standardization: fista: ``"train"`` (the refit keeps the train mean/std) or
            ``"train_val"`` (the original's: train+val rows standardized with their own mean/std,
            returned as ``mean``/``std``; the Gram formed from the training one,
            :mod:`~datamodels_ml.solvers.restandardize`).

    Returns:
        :class:`LassoPath`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if grid not in GRIDS or tol_mode not in TOL_MODES:
        raise ValueError(f"grid must be one of {GRIDS} and tol_mode one of {TOL_MODES}, got {grid!r}, {tol_mode!r}")
    if tol_mode == "absolute" and method != "saga":
        raise ValueError("tol_mode='absolute' (fast_l1's test on the change over an epoch) is for method='saga'")
    relax = tuple(float(f) for f in relax)
    if (relax or phi is not None) and method != "fista":
        raise ValueError("relax/phi (the relaxed lasso) need the Gram: method='fista'")
    if relax and phi is not None:
        raise ValueError("give relax (a grid of φ to select from) or phi (fixed), not both")
    if any(not 0 <= f <= 1 for f in relax):
        raise ValueError(f"relax: every φ must be in [0, 1], got {relax}")
    if refit_standardization not in ("train", "train_val"):
        raise ValueError(f"refit_standardization must be 'train' or 'train_val', got {refit_standardization!r}")
    if refit_standardization == "train_val" and method != "fista":
        raise ValueError("refit_standardization='train_val' in lasso_path is for method='fista' (saga: refit with a "
                         "second call on the train+val source)")
    if lambdas is None:
        check_k_eps(k, eps)
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        device = train[0].device if isinstance(train, (tuple, list)) and isinstance(train[0], Tensor) else "cpu"
    device = torch.device(device)
    bs = batch_size or (128 if method == "saga" else 4096)
    train = as_source(train, "train", bs, shuffle=True, seed=0)
    val = as_source(val, "val", batch_size or 4096, shuffle=False)
    if train.n_features != val.n_features:
        raise ValueError(f"train and val have different n_features: {train.n_features} != {val.n_features}")
    if train.n_targets != val.n_targets:
        raise ValueError(f"train and val have different n_targets: {train.n_targets} != {val.n_targets}")
    if max_epochs is None:
        max_epochs = 200 if method == "saga" else 5000
    if tol is None:
        tol = TOL
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    if stats is None and method == "fista":
        stats = feature_stats(train, val, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    elif stats is not None and (stats.n_features != train.n_features or stats.n_train != train.n_rows
                                or stats.n_val != val.n_rows):
        raise ValueError(f"stats (n_train={stats.n_train}, n_val={stats.n_val}, p={stats.n_features}) do not "
                         f"match the sources (n_train={train.n_rows}, n_val={val.n_rows}, p={train.n_features})")
    run = _Run(train, val, stats, k=k, eps=eps, method=method, fit_intercept=fit_intercept, bs=bs, lr=lr,
               max_epochs=max_epochs, check_every=check_every, tol=tol, min_lambdas=min_lambdas,
               device=device, dtype=dtype, callback=callback, lambdas=lambdas, screen=screen, grid=grid,
               tol_mode=tol_mode, relax=relax, phi=phi, support=support,
               restandardize=refit_standardization == "train_val")
    return run.path(refit)


class _Run:
    """The state of one lasso_path call (one target block)."""

    def __init__(self, train, val, stats: FeatureStats, *, k, eps, method, fit_intercept, bs, lr, max_epochs,
                 check_every, tol, min_lambdas, device, dtype, callback, lambdas, screen, grid="datamodels_ml",
                 tol_mode="relative", relax=(), phi=None, support=None, restandardize=False):
        self.train, self.val = train, val
        self.method, self.fit_intercept, self.bs, self.lr = method, fit_intercept, bs, lr
        self.max_epochs, self.check_every, self.tol, self.min_lambdas = max_epochs, check_every, tol, min_lambdas
        self.device, self.dtype, self.callback, self.screen = device, dtype, callback, screen
        self.T = train.n_targets
        self.restandardize = restandardize  # the refit's standardization: train+val's own (fista)
        self.out_mean = self.out_std = None  # set by a restandardized refit
        self.relax = relax
        self.phi = None if phi is None else phi.to(device=device, dtype=torch.float64).expand(train.n_targets)
        self.support = None if support is None else support.to(device)
        self.ts = target_stats(train, device=device, dtype=dtype)
        if stats is None:  # streaming method: the moments come from the same pass
            mean, std, nonconst = moments(self.ts.n, self.ts.sx, self.ts.sxx)
            stats = FeatureStats(n_train=self.ts.n, n_val=val.n_rows, mean=mean, std=std, nonconst=nonconst,
                                 gram=None, x_val=None, binary=False)
        self.stats = stats
        self.inv = stats.inv_std.to(device)
        self.mean64 = stats.mean.to(device)
        c64, nd = self.ts.quad(self.mean64, self.inv, fit_intercept)  # [p, T] float64: dropped after set-up
        self.lam_max = c64.abs().amax(0)
        self.lam_path = path_grid(lambdas, c64, stats.std.to(device), k=k, eps=eps, grid=grid)
        self.nulldev = nd.clamp_min(1e-30).to(dtype)
        self.var = stats.nonconst.to(device=device, dtype=dtype)  # 1, or 0 for constant features
        self.ybar = self.ts.ybar.to(dtype)
        self.absolute = tol_mode == "absolute"
        if self.absolute:  # fast_l1's test: max_j std_j² Δw_j² < tol, no division by the target's variance
            self.var = self.var * stats.std.to(device=device, dtype=dtype) ** 2
        self.bias0 = self.ts.ybar.to(dtype) if fit_intercept else torch.zeros(self.T, dtype=dtype, device=device)
        self.cur_l = 0
        self.epochs = 0
        # each target's FISTA curvature estimate, carried along the path (1: the Gram's diagonal)
        self.curv = torch.ones(self.T, dtype=dtype, device=device)
        if method == "fista":
            self.vs = target_stats(val, keep_y=True, device=device, dtype=dtype)
            self.Yv = self.vs.Y.to(dtype)
            self.op = TrainGram(stats, dtype)
            self.c = c64.to(dtype)
            self.val_rows = ValRows(stats, self.Yv, dtype)

    def on_epoch(self, e: int, n_active: int) -> None:
        if self.callback is not None:
            self.callback("epoch", {"epoch": e, "lambda_index": self.cur_l, "n_active": n_active})

    # -- fista pieces --------------------------------------------------------------------------
    def _relax(self, op, c: Tensor, W: Tensor, n_rows: int, phi: Tensor | None = None,
               b: Tensor | None = None, idx: Tensor | None = None, support: Tensor | None = None):
        """The relaxed lasso of the weights ``W`` [p, Ta] fitted with ``op``/``c`` on ``n_rows``
        (least squares on ``support``, default ``W``'s): with ``phi`` [Ta], the blended weights;
        else (on the path, intercepts ``b``, global targets ``idx``) ``(validation MSE [Ta],
        φ [Ta], blended weights)`` of the best φ of the grid."""
        W_ls, _ = support_ls(op, c, W, n_rows=n_rows, fit_intercept=self.fit_intercept, support=support)
        if phi is not None:
            return blend(W, W_ls, phi)
        mse, f = choose_phi(self.val_rows.predict(W, b), self.val_rows.predict(W_ls, b), self.Yv[:, idx], self.relax)
        return mse, f, blend(W, W_ls, f)

    def path(self, refit: bool) -> LassoPath:
        T, dtype, device = self.T, self.dtype, self.device
        lam_path, lam_max = self.lam_path, self.lam_max
        k = lam_path.shape[0]
        if self.callback is not None:
            self.callback("start", {"n_targets": T, "n_lambdas": k})
        lam_w = lam_path.to(dtype)
        fista = self.method == "fista"
        p = self.stats.n_features
        if fista:
            # the on-path targets' state, compact (one column per target still on the path, removed
            # when it stops): this point's and the previous point's solutions, the gradient c - G W,
            # the linear term and w'Gw; no [p, T] column gathers while every target is on the path
            act = torch.arange(T, device=device)
            W = torch.zeros(p, T, dtype=dtype, device=device)
            W_old = W
            grad = self.c.clone()  # c - G W at W = 0
            c_act = self.c
            wGw = torch.zeros(T, dtype=dtype, device=device)
            yy = (self.nulldev if self.fit_intercept else self.ts.yy.to(dtype))
            best_at = torch.full((T,), -1, dtype=torch.long, device=device)  # each target's best point
        else:
            W = torch.zeros(p, T, dtype=dtype, device=device)
            std_int = torch.where(self.stats.nonconst, self.stats.std, torch.full_like(self.stats.std, math.inf))
            self.std_int = std_int.to(device=device, dtype=dtype)
            saga = Saga(self.train, self.mean64.to(dtype), self.std_int, W, self.bias0,
                        fit_intercept=self.fit_intercept, lr=1.0, dtype=dtype, device=device)
            Lmax, Lest = saga.fill()
            saga.lr = self.lr if self.lr is not None else saga_lr(self.train, Lmax, Lest, self.fit_intercept, self.bs)
        nan = float("nan")
        val_mse_t = torch.full((k, T), nan, dtype=torch.float64, device=device)
        train_mse = torch.full_like(val_mse_t, nan)
        nnz = torch.full_like(val_mse_t, nan)
        active_frac = torch.zeros(k, dtype=torch.float64, device=device)
        on_path = torch.ones(T, dtype=torch.bool, device=device)
        best_mse = torch.full((T,), math.inf, dtype=torch.float64, device=device)
        W_best = torch.zeros(p, T, dtype=dtype, device=device)
        b_best = self.bias0.clone()
        if self.relax:  # the selection's own record: the best blend at each λ
            relax_mse = torch.full_like(val_mse_t, nan)
            best_rel = torch.full_like(best_mse, math.inf)
            phi_best = torch.zeros(T, dtype=torch.float64, device=device)
            W_rel = torch.zeros_like(W_best)

        last = -1
        for i in range(k):
            idx = act if fista else on_path.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            self.cur_l = last = i
            active_frac[i] = idx.numel() / T
            if fista:
                W_old, W, grad, wGw = fista_point(self, i, act, W, W_old, grad, c_act, wGw)
                b = self.bias0[act]
                Wi = W
                tm = (yy[act] - 2 * (c_act * W).sum(0) + wGw).clamp_min(0).to(torch.float64)
                vm = self.val_rows.mse(W, b, act)
            else:
                # at λ >= λ_max the solution is exactly zero: skip the solver while the state is
                # still at zero (so that its table stays consistent)
                trivial = (lam_path[i, idx] >= lam_max[idx]) & (saga.W[:, idx] == 0).all(0)
                solve_idx = idx[~trivial]
                if solve_idx.numel() > 0:
                    self.epochs += saga.run(solve_idx, lam_w[i, solve_idx], nulldev=self.nulldev[solve_idx],
                                            ybar=self.ybar[solve_idx], var=self.var, tol=self.tol,
                                            absolute=self.absolute, max_epochs=self.max_epochs,
                                            check_every=self.check_every, on_epoch=self.on_epoch)
                W, b = saga.W, saga.b
                Wi = W[:, idx]
                b = b[idx]
                tm = saga.train_mse()[idx].to(torch.float64)
                vm = val_mse(self.val, W, saga.b, self.mean64.to(dtype), self.std_int)[idx]
            val_mse_t[i, idx] = vm
            train_mse[i, idx] = tm
            nnz[i, idx] = column_counts(Wi != 0).to(torch.float64)
            better = vm < best_mse[idx]
            best_mse[idx[better]] = vm[better]
            sel = better  # the targets whose selection criterion improved here
            if self.relax:  # (λ, φ) selected by the blend's MSE; the path's stopping stays the lasso's
                rm, rf, Wr = self._relax(self.op, c_act if fista else self.c[:, idx], Wi, self.stats.n_train, b=b,
                                         idx=idx)
                relax_mse[i, idx] = rm
                rb = rm < best_rel[idx]
                best_rel[idx[rb]], phi_best[idx[rb]], W_rel[:, idx[rb]] = rm[rb], rf[rb], Wr[:, rb]
                sel = rb
            bi = idx[sel]
            if fista:  # the best weights are copied when a target stops improving, from the last point
                turned = ~sel & (best_at[act] == i - 1)
                if bool(turned.any()):
                    W_best[:, act[turned]] = W_old[:, turned]
                best_at[bi] = i
            else:
                W_best[:, bi] = W[:, bi]
            b_best[bi] = b[sel]
            stop = torch.zeros_like(better)
            if i >= self.min_lambdas:
                stop = ~better & (vm > best_mse[idx])
                on_path[idx[stop]] = False
            if self.callback is not None:
                self.callback("lambda", {
                    "index": i,
                    "lam_ratio": float((lam_path[i, idx] / lam_max[idx].clamp_min(1e-300)).mean()),
                    "val_mse": float(vm.mean()), "train_mse": float(tm.mean()),
                    "nnz": float(nnz[i, idx].mean()), "active": float(active_frac[i]),
                })
            if fista and bool(stop.any()):  # the stopped targets leave the compact state
                keep = ~stop
                act, W, W_old, grad, wGw = act[keep], W[:, keep], W_old[:, keep], grad[:, keep], wGw[keep]
                c_act = self.c[:, act]
        if fista:  # the targets whose best point is the last one they reached
            tail = act[best_at[act] == last] if last >= 0 else act[:0]
            if tail.numel():
                W_best[:, tail] = W[:, best_at[act] == last]

        sel_mse = relax_mse if self.relax else val_mse_t
        best_index = torch.where(torch.isnan(sel_mse), torch.inf, sel_mse).argmin(0)
        lam_sel = lam_path.gather(0, best_index[None]).squeeze(0)
        weight, bias = W_best, b_best
        if self.relax:
            self.phi, weight, self.support = phi_best, W_rel, W_best != 0
        elif self.phi is not None and fista:
            weight = self._relax(self.op, self.c, W_best, self.stats.n_train, phi=self.phi, support=self.support)
        if refit:
            if self.callback is not None:
                self.callback("refit", {"n_rows": self.train.n_rows + self.val.n_rows, "n_targets": T})
            self.cur_l = -1
            if fista:
                del W, W_old, grad, c_act
                weight, bias = refit_fista(self, W_best, lam_sel.to(dtype), self.phi, self.support)
            else:
                del saga, W  # the path's n x T table goes before the refit allocates its own
                weight, bias = refit_saga(self, W_best, b_best, lam_sel.to(dtype))
        if not self.fit_intercept:
            bias = torch.zeros_like(bias)
        return LassoPath(weight=weight, bias=bias, lam=lam_sel, lam_path=lam_path, best_index=best_index,
                         val_mse=val_mse_t, train_mse=train_mse, nnz=nnz, active=active_frac,
                         mean=(self.stats.mean if self.out_mean is None else self.out_mean).to(device=device, dtype=dtype),
                         std=(self.stats.std if self.out_std is None else self.out_std).to(device=device, dtype=dtype),
                         epochs=int(self.epochs),
                         phi=(self.phi if self.phi is not None else torch.zeros(T, dtype=torch.float64, device=device)),
                         relax_val_mse=sel_mse)
