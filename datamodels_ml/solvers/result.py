"""The result of a lasso path: :class:`LassoPath` (weights, selection, the per-λ curves)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["LassoPath"]


@dataclass
class LassoPath:
    """Result of :func:`lasso_path` (k = path length, p = features, T = targets).

    Attributes:
        weight: ``[p, T]`` coefficients on the standardized scale at each target's selected λ
            (after the refit if ``refit=True``).
        bias: ``[T]`` intercepts (zeros if not ``fit_intercept``).
        lam: ``[T]`` selected λ per target.
        lam_path: ``[k, T]`` the λ grid.
        best_index: ``[T]`` int64 index into the path of the selected λ (argmin of ``val_mse``).
        val_mse: ``[k, T]`` validation MSE; NaN where the target had already stopped.
        train_mse: ``[k, T]`` training MSE; NaN likewise. (saga: from the SAGA residual table,
            i.e. each row's residual at its last visit - exact at convergence.)
        nnz: ``[k, T]`` number of non-zero coefficients (float); NaN likewise.
        active: ``[k]`` fraction of targets still on the path at each λ index.
        mean, std: ``[p]`` standardization statistics (training rows; train+val rows after a refit
            with ``refit_standardization="train_val"``).
        epochs: saga: total passes over the data by the solver (path + refit, excluding the
            set-up passes); fista: total iterations (over all working sets).
        phi: ``[T]`` the relaxed lasso's blend of each target (``relax``/``phi``; zeros without).
        relax_val_mse: ``[k, T]`` validation MSE of the best blend at each λ (``relax``; else
            ``val_mse``): ``best_index`` is its argmin.
    """

    weight: Tensor
    bias: Tensor
    lam: Tensor
    lam_path: Tensor
    best_index: Tensor
    val_mse: Tensor
    train_mse: Tensor
    nnz: Tensor
    active: Tensor
    mean: Tensor
    std: Tensor
    epochs: int
    phi: Tensor | None = None
    relax_val_mse: Tensor | None = None

    def predict(self, X: Tensor) -> Tensor:
        """``((X - mean) / std) @ weight + bias`` for raw masks ``X`` ``[n, p]`` -> ``[n, T]``."""
        w = self.weight
        Z = (X.to(device=w.device, dtype=w.dtype) - self.mean.to(w)) / self.std.to(w)
        return Z @ w + self.bias
