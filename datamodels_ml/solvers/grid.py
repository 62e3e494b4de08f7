"""The regularization grid: the analytic λ_max of each target and the geometric path below it."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from datamodels_ml.solvers.sources import BatchSource, TensorBatches
from datamodels_ml.solvers.stats import target_stats

__all__ = ["lambda_max", "lambda_grid", "check_k_eps"]


def lambda_max(
    source_or_X: BatchSource | Tensor,
    Y: Tensor | None = None,
    *,
    mean: Tensor,
    std: Tensor,
    fit_intercept: bool = True,
) -> Tensor:
    """Smallest λ at which every coefficient of each target is zero.

    ``λ_max[t] = max_j |Z_j^T (y_t - ȳ_t)| / n`` with ``Z = (X - mean) / std`` (``ȳ_t = 0`` when
    ``fit_intercept`` is False).

    Args:
        source_or_X: a BatchSource, or ``X`` ``[n, p]`` (then ``Y`` ``[n, T]`` is required).
        Y: ``[n, T]`` outputs when ``source_or_X`` is a tensor.
        mean, std: ``[p]`` standardization statistics.
    Returns:
        ``[T]`` float64 tensor on the device of ``mean``.
    """
    if isinstance(source_or_X, Tensor):
        if Y is None:
            raise ValueError("Y is required when X is given as a tensor")
        source = TensorBatches(source_or_X, Y, batch_size=max(1, source_or_X.shape[0]), shuffle=False)
    else:
        source = source_or_X
    ts = target_stats(source, device=mean.device)
    return ts.quad(mean.to(torch.float64), 1.0 / std.to(torch.float64), fit_intercept)[0].abs().amax(0)


def lambda_grid(lam_max: Tensor, *, k: int, eps: float) -> Tensor:
    """Geometric grid ``[k, T]`` from ``lam_max`` (row 0) down to ``eps * lam_max`` (row k-1)."""
    check_k_eps(k, eps)
    lam_max = torch.as_tensor(lam_max)
    if k == 1:
        return lam_max[None].clone()
    ratios = torch.logspace(0, math.log10(eps), k, dtype=torch.float64, device=lam_max.device)
    return ratios[:, None].to(lam_max.dtype) * lam_max[None, :]


def check_k_eps(k: int, eps: float) -> None:
    """Raise ValueError unless ``k`` is an integer >= 1 and ``eps`` in (0, 1]."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (number of lambdas) must be an integer >= 1, got {k!r}")
    if not (0.0 < float(eps) <= 1.0):
        raise ValueError(f"eps must be in (0, 1], got {eps!r}")
