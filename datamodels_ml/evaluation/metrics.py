"""The metrics of a datamodels evaluation, pure functions of ``pred`` and ``actual`` ``[n_models, n_targets]``.

Conventions:

* ``spearman_per_target`` / ``pearson_per_target``: the correlation over models, per target. Ties
  get average ranks (as ``scipy.stats.spearmanr``).
* A target whose *actual* output is constant over the held-out models has no ranking to predict: its
  correlations and R² are NaN, left out of every mean, and counted (``n_constant``).
* A target whose *prediction* is constant (e.g. the lasso kept no weight) while the actual output
  varies predicts no ranking at all: its correlations count as 0 (counted in ``n_constant_pred``).
* ``lds`` is the mean Spearman correlation over the remaining targets (the linear datamodeling
  score of the paper); ``pearson`` and ``r2`` are means the same way; ``mse`` is over all entries.
"""

from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _as_2d(pred: Any, actual: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if p.ndim == 1:
        p, a = p[:, None], a.reshape(-1, 1)
    if p.shape != a.shape or p.ndim != 2:
        raise ValueError(f"pred and actual must have the same shape [n_models, n_targets], got {p.shape} and {a.shape}")
    return p, a


def _constant(x: np.ndarray) -> np.ndarray:
    """Per column: exactly constant (max == min), immune to rounding in the mean."""
    if x.shape[0] == 0:
        return np.ones(x.shape[1], dtype=bool)
    return x.max(axis=0) == x.min(axis=0)


def pearson_per_target(pred: Any, actual: Any) -> np.ndarray:
    """Pearson correlation per column; NaN for a constant actual column, 0 for a constant prediction."""
    p, a = _as_2d(pred, actual)
    const_a, const_p = _constant(a), _constant(p)
    pc = p - p.mean(axis=0)
    ac = a - a.mean(axis=0)
    den = np.sqrt((pc * pc).sum(axis=0) * (ac * ac).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (pc * ac).sum(axis=0) / den
    r = np.clip(r, -1.0, 1.0)
    r[const_p] = 0.0
    r[const_a] = np.nan
    return r


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, method="average", axis=0) if x.shape[0] else x


def spearman_per_target(pred: Any, actual: Any) -> np.ndarray:
    """Spearman rank correlation per column (average ranks for ties), same NaN/0 rules as Pearson."""
    p, a = _as_2d(pred, actual)
    return pearson_per_target(_ranks(p), _ranks(a))


def r2_per_target(pred: Any, actual: Any) -> np.ndarray:
    """Coefficient of determination per column; NaN for a constant actual column."""
    p, a = _as_2d(pred, actual)
    ss_res = ((a - p) ** 2).sum(axis=0)
    ss_tot = ((a - a.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1.0 - ss_res / ss_tot
    r2[_constant(a)] = np.nan
    return r2


def _nanmean(x: np.ndarray) -> float:
    finite = x[np.isfinite(x)]
    return float(finite.mean()) if finite.size else float("nan")


def lds(pred: Any, actual: Any) -> float:
    """Linear datamodeling score: mean over targets of the Spearman correlation (constant targets left out)."""
    return _nanmean(spearman_per_target(pred, actual))


def pearson(pred: Any, actual: Any) -> float:
    """Mean over targets of the Pearson correlation (constant targets left out)."""
    return _nanmean(pearson_per_target(pred, actual))


def r2(pred: Any, actual: Any) -> float:
    """Mean over targets of R² (constant targets left out)."""
    return _nanmean(r2_per_target(pred, actual))


def mse(pred: Any, actual: Any) -> float:
    """Mean squared error over all models and targets."""
    p, a = _as_2d(pred, actual)
    return float(((p - a) ** 2).mean()) if p.size else float("nan")


@dataclass
class Scores:
    """Every metric of one evaluation; the per-target arrays are indexed like the fitted slice."""

    lds: float
    pearson: float
    r2: float
    mse: float
    n_models: int
    n_targets: int
    n_constant: int
    n_constant_pred: int
    spearman_t: np.ndarray = field(repr=False)
    pearson_t: np.ndarray = field(repr=False)
    r2_t: np.ndarray = field(repr=False)
    mse_t: np.ndarray = field(repr=False)

    def metrics(self) -> dict[str, float]:
        return {"lds": self.lds, "pearson": self.pearson, "r2": self.r2, "mse": self.mse,
                "n_heldout": self.n_models, "n_targets": self.n_targets, "n_constant_targets": self.n_constant,
                "n_constant_predictions": self.n_constant_pred}


def score(pred: Any, actual: Any) -> Scores:
    """All metrics at once (see the module docstring for the conventions)."""
    p, a = _as_2d(pred, actual)
    sp, pe, r = spearman_per_target(p, a), pearson_per_target(p, a), r2_per_target(p, a)
    const_a, const_p = _constant(a), _constant(p)
    return Scores(lds=_nanmean(sp), pearson=_nanmean(pe), r2=_nanmean(r), mse=mse(p, a),
                  n_models=int(p.shape[0]), n_targets=int(p.shape[1]), n_constant=int(const_a.sum()),
                  n_constant_pred=int((const_p & ~const_a).sum()), spearman_t=sp, pearson_t=pe, r2_t=r,
                  mse_t=((p - a) ** 2).mean(axis=0) if p.shape[0] else np.full(p.shape[1], np.nan))


__all__ = ["lds", "pearson", "r2", "mse", "spearman_per_target", "pearson_per_target", "r2_per_target", "score",
           "Scores"]
