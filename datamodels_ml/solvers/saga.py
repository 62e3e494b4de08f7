"""Minibatch SAGA: the streaming method, for data whose Gram matrix does not fit.

State for all targets: weights ``W [p, T]``, bias ``b [T]``, the residual table ``R [n, T]``
(``R[i] = z_i·w + b - y_i`` at row i's last visit), the running average gradient ``A = Z'R / n``
and its bias part ``a``. Memory ``O(n T + p T)``; the data are read once per epoch through a
BatchSource. The step size follows Gazagnadou et al. (2019) for minibatches.

When some targets converge, only the live columns are copied out (the full ``n x T`` table is
never cloned), and the path driver frees the path's table before the refit allocates its own.

Convergence: the duality gap, relative to the null deviance, as for FISTA, but from what the
table already holds (no extra pass): the average gradient ``A`` and the residuals' mean square
and mean (see :func:`table_gap`). A relative change of ``w`` over one epoch alone, the rule
before, never got below its tolerance at 10^5 models in float32 (the rounding of an epoch's
thousands of steps), so it only serves as the stall test.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from datamodels_ml.solvers.sources import BatchSource

__all__ = ["Saga", "saga_lr", "val_mse", "table_gap"]


class Saga:
    """Minibatch SAGA state for all targets: weights W [p,T], bias b [T], residual table R [n,T]
    (``R[i] = z_i·w + b - y_i`` at row i's last visit), running average gradient A = Z'R/n [p,T],
    and its bias part a [T]."""

    def __init__(self, source, mean, std, W, b, *, fit_intercept, lr, dtype, device):
        self.source, self.mean, self.std = source, mean, std
        self.fit_intercept, self.lr, self.dtype, self.device = fit_intercept, lr, dtype, device
        self.n = source.n_rows
        self.W, self.b = W.clone(), b.clone()
        T = W.shape[1]
        self.R = torch.zeros(self.n, T, dtype=dtype, device=device)
        self.A = torch.zeros_like(self.W)
        self.a = torch.zeros_like(self.b)

    def _z(self, xb: Tensor) -> Tensor:
        return (xb.to(device=self.device, dtype=self.dtype) - self.mean) / self.std

    def fill(self) -> tuple[float, float]:
        """One pass computing R and A exactly at the current W, b. Returns (max ||z_i||^2, an upper
        estimate of the largest eigenvalue of Z'Z/n from a subsample)."""
        self.A.zero_()
        self.a.zero_()
        row_max = torch.zeros((), dtype=self.dtype, device=self.device)
        keep, kept = [], 0
        budget = max(2 * self.source.n_features, 2048)
        for xb, yb, rows in self.source:
            z = self._z(xb)
            rows = rows.to(self.device)
            r = z @ self.W + self.b - yb.to(device=self.device, dtype=self.dtype).reshape(z.shape[0], -1)
            self.R[rows] = r
            self.A += z.T @ r
            self.a += r.sum(0)
            row_max = torch.maximum(row_max, (z * z).sum(1).max())
            if kept < budget and kept * z.shape[1] < 2**26:
                keep.append(z)
                kept += z.shape[0]
        self.A /= self.n
        self.a /= self.n
        Zs = torch.cat(keep)
        v = torch.randn(Zs.shape[1], generator=torch.Generator().manual_seed(0)).to(self.device, self.dtype)
        ev = 0.0
        for _ in range(30):
            u = Zs.T @ (Zs @ v)
            ev = float(u.norm()) / max(float(v.norm()), 1e-30)
            v = u / max(float(u.norm()), 1e-30)
        return float(row_max), ev / Zs.shape[0]

    def run(
        self,
        idx: Tensor,
        lam: Tensor,
        *,
        nulldev: Tensor,
        ybar: Tensor,
        var: Tensor,
        tol: float,
        max_epochs: int,
        check_every: int,
        absolute: bool = False,
        stall: float | None = None,
        on_epoch: Callable[[int, int], None] | None = None,
    ) -> int:
        """SAGA epochs on targets ``idx`` (λ ``lam`` [Ta], target means ``ybar`` [Ta]) until each
        converged: its table's duality gap (:func:`table_gap`) below ``tol * nulldev`` and its
        weights' relative change over the last epoch below ``tol`` too (the table mixes the
        epoch's iterates), or that change below ``stall`` (the rounding floor; default: 5e-11 in
        float32, scaled by the squared machine epsilon for other dtypes). ``absolute``: fast_l1's
        test instead, that change (not divided by ``nulldev``) below ``tol``. Returns epochs."""
        if stall is None:
            stall = 5e-11 * (torch.finfo(self.dtype).eps / torch.finfo(torch.float32).eps) ** 2
        full = idx.numel() == self.W.shape[1]
        live = idx
        n, lr = self.n, self.lr

        def gather(cols):
            if cols.numel() == self.W.shape[1]:
                return self.W, self.b, self.R, self.A, self.a
            # advanced indexing copies the selected columns (no second copy)
            return self.W[:, cols], self.b[cols], self.R[:, cols], self.A[:, cols], self.a[cols]

        def scatter(cols, W, b, R, A, a):
            if cols.numel() == self.W.shape[1]:
                return
            self.W[:, cols], self.b[cols], self.R[:, cols], self.A[:, cols], self.a[cols] = W, b, R, A, a

        W, b, R, A, a = gather(live)
        thr = lr * lam
        nd, lams, ybs = nulldev, lam, ybar
        epoch = 0
        while live.numel() > 0 and epoch < max_epochs:
            epoch += 1
            check = epoch % check_every == 0 or epoch == max_epochs
            if check:
                W_prev, b_prev = W.clone(), b.clone()
            for xb, yb, rows in self.source:
                z = self._z(xb)
                rows = rows.to(self.device)
                yb = yb.to(device=self.device, dtype=self.dtype).reshape(z.shape[0], -1)
                if not full or live.numel() != self.W.shape[1]:
                    yb = yb[:, live]
                r = torch.addmm(b - yb, z, W)
                diff = r - R[rows]
                R[rows] = r
                g = z.T @ diff
                W.add_(g, alpha=-lr / z.shape[0]).add_(A, alpha=-lr)
                W.sub_(torch.clamp(W, min=-thr, max=thr))  # soft-threshold in place
                A.add_(g, alpha=1.0 / n)
                if self.fit_intercept:
                    ds = diff.sum(0)
                    b.add_(ds / z.shape[0] + a, alpha=-lr)
                    a.add_(ds, alpha=1.0 / n)
            if on_epoch is not None:
                on_epoch(epoch, live.numel())
            if check:
                dW = W - W_prev
                crit = torch.maximum((dW * dW * var[:, None]).amax(0), (b - b_prev) ** 2)
                if absolute:
                    done = crit < tol
                else:
                    crit = crit / nd
                    gap = table_gap(W, b, R, A, a, lams, ybs, var, fit_intercept=self.fit_intercept)
                    done = ((gap < tol * nd) & (crit < tol)) | (crit < stall)
                if bool(done.any()):
                    # the full state is updated in place: only a subset needs writing back (no
                    # copy of the n x T table; the subsetting below copies the live columns only)
                    scatter(live, W, b, R, A, a)
                    keep = ~done
                    live = live[keep]
                    W, b, R, A, a = W[:, keep], b[keep], R[:, keep], A[:, keep], a[keep]
                    thr, nd, lams, ybs = thr[keep], nd[keep], lams[keep], ybs[keep]
        if live.numel() > 0:
            scatter(live, W, b, R, A, a)
        return epoch

    def train_mse(self) -> Tensor:
        return (self.R * self.R).mean(0)


def table_gap(W: Tensor, b: Tensor, R: Tensor, A: Tensor, a: Tensor, lam: Tensor, ybar: Tensor, var: Tensor, *,
              fit_intercept: bool) -> Tensor:
    """The duality gap ``[T]`` of each target's lasso from SAGA's table (residuals ``R`` [n, T]
    as prediction minus target, ``A = Z'R/n``, ``a`` their mean), exact when the table is current.

    With ``r = -R`` the residual, ``ρ`` its variance (mean square without an intercept) and the
    dual point scaled by ``s = min(1, λ / max_j |A_j|)``::

        gap = ½ (1 - s)² ρ + Σ_j (λ |w_j| + s w_j A_j) + s a (b - ȳ - a)      (the last term with
                                                                               an intercept only)

    the terms grouped so that nothing of the size of ``ρ`` cancels (see ``fista.duality_gap``).
    """
    Am = A * (var[:, None] > 0)
    gmax = Am.abs().amax(0) if Am.shape[0] else torch.zeros_like(lam)
    s = torch.where(gmax > lam, lam / gmax.clamp_min(1e-30), torch.ones_like(gmax))
    rho = (R * R).mean(0)
    terms = (W.abs() * lam).add_(W * Am * s).sum(0)
    if fit_intercept:
        rho = rho - a * a
        terms = terms + s * a * (b - ybar - a)
    return 0.5 * (1 - s) ** 2 * rho.clamp_min(0) + terms


def val_mse(source: BatchSource, W: Tensor, b: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    sse = torch.zeros(W.shape[1], dtype=torch.float64, device=W.device)
    n = 0
    for xb, yb, _ in source:
        z = (xb.to(device=W.device, dtype=W.dtype) - mean) / std
        r = torch.addmm(b, z, W) - yb.to(device=W.device, dtype=W.dtype).reshape(z.shape[0], -1)
        sse += (r * r).sum(0, dtype=torch.float64)
        n += z.shape[0]
    return sse / max(n, 1)


def saga_lr(source: BatchSource, Lmax: float, L: float, fit_intercept: bool, default_b: int) -> float:
    n = source.n_rows
    b = int(getattr(source, "batch_size", default_b) or default_b)
    b = max(1, min(b, n))
    extra = 1.0 if fit_intercept else 0.0
    Lmax, L = Lmax + extra, L + extra
    if n == 1:
        Lb = Lmax
    else:
        Lb = (n - b) / (b * (n - 1)) * Lmax + n * (b - 1) / (b * (n - 1)) * L
    return 1.0 / (2.0 * max(Lb, 1e-12))
