"""The regularization grid: the analytic λ_max of each target and the geometric path below it."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from datamodels_ml.solvers.sources import BatchSource, TensorBatches
from datamodels_ml.solvers.stats import target_stats

__all__ = ["lambda_max", "lambda_grid", "fast_l1_grid", "path_grid", "check_k_eps", "GRIDS"]

GRIDS = ("datamodels_ml", "fast_l1")


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


def fast_l1_grid(lam_max_raw: Tensor, *, k: int, eps: float) -> Tensor:
    """The original fast_l1 grid ``[k + 1, T]``: ``lam_max_raw * eps**(i / k)``, i = 0..k-1, then 0.

    ``lam_max_raw`` is fast_l1's λ_max, ``max_j |X_j^T (y - ȳ)| / n`` on the raw 0/1 masks (at mask
    density 1/2, half the λ_max of the standardized problem), so its smallest λ > 0 is
    ``eps**((k-1)/k)`` of it. fast_l1 fits λ = 0 first; a decreasing path puts it last.
    """
    check_k_eps(k, eps)
    lam_max_raw = torch.as_tensor(lam_max_raw)
    ratios = torch.tensor([eps ** (i / k) for i in range(k)] + [0.0], dtype=torch.float64, device=lam_max_raw.device)
    return ratios[:, None].to(lam_max_raw.dtype) * lam_max_raw[None, :]


def path_grid(lambdas: Tensor | None, c: Tensor, std: Tensor, *, k: int, eps: float,
              grid: str = "datamodels_ml") -> Tensor:
    """The path's grid ``[k', T]`` from ``c = Z^T (y - ȳ) / n`` ``[p, T]`` (float64) and the masks'
    ``std`` ``[p]``: ``lambdas`` as given (``[k']`` or ``[k', T]``, checked), else ``lambda_grid`` of
    the standardized λ_max (``grid="datamodels_ml"``) or ``fast_l1_grid`` of the raw one, ``max_j
    std_j |c_j|`` (``grid="fast_l1"``)."""
    T = c.shape[1]
    if lambdas is not None:
        lam_path = torch.as_tensor(lambdas, dtype=torch.float64, device=c.device)
        if lam_path.ndim == 1:
            lam_path = lam_path[:, None].expand(-1, T)
        if lam_path.ndim != 2 or lam_path.shape[1] != T or lam_path.shape[0] < 1:
            raise ValueError(f"lambdas must have shape [k] or [k, {T}], got {tuple(lam_path.shape)}")
        if bool((lam_path < 0).any()):
            raise ValueError("lambdas must be non-negative")
        return lam_path.clone()
    if grid == "fast_l1":
        return fast_l1_grid((c.abs() * std.to(torch.float64)[:, None]).amax(0), k=k, eps=eps)
    return lambda_grid(c.abs().amax(0), k=k, eps=eps)


def check_k_eps(k: int, eps: float) -> None:
    """Raise ValueError unless ``k`` is an integer >= 1 and ``eps`` in (0, 1]."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (number of lambdas) must be an integer >= 1, got {k!r}")
    if not (0.0 < float(eps) <= 1.0):
        raise ValueError(f"eps must be in (0, 1], got {eps!r}")
