"""The refit on train+val rows standardized with *their own* mean/std, from the training Gram.

``cfg.refit_standardization=train_val`` (the original's refit) standardizes the train+val rows with
the mean ``m'`` and std ``s'`` of those rows. Its Gram is formed on the fly, like
:class:`~datamodels_ml.solvers.screening.RefitGram`, from the standardized training Gram ``G_t``
(train mean ``m``, std ``s``) and the validation masks ``X_v`` (mean ``v``), with no second pass over
the data and no second ``p x p`` matrix. With ``a = n_t / N``, ``b = n_v / N``::

    C / N - m'm'ᵀ = a S G_t S + (X_v - v)ᵀ(X_v - v) / N + a b (m - v)(m - v)ᵀ
    G' = D (C / N - m'm'ᵀ) D = a diag(r) G_t diag(r) + Zcᵀ Zc / N + a b e eᵀ

with ``C`` the raw counts ``XᵀX`` of train+val, ``S = diag(s)``, ``D = diag(1/s')`` (0 for a feature
constant on train+val), ``r = s / s'``, ``Zc = (X_v - v) D`` (validation rows centred on their own
mean) and ``e = D (m - v)``: every term centred, so nothing cancels in float32. The linear term and
the null deviance come from the raw sums of both sources (:class:`TargetStats`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from datamodels_ml.solvers.blas import mm
from datamodels_ml.solvers.screening import copy_budget
from datamodels_ml.solvers.subgrams import subgram_batch
from datamodels_ml.solvers.stats import FeatureStats, TargetStats, moments

__all__ = ["TrainValGram", "train_val_problem"]

_ROWS = 1024  # rows of a block gathered at a time
_COLS = 4096  # features per chunk of the validation masks


class TrainValGram:
    """The standardized Gram of train+val rows with their own mean/std (see the module), as a
    Gram operator (``block``, ``batch_block``, ``apply``) never formed as a whole."""

    def __init__(self, stats: FeatureStats, dtype: torch.dtype, mean: Tensor, inv_std: Tensor):
        if stats.gram is None or stats.x_val is None:
            raise ValueError("these FeatureStats were built without the Gram (gram=False)")
        self.stats, self.dtype, self.n_features = stats, dtype, stats.n_features
        nt, nv = stats.n_train, stats.n_val
        self.N = nt + nv
        self.a, self.ab = nt / self.N, nt * nv / self.N**2
        dev = stats.gram.device
        v = stats.x_val.sum(0, dtype=torch.float64) / max(nv, 1)
        self.v = v.to(dev)
        self.inv = inv_std.to(device=dev, dtype=torch.float64)
        self.r = torch.where(stats.nonconst, stats.std * self.inv, torch.zeros_like(self.inv)).to(dtype)
        self.e = ((stats.mean - self.v) * self.inv).to(dtype)

    def zc(self, cols: Tensor | slice) -> Tensor:
        """``[n_val, |cols|]`` validation rows centred on their mean, scaled by ``1/s'``."""
        x = self.stats.x_val[:, cols].to(self.dtype)
        return (x - self.v[cols].to(self.dtype)) * self.inv[cols].to(self.dtype)

    def zc_rows(self, idx: Tensor) -> Tensor:
        """``[|idx|, n_val]`` the validation values of the features ``idx``, as :meth:`zc` (rows)."""
        return self.stats.val_rows(idx, self.dtype, mean=self.v, inv=self.inv)

    def _val_part(self, out: Tensor, zy: Tensor) -> None:
        for s in range(0, self.n_features, _COLS):
            out[s : s + _COLS].addmm_(self.zc(slice(s, s + _COLS)).T, zy, alpha=1.0 / self.N)

    def _product(self, y: Tensor) -> Tensor:
        """``G' y`` for a dense ``y`` [p, T]: ``p² T + 2 n_val p T`` flops."""
        st = self.stats
        out = mm(st.gram.to(self.dtype), y * self.r[:, None]).mul_(self.r[:, None] * self.a)
        zy = torch.zeros(st.n_val, y.shape[1], dtype=self.dtype, device=y.device)
        for s in range(0, self.n_features, _COLS):
            zy.addmm_(self.zc(slice(s, s + _COLS)), y[s : s + _COLS])
        self._val_part(out, zy)
        out.add_(self.e[:, None] * (self.e @ y)[None, :], alpha=self.ab)
        return out

    def apply(self, W: Tensor) -> Tensor:
        """``G' W`` from the non-zero rows of ``W`` only: ``|A| p T + n_val (|A| + p) T``."""
        st = self.stats
        A = (W != 0).any(1).nonzero().squeeze(1)
        out = torch.zeros(self.n_features, W.shape[1], dtype=self.dtype, device=W.device)
        WA = W[A] * self.r[A, None]
        for s in range(0, A.numel(), _ROWS):
            a = A[s : s + _ROWS]
            out += mm(st.gram.index_select(0, a).to(self.dtype).T, WA[s : s + _ROWS])
        out.mul_(self.r[:, None] * self.a)
        self._val_part(out, self.zc(A) @ W[A])
        out.add_(self.e[:, None] * (self.e[A] @ W[A])[None, :], alpha=self.ab)
        return out

    def block(self, idx: Tensor):
        """``G'[idx, idx]`` (a copy of ``|idx|²`` entries), or for all features of a large Gram its
        product (never the matrix), as ``RefitGram``."""
        if idx.numel() == self.n_features and idx.numel() ** 2 > copy_budget(self.n_features):
            return self._product
        st = self.stats
        zi = self.zc(idx)
        ri, ei = self.r[idx], self.e[idx]
        out = torch.empty(idx.numel(), idx.numel(), dtype=self.dtype, device=st.gram.device)
        for s in range(0, idx.numel(), _ROWS):
            rows = idx[s : s + _ROWS]
            blk = st.gram[rows[:, None], idx[None, :]].to(self.dtype)
            blk.mul_(ri[s : s + _ROWS, None] * ri[None, :] * self.a)
            blk.addmm_(zi[:, s : s + _ROWS].T, zi, alpha=1.0 / self.N)
            blk.add_(ei[s : s + _ROWS, None] * ei[None, :], alpha=self.ab)
            out[s : s + _ROWS] = blk
        return out

    def batch_block(self, idx: Tensor, valid: Tensor) -> Tensor:
        """``[B, m, m]`` sub-Grams, zero where ``valid`` [B, m] is False (valid entries first)."""
        return subgram_batch(self.stats.gram, idx, valid, self.zc_rows, n_val=self.stats.n_val, dtype=self.dtype,
                             scale=self.a, val_scale=1.0 / self.N, row_scale=self.r, rank1=self.e,
                             rank1_scale=self.ab)


def train_val_problem(stats: FeatureStats, train: TargetStats, val: TargetStats, *, fit_intercept: bool,
                      dtype: torch.dtype):
    """The lasso problem of train+val rows standardized with their own mean/std, from the sums
    of the two sources: ``(op, c [p, T] float64, nulldev [T], ybar [T], mean [p], std [p])``."""
    n = train.n + val.n
    both = TargetStats(n=n, sx=train.sx + val.sx, sxx=train.sxx + val.sxx, sxy=train.sxy + val.sxy,
                       sy=train.sy + val.sy, syy=train.syy + val.syy)
    mean, std, nonconst = moments(n, both.sx, both.sxx)
    inv = torch.where(nonconst, 1.0 / std, torch.zeros_like(std))
    c, nulldev = both.quad(mean, inv, fit_intercept)  # the rows' own mean: z̄ = 0, c = Z'y/n either way
    return TrainValGram(stats, dtype, mean, inv), c, nulldev, both.ybar, mean, std
