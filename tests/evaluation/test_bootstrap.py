"""The LDS's bootstrap interval: one replicate is scipy's Spearman on the duplicated sample, the interval
covers the true LDS about 95% of the time in a seeded simulation, and the slope against log(models)."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from datamodels_ml.evaluation.bootstrap import (_COLS, _Replicates, lds_interval, lds_intervals, narrow_enough,
                                     slope_line, slope_per_doubling)
from datamodels_ml.evaluation.metrics import lds


@pytest.mark.filterwarnings("ignore:An input array is constant")  # scipy, on the constant prediction
@pytest.mark.parametrize("seed,ties", [(0, True), (1, True), (2, False)])
def test_a_replicate_is_spearman_on_the_duplicated_sample(seed, ties):
    rng = np.random.default_rng(seed)
    n, t = 30, _COLS + 6  # a whole block of targets and a partial one
    actual = rng.normal(size=(n, t))
    pred = actual + rng.normal(size=(n, t))
    if ties:  # ties in some blocks only (each block ranks with or without tie handling)
        actual[:, _COLS:] = np.round(actual[:, _COLS:], 1)
        pred[:, _COLS + 2] = np.round(pred[:, _COLS + 2])
    pred[:, 1] = 3.0  # a constant prediction counts 0
    w = rng.multinomial(n, np.full(n, 1 / n)).astype(float)
    got = _Replicates([pred, -pred], actual).corr(w)
    rows = np.repeat(np.arange(n), w.astype(int))
    want = np.array([spearmanr(pred[rows, j], actual[rows, j]).statistic for j in range(t)])
    want[1] = 0.0
    np.testing.assert_allclose(got, [want, -want], atol=1e-12)


def _moran(rho, n):
    """Expected Spearman correlation of n bivariate normal pairs with correlation rho (Moran, 1948)."""
    return 6 / (np.pi * (n + 1)) * (np.arcsin(rho) + (n - 2) * np.arcsin(rho / 2))


def test_the_interval_covers_the_true_lds_about_95_percent_of_the_time():
    """Targets with correlations rho ~ U(0.2, 0.8), n held-out models: the true LDS is the mean over that
    target population of the expected Spearman at n models."""
    n, t, reps = 60, 25, 200
    grid = np.linspace(0.2, 0.8, 20001)
    truth = float(np.mean(_moran(grid, n)))
    rng = np.random.default_rng(2026)
    covered = 0
    for r in range(reps):
        rho = rng.uniform(0.2, 0.8, size=t)
        z1, z2 = rng.normal(size=(2, n, t))
        actual = z1
        pred = rho * z1 + np.sqrt(1 - rho ** 2) * z2
        iv = lds_interval(pred, actual, n_boot=150, seed=r)
        covered += iv.low <= truth <= iv.high
    assert 0.90 <= covered / reps <= 0.99, covered / reps


def test_width_warning_and_slope():
    rng = np.random.default_rng(0)
    n, t = 80, 40
    actual = rng.normal(size=(n, t))
    noise = rng.normal(size=(n, t))
    preds = [actual + s * noise for s in (3.0, 1.5, 0.75)]  # better with every doubling of the models
    ivs = lds_intervals(preds, actual, n_boot=200, seed=0)
    for p, iv in zip(preds, ivs):
        assert iv.low < lds(p, actual) < iv.high
    warning = narrow_enough(ivs[0])
    assert warning.startswith("warning: the LDS's 95% interval is") and "held-out models would narrow it" in warning
    point, lo, hi = slope_per_doubling([100, 200, 400], [lds(p, actual) for p in preds], ivs)
    assert 0 < lo < point < hi
    assert slope_line(point, lo, hi).startswith("more models still pay: +0.")
    assert slope_line(0.01, -0.01, 0.03).startswith("no clear gain from more models")
