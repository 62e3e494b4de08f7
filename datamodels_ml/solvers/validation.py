"""Predictions on the validation rows, the path's selection criterion (fista).

The standardized validation masks ``Z_val`` are kept converted (float, transposed to
``[p, n_val]``, whose rows a sparse product reads) while they take at most ``CACHE`` bytes, else
converted per call on the features in use only. A product picks the cheapest form for the weights
at hand (``blas.mm_rows``): sparse (CSR) while they are sparse enough, the whole ``Z_val`` when
most features are non-zero, else the gathered columns of the non-zero features.
"""

from __future__ import annotations

import torch
from torch import Tensor

from datamodels_ml.solvers.blas import mm_iter, mm_rows
from datamodels_ml.solvers.stats import FeatureStats

__all__ = ["ValRows", "CACHE"]

CACHE = 256 * 2**20  # bytes: the standardized validation masks are kept converted up to this size


class ValRows:
    """The validation rows of ``stats`` (masks) and their outputs ``Y`` ``[n_val, T]``, in ``dtype``."""

    def __init__(self, stats: FeatureStats, Y: Tensor, dtype: torch.dtype):
        self.stats, self.Y, self.dtype = stats, Y, dtype
        nbytes = stats.n_val * stats.n_features * torch.finfo(dtype).bits // 8
        keep = stats.x_val is not None and nbytes <= CACHE
        self.zT = stats.z_val(None, dtype).T.contiguous() if keep else None  # [p, n_val]

    def predict(self, W: Tensor, b: Tensor) -> Tensor:
        """Predictions ``[n_val, Ta]`` of the weights ``W`` [p, Ta] and intercepts ``b`` [Ta]."""
        pred = b.expand(self.Y.shape[0], -1).clone()
        if self.zT is not None:  # sparse, whole or gathered rows (blas.mm_rows), gathered at once:
            # they are at most the cached matrix
            return pred.add_(mm_rows(self.zT, W, rows=self.zT.shape[0]))
        A = (W != 0).any(1).nonzero().squeeze(1)
        if A.numel() == 0:
            return pred
        return pred.add_(mm_iter(self.stats.z_val(A, self.dtype), W[A]))

    def mse(self, W: Tensor, b: Tensor, idx: Tensor) -> Tensor:
        """Validation MSE ``[len(idx)]`` (float64) of the targets ``idx`` (columns of ``W`` [p, T])."""
        r = self.predict(W[:, idx], b[idx]) - self.Y[:, idx]
        return (r * r).sum(0, dtype=torch.float64) / max(r.shape[0], 1)
