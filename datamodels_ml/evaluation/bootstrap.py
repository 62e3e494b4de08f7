"""Bootstrap intervals for the LDS: how much it could move with other held-out models and targets.

One replicate draws the held-out models with replacement (multinomial counts ``w``) and the targets
with replacement (counts ``v``); its LDS is the ``v``-weighted mean over targets of the Spearman
correlation of the models drawn, duplicates included (average ranks over the repeated rows, exactly
as ``scipy.stats.spearmanr`` on the duplicated sample). Ranks come from one sort per column done
once, so a replicate costs a few passes over ``[models, targets]``, not a sort: cumulative sums of
the weights in each column's sorted order, the prediction's ranks gathered into the actual's order
(no scatter back to the rows), in blocks of targets that stay in the caches. The interval is the
percentile interval of the replicates. Several predictions of the same models (``budget``'s fits)
share the replicates, so differences between them, such as the slope of the LDS against the models
used, get intervals too. The conventions of ``metrics`` hold in every replicate (a constant actual
output is left out, a constant prediction counts 0).

The same replicates, with the targets kept, give the part of the width due to the held-out models
alone: ``narrow_enough`` uses it to say how many held-out models a given width needs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

LEVEL = 0.95
TARGET_WIDTH = 0.02


_COLS = 32  # targets per block: a block's [models, 32] arrays stay in the caches (2000 x 2000: 3x faster than whole)


class _Ranks:
    """Weighted average ranks of one column block ``x`` [n, b] for any row weights, in each
    column's sorted order (one sort, done here): no scatter back to the rows."""

    def __init__(self, x: np.ndarray):
        self.order = np.ascontiguousarray(np.argsort(x, axis=0, kind="stable"))
        s = np.take_along_axis(x, self.order, axis=0)
        self.start = np.ones_like(s, dtype=bool)
        self.start[1:] = s[1:] != s[:-1]
        self.end = np.ones_like(s, dtype=bool)
        self.end[:-1] = self.start[1:]
        self.ties = not bool(self.start.all())

    def sorted_ranks(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(ranks, weights)`` ``[n, b]``, both in each column's sorted order."""
        ws = np.take(w, self.order)
        c = np.cumsum(ws, axis=0)
        if not self.ties:  # a lone value: c - w + (w + 1) / 2
            c -= 0.5 * ws
            c += 0.5
            return c, ws
        lower = np.maximum.accumulate(np.where(self.start, c - ws, 0.0), axis=0)
        upper = np.minimum.accumulate(np.where(self.end, c, np.inf)[::-1], axis=0)[::-1]
        return lower + (upper - lower + 1.0) / 2.0, ws

    def index_in(self, other: "_Ranks") -> np.ndarray:
        """Flat indices into this block's sorted ``[n, b]`` arrays of the rows in ``other``'s sorted order."""
        n, b = self.order.shape
        pos = np.empty_like(self.order)
        np.put_along_axis(pos, self.order, np.arange(n)[:, None], axis=0)  # row -> its place in this order
        return (np.take_along_axis(pos, other.order, axis=0) * b + np.arange(b)).ravel()


class _Replicates:
    """The Spearman correlations of every prediction, per target, for any row weights: column
    blocks of ``_COLS`` targets, each prediction's ranks gathered into the actual's sorted order."""

    def __init__(self, preds: list[np.ndarray], actual: np.ndarray):
        self.t = actual.shape[1]
        self.blocks = []
        for c0 in range(0, self.t, _COLS):
            ra = _Ranks(actual[:, c0 : c0 + _COLS])
            rps = [_Ranks(np.asarray(p[:, c0 : c0 + _COLS], dtype=np.float64)) for p in preds]
            self.blocks.append((c0, ra, [(rp, rp.index_in(ra)) for rp in rps]))
        self.k = len(preds)

    def corr(self, w: np.ndarray) -> np.ndarray:
        """``[k, t]`` the weighted rank correlations with row weights ``w`` [n]."""
        out = np.empty((self.k, self.t))
        for c0, ra, rps in self.blocks:
            a, wa = ra.sorted_ranks(w)
            for k, (rp, where) in enumerate(rps):
                r = np.take(rp.sorted_ranks(w)[0], where).reshape(a.shape)
                out[k, c0 : c0 + a.shape[1]] = _weighted_corr(r, a, wa)
        return out


def _weighted_corr(rp: np.ndarray, ra: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per column: Pearson correlation of ranks with row weights ``w`` [n, t] (rows of weight 0
    count for nothing; NaN: constant actual, 0: constant prediction). Ranks are integers and
    halves and the weights integers, so a constant column's weighted deviations are exactly 0."""
    total = w.sum(axis=0)
    pc = rp - (w * rp).sum(axis=0) / total
    ac = ra - (w * ra).sum(axis=0) / total
    wpc = w * pc
    vp, va = (wpc * pc).sum(axis=0), (w * ac * ac).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (wpc * ac).sum(axis=0) / np.sqrt(vp * va)
    r = np.clip(r, -1.0, 1.0)
    r[vp == 0] = 0.0
    r[va == 0] = np.nan
    return r


def _mean(r: np.ndarray, v: np.ndarray) -> float:
    ok = np.isfinite(r) & (v > 0)
    return float((r[ok] * v[ok]).sum() / v[ok].sum()) if ok.any() else float("nan")


@dataclass
class Interval:
    """Percentile interval of the LDS; ``models_only`` is the width with the targets held fixed."""

    low: float
    high: float
    models_only_width: float
    n_models: int
    reps: np.ndarray  # [n_boot] replicates (targets and models resampled)

    @property
    def width(self) -> float:
        return self.high - self.low


def _percentiles(x: np.ndarray, level: float) -> tuple[float, float]:
    x = x[np.isfinite(x)]
    if not x.size:
        return float("nan"), float("nan")
    lo, hi = np.percentile(x, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def lds_intervals(preds: list[np.ndarray], actual: np.ndarray, *, n_boot: int = 1000, seed: int = 0,
                  level: float = LEVEL) -> list[Interval]:
    """One interval per prediction ``[models, targets]`` of the same held-out models (shared replicates)."""
    actual = np.asarray(actual, dtype=np.float64)
    n, t = actual.shape
    rng = np.random.default_rng(seed)
    reps = _Replicates(preds, actual)
    both = np.full((n_boot, len(preds)), np.nan)
    models = np.full((n_boot, len(preds)), np.nan)
    ones = np.ones(t)
    for b in range(n_boot):
        w = rng.multinomial(n, np.full(n, 1.0 / n)).astype(np.float64)
        v = rng.multinomial(t, np.full(t, 1.0 / t)).astype(np.float64)
        r = reps.corr(w)
        for k in range(len(preds)):
            both[b, k] = _mean(r[k], v)
            models[b, k] = _mean(r[k], ones)
    out = []
    for k in range(len(preds)):
        lo, hi = _percentiles(both[:, k], level)
        m_lo, m_hi = _percentiles(models[:, k], level)
        out.append(Interval(lo, hi, m_hi - m_lo, n, both[:, k]))
    return out


def lds_interval(pred: np.ndarray, actual: np.ndarray, **kwargs) -> Interval:
    """The bootstrap interval of one prediction's LDS (see the module docstring)."""
    return lds_intervals([pred], actual, **kwargs)[0]


def narrow_enough(iv: Interval, target: float = TARGET_WIDTH) -> str | None:
    """None when the interval is narrower than ``target``, else one warning line saying why and what would help."""
    if not np.isfinite(iv.width) or iv.width < target:
        return None
    line = (f"warning: the LDS's 95% interval is {iv.width:.3f} wide (> {target}) with {iv.n_models} held-out models")
    if iv.models_only_width >= target:
        need = int(np.ceil(iv.n_models * (iv.models_only_width / target) ** 2))
        return line + f": about {need} held-out models would narrow it to {target} (width falls as 1/sqrt(models))"
    return line + ": the held-out models are enough; the spread over targets makes it wide (only more targets would narrow it)"


def slope_per_doubling(models: list[int], lds_points: list[float], intervals: list[Interval],
                       level: float = LEVEL) -> tuple[float, float, float]:
    """Least-squares slope of LDS against log2(models), and its percentile interval over the shared replicates."""
    x = np.log2(np.asarray(models, dtype=np.float64))
    xc = x - x.mean()
    denom = (xc * xc).sum()
    point = float((xc * (np.asarray(lds_points) - np.mean(lds_points))).sum() / denom)
    reps = np.stack([iv.reps for iv in intervals], axis=1)  # [n_boot, fits]
    slopes = ((reps - reps.mean(axis=1, keepdims=True)) * xc).sum(axis=1) / denom
    lo, hi = _percentiles(slopes, level)
    return point, lo, hi


def slope_line(point: float, lo: float, hi: float) -> str:
    """One line: do more models still pay?"""
    what = (f"{point:+.4f} LDS per doubling of the models (95% interval {lo:+.4f} to {hi:+.4f})")
    if lo > 0:
        return f"more models still pay: {what}"
    if hi < 0:
        return f"more models do not pay (the LDS falls): {what}"
    return f"no clear gain from more models: {what}, the interval includes 0"




def interval_report(pred: np.ndarray, actual: np.ndarray, cfg: Any, *, quiet: bool = False):
    """The LDS's bootstrap interval (``cfg.bootstrap`` replicates, 0: none), printed with a warning when wide."""
    if int(cfg.bootstrap) <= 0:
        return None
    iv = lds_interval(pred, actual, n_boot=int(cfg.bootstrap), seed=int(cfg.seed))
    if not quiet:
        print(f"LDS 95% interval:    [{iv.low:.4f}, {iv.high:.4f}] (bootstrap over {iv.n_models} held-out models "
              f"and the targets, {int(cfg.bootstrap)} replicates)")
    warning = narrow_enough(iv)
    if warning:
        print(warning, file=sys.stderr)
    return iv


def interval_metrics(iv) -> dict[str, float]:
    return {} if iv is None else {"lds_low": iv.low, "lds_high": iv.high}


__all__ = ["Interval", "lds_interval", "lds_intervals", "narrow_enough", "interval_report", "interval_metrics",
           "slope_per_doubling", "slope_line"]
