"""Predictions on the validation rows, the path's selection criterion (fista).

The standardized validation masks ``Z_val`` are kept converted (float, transposed to
``[p, n_val]``, whose rows a sparse product reads) while they take at most ``CACHE`` bytes, else
kept as transposed raw masks (one byte per entry when binary) and converted per call, ``_CHUNK``
features at a time, on the features in use only. A product picks the cheapest form for the weights
at hand (``blas.mm_rows``): sparse (CSR) while they are sparse enough, the whole ``Z_val`` when
most features are non-zero, else the gathered rows of the non-zero features. (At p = 50k with
2000 validation models and 2000 targets of ~100 non-zeros each, the non-zero features cover
almost every feature: a dense product over them is 3.7e11 flops per path point, the sparse one
5e8.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from datamodels_ml.solvers.blas import mm_iter, mm_rows
from datamodels_ml.solvers.stats import FeatureStats

__all__ = ["ValRows", "CACHE"]

CACHE = 256 * 2**20  # bytes: the standardized validation masks are kept converted up to this size
_CHUNK = 4096  # features converted at a time when they are not kept converted


class ValRows:
    """The validation rows of ``stats`` (masks) and their outputs ``Y`` ``[n_val, T]``, in ``dtype``."""

    def __init__(self, stats: FeatureStats, Y: Tensor, dtype: torch.dtype):
        self.stats, self.Y, self.dtype = stats, Y, dtype
        nbytes = stats.n_val * stats.n_features * torch.finfo(dtype).bits // 8
        keep = stats.x_val is not None and nbytes <= CACHE
        self.zT = stats.z_val(None, dtype).T.contiguous() if keep else None  # [p, n_val]
        # else the raw masks, transposed: the rows of the features in use are read per call
        self.xT = stats.x_val_t if not keep and stats.x_val is not None else None  # shared with the refit

    def predict(self, W: Tensor, b: Tensor) -> Tensor:
        """Predictions ``[n_val, Ta]`` of the weights ``W`` [p, Ta] and intercepts ``b`` [Ta]."""
        pred = b.expand(self.Y.shape[0], -1).clone()
        if self.zT is not None:  # sparse, whole or gathered rows (blas.mm_rows), gathered at once:
            # they are at most the cached matrix
            return pred.add_(mm_rows(self.zT, W, rows=self.zT.shape[0]))
        A = (W != 0).any(1).nonzero().squeeze(1)
        if A.numel() == 0:
            return pred
        if self.xT is None:
            return pred.add_(mm_iter(self.stats.z_val(A, self.dtype), W[A]))
        mean, inv = self.stats.mean, self.stats.inv_std
        for s in range(0, A.numel(), _CHUNK):
            a = A[s : s + _CHUNK]
            z = (self.xT[a].to(self.dtype) - mean[a, None].to(self.dtype)) * inv[a, None].to(self.dtype)
            pred.add_(mm_rows(z, W[a], rows=a.numel()))
        return pred

    def mse(self, W: Tensor, b: Tensor, idx: Tensor) -> Tensor:
        """Validation MSE ``[len(idx)]`` (float64) of the weights ``W`` [p, len(idx)] and intercepts
        ``b`` [len(idx)] of the targets ``idx``."""
        r = self.predict(W, b) - self.Y[:, idx]
        return (r * r).sum(0, dtype=torch.float64) / max(r.shape[0], 1)
